"""One epoch of training (:func:`train_one_epoch`): each step (:func:`take_step`, with the NaN policy), what is
shown (:class:`Progress`), what is logged (:func:`log_step`), what is saved (a mid-epoch checkpoint or one on a
stop signal, :meth:`Running.position`). What the optimisation step is (``optimizer.step()`` or the TDLRT
integrator's) is decided by the caller."""
from __future__ import annotations

import signal
import sys
import time
from dataclasses import dataclass, field
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


@dataclass
class EpochOptions:
    """How an epoch runs besides its network, data and step. ``log_every``: step scalars every that many steps;
    ``nan_policy``: stop or skip a step with a non-finite loss, ``skip_budget`` (``[left]``) the steps the run
    may still skip; ``save(position)`` every ``save_every`` steps (0: never) and on a stop signal (``stop``);
    ``on_pace(seconds per step)`` once after 5 steps; ``plain_every_s``: the plain progress lines' period."""

    log_every: int = 50
    nan_policy: str = "stop"
    save_every: int = 0
    save: Optional[Callable[[dict], None]] = None
    dist: Distributed = field(default_factory=Distributed)
    stop: Optional[StopSignals] = None
    skip_budget: Optional[list] = None
    say: Callable[[str], None] = field(default_factory=Console)
    on_pace: Optional[Callable[[float], None]] = None
    plain_every_s: float = 30.0


class Running:
    """The epoch's running sums on the device (read only when shown or logged), its step count and the first
    step with a non-finite loss (no host synchronisation until :meth:`check_finite`)."""

    def __init__(self, start: dict, device: torch.device, global_step: int):
        self.loss_sum = start["loss_sum"].to(device) if "loss_sum" in start else torch.zeros((), device=device)
        self.correct = (start["correct"].to(device) if "correct" in start
                        else torch.zeros((), device=device, dtype=torch.long))
        self.seen, self.skipped, self.t0 = int(start.get("seen", 0)), int(start.get("skipped", 0)), time.perf_counter()
        self.seen_here, self.global_step, self.device = 0, global_step, device
        self.bad_step = torch.full((), -1, dtype=torch.long, device=device)

    def add(self, loss: torch.Tensor, out: torch.Tensor, y: torch.Tensor) -> None:
        self.loss_sum += loss.detach().float() * len(y)
        self.correct += (out.detach().argmax(1) == y).sum()
        self.seen += len(y)
        self.seen_here += len(y)
        self.global_step += 1

    def check_finite(self, dist: Distributed, epoch: int) -> None:
        first_bad = int(dist.max_(self.bad_step.clone()))  # any process's, so all of them stop together
        if first_bad >= 0:
            raise Diverged(first_bad, epoch)

    def position(self, epoch: int, batch: int) -> dict:
        """What a checkpoint written after batch ``batch`` needs to resume the epoch there."""
        return {"epoch": epoch, "batch": batch, "global_step": self.global_step, "loss_sum": self.loss_sum.detach().cpu(),
                "correct": self.correct.detach().cpu(), "seen": self.seen, "skipped": self.skipped}

    def figures(self, world: int, extra: dict) -> dict:  # one host sync: read only when shown
        return {"loss": f"{float(self.loss_sum) / max(self.seen, 1):.3f}",
                "acc": f"{100 * float(self.correct) / max(self.seen, 1):.1f}",
                "img/s": f"{self.seen_here * world / max(time.perf_counter() - self.t0, 1e-9):.0f}", **extra}


class Progress:
    """What an epoch shows: a tqdm bar on a terminal (its postfix about once a second), plain lines every
    ``plain_every_s`` otherwise (a file, SLURM's output); nothing without ``on``."""

    def __init__(self, loader, epoch: int, first: int, on: bool, say: Callable[[str], None], plain_every_s: float):
        from tqdm import tqdm

        self.on, self.epoch, self.total, self.say, self.every = on, epoch, len(loader), say, plain_every_s
        self.plain = on and not sys.stderr.isatty()
        self.bar = tqdm(loader, desc=f"epoch {epoch + 1}", leave=False, disable=not on or self.plain,
                        dynamic_ncols=True, initial=first, total=len(loader))
        self.shown = time.perf_counter()  # when the running figures were last shown (bar postfix or plain line)
        self.extra: dict = {}  # figures known only at logging steps (the compression rate)

    def tick(self, i: int, figures: Callable[[dict], dict]) -> None:
        if not self.on or time.perf_counter() - self.shown < (self.every if self.plain else 1.0):
            return
        self.shown, shown = time.perf_counter(), figures(self.extra)
        if self.plain:
            self.say(f"epoch {self.epoch + 1}: step {i + 1}/{self.total} | loss {shown['loss']} acc {shown['acc']}% "
                     f"| {shown['img/s']} img/s" + (f" | c.r. {self.extra['c.r.']}" if self.extra else ""))
        else:
            self.bar.set_postfix(shown, refresh=False)


def train_one_epoch(model, loader, optimizer, integrator, scheduler, amp, logger, progress: bool, epoch: int,
                    global_step: int, options: EpochOptions = EpochOptions(), start: Optional[dict] = None) -> dict:
    """One pass over the training data; each step is ``optimizer.step()`` or, for TDLRT, ``integrator.step()``.
    ``start`` (from a mid-epoch checkpoint) resumes at its batch with its running sums. Returns the epoch's
    training loss and accuracy over every process, its time and speed, and the step count reached."""
    o, start = options, start or {}
    model.train()
    first = int(start.get("batch", 0))
    loader.set_epoch(epoch, first)
    s = Running(start, loader_device(loader), global_step)
    show = Progress(loader, epoch, first, progress, o.say, o.plain_every_s)
    per_step_sched = scheduler is not None and not isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    for i, (x, y) in enumerate(show.bar, start=first):
        x, y = x.to(s.device, non_blocking=True), y.to(s.device, non_blocking=True)
        taken = take_step(model, optimizer, integrator, amp, x, y, s, o, epoch)
        if taken is None:  # skipped (nan_policy=skip)
            continue
        loss, out = taken
        if per_step_sched:
            scheduler.step()
        s.add(loss, out, y)
        if faults.kill_now(s.global_step, "after"):
            faults.die()  # fault injection: like kill -9, no clean-up
        if o.on_pace is not None and i + 1 - first == 5:
            o.on_pace((time.perf_counter() - s.t0) / 5)
        show.tick(i, lambda extra: s.figures(o.dist.world, extra))
        faults.signal_now(s.global_step)
        last = i == len(loader) - 1
        if o.stop is not None and not last and (not o.dist.enabled or s.global_step % o.log_every == 0) \
                and o.stop.requested(o.dist):
            save_position(s, o, epoch, i + 1)
            show.bar.close()
            raise StopRequested(o.stop.requested(o.dist), s.global_step)
        logging_step = s.global_step % o.log_every == 0 or last
        if integrator is not None and integrator.last_info and not logging_step:
            log_rank_change(logger, model, s.global_step, epoch + 1)  # rank curves exact at any run length
        if logging_step:
            s.check_finite(o.dist, epoch)
            log_step(logger, model, optimizer, integrator, s, loss, out, y, epoch, o.dist, show)
        if o.save is not None and o.save_every and s.global_step % o.save_every == 0 and not last:
            save_position(s, o, epoch, i + 1)
    show.bar.close()
    return epoch_totals(s, o, epoch)


def take_step(model, optimizer, integrator, amp, x, y, s: Running, o: EpochOptions, epoch: int):
    """Forward, loss, backward and the optimisation step; ``(loss, logits)``, or None for a step skipped with a
    non-finite loss (nan_policy=skip: one host synchronisation per step). Fault injection hooks sit where a
    crash test needs them (out of memory, NaN loss, a kill mid-integrator step, an infinite lr)."""
    stepper = integrator if integrator is not None else optimizer
    stepper.zero_grad(set_to_none=True)
    with amp():
        out = model(x)
        loss = F.cross_entropy(out, y)
    faults.oom_now(s.global_step + 1, s.device)
    if faults.nan_now(s.global_step + 1):
        loss = loss * float("nan")
    finite = torch.isfinite(loss.detach())
    if o.nan_policy == "skip" and bool(o.dist.max_((~finite).long())):
        if o.skip_budget is not None:
            o.skip_budget[0] -= 1
            if o.skip_budget[0] < 0:
                raise Diverged(s.global_step + 1, epoch, skipped_all=True)
        s.skipped += 1
        s.global_step += 1
        return None
    s.bad_step = torch.where(finite | (s.bad_step >= 0), s.bad_step, torch.full_like(s.bad_step, s.global_step + 1))
    loss.backward()
    if integrator is None:
        o.dist.mean_([p.grad for p in model.parameters() if p.grad is not None])
    elif faults.kill_now(s.global_step + 1, "rank_change"):
        integrator.prepare_step()  # bases augmented to 2r, then killed before the update and truncation
        faults.die()
    if faults.inf_lr_now(s.global_step + 1):
        for group in optimizer.param_groups:
            group["lr"] = float("inf")
    try:
        stepper.step()
    except (NonFiniteCore, RuntimeError) as exc:
        # NaN/Inf cores (found before truncation) or a decomposition that failed on them: report the
        # non-finite loss that caused it if there was one, else the weights; never the linear algebra
        if int(s.bad_step) >= 0:
            raise Diverged(int(s.bad_step), epoch) from None
        if isinstance(exc, (NonFiniteCore, torch.linalg.LinAlgError)):  # cores too large to decompose
            raise Diverged(s.global_step + 1, epoch, weights=True) from None
        raise
    return loss, out


def save_position(s: Running, o: EpochOptions, epoch: int, batch: int) -> None:
    """A checkpoint that resumes after ``batch`` (only from finite weights)."""
    s.check_finite(o.dist, epoch)
    if o.save is not None:
        o.save(s.position(epoch, batch))


def log_step(logger, model, optimizer, integrator, s: Running, loss, out, y, epoch: int, dist: Distributed,
             show: Progress) -> None:
    """The step scalars (loss, lr, accuracy; for TDLRT the ranks and diagnostics) and the bar's postfix."""
    rate = s.seen_here / (time.perf_counter() - s.t0)
    values = {"train/loss_step": float(loss.detach()), "train/lr": optimizer.param_groups[0]["lr"],
              "train/acc_step": 100.0 * float((out.detach().argmax(1) == y).float().mean()),
              "train/acc": 100.0 * float(s.correct) / max(s.seen, 1)}
    postfix = {"loss": f"{float(s.loss_sum) / s.seen:.3f}", "acc": f"{100 * float(s.correct) / s.seen:.1f}",
               "img/s": f"{rate * dist.world:.0f}"}
    if integrator is not None:
        values.update(adaptation_scalars(model, integrator, logger, s.global_step, epoch + 1))
        postfix["c.r."] = show.extra["c.r."] = f"{values['compression/rate']:.1f}%"
    logger.scalars(s.global_step, values)
    show.bar.set_postfix(postfix)


def epoch_totals(s: Running, o: EpochOptions, epoch: int) -> dict:
    """The epoch's loss and accuracy summed over every process, its time and speed, the step count reached."""
    dt = time.perf_counter() - s.t0
    if s.skipped:
        o.say(f"tdlrt: warning: skipped {s.skipped} step(s) with a non-finite loss in epoch {epoch + 1}")
    totals = torch.stack([s.loss_sum.double(), s.correct.double(),
                          torch.tensor(float(s.seen), device=s.device, dtype=torch.float64)])
    loss_total, correct_total, seen_total = o.dist.sum_(totals).tolist()
    return {"train_loss": loss_total / max(seen_total, 1), "train_acc": 100.0 * correct_total / max(seen_total, 1),
            "epoch_time_s": dt, "images_per_s": s.seen_here * o.dist.world / max(dt, 1e-9),
            "global_step": s.global_step}


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

