"""`tdlrt compress` stopped half-way: Ctrl-C (the whole process group, as a terminal sends it) or a SIGTERM to
`tdlrt compress` alone (a scheduler) stops the fine-tuning run at a checkpoint and ends with one line and
128 + the signal; the same command then continues (the finished runs are not trained again)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import TINY, default_signals, run_tdlrt

SMALL = [a for a in TINY if not a.startswith("epochs")] + ["cost_report=false"]


@pytest.mark.parametrize("sig,to_group,status", [("INT", True, 130), ("TERM", False, 143)])
def test_a_stopped_compression_says_so_in_one_line_and_the_same_command_continues(tmp_path, sig, to_group, status):
    run_tdlrt(["train", *SMALL, "epochs=1", "method=dense", "hydra.run.dir=dense"], tmp_path)
    command = ["compress", "dense", "target_cr=80", "epochs=6", "out=c"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("TDLRT_DEBUG", None)
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "tdlrt_cli", *command], cwd=tmp_path, env=env,
                                stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True)
        deadline = time.time() + 300
        while "epoch 1/6" not in log.read_text() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, log.read_text()[-2000:]
        if to_group:
            os.killpg(proc.pid, getattr(signal, f"SIG{sig}"))
        else:
            proc.send_signal(getattr(signal, f"SIG{sig}"))
        proc.wait(timeout=300)
    text = log.read_text()
    lines = text.strip().splitlines()
    assert proc.returncode == status and "Traceback" not in text, text[-2000:]
    assert lines[-1].startswith(f"tdlrt: stopped: SIG{sig} during tdlrt compress (its finetuned run)"), lines[-1]
    assert not (tmp_path / "c" / "compress.json").exists()
    assert (tmp_path / "c" / "finetuned" / "checkpoints" / "last.pt").is_file()
    again = run_tdlrt(command, tmp_path)
    assert "tdlrt compress: dense" not in again.stderr and "tdlrt compress: finetuned" in again.stderr
    summary = json.loads((tmp_path / "c" / "finetuned" / "summary.json").read_text())
    assert summary["epochs"] == 6 and json.loads((tmp_path / "c" / "compress.json").read_text())["epochs"] == 6
