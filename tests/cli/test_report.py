"""`tdlrt report` through the real CLI: unfinished runs listed beside a finished one, every plot also written as
SVG that parses and is byte-stable, and the marks of the best and second row within compression bands."""
import csv
import json

from conftest import TINY, run_dirs, run_tdlrt
from handmade import table, write_ranks, write_run


def test_unfinished_runs_are_listed(tmp_path):
    """A run killed after its first epoch (metrics.csv and last.pt, no summary.json) beside a finished one."""
    args = ["train", *[a for a in TINY if not a.startswith("epochs")], "epochs=2", "method=dense", "cost_report=false"]
    run_tdlrt(args + ["seed=0"], tmp_path)
    killed = run_tdlrt(args + ["seed=1"], tmp_path, env={"TDLRT_FAULT_KILL_AT_STEP": "6"}, check=False)
    assert killed.returncode == 137
    started = tmp_path / "outputs" / "train" / "started"  # failed before its first epoch: only .hydra/
    (started / ".hydra").mkdir(parents=True)
    (started / ".hydra" / "config.yaml").write_text("data: {name: synthetic}\nmodel: {name: vgg16}\n"
                                                    "method: {name: tdlrt, default_tau: 0.2}\n"
                                                    "tau: ${method.default_tau}\nepochs: 5\nseed: 3\n")
    runs = run_dirs(tmp_path / "outputs")
    assert len(runs) == 3 and sum((r / "summary.json").is_file() for r in runs) == 1
    out = tmp_path / "rep"
    proc = run_tdlrt(["report", str(tmp_path / "outputs"), f"out={out}"], tmp_path)
    assert "1 runs in 1 rows" in proc.stdout and "2 unfinished" in proc.stdout
    with open(out / "unfinished.csv", newline="") as fh:
        unfinished = {r["seed"]: r for r in csv.DictReader(fh)}
    assert set(unfinished) == {"1", "3"}
    assert (unfinished["1"]["epochs_done"], unfinished["1"]["epochs_planned"]) == ("1", "2")
    assert unfinished["1"]["last_checkpoint"] == "True" and unfinished["1"]["method"] == "dense"
    assert (unfinished["3"]["epochs_done"], unfinished["3"]["setting"]) == ("0", "tau=0.2")
    md = (out / "table.md").read_text()
    assert "Unfinished runs (2)" in md and "| 1/2 |" in md and "| 0/5 |" in md
    assert "2 unfinished run(s)" in (out / "table.tex").read_text()
    assert len(table(out)) == 1  # the unfinished runs are in no row


def test_every_plot_is_also_written_as_svg_that_parses_and_is_byte_stable(tmp_path):
    import xml.etree.ElementTree as ET

    from tdlrt_cli.report.plots import REPORT_TEMPORARY

    runs = tmp_path / "runs"
    for seed in (0, 1):
        write_run(runs / f"t{seed}", 80.0 + seed, seed=seed)
        write_ranks(runs / f"t{seed}", [(0, 8), (10, 6 - seed)])
    ill = runs / "ill"  # an ill-conditioned start: the loss plot too
    write_run(ill, 70.0, cr=95.0, **{"method.init_decay": 1.0})
    (ill / "metrics.csv").write_text("epoch,train_loss,test_acc\n1,2.0,50\n2,1.0,70\n")
    first, second = tmp_path / "rep", tmp_path / "rep2"
    run_tdlrt(["report", str(runs), f"out={first}"], tmp_path)
    stale = first / ".ranks_x.svg.999999999.tmp"  # a killed report's SVG temporary (no such process)
    stale.write_text("<svg")
    assert REPORT_TEMPORARY.match(stale.name) and REPORT_TEMPORARY.match(".a.png.12.tmp")
    run_tdlrt(["report", str(runs), f"out={first}"], tmp_path)
    assert not stale.exists()
    run_tdlrt(["report", str(runs), f"out={second}"], tmp_path)
    pngs = sorted(p.name for p in first.glob("*.png"))
    assert len(pngs) == 3 and "ill_conditioned_loss.png" in pngs  # acc vs c.r., the seeds' rank plot, the loss
    assert sorted(p.name for p in first.glob("*.svg")) == [n[:-4] + ".svg" for n in pngs]
    for name in pngs:
        svg = first / (name[:-4] + ".svg")
        root = ET.parse(svg).getroot()
        assert root.tag == "{http://www.w3.org/2000/svg}svg"
        assert [e for e in root.iter("{http://www.w3.org/2000/svg}text") if e.text]  # text kept as text
        assert svg.read_bytes() == (second / svg.name).read_bytes(), svg.name  # no date, a fixed hash salt
    assert not [p.name for p in first.iterdir() if p.name.startswith(".")]


def test_report_marks_best_and_second_within_compression_bands(tmp_path):
    """Two seeds a compressed row: each mark is a difference beyond the spread over seeds."""
    runs = [("dense", None, 90.0, 0.0), ("tdlrt", 0.1, 85.0, 91.0), ("tdlrt", 0.1, 87.0, 92.0),
            ("tucker", None, 80.5, 90.5), ("tucker", None, 81.5, 90.5), ("cp", None, 75.0, 92.5),
            ("cp", None, 76.0, 92.5), ("tdlrt", 0.3, 70.0, 97.0), ("tdlrt", 0.3, 71.0, 97.0),
            ("matrix", None, 75.0, 96.0), ("matrix", None, 76.0, 96.0)]
    for i, (method, tau, acc, cr) in enumerate(runs):
        d = tmp_path / "runs" / str(i)
        d.mkdir(parents=True)
        m = {"name": method, "target_cr": 90.0} if method in ("tucker", "cp", "matrix") else {"name": method}
        config = {"data": {"name": "cifar10"}, "model": {"name": "vgg16"}, "method": m, "tau": tau, "seed": i}
        (d / "summary.json").write_text(json.dumps({"config": config, "test_acc": acc, "compression_rate": cr}))
    out = tmp_path / "rep"
    run_tdlrt(["report", str(tmp_path / "runs"), f"out={out}"], tmp_path)
    rows = {(r["method"], r["setting"]): r for r in csv.DictReader(open(out / "table.csv"))}
    tdlrt = rows[("tdlrt", "tau=0.1")]
    assert tdlrt["runs"] == "2" and float(tdlrt["test_acc_mean"]) == 86.0
    assert float(tdlrt["test_acc_std"]) > 0 and tdlrt["acc_source"] == "final"  # no validation split here
    assert tdlrt["mark"] == "best"                              # 90-95% band: 86 > 81 > 75.5, beyond the stds
    assert rows[("tucker", "target c.r.=90%")]["mark"] == "second"
    assert rows[("cp", "target c.r.=90%")]["mark"] == ""
    assert rows[("matrix", "target c.r.=90%")]["mark"] == "best"  # 95-100% band: 75.5 > 70.5
    assert rows[("tdlrt", "tau=0.3")]["mark"] == ""              # no third row to beat
    assert rows[("dense", "")]["mark"] == ""
    md = (out / "table.md").read_text()
    assert "**86.00 ± 1.41**" in md and "_81.00 ± 0.71_" in md
    assert "\\textbf{86.00 $\\pm$ 1.41}" in (out / "table.tex").read_text()
