"""One network, one number: summary.json, the report, export and eval name the same network (best.pt, chosen on
the validation split, else last.pt) and the same accuracy by the same name; what the console lines count."""
from __future__ import annotations

import csv
import json
import shutil

import pytest

from conftest import TINY, one_line, run_tdlrt

ARGS = [a for a in TINY if not a.startswith(("epochs", "data.train_size"))] + [
    "data.train_size=300", "data.val_split=0.25", "epochs=4", "lr=0.1", "scheduler=none", "cost_report=false"]


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A compressed run with a validation split: 225 training images in batches of 64 (33 left over). At a
    constant lr of 0.1 its best validation epoch is not the last, and best.pt's test accuracy not the final one,
    so a reader of the wrong checkpoint gets another number."""
    base = tmp_path_factory.mktemp("one")
    proc = run_tdlrt(["train", *ARGS, "method=tucker", "method.target_cr=80", "hydra.run.dir=run"], base)
    s = json.loads((base / "run" / "summary.json").read_text())
    assert s["selected"]["epoch"] < 4 and s["test_acc"] != s["test_acc_final"], "best.pt is the last epoch here"
    return base / "run", proc


def test_the_console_says_what_its_numbers_count(run):
    folder, proc = run
    start = proc.stderr.splitlines()[1]
    assert "225 train + 75 validation (data.val_split); an epoch uses 192 (3 whole batches of 64, the 33 left " \
           "over change every epoch); 128 test" in start, start
    epochs = [line for line in proc.stderr.splitlines() if line.startswith("epoch ")]
    assert len(epochs) == 4 and all(", evaluation " in line and "| train " in line and "| conv c.r. " in line
                                    for line in epochs), epochs
    done = proc.stderr.strip().splitlines()[-1]
    summary = json.loads((folder / "summary.json").read_text())
    assert done.startswith(f"done: test acc {summary['test_acc']:.2f}% with checkpoints/best.pt (epoch "
                           f"{summary['selected']['epoch']}, chosen on the validation split"), done
    assert (f"conv c.r. {summary['compression_rate']:.1f}% (whole network {summary['compression_rate_total']:.1f}%)"
            in done), done
    rows = read_csv(folder / "metrics.csv")
    assert all(float(r["eval_time_s"]) >= 0 for r in rows)


def test_summary_names_the_network_it_hands_on(run):
    folder, _ = run
    s = json.loads((folder / "summary.json").read_text())
    rows = read_csv(folder / "metrics.csv")
    assert s["checkpoint"] == "best.pt" and s["selected"]["by"] == "val_acc"
    assert s["test_acc"] == pytest.approx(float(rows[s["selected"]["epoch"] - 1]["test_acc"]))
    assert s["test_acc_final"] == pytest.approx(float(rows[-1]["test_acc"]))
    assert s["test_acc_max_epoch"] == pytest.approx(max(float(r["test_acc"]) for r in rows))
    for old in ("test_acc_last", "test_acc_val_selected", "best_test_acc", "test_loss"):
        assert old not in s, old


def test_export_and_eval_default_to_that_network_and_say_so(run, tmp_path):
    folder, _ = run
    s = json.loads((folder / "summary.json").read_text())
    named = f"checkpoints/best.pt (epoch {s['selected']['epoch']}, chosen on the validation split)"
    out = tmp_path / "net.pt2"
    proc = run_tdlrt(["export", str(folder), f"out={out}", "threads=1"], tmp_path)
    assert f"from {named}" in proc.stdout.splitlines()[-1], proc.stdout
    meta = json.loads((tmp_path / "net.pt2.json").read_text())
    assert meta["input"]["shape"] == ["N", 3, 32, 32] and meta["input"]["layout"] == "NCHW"
    assert meta["input"]["dtype"] == "float32" and len(meta["input"]["mean"]) == len(meta["input"]["std"]) == 3
    assert all(v > 0 for v in meta["input"]["std"]) and meta["classes"] == 10 and meta["output"]["shape"] == ["N", 10]
    assert meta["checkpoint"]["file"].endswith("checkpoints/best.pt")
    assert meta["checkpoint"]["epoch"] == s["selected"]["epoch"] and "data_shape" not in meta
    for source, says in ((folder, f"network: {named}"), (out, f"network: exported from {named}")):
        proc = run_tdlrt(["eval", str(source), "latency=false", "threads=1", f"out={tmp_path / 'e.json'}"], tmp_path)
        assert says in proc.stdout, proc.stdout
        assert json.loads((tmp_path / "e.json").read_text())["test_acc"] == pytest.approx(s["test_acc"])
    proc = run_tdlrt(["eval", str(folder), "latency=false", "checkpoint=last"], tmp_path)
    assert f"test accuracy {s['test_acc_final']:.2f}%" in proc.stdout and "checkpoints/last.pt (after epoch 4)" \
        in proc.stdout, proc.stdout
    one_line(run_tdlrt(["eval", str(folder), "threads=-1"], tmp_path, check=False), "threads=-1 must be >= 1")
    one_line(run_tdlrt(["eval", str(folder), "checkpoint=first"], tmp_path, check=False),
             "checkpoint=first is not one of: selected, best, last")


def test_report_uses_the_same_names_and_reads_older_summaries(run, tmp_path):
    """runs.csv and table.csv give summary.json's test_acc under its name; a summary written with the names of
    earlier versions (test_acc after the last epoch, test_acc_val_selected, best_test_acc) reads the same."""
    folder, _ = run
    s = json.loads((folder / "summary.json").read_text())
    run_tdlrt(["report", str(folder), f"out={tmp_path / 'new'}"], tmp_path)
    old = tmp_path / "old_run"
    shutil.copytree(folder, old, ignore=shutil.ignore_patterns("checkpoints"))
    legacy = {k: v for k, v in s.items() if k not in ("test_acc", "checkpoint", "test_acc_final", "test_loss_final",
                                                      "test_acc_max_epoch")}
    legacy.update(test_acc=s["test_acc_final"], test_acc_last=s["test_acc_final"], test_loss=s["test_loss_final"],
                  test_acc_val_selected=s["test_acc"], best_test_acc=s["test_acc_max_epoch"])
    (old / "summary.json").write_text(json.dumps(legacy))
    run_tdlrt(["report", str(old), f"out={tmp_path / 'old'}"], tmp_path)
    for name in ("new", "old"):
        (line,) = read_csv(tmp_path / name / "runs.csv")
        assert float(line["test_acc"]) == pytest.approx(s["test_acc"], abs=1e-4) and line["checkpoint"] == "best.pt"
        assert float(line["test_acc_final"]) == pytest.approx(s["test_acc_final"], abs=1e-4)
        assert float(line["test_acc_max_epoch"]) == pytest.approx(s["test_acc_max_epoch"], abs=1e-4)
        (row,) = [r for r in read_csv(tmp_path / name / "table.csv")]
        assert float(row["test_acc_mean"]) == pytest.approx(s["test_acc"], abs=1e-4) and row["acc_source"] == "val_ckpt"
        assert float(row["test_acc_final_mean"]) == pytest.approx(s["test_acc_final"], abs=1e-4)
