"""`tdlrt report`: which runs share a row, the columns of the keys that differ, unfinished runs, and which
accuracy a row reports."""
import copy
import csv
import json
import re

from conftest import TINY, run_dirs, run_tdlrt

from tdlrt_cli.report import main as report

CONFIG = {"data": {"name": "cifar10", "root": "data", "download": True, "num_workers": 4},
          "model": {"name": "vgg16", "width_mult": 1.0},
          "method": {"name": "tdlrt", "default_tau": 0.1, "r_min": 2}, "optimizer": {"name": "sgd", "nesterov": False},
          "scheduler": {"name": "cosine", "min_lr": 0.0}, "checkpoint": {"every_n_steps": 0, "auto_resume": True},
          "task_name": "train", "tau": 0.1, "lr": 0.05, "weight_decay": 5e-4, "epochs": 30, "seed": 0,
          "device": "auto", "progress": True, "log_every_n_steps": 50, "eval_batch_size": 1024,
          "cost_report": True, "cost_repeat": 10, "ckpt_path": None}


def write_run(folder, final, best=None, cr=91.0, selected=None, **changes):
    """A finished run folder holding only summary.json; ``changes``: dotted config keys -> values;
    ``selected``: the test accuracy of a validation-selected best.pt."""
    config = copy.deepcopy(CONFIG)
    for key, value in changes.items():
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value
    folder.mkdir(parents=True)
    summary = {"config": config, "test_acc": final, "compression_rate": cr}
    if best is not None:
        summary["best_test_acc"] = best
    if selected is not None:
        summary["selected"] = {"by": "val_acc", "epoch": 3, "val_acc": 99.0, "test_acc": selected}
    (folder / "summary.json").write_text(json.dumps(summary))


def table(out):
    with open(out / "table.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_runs_differing_only_in_seed_and_ignored_keys_are_averaged(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs / "a", 80.0, seed=0)
    write_run(runs / "b", 84.0, seed=1, device="cuda:1", task_name="rerun", progress=False, eval_batch_size=256,
              log_every_n_steps=10, cost_report=False, ckpt_path="x/last.pt", **{"checkpoint.every_n_steps": 5,
              "data.root": "/elsewhere", "data.download": False, "data.num_workers": 0})
    write_run(runs / "c", 70.0, seed=0, weight_decay=0.0)  # trains something else: never averaged in
    report([str(runs), f"out={tmp_path / 'rep'}"])
    rows = table(tmp_path / "rep")
    assert len(rows) == 2
    (avg,) = [r for r in rows if r["runs"] == "2"]
    assert avg["seeds"] == "0 1" and float(avg["test_acc_mean"]) == 82.0 and avg["weight_decay"] == "0.0005"
    (other,) = [r for r in rows if r["runs"] == "1"]
    assert other["weight_decay"] == "0" and float(other["test_acc_mean"]) == 70.0
    header = rows[0].keys()
    for key in ("seed", "device", "task_name", "progress", "checkpoint.every_n_steps", "data.root", "lr"):
        assert key not in header, key  # ignored, averaged over, or equal everywhere


def test_lr_sweep_gives_one_row_per_lr_with_an_lr_column(tmp_path):
    runs = tmp_path / "runs"
    for i, (lr, seed, acc) in enumerate([(0.01, 0, 70.0), (0.01, 1, 72.0), (0.05, 0, 80.0), (0.05, 1, 82.0)]):
        write_run(runs / str(i), acc, lr=lr, seed=seed)
    # another method with its own defaults: a row of its own, but method.r_min is no column
    write_run(runs / "tucker", 75.0, cr=90.0, tau=None, method={"name": "tucker", "target_cr": 90.0, "r_min": 3})
    out = tmp_path / "rep"
    report([str(runs), f"out={out}"])
    rows = {(r["method"], r["lr"]): r for r in table(out)}
    assert set(rows) == {("tdlrt", "0.01"), ("tdlrt", "0.05"), ("tucker", "0.05")}
    assert rows[("tdlrt", "0.01")]["runs"] == "2" and float(rows[("tdlrt", "0.01")]["test_acc_mean"]) == 71.0
    assert float(rows[("tdlrt", "0.05")]["test_acc_mean"]) == 81.0
    assert "method.r_min" not in next(iter(rows.values())) and "tau" not in next(iter(rows.values()))
    md = (out / "table.md").read_text()
    assert "| method | setting | lr | c.r. band (%) |" in md
    assert "| TDLRT | tau=0.1 | 0.01 | 90-95 | 2 |" in md
    assert (out / "acc_vs_cr_cifar10_vgg16.png").is_file()


def test_validation_selected_accuracy_ranks_rows_and_the_test_selected_maximum_never_does(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs / "a", 80.0, best=88.0, cr=91.0, selected=85.0, tau=0.1)  # val-selected checkpoint: 85
    write_run(runs / "b", 86.0, best=89.5, cr=92.0, tau=0.2)  # no validation split: final 86, not its max 89.5
    write_run(runs / "c", 60.0, cr=93.0, tau=0.3)             # nothing but the final accuracy
    out = tmp_path / "rep"
    report([str(runs), f"out={out}"])
    rows = {r["tau"]: r for r in table(out)}
    a, b, c = rows["0.1"], rows["0.2"], rows["0.3"]
    assert (float(a["test_acc_mean"]), float(a["test_acc_final_mean"]), float(a["test_acc_max_epoch_mean"])) == (85.0, 80.0, 88.0)
    assert a["acc_source"] == "val_ckpt" and b["acc_source"] == "final" and float(b["test_acc_mean"]) == 86.0
    assert b["mark"] == "best" and a["mark"] == "second"  # 86 > 85 although b's test-selected max is higher
    assert a["compression_band"] == "90-95"
    assert c["acc_source"] == "final" and float(c["test_acc_mean"]) == float(c["test_acc_max_epoch_mean"]) == 60.0
    md = (out / "table.md").read_text()
    assert "| test acc. (%) | final (%) | max over epochs (%) | c.r. (%) |" in md
    assert "| _85.00 ± 0.00_ | 80.00 ± 0.00 | 88.00 ± 0.00 |" in md and "60.00 ± 0.00 †" in md
    tex = (out / "table.tex").read_text()
    assert "Max over epochs" in tex
    spec = re.search(r"\\begin\{tabular\}\{([lrc]+)\}", tex).group(1)
    body = [line for line in tex.splitlines() if line.endswith("\\\\") and "&" in line]
    assert body and all(line.count("&") + 1 == len(spec) for line in body)  # every row has the declared columns


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


def test_only_unfinished_runs_still_give_a_report(tmp_path):
    run = tmp_path / "runs" / "0"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(b"")
    (run / "metrics.csv").write_text("epoch,test_acc\n1,40.0\n2,50.5\n")
    out = tmp_path / "rep"
    report([str(tmp_path / "runs"), f"out={out}"])
    assert table(out) == []
    assert "| 2/? | 50.50 | yes |" in (out / "table.md").read_text()


def test_a_key_added_later_compares_as_what_older_runs_did(tmp_path):
    """Older summaries lack data.val_size and method.tau_warmup_epochs: they count as val_size 0 (what they did)
    and tau_warmup_epochs 0 (the plain rule they used, not today's default 1)."""
    runs = tmp_path / "runs"
    write_run(runs / "old", 80.0, seed=0)
    write_run(runs / "new", 82.0, seed=1, **{"data.val_size": 0, "method.tau_warmup_epochs": 0.0})
    write_run(runs / "warm", 90.0, seed=0, **{"data.val_size": 0, "method.tau_warmup_epochs": 1.0})
    report([str(runs), f"out={tmp_path / 'rep'}"])
    rows = {r["method.tau_warmup_epochs"]: r for r in table(tmp_path / "rep")}
    assert set(rows) == {"0", "1"} and rows["0"]["runs"] == "2" and "data.val_size" not in rows["0"]
