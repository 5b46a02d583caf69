"""Which epochs' checkpoints a run keeps: ``best.pt`` (the best epoch by validation accuracy, else test
accuracy; for rank-adaptive methods only among the epochs at the final ranks), ``last.pt``, and with
``checkpoint.keep_top_k`` the k best epochs as ``epochNNN-<metric><value>.pt``.

The record of the selection (``best``, a plain dict saved in every checkpoint) is::

    {"metric": best value so far, "max_test": best test accuracy so far,
     "selected": {"by", "epoch", "val_acc", "test_acc", "compression_rate"} of best.pt, or None,
     "ranks": the ranks it was selected at (rank-adaptive methods), "top": [(metric, epoch, file name)]}
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, List, Optional, Tuple

from .checkpoint import load_checkpoint, save_checkpoint
from .errors import CheckpointError
from .logs import Console

TOP_FILE = re.compile(r"^epoch\d{3,}-(?:val_acc|test_acc)-?[\d.]+\.pt$")


def no_best() -> dict:
    """The record before any epoch (and after selection starts again)."""
    return {"metric": -1.0, "max_test": -1.0, "selected": None}


def select(best: dict, epoch: int, by: str, metric: float, test_acc: float, val_acc: Optional[float],
           compression_rate: float, ranks: Optional[dict], keep_top_k: int) -> Tuple[dict, bool, List[str]]:
    """The record once epoch ``epoch`` (1-based) is counted; whether it is the new best.pt; and the top-k
    files that are no longer kept (to delete once the new record is written).

    ``ranks`` (rank-adaptive methods): when they differ from those of the record, the earlier epochs are
    another network: selection restarts at these ranks, so best.pt always has the final ranks (one network:
    its accuracy, c.r., params and FLOPs)."""
    stale = []
    if ranks is not None and best.get("ranks") not in (None, ranks):
        stale = [name for _, _, name in best.get("top", [])]
        best = no_best()
    improved = metric > best["metric"]
    top, evicted = top_k(best.get("top", []), metric, epoch, by, keep_top_k)
    selected = ({"by": by, "epoch": epoch, "val_acc": val_acc, "test_acc": test_acc,
                 "compression_rate": compression_rate} if improved else best["selected"])
    best = {"metric": max(best["metric"], metric), "max_test": max(best["max_test"], test_acc),
            "selected": selected, "ranks": ranks, "top": top}
    return best, improved, stale + evicted


def save_epoch(ckpt_dir: Path, state: dict, improved: bool, stale: List[str]) -> None:
    """Write an epoch's checkpoints: its top-k file (before last.pt lists it), ``last.pt``, then ``best.pt``
    if it improved (a kill between the two leaves a last.pt that :func:`repair_best` copies on resume), then
    delete the files that fell out of the top k."""
    epoch = state["epoch"]
    for _, kept_epoch, name in state["best"].get("top", []):
        if kept_epoch == epoch:
            save_checkpoint(state, ckpt_dir / name)
    save_checkpoint(state, ckpt_dir / "last.pt")
    if improved:
        save_checkpoint(state, ckpt_dir / "best.pt")
    for name in stale:
        (ckpt_dir / name).unlink(missing_ok=True)


def top_name(epoch: int, by: str, metric: float) -> str:
    return f"epoch{epoch:03d}-{by}{metric:.2f}.pt"


def top_k(top: list, metric: float, epoch: int, by: str, k: int) -> tuple:
    """``checkpoint.keep_top_k``: the k best epochs ``[(metric, epoch, file name)]`` once this epoch is counted
    (ties: the earlier epoch stays), and the files that fall out."""
    if k <= 0:
        return [], []
    ranked = sorted([tuple(t) for t in top] + [(metric, epoch, top_name(epoch, by, metric))],
                    key=lambda t: (-t[0], t[1]))
    return ranked[:k], [name for _, _, name in ranked[k:]]


def drop_top(ckpt_dir: Path, best: dict, main: bool) -> None:
    """Selection starts again (a new IMP round): the kept epochs are another network."""
    for _, _, name in best.get("top", []) if main else ():
        (ckpt_dir / name).unlink(missing_ok=True)


def remove_unlisted_top(ckpt_dir: Path, best: dict) -> None:
    """On resume: top-k files the checkpoint does not list (written before a kill, or evicted before one)."""
    listed = {name for _, _, name in best.get("top", [])}
    for path in ckpt_dir.glob("epoch*.pt") if ckpt_dir.is_dir() else ():
        if TOP_FILE.match(path.name) and path.name not in listed:
            path.unlink(missing_ok=True)


def repair_best(last: dict, ckpt_dir: Path, say: Callable[[str], None] = Console()) -> None:
    """Make ``best.pt`` the checkpoint ``last.pt`` records as the best. ``last.pt`` is written first at the end
    of an epoch; a run killed before ``best.pt`` followed has a ``last.pt`` that says "this epoch is the best"
    and a stale ``best.pt``: ``last.pt`` is then copied to ``best.pt``."""
    selected = (last.get("best") or {}).get("selected") or {}
    if last.get("position") or selected.get("epoch") != last.get("epoch"):
        return  # last.pt is not the best epoch itself: best.pt was written before it
    best_path = ckpt_dir / "best.pt"
    try:
        have = load_checkpoint(best_path, mmap=True).get("epoch")
    except CheckpointError:  # missing or unreadable
        have = None
    if have != last.get("epoch"):
        save_checkpoint({k: v for k, v in last.items() if k != "format"}, best_path)
        if not best_path.parent.joinpath("last.pt").is_file():
            return  # a checkpoint resumed outside its folder: this folder's first best.pt, nothing was stale
        say(f"tdlrt: note: {best_path} was older than the best epoch ({last.get('epoch')}) recorded in last.pt "
            f"(the run was stopped between the two writes); rewritten from last.pt")

