"""A run folder is what its files say: resume restores the run's own config, drift is refused, refused input
writes nothing, one writer per folder, best.pt matches last.pt's record, sweeps are checked before job 0."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY, one_line, run_tdlrt

# a run that differs from every default in what is trained: resuming with the defaults would show it
RUN = [a for a in TINY if not a.startswith("epochs")] + ["method=tdlrt", "tau=0.15", "lr=0.02", "seed=3",
                                                          "data.val_split=64", "cost_report=false"]


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A 1-epoch run in a known folder (copied per test: tests change it)."""
    root = tmp_path_factory.mktemp("identity")
    run_tdlrt(["train", *RUN, "epochs=1", "hydra.run.dir=run"], root)
    return root / "run"


@pytest.fixture
def run(finished, tmp_path):
    import shutil

    shutil.copytree(finished, tmp_path / "run")
    return tmp_path / "run"


@pytest.mark.parametrize("how", ["resume={run}", "ckpt_path={run}/checkpoints/last.pt", "hydra.run.dir={run}"])
def test_resume_restores_the_runs_own_config(run, tmp_path, how):
    """The README's resume line, with no other override, continues the run with its own settings (not the
    defaults: VGG16 on CIFAR-10), extending epochs, in its folder, keeping the first session's Hydra files."""
    first = (run / ".hydra" / "config.yaml").read_bytes()
    proc = run_tdlrt(["train", how.format(run=run), "epochs=2", "device=cpu", "progress=false"], tmp_path)
    assert "resuming" in proc.stderr
    summary = json.loads((run / "summary.json").read_text())
    saved = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    for config in (summary["config"], saved["config"]):
        assert (config["tau"], config["lr"], config["seed"], config["model"]["width_mult"]) == (0.15, 0.02, 3, 0.125)
        assert config["data"]["name"] == "synthetic" and config["data"]["val_split"] == 64 and config["epochs"] == 2
    assert saved["epoch"] == 2 and not (tmp_path / "outputs").exists()
    assert (run / ".hydra" / "config.yaml").read_bytes() == first and list((run / ".hydra").glob("resume-*"))
    assert not (run / ".lock").exists()


@pytest.mark.parametrize("how", ["resume={run}", "hydra.run.dir={run}"])
def test_a_finished_run_resumed_with_its_epochs_says_so_and_changes_nothing(run, tmp_path, how):
    before = snapshot(run)
    proc = run_tdlrt(["train", how.format(run=run), "epochs=1", *([] if how.startswith("resume") else RUN)], tmp_path)
    assert proc.stderr.strip().splitlines()[-1] == (f"tdlrt: {run} is finished (1 of 1 epochs, summary.json written): "
                                                    f"nothing to do, nothing was changed (a larger epochs= extends it)")
    assert snapshot(run) == before and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_wall_time_is_the_runs_total_over_its_sessions(run, tmp_path):
    """The checkpoint carries the wall time so far; a resumed run's summary adds its own session to it."""
    from tdlrt_cli.checkpoint import save_checkpoint

    last = run / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    first = json.loads((run / "summary.json").read_text())["wall_time_s"]
    assert 0 < state["elapsed_s"] <= first
    state["elapsed_s"] = 1000.0  # as if the first session had taken 1000 s to its checkpoint
    save_checkpoint({k: v for k, v in state.items() if k != "format"}, last)
    run_tdlrt(["train", f"resume={run}", "epochs=2", "progress=false"], tmp_path)
    total = json.loads((run / "summary.json").read_text())["wall_time_s"]
    resumed = torch.load(last, weights_only=True)["elapsed_s"]
    assert 1000 < resumed <= total < 1000 + 300


# `tdlrt train ...` in a process whose torch.load counts the reads of last.pt (printed last, on stderr)
COUNTING_READS = """
import atexit, sys, torch
real, reads = torch.load, []
def counting(f, *args, **kwargs):
    reads.append(str(f))
    return real(f, *args, **kwargs)
torch.load = counting
atexit.register(lambda: print("reads of last.pt:", sum(r.endswith("last.pt") for r in reads), file=sys.stderr))
from tdlrt_cli.cli import main
main(sys.argv[1:])
"""


def test_a_resume_reads_its_checkpoint_once(run, tmp_path):
    """The checks before Hydra (launch.saved_config) and the restore in the run share one read of last.pt."""
    proc = subprocess.run([sys.executable, "-c", COUNTING_READS, "train", f"resume={run}", "epochs=2",
                           "progress=false"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0 and "resuming" in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == "reads of last.pt: 1"
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 2


def test_a_checkpoint_kept_from_a_read_is_not_used_once_the_file_is_rewritten(run):
    from tdlrt_cli.checkpoint import load_checkpoint, save_checkpoint

    last = run / "checkpoints" / "last.pt"
    kept = load_checkpoint(last, keep=True)
    assert load_checkpoint(last) is kept  # the next read takes it
    assert load_checkpoint(last) is not kept  # ... once
    load_checkpoint(last, keep=True)
    save_checkpoint({**{k: v for k, v in kept.items() if k != "format"}, "epoch": 7}, last)
    assert load_checkpoint(last)["epoch"] == 7  # another file now (written by rename): read again


def test_a_resume_keeps_the_epochs_it_was_last_extended_to(run, tmp_path):
    run_tdlrt(["train", f"resume={run}", "epochs=2", "progress=false"], tmp_path)
    run_tdlrt(["train", f"resume={run}", "progress=false"], tmp_path)  # no epochs=: the run's 2, not the first 1
    assert json.loads((run / "summary.json").read_text())["config"]["epochs"] == 2


@pytest.mark.parametrize("args, needles", [
    (["resume={run}", "lr=0.01", "seed=1"], ["lr 0.02 -> 0.01", "seed 3 -> 1"]),
    (["hydra.run.dir={run}", "seed=1", "lr=0.01"], ["lr 0.02 -> 0.01", "seed 3 -> 1"]),
    (["ckpt_path={run}/checkpoints/last.pt", "tau=0.3"], ["tau 0.15 -> 0.3"]),
    (["resume={run}", "data.val_split=0"], ["data.val_split 64 -> 0"]),
    (["resume={run}", "model=lenet5"], ['model.name "vgg16" -> "lenet5"']),
])
def test_resume_that_changes_what_is_trained_is_refused_and_touches_nothing(run, tmp_path, args, needles):
    before = snapshot(run)
    proc = run_tdlrt(["train", *[a.format(run=run) for a in args]], tmp_path, check=False)
    one_line(proc, "would change what is trained", *needles)
    assert snapshot(run) == before and not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("args, needle", [
    (["lr=-1", "hydra.run.dir={run}"], "lr=-1.0 must be > 0"),
    (["tau=2", "hydra.run.dir={run}"], "tau=2.0 must be in (0, 1)"),
    (["method=magic", "hydra.run.dir={run}"], "unknown method 'magic'"),
    (["lrr=0.1", "hydra.run.dir={run}"], "unknown option 'lrr'"),
    (["scheduler=step", "scheduler.step_size=0", "hydra.run.dir={run}"], "scheduler.step_size=0 must be >= 1"),
    (["data.val_split=2.5", "resume={run}"], "data.val_split=2.5 must be 0"),
    (["resume={tmp}/nothing"], "checkpoint not found: resume="),
    (["checkpoint.auto_resume=false", "hydra.run.dir={run}", *RUN], "already holds a run"),
    (["resume={run}", "epochs=0"], "has completed 1 epochs"),
    (["resume={run}", "hydra.run.dir={tmp}/elsewhere"], "would split it over two folders"),
    (["-m", "resume={run}", "epochs=2,3"], "cannot be swept"),
])
def test_refused_input_aimed_at_a_run_folder_writes_nothing(run, tmp_path, args, needle):
    before = snapshot(run)
    proc = run_tdlrt(["train", *[a.format(run=run, tmp=tmp_path) for a in args]], tmp_path, check=False)
    one_line(proc, needle)
    assert snapshot(run) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no new folder anywhere


def test_refused_input_leaves_no_folder(tmp_path):
    """Neither a config error nor missing data (found once training starts) leaves a run folder behind."""
    one_line(run_tdlrt(["train", *TINY, "lr=-1"], tmp_path, check=False), "lr=-1.0")
    one_line(run_tdlrt(["train", "model=lenet5", "data=mnist", f"data.root={tmp_path / 'none'}", "data.download=false",
                        "device=cpu"], tmp_path, check=False), "not found", "data.root")
    assert list(tmp_path.iterdir()) == []


LONG = "n" * 300  # more than the 255 bytes a file name may have


@pytest.mark.parametrize("args, needle", [
    (["hydra.run.dir=sub/" + LONG], "hydra.run.dir: the folder name 'nnnnnnnnnnnnnnnnnnnn...nnnnnnnn' is 300 bytes"),
    (["task_name=" + LONG], "task_name: the folder name"),
    (["-m", "hydra.sweep.dir=sub/" + LONG], "hydra.sweep.dir: the folder name"),
    (["-m", "hydra.sweep.subdir=" + LONG], "hydra.sweep.subdir: the folder name"),
    (["resume=" + LONG], "checkpoint not found: resume=nnn"),
], ids=["run-dir", "task-name", "sweep-dir", "sweep-subdir", "resume"])
def test_a_folder_name_too_long_is_one_line_before_anything_is_written(tmp_path, args, needle):
    one_line(run_tdlrt(["train", *TINY, *args], tmp_path, check=False), needle)
    assert list(tmp_path.iterdir()) == []


def test_non_run_folder_and_empty_run_dir_are_refused(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    one_line(run_tdlrt(["train", *TINY, "hydra.run.dir=mine"], tmp_path, check=False), "holds no tdlrt run")
    one_line(run_tdlrt(["train", *TINY, "hydra.run.dir="], tmp_path, check=False), "hydra.run.dir= is empty")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def test_a_full_disk_at_the_start_leaves_nothing_and_the_same_command_then_runs(tmp_path):
    """Writing the lock (the first file of a run) fails with ENOSPC: one line, no lock temporary and no folder
    left; a folder holding only a dead process's lock temporary (what an earlier tdlrt left) counts as empty."""
    args = ["train", *TINY, "epochs=1", "hydra.run.dir=new/run"]
    proc = run_tdlrt(args, tmp_path, env={"TDLRT_FAULT_DISK_FULL_IN_LOCK": "1"}, check=False)
    one_line(proc, "no space left on the device of", "free space and run the command again")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "new" / "run").mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "new" / "run" / f".lock.{dead.pid}.tmp").write_text("")  # the earlier start's temporary
    run_tdlrt(args, tmp_path)
    run = tmp_path / "new" / "run"
    assert (run / "checkpoints" / "last.pt").is_file() and not list(run.glob(".lock*"))


def test_a_sweep_is_validated_before_its_first_job(tmp_path):
    proc = run_tdlrt(["train", "-m", *TINY, "method=tdlrt", "tau=0.1,2,0.2"], tmp_path, check=False)
    one_line(proc, "sweep job 1 (tau=2) of 3", "tau=2.0 must be in (0, 1)")
    assert not (tmp_path / "outputs").exists()


def test_a_failed_sweep_job_does_not_stop_the_sweep_and_the_end_says_what_did_not_finish(tmp_path):
    """An infinite lr at its first step (fault injection) makes job 1 stop there: jobs 0 and 2 still run, the last
    line lists job 1 and how to run it; the sweep run again (the cause gone) skips the finished jobs, leaving their
    files as they are."""
    args = ["train", "-m", *[a for a in TINY if not a.startswith("epochs")], "epochs=1", "method=tdlrt",
            "cost_report=false", "hydra.sweep.dir=sw"]
    proc = run_tdlrt(args + ["lr=0.05,0.02,0.01"], tmp_path, check=False,
                     env={"TDLRT_FAULT_INF_LR_AT_STEP": "1", "TDLRT_FAULT_INF_LR_IN_JOB": "1"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert any(line.startswith(f"tdlrt: error: sweep job 1 ({tmp_path / 'sw' / '1'}): ") and "NaN/Inf" in line
               for line in lines)
    assert lines[-1] == ("tdlrt: error: 1 of 3 sweep jobs did not finish: job 1 (lr=0.02); once the cause is fixed, "
                         "the same command runs them (finished jobs are skipped, stopped ones resume)")
    sw = tmp_path / "sw"
    assert [(sw / str(n) / "summary.json").is_file() for n in range(3)] == [True, False, True]

    def run_files(n):  # (Hydra writes its .hydra/ files for every job it launches)
        return {k: v for k, v in snapshot(sw / str(n)).items() if not k.startswith(".hydra")}

    before = {n: run_files(n) for n in (0, 2)}
    again = run_tdlrt(args + ["lr=0.05,0.02,0.01"], tmp_path)
    assert again.stderr.count("is finished (1 of 1 epochs, summary.json written): nothing to do") == 2
    assert {n: run_files(n) for n in (0, 2)} == before and (sw / "1" / "summary.json").is_file()


def test_a_sweep_job_that_fails_with_a_bug_does_not_stop_the_sweep(tmp_path):
    """An unexpected exception in job 1 (a bug): its traceback and one line saying the sweep goes on; jobs 0 and
    2 run; the last line lists job 1."""
    args = ["train", "-m", *[a for a in TINY if not a.startswith("epochs")], "epochs=1", "method=dense",
            "cost_report=false", "hydra.sweep.dir=sw", "lr=0.05,0.02,0.01"]
    proc = run_tdlrt(args, tmp_path, env={"TDLRT_FAULT_BUG_IN_JOB": "1"}, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "RuntimeError: fault injection: a bug in sweep job 1" in proc.stderr
    assert f"tdlrt: error: sweep job 1 ({tmp_path / 'sw' / '1'}) failed with an unexpected error" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("tdlrt: error: 1 of 3 sweep jobs did not finish: job 1 (lr=0.02)")
    assert [(tmp_path / "sw" / str(n) / "summary.json").is_file() for n in range(3)] == [True, False, True]
    assert not (tmp_path / "sw" / "1" / ".lock").exists()


def test_a_live_writer_holds_the_folder_and_a_dead_ones_lock_is_taken_over(run, tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        lock = {"pid": holder.pid, "host": socket.gethostname(), "started": "now"}
        (run / ".lock").write_text(json.dumps(lock))
        before = snapshot(run)
        one_line(run_tdlrt(["train", f"resume={run}", "epochs=2"], tmp_path, check=False),
                 f"is in use by tdlrt PID {holder.pid}")
        assert snapshot(run) == before
    finally:
        holder.kill()
        holder.wait()
    proc = run_tdlrt(["train", f"resume={run}", "epochs=2", "progress=false"], tmp_path)  # its PID is gone now
    assert f"taking over the lock of PID {holder.pid}" in proc.stderr
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 2
    assert not (run / ".lock").exists()


@pytest.mark.parametrize("content, needle", [
    ('{"pid": 99999999999999999999, "host": "HOST"}', "its pid 99999999999999999999 is not a process id"),
    ('{"pid": true, "host": "HOST"}', "its pid true is not a process id"),
    ('{"pid": -5, "host": "HOST"}', "its pid -5 is not a process id"),
    ('{"pid": 12, "host": 7}', "its host 7 is not a host name"),
    ("{\"pid\": 1", "not the JSON record tdlrt writes"),
    (None, "it is a folder"),
], ids=["huge-pid", "bool-pid", "negative-pid", "host-not-text", "not-json", "folder"])
def test_a_damaged_lock_is_one_line_saying_what_to_do_and_touches_nothing(run, tmp_path, content, needle):
    if content is None:
        (run / ".lock").mkdir()
    else:
        (run / ".lock").write_text(content.replace("HOST", socket.gethostname()))
    before = snapshot(run)
    line = one_line(run_tdlrt(["train", f"resume={run}", "epochs=2"], tmp_path, check=False),
                    f"{run / '.lock'} is a damaged lock ({needle})", f"remove {run / '.lock'} and run the command again")
    assert "Traceback" not in line
    assert snapshot(run) == before and (run / ".lock").exists()
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".lock")) == [".lock"]


def test_two_writers_started_together_one_is_refused(tmp_path):
    exe = Path(sys.executable).parent / "tdlrt"
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "tdlrt_cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [*cmd, "train", *RUN, "epochs=1", "hydra.run.dir=same"]
    procs = [subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes in ([0, 0], [0, 2]), results
    if codes == [0, 2]:  # the second found the first's lock
        assert "is in use by tdlrt PID" in next(err for code, err in results if code == 2)
    else:  # the second started after the first had finished: it found the run finished
        assert any("is finished (1 of 1 epochs" in err for _, err in results)
    rows = (tmp_path / "same" / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 2  # header + epoch 1, never twice


def test_best_pt_stale_after_a_kill_between_last_and_best_is_repaired_on_resume(tmp_path):
    """Epoch 1 writes last.pt (checkpoint 1) and best.pt (2); killed inside best.pt's write, the resumed run
    copies last.pt (the best epoch, as it records) to best.pt, and export of best ships epoch 1."""
    args = ["train", *RUN, "epochs=1", "hydra.run.dir=run"]
    killed = run_tdlrt(args, tmp_path, env={"TDLRT_FAULT_KILL_IN_CHECKPOINT": "2"}, check=False)
    assert killed.returncode == 137
    ckpt = tmp_path / "run" / "checkpoints"
    assert not (ckpt / "best.pt").exists() and (ckpt / "last.pt").is_file()
    proc = run_tdlrt(["train", "resume=run", "progress=false"], tmp_path)
    assert "best.pt was older than the best epoch" in proc.stderr
    best = torch.load(ckpt / "best.pt", weights_only=True)
    last = torch.load(ckpt / "last.pt", weights_only=True)
    assert best["epoch"] == 1 and best["best"]["selected"]["epoch"] == 1
    assert all(torch.equal(best["model"][k], last["model"][k]) for k in last["model"])


def test_nan_policy_skip_gives_up_after_nan_max_skips(tmp_path):
    proc = run_tdlrt(["train", *TINY, "method=dense", "nan_policy=skip", "nan_max_skips=2"], tmp_path,
                     env={"TDLRT_FAULT_NAN_AT_STEP": "2", "TDLRT_FAULT_NAN_STEPS": "100"}, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr  # (after the run's start block)
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("tdlrt: error: ") and "NaN/Inf again at step 4" in line  # steps 2 and 3 were skipped
    assert "nan_max_skips" in line and "no checkpoint was written yet" in line


def test_a_full_disk_says_so_and_keeps_the_previous_checkpoint(tmp_path):
    """Epoch 2's last.pt (the 3rd checkpoint write: last, best, last) fails with ENOSPC: one line saying
    so with the resume command, epoch 1's last.pt intact, no temporary left; the resume then finishes."""
    args = ["train", *RUN, "epochs=2", "hydra.run.dir=run"]
    proc = run_tdlrt(args, tmp_path, env={"TDLRT_FAULT_DISK_FULL_IN_CHECKPOINT": "3"}, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("tdlrt: error: no space left on the device") and "last.pt" in line
    assert f"resume the run: tdlrt train resume={tmp_path / 'run'}" in line
    ckpt = tmp_path / "run" / "checkpoints"
    assert torch.load(ckpt / "last.pt", weights_only=True)["epoch"] == 1 and not list(ckpt.glob(".*.tmp"))
    run_tdlrt(["train", f"resume={tmp_path / 'run'}", "progress=false"], tmp_path)
    assert torch.load(ckpt / "last.pt", weights_only=True)["epoch"] == 2


@pytest.mark.parametrize("key", ["rng", "optimizer"])
def test_a_checkpoint_missing_what_a_resume_needs_is_refused(run, tmp_path, key):
    from tdlrt_cli.checkpoint import save_checkpoint

    last = run / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    save_checkpoint({k: v for k, v in state.items() if k not in (key, "format")}, last)
    before = snapshot(run)
    one_line(run_tdlrt(["train", f"resume={run}", "epochs=2"], tmp_path, check=False), f"is missing {key!r}")
    assert snapshot(run) == before


@pytest.mark.skipif(__import__("shutil").which("srun") is not None, reason="SLURM is installed here")
def test_a_slurm_sweep_without_slurm_is_one_line(tmp_path):
    proc = run_tdlrt(["train", "-m", "hydra/launcher=slurm", *TINY, "seed=0,1"], tmp_path, check=False)
    one_line(proc, "hydra/launcher=slurm needs SLURM")
    assert list(tmp_path.iterdir()) == []
