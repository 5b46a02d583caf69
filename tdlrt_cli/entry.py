"""The Hydra entry point of `tdlrt train`: one call runs one run, or one job of a sweep (``-m``).

Turns the composed config into a :class:`~tdlrt_cli.config.TrainConfig`, hands it to
:func:`tdlrt_cli.train.train`, and decides what an error does: a run ends with one line and exit status 2; in a
sweep the job's line is printed, the job is appended to the caller's ``failures`` list and the next job runs.
"""
from __future__ import annotations

import os
import re
import sys
import traceback
import warnings
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from . import identity
from .config import CONFIG_DIR, error_line
from .errors import UserError, exit_on_user_error, one_line, say_stopped, stopped_by
from .faults import faults
from .files import resume_command
from .logs import Console
from .train import train


def keep_changed_defaults(cfg, run_dir: Path, given) -> None:
    """A sweep job started again in a folder holding its run (``checkpoint.auto_resume``): the keys whose default
    changed since that run was made (identity.CHANGED_DEFAULTS) keep the run's saved values unless the job sets
    them, as ``tdlrt train resume=`` does (launch)."""
    from omegaconf import OmegaConf, open_dict

    from .launch import saved_config

    last = run_dir / "checkpoints" / "last.pt"
    if not last.is_file() or not OmegaConf.select(cfg, "checkpoint.auto_resume", default=True):
        return
    try:
        saved = saved_config(last)[0]
    except UserError:
        return  # the checkpoint is checked (and refused, with its line) where it is loaded
    with open_dict(cfg):
        for key, value in identity.changed_defaults_of(saved, given, lambda k: identity.has_key(cfg, k)).items():
            OmegaConf.update(cfg, key, value)


def main(failures: Optional[List[Tuple[int, Path]]] = None) -> None:
    """Hand Hydra the train config's entry point; each sweep job that ends with an error appends
    (job number, run folder) to ``failures`` (the caller's list: the sweep goes on, the caller says at the end
    what did not finish)."""
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from .config import from_dictconfig

    failures = [] if failures is None else failures

    OmegaConf.register_new_resolver("pid", lambda: str(os.getpid()), replace=True, use_cache=True)
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"tdlrt: warning: {message}\n"

    @hydra.main(config_path=CONFIG_DIR, config_name="train", version_base="1.3")
    def _run(cfg) -> Optional[float]:
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
        run_dir = Path(hydra_cfg.runtime.output_dir)
        multirun = hydra_cfg.mode == RunMode.MULTIRUN
        try:
            with exit_on_user_error(HydraException, OmegaConfBaseException,
                                    describe=lambda exc: (f"sweep job {hydra_cfg.job.num} ({run_dir}): " if multirun
                                                          else "") + (str(exc) if isinstance(exc, UserError)
                                                                      else error_line(exc))):
                if multirun:  # a job whose folder holds a run keeps its values of keys whose default changed
                    keep_changed_defaults(cfg, run_dir, [o.split("=", 1)[0].lstrip("+~")
                                                         for o in hydra_cfg.overrides.task])
                tc = from_dictconfig(cfg)
                if multirun:
                    faults.job = int(hydra_cfg.job.num)
                    faults.bug_now(faults.job)
                try:
                    summary = train(tc, run_dir, OmegaConf.to_container(cfg, resolve=True))
                except (MemoryError, RuntimeError) as exc:  # torch's CPU allocator raises a RuntimeError
                    if not (isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in str(exc)):
                        raise
                    said = re.sub(r"^\[enforce fail at [^\]]*\]\s*(err == 0\.\s*)?", "", one_line(exc))
                    said = said if len(said) <= 160 else said[:160].rsplit(" ", 1)[0] + " ..."
                    raise UserError(f"out of memory ({said}); lower batch_size, eval_batch_size, "
                                    f"model.width_mult or the data size") from None
        except SystemExit as exc:
            if exc.code == 2 and multirun:
                failures.append((int(hydra_cfg.job.num), run_dir))
                return None  # the job's error is printed; the sweep goes on, and says at the end what did not finish
            raise
        except Exception:  # a bug: in a sweep, the other jobs still run (TDLRT_DEBUG=1 stops at the first)
            if not multirun or os.environ.get("TDLRT_DEBUG") or int(os.environ.get("WORLD_SIZE", "1")) > 1:
                raise  # (under torchrun every process must stop together)
            traceback.print_exc()
            print(f"tdlrt: error: sweep job {hydra_cfg.job.num} ({run_dir}) failed with an unexpected error (traceback "
                  f"above: a bug in tdlrt, please report it); the sweep goes on", file=sys.stderr)
            failures.append((int(hydra_cfg.job.num), run_dir))
            return None
        except KeyboardInterrupt:  # Ctrl-C, SIGTERM or SIGHUP outside the training loop (data, the summary)
            name, status = stopped_by()
            last = run_dir / "checkpoints" / "last.pt"
            where = f"resume from {last} with: {resume_command(run_dir)}" if last.is_file() else "no checkpoint written"
            line = f"{name} outside a training step; {where}"
            say_stopped(line)
            if run_dir.is_dir():  # (after SIGHUP nobody reads stderr)
                Console(run_dir / "train.log").record(f"tdlrt: stopped: {line}")
            sys.exit(status)
        return summary["test_acc"]

    _run()

