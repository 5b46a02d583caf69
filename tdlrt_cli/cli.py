"""`tdlrt <subcommand> ...`: pick the subcommand, hand the rest of argv to its (Hydra) entry point.

Hydra parses everything after the subcommand, so `-m`, `--cfg job`, `--help`, `hydra.*` overrides and
launchers work as in any Hydra application.
"""
from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from typing import List, Optional

from .launch import remove_if_fresh
from .lock import RunLock

SUBCOMMANDS = {
    "train": "train a network (Hydra overrides: model=vgg16 tau=0.1 ...; -m to sweep; --help for config groups)",
    "report": "tables (md, csv, tex) and plots from run folders: tdlrt report outputs/... [out=DIR]",
    "export": "the trained network as plain PyTorch (.pt2) or ONNX: tdlrt export <run folder> [out=FILE]",
    "eval": "test accuracy and the cost report of a run, checkpoint or export: tdlrt eval <path> [data=...]",
    "compress": "a trained network compressed to a target, before / decomposed / fine-tuned: tdlrt compress <run|"
                "checkpoint|weights> target_cr=90 epochs=5",
    "bench": "time a training step: dense vs fixed-rank Tucker vs TDLRT (model=vgg16 batch_size=128 format=json)",
    "completion": "shell completion for tdlrt and its subcommands: eval \"$(tdlrt completion bash)\"",
}

USAGE = "usage: tdlrt <subcommand> [hydra overrides...]\n\nsubcommands:\n" + "\n".join(
    f"  {name:<8} {text}" for name, text in SUBCOMMANDS.items()) + "\n\n`tdlrt <subcommand> --help` for its options."


def _rank_overrides(args: List[str]) -> List[str]:
    """Under ``torchrun`` only the first process writes a run folder; the others get a scratch one."""
    if int(os.environ.get("RANK", "0")) == 0 or any(a in ("-m", "--multirun") for a in args):
        return []
    scratch = tempfile.mkdtemp(prefix=f"tdlrt-rank{os.environ['RANK']}-")
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    return [f"hydra.run.dir='{scratch}'", "hydra.output_subdir=null"]


def _run_hydra(entry, keys=None, listed_by: str = "tdlrt train --cfg job") -> None:
    """Run a Hydra entry point; configuration errors end as one line on stderr and exit status 2
    (TDLRT_DEBUG=1 shows the traceback instead). ``keys``: the command's own schema keys, which an unknown
    key is matched against (default: `tdlrt train`'s); ``listed_by``: the command that lists them."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from .config import error_line
    from .errors import UserError, exit_on_user_error

    os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # let the errors reach us instead of Hydra's printer
    with exit_on_user_error(HydraException, OmegaConfBaseException,
                            describe=lambda exc: str(exc) if isinstance(exc, UserError) else
                            error_line(exc, keys, listed_by)):
        entry()


def main(argv: Optional[List[str]] = None) -> None:
    try:
        _main(argv)
    except BrokenPipeError:  # `tdlrt ... | head`: the reader left; no traceback, the usual exit status
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)


def _main(argv: Optional[List[str]] = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        sys.exit(0 if args else 2)
    if args[0] in ("-V", "--version"):
        from . import __version__

        print(f"tdlrt {__version__}")
        sys.exit(0)
    command, rest = args[0], args[1:]
    import warnings

    from .errors import exit_on_interrupt, interrupt_on_signals

    warnings.formatwarning = lambda message, category, *a, **k: f"tdlrt: warning: {message}\n"
    if command not in SUBCOMMANDS:
        print(f"tdlrt: error: unknown subcommand {command!r}; choose one of: {', '.join(SUBCOMMANDS)}",
              file=sys.stderr)
        sys.exit(2)
    interrupt_on_signals()  # SIGTERM and SIGHUP end a command as Ctrl-C does: one line, exit 128 + the signal
    with exit_on_interrupt(command):
        return _command(command, rest)


def _command(command: str, rest: List[str]) -> None:
    if command in ("report", "export", "eval", "compress"):
        if command == "compress":
            from .compress import main as entry
        elif command == "report":
            from .report import main as entry
        elif command == "export":
            from .export import main as entry
        else:
            from .evaluate import main as entry
        return entry(rest)
    if command == "completion" or command in ("train", "bench") and _installs_completion(rest):
        from .helptext import completion

        shell = rest[0] if command == "completion" and rest else "bash"
        try:
            print(completion(shell.split("=")[-1], SUBCOMMANDS))
        except ValueError as exc:
            print(f"tdlrt: error: {exc}", file=sys.stderr)
            sys.exit(2)
        return
    if command == "train" and any(a in ("-h", "--help") for a in rest):
        from .helptext import train_help

        holder = []
        _run_hydra(lambda: holder.append(train_help([a for a in rest if a not in ("-h", "--help", "-m", "--multirun")])))
        print(holder[0])
        return
    if command == "bench" and any(a in ("-h", "--help") for a in rest):
        from .bench import bench_help

        print(bench_help())
        return
    if command == "bench":
        from dataclasses import asdict

        from .bench import BenchConfig, main as entry
        from .config import flatten

        sys.argv = [f"tdlrt-{command}"] + rest
        return _run_hydra(entry, keys=list(flatten(asdict(BenchConfig()))), listed_by="tdlrt bench --help")
    from .errors import say_stopped, stopped_by
    from .launch import sweep_report
    from .entry import main as entry

    multirun = any(a in ("-m", "--multirun") for a in rest)
    failures: list = []  # (job number, folder) of the sweep jobs that ended with an error
    prepared = _prepare(rest)
    if prepared.finished:
        print(f"tdlrt: {prepared.finished}", file=sys.stderr)
        return
    sys.argv = [f"tdlrt-{command}"] + prepared.argv + _rank_overrides(rest)
    try:
        with _scheduler_refusal(prepared):
            _run_hydra(lambda: entry(failures))
    except SystemExit as exc:
        if exc.code == 2:  # refused after the checks above (data missing, a checkpoint that does not load)
            remove_if_fresh(prepared)
        if multirun and exc.code and not isinstance(exc, SchedulerRefused):  # stopped (Ctrl-C, SIGTERM): the jobs left, and how to run them
            left = sweep_report(prepared.sweep, failures)
            if left:
                print(f"tdlrt: stopped: {left}", file=sys.stderr)
        raise
    except KeyboardInterrupt:  # a signal between two sweep jobs (inside a job, the job says so and exits)
        if not multirun:
            raise
        left = sweep_report(prepared.sweep, failures)
        name, status = stopped_by()
        say_stopped(f"{name} between sweep jobs" + (f"; {left}" if left else ""))
        sys.exit(status)
    finally:
        if prepared.run_dir is not None:
            RunLock(prepared.run_dir).release()
    left = sweep_report(prepared.sweep, failures) if multirun else None
    if left:  # jobs failed (each said why as it ended); the others ran
        print(f"tdlrt: error: {left}", file=sys.stderr)
        sys.exit(2)


class SchedulerRefused(SystemExit):
    """The scheduler refused a sweep's submission: said in one line already (exit status 2)."""


class _WithoutSubmititEcho:
    """sys.stderr, less what submitit itself prints of a refused ``sbatch`` (its stderr, which
    :func:`_scheduler_refusal` says in its one line instead); everything else passes through."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        if sys._getframe(1).f_globals.get("__name__", "") == "submitit.core.utils":
            return len(text)
        return self._stream.write(text)

    def __getattr__(self, name):
        return getattr(self._stream, name)


@contextmanager
def _scheduler_refusal(prepared):
    """A sweep the cluster's scheduler refuses (``sbatch`` exits non-zero: an unknown partition, an account
    over its limits) ends as one line with the scheduler's reason and exit status 2 (and, as any refused start,
    :func:`~tdlrt_cli.launch.remove_if_fresh` removes the sweep folder this command made)."""
    try:
        from submitit.core.utils import FailedJobError
    except ImportError:  # no cluster launcher installed: nothing can be refused by a scheduler
        yield
        return
    stderr, sys.stderr = sys.stderr, _WithoutSubmititEcho(sys.stderr)
    try:
        yield
    except FailedJobError as exc:
        if os.environ.get("TDLRT_DEBUG"):
            raise
        reason = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())[:500] or "no reason given"
        print(f"tdlrt: error: the scheduler refused the sweep: {reason}", file=stderr)
        raise SchedulerRefused(2) from None
    finally:
        sys.stderr = stderr


def _installs_completion(args: List[str]) -> bool:
    """Hydra's ``--shell-completion install=bash`` would register the internal name tdlrt-train; ours
    completes ``tdlrt <subcommand> ...`` (Hydra still answers the queries)."""
    return any(a in ("-sc", "--shell-completion") for a in args) and any(a.startswith("install=") for a in args)


def _prepare(args: List[str]):
    """`tdlrt train`'s checks before Hydra writes a file (:mod:`tdlrt_cli.launch`), errors as one line."""
    from .launch import prepare_train

    holder = []
    _run_hydra(lambda: holder.append(prepare_train(args, writer=int(os.environ.get("RANK", "0")) == 0)))
    return holder[0]


if __name__ == "__main__":
    main()
