"""Faults: a run killed mid-epoch resumes to the same result; a NaN loss stops cleanly or is skipped."""
import json

import pytest
import torch

from conftest import TINY, run_dirs, run_tdlrt


def final_state(run):
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)


ARGS = ["train", *TINY, "method=tdlrt", "epochs=3", "deterministic=true", "tau=0.3", "lr=0.1"]  # ranks move


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run (12 steps, 4 per epoch) every killed run must reproduce."""
    base = tmp_path_factory.mktemp("straight")
    run_tdlrt(ARGS, base)
    (run,) = run_dirs(base / "outputs")
    return run


@pytest.mark.parametrize("extra, env, resumed_at", [
    ([], {"TDLRT_FAULT_KILL_AT_STEP": "6"}, (1, 4)),
    (["checkpoint.every_n_steps=3"], {"TDLRT_FAULT_KILL_AT_STEP": "7"}, (1, 6)),
    (["checkpoint.every_n_steps=3"], {"TDLRT_FAULT_KILL_AT_STEP": "7", "TDLRT_FAULT_KILL_PHASE": "rank_change"}, (1, 6)),
    # writes: step 2 last.pt, step 4 last.pt and best.pt, step 6 last.pt <- killed half-way through it
    (["checkpoint.every_n_steps=2"], {"TDLRT_FAULT_KILL_IN_CHECKPOINT": "4"}, (1, 4)),
], ids=["after-step-epoch-checkpoints", "after-step-mid-epoch-checkpoint", "during-rank-change",
        "during-checkpoint-write"])
def test_killed_run_resumes_to_the_same_final_result_bitwise(tmp_path, straight, extra, env, resumed_at):
    killed = run_tdlrt(ARGS + extra, tmp_path, env=env, check=False)
    assert killed.returncode == 137
    (run,) = run_dirs(tmp_path / "outputs")
    state = final_state(run)
    assert (state["epoch"], state["global_step"]) == resumed_at
    assert (state["position"] is not None) == (resumed_at[1] % 4 != 0)
    leftovers = list((run / "checkpoints").glob(".*.tmp"))
    assert bool(leftovers) == ("TDLRT_FAULT_KILL_IN_CHECKPOINT" in env)
    proc = run_tdlrt(ARGS + extra + [f"ckpt_path={run / 'checkpoints' / 'last.pt'}"], tmp_path)
    assert "at epoch 2" in proc.stderr
    assert not list((run / "checkpoints").glob(".*.tmp"))
    a, b = final_state(straight), final_state(run)
    assert a["ranks"] == b["ranks"] and a["global_step"] == b["global_step"] == 12
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    sa = json.loads((straight / "summary.json").read_text())
    sb = json.loads((run / "summary.json").read_text())
    assert (sa["test_acc"], sa["test_loss_final"], sa["steps"]) == (sb["test_acc"], sb["test_loss_final"], sb["steps"])
    assert (straight / "metrics.csv").read_text().count("\n") == 4
    rows_a = [line.split(",")[:4] for line in (straight / "metrics.csv").read_text().splitlines()]
    rows_b = [line.split(",")[:4] for line in (run / "metrics.csv").read_text().splitlines()]
    assert rows_a == rows_b  # epoch, step, train loss, train accuracy: the same numbers, no duplicate rows


def test_the_same_job_started_again_continues_its_run(tmp_path, straight):
    """A requeued cluster job reruns the same command in the same folder: it continues from last.pt."""
    folder = tmp_path / "job"
    args = ARGS + ["checkpoint.every_n_steps=3", f"hydra.run.dir={folder}"]
    assert run_tdlrt(args, tmp_path, env={"TDLRT_FAULT_KILL_AT_STEP": "8"}, check=False).returncode == 137
    refused = run_tdlrt(args + ["checkpoint.auto_resume=false"], tmp_path, check=False)
    assert refused.returncode == 2 and "already holds a run" in refused.stderr
    proc = run_tdlrt(args, tmp_path)
    assert "continuing that run" in proc.stderr and "at epoch 2 step 6" in proc.stderr
    a, b = final_state(straight), final_state(folder)
    assert a["ranks"] == b["ranks"] and all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    proc = run_tdlrt(["train", *TINY, "method=tdlrt", "epochs=3"], tmp_path, env={"TDLRT_FAULT_NAN_AT_STEP": "6"},
                     check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert "NaN/Inf at step 6 (epoch 2)" in line and "last.pt" in line
    (run,) = run_dirs(tmp_path / "outputs")
    state = final_state(run)
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_an_infinite_lr_stops_before_truncation_with_one_line(tmp_path):
    """An infinite lr at step 1 (fault injection: lr=inf is refused by validation) makes the stepped cores
    non-finite while the loss of that step was finite: the integrator refuses to truncate them and the run stops
    like at a NaN loss, not with a linear-algebra traceback."""
    proc = run_tdlrt(["train", *TINY, "method=tdlrt"], tmp_path, check=False, env={"TDLRT_FAULT_INF_LR_AT_STEP": "1"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("tdlrt: error: ") and "NaN/Inf" in line and "at step 1 (epoch 1)" in line
    assert "no checkpoint was written yet" in line


def test_nan_loss_skipped_when_configured(tmp_path):
    proc = run_tdlrt(["train", *TINY, "method=dense", "nan_policy=skip"], tmp_path, env={"TDLRT_FAULT_NAN_AT_STEP": "2"})
    assert "skipped 1 step(s) with a non-finite loss" in proc.stderr
    (run,) = run_dirs(tmp_path / "outputs")
    assert json.loads((run / "summary.json").read_text())["test_loss_final"] < 1e3


def test_two_runs_never_share_a_folder(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).parent / "tdlrt"
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "tdlrt_cli"]
    args = [*cmd, "train", *[a for a in TINY if not a.startswith("epochs")], "epochs=0", "method=dense"]
    procs = [subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    assert len(run_dirs(tmp_path / "outputs")) == 2


def test_a_signal_the_run_was_started_to_ignore_stays_ignored(tmp_path):
    """`nohup tdlrt train ...` (SIGHUP ignored), then SIGHUP after step 2 and again at the summary: the run goes on
    to its end, as nohup promises."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).parent / "tdlrt"
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "tdlrt_cli"]
    env = {**os.environ, "TDLRT_FAULT_SIGNAL_AT_STEP": "2", "TDLRT_FAULT_SIGNAL_AT": "train_summary",
           "TDLRT_FAULT_SIGNAL": "HUP", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*cmd, "train", *TINY, "method=tdlrt", "tau=0.1", "cost_report=false"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600,
                          preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    assert proc.returncode == 0 and "stopped" not in proc.stderr, proc.stderr[-2000:]
    (run,) = run_dirs(tmp_path / "outputs")
    assert json.loads((run / "summary.json").read_text())["steps"] == 8


@pytest.mark.parametrize("sig, code, point", [("TERM", 143, "train_setup"), ("HUP", 129, "train_summary"),
                                              ("INT", 130, "train_summary")])
def test_a_signal_outside_the_training_loop_is_one_line_and_the_run_resumes(tmp_path, sig, code, point):
    """SIGTERM while the data is read, SIGHUP or Ctrl-C after the last epoch (its checkpoint written, the summary
    not): one line (also in train.log) that says what was written, exit 128 + the signal, the folder's lock
    released; after the last epoch the printed command writes the summary."""
    import shlex

    args = [*TINY, "method=tdlrt", "tau=0.1", "cost_report=false"]
    proc = run_tdlrt(["train", *args], tmp_path, env={"TDLRT_FAULT_SIGNAL_AT": point, "TDLRT_FAULT_SIGNAL": sig},
                     check=False)
    assert proc.returncode == code and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"tdlrt: stopped: SIG{sig} outside a training step; "), line
    (run,) = run_dirs(tmp_path / "outputs")
    assert not (run / ".lock").exists() and not (run / "summary.json").exists()
    assert (run / "train.log").read_text().strip().endswith(line)
    if point == "train_setup":
        assert line.endswith("no checkpoint written")
        return
    assert f"resume from {run / 'checkpoints' / 'last.pt'} with: tdlrt train " in line
    command = shlex.split(line.split(" with: ", 1)[1])
    run_tdlrt(command[1:], tmp_path)
    assert json.loads((run / "summary.json").read_text())["epochs"] == 2


@pytest.mark.parametrize("sig, code", [("INT", 130), ("TERM", 143), ("HUP", 129)])
def test_a_signal_finishes_the_step_writes_last_pt_and_the_printed_command_resumes_bitwise(tmp_path, straight,
                                                                                           sig, code):
    """Ctrl-C (SIGINT), a scheduler's SIGTERM or a closed terminal's SIGHUP after step 6 (mid-epoch 2): the
    step finishes, last.pt holds step 6, one line (also in train.log) says how to resume, exit 128 + signal;
    the command it names ends where the straight run ends, bitwise."""
    import shlex

    stopped = run_tdlrt(ARGS, tmp_path, env={"TDLRT_FAULT_SIGNAL_AT_STEP": "6", "TDLRT_FAULT_SIGNAL": sig},
                        check=False)
    assert stopped.returncode == code, stopped.stderr[-2000:]
    assert "Traceback" not in stopped.stderr
    line = stopped.stderr.strip().splitlines()[-1]
    assert line.startswith(f"tdlrt: stopped: SIG{sig} at step 6 (epoch 2)") and "resume with: tdlrt train " in line
    (run,) = run_dirs(tmp_path / "outputs")
    state = final_state(run)
    assert (state["epoch"], state["global_step"]) == (1, 6) and state["position"]["batch"] == 2
    assert (run / "train.log").read_text().strip().endswith(line)  # read after a closed terminal (SIGHUP)
    command = shlex.split(line.split("resume with: ", 1)[1])
    assert command[:2] == ["tdlrt", "train"] and len(command) == 3 and command[2].startswith("resume=")
    run_tdlrt(command[1:], tmp_path)
    assert run_dirs(tmp_path / "outputs") == [run]
    a, b = final_state(straight), final_state(run)
    assert a["global_step"] == b["global_step"] == 12
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


def test_a_run_killed_before_its_first_checkpoint_and_started_again_logs_each_row_once(tmp_path):
    """Killed at step 2 (no last.pt yet), the same command starts the run again in its folder: the rows the
    dead attempt logged (ranks at step 0 and at the rank changes) are not kept twice."""
    import csv

    folder = tmp_path / "job"
    args = ARGS + [f"hydra.run.dir={folder}", "cost_report=false"]
    assert run_tdlrt(args, tmp_path, env={"TDLRT_FAULT_KILL_AT_STEP": "2"}, check=False).returncode == 137
    assert (folder / "ranks_steps.csv").is_file() and not (folder / "checkpoints" / "last.pt").is_file()
    run_tdlrt(args, tmp_path)
    with open(folder / "ranks_steps.csv", newline="") as fh:
        keys = [(row["step"], row["layer"]) for row in csv.DictReader(fh)]
    assert keys and len(keys) == len(set(keys))
    with open(folder / "metrics.csv", newline="") as fh:
        epochs = [row["epoch"] for row in csv.DictReader(fh)]
    assert epochs == ["1", "2", "3"]


def test_a_full_disk_at_the_first_checkpoint_prints_a_command_that_works(tmp_path):
    """The first checkpoint write fails with ENOSPC: there is no last.pt to resume from, so the line names the
    command that starts the run again in its folder; running it finishes the run there, logging each epoch once."""
    import shlex

    args = ["train", *TINY, "method=tdlrt", "epochs=1", "tau=0.3"]
    proc = run_tdlrt(args, tmp_path, env={"TDLRT_FAULT_DISK_FULL_IN_CHECKPOINT": "1"}, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("tdlrt: error: no space left on the device") and "no checkpoint was written yet" in line
    (run,) = run_dirs(tmp_path / "outputs")
    assert not (run / "checkpoints" / "last.pt").exists()
    command = shlex.split(line.split("start the run again in its folder: ", 1)[1])
    assert command[:2] == ["tdlrt", "train"] and f"hydra.run.dir={run}" in command
    run_tdlrt(command[1:], tmp_path)
    assert run_dirs(tmp_path / "outputs") == [run]
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 1
    assert json.loads((run / "summary.json").read_text())["epochs"] == 1
    assert [r.split(",")[0] for r in (run / "metrics.csv").read_text().splitlines()] == ["epoch", "1"]
    rows = [tuple(r.split(",")[:3:2]) for r in (run / "ranks_steps.csv").read_text().splitlines()[1:]]
    assert rows and len(rows) == len(set(rows))  # (step, layer): each once


@pytest.mark.parametrize("method", ["tdlrt", "dense"])
def test_the_run_folder_deleted_during_training_is_one_line(tmp_path, method):
    """The run folder is deleted after the first epoch: the next write fails, and the run stops with one line
    saying the folder disappeared (not Hydra's "Error executing job" over a FileNotFoundError); nothing makes
    the folder again."""
    import os
    import shutil
    import subprocess
    import sys
    import time
    from pathlib import Path

    exe = Path(sys.executable).parent / "tdlrt"
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "tdlrt_cli"]
    args = [*cmd, "train", *TINY, f"method={method}", "epochs=200", "cost_report=false", "hydra.run.dir=run"]
    proc = subprocess.Popen(args, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "run" / "metrics.csv").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        (tmp_path / "run").rename(tmp_path / "gone")  # as `rm -r` would, atomically (the run keeps writing)
        shutil.rmtree(tmp_path / "gone")
        err = proc.communicate(timeout=120)[1]
    finally:
        proc.kill()
    assert proc.returncode == 2 and "Traceback" not in err and "Error executing job" not in err, err[-2000:]
    line = err.strip().splitlines()[-1]
    assert line == (f"tdlrt: error: the run folder {tmp_path / 'run'} disappeared during the run (deleted or "
                    f"moved): stopped, nothing more can be written there; start the run again")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("method", ["dense", "tdlrt"])
def test_keep_top_k_keeps_the_k_best_epochs_of_the_final_network(tmp_path, method):
    """checkpoint.keep_top_k=2: the two best epochs by validation accuracy (a rank-adaptive run: among the
    epochs at its final ranks, like best.pt) are kept as epochNNN-val_accXX.XX.pt, the others removed."""
    import csv

    folder = tmp_path / "run"
    extra = ["tau=0.3", "method.tau_warmup_epochs=0"] if method == "tdlrt" else []
    run_tdlrt(["train", *TINY, f"method={method}", *extra, "epochs=4", "data.val_split=64", "checkpoint.keep_top_k=2",
               "cost_report=false", f"hydra.run.dir={folder}"], tmp_path)
    kept = sorted(p.name for p in (folder / "checkpoints").glob("epoch*.pt"))
    last = torch.load(folder / "checkpoints" / "last.pt", weights_only=True)
    listed = sorted(name for _, _, name in last["best"]["top"])
    assert kept == listed and 1 <= len(kept) <= 2
    with open(folder / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    summary = json.loads((folder / "summary.json").read_text())
    for name in kept:
        state = torch.load(folder / "checkpoints" / name, weights_only=True)
        assert name == f"epoch{state['epoch']:03d}-val_acc{float(rows[state['epoch'] - 1]['val_acc']):.2f}.pt"
        if method == "tdlrt":
            assert state["ranks"] == last["ranks"]  # the final network's epochs only
    eligible = [r for r in rows if method == "dense" or int(r["epoch"]) >= summary["selected"]["epoch"]]
    best_two = sorted(float(r["val_acc"]) for r in eligible)[-2:]
    assert sorted(float(n.split("val_acc")[1][:-3]) for n in kept) == pytest.approx(best_two[-len(kept):], abs=0.006)


def test_the_printed_resume_command_parses_for_a_folder_with_a_comma_a_space_and_a_non_ascii_letter(tmp_path):
    """Shell-quoted and Hydra-quoted: ``resume='<folder>'`` reaches the run as it is named."""
    import shlex

    from tdlrt_cli.files import hydra_value

    folder = tmp_path / "runs, été 1"
    stopped = run_tdlrt([*ARGS, f"hydra.run.dir={hydra_value(str(folder))}"], tmp_path,
                        env={"TDLRT_FAULT_SIGNAL_AT_STEP": "2", "TDLRT_FAULT_SIGNAL": "TERM"}, check=False)
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    command = shlex.split(stopped.stderr.strip().splitlines()[-1].split("resume with: ", 1)[1])
    assert command[:2] == ["tdlrt", "train"] and len(command) == 3, command
    run_tdlrt(command[1:], tmp_path)
    assert json.loads((folder / "summary.json").read_text())["epochs"] == final_state(folder)["epoch"] == 3
