"""Rank rules: how step 4 of the integrator chooses the ranks it keeps.

At an adapting step every adapted mode i of every stepped core C_hat keeps the leading k_i left singular
vectors of Mat_i(C_hat) (a truncated HOSVD, so ``||W_new - W_hat||^2 <= sum_i tail_i(k_i)``); a rule only
chooses the k_i. :class:`~.integrator.TDLRT` calls ``rule.decide(...)`` and nothing else of it:

* :class:`ToleranceRule` (the paper's): each mode on its own, the smallest k_i whose discarded tail is at most
  ``tau ||C_hat||_F``, optionally with a warm-up of the tolerance.
* :class:`BudgetRule` (the target rule): the ranks of all modes of all layers together, so that the layers
  hold at most the parameter budget a :class:`~.allocation.BudgetSchedule` gives for the step
  (:func:`.allocation.allocate_ranks`).

A rule's ``decide(layers, cores, jobs, step, held, broadcast)`` gets the stepped cores, the jobs
``(layer index, mode)`` of the adapted modes, the optimizer step, the parameters ``held`` by adapted layers
that do not truncate at this step, and ``broadcast`` (data parallel: the first process's decisions for
all). It returns, per job, the vectors (columns; the leading k kept) and the row
``(k, tail_k, smallest kept sigma, ||C_hat||^2)``. ``scalars(step)`` names what it logs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Protocol, Sequence, Union

import torch

from .allocation import BudgetSchedule, allocate_ranks
from .spectra import SPECTRA, clipped_bounds, exact_grams, mode_spectra, tolerance_decisions

Broadcast = Optional[Callable[[torch.Tensor], None]]


class RankRule(Protocol):
    def decide(self, layers, cores, jobs, step: int, held: float, broadcast: Broadcast): ...

    def scalars(self, step: int) -> Dict[str, float]: ...


def truncation_rank(sigma_sq: torch.Tensor, threshold_sq: float, lo: int, hi: int) -> int:
    """Smallest ``k`` in ``[lo, hi]`` with ``sum_{j>=k} sigma_j^2 <= threshold_sq`` (sigma descending).

    The scalar form of the tolerance rule, which :func:`.spectra.tolerance_decisions` applies on the device
    to all modes at once.
    """
    n = sigma_sq.numel()
    tails = torch.flip(torch.cumsum(torch.flip(sigma_sq, [0]), 0), [0])  # tails[k] = sum_{j>=k}
    k = int((tails > threshold_sq).sum())
    return max(min(k, hi, n), min(lo, n), 1)


@dataclass
class ToleranceRule:
    """The paper's rule: mode i keeps the smallest k_i (within the layer's rank bounds) with
    ``sqrt(sum_{j>=k_i} sigma_j^2) <= tau_t ||C_hat||_F``.

    ``tau_t`` is ``tau`` from the first step, or, with a warm-up of ``warmup_steps`` T steps (ranks decided
    from learned structure rather than from the random start's flat spectrum), ``tau t / T`` (``linear``) or
    0 until T (``hold``: truncate only to the rank caps). ``spectra``: ``"fast"`` or the float64 reference
    ``"exact"`` (:mod:`.spectra`; both keep the same ranks wherever the float64 spectrum decides clearly).
    """

    tau: float
    warmup_steps: int = 0
    warmup_shape: str = "linear"
    spectra: str = "fast"
    last_tau: float = field(default=0.0, init=False)  # the tolerance of the last truncation

    def __post_init__(self):
        if not 0 < self.tau < 1:
            raise ValueError(f"tau must be in (0, 1), got {self.tau}")
        if self.warmup_steps < 0 or self.warmup_shape not in ("linear", "hold"):
            raise ValueError(f"tau warm-up must be >= 0 steps, linear or hold; got {self.warmup_steps}, "
                             f"{self.warmup_shape!r}")
        if self.spectra not in SPECTRA:
            raise ValueError(f"spectra must be one of {', '.join(SPECTRA)}, got {self.spectra!r}")
        self.warmup_steps = int(self.warmup_steps)

    def tolerance(self, step: int) -> float:
        """``tau_t`` at optimizer step ``step``."""
        if step >= self.warmup_steps:
            return self.tau
        if self.warmup_shape == "hold":
            return 0.0
        return self.tau * step / self.warmup_steps

    def decide(self, layers, cores, jobs, step: int, held: float = 0.0, broadcast: Broadcast = None):
        self.last_tau = self.tolerance(step)
        return tolerance_decisions(layers, cores, jobs, self.last_tau, self.spectra, broadcast)

    def scalars(self, step: int) -> Dict[str, float]:
        return {"compression/tau": self.last_tau}  # the tolerance that decided the current ranks


@dataclass
class BudgetRule:
    """The target rule: at step t the ranks of every adapted mode of every layer are chosen together so that
    the adapted layers hold at most ``schedule.params(t)`` parameters (those that do not truncate at this
    step keep what they hold): :func:`budget_decisions`."""

    schedule: BudgetSchedule
    last_budget: Optional[float] = field(default=None, init=False)  # the budget of the last truncation

    def decide(self, layers, cores, jobs, step: int, held: float = 0.0, broadcast: Broadcast = None):
        self.last_budget = self.schedule.params(step)
        return budget_decisions(layers, cores, jobs, self.last_budget - held, broadcast)

    def scalars(self, step: int) -> Dict[str, float]:
        return {"compression/target": 100.0 * self.schedule.compression(step)}  # scheduled for this step


def as_rule(rule: Union[RankRule, float], spectra: str = "fast") -> RankRule:
    """A rule as given, or a tolerance ``tau`` as the paper's rule with it (``spectra`` the path to use)."""
    if isinstance(rule, (int, float)) and not isinstance(rule, bool):
        return ToleranceRule(float(rule), spectra=spectra)
    if not callable(getattr(rule, "decide", None)):
        raise TypeError(f"a rank rule (ToleranceRule, BudgetRule) or a tolerance tau, got {rule!r}")
    return rule


def budget_decisions(layers, cores, jobs, budget: float, broadcast: Broadcast = None):
    """Every adapted mode's rank under ``budget`` parameters for ``layers``, from all eigenpairs of the mode
    Gram matrices (one batched float64 ``eigh``): greedily, the singular directions with the largest share
    of their layer's energy per parameter they cost (:func:`.allocation.allocate_ranks`). A mode may keep up
    to its augmented size (clipped to its cap), so a layer can take rank back. One host synchronisation;
    ``broadcast`` gives every process the first process's ranks."""
    pairs = mode_spectra(exact_grams(cores, jobs))
    spectra = [lam.tolist() for lam, _ in pairs]  # the one host synchronisation
    bounds = [clipped_bounds(layers[li], i, len(lam)) for (li, i), lam in zip(jobs, spectra)]
    units, unit_of = rank_units(layers, jobs, bounds)
    unit_ranks = allocate_ranks([spectra[first] for first, _, _ in units],
                                [(jobs[first][0], modes) for first, modes, _ in units],
                                [tuple(c.shape) for c in cores], [layer.full_shape for layer in layers],
                                [b for _, _, b in units], budget)
    ks = [unit_ranks[unit_of[j]] for j in range(len(jobs))]
    rows = []
    for k, lam in zip(ks, spectra):
        rows.append([float(k), float(sum(lam[k:])), math.sqrt(max(lam[k - 1], 0.0)), float(sum(lam))])
    if broadcast is not None:
        decided = torch.tensor(rows, dtype=torch.float64, device=cores[0].device)
        broadcast(decided)
        rows = decided.tolist()
    return [vecs for _, vecs in pairs], rows


def rank_units(layers, jobs, bounds: Sequence[tuple]):
    """What :func:`.allocation.allocate_ranks` decides: one rank per adapted mode of a Tucker layer, one rank
    for both modes of a matrix (order 2: its unfoldings share their spectrum, and a direction kept by one
    mode only is a dead parameter). Returns the units ``(first job, modes, (lo, hi))`` and each job's unit."""
    units: List[tuple] = []
    unit_of: Dict[int, int] = {}
    for li, layer in enumerate(layers):
        mine = [j for j, (l2, _) in enumerate(jobs) if l2 == li]
        if layer.order == 2 and len(mine) == 2:
            lo = max(bounds[j][0] for j in mine)
            hi = max(min(bounds[j][1] for j in mine), lo)
            groups = [(mine, (lo, hi))]
        else:
            groups = [([j], bounds[j]) for j in mine]
        for members, bound in groups:
            for j in members:
                unit_of[j] = len(units)
            units.append((members[0], tuple(jobs[j][1] for j in members), bound))
    return units, unit_of
