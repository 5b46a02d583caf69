"""One writer per run folder: ``<run>/.lock`` names the process writing a run (:class:`RunLock`)."""
from __future__ import annotations

import errno
import json
import os
import re
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from .errors import ConfigError
from .faults import faults
from .files import is_disk_full, load_json, pid_alive, remove_stale_temporaries

LOCK_NAME = ".lock"
LOCK_TEMPORARY = re.compile(r"^\.lock\.(?P<pid>\d+)\.tmp$")  # a lock being written (by that process)


def stale_lock_temporary(path: Path) -> bool:
    """A lock temporary whose process is gone (killed, or stopped by a full disk before it could remove it)."""
    match = LOCK_TEMPORARY.match(path.name)
    return bool(match) and not pid_alive(int(match.group("pid")))


MAX_PID = 2 ** 31 - 1  # the largest a pid_t holds (Linux allows up to 2**22)


class DamagedLock(ConfigError):
    """A ``.lock`` that no tdlrt process wrote as it is: which process holds the folder cannot be told."""

    def __init__(self, lock: "RunLock", why: str):
        super().__init__(f"{lock.path} is a damaged lock ({why}); if no tdlrt command is writing {lock.run_dir}, "
                         f"remove {lock.path} and run the command again")


@dataclass
class RunLock:
    """``<run>/.lock`` names the process writing the run (PID, host, start time). A second writer is
    refused; a lock left by a process that is gone (same host, PID not running) is taken over with a note.
    The process holding it may take it again (a sweep job, or the check before Hydra and the run itself)."""
    run_dir: Path
    note: List[str] = field(default_factory=list)

    @property
    def path(self) -> Path:
        return Path(self.run_dir) / LOCK_NAME

    def holder(self) -> Optional[dict]:
        """The lock's record, None without a lock; a lock that is not one tdlrt writes (a folder, unreadable,
        not JSON, a PID that is not a positive number a process can have) raises :class:`DamagedLock`."""
        try:
            data = load_json(self.path.read_text())
        except FileNotFoundError:
            return None
        except IsADirectoryError:
            raise DamagedLock(self, "it is a folder") from None
        except OSError as exc:
            raise DamagedLock(self, f"unreadable: {exc.strerror or exc}") from None
        except ValueError:
            raise DamagedLock(self, "not the JSON record tdlrt writes") from None
        if not isinstance(data, dict):
            raise DamagedLock(self, "not the JSON record tdlrt writes")
        pid = data.get("pid")
        if type(pid) is not int or not 0 < pid <= MAX_PID:
            raise DamagedLock(self, f"its pid {json.dumps(pid)} is not a process id")
        if not isinstance(data.get("host", ""), str):
            raise DamagedLock(self, f"its host {json.dumps(data['host'])} is not a host name")
        return data

    def check(self) -> None:
        """Raise if a live process other than this one holds the folder (or the lock is damaged)."""
        held = self.holder()
        if held is None or self._mine(held):
            return
        if held.get("host") == socket.gethostname() and not pid_alive(held["pid"]):
            return
        where = "" if held.get("host") == socket.gethostname() else (
            f" (another host: if that process is gone, delete {self.path})")
        raise ConfigError(f"{self.run_dir} is in use by tdlrt PID {held['pid']} on {held.get('host')} since "
                          f"{held.get('started', '?')}{where}; wait for it to finish or choose another hydra.run.dir")

    def acquire(self) -> "RunLock":
        """Take the folder: the lock file appears complete or not at all (a hard link of a written file)."""
        self.check()
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        tmp = self.path.with_name(f"{LOCK_NAME}.{os.getpid()}.tmp")
        try:
            Path(self.run_dir).mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.run_dir, LOCK_TEMPORARY)
            with open(tmp, "w") as fh:
                if faults.disk_full_in_lock:  # fault injection: the disk is full when the run starts
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                fh.write(json.dumps(record))
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if is_disk_full(exc, Path(self.run_dir)):
                raise ConfigError(f"no space left on the device of {self.run_dir}: cannot start the run there; "
                                  f"free space and run the command again") from None
            raise ConfigError(f"cannot write the run folder {self.run_dir} ({exc.strerror or exc}); choose a "
                              f"writable hydra.run.dir") from None
        try:
            os.link(tmp, self.path)  # fails if the lock exists
        except FileExistsError:
            self.check()  # a live holder that appeared since the first check is refused here
            held = self.holder()
            if not self._mine(held):
                print(f"tdlrt: note: {self.run_dir}: taking over the lock of PID {(held or {}).get('pid', '?')}, "
                      f"which is no longer running", file=sys.stderr)
                os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)
        return self

    @staticmethod
    def _mine(held: Optional[dict]) -> bool:
        return bool(held) and held.get("pid") == os.getpid() and held.get("host") == socket.gethostname()

    def release(self) -> None:
        try:
            mine = self._mine(self.holder())
        except DamagedLock:
            return  # not this process's record: leave it to the user
        if mine:
            self.path.unlink(missing_ok=True)
