"""Atomic checkpoint files, read back with ``torch.load(weights_only=True)``."""
from __future__ import annotations

import errno
import io
import os
import re
from pathlib import Path

import torch

from .errors import CheckpointError
from .faults import faults
from .files import atomic_file

FORMAT = "tdlrt-checkpoint-1"
RESUME_NEEDS = ("model", "optimizer", "scheduler", "rng", "epoch", "global_step")  # what a resume reads


def save_checkpoint(state: dict, path: Path) -> None:
    """Write ``state`` to ``path`` through a temporary file and an atomic rename: a reader (or a resumed
    run after a crash) sees either the old file or the new one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(exist_ok=True)  # (not its parents: a run folder deleted meanwhile is not made again)
    faults.checkpoints_written += 1
    with atomic_file(path, "wb") as fh:
        if faults.kill_in_checkpoint == faults.checkpoints_written:  # fault injection: die mid-write
            buffer = io.BytesIO()
            torch.save({"format": FORMAT, **state}, buffer)
            fh.write(buffer.getvalue()[: buffer.tell() // 2])
            fh.flush()
            faults.die()
        if faults.disk_full_in_checkpoint == faults.checkpoints_written:  # fault injection: no space left
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        torch.save({"format": FORMAT, **state}, fh)


# The temporaries of files.atomic_file in a checkpoints/ folder: ``.<name>.<pid>.tmp`` (older: ``.<name>.tmp``);
# those of dead processes are half-written checkpoints a killed run left behind (files.remove_stale_temporaries).
CHECKPOINT_TEMPORARY = re.compile(r"^\..+?(?:\.(?P<pid>\d+))?\.tmp$")


def load_checkpoint(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} (check ckpt_path)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: corrupt or not a tdlrt checkpoint ({reason[:160]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a tdlrt checkpoint (no '{FORMAT}' marker)")
    return state


def load_error(exc: BaseException) -> str:
    """The informative line of a ``load_state_dict`` error (its first line is only "Error(s) in loading
    state_dict for VGG:"; the next names the first mismatched key)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Error(s) in loading state_dict"):
        return lines[1][:200]
    return (lines[0] if lines else type(exc).__name__)[:200]


def require(state: dict, keys, path) -> None:
    """Refuse a checkpoint that lacks what a resume needs, naming the first missing key."""
    for key in keys:
        if key not in state:
            raise CheckpointError(f"{path} is missing {key!r} (written by an older tdlrt or damaged); it cannot be "
                                  f"resumed (tdlrt export and tdlrt eval can still read its weights)")
