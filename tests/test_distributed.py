"""Data parallel training under torchrun: two gloo processes on the CPU keep identical replicas."""
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY, run_dirs


def torchrun():
    exe = Path(sys.executable).parent / "torchrun"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "torch.distributed.run"]


def test_two_processes_end_with_identical_ranks_and_weights(tmp_path):
    if shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").is_file():
        pytest.skip("torchrun not installed")
    args = [a for a in TINY if not a.startswith("batch_size")] + ["batch_size=32", "method=tdlrt", "tau=0.4", "lr=0.1"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*torchrun(), "--standalone", "--nproc_per_node=2", "-m", "tdlrt_cli", "train", *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = run_dirs(tmp_path / "outputs")  # one run folder, written by the first process only
    summary = json.loads((run / "summary.json").read_text())
    dp = summary["data_parallel"]
    assert dp["world_size"] == 2 and dp["replicas_identical"] and len(set(dp["fingerprints"])) == 1
    # truncation changed ranks (they start at half the channels), so shapes changed under the all-reduce
    with open(run / "ranks.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert any(int(r["r_out"]) < int(r["n_out"]) // 2 or int(r["r_in"]) < int(r["n_in"]) // 2 for r in rows)
    assert summary["steps"] == 2 * (256 // (2 * 32))  # each step takes 32 examples on each of the two processes
    assert "replicas differ" not in proc.stderr

