"""Everything `tdlrt train` checks before Hydra writes a file: the run folder holds what its config says.

:func:`prepare_train` takes the command line of `tdlrt train`, and before any folder or file exists

1. expands a sweep (``-m``) into its jobs and composes and validates every one of them, so a bad value in
   job 5 stops the sweep before job 0 starts;
2. turns a resume (``resume=<run folder or checkpoint>``, ``ckpt_path=<run>/checkpoints/last.pt``, or a
   ``hydra.run.dir`` that already holds a checkpoint) into the run's own configuration: the overrides the
   run was started with, the settings it was last resumed with, and of this command only the keys that do
   not change what is trained (:data:`.identity.RESUME_FREE`); any other difference is refused with the keys and
   both values;
3. refuses a run folder that another live process is writing (:class:`RunLock`), a non-empty folder that
   is not a run, and an empty ``hydra.run.dir=``;

and returns the command line to hand to Hydra. A resumed session's Hydra files go to
``.hydra/resume-<time>/``, so nothing the earlier sessions wrote is overwritten.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

from .config import CONFIG_DIR, config_groups, from_dictconfig, settings, unsafe_in
from .errors import CheckpointError, ConfigError
from .files import RUN_FILES, RUN_FOLDERS, override_value
from .identity import (MACHINE_KEYS, changed_defaults_of, check_resume, config_drift, describe_drift, flatten, has_key,
                       is_free)
from .lock import LOCK_NAME, DamagedLock, RunLock, stale_lock_temporary
from .logs import read_csv
from .paths import check_names, check_writable, first_missing, remove_empty

# Overrides that place a run rather than configure it.
PLACEMENT_KEYS = ("hydra.run.dir", "hydra.output_subdir", "ckpt_path", "resume", "checkpoint.auto_resume")
HYDRA_FLAGS = ("--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--shell-completion", "-sc",
               "--version", "--run", "-r", "--package", "-p", "--resolve", "--config-path", "-cp",
               "--config-name", "-cn", "--config-dir", "-cd", "--experimental-rerun")
def saved_config(ckpt: Path, keep: bool = False) -> Tuple[dict, int]:
    """The resolved config a checkpoint was written under and its completed epochs. ``keep=True``: the run
    about to start resumes from this checkpoint and takes what was read here (one read); else its tensors
    are only mapped, not read."""
    from .checkpoint import RESUME_NEEDS, load_checkpoint, require

    state = load_checkpoint(ckpt, keep=keep, mmap=not keep)
    if not isinstance(state.get("config"), dict):
        raise CheckpointError(f"{ckpt} holds no run configuration (written by an older tdlrt?); it cannot be resumed")
    require(state, RESUME_NEEDS, ckpt)
    return state["config"], int(state.get("epoch", 0))


# --------------------------------------------------------------------------- the command line

def _parse(overrides: List[str]):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides(overrides)


def _value(args: List[str], key: str) -> Optional[str]:
    """The value of ``key=...`` on the command line (the last one), quotes removed; None if absent."""
    found = None
    for o in _parse([a for a in args if a.split("=", 1)[0].lstrip("+~") == key]):
        found = o.value()
    return None if found is None else str(found)


def _merge(base: List[str], mine: List[str]) -> List[str]:
    """``base`` overrides with each key that ``mine`` sets replaced by ``mine``'s (order kept)."""
    keys = {o.key_or_group for o in _parse(mine)}
    return [o.input_line for o in _parse(base) if o.key_or_group not in keys] + mine


class Composer:
    """Hydra's composition of ``configs/train.yaml`` with overrides, without running anything."""

    def __enter__(self):
        from hydra import initialize_config_dir
        from omegaconf import OmegaConf

        OmegaConf.register_new_resolver("pid", lambda: str(os.getpid()), replace=True, use_cache=True)
        self._ctx = initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3", job_name="train")
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)

    def __call__(self, overrides: List[str]):
        from hydra import compose

        return compose("train", overrides=overrides, return_hydra_config=True)


def train_config(cfg) -> dict:
    """A composed config as the run will save it (resolved, without ``hydra``), after validation."""
    from omegaconf import OmegaConf

    container = OmegaConf.to_container(cfg, resolve=False)
    container.pop("hydra", None)
    cfg = OmegaConf.create(container)
    from_dictconfig(cfg)  # raises ConfigError naming the key
    return OmegaConf.to_container(cfg, resolve=True)


@dataclass
class Prepared:
    argv: List[str]                        # what Hydra gets
    run_dir: Optional[Path] = None         # run mode: the folder, locked by this process
    fresh: Optional[Path] = None           # the highest folder this command creates (removed if it fails early)
    finished: Optional[str] = None         # the run is finished and nothing is to be done: why (nothing runs)
    sweep: Optional["Sweep"] = None        # -m: the jobs, to say at the end which did not finish


def run_folder_of(ckpt: Path) -> Optional[Path]:
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None


def prepare_train(args: List[str], stamp: Optional[str] = None, writer: bool = True) -> Prepared:
    """Check a `tdlrt train` command line before anything is written; return what Hydra should run.

    ``writer=False`` (a data-parallel process other than the first, which writes to a scratch folder): the
    configuration is rebuilt and checked the same way, but the run folder is neither checked nor locked."""
    if any(a.split("=", 1)[0] in HYDRA_FLAGS for a in args):
        return Prepared(args)  # --help, --cfg job, shell completion: Hydra's own, nothing is trained
    multirun = any(a in ("-m", "--multirun") for a in args)
    overrides = [a for a in args if a not in ("-m", "--multirun")]
    stamp = stamp or time.strftime("%Y-%m-%d_%H-%M-%S")
    with Composer() as compose:
        if multirun:
            sweep_dir, jobs, fresh = _check_sweep(compose, overrides)
            pin = [f"hydra.sweep.dir={override_value(str(sweep_dir))}"] if sweep_dir and _value(overrides, "hydra.sweep.dir") \
                is None else []  # the folder checked and made here (its name holds the time)
            return Prepared(args + pin, sweep=Sweep(sweep_dir, jobs, bool(pin), fresh) if sweep_dir else None)
        return _prepare_run(compose, overrides, stamp, writer)


def _check_sweep(compose, overrides: List[str]) -> Tuple[Optional[Path], List[Tuple[str, Path]], Optional[Path]]:
    """Compose and validate every job of a sweep, refusing all of them if one is bad; make the sweep folder.
    Returns it, every job's swept overrides and folder, and the highest folder made (None, none and None for a
    sweeper that picks its jobs)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    if _value(overrides, "resume") is not None:
        raise ConfigError("resume= continues one run; it cannot be swept (-m): resume each run on its own")
    launcher = _value(overrides, "hydra/launcher")
    if launcher in ("slurm", "submitit_slurm") and not (shutil.which("sbatch") and shutil.which("srun")):
        raise ConfigError(f"hydra/launcher={launcher} needs SLURM (sbatch and srun on PATH): run the sweep on the "
                          f"cluster's login node, or use hydra/launcher=local on this machine")
    sweeper = _value(overrides, "hydra/sweeper")
    if sweeper not in (None, "basic"):
        return None, [], None  # another sweeper chooses its jobs as it goes
    jobs = [job for batch in BasicSweeper.split_arguments(_parse(overrides), None) for job in batch]
    swept = [o.input_line.split("=", 1)[0] for o in _parse(overrides) if o.is_sweep_override()]
    listed = []
    for number, job in enumerate(jobs):
        mine = [j for j in job if j.split("=", 1)[0] in swept]
        try:
            cfg = compose(job)
            train_config(cfg)
            cfg.hydra.job.num = number
            job_dir = Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)
            check_names(job_dir.parent, "hydra.sweep.dir" if _value(overrides, "hydra.sweep.dir") else "task_name")
            check_names(job_dir, "hydra.sweep.subdir")
            last = job_dir / "checkpoints" / "last.pt"
            RunLock(job_dir).check()
            if last.is_file() and cfg.checkpoint.auto_resume:
                saved = saved_config(last)[0]
                kept = changed_defaults_of(saved, [j.split("=", 1)[0].lstrip("+~") for j in job],
                                           lambda k: has_key(cfg, k))
                if kept:  # the job keeps the run's values of keys whose default changed (as the job itself does)
                    cfg = compose(job + [f"{k}={override_value(v)}" for k, v in kept.items()])
                    cfg.hydra.job.num = number
                drift = config_drift(saved, train_config(cfg))
                if drift:
                    raise ConfigError(f"{job_dir} holds a run with other settings: {describe_drift(drift)}")
            listed.append((" ".join(mine), str(cfg.hydra.sweep.subdir)))
        except Exception as exc:
            exc.args = (f"sweep job {number} ({' '.join(mine) or 'its overrides'}) of {len(jobs)}: {_message(exc)}",)
            raise ConfigError(*exc.args) from None
    if jobs:  # every job checked: the sweep folder may be made now (Hydra would make it next)
        sweep_dir = Path(str(cfg.hydra.sweep.dir))
        fresh = first_missing(sweep_dir)
        try:
            sweep_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"hydra.sweep.dir={sweep_dir} cannot be created ({exc.strerror or exc}); choose a "
                              f"writable folder") from None
        return sweep_dir, [(swept_here, sweep_dir / subdir) for swept_here, subdir in listed], fresh
    return None, [], None


@dataclass
class Sweep:
    """A sweep (``-m``) checked before its first job: its folder and each job's swept overrides and folder."""
    folder: Path
    jobs: List[Tuple[str, Path]]
    pinned: bool  # the command did not name hydra.sweep.dir (its name holds the time)
    fresh: Optional[Path] = None  # the highest folder the checks made for it (None: it existed)


def sweep_report(sweep: Optional[Sweep], failed: List[Tuple[int, Path]]) -> Optional[str]:
    """One line on the jobs of a sweep that did not finish (no summary.json: failed, stopped, never started)
    and how to run them; None when all finished. ``failed``: (number, folder) of the jobs that ended with an
    error in this process (a sweeper's own jobs, which ``sweep`` does not list)."""
    jobs = list(sweep.jobs) if sweep is not None else []
    left = [f"job {n} ({swept or 'its overrides'})" for n, (swept, folder) in enumerate(jobs)
            if not (folder / "summary.json").is_file()]
    listed = {folder.resolve() for _, folder in jobs}
    others = [f"job {n} ({folder})" for n, folder in failed if folder.resolve() not in listed]
    left += others
    if not left:
        return None
    total = f" of {len(jobs)}" if jobs and not others else ""  # (a sweeper's jobs are not counted before)
    again = f"the same command with hydra.sweep.dir={sweep.folder}" if sweep is not None and sweep.pinned else \
        "the same command"
    shown = ", ".join(left[:8]) + (f" and {len(left) - 8} more" if len(left) > 8 else "")
    return (f"{len(left)}{total} sweep jobs did not finish: {shown}; once the cause is fixed, {again} runs "
            f"them (finished jobs are skipped, stopped ones resume)")


def _message(exc: BaseException) -> str:
    from .config import error_line
    from .errors import UserError

    return str(exc) if isinstance(exc, UserError) else error_line(exc)


def _resume_target(overrides: List[str]) -> Tuple[Optional[Path], Optional[Path]]:
    """(checkpoint, its run folder) that ``resume=`` or ``ckpt_path=`` names; (None, None) when neither is given.
    A checkpoint outside a run folder has no run folder."""
    resume = _value(overrides, "resume")
    ckpt_arg = _value(overrides, "ckpt_path")
    given = lambda v: v not in (None, "None", "null")  # noqa: E731
    if given(resume) and given(ckpt_arg):
        raise ConfigError(f"resume={resume} and ckpt_path={ckpt_arg} both name where to continue from; give one "
                          f"(resume=<run folder or checkpoint>)")
    target = resume if given(resume) else (ckpt_arg if given(ckpt_arg) else None)
    if target is None:
        return None, None
    path = Path(target).expanduser()
    key = "resume" if resume is not None else "ckpt_path"
    try:
        ckpt = path / "checkpoints" / "last.pt" if path.is_dir() else path
        found = ckpt.is_file()
    except OSError as exc:  # a name too long, a folder that cannot be read
        raise CheckpointError(f"checkpoint not found: {key}={target} ({exc.strerror or exc})") from None
    if not found:
        raise CheckpointError(f"checkpoint not found: {key}={target}" + (
            " (the folder has no checkpoints/last.pt)" if path.is_dir() else " (no such file or run folder)"))
    ckpt = ckpt.resolve()
    run_dir = run_folder_of(ckpt)
    asked = _value(overrides, "hydra.run.dir")
    if run_dir is not None and asked is not None and Path(asked).expanduser().resolve() != run_dir:
        raise ConfigError(f"{key}={target} continues the run in {run_dir}; hydra.run.dir={asked} would split it "
                          f"over two folders (leave hydra.run.dir out)")
    return ckpt, run_dir


def _check_new_folder(folder: Path) -> None:
    """A new run's folder: not locked by a running run, and empty or a tdlrt run's (never someone's files)."""
    RunLock(folder).check()
    if folder.exists() and (not folder.is_dir() or any(p.name != LOCK_NAME and not stale_lock_temporary(p)
                                                       for p in folder.iterdir())) \
            and not (folder / ".hydra").is_dir():
        raise ConfigError(f"hydra.run.dir={folder} is not empty and holds no tdlrt run; choose a new or empty folder")


def _prepare_run(compose, overrides: List[str], stamp: str, writer: bool) -> Prepared:
    mine = [o.input_line for o in _parse(overrides) if o.key_or_group != "resume"]
    ckpt, run_dir = _resume_target(overrides)
    auto = False  # the same job started again in its folder
    cfg = compose(mine)
    folder = Path(str(cfg.hydra.run.dir)).expanduser() if str(cfg.hydra.run.dir).strip() else None
    if folder is None:
        raise ConfigError("hydra.run.dir= is empty; give a folder for the run (or leave it out for a new one "
                          "under outputs/)")
    check_names(folder, "hydra.run.dir" if _value(mine, "hydra.run.dir") is not None else "task_name")
    if run_dir is None and ckpt is None:  # auto-resume: the same job started again in its folder
        last = folder / "checkpoints" / "last.pt"
        if last.is_file():
            if not cfg.checkpoint.auto_resume:
                raise ConfigError(f"{folder} already holds a run (checkpoints/last.pt) and checkpoint.auto_resume="
                                  f"false; resume it with resume={folder} or start in another folder")
            ckpt, run_dir = last.resolve(), folder.resolve()
            auto = True
    if ckpt is not None:
        if run_dir is not None:
            check_run_files(run_dir)
        saved, done = saved_config(ckpt, keep=True)
        given = [o.key_or_group for o in _parse(mine)]
        base = _original_overrides(run_dir) if run_dir is not None else overrides_of(saved, given)
        carried = [f"{k}={override_value(v)}" for k, v in flatten(saved).items()
                   if is_free(k) and k not in given and not any(k.startswith(m) for m in MACHINE_KEYS)
                   and not any(k.startswith(g + ".") for g in given)]
        # ... and the keys whose default changed since the run was made (identity.CHANGED_DEFAULTS), as it had them
        carried += [f"{k}={override_value(v)}" for k, v in changed_defaults_of(saved, given, lambda k: has_key(cfg, k)).items()]
        mine = _merge(_merge(base, carried), mine)
        mine = [o for o in mine if o.split("=", 1)[0].lstrip("+~") not in ("ckpt_path",)] + [f"ckpt_path={override_value(str(ckpt))}"]
        try:
            cfg = compose(mine)
        except Exception as exc:
            raise ConfigError(f"cannot rebuild the configuration of {run_dir or ckpt}: {_message(exc)}") from None
        resumed = train_config(cfg)
        epochs = resumed["epochs"] if resumed["method"]["name"] != "imp" else done  # imp: epochs count per round
        check_resume(saved, resumed, done, epochs, run_dir or ckpt)
        if run_dir is not None and done >= resumed["epochs"] and resumed["method"]["name"] != "imp" \
                and (run_dir / "summary.json").is_file():
            return Prepared(mine, finished=(f"{run_dir} is finished ({done} of {resumed['epochs']} epochs, summary.json "
                                            f"written): nothing to do, nothing was changed (a larger epochs= extends it)"))
        if run_dir is not None:
            mine += [f"hydra.run.dir={override_value(str(run_dir))}"]
            folder = run_dir
        if auto and writer:
            print(f"{ckpt} is there: continuing that run (checkpoint.auto_resume=false turns this off)", file=sys.stderr)
        if run_dir is not None and (run_dir / ".hydra").is_dir():  # keep the Hydra files of earlier sessions
            mine += [f"hydra.output_subdir=.hydra/resume-{stamp}"]
    else:
        train_config(cfg)
        if writer:
            _check_new_folder(folder)
    if not writer:
        return Prepared(mine)
    check_writable(folder, "hydra.run.dir")
    if _value(mine, "hydra.run.dir") is None:  # pin the folder checked here (its name holds the time)
        mine += [f"hydra.run.dir={override_value(str(folder))}"]
    fresh = first_missing(folder)
    try:
        RunLock(folder).acquire()
    except ConfigError:
        remove_empty(folder, fresh)  # the folders made for it (a full disk); never one another process uses
        raise
    return Prepared(mine, folder, fresh)


def overrides_of(saved: dict, given: List[str]) -> List[str]:
    """The overrides that rebuild a checkpoint's own configuration without its run folder (a ``last.pt``
    copied elsewhere): the presets its names select, then every key that makes the run what it is, as it was;
    none under a key or group the command gives (``model=lenet5`` is then compared with the run, as in a folder)."""
    groups = config_groups()
    chosen = [f"{group}={saved[group]['name']}" for group in ("model", "data", "method", "optimizer", "scheduler")
              if isinstance(saved.get(group), dict) and saved[group].get("name") in groups.get(group, ())]
    return chosen + [f"++{k}={override_value(v)}" for k, v in flatten(saved).items()
                     if not is_free(k) and not any(k == g or k.startswith(g + ".") for g in given)]


def _original_overrides(run_dir: Path) -> List[str]:
    """The overrides a run folder's first session was started with (placement keys removed)."""
    from omegaconf import OmegaConf

    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    try:
        listed = [str(o) for o in OmegaConf.to_container(OmegaConf.load(path), resolve=False)]  # never resolved
    except Exception:
        raise ConfigError(f"{path} is unreadable; cannot tell how the run was configured") from None
    listed = [o for o in listed if o.split("=", 1)[0].lstrip("+~") not in PLACEMENT_KEYS]
    check_saved_overrides(listed, path)
    return listed


def check_run_files(run_dir: Path) -> None:
    """A run folder's own files and folders are written in place: none may be a symbolic link (a resumed run
    would append its log, events or Hydra files to wherever it points) or of the wrong kind (a folder where
    metrics.csv belongs)."""
    for name in [n for n in RUN_FILES if n != LOCK_NAME] + list(RUN_FOLDERS):  # (the lock: RunLock's checks)
        path = run_dir / name
        if path.is_symlink():
            raise ConfigError(f"{path} is a symbolic link; a run folder's files are written in place, never "
                              f"through a link (put the file itself there, or resume a copy of the folder)")
        if path.exists() and not (path.is_dir() if name in RUN_FOLDERS else path.is_file()):
            raise ConfigError(f"{path} is not a {'folder' if name in RUN_FOLDERS else 'file'}, as a run folder's "
                              f"{name} is; restore it or move it away before resuming")
    for name in ("metrics.csv", "ranks.csv", "ranks_steps.csv"):  # appended to: they must read as CSV
        read_csv(run_dir / name)
    for folder in RUN_FOLDERS:
        for path in sorted((run_dir / folder).glob("*")) if (run_dir / folder).is_dir() else []:
            if path.is_symlink():
                raise ConfigError(f"{path} is a symbolic link; a run folder's files are written in place, never "
                                  f"through a link (put the file itself there, or resume a copy of the folder)")


def check_saved_overrides(lines: List[str], path: Path) -> None:
    """A run folder is data, never code: its saved overrides, handed back to Hydra on a resume, may only set
    tdlrt's own keys to plain values and pick presets of ``configs/``. Nothing under ``hydra``, no package or
    deletion, no ``_target_`` (or any ``_..`` key), no interpolation: else one line naming the file."""
    known, groups = settings(), config_groups()
    for line in lines:
        reason = _not_a_setting(line, known, groups)
        if reason:
            raise ConfigError(f"{path} holds {line[:80]!r}, {reason}; a run folder's files may only hold tdlrt's "
                              f"own settings (nothing was resumed, nothing it names was run)")


def _not_a_setting(line: str, known: set, groups: dict) -> Optional[str]:
    try:
        (o,) = _parse([line])
    except Exception:
        return "which does not parse as an override"
    key = o.key_or_group
    if "${" in line:
        return "an interpolation (it reads the environment or calls a resolver)"
    if o.package is not None or o.is_delete() or "/" in key or key.split(".")[0] == "hydra" \
            or any(part.startswith("_") for part in key.split(".")) or "_target_" in line:
        return "which is not a tdlrt setting"
    value = o.value()
    if key in groups:
        if not isinstance(value, str) or value not in groups[key]:
            return f"which names no {key} preset of tdlrt ({', '.join(sorted(groups[key]))})"
        return None
    if key not in known:
        return "which is not a tdlrt setting"
    return unsafe_in(value, key) and "which is not a plain value"


def remove_if_fresh(prepared: Optional[Prepared]) -> None:
    """After a refused start: delete the folders this command created, unless a checkpoint got written."""
    if prepared is not None and prepared.sweep is not None and prepared.sweep.fresh is not None:
        folder = prepared.sweep.folder
        if not any(any(folder.rglob(name)) for name in ("*.pt", "metrics.csv", "summary.json")):
            shutil.rmtree(prepared.sweep.fresh, ignore_errors=True)  # no job trained anything: as if never run
        return
    if prepared is None or prepared.fresh is None or prepared.run_dir is None:
        return
    run = prepared.run_dir
    if any((run / "checkpoints").glob("*.pt")) or (run / "metrics.csv").exists() or (run / "summary.json").exists():
        return  # it trained something: keep it
    try:
        held = RunLock(prepared.run_dir).holder()
    except DamagedLock:
        return  # not this command's lock: leave the folder as it is
    if held and not RunLock._mine(held):
        return  # another process writes there now
    shutil.rmtree(prepared.fresh, ignore_errors=True)
