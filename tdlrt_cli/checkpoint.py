"""Checkpoints: what one holds (:func:`checkpoint_state`), atomic writes, reading back with
``torch.load(weights_only=True)`` (once per resume), and loading one into a freshly built run (:func:`restore`)."""
from __future__ import annotations

import errno
import io
import os
import re
from pathlib import Path
from typing import List, Optional, Sequence

import torch
import torch.nn as nn

from .config import unsafe_in
from .errors import CheckpointError
from .faults import faults
from .files import atomic_file, load_json
from .metrics import layer_ranks

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


_kept: list = []  # [(file identity, state)]: read with keep=True, until the next read of the same file takes it


def load_checkpoint(path, keep: bool = False, mmap: bool = False) -> dict:
    """Read a tdlrt checkpoint (``weights_only``: tensors, containers, numbers, strings).

    ``keep=True`` keeps what was read for the next read of the same file, which takes it instead of reading
    the file again: a resume checks the checkpoint before Hydra starts and restores from it after, one read
    for both. The file is the same when its inode, size and modification time are (checkpoints are written
    by rename, so a rewritten one is another inode). ``mmap=True`` maps the tensors instead of reading them,
    for a look at the config alone."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} (check ckpt_path)")
    key = _identity(path)
    if not mmap and _kept and _kept[0][0] == key:
        state = _kept.pop()[1]
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except Exception as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"cannot read checkpoint {path}: corrupt or not a tdlrt checkpoint "
                                  f"({reason[:160]})") from None
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise CheckpointError(f"{path} is not a tdlrt checkpoint (no '{FORMAT}' marker)")
        found = unsafe_in(state.get("config"), "config")  # resolved when written: plain values only
        if found:
            raise CheckpointError(f"{path} holds {found} in its saved configuration; a checkpoint may only hold "
                                  f"tdlrt's own settings (refused: nothing it names was run)")
    if keep and not mmap:
        _kept[:] = [(key, state)]
    return state


def _identity(path: Path) -> tuple:
    try:
        stat = path.stat()
    except OSError as exc:  # gone since the check above
        raise CheckpointError(f"checkpoint not found: {path} ({exc.strerror or exc})") from None
    return str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns


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


def checkpoint_state(cfg, config_dict, model, optimizer, integrator, scheduler, epoch, global_step, best,
                     position: Optional[dict] = None, data_shape: Optional[tuple] = None, skipped_steps: int = 0,
                     elapsed_s: float = 0.0, data_input: Optional[dict] = None) -> dict:
    """Everything a resumed run needs: ``epoch`` completed epochs, and with ``position`` the place inside
    the next one (batch, running loss and accuracy sums) for checkpoints written mid-epoch; ``elapsed_s``:
    the run's wall time so far, over all its sessions (a resumed run's summary adds its own); ``data_input``:
    the normalisation of the pixels and the class names (for the sidecar of an export)."""
    return {
        "epoch": epoch, "global_step": global_step, "best_test_acc": best["max_test"], "best": best,
        "position": position, "skipped_steps": skipped_steps, "elapsed_s": elapsed_s,
        "data_shape": list(data_shape) if data_shape else None,
        "data_input": data_input,  # {"mean", "std", "classes"}: what a user of the network feeds it
        "model_name": cfg.model.name, "method": cfg.method.name, "ranks": layer_ranks(model),
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "integrator": integrator.state_dict(optimizer=False) if integrator else None,
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        "config": config_dict,
    }


def restore(state, cfg, model, optimizer, integrator, scheduler) -> tuple:
    """Load a checkpoint into freshly built objects; low-rank layers resize to the saved ranks."""
    require(state, RESUME_NEEDS, cfg.ckpt_path)
    if state.get("model_name") != cfg.model.name or state.get("method") != cfg.method.name:
        raise CheckpointError(f"checkpoint {cfg.ckpt_path} was written by model={state.get('model_name')} "
                              f"method={state.get('method')}, this run is model={cfg.model.name} "
                              f"method={cfg.method.name}")
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    except (RuntimeError, KeyError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {cfg.ckpt_path} does not match this configuration: "
                              f"{load_error(exc)}") from None
    if integrator is not None and state.get("integrator"):
        integrator.load_state_dict(state["integrator"])
    torch.set_rng_state(state["rng"]["torch"])
    if torch.cuda.is_available() and state["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    best = state.get("best") or {"metric": float(state["best_test_acc"]), "max_test": float(state["best_test_acc"]),
                                 "selected": None}  # a checkpoint from before validation splits
    return int(state["epoch"]), int(state["global_step"]), best, state.get("position")


def finished_summary(run_dir: Path, resume: Optional[dict], ckpt_path: Optional[str], epochs: int) -> Optional[dict]:
    """The summary of a run resumed from its own last.pt that has nothing left to train (all ``epochs`` done,
    summary.json written); None otherwise (also when summary.json does not parse: the run writes it anew)."""
    if resume is None or int(resume.get("epoch", 0)) < epochs or resume.get("position") or resume.get("method") == "imp":
        return None
    if Path(ckpt_path).resolve() != (run_dir / "checkpoints" / "last.pt").resolve():
        return None
    try:
        summary = load_json((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and "test_acc" in summary else None


def load_dense_weights(model: nn.Module, source: str, refit: Sequence[str] = ()) -> List[str]:
    """``init_from``: a checkpoint of a dense tdlrt run of the same model, or a file holding a state dict.
    ``refit``: layers fitted to the data (a torchvision network's classifier and stem), whose tensors of another
    shape in the file are left as fitted (an ImageNet head on 10 classes); returns those tensors' names."""
    if not Path(source).is_file():
        raise CheckpointError(f"init_from={source}: file not found")
    try:
        weights = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"init_from={source}: cannot read it ({type(exc).__name__})") from None
    if isinstance(weights, dict) and "model" in weights and "format" in weights:
        weights = weights["model"]
    elif isinstance(weights, dict) and "state_dict" in weights:
        weights = weights["state_dict"]
    if isinstance(weights, dict):
        bad = [k for k, v in weights.items() if torch.is_tensor(v) and v.is_floating_point()
               and not bool(torch.isfinite(v).all())]
        if bad:
            raise CheckpointError(f"init_from={source}: {bad[0]} holds NaN or Inf"
                                  + (f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else "")
                                  + "; start from a checkpoint of a run that did not diverge")
    kept = []
    if isinstance(weights, dict) and refit:
        own = model.state_dict()
        for key in list(weights):
            if any(key.startswith(layer + ".") for layer in refit) and key in own \
                    and getattr(weights[key], "shape", None) != own[key].shape:
                weights[key] = own[key]
                kept.append(key)
    try:
        model.load_state_dict(weights)
    except (RuntimeError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"init_from={source} does not match this model: "
                              f"{load_error(exc)}") from None
    return kept

