"""Bad input to `tdlrt report` through the real CLI: each ends with exit status 2 and exactly one line on stderr,
`tdlrt: error: ...`, naming the file or path, without a traceback, and leaves every file written before as it
was; damaged, empty and absurd runs are listed apart with a warning, never in a row or marked."""
import os

import pytest

from conftest import one_error_line, run_tdlrt
from handmade import SHORT_CONFIG, finished_run


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
    finished_run(runs / "b", 30.0, **{"config": dict(SHORT_CONFIG, tau=0.2)})
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
    finished_run(runs / "negative-cr", 30.0, compression_rate=-25.0, config=dict(SHORT_CONFIG, tau=0.3))  # a real one
    for name, (old, new), _ in ABSURD_METRICS:
        summary = finished_run(runs / name, 50.0, config=dict(SHORT_CONFIG, tau=0.2)) / "summary.json"
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


def test_report_bad_input(tmp_path):
    proc = run_tdlrt(["report", str(tmp_path / "missing")], tmp_path, check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    (tmp_path / "empty").mkdir()
    proc = run_tdlrt(["report", str(tmp_path / "empty")], tmp_path, check=False)
    assert proc.returncode == 2 and "no finished runs" in proc.stderr
