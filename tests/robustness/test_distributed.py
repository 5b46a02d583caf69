"""Data parallel training under torchrun: two gloo processes on the CPU keep identical replicas."""
import csv
import json

import pytest

from conftest import TINY, run_dirs, torchrun

ARGS = [a for a in TINY if not a.startswith("batch_size")] + [
    "batch_size=32", "method=tdlrt", "tau=0.4", "lr=0.1", "deterministic=true", "checkpoint.every_n_steps=3"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    base = tmp_path_factory.mktemp("ddp")
    proc = torchrun(ARGS, base)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = run_dirs(base / "outputs")  # one run folder, written by the first process only
    return run, proc


def test_two_processes_end_with_identical_ranks_and_weights(straight):
    run, proc = straight
    summary = json.loads((run / "summary.json").read_text())
    dp = summary["data_parallel"]
    assert dp["world_size"] == 2 and dp["replicas_identical"] and len(set(dp["fingerprints"])) == 1
    # truncation changed ranks (they start at half the channels), so shapes changed under the all-reduce
    with open(run / "ranks.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert any(int(r["r_out"]) < int(r["n_out"]) // 2 or int(r["r_in"]) < int(r["n_in"]) // 2 for r in rows)
    assert summary["steps"] == 2 * (256 // (2 * 32))  # each step takes 32 examples on each of the two processes
    assert "replicas differ" not in proc.stderr


@pytest.mark.slow
def test_killed_data_parallel_run_resumes_mid_epoch_to_the_same_replicas(straight, tmp_path):
    killed = torchrun(ARGS, tmp_path, env={"TDLRT_FAULT_KILL_AT_STEP": "7"})
    assert killed.returncode != 0
    (run,) = run_dirs(tmp_path / "outputs")
    resumed = torchrun(ARGS + [f"ckpt_path={run / 'checkpoints' / 'last.pt'}"], tmp_path)  # from step 6
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at epoch 2 step 6" in resumed.stderr
    want = json.loads((straight[0] / "summary.json").read_text())
    got = json.loads((run / "summary.json").read_text())
    assert got["data_parallel"]["fingerprints"] == want["data_parallel"]["fingerprints"]
    assert got["ranks"] == want["ranks"] and got["test_acc"] == want["test_acc"]
