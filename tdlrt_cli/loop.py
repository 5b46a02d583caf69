"""One epoch of training (:func:`train_one_epoch`): the steps, the NaN policy, progress, step-level logging,
mid-epoch checkpoints and stop signals. What the optimisation step is (``optimizer.step()`` or the TDLRT
integrator's) is decided by the caller."""
from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .distributed import Distributed
from .errors import Interrupted, UserError, handle_stop_signals
from .faults import faults
from .logs import Console
from .lowrank import NonFiniteCore, orthonormality_error
from .metrics import layer_ranks, lowrank_named, parameter_report


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
            super().__init__(f"the low-rank cores became NaN/Inf (or too large to decompose) in the optimizer step "
                             f"at step {step} (epoch {epoch + 1}); stopped, {keep} (lower lr)")
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
        self._old = handle_stop_signals(self._handle)
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
        faults.oom_now(global_step + 1, device)
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
        if faults.inf_lr_now(global_step + 1):
            for group in optimizer.param_groups:
                group["lr"] = float("inf")
        try:
            stepper.step()
        except (NonFiniteCore, RuntimeError) as exc:
            # NaN/Inf cores (found before truncation) or a decomposition that failed on them: report the
            # non-finite loss that caused it if there was one, else the weights; never the linear algebra
            if int(bad_step) >= 0:
                raise Diverged(int(bad_step), epoch) from None
            if isinstance(exc, (NonFiniteCore, torch.linalg.LinAlgError)):  # cores too large to decompose
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
                values.update(adaptation_scalars(model, integrator, logger, global_step, epoch + 1))
                postfix["c.r."] = extra["c.r."] = f"{values['compression/rate']:.1f}%"
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


def adaptation_scalars(model, integrator, logger, global_step: int, epoch: int) -> dict:
    """At a logging step of a rank-adaptive run: the compression rate, the target of the schedule (target
    rule) or the tolerance that decided the ranks (tau rule), every layer's ranks (also a row per layer in
    ranks_steps.csv), the bases' orthonormality error and the last truncation's error and smallest kept
    singular values."""
    values = {"compression/rate": parameter_report(model)["compression_rate"]}
    values.update(integrator.scalars())  # the target scheduled for this step, or the tolerance that decided
    values.update(log_ranks(logger, model, global_step, epoch))
    for layer_name, layer in lowrank_named(model):
        values[f"diag/ortho_error/{layer_name}"] = orthonormality_error(layer)
    for name, info in integrator.last_info.items():
        values[f"diag/trunc_error/{name}"] = info.rel_error
        for mode, s in info.min_singular.items():
            values[f"diag/min_sigma/{name}/{mode}"] = s
    return values


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


def loader_device(loader) -> torch.device:
    return getattr(loader, "device", None) or torch.device("cpu")

