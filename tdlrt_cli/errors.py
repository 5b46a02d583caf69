"""Errors a user can fix. The CLI prints their message as one line on stderr and exits with status 2
(an interrupted run: 128 + the signal: 130 for SIGINT, 143 for SIGTERM, 129 for SIGHUP)."""
import os
import re
import signal
import sys
import threading
from contextlib import contextmanager


class UserError(Exception):
    """Base class of the errors caused by input: configuration, data, checkpoints."""


class ConfigError(UserError, ValueError):
    """A bad configuration value."""


class DataError(UserError):
    """Data missing or unreadable."""


class CheckpointError(UserError):
    """A checkpoint missing, corrupt, or written by another model."""


class DiskFull(UserError):
    """A write failed for lack of space; the previous version of the file is kept."""


class Interrupted(UserError):
    """The run was stopped by SIGINT, SIGTERM or SIGHUP after writing a checkpoint; exits 128 + the signal number."""

    prefix = "stopped"

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + int(signum)


@contextmanager
def exit_on_user_error(*also, describe=str):
    """Errors a user can fix (``UserError`` and the types in ``also``) end the command as one line on
    stderr, ``tdlrt: error: <describe(exc)>``, and exit status 2; ``TDLRT_DEBUG=1`` raises them instead."""
    try:
        yield
    except (UserError, *also) as exc:
        if os.environ.get("TDLRT_DEBUG"):
            raise
        try:
            print(f"tdlrt: {getattr(exc, 'prefix', 'error')}: {describe(exc)}", file=sys.stderr)
        except OSError:
            pass  # no terminal any more (SIGHUP): the exit status still tells
        sys.exit(getattr(exc, "exit_code", 2))


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # Ctrl-C, a scheduler's pre-emption, a closed terminal
_received = [signal.SIGINT]  # the last stop signal received (a KeyboardInterrupt without one: Ctrl-C)


def handle_stop_signals(handler) -> dict:
    """Install ``handler`` for the stop signals (main thread only; elsewhere nothing); returns the handlers it
    replaced, to put back. A signal the process was started with ignored (``nohup``'s SIGHUP, SIGINT in a
    shell's background job) stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS if signal.getsignal(sig) is not signal.SIG_IGN}


def interrupt_on_signals() -> None:
    """SIGTERM (a scheduler's pre-emption, ``kill``) and SIGHUP (the terminal closed) stop a command the way
    Ctrl-C does: as a ``KeyboardInterrupt`` where the command is, so it ends with its one line and exit
    status 128 + the signal (:func:`stopped_by`), never silently. The training loop installs its own handlers
    (finish the step, write ``last.pt``) and puts these back after (:func:`handle_stop_signals`)."""
    def handle(signum, frame):
        _received[0] = signum
        raise KeyboardInterrupt

    handle_stop_signals(handle)


def stopped_by() -> tuple:
    """The name and exit status of the signal that raised the last ``KeyboardInterrupt``."""
    signum = _received[0]
    return signal.Signals(signum).name, 128 + int(signum)


def say_stopped(line: str) -> None:
    """``tdlrt: stopped: <line>`` on stderr, if there is still one (after SIGHUP there may be none)."""
    try:
        print(f"tdlrt: stopped: {line}", file=sys.stderr)
    except OSError:
        pass


@contextmanager
def exit_on_interrupt(command: str):
    """Ctrl-C, SIGTERM or SIGHUP (``KeyboardInterrupt``, see :func:`interrupt_on_signals`) during `tdlrt
    <command>` ends as one line and exit status 128 + the signal (130 for Ctrl-C), not a traceback;
    ``TDLRT_DEBUG=1`` raises it instead. Outputs are written complete or not at all, so an interrupted
    command leaves each of them as it was or as its complete new version."""
    try:
        yield
    except KeyboardInterrupt:
        if os.environ.get("TDLRT_DEBUG"):
            raise
        name, status = stopped_by()
        say_stopped(f"{name} during tdlrt {command}; no half-written file is left (each output is its earlier "
                    f"version, or its complete new one)")
        sys.exit(status)


def one_line(exc: BaseException) -> str:
    """Hydra's composition and parsing errors as one line naming the option and the choices (an unknown key
    with the keys it may have meant: :func:`tdlrt_cli.config.error_line`, which knows the schema)."""
    text = str(exc)
    missing = re.search(r"Could not find '([^']*)/([^']*)'", text)
    if missing:
        group, option = missing.groups()
        listed = text.split(f"Available options in '{group}':", 1)
        options = re.findall(r"^\t(\S+)$", listed[1].split("Config search path:")[0], re.M) if len(listed) > 1 else []
        choices = f"; choose one of: {', '.join(options)}" if options else ""
        hint = ' (the slurm and local launchers need: pip install "tdlrt[cluster]")' if "launcher" in group else ""
        return f"unknown {group} {option!r}{choices}{hint}"
    override = re.match(r"Could not override '([^']*)'", text)
    if override:
        key = override.group(1)
        return (f"unknown option {key!r}: no such config key (`tdlrt train --cfg job` lists the keys; "
                f"+{key}=... adds a new one)")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("See https")]
    cause = exc.__cause__
    if cause is not None and str(cause).strip():
        lines.append(str(cause).strip().splitlines()[0])
    head = "cannot parse the command line: " if type(exc).__name__ == "OverrideParseException" else ""
    return head + ("; ".join(lines[:2]) or type(exc).__name__)
