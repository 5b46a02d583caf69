"""`tdlrt train`: build data, model and method from the config, train, evaluate, log, checkpoint.

Read top to bottom: :func:`main` (the Hydra entry point) turns the composed config into a
:class:`~tdlrt_cli.config.TrainConfig` and calls :func:`train`, which holds the whole run.
"""
from __future__ import annotations

import math
import os
import re
import signal
import sys
import threading
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import (CHECKPOINT_TEMPORARY, RESUME_NEEDS, load_checkpoint, load_error, require,
                         save_checkpoint)
from .config import CONFIG_DIR, TrainConfig
from .data import build_data
from .distributed import Distributed, init_distributed
from .errors import CheckpointError, ConfigError, Interrupted, UserError, exit_on_user_error
from .faults import faults
from .launch import RunLock, config_drift, describe_drift
from .logs import Console, RunLogger
from .lowrank import LowRankLayer, NonFiniteCore, orthonormality_error
from .methods import factorise, method_of
from .metrics import evaluate, flops_per_image, layer_ranks, parameter_report
from .models import build_model
from .models.pretrained import load_torchvision_weights
from .provenance import provenance, source_state
from .files import remove_stale_temporaries, resume_command
from .runtime import resolve_device, set_threads



# --------------------------------------------------------------------------- set-up helpers

def seed_everything(seed: int, deterministic: bool) -> None:
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Weight decay on conv/linear weights and low-rank cores (decay on a core = decay on W), none on
    biases and normalisation parameters. Low-rank factors are buffers and never reach the optimizer."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    o = cfg.optimizer
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=o.nesterov and cfg.momentum > 0)
    cls = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
    return cls(groups, lr=cfg.lr, betas=tuple(o.betas), eps=o.eps)


def build_scheduler(cfg: TrainConfig, optimizer, steps_per_epoch: int):
    """Per-step schedules (cosine with warm-up, onecycle, step) or per-epoch ReduceLROnPlateau."""
    s, total = cfg.scheduler, max(1, cfg.epochs * steps_per_epoch)
    if s.name == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total, pct_start=s.pct_start)
    if s.name == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=s.factor, patience=s.patience,
                                                          min_lr=s.min_lr)
    warmup = s.warmup_epochs * steps_per_epoch

    def factor(step: int) -> float:
        if s.name == "none":
            return 1.0
        if s.name == "step":
            return s.gamma ** ((step // steps_per_epoch) // s.step_size)
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        floor = s.min_lr / cfg.lr
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def load_dense_weights(model: nn.Module, source: str) -> None:
    """``init_from``: a checkpoint of a dense tdlrt run of the same model, or a file holding a state dict."""
    if not Path(source).is_file():
        raise CheckpointError(f"init_from={source}: file not found")
    try:
        weights = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"init_from={source}: cannot read it ({type(exc).__name__})") from None
    if isinstance(weights, dict) and "model" in weights and "format" in weights:
        weights = weights["model"]
    elif isinstance(weights, dict) and "state_dict" in weights:
        weights = weights["state_dict"]
    try:
        model.load_state_dict(weights)
    except (RuntimeError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"init_from={source} does not match this model: "
                              f"{load_error(exc)}") from None


class Diverged(UserError):
    """The training loss became NaN or Inf, or (``weights``) a step made the low-rank cores NaN or Inf."""

    def __init__(self, step: int, epoch: int, checkpoint: Optional[Path] = None, skipped_all: bool = False,
                 weights: bool = False):
        self.step, self.epoch, self.skipped_all, self.weights = step, epoch, skipped_all, weights
        keep = (f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was written yet")
        if skipped_all:
            super().__init__(f"the training loss was NaN/Inf again at step {step} (epoch {epoch + 1}) after "
                             f"nan_max_skips steps were skipped; stopped, {keep} (lower lr, or raise nan_max_skips)")
        elif weights:
            super().__init__(f"the low-rank cores became NaN/Inf in the optimizer step at step {step} (epoch "
                             f"{epoch + 1}); stopped, {keep} (lower lr)")
        else:
            super().__init__(f"the training loss became NaN/Inf at step {step} (epoch {epoch + 1}); stopped, {keep} "
                             f"(nan_policy=skip skips such steps instead)")


class StopSignals:
    """SIGINT (Ctrl-C), SIGTERM (a scheduler's pre-emption) and SIGHUP (the terminal closed) during training:
    the current step finishes, ``last.pt`` is written, and the run stops with one line naming the command that
    resumes it (also written to train.log: after SIGHUP nobody reads stderr). A second signal stops at once
    (the last checkpoint written stays the one to resume from)."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._old = {}

    def install(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise Interrupted(f"second {signal.Signals(signum).name}: stopped at once; the last checkpoint written "
                              f"is the one to resume from", signum)
        self.signum = signum

    def requested(self, dist: "Distributed") -> Optional[int]:
        """The signal to stop for, agreed by every process (data parallel: one all-reduce)."""
        if not dist.enabled:
            return self.signum
        return int(dist.max_(torch.tensor(self.signum or 0))) or None


class StopRequested(Exception):
    """Raised out of an epoch after the checkpoint of the step reached was written."""

    def __init__(self, signum: int, step: int):
        super().__init__(signum, step)
        self.signum, self.step = signum, step


# --------------------------------------------------------------------------- one epoch

def train_one_epoch(model, loader, optimizer, integrator, scheduler, amp, logger, progress, epoch, global_step,
                    log_every, nan_policy="stop", start: Optional[dict] = None, save_every: int = 0,
                    save: Optional[Callable[[dict], None]] = None, dist: Distributed = Distributed(),
                    stop: Optional[StopSignals] = None, skip_budget: Optional[list] = None,
                    say: Callable[[str], None] = Console(), on_pace: Optional[Callable[[float], None]] = None,
                    plain_every_s: float = 30.0) -> dict:
    """One pass over the training data; each step is ``optimizer.step()`` or, for TDLRT, ``integrator.step()``.

    ``start`` (from a mid-epoch checkpoint) resumes at its batch with its running sums; every
    ``save_every`` steps ``save(position)`` writes a checkpoint that can resume here. ``skip_budget``
    (``[left]``, nan_policy=skip): the steps the run may still skip; at none left it stops like nan_policy=stop.
    ``progress``: a tqdm bar on a terminal (its postfix read from the running sums about once a second), plain
    lines every ``plain_every_s`` otherwise (a file, SLURM's output); ``on_pace(seconds per step)`` once after 5 steps.
    """
    from tqdm import tqdm

    model.train()
    start = start or {}
    first = int(start.get("batch", 0))
    loader.set_epoch(epoch, first)
    device = loader_device(loader)
    loss_sum = start["loss_sum"].to(device) if "loss_sum" in start else torch.zeros((), device=device)
    correct = start["correct"].to(device) if "correct" in start else torch.zeros((), device=device, dtype=torch.long)
    seen, skipped, t0 = int(start.get("seen", 0)), int(start.get("skipped", 0)), time.perf_counter()
    seen_here = 0
    per_step_sched = scheduler is not None and not isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    stepper = integrator if integrator is not None else optimizer
    bad_step = torch.full((), -1, dtype=torch.long, device=device)  # first non-finite loss, no sync

    def check_finite():
        first_bad = int(dist.max_(bad_step.clone()))  # any process's, so all of them stop together
        if first_bad >= 0:
            raise Diverged(first_bad, epoch)

    plain = progress and not sys.stderr.isatty()
    bar = tqdm(loader, desc=f"epoch {epoch + 1}", leave=False, disable=not progress or plain, dynamic_ncols=True,
               initial=first, total=len(loader))
    shown = time.perf_counter()  # when the running figures were last shown (bar postfix or plain line)
    extra = {}  # figures known only at logging steps (the compression rate)

    def running() -> dict:  # one host sync: read only when shown
        return {"loss": f"{float(loss_sum) / max(seen, 1):.3f}", "acc": f"{100 * float(correct) / max(seen, 1):.1f}",
                "img/s": f"{seen_here * dist.world / max(time.perf_counter() - t0, 1e-9):.0f}", **extra}

    for i, (x, y) in enumerate(bar, start=first):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        stepper.zero_grad(set_to_none=True)
        with amp():
            out = model(x)
            loss = F.cross_entropy(out, y)
        if faults.nan_now(global_step + 1):
            loss = loss * float("nan")
        finite = torch.isfinite(loss.detach())
        if nan_policy == "skip" and bool(dist.max_((~finite).long())):  # one host sync per step
            if skip_budget is not None:
                skip_budget[0] -= 1
                if skip_budget[0] < 0:
                    raise Diverged(global_step + 1, epoch, skipped_all=True)
            skipped += 1
            global_step += 1
            continue
        bad_step = torch.where(finite | (bad_step >= 0), bad_step, torch.full_like(bad_step, global_step + 1))
        loss.backward()
        if integrator is None:
            dist.mean_([p.grad for p in model.parameters() if p.grad is not None])
        elif faults.kill_now(global_step + 1, "rank_change"):
            integrator.prepare_step()  # bases augmented to 2r, then killed before the update and truncation
            faults.die()
        try:
            stepper.step()
        except (NonFiniteCore, RuntimeError) as exc:
            # NaN/Inf cores (found before truncation) or a decomposition that failed on them: report the
            # non-finite loss that caused it if there was one, else the weights; never the linear algebra
            if int(bad_step) >= 0:
                raise Diverged(int(bad_step), epoch) from None
            if isinstance(exc, NonFiniteCore):
                raise Diverged(global_step + 1, epoch, weights=True) from None
            raise
        if per_step_sched:
            scheduler.step()
        loss_sum += loss.detach().float() * len(y)
        correct += (out.detach().argmax(1) == y).sum()
        seen += len(y)
        seen_here += len(y)
        global_step += 1
        if faults.kill_now(global_step, "after"):
            faults.die()  # fault injection: like kill -9, no clean-up
        if on_pace is not None and i + 1 - first == 5:
            on_pace((time.perf_counter() - t0) / 5)
        if progress and time.perf_counter() - shown >= (plain_every_s if plain else 1.0):
            shown, figures = time.perf_counter(), running()
            if plain:
                say(f"epoch {epoch + 1}: step {i + 1}/{len(loader)} | loss {figures['loss']} acc {figures['acc']}% "
                    f"| {figures['img/s']} img/s" + (f" | c.r. {extra['c.r.']}" if extra else ""))
            else:
                bar.set_postfix(figures, refresh=False)
        faults.signal_now(global_step)
        if (stop is not None and i + 1 < len(loader) and (not dist.enabled or global_step % log_every == 0)
                and stop.requested(dist)):
            check_finite()  # a checkpoint is only written from finite weights
            if save is not None:
                save({"epoch": epoch, "batch": i + 1, "global_step": global_step, "loss_sum": loss_sum.detach().cpu(),
                      "correct": correct.detach().cpu(), "seen": seen, "skipped": skipped})
            bar.close()
            raise StopRequested(stop.requested(dist), global_step)
        logging_step = global_step % log_every == 0 or i == len(loader) - 1
        if integrator is not None and integrator.last_info and not logging_step:
            log_rank_change(logger, model, global_step, epoch + 1)  # rank curves exact at any run length
        if logging_step:
            check_finite()
            rate = seen_here / (time.perf_counter() - t0)
            values = {"train/loss_step": float(loss.detach()), "train/lr": optimizer.param_groups[0]["lr"],
                      "train/acc_step": 100.0 * float((out.detach().argmax(1) == y).float().mean()),
                      "train/acc": 100.0 * float(correct) / max(seen, 1)}
            postfix = {"loss": f"{float(loss_sum) / seen:.3f}", "acc": f"{100 * float(correct) / seen:.1f}",
                       "img/s": f"{rate * dist.world:.0f}"}
            if integrator is not None:
                report = parameter_report(model)
                values["compression/rate"] = report["compression_rate"]
                if integrator.budget is not None:  # target rule: the compression scheduled for this step
                    values["compression/target"] = 100.0 * integrator.budget.compression(integrator.steps)
                else:
                    values["compression/tau"] = integrator.last_tau  # the tolerance that decided these ranks
                postfix["c.r."] = extra["c.r."] = f"{report['compression_rate']:.1f}%"
                values.update(log_ranks(logger, model, global_step, epoch + 1))
                for layer_name, layer in lowrank_named(model):
                    values[f"diag/ortho_error/{layer_name}"] = orthonormality_error(layer)
                for name, info in integrator.last_info.items():
                    values[f"diag/trunc_error/{name}"] = info.rel_error
                    for mode, s in info.min_singular.items():
                        values[f"diag/min_sigma/{name}/{mode}"] = s
            logger.scalars(global_step, values)
            bar.set_postfix(postfix)
        if save is not None and save_every and global_step % save_every == 0 and i + 1 < len(loader):
            check_finite()  # a checkpoint is only written from finite weights
            save({"epoch": epoch, "batch": i + 1, "global_step": global_step, "loss_sum": loss_sum.detach().cpu(),
                  "correct": correct.detach().cpu(), "seen": seen, "skipped": skipped})
    bar.close()
    dt = time.perf_counter() - t0
    if skipped:
        say(f"tdlrt: warning: skipped {skipped} step(s) with a non-finite loss in epoch {epoch + 1}")
    totals = torch.stack([loss_sum.double(), correct.double(), torch.tensor(float(seen), device=device,
                                                                            dtype=torch.float64)])
    loss_total, correct_total, seen_total = dist.sum_(totals).tolist()
    return {"train_loss": loss_total / max(seen_total, 1), "train_acc": 100.0 * correct_total / max(seen_total, 1),
            "epoch_time_s": dt, "images_per_s": seen_here * dist.world / max(dt, 1e-9), "global_step": global_step}


def log_rank_change(logger, model, global_step: int, epoch: int) -> None:
    """A row per layer in ranks_steps.csv when some rank changed since the last rows (integers: no sync)."""
    ranks = layer_ranks(model)
    if ranks != getattr(logger, "last_ranks", None):
        logger.step_ranks(global_step, epoch, ranks)
        logger.last_ranks = ranks


def log_ranks(logger, model, global_step: int, epoch: int) -> dict:
    """Every layer's per-mode ranks at ``global_step``: a row per layer in ranks_steps.csv, and the
    TensorBoard scalars ``ranks/<layer>/<mode>`` (returned, for the caller's batch of scalars)."""
    ranks = layer_ranks(model)
    logger.step_ranks(global_step, epoch, ranks)
    logger.last_ranks = ranks
    return {f"ranks/{name}/{mode}": value for name, r in ranks.items() for mode, value in zip(("out", "in", "kh", "kw"), r)}


def start_block(cfg: TrainConfig, run_dir: Path, data, model, total_epochs: int, device: torch.device,
                resumed_at: Optional[int]) -> list:
    """The lines a run starts with: where it writes, and the settings that decide what it trains."""
    def count(loader) -> str:
        n = getattr(loader, "num_examples", None)
        return f"{n:,}" if n is not None else "?"

    m, o = cfg.method, cfg.optimizer
    method = m.name + (f" tau {cfg.tau}" if cfg.tau is not None else "") + (
        f" rank_frac {m.rank_frac}" if m.rank_frac is not None else "") + (
        f" target_cr {m.target_cr}%" if m.target_cr is not None else "")
    params = sum(p.numel() for p in model.parameters())
    return [
        f"tdlrt train: run folder {run_dir}" + (f" (resumed at epoch {resumed_at + 1})" if resumed_at is not None else ""),
        f"  model {cfg.model.name}" + (f" x{cfg.model.width_mult}" if cfg.model.width_mult != 1 else "")
        + f" ({params:,} trainable parameters) | data {cfg.data.name}: {count(data.train)} train"
        + (f", {count(data.val)} validation" if data.val is not None else "")
        + (f" (of the first {cfg.data.limit_train:,}: data.limit_train)" if cfg.data.limit_train else "")
        + f", {count(data.test)} test"
        + f" | method {method}",
        f"  optimizer {o.name} lr {cfg.lr} weight_decay {cfg.weight_decay}, scheduler {cfg.scheduler.name} | "
        f"{total_epochs} epoch{'s' if total_epochs != 1 else ''} of {len(data.train)} steps, batch {cfg.batch_size} | "
        f"device {device}{threads_note() if device.type == 'cpu' else ''}, {cfg.precision} "
        f"| seed {cfg.seed}",
    ]


def threads_note() -> str:
    n = torch.get_num_threads()
    return f" ({n} thread{'s' if n != 1 else ''})"


def pace_note(device: torch.device, steps: int, say: Callable[[str], None]) -> Callable[[float], None]:
    """After the first steps: on a CPU, how long an epoch will take when that is long, and what is faster."""
    def note(seconds_per_step: float) -> None:
        epoch_s = seconds_per_step * steps
        if device.type == "cpu" and epoch_s > 600:
            hours, minutes = divmod(round(epoch_s / 60), 60)
            say(f"tdlrt: note: an epoch takes about {f'{hours} h ' if hours else ''}{minutes} min on this CPU "
                f"({seconds_per_step:.1f} s per step, {torch.get_num_threads()} threads); device=cuda on a GPU, "
                f"+experiment=quick for a small run, or threads=N if other jobs share this machine's cores")
    return note


def hparams_of(config: dict) -> dict:
    """The settings shown in TensorBoard's HParams tab (the keys a sweep varies)."""
    from .config import flatten

    keep = ("model.name", "model.width_mult", "data.name", "method.name", "tau", "lr", "weight_decay", "momentum",
            "epochs", "batch_size", "seed", "optimizer.name", "scheduler.name", "precision", "method.rank_frac",
            "method.target_cr", "method.augment_every", "method.tau_warmup_epochs", "method.r_max_frac")
    flat = flatten(config)
    return {k: flat[k] for k in keep if k in flat and flat[k] is not None}


def pinned_modes(model) -> dict:
    """Adapted modes whose final rank sits at a bound: ``{"r_max": [...], "r_min": [...]}`` of "layer/mode".
    At r_max the tolerance never cut that mode (the reported compression is the cap's, not an adaptation);
    at r_min the tolerance took all it was allowed to."""
    pinned = {"r_max": [], "r_min": []}
    for name, layer in lowrank_named(model):
        for i, (r, (lo, hi), adapted) in enumerate(zip(layer.ranks, layer.rank_bounds, layer.adapted)):
            if not adapted or lo == hi:
                continue
            mode = ("out", "in", "kh", "kw")[i] if layer.order == 4 else ("out", "in")[i]
            if r >= min(hi, layer.full_shape[i]):
                pinned["r_max"].append(f"{name}/{mode}")
            elif r <= lo:
                pinned["r_min"].append(f"{name}/{mode}")
    return pinned


def warn_pinned(pinned: dict, total: int, say: Callable[[str], None] = Console(), target: bool = False) -> None:
    def listed(modes: list) -> str:
        return ", ".join(modes[:6]) + (", ..." if len(modes) > 6 else "")

    if target:  # the target rule: a mode at a bound is the budget's choice, worth a note, not a warning
        if pinned["r_max"]:
            say(f"tdlrt: note: {len(pinned['r_max'])} of {total} adapted modes finished at their cap "
                f"({listed(pinned['r_max'])}): the budget kept them whole (method.r_max_frac raises the cap)")
        return
    if pinned["r_max"]:
        say(f"tdlrt: warning: {len(pinned['r_max'])} of {total} adapted modes finished at r_max "
            f"({listed(pinned['r_max'])}): their ranks were never cut below the cap; a larger tau, a larger "
            f"method.r_max_frac or more epochs adapts them")
    if pinned["r_min"]:
        say(f"tdlrt: warning: {len(pinned['r_min'])} of {total} adapted modes finished at r_min "
            f"({listed(pinned['r_min'])}): tau may be too large for them (or method.r_min too high)")


def lowrank_named(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LowRankLayer)]


def loader_device(loader) -> torch.device:
    return getattr(loader, "device", None) or torch.device("cpu")


# --------------------------------------------------------------------------- the run

def train(cfg: TrainConfig, run_dir: Path, config_dict: Optional[dict] = None) -> dict:
    start_time = time.time()
    source_state()  # the source revision that is running, recorded before anything can change it
    device = resolve_device(cfg.device)
    dist = init_distributed(device)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    seed_everything(cfg.seed, cfg.deterministic)
    set_threads(cfg.threads)
    run_dir = Path(run_dir)
    lock = RunLock(run_dir).acquire() if dist.main else None  # one writer per run folder
    thread_hook = threading.excepthook

    def quiet_if_folder_gone(args) -> None:  # TensorBoard's writer thread, say: the main thread reports it
        if not (issubclass(args.exc_type, OSError) and not run_dir.is_dir()):
            thread_hook(args)

    threading.excepthook = quiet_if_folder_gone
    try:
        return _train(cfg, run_dir, config_dict, dist, device, start_time)
    except Exception:
        if dist.main and not run_dir.is_dir():  # whatever failed, it failed because the folder went away
            raise UserError(f"the run folder {run_dir} disappeared during the run (deleted or moved): stopped, "
                            f"nothing more can be written there; start the run again") from None
        raise
    finally:
        if lock is not None:
            lock.release()
        if run_dir.is_dir():  # (gone: writer threads may still fail on their way out; keep them quiet)
            threading.excepthook = thread_hook


def finished_summary(run_dir: Path, resume: Optional[dict], ckpt_path: Optional[str], epochs: int) -> Optional[dict]:
    """The summary of a run resumed from its own last.pt that has nothing left to train (all ``epochs`` done,
    summary.json written); None otherwise (also when summary.json does not parse: the run writes it anew)."""
    import json

    if resume is None or int(resume.get("epoch", 0)) < epochs or resume.get("position") or resume.get("method") == "imp":
        return None
    if Path(ckpt_path).resolve() != (run_dir / "checkpoints" / "last.pt").resolve():
        return None
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and "test_acc" in summary else None


def _train(cfg: TrainConfig, run_dir: Path, config_dict: Optional[dict], dist: Distributed, device: torch.device,
           start_time: float) -> dict:
    say = Console(run_dir / "train.log") if dist.main else (lambda line: None)
    last = run_dir / "checkpoints" / "last.pt"  # (only process 0's run folder is the real one)
    left_behind = dist.broadcast_object(str(last) if last.is_file() and cfg.ckpt_path is None else None)
    if left_behind:  # the same job started again in its folder (SLURM requeue, restart)
        if not cfg.checkpoint.auto_resume:
            raise ConfigError(f"{run_dir} already holds a run (checkpoints/last.pt); resume it with "
                              f"resume={run_dir} or start in another folder")
        cfg.ckpt_path = str(left_behind)
    method = method_of(cfg)  # what the method adds to the loop (integrator, pruning, rounds)
    resume = load_checkpoint(cfg.ckpt_path) if cfg.ckpt_path else None
    done = dist.broadcast_object(finished_summary(run_dir, resume, cfg.ckpt_path, method.epochs()) if dist.main else None)
    if done is not None:  # (a sweep run again: its finished jobs; the CLI says so before Hydra for a single run)
        if dist.main:
            print(f"tdlrt: {run_dir} is finished ({resume['epoch']} of {method.epochs()} epochs, summary.json "
                  f"written): nothing to do; its checkpoints, logs and summary are left as they are", file=sys.stderr)
        return done
    if left_behind:
        say(f"{left_behind} is there: continuing that run (checkpoint.auto_resume=false turns this off)")
    if resume is not None and not method.resumable:
        raise ConfigError(f"method={cfg.method.name} runs cannot be resumed (masks and rewind point are not "
                          f"checkpointed); start it again in a new folder")
    if resume is not None and config_dict is not None and isinstance(resume.get("config"), dict):
        drift = config_drift(resume["config"], config_dict)
        if drift:  # (the CLI refuses this before Hydra writes a file; here for library use and sweep jobs)
            raise ConfigError(f"resuming {cfg.ckpt_path} would change what is trained: {describe_drift(drift)}")
    if resume is not None and int(resume.get("epoch", 0)) > method.epochs():
        raise ConfigError(f"epochs={cfg.epochs} but the run in {run_dir} has completed {resume['epoch']} epochs "
                          f"(a resume may extend epochs, not shorten them)")

    data = build_data(cfg.data, cfg.batch_size, cfg.eval_batch_size, device, cfg.seed)
    data.train.shard(dist.rank, dist.world)
    data.test.shard(dist.rank, dist.world)
    if data.val is not None:
        data.val.shard(dist.rank, dist.world)
    try:
        model = build_model(cfg.model.name, data.in_channels, data.num_classes, data.image_size, cfg.model.width_mult)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if cfg.init_from == "torchvision":
        copied, kept = load_torchvision_weights(model, cfg.model.name)
        say(f"init_from=torchvision: copied {copied} layers, {kept} keep their initialisation")
    elif cfg.init_from:
        load_dense_weights(model, cfg.init_from)

    factorise(cfg, model, torch.Generator().manual_seed(cfg.seed))
    model.to(device)
    if resume is None:
        method.start(model, lambda: next(iter(data.train)))  # snip, grasp: masks from one batch
    dist.sync_model(model)  # every replica starts from process 0's weights (and pruning masks)
    optimizer = build_optimizer(cfg, model)
    method.stepper(model, optimizer, len(data.train), dist)  # tdlrt, dlrt: the integrator takes the steps
    integrator = method.integrator
    scheduler = build_scheduler(cfg, optimizer, len(data.train))
    amp = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if cfg.precision == "bf16" else nullcontext
    total_epochs = method.epochs()  # imp: every round's epochs

    # best.pt: the epoch with the best validation accuracy (data.val_split > 0), else the best test accuracy
    select_by = "val_acc" if data.val is not None else "test_acc"
    start_epoch, global_step, best, position = 0, 0, {"metric": -1.0, "max_test": -1.0, "selected": None}, None
    before = float(resume.get("elapsed_s") or 0.0) if resume is not None else 0.0  # earlier sessions' wall time

    def elapsed() -> float:
        """The run's wall time: the earlier sessions' (up to the checkpoint resumed from) and this one's."""
        return before + time.time() - start_time
    skip_budget = [cfg.nan_max_skips]  # nan_policy=skip: the steps the run may still skip
    ckpt_dir = run_dir / "checkpoints"
    if resume is not None:
        start_epoch, global_step, best, position = restore(resume, cfg, model, optimizer, integrator, scheduler)
        skip_budget[0] -= int(resume.get("skipped_steps", 0))
        where = f" step {global_step}" if position else ""
        say(f"resuming {cfg.ckpt_path} at epoch {start_epoch + 1}{where}")
        if dist.main:
            repair_best(resume, ckpt_dir, say)
            remove_unlisted_top(ckpt_dir, best)
    shape = (data.in_channels, data.num_classes, data.image_size)
    if dist.main:
        # (a run started again in its folder before it wrote a checkpoint logs from the start: RunLogger)
        logger = RunLogger(run_dir, resume_epoch=start_epoch if resume is not None else None,
                           resume_step=global_step if resume is not None else None)
        if ckpt_dir.is_dir():
            remove_stale_temporaries(ckpt_dir, CHECKPOINT_TEMPORARY)
    else:  # data parallel: only the first process writes logs and checkpoints
        logger = RunLogger(run_dir, tensorboard=False, write=False)

    def save_position(pos: dict) -> None:
        if dist.main:
            save_checkpoint(checkpoint_state(cfg, config_dict, model, optimizer, integrator, scheduler, pos["epoch"],
                                             pos["global_step"], best, pos, shape,
                                             skipped_steps=cfg.nan_max_skips - skip_budget[0], elapsed_s=elapsed()),
                            ckpt_dir / "last.pt")

    test_loss, test_acc = float("nan"), float("nan")
    full_shapes = {n: list(m.full_shape) for n, m in model.named_modules() if hasattr(m, "full_shape")}
    if integrator is not None and resume is None and dist.main:  # the starting ranks, at step 0
        logger.scalars(0, {**log_ranks(logger, model, 0, 0),
                           "compression/rate": parameter_report(model)["compression_rate"]})
    for line in start_block(cfg, run_dir, data, model, total_epochs, device, start_epoch if resume is not None else None):
        say(line)
    stop = StopSignals().install()  # Ctrl-C / SIGTERM / SIGHUP: finish the step, write last.pt, one line, exit 128+N

    def stopped(signum: int, step: int, epoch: int) -> Interrupted:
        logger.close()
        line = (f"{signal.Signals(signum).name} at step {step} (epoch {epoch + 1}): {ckpt_dir / 'last.pt'} "
                f"written; resume with: {resume_command(run_dir)}")
        if isinstance(say, Console):
            say.record(f"tdlrt: stopped: {line}")
        return Interrupted(line, signum)

    try:
        for epoch in range(start_epoch, total_epochs):
            if method.before_epoch(epoch, model):  # imp, a new round: new optimizer and schedule, best.pt anew
                optimizer = build_optimizer(cfg, model)
                scheduler = build_scheduler(cfg, optimizer, len(data.train))
                drop_top(ckpt_dir, best, dist.main)
                best = {"metric": -1.0, "max_test": -1.0, "selected": None}  # best.pt: the best of the pruned network
            try:
                stats = train_one_epoch(model, data.train, optimizer, integrator, scheduler, amp, logger,
                                        cfg.progress and dist.main, epoch, global_step, cfg.log_every_n_steps,
                                        cfg.nan_policy, start=position if epoch == start_epoch else None,
                                        save_every=cfg.checkpoint.every_n_steps, save=save_position, dist=dist,
                                        stop=stop, skip_budget=skip_budget, say=say,
                                        on_pace=pace_note(device, len(data.train), say) if epoch == start_epoch else None)
            except StopRequested as exc:
                raise stopped(exc.signum, exc.step, epoch) from None
            except Diverged as exc:
                last = ckpt_dir / "last.pt"
                logger.close()
                raise Diverged(exc.step, exc.epoch, last if last.is_file() else None, exc.skipped_all,
                               exc.weights) from None
            global_step = stats.pop("global_step")
            dist.sync_batchnorm(model)  # running statistics of process 0 (each process saw its own batches)
            test_loss, test_acc = evaluate(model, data.test, amp, device, dist)
            val = {} if data.val is None else dict(zip(("val_loss", "val_acc"), evaluate(model, data.val, amp, device, dist)))
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step(val.get("val_loss", test_loss))
            report = parameter_report(model)
            row = {"epoch": epoch + 1, "step": global_step, **stats, **val, "test_loss": test_loss, "test_acc": test_acc,
                   "lr": optimizer.param_groups[0]["lr"], "params": report["params"],
                   "compression_rate": report["compression_rate"],
                   "compression_rate_total": report["compression_rate_total"]}
            logger.epoch(row)
            logger.ranks(epoch + 1, layer_ranks(model), full_shapes)
            logger.scalars(global_step, {"epoch/epoch": epoch + 1,
                                         "epoch/train_loss": stats["train_loss"], "epoch/train_acc": stats["train_acc"],
                                       "epoch/test_loss": test_loss, "epoch/test_acc": test_acc,
                                       "epoch/lr": row["lr"], "epoch/time_s": stats["epoch_time_s"],
                                       "epoch/images_per_s": stats["images_per_s"],
                                       "epoch/compression_rate": report["compression_rate"],
                                       **{f"epoch/{k}": v for k, v in val.items()}})
            metric = val["val_acc"] if val else test_acc
            ranks_now = layer_ranks(model) if integrator is not None else None
            if ranks_now is not None and best.get("ranks") not in (None, ranks_now):
                # the ranks moved: an earlier best is another network; selection restarts at these ranks, so
                # best.pt always has the final ranks (one network: its accuracy, c.r., params and FLOPs)
                drop_top(ckpt_dir, best, dist.main)
                best = {"metric": -1.0, "max_test": -1.0, "selected": None}
            improved = metric > best["metric"]
            top, evicted = top_k(best.get("top", []), metric, epoch + 1, select_by, cfg.checkpoint.keep_top_k)
            best = {"metric": max(best["metric"], metric), "max_test": max(best["max_test"], test_acc),
                    "selected": ({"by": select_by, "epoch": epoch + 1, "val_acc": val.get("val_acc"), "test_acc": test_acc,
                                  "compression_rate": report["compression_rate"]}
                                 if improved else best["selected"]),
                    "ranks": ranks_now, "top": top}
            state = checkpoint_state(cfg, config_dict, model, optimizer, integrator, scheduler, epoch + 1, global_step,
                                     best, data_shape=shape, skipped_steps=cfg.nan_max_skips - skip_budget[0],
                                     elapsed_s=elapsed())
            if dist.main:  # last.pt first: if a kill comes before best.pt, last.pt is the best and a resume copies it
                if any(name == top_name(epoch + 1, select_by, metric) for _, _, name in top):
                    save_checkpoint(state, ckpt_dir / top_name(epoch + 1, select_by, metric))  # before last.pt lists it
                save_checkpoint(state, ckpt_dir / "last.pt")
                if improved:
                    save_checkpoint(state, ckpt_dir / "best.pt")
                for name in evicted:
                    (ckpt_dir / name).unlink(missing_ok=True)
            say(f"epoch {epoch + 1}/{total_epochs}: train loss {stats['train_loss']:.4f} acc {stats['train_acc']:.2f}% "
                + (f"| val acc {val['val_acc']:.2f}% " if val else "")
                + f"| test loss {test_loss:.4f} acc {test_acc:.2f}% | {stats['images_per_s']:.0f} img/s "
                + f"| {stats['epoch_time_s']:.0f} s"
                + (f" | c.r. {report['compression_rate']:.1f}%" if cfg.method.name != "dense" else ""))
            signum = stop.requested(dist)
            if signum and epoch + 1 < total_epochs:
                raise stopped(signum, global_step, epoch)
    finally:
        stop.restore()

    if math.isnan(test_acc) or resume is not None and start_epoch >= total_epochs:  # epochs=0: the start
        test_loss, test_acc = evaluate(model, data.test, amp, device, dist)
    report = parameter_report(model)
    example = next(iter(data.train))[0][:2].to(device)
    pinned = pinned_modes(model) if integrator is not None else None
    summary = {
        "test_acc": test_acc, "test_loss": test_loss,  # of the last checkpoint (the network at the end)
        "test_acc_last": test_acc,
        # of best.pt, chosen on the validation split (data.val_split > 0); None without one
        "test_acc_val_selected": (best["selected"] or {}).get("test_acc") if select_by == "val_acc" else None,
        # max over epochs (rank-adaptive methods: the epochs at the final ranks): chosen on the test set, optimistic
        "best_test_acc": max(best["max_test"], test_acc),
        "selected": best["selected"],  # the epoch of best.pt: by val_acc (data.val_split > 0) or by test_acc
        "epochs": total_epochs, "steps": global_step, **report, "ranks": layer_ranks(model),
        "pinned_modes": pinned,
        **flops_per_image(model, example), "wall_time_s": elapsed(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "run_dir": str(run_dir), "config": config_dict,
        "provenance": provenance(start_time),
    }
    if cfg.cost_report and dist.main:
        summary["cost"] = run_cost_report(cfg, model, data, device, report)
    if dist.enabled:
        prints = dist.fingerprints(model)
        summary["data_parallel"] = {"world_size": dist.world, "replicas_identical": len(set(prints)) == 1,
                                    "fingerprints": prints}
        if len(set(prints)) != 1:
            warnings.warn(f"data-parallel replicas differ at the end of the run (fingerprints {prints})")
    logger.summary(summary)
    logger.hparams(hparams_of(config_dict or {}), {
        "test_acc": test_acc, "test_acc_val_selected": summary["test_acc_val_selected"],
        "compression_rate": report["compression_rate"], "params": report["params"]})
    logger.close()
    dist.close()
    if not dist.main:
        return summary
    if pinned is not None:
        warn_pinned(pinned, sum(sum(m.adapted) for _, m in lowrank_named(model)), say,
                    target=cfg.method.target_cr is not None)
    chosen = summary["test_acc_val_selected"]
    say(f"done: test acc {test_acc:.2f}% at the end"
        + (f", {chosen:.2f}% with best.pt (epoch {best['selected']['epoch']}, chosen on the validation split)"
           if chosen is not None else f" (max over epochs {summary['best_test_acc']:.2f}%, chosen on the test set)")
        + (f", c.r. {report['compression_rate']:.1f}%" if cfg.method.name != "dense" else "")
        + f", outputs in {run_dir}")
    return summary


def run_cost_report(cfg: TrainConfig, model: nn.Module, data, device: torch.device, params: dict) -> dict:
    """The cost report of the trained network against the dense one of the same architecture (`tdlrt eval`
    prints the same report for any run, checkpoint or export)."""
    from .cost import cost_report
    from .runs import dense_reference

    dense = dense_reference(cfg.model.name, (data.in_channels, data.num_classes, data.image_size),
                            cfg.model.width_mult, device)
    example = next(iter(data.test))[0][:128].to(device)
    return cost_report(model.eval(), dense, example, params, repeat=cfg.cost_repeat, latency_too=cfg.cost_latency)


def checkpoint_state(cfg, config_dict, model, optimizer, integrator, scheduler, epoch, global_step, best,
                     position: Optional[dict] = None, data_shape: Optional[tuple] = None, skipped_steps: int = 0,
                     elapsed_s: float = 0.0) -> dict:
    """Everything a resumed run needs: ``epoch`` completed epochs, and with ``position`` the place inside
    the next one (batch, running loss and accuracy sums) for checkpoints written mid-epoch; ``elapsed_s``:
    the run's wall time so far, over all its sessions (a resumed run's summary adds its own)."""
    return {
        "epoch": epoch, "global_step": global_step, "best_test_acc": best["max_test"], "best": best,
        "position": position, "skipped_steps": skipped_steps, "elapsed_s": elapsed_s,
        "data_shape": list(data_shape) if data_shape else None,
        "model_name": cfg.model.name, "method": cfg.method.name, "ranks": layer_ranks(model),
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "integrator": integrator.state_dict(optimizer=False) if integrator else None,
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        "config": config_dict,
    }


TOP_FILE = re.compile(r"^epoch\d{3,}-(?:val_acc|test_acc)-?[\d.]+\.pt$")


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
    """Selection starts again (the ranks moved, a new IMP round): the kept epochs are other networks."""
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
        have = torch.load(best_path, map_location="cpu", weights_only=True, mmap=True).get("epoch")
    except Exception:  # missing or unreadable
        have = None
    if have != last.get("epoch"):
        save_checkpoint({k: v for k, v in last.items() if k != "format"}, best_path)
        say(f"tdlrt: note: {best_path} was older than the best epoch ({last.get('epoch')}) recorded in last.pt "
            f"(the run was stopped between the two writes); rewritten from last.pt")


def restore(state, cfg, model, optimizer, integrator, scheduler) -> tuple:
    """Load a checkpoint into freshly built objects; low-rank layers resize to the saved ranks."""
    require(state, RESUME_NEEDS, cfg.ckpt_path)
    if state.get("model_name") != cfg.model.name or state.get("method") != cfg.method.name:
        raise CheckpointError(f"checkpoint {cfg.ckpt_path} was written by model={state.get('model_name')} "
                              f"method={state.get('method')}, this run is model={cfg.model.name} "
                              f"method={cfg.method.name}")
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    except (RuntimeError, KeyError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {cfg.ckpt_path} does not match this configuration: "
                              f"{load_error(exc)}") from None
    if integrator is not None and state.get("integrator"):
        integrator.load_state_dict(state["integrator"])
    torch.set_rng_state(state["rng"]["torch"])
    if torch.cuda.is_available() and state["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    best = state.get("best") or {"metric": float(state["best_test_acc"]), "max_test": float(state["best_test_acc"]),
                                 "selected": None}  # a checkpoint from before validation splits
    return int(state["epoch"]), int(state["global_step"]), best, state.get("position")


# --------------------------------------------------------------------------- Hydra entry point

SWEEP_FAILURES: list = []  # (job number, folder) of the sweep jobs that ended with an error in this process


def main() -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from .config import from_dictconfig

    OmegaConf.register_new_resolver("pid", lambda: str(os.getpid()), replace=True, use_cache=True)
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"tdlrt: warning: {message}\n"

    @hydra.main(config_path=CONFIG_DIR, config_name="train", version_base="1.3")
    def _run(cfg) -> Optional[float]:
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
        run_dir = Path(hydra_cfg.runtime.output_dir)
        try:
            with exit_on_user_error(describe=lambda exc: f"sweep job {hydra_cfg.job.num} ({run_dir}): {exc}"
                                    if hydra_cfg.mode == RunMode.MULTIRUN else str(exc)):
                tc = from_dictconfig(cfg)
                summary = train(tc, run_dir, OmegaConf.to_container(cfg, resolve=True))
        except SystemExit as exc:
            if exc.code == 2 and hydra_cfg.mode == RunMode.MULTIRUN:
                SWEEP_FAILURES.append((int(hydra_cfg.job.num), run_dir))
                return None  # the job's error is printed; the sweep goes on, and says at the end what did not finish
            raise
        except KeyboardInterrupt:  # Ctrl-C outside the training loop (data loading, the final report)
            last = run_dir / "checkpoints" / "last.pt"
            where = f"resume from {last} with: {resume_command(run_dir)}" if last.is_file() else "no checkpoint written"
            print(f"tdlrt: stopped: SIGINT outside a training step; {where}", file=sys.stderr)
            sys.exit(130)
        return summary["test_acc"]

    _run()
