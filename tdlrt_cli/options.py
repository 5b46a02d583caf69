"""The ``key=value`` options of `tdlrt export` and `tdlrt eval`, and the checks both make before any work."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import List, Optional

from .errors import ConfigError
from .files import RUN_FILES, RUN_FOLDERS


def check_device(device: str) -> None:
    if not (device in ("auto", "cpu") or re.fullmatch(r"cuda(:\d+)?", device)):
        raise ConfigError(f"device={device} is not one of: auto, cpu, cuda, cuda:N")


def run_file(path: Path) -> Optional[Path]:
    """The run folder whose own file (or a file in whose own folders) ``path`` would replace, or None."""
    path = path.absolute()
    if path.is_symlink() or path.exists():
        path = path.resolve()
    for depth, folder in enumerate(list(path.parents)[:3]):
        is_run = (folder / ".hydra").is_dir() or (folder / "checkpoints").is_dir()
        if not is_run:
            continue
        parts = path.relative_to(folder).parts
        if (depth == 0 and parts[0] in RUN_FILES) or parts[0] in RUN_FOLDERS:
            return folder
    return None


def check_output_file(path: Path, example: str = "model.pt2", key: str = "out") -> None:
    """Fail before any work when ``path`` cannot become an output file: a folder, a folder that does not
    exist, one that takes no new file (tried with a temporary file, removed again), or a file of a run folder's
    own (its checkpoints, logs, metrics, Hydra files), also through a symlink."""
    if path.is_dir():
        raise ConfigError(f"{key}={path} is a folder; give a file name, e.g. {key}={path / example}")
    owner = run_file(path)
    if owner is not None:
        raise ConfigError(f"{key}={path} is a file of the run in {owner} (its checkpoints, logs and metrics are "
                          f"never overwritten); choose another file, e.g. {key}={owner / example}")
    folder = path.parent
    if not folder.is_dir():
        raise ConfigError(f"{key}={path}: the folder {folder} does not exist; create it or choose another {key}=")
    probe = folder / f".tmp-{os.getpid()}-{path.name}"
    try:
        with open(probe, "wb"):
            pass
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"{key}={path}: cannot write into {folder} ({exc.strerror or exc}); choose a writable "
                          f"{key}=") from None


def parse_args(argv: List[str], cls, positional: str):
    """``PATH key=value ...`` into the dataclass ``cls`` (``--help`` prints its fields)."""
    kwargs, names = {}, {f for f in cls.__dataclass_fields__}
    for arg in argv:
        if "=" in arg:
            key, value = arg.split("=", 1)
            if key not in names or key == positional:
                raise ConfigError(f"unknown option {key!r}; options: {', '.join(sorted(names - {positional}))}")
            default = cls.__dataclass_fields__[key].default
            if isinstance(default, bool):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ConfigError(f"{key}={value} is not true or false")
                kwargs[key] = value.lower() in ("true", "1", "yes")
                continue
            try:
                kwargs[key] = type(default)(value) if isinstance(default, (int, float)) else value
            except ValueError:
                raise ConfigError(f"{key}={value} is not a valid {type(default).__name__}") from None
        elif positional not in kwargs:
            kwargs[positional] = arg
        else:
            raise ConfigError(f"unexpected argument {arg!r}")
    if positional not in kwargs:
        raise ConfigError(f"missing the {positional} (a run folder, checkpoint or export file)")
    return cls(**kwargs)
