"""`tdlrt report` called in process: which runs share a row, the columns of the keys that differ, unfinished
runs, which accuracy a row reports and which rows are marked; what the figures show, the layers' names, and
plots written atomically."""
import csv
import json
import re

import pytest

from conftest import dead_pid
from handmade import finished_run, table, write_ranks, write_run
from tdlrt_cli.report import main as report


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
    for seed, d in ((0, 0.0), (1, 0.2)):  # two seeds each, so that the marks have a spread to beat
        write_run(runs / f"a{seed}", 80.0, best=88.0, cr=91.0, selected=85.0 + d, tau=0.1, seed=seed)  # val-selected
        write_run(runs / f"b{seed}", 86.0 + d, best=89.5, cr=92.0, tau=0.2, seed=seed)  # no validation split: final
        write_run(runs / f"c{seed}", 60.0 + d, cr=93.0, tau=0.3, seed=seed)  # nothing but the final accuracy
    out = tmp_path / "rep"
    report([str(runs), f"out={out}"])
    rows = {r["tau"]: r for r in table(out)}
    a, b, c = rows["0.1"], rows["0.2"], rows["0.3"]
    assert (float(a["test_acc_mean"]), float(a["test_acc_final_mean"]), float(a["test_acc_max_epoch_mean"])) == (85.1, 80.0, 88.0)
    assert a["acc_source"] == "val_ckpt" and b["acc_source"] == "final" and float(b["test_acc_mean"]) == 86.1
    assert b["mark"] == "best" and a["mark"] == "second"  # 86.1 > 85.1 although b's test-selected max is higher
    assert a["compression_band"] == "90-95"
    assert c["acc_source"] == "final" and float(c["test_acc_mean"]) == float(c["test_acc_max_epoch_mean"]) == 60.1
    md = (out / "table.md").read_text()
    assert "| test acc. (%) | final (%) | max over epochs (%) | c.r. (%) |" in md
    assert "| _85.10 ± 0.14_ | 80.00 ± 0.00 | 88.00 ± 0.00 |" in md and "60.10 ± 0.14 †" in md
    tex = (out / "table.tex").read_text()
    assert "Max over epochs" in tex
    assert_tex_columns(tex)


def assert_tex_columns(tex):
    """Every row of table.tex has as many cells as ``\\begin{tabular}{...}`` declares columns."""
    spec = re.search(r"\\begin\{tabular\}\{([lrc]+)\}", tex).group(1)
    body = [line for line in tex.splitlines() if line.endswith("\\\\") and "&" in line]
    assert body and all(line.count("&") + 1 == len(spec) for line in body), (spec, body)


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


# --------------------------------------------------------------------------- figures a paper can use

def figures_of(monkeypatch):
    """What each figure the report saves shows, by file name, taken just before it is written."""
    from tdlrt_cli.report import plots

    seen, save = {}, plots._save

    def spy(fig, path):
        fig.canvas.draw()  # the ticks and offsets as written
        seen[path.name] = [{
            "xlim": ax.get_xlim(), "ylim": ax.get_ylim(),
            "yticks": [t for t in ax.get_yticks() if ax.get_ylim()[0] <= t <= ax.get_ylim()[1]],
            "offsets": (ax.xaxis.get_major_formatter().get_offset(), ax.yaxis.get_major_formatter().get_offset()),
            "lines": [(line.get_label(), line.get_linewidth(), list(line.get_xdata()), list(line.get_ydata()))
                      for line in ax.get_lines()],
            "errorbars": [len(c.lines[0].get_xdata()) if c.lines[0] is not None else len(c.lines[2][0].get_segments())
                          for c in ax.containers if type(c).__name__ == "ErrorbarContainer"],
            "legend": [t.get_text() for t in ax.get_legend().get_texts()] if ax.get_legend() else [],
        } for ax in fig.axes]
        seen[path.name + ":title"] = fig.texts[0].get_text() if fig.texts else ""
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", spy)
    return seen


def test_rank_plots_show_every_seed_and_their_mean_on_an_integer_axis(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    grids = {0: [(0, 8), (10, 6), (20, 5)], 1: [(0, 8), (15, 7), (30, 4)], 2: [(0, 8), (10, 7), (25, 5)]}
    for seed, steps in grids.items():
        write_run(runs / f"s{seed}", 80.0 + seed, seed=seed)
        write_ranks(runs / f"s{seed}", steps)
    seen = figures_of(monkeypatch)
    report([str(runs), f"out={tmp_path / 'rep'}"])
    (name,) = [n for n in seen if n.startswith("ranks_") and not n.endswith(":title")]
    assert "seeds 0, 1, 2" in seen[name + ":title"]
    out_axis, in_axis = seen[name]
    for ax in (out_axis, in_axis):
        assert ax["yticks"] and all(float(t).is_integer() for t in ax["yticks"]), ax["yticks"]
    thick = {label: (xs, ys) for label, width, xs, ys in out_axis["lines"] if width > 2 and xs}
    thin = [xs for label, width, xs, ys in out_axis["lines"] if width < 1 and xs]
    assert len(thin) == 2 * 3  # every seed of both layers
    assert set(thick) == {"features.3 (conv1_2, 16->16)", "features.7 (conv2_1, 16->32)"}
    xs, ys = thick["features.3 (conv1_2, 16->16)"]
    # the mean of the step functions on the steps all seeds reach (0-20): at 10 (6+8+7)/3, at 15 (6+7+7)/3,
    # at 20 (5+7+7)/3; seed 1's step 30 and seed 2's 25 are beyond seed 0's last step
    assert [int(x) for x in xs] == [0, 10, 15, 20] and [float(y) for y in ys] == pytest.approx([8, 7, 20 / 3, 19 / 3])
    assert "mean only on the steps every seed reached" in in_axis["legend"]
    assert {"each seed (3)", "mean over seeds", "features.3 (conv1_2, 16->16)"} <= set(in_axis["legend"])


def test_layers_are_named_by_module_path_with_the_models_aliases(tmp_path):
    import torch.nn as nn

    from tdlrt_cli.models import build_model
    from tdlrt_cli.report.plots import LAYER_ALIASES, layer_labels, layer_name

    for model, (channels, side) in {"vgg16": (3, 32), "alexnet": (3, 32), "lenet5": (1, 28), "resnet18": (3, 32)}.items():
        modules = dict(build_model(model, channels, 10, side, width_mult=0.125).named_modules())
        layers = [n for n, m in modules.items() if isinstance(m, (nn.Conv2d, nn.Linear))]
        aliases = LAYER_ALIASES.get(model, {})
        assert set(aliases) <= set(layers), model  # an alias names a real conv or linear layer's path
        if model != "resnet18":  # its paths name the block already
            assert set(aliases) == set(layers), model
    (tmp_path / "ranks.csv").write_text("epoch,layer,r_out,r_in,r_kh,r_kw,n_out,n_in,n_kh,n_kw\n"
                                        "1,features.3,8,8,3,3,16,16,3,3\n1,features.7,16,8,3,3,32,16,3,3\n")
    assert layer_labels(tmp_path, {"model": {"name": "vgg16"}}) == {"features.3": "features.3 (conv1_2, 16->16)",
                                                                    "features.7": "features.7 (conv2_1, 16->32)"}
    assert layer_labels(tmp_path, {"model": {"name": "resnet18"}})["features.7"] == "features.7 (16->32)"
    assert layer_name("alexnet", "features.8") == "features.8 (conv3)" and layer_name("x", "a.b") == "a.b"
    # the layers of the committed runs' ranks.csv are module paths the aliases know
    import pathlib

    results = pathlib.Path(__file__).resolve().parent.parent.parent / "results"
    for ranks in sorted(results.glob("*/runs/*/ranks.csv"))[:20]:
        model = json.loads((ranks.parent / "summary.json").read_text())["config"]["model"]["name"]
        with open(ranks, newline="") as fh:
            names = {r["layer"] for r in csv.DictReader(fh)}
        assert names and names <= set(LAYER_ALIASES.get(model, names)), (ranks, names)


def test_accuracy_axes_keep_a_minimum_span_and_bars_only_for_several_seeds(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    write_run(runs / "a0", 80.0, cr=90.0, seed=0, tau=0.1)
    write_run(runs / "a1", 80.1, cr=90.1, seed=1, tau=0.1)   # two seeds: error bars
    write_run(runs / "b0", 80.05, cr=90.175, seed=0, tau=0.2)  # one seed: none
    seen = figures_of(monkeypatch)
    report([str(runs), f"out={tmp_path / 'rep'}"])
    (ax,) = seen["acc_vs_cr_cifar10_vgg16.png"]
    (x0, x1), (y0, y1) = ax["xlim"], ax["ylim"]
    assert x1 - x0 >= 4.0 and 89.95 < (x0 + x1) / 2 < 90.2, ax["xlim"]  # centred on the data (and its error bars)
    assert y1 - y0 >= 2.0 and y0 < 80.0 < 80.1 < y1, ax["ylim"]
    assert ax["offsets"] == ("", "")  # tick labels are the values, no "+9e1" offset
    assert ax["errorbars"] == [1]  # one bar: the row with two seeds


def test_marks_only_where_a_row_beats_the_next_by_more_than_the_spread(tmp_path):
    runs = tmp_path / "runs"

    def row(name, accs, cr, **changes):
        for seed, acc in enumerate(accs):
            write_run(runs / f"{name}{seed}", acc, cr=cr, seed=seed, **changes)

    # 90-95: 91 ± 1.41 against 90.2 ± 0.28: a difference inside the spread, no mark
    row("a", [90.0, 92.0], 91.0, tau=0.1)
    row("b", [90.0, 90.4], 92.0, tau=0.2)
    # 95-100: 80.1 beats 78.1 by far more than 0.14 (best); 78.1 against 78.0 ± 0.14 is inside it (no second)
    row("c", [80.0, 80.2], 96.0, tau=0.3)
    row("d", [78.0, 78.2], 97.0, tau=0.4)
    row("e", [77.9, 78.1], 98.0, tau=0.5)
    # 85-90: well apart: best and second
    row("f", [70.0, 70.2], 86.0, tau=0.6)
    row("g", [65.0, 65.2], 87.0, tau=0.7)
    row("h", [60.0, 60.2], 88.0, tau=0.8)
    # 80-85: one seed each, 10 points apart: no spread, no mark
    row("i", [70.0], 81.0, tau=0.9)
    row("j", [60.0], 82.0, tau=1.0)
    # 70-75: a single compressed row; the dense row is never marked
    row("k", [50.0, 50.2], 71.0, tau=1.1)
    row("dense", [95.0, 95.5], 0.0, tau=None, method={"name": "dense"})
    out = tmp_path / "rep"
    report([str(runs), f"out={out}"])
    marks = {r["setting"]: r["mark"] for r in table(out)}
    assert marks == {"tau=0.1": "", "tau=0.2": "", "tau=0.3": "best", "tau=0.4": "", "tau=0.5": "",
                     "tau=0.6": "best", "tau=0.7": "second", "tau=0.8": "", "tau=0.9": "", "tau=1": "",
                     "tau=1.1": "", "": ""}
    one = {r["setting"]: r for r in table(out) if r["runs"] == "1"}
    assert set(one) == {"tau=0.9", "tau=1"}
    assert all(r[k] == "" for r in one.values() for k in ("test_acc_std", "test_acc_final_std",
                                                          "test_acc_max_epoch_std", "compression_rate_std"))
    assert float(one["tau=0.9"]["test_acc_mean"]) == 70.0  # the numbers stay
    md = (out / "table.md").read_text()
    lines = {line.split(" | ")[1]: line for line in md.splitlines() if line.startswith("| TDLRT |")}
    assert "| 1 | 70.00 † | 70.00 | 70.00 | 81.00 |" in lines["tau=0.9"] and "±" not in lines["tau=0.9"]
    assert "**80.10 ± 0.14**" in lines["tau=0.3"] and "_65.10 ± 0.14_" in lines["tau=0.7"]
    assert "**" not in lines["tau=0.1"] + lines["tau=0.2"] and "_78" not in lines["tau=0.4"]
    assert "exceeds the runner-up's by more than the larger of the two rows' std over seeds" in md
    assert "± 0.00 †" not in md  # no one-seed accuracy printed with a zero spread
    tex = (out / "table.tex").read_text()
    assert "\\textbf{80.10 $\\pm$ 0.14}" in tex and "\\underline{65.10 $\\pm$ 0.14}" in tex
    assert "& 70.00$^\\dagger$ & 70.00 & 70.00 & 81.00 \\\\" in tex
    assert_tex_columns(tex)


def test_report_writes_plots_atomically_and_removes_stale_temporaries(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from tdlrt_cli import report

    finished_run(tmp_path / "runs" / "0")
    out = tmp_path / "rep"
    report.main([str(tmp_path / "runs"), f"out={out}"])
    plot = next(out.glob("acc_vs_cr_*.png"))
    old = plot.read_bytes()
    stale = out / f".table.md.{dead_pid()}.tmp"
    stale.write_text("half")
    mine = out / ".notes.txt.1.tmp"  # not the report's naming: left alone
    mine.write_text("x")

    def killed_while_saving(self, fh, **kwargs):
        fh.write(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", killed_while_saving)
    with pytest.raises(KeyboardInterrupt):
        report.main([str(tmp_path / "runs"), f"out={out}"])
    assert plot.read_bytes() == old and not stale.exists() and mine.exists()
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".tmp")) == [mine.name]
    assert all(p.stat().st_size > 0 for p in out.iterdir())


def test_rank_plot_styles_are_distinct_for_many_layers():
    from tdlrt_cli.report.plots import layer_style

    assert len({(tuple(c), s) for c, s in (layer_style(j) for j in range(80))}) == 80
    assert len({tuple(layer_style(j)[0]) for j in range(20)}) == 20  # no colour repeats within 20 layers


def test_rank_plot_legends_name_vgg_layers_by_path_and_place(tmp_path):
    from tdlrt_cli.report.plots import layer_labels

    (tmp_path / "ranks.csv").write_text("epoch,layer,r_out,r_in,r_kh,r_kw,n_out,n_in,n_kh,n_kw\n"
                                        "1,features.3,8,8,3,3,16,16,3,3\n1,features.7,16,8,3,3,32,16,3,3\n")
    assert layer_labels(tmp_path, {"model": {"name": "vgg16"}}) == {"features.3": "features.3 (conv1_2, 16->16)",
                                                                    "features.7": "features.7 (conv2_1, 16->32)"}
    assert layer_labels(tmp_path, {"model": {"name": "resnet18"}})["features.7"] == "features.7 (16->32)"
