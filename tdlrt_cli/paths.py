"""Checks of a run folder's path before anything is written there, and the clean-up of a refused start."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from .errors import ConfigError


def check_names(folder: Path, key: str) -> None:
    """Refuse a folder the file system cannot hold, by its name alone (before any file call, which would fail
    with "File name too long"): a part of the path longer than a name may be there (NAME_MAX bytes, 255 on
    most), or a path so long that the files written inside it would pass PATH_MAX."""
    path = Path(folder).expanduser().absolute()
    existing, name_max = Path(path.anchor), 255
    for part in path.parts[1:]:
        if existing is not None:
            name_max = pathconf(existing, "PC_NAME_MAX", name_max)
        size = len(os.fsencode(part))
        if size > name_max:
            shown = part if len(part) <= 40 else part[:20] + "..." + part[-8:]
            raise ConfigError(f"{key}: the folder name {shown!r} is {size} bytes long, more than the {name_max} a "
                              f"name may have on this file system; choose a shorter {key}")
        if existing is not None:
            existing = existing / part if (existing / part).is_dir() else None  # the rest is yet to be made
    path_max = pathconf(Path(path.anchor), "PC_PATH_MAX", 4096)
    size = len(os.fsencode(str(path)))
    if size + 256 > path_max:  # room for the longest name written inside
        raise ConfigError(f"{key}: the folder's path is {size} bytes long; the files in it would pass the "
                          f"{path_max} bytes a path may have on this file system; choose a shorter {key}")


def pathconf(path: Path, name: str, default: int) -> int:
    try:
        return int(os.pathconf(path, name))
    except (OSError, ValueError):
        return default


def check_writable(folder: Path, key: str) -> None:
    """Refuse a folder that cannot be created or written: its nearest existing parent must be a writable folder."""
    path = Path(folder).absolute()
    while not path.exists():
        path = path.parent
    if not path.is_dir() or not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={folder} cannot be created: {path} is not a writable folder; choose another "
                          f"{key}")


def first_missing(folder: Path) -> Optional[Path]:
    """The highest folder of ``folder``'s path that does not exist yet (what a failed start should remove)."""
    path, top = Path(folder).absolute(), None
    while not path.exists():
        top, path = path, path.parent
    return top


def remove_empty(folder: Path, top: Optional[Path]) -> None:
    """Remove ``folder`` and its parents up to ``top`` while they are empty."""
    if top is None:
        return
    path = Path(folder).absolute()
    while True:
        try:
            path.rmdir()
        except OSError:
            return
        if path == top or path == path.parent:
            return
        path = path.parent
