"""Fault injection for the tests of crash safety, read from environment variables once at import.

TDLRT_FAULT_KILL_AT_STEP=N       the process dies like ``kill -9`` (exit 137, no clean-up) at step N;
TDLRT_FAULT_KILL_PHASE=P         where in step N: ``after`` (default, once the step is done) or
                                 ``rank_change`` (TDLRT: bases augmented to 2r, before the update and
                                 truncation of that step);
TDLRT_FAULT_KILL_IN_CHECKPOINT=N the N-th checkpoint write dies with half of the file written;
TDLRT_FAULT_DISK_FULL_IN_CHECKPOINT=N  the N-th checkpoint write fails with ENOSPC (no space left);
TDLRT_FAULT_DISK_FULL_IN_LOCK=1  writing the run folder's lock (the first file of a run) fails with ENOSPC;
TDLRT_FAULT_DISK_FULL_IN_EXPORT=1  `tdlrt export` fails with ENOSPC half-way through writing the .pt2 file;
TDLRT_FAULT_NAN_AT_STEP=N        the loss of step N becomes NaN (TDLRT_FAULT_NAN_STEPS=K: of steps N to N+K-1);
TDLRT_FAULT_INF_LR_AT_STEP=N     the lr of step N is infinite (its loss is finite, the stepped weights are not);
                                 TDLRT_FAULT_INF_LR_IN_JOB=J: in job J of a sweep only;
TDLRT_FAULT_SIGNAL_AT_STEP=N     the process sends itself TDLRT_FAULT_SIGNAL (INT, default, TERM or HUP) after
                                 step N, as a user's Ctrl-C, a scheduler's SIGTERM or a closed terminal would;
TDLRT_FAULT_SIGNAL_AT=P          the process sends itself TDLRT_FAULT_SIGNAL at point P of a command, outside
                                 the training loop: ``export_write`` (`tdlrt export`: the program written to
                                 its temporary file, not yet renamed), ``eval`` (`tdlrt eval`: the test accuracy
                                 measured, the report not yet written), ``train_setup`` (`tdlrt train`: the data
                                 read, the network not yet built), ``train_summary`` (`tdlrt train`: the epochs
                                 done, the summary not yet written).
TDLRT_FAULT_OOM_AT_STEP=N        step N asks the allocator of the training device for 2**62 bytes (4 EiB): the
                                 allocator's own out-of-memory error, as a batch too large for the machine gives;
TDLRT_FAULT_BUG_IN_JOB=N         job N of a sweep (`tdlrt train -m`) fails with an unexpected exception, as a bug
                                 in tdlrt would.
"""
from __future__ import annotations

import os
import signal


class Faults:
    def __init__(self, env=os.environ):
        self.kill_at_step = int(env.get("TDLRT_FAULT_KILL_AT_STEP", 0))
        self.kill_phase = env.get("TDLRT_FAULT_KILL_PHASE", "after")
        self.kill_in_checkpoint = int(env.get("TDLRT_FAULT_KILL_IN_CHECKPOINT", 0))
        self.disk_full_in_checkpoint = int(env.get("TDLRT_FAULT_DISK_FULL_IN_CHECKPOINT", 0))
        self.disk_full_in_lock = bool(int(env.get("TDLRT_FAULT_DISK_FULL_IN_LOCK", 0)))
        self.disk_full_in_export = bool(int(env.get("TDLRT_FAULT_DISK_FULL_IN_EXPORT", 0)))
        self.nan_at_step = int(env.get("TDLRT_FAULT_NAN_AT_STEP", 0))
        self.nan_steps = int(env.get("TDLRT_FAULT_NAN_STEPS", 1))
        self.inf_lr_at_step = int(env.get("TDLRT_FAULT_INF_LR_AT_STEP", 0))
        self.inf_lr_in_job = int(env.get("TDLRT_FAULT_INF_LR_IN_JOB", -1))
        self.job = -1  # the sweep job this process runs (train sets it), -1 outside a sweep
        self.signal_at_step = int(env.get("TDLRT_FAULT_SIGNAL_AT_STEP", 0))
        self.signal = getattr(signal, "SIG" + env.get("TDLRT_FAULT_SIGNAL", "INT"))
        self.signal_at_point = env.get("TDLRT_FAULT_SIGNAL_AT", "")
        self.bug_in_job = int(env.get("TDLRT_FAULT_BUG_IN_JOB", -1))
        self.oom_at_step = int(env.get("TDLRT_FAULT_OOM_AT_STEP", 0))
        self.checkpoints_written = 0

    def kill_now(self, step: int, phase: str) -> bool:
        return self.kill_at_step == step and self.kill_phase == phase

    def nan_now(self, step: int) -> bool:
        return 0 < self.nan_at_step <= step < self.nan_at_step + self.nan_steps

    def inf_lr_now(self, step: int) -> bool:
        return self.inf_lr_at_step == step and self.inf_lr_in_job in (-1, self.job)

    def signal_now(self, step: int) -> None:
        if self.signal_at_step == step:
            os.kill(os.getpid(), self.signal)

    def signal_at(self, point: str) -> None:
        if self.signal_at_point == point:
            os.kill(os.getpid(), self.signal)

    def oom_now(self, step: int, device) -> None:
        if self.oom_at_step == step:
            import torch

            torch.empty(2 ** 62, dtype=torch.uint8, device=device)

    def bug_now(self, job: int) -> None:
        if self.bug_in_job == job:
            raise RuntimeError(f"fault injection: a bug in sweep job {job}")

    @staticmethod
    def die() -> None:
        os._exit(137)


faults = Faults()
