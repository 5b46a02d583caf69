"""Writing output files so that a reader never sees a half-written one, in strict JSON.

``atomic_write_text``: a temporary file in the same folder, flushed and fsynced, then renamed over the
target, so that a kill at any instant leaves either the old complete file or the new complete one.
``strict_json``: JSON without the non-standard ``NaN``/``Infinity`` tokens (they become ``null``), which
``json.loads`` in other languages and ``jq`` reject.
"""
from __future__ import annotations

import errno
import io
import json
import math
import os
import re
import shlex
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator


# What a run folder holds of its own: written in place by its runs (never through a link), never replaced by the
# output of another command (a resume, report or eval reads them).
RUN_FILES = ("summary.json", "metrics.csv", "train.log", "ranks.csv", "ranks_steps.csv", "start_eval.json",
             "sources.json", ".lock")
RUN_FOLDERS = ("checkpoints", ".hydra", "tensorboard")


def load_json(text: str):
    """``json.loads`` of a file someone may have handed over: nesting too deep for Python's parser is a
    ValueError like any other malformed JSON (not a RecursionError)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def is_disk_full(exc: BaseException, folder: Path) -> bool:
    """Whether a failed write ran out of space: ENOSPC/EDQUOT, or an error from a writer that hides the
    errno (torch.save's zip writer says "unexpected pos") while the folder's device is (nearly) full."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if isinstance(exc, (OSError, RuntimeError)):
        try:
            return shutil.disk_usage(folder).free < 64 * 2 ** 20
        except OSError:
            return False
    return False


def disk_full_error(path: Path):
    from .errors import DiskFull

    run = "; free space and run the command again"
    if path.parent.name == "checkpoints" and path.suffix == ".pt":
        if (path.parent / "last.pt").is_file():
            run = f"; free space, then resume the run: {resume_command(path.parent.parent)}"
        else:  # nothing to resume from: the same run, started again in its folder
            run = (f"; no checkpoint was written yet: free space, then start the run again in its folder: "
                   f"{resume_command(path.parent.parent)}")
    return DiskFull(f"no space left on the device of {path.parent} while writing {path.name}: the previous "
                    f"{path.name} (if any) is kept{run}")


def strict_json(data: Any, indent: int = 2) -> str:
    """``json.dumps`` with NaN/Inf as null and anything else unknown as its ``str``."""
    return json.dumps(_finite(data), indent=indent, default=str, allow_nan=False)


@contextmanager
def atomic_file(path: Path, mode: str = "w") -> Iterator[IO]:
    """``with atomic_file(p, "wb") as fh: ...``: written to a temporary file in the same folder, flushed and
    fsynced, then renamed over ``p``; on any failure the temporary is removed and ``p`` is left as it was
    (a full disk becomes :class:`~tdlrt_cli.errors.DiskFull`)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, mode, **({} if "b" in mode else {"newline": ""})) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if is_disk_full(exc, path.parent):
            raise disk_full_error(path) from None
        raise


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Ctrl-C (SIGINT), SIGTERM and SIGHUP wait until the block is done: for steps that must all happen or none (a
    file and the sidecar that describes it). Outside the main thread: no change."""
    import signal

    from .errors import handle_stop_signals

    received = []
    old = handle_stop_signals(lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        for signum in received[:1]:
            os.kill(os.getpid(), signum)  # delivered now, to the handler that was there before


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_file`)."""
    with atomic_file(path, "w") as fh:
        fh.write(text)


@contextmanager
def atomic_text(path: Path) -> Iterator[io.StringIO]:
    """``with atomic_text(p) as fh: csv.writer(fh)...``: the text is written to ``p`` atomically at the end."""
    buffer = io.StringIO(newline="")
    yield buffer
    atomic_write_text(path, buffer.getvalue())


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except (ProcessLookupError, OverflowError):  # (no process has a number too large for a pid_t)
        return False
    except OSError:
        pass  # it exists, another user's
    return True


def remove_stale_temporaries(folder: Path, pattern: "re.Pattern") -> None:
    """Delete the temporaries a killed process left in ``folder``: the files whose names match ``pattern``
    and whose group ``pid`` names a process no longer alive (no pid in the name: stale)."""
    for tmp in Path(folder).iterdir():
        match = pattern.match(tmp.name)
        if match and tmp.is_file() and (match.group("pid") is None or not pid_alive(int(match.group("pid")))):
            tmp.unlink(missing_ok=True)


def hydra_quoted(text: str) -> str:
    """``text`` single-quoted as a Hydra override value (Hydra reads it back as this string)."""
    escaped = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, text)  # Hydra: backslashes before a quote or the end
    return "'" + escaped.replace("'", "\\'") + "'"


def hydra_value(text: str) -> str:
    """``text`` as a Hydra override value: as it is when Hydra reads it back unchanged, else single-quoted
    (a path with a comma, a space, an equals sign, a quote or a non-ASCII letter; a word Hydra would read as
    null, a boolean or a number)."""
    if re.fullmatch(r"[A-Za-z0-9_./:@+-]+", text) and "/" in text:  # a path (never null, true, 1e3)
        return text
    return hydra_quoted(text)


def override_value(value) -> str:
    """A config value (None, a bool, a number, a string, a list of these) as a Hydra override that reads back
    as the same value: strings single-quoted, a list as ``[a,b,...]``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    return hydra_quoted(str(value))


def resume_command(run_dir: Path) -> str:
    """The shell command that continues the run in ``run_dir``: ``tdlrt train resume=<folder>`` (the run's
    own settings, from its last.pt); without a last.pt, the run's own overrides started again in its folder."""
    run_dir = Path(run_dir)
    if (run_dir / "checkpoints" / "last.pt").is_file():
        return "tdlrt train " + shlex.quote(f"resume={hydra_value(str(run_dir))}")
    overrides = []
    try:
        from omegaconf import OmegaConf

        overrides = [str(o) for o in OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "overrides.yaml"),
                                                            resolve=False)]
    except Exception:  # no Hydra files (library use): the folder alone
        pass
    keep = [o for o in overrides if not o.split("=", 1)[0].lstrip("+~") in
            ("hydra.run.dir", "ckpt_path", "checkpoint.auto_resume")]
    return "tdlrt train " + shlex.join(keep + [f"hydra.run.dir={hydra_value(str(run_dir))}"])
