"""Bad input to imagefolder data, `tdlrt report`, `tdlrt export` and `tdlrt eval`, through the real CLI: each
ends with exit status 2 and exactly one line on stderr, `tdlrt: error: ...`, naming the key or path, without a
traceback, and leaves every file written before as it was. Also: output files are written atomically (no
half files, no temporaries left behind), and merge=auto's decision rule."""
import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import TINY, run_dirs, run_tdlrt


def snapshot(folder):
    """Every file under ``folder`` with a hash of its bytes."""
    return {p: hashlib.sha1(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


def unchanged(before):
    for path, digest in before.items():
        assert path.is_file(), f"{path} was deleted"
        assert hashlib.sha1(path.read_bytes()).hexdigest() == digest, f"{path} was changed"


def one_error_line(args, cwd, *needles):
    """Run ``tdlrt args``: exit 2, one `tdlrt: error:` line holding every needle, files before untouched."""
    before = snapshot(cwd)
    proc = run_tdlrt(args, cwd, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("tdlrt: error: "), proc.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    unchanged(before)
    assert not [p for p in cwd.rglob(".tmp-*")], "a temporary file was left behind"
    return lines[0]


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("trained")
    run_tdlrt(["train", *[a for a in TINY if not a.startswith("epochs")], "epochs=1", "method=tdlrt", "tau=0.1"],
              base)
    (run,) = run_dirs(base / "outputs")
    return run


# --------------------------------------------------------------------------- data=imagefolder

def image_tree(root, classes=("a", "b"), n=3):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = torch.randint(0, 256, (12, 12, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")
    return root


def not_an_image(root):
    (root / "train" / "b" / "notes.png").write_text("this is not a picture")


def cut_short(root):
    data = (root / "train" / "a" / "0.png").read_bytes()
    (root / "train" / "b" / "cut.png").write_bytes(data[:60])  # a valid header, the pixels cut off


IMAGEFOLDER_CASES = [  # (id, change to the tree, overrides, needles)
    ("non-image-file", not_an_image, [], ["notes.png", "is not a readable image", "remove it"]),
    ("std-zero", None, ["data.std=[0.2,0,0.2]"], ["data.std=[0.2, 0.0, 0.2]", "must be > 0"]),
    ("mean-wrong-length", None, ["data.mean=[0.5,0.5]"], ["data.mean=[0.5, 0.5]", "give 3"]),
    ("num-workers-negative", None, ["data.num_workers=-1"], ["data.num_workers=-1", "must be >= 0"]),
]


def imagefolder_args(root):
    return ["train", "model=lenet5", "data=imagefolder", f"data.root={root}", "data.image_size=32",
            "data.num_workers=0", "batch_size=2", "eval_batch_size=4", "epochs=1", "progress=false", "device=cpu",
            "cost_report=false", "method=dense"]


@pytest.mark.parametrize("name, change, overrides, needles", IMAGEFOLDER_CASES, ids=[c[0] for c in IMAGEFOLDER_CASES])
def test_imagefolder_bad_input(tmp_path, name, change, overrides, needles):
    root = image_tree(tmp_path / "images")
    if change is not None:
        change(root)
    one_error_line(imagefolder_args(root) + overrides, tmp_path, *needles)
    assert not list(tmp_path.rglob("*.pt"))  # failed before training


def test_an_image_cut_short_ends_the_run_with_one_error_line(tmp_path):
    """Its header reads, so only decoding it (in a loader worker, during the epoch) finds the damage: the run
    ends with one error line naming the file, not with the worker's traceback."""
    root = image_tree(tmp_path / "images")
    cut_short(root)
    proc = run_tdlrt(imagefolder_args(root) + ["data.num_workers=1"], tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("tdlrt: error: cannot read image ") and "cut.png" in last and "replace it" in last


# --------------------------------------------------------------------------- tdlrt report

CONFIG = {"data": {"name": "synthetic"}, "model": {"name": "vgg16"}, "method": {"name": "tdlrt"}, "tau": 0.1,
          "epochs": 1, "seed": 0}


def finished_run(folder, test_acc=50.0, epochs=1, **summary):
    folder.mkdir(parents=True)
    s = {"config": dict(CONFIG, epochs=epochs), "test_acc": test_acc, "best_test_acc": test_acc,
         "compression_rate": 90.0, "epochs": epochs, **summary}
    (folder / "summary.json").write_text(json.dumps(s))
    (folder / "metrics.csv").write_text("epoch,train_loss,test_acc\r\n1,2.0,50.0\r\n")
    (folder / "ranks.csv").write_text("epoch,layer,r_out,r_in\r\n1,features.3,4,4\r\n")
    return folder


def damage(name, data):
    def apply(run):
        (run / name).write_bytes(data)
    return apply


REPORT_CASES = [  # (id, damage to the run, needles)
    ("ranks-not-text", damage("ranks.csv", b"epoch,layer,r_out,r_in\r\n\xff\xfe\x00garbage\r\n"),
     ["ranks.csv", "not UTF-8"]),
    ("ranks-bad-value", damage("ranks.csv", b"epoch,layer,r_out,r_in\r\n1,features.3,x,4\r\n"),
     ["ranks.csv", "r_out='x'"]),
    ("ranks-no-columns", damage("ranks.csv", b"what,ever\r\n1,2\r\n"), ["ranks.csv", "no column"]),
    ("metrics-not-text", damage("metrics.csv", b"\xff\xfe garbage \"\r\n"), ["metrics.csv", "not UTF-8"]),
    ("metrics-bad-value", damage("metrics.csv", b"epoch,train_loss,test_acc\r\n1,2.0,50\r\nx,2,3\r\n"),
     ["metrics.csv", "epoch='x'"]),
]


@pytest.mark.parametrize("name, change, needles", REPORT_CASES, ids=[c[0] for c in REPORT_CASES])
def test_report_on_damaged_run_files(tmp_path, name, change, needles):
    run = finished_run(tmp_path / "runs" / "0")
    if "metrics" in name:  # metrics.csv is read for unfinished runs: make it one
        (run / "summary.json").unlink()
    change(run)
    (tmp_path / "rep").mkdir()
    (tmp_path / "rep" / "table.md").write_text("an earlier report\n")
    one_error_line(["report", str(tmp_path / "runs"), f"out={tmp_path / 'rep'}"], tmp_path, *needles, "damaged")


def test_report_reads_a_cut_short_last_line_of_a_killed_run(tmp_path):
    run = finished_run(tmp_path / "runs" / "0")
    (run / "ranks.csv").write_text('epoch,layer,r_out,r_in\r\n1,features.3,4,4\r\n1,"features.7,8')
    killed = finished_run(tmp_path / "runs" / "1")
    (killed / "summary.json").unlink()
    (killed / "metrics.csv").write_text("epoch,train_loss,test_acc\r\n1,2.0,50.0\r\n2,1.9,5")
    proc = run_tdlrt(["report", str(tmp_path / "runs"), f"out={tmp_path / 'rep'}"], tmp_path)
    assert not proc.stderr.strip() and "1 runs in 1 rows" in proc.stdout and "1 unfinished" in proc.stdout
    assert "| 1/? | 50.00 |" in (tmp_path / "rep" / "table.md").read_text()
    assert list((tmp_path / "rep").glob("ranks_*.png"))


def test_report_bad_out(tmp_path):
    finished_run(tmp_path / "runs" / "0")
    (tmp_path / "afile").write_text("keep me\n")
    one_error_line(["report", str(tmp_path / "runs"), f"out={tmp_path / 'afile'}"], tmp_path, "afile", "is a file")
    one_error_line(["report", str(tmp_path / "runs"), f"out={tmp_path / 'afile' / 'sub'}"], tmp_path,
                   "afile", "cannot write the report", "out=DIR")


def test_report_lists_empty_and_damaged_runs_and_never_marks_them(tmp_path):
    runs = tmp_path / "runs"
    finished_run(runs / "a", 40.0)
    finished_run(runs / "b", 30.0, **{"config": dict(CONFIG, tau=0.2)})
    finished_run(runs / "zero", None, epochs=0, best_test_acc=None)  # epochs=0: null accuracies
    finished_run(runs / "zero-acc", 99.0, epochs=0)                   # or an accuracy at initialisation
    (finished_run(runs / "broken") / "summary.json").write_text("{not json")
    out = tmp_path / "rep"
    proc = run_tdlrt(["report", str(runs), f"out={out}"], tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tdlrt: warning: skipping") and "broken" in lines[0]
    assert "2 runs in 2 rows" in proc.stdout and "3 unfinished" in proc.stdout
    md = (out / "table.md").read_text()
    assert "| 1 | 40.00 † |" in md and "**40" not in md and "99.00" not in md.split("Unfinished")[0]
    states = {os.path.basename(r.split(",")[0]): r for r in (out / "unfinished.csv").read_text().splitlines()[1:]}
    assert set(states) == {"zero", "zero-acc", "broken"}
    assert "empty (0 epochs)" in states["zero"] and "damaged summary.json" in states["broken"]


ABSURD_METRICS = [  # (run, what replaces the good number in summary.json, the warning's words)
    ("huge-acc", ('"test_acc": 50.0', '"test_acc": 1e308'), "test_acc=1e+308 is outside [0, 100]"),
    ("overflowing-acc", ('"test_acc": 50.0', '"test_acc": 1e400'), "test_acc=inf is not finite"),
    ("bool-acc", ('"test_acc": 50.0', '"test_acc": true'), "test_acc=true is not a number"),
    ("text-acc", ('"test_acc": 50.0', '"test_acc": "50.0"'), 'test_acc="50.0" is not a number'),
    ("nan-best", ('"best_test_acc": 50.0', '"best_test_acc": NaN'), "best_test_acc=nan is not finite"),
    ("negative-acc", ('"best_test_acc": 50.0', '"best_test_acc": -3'), "best_test_acc=-3 is outside [0, 100]"),
    ("huge-cr", ('"compression_rate": 90.0', '"compression_rate": 1e308'), "compression_rate=1e+308 is outside"),
    ("cr-above-100", ('"compression_rate": 90.0', '"compression_rate": 101'), "compression_rate=101 is outside"),
    ("selected-acc", ('"epochs": 1', '"epochs": 1, "selected": {"by": "val_acc", "test_acc": 1e300}'),
     "selected.test_acc=1e+300 is outside [0, 100]"),
    ("text-wall-time", ('"epochs": 1', '"epochs": 1, "wall_time_s": "long"'), 'wall_time_s="long" is not a number'),
]


def test_report_lists_runs_with_absurd_metrics_as_damaged_and_never_marks_them(tmp_path):
    """Non-finite, out-of-range or non-numeric metrics in summary.json (by hand, or another tool's writer) make
    the run damaged: a warning naming the key, listed apart, in no row or plot; the other runs are reported."""
    runs = tmp_path / "runs"
    finished_run(runs / "good", 40.0)
    finished_run(runs / "negative-cr", 30.0, compression_rate=-25.0, config=dict(CONFIG, tau=0.3))  # a real one
    for name, (old, new), _ in ABSURD_METRICS:
        summary = finished_run(runs / name, 50.0, config=dict(CONFIG, tau=0.2)) / "summary.json"
        text = summary.read_text()
        assert old in text
        summary.write_text(new.join(text.rsplit(old, 1)))  # the summary's own key (after the config's)
    out = tmp_path / "rep"
    proc = run_tdlrt(["report", str(runs), f"out={out}"], tmp_path)
    warnings = proc.stderr.strip().splitlines()
    assert len(warnings) == len(ABSURD_METRICS) and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for name, _, words in ABSURD_METRICS:
        line = next((w for w in warnings if f"{os.sep}{name}{os.sep}summary.json" in w), "")
        assert line.startswith("tdlrt: warning: skipping") and words in line and "listed as damaged" in line, line
    assert "2 runs in 2 rows" in proc.stdout
    md = (out / "table.md").read_text()
    assert "| 1 | 40.00 † |" in md and "**40" not in md and "50.00" not in md.split("Unfinished")[0]
    states = {os.path.basename(r.split(",")[0]): r for r in (out / "unfinished.csv").read_text().splitlines()[1:]}
    assert set(states) == {name for name, _, _ in ABSURD_METRICS}
    assert all("damaged summary.json" in state for state in states.values())


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


# --------------------------------------------------------------------------- tdlrt export

def test_export_bad_out(trained_run, tmp_path):
    (tmp_path / "afile").write_text("keep me\n")
    (tmp_path / "folder").mkdir()
    run = str(trained_run)
    cases = [
        ([f"out={tmp_path / 'afile' / 'x.pt2'}"], ["afile", "does not exist"]),
        ([f"out={tmp_path / 'nowhere' / 'x.pt2'}"], ["nowhere", "does not exist", "create it"]),
        ([f"out={tmp_path / 'folder'}"], ["folder", "is a folder", "model.pt2"]),
        ([f"out={tmp_path / 'x.txt'}"], ["x.txt", "must end in .pt2"]),
        (["device=tpu"], ["device=tpu"]),
    ]
    if os.path.isdir("/proc/self"):  # a folder nobody can create files in, also root
        cases.append((["out=/proc/x.pt2"], ["/proc", "cannot write"]))
    for args, needles in cases:
        one_error_line(["export", run, *args, "merge=chain"], tmp_path, *needles)
    assert not (tmp_path / "nowhere").exists()


def test_export_removes_stale_temporaries_and_writes_the_sidecar_after_the_model(trained_run, tmp_path):
    out = tmp_path / "net.pt2"
    stale = [tmp_path / f".tmp-{dead_pid()}-net.pt2", tmp_path / ".tmp-net.pt2"]
    for s in stale:
        s.write_bytes(b"half an export")
    other = tmp_path / f".tmp-{dead_pid()}-other.pt2"
    other.write_bytes(b"not ours")
    proc = run_tdlrt(["export", str(trained_run), f"out={out}", "merge=auto", "repeat=3"], tmp_path)
    meta = json.loads((tmp_path / "net.pt2.json").read_text())["tdlrt_export"]
    assert out.is_file() and not any(s.exists() for s in stale) and other.exists()
    decisions = [line for line in proc.stderr.splitlines() if line.startswith("tdlrt: merge=auto: ")]
    assert len(decisions) == len(meta["layers"]) > 0
    for layer in meta["layers"]:
        assert len(layer["chain_times_ms"]) == len(layer["dense_times_ms"]) == 3 and layer["reason"]
        assert f"{layer['layer']}: {layer['exported']} (" in proc.stderr


class FailingProgram:
    """Stands for an ONNX program whose write fails half-way (disk full)."""

    def save(self, path):
        with open(path, "wb") as fh:
            fh.write(b"half")
        raise OSError(28, "No space left on device")


def test_a_failed_export_write_keeps_the_old_files_and_no_temporary(tmp_path):
    from tdlrt_cli.errors import UserError
    from tdlrt_cli.export import write_atomically

    out = tmp_path / "net.onnx"
    out.write_bytes(b"old model")
    (tmp_path / "net.onnx.json").write_text("{}")
    with pytest.raises(UserError, match="no space left on the device of .* while writing net.onnx"):
        write_atomically(FailingProgram(), out, "onnx", {"x": 1})
    assert out.read_bytes() == b"old model" and (tmp_path / "net.onnx.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.onnx", "net.onnx.json"]


def test_a_full_disk_during_export_is_one_line_and_keeps_the_old_files(trained_run, tmp_path):
    """The .pt2 write fails with ENOSPC half-way: one line (torch's zip writer, given the file, aborted the
    process with a C++ `terminate called ... c10::Error`, exit 134), the earlier export and sidecar kept."""
    out = tmp_path / "net.pt2"
    out.write_bytes(b"old model")
    (tmp_path / "net.pt2.json").write_text("{}")
    before = snapshot(tmp_path)
    proc = run_tdlrt(["export", str(trained_run), f"out={out}", "merge=chain"], tmp_path,
                     env={"TDLRT_FAULT_DISK_FULL_IN_EXPORT": "1"}, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith(f"tdlrt: error: no space left on the device of {tmp_path} while writing net.pt2")
    assert "free space and run the command again" in lines[0]
    unchanged(before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.pt2", "net.pt2.json"]


MERGE_CASES = [  # (id, chain ms, merged ms, decision)
    ("merged-clearly-faster", [1.0, 1.02, 0.98, 1.01, 0.99], [0.5, 0.51, 0.49, 0.5, 0.52], "dense"),
    ("merged-exactly-10%-faster", [1.0] * 5, [0.9] * 5, "dense"),
    ("merged-9%-faster", [1.0] * 5, [0.91] * 5, "chain"),
    ("tie", [1.0] * 5, [1.0] * 5, "chain"),
    ("chain-faster", [0.5] * 5, [1.0] * 5, "chain"),
    ("median-faster-but-noisy", [1.0, 1.0, 1.0, 0.3, 0.3], [0.5, 0.5, 0.5, 1.5, 1.5], "chain"),
    ("one-timing-each", [1.0], [0.8], "dense"),
]


@pytest.mark.parametrize("name, chain, dense, want", MERGE_CASES, ids=[c[0] for c in MERGE_CASES])
def test_merge_decision(name, chain, dense, want):
    from tdlrt_cli.export import MERGE_MARGIN, merge_decision

    assert MERGE_MARGIN == 0.10
    decision, why = merge_decision(chain, dense)
    assert decision == want and "ms" in why


# --------------------------------------------------------------------------- tdlrt eval

def test_eval_bad_input(trained_run, tmp_path):
    (tmp_path / "afile").write_text("keep me\n")
    (tmp_path / "folder").mkdir()
    run = str(trained_run)
    cases = [
        (["data.limit_test"], ["data.limit_test needs a value"]),
        (["data.limit_test=[1"], ["cannot parse data.limit_test=[1"]),
        (["batch_size=0"], ["batch_size=0 must be >= 1"]),
        (["repeat=0"], ["repeat=0 must be >= 1"]),
        ([f"out={tmp_path / 'afile' / 'r.json'}"], ["afile", "does not exist"]),
        ([f"out={tmp_path / 'folder'}"], ["folder", "is a folder", "report.json"]),
    ]
    for args, needles in cases:
        one_error_line(["eval", run, *args], tmp_path, *needles)


@pytest.mark.parametrize("key", ["model", "config"])
def test_eval_and_export_of_a_checkpoint_missing_an_entry(trained_run, tmp_path, key):
    state = torch.load(trained_run / "checkpoints" / "last.pt", weights_only=True)
    del state[key]
    torch.save(state, tmp_path / "old.pt")
    needle = f"is missing '{key}' (written by an older tdlrt or damaged)" if key == "model" else "no run configuration"
    for command in ("eval", "export"):
        one_error_line([command, str(tmp_path / "old.pt"), "latency=false" if command == "eval" else "merge=chain"],
                       tmp_path, "old.pt", needle)


def test_eval_reports_latency_median_and_iqr(trained_run, tmp_path):
    state = torch.load(trained_run / "checkpoints" / "last.pt", weights_only=True)
    del state["rng"]  # eval needs the weights and the config, not the random generators
    torch.save(state, tmp_path / "no_rng.pt")
    proc = run_tdlrt(["eval", str(tmp_path / "no_rng.pt"), "repeat=3", f"out={tmp_path / 'r.json'}"], tmp_path)
    cost = json.loads((tmp_path / "r.json").read_text())["cost"]
    for side in ("dense", "lowrank"):
        for b in (1, 128):
            assert cost[side][f"latency_ms_batch{b}"] > 0 and cost[side][f"latency_iqr_ms_batch{b}"] >= 0
    assert "median [IQR]" in proc.stdout


# --------------------------------------------------------------------------- Ctrl-C during export and eval

def stopped_by_ctrl_c(args, cwd, point, sig="INT"):
    """Run ``tdlrt args`` with a Ctrl-C (SIGINT; or ``sig``) at ``point``: exit 128 + the signal, one
    `tdlrt: stopped:` line."""
    proc = run_tdlrt(args, cwd, env={"TDLRT_FAULT_SIGNAL_AT": point, "TDLRT_FAULT_SIGNAL": sig}, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == {"INT": 130, "TERM": 143, "HUP": 129}[sig], proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith(f"tdlrt: stopped: SIG{sig} during tdlrt {args[0]}"), proc.stderr[-2000:]
    return proc


@pytest.mark.parametrize("sig", ["INT", pytest.param("TERM", marks=pytest.mark.slow),
                                 pytest.param("HUP", marks=pytest.mark.slow)])  # (one code path: exit_on_interrupt)
def test_ctrl_c_during_export_is_one_line_and_keeps_the_earlier_files(trained_run, tmp_path, sig):
    """Interrupted with the new program written to its temporary file (Ctrl-C, a scheduler's SIGTERM, the
    terminal closed): the earlier export and its sidecar stay as they were, no temporary is left; with no
    earlier export, no file at all."""
    out = tmp_path / "net.pt2"
    stopped_by_ctrl_c(["export", str(trained_run), f"out={out}", "merge=chain"], tmp_path, "export_write", sig)
    assert list(tmp_path.iterdir()) == []
    out.write_bytes(b"old model")
    (tmp_path / "net.pt2.json").write_text("{}")
    before = snapshot(tmp_path)
    stopped_by_ctrl_c(["export", str(trained_run), f"out={out}", "merge=chain"], tmp_path, "export_write", sig)
    unchanged(before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.pt2", "net.pt2.json"]


def test_ctrl_c_during_eval_is_one_line_and_writes_no_report(trained_run, tmp_path):
    out = tmp_path / "r.json"
    out.write_text('{"old": 1}')
    before = snapshot(tmp_path)
    stopped_by_ctrl_c(["eval", str(trained_run), "latency=false", f"out={out}"], tmp_path, "eval")
    unchanged(before)
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_eval_takes_trains_name_for_the_repetitions(trained_run, tmp_path):
    """`tdlrt train` says cost_repeat=, `tdlrt eval` repeat=: eval takes both."""
    proc = run_tdlrt(["eval", str(trained_run), "cost_repeat=2", f"out={tmp_path / 'r.json'}"], tmp_path)
    assert "median [IQR]" in proc.stdout
    bad = run_tdlrt(["eval", str(trained_run), "cost_repeat=-1"], tmp_path, check=False)
    assert bad.returncode == 2 and "cost_repeat=-1 must be >= 1" in bad.stderr
