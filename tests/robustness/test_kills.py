"""Real SIGKILLs at random instants: every output of `tdlrt report` and of a training run is afterwards either
its old complete version or its new complete one (never empty, cut short or unparsable)."""
import csv
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY, run_tdlrt
from handmade import write_run

EXE = Path(sys.executable).parent / "tdlrt"
CMD = [str(EXE)] if EXE.is_file() else [sys.executable, "-m", "tdlrt_cli"]


def kill_after(args, cwd, seconds, env=None):
    proc = subprocess.Popen([*CMD, *args], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return proc.returncode


def contents(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")}


def complete_png(data: bytes) -> bool:
    return data.startswith(b"\x89PNG\r\n\x1a\n") and data.rstrip(b"\x00").endswith(b"IEND\xaeB`\x82")


def test_report_killed_at_random_instants_leaves_old_or_new_files(tmp_path):
    runs = tmp_path / "runs"
    for i, (acc, tau) in enumerate([(80.0, 0.1), (84.0, 0.2), (82.0, 0.1)]):
        write_run(runs / f"r{i}", acc, seed=i, tau=tau)
    out = tmp_path / "report"
    run_tdlrt(["report", str(runs), f"out={out}", "band=5"], tmp_path)
    old = contents(out)
    run_tdlrt(["report", str(runs), f"out={tmp_path / 'new'}", "band=1"], tmp_path)
    new = contents(tmp_path / "new")
    texts = [n for n in new if not n.endswith(".png")]
    assert any(old[n] != new[n] for n in texts), "band=1 must change a table, or the test shows nothing"
    rng = random.Random(0)
    for _ in range(6):
        for name, data in old.items():  # back to the old version before each kill
            (out / name).write_bytes(data)
        kill_after(["report", str(runs), f"out={out}", "band=1"], tmp_path, rng.uniform(0.5, 4.0))
        now = contents(out)
        assert set(now) == set(old)
        for name, data in now.items():
            if name.endswith(".png"):
                assert complete_png(data), name
            else:
                assert data in (old[name], new[name].replace(str(tmp_path / "new").encode(), str(out).encode())), name
    run_tdlrt(["report", str(runs), f"out={out}"], tmp_path)  # the next report clears a killed one's temporaries
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def parses(path: Path) -> bool:
    if path.suffix == ".json":
        json.loads(path.read_text())
    elif path.suffix == ".csv":
        rows = list(csv.reader(path.open(newline="")))
        assert rows and all(len(r) == len(rows[0]) for r in rows), path
    return True


@pytest.mark.slow
def test_training_killed_at_random_instants_leaves_complete_files_and_resumes(tmp_path):
    """Eight kills anywhere in a run (loading, steps, logging, checkpoint writes, the summary): every file
    parses after each, and the same command finally finishes the run."""
    args = ["train", *[a for a in TINY if not a.startswith("epochs")], "epochs=3", "method=tdlrt", "tau=0.2",
            "checkpoint.every_n_steps=2", "log_every_n_steps=1", "hydra.run.dir=run"]
    rng = random.Random(1)
    for _ in range(8):
        kill_after(args, tmp_path, rng.uniform(2.0, 12.0))
        run = tmp_path / "run"
        for path in [*run.glob("*.csv"), *run.glob("*.json")]:
            assert parses(path)
    proc = run_tdlrt(args, tmp_path)
    assert proc.returncode == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["epochs"] == 3 and summary["steps"] == 3 * 4
