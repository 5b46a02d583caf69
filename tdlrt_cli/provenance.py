"""Where a run came from, for ``summary.json``: software versions, source revision, command line, host, start.

Nothing here may fail a run: whatever cannot be found (no git, not a git checkout, no CUDA) is ``None``.
"""
from __future__ import annotations

import datetime
import platform
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

SOURCE_ROOT = Path(__file__).resolve().parent.parent  # the folder holding the tdlrt_cli package
GIT_TIMEOUT_S = 5.0


def _git(args: List[str], cwd: Path) -> Optional[str]:
    """stdout of ``git ARGS`` run in ``cwd``; None when git is missing, fails or takes too long."""
    try:
        proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=GIT_TIMEOUT_S,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def git_state(root: Optional[Path] = None) -> dict:
    """``{"commit": HEAD, "dirty": uncommitted changes?}`` of the checkout holding the tdlrt_cli package.

    Both are None unless ``root`` is inside a git checkout that tracks the package (an installed copy in
    a virtual environment that happens to sit inside some other repository is not that repository).
    """
    root = Path(root) if root is not None else SOURCE_ROOT
    none = {"commit": None, "dirty": None}
    if not root.is_dir() or _git(["ls-files", "--error-unmatch", "--", "tdlrt_cli/__init__.py"], root) is None:
        return none
    commit = _git(["rev-parse", "HEAD"], root)
    if not commit or not commit.strip():
        return none
    status = _git(["status", "--porcelain"], root)
    return {"commit": commit.strip(), "dirty": None if status is None else bool(status.strip())}


_SOURCE_STATE: Optional[dict] = None


def source_state() -> dict:
    """:func:`git_state` of this process's source, taken at the first call and kept: the code a process runs is
    the code it imported, so ``train`` calls this when it starts (a multirun's later jobs, or a checkout that
    changed during a long run, must not record a later commit than the one that ran)."""
    global _SOURCE_STATE
    if _SOURCE_STATE is None:
        _SOURCE_STATE = git_state()
    return dict(_SOURCE_STATE)


def _tdlrt_version() -> Optional[str]:
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("tdlrt")
    except (ImportError, PackageNotFoundError):
        try:
            from . import __version__

            return __version__
        except ImportError:
            return None


def _cudnn_version() -> Optional[int]:
    try:
        import torch

        return torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    except Exception:
        return None


def paste_back(argv: List[str]) -> str:
    """``tdlrt-train a=1 'b=x y'`` (Hydra's argv) as the command a user types: ``tdlrt train a=1 'b=x y'``,
    each argument quoted once for a POSIX shell."""
    head = argv[0] if argv else "tdlrt"
    name = Path(head).name
    words = ["tdlrt", name.split("-", 1)[1]] if name.startswith("tdlrt-") else [head]
    return shlex.join(words + list(argv[1:]))


def provenance(start_time: Optional[float] = None) -> dict:
    """Versions, source revision, command line, host and start time (``start_time``: seconds since the
    epoch, as from ``time.time()``; default: now) of the current process."""
    import torch

    argv = [str(a) for a in sys.argv]
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": _cudnn_version(),
        "tdlrt": _tdlrt_version(),
        "python": platform.python_version(),
        **{f"git_{k}": v for k, v in source_state().items()},
        "argv": argv,                                   # what Hydra parsed: tdlrt-<subcommand> and the overrides
        "command": paste_back(argv),                    # the command line that runs this again, for a shell
        "orig_argv": [str(a) for a in getattr(sys, "orig_argv", argv)],  # the process as started
        "host": socket.gethostname(),
        "started": datetime.datetime.fromtimestamp(time.time() if start_time is None else start_time,
                                                   datetime.timezone.utc).astimezone().isoformat(timespec="seconds"),
    }
