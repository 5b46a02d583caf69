"""Global rank allocation under a parameter budget: the truncation decision of the target rule.

The paper's rule truncates each mode of each layer on its own (keep the smallest rank whose discarded tail
is at most ``tau ||C_hat||``). The target rule decides the ranks of *all* adapted modes of *all* layers
together, from their spectra, so that the low-rank layers hold at most a given number of parameters:

* :class:`BudgetSchedule`: the compression asked for at step t, ``c(t) = c_f (1 - (1 - s)^3)`` with
  ``s = (t - t_0) / (t_1 - t_0)`` clipped to [0, 1] (the cubic schedule of gradual magnitude pruning), as a
  parameter budget for the adapted layers.
* :func:`allocate_ranks`: every mode starts at its lower bound; then, greedily, the next singular direction
  with the largest share of its layer's energy per parameter it costs, ``sigma_j^2 / ||C_hat||^2`` divided by
  ``n_i + prod_{l != i} r_l`` (one more column of ``U_i`` and one more slice of the core), is kept, until
  the budget is spent. A layer whose spectrum is spread keeps rank another layer does not need, and a mode
  can take back up to the augmented size ``min(2r, n)`` at every adapting step.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import List, Sequence, Tuple


@dataclass(frozen=True)
class BudgetSchedule:
    """Parameters the adapted layers may hold at optimizer step ``t``, for a compression target.

    ``dense``: parameters of the counted layers when dense (e.g. every conv kernel); ``fixed``: the part of
    them that is not adapted (e.g. a first conv kept dense), so the adapted layers get
    ``(1 - c(t)) dense - fixed``; ``target``: the final compression ``c_f`` as a fraction in (0, 1);
    ``start``, ``end``: the steps over which ``c(t)`` rises from 0 to ``c_f`` (cubic, fast first).
    """

    dense: int
    fixed: int
    target: float
    start: int
    end: int

    def __post_init__(self):
        if not 0 < self.target < 1:
            raise ValueError(f"target compression must be in (0, 1), got {self.target}")
        if not 0 <= self.start <= self.end:
            raise ValueError(f"the ramp needs 0 <= start <= end, got {self.start}, {self.end}")

    def compression(self, step: int) -> float:
        """``c(t) = c_f (1 - (1 - s)^3)``, ``s`` the clipped progress through ``[start, end]``."""
        if step >= self.end:
            return self.target
        if step <= self.start:
            return 0.0
        s = (step - self.start) / (self.end - self.start)
        return self.target * (1.0 - (1.0 - s) ** 3)

    def params(self, step: int) -> float:
        """The adapted layers' parameter budget at ``step``."""
        return (1.0 - self.compression(step)) * self.dense - self.fixed


def layer_params(shape: Sequence[int], sizes: Sequence[int], adapted: Sequence[bool]) -> int:
    """Stored parameters of a Tucker layer with core ``shape``: ``prod(r) + sum_{i adapted} n_i r_i``."""
    return math.prod(shape) + sum(n * r for n, r, a in zip(sizes, shape, adapted) if a)


def lower_bound_params(layer) -> int:
    """Parameters of a low-rank layer with every adapted mode at its lower rank bound (the least the target
    rule can give it)."""
    return _params_at(layer, 0)


def upper_bound_params(layer) -> int:
    """Parameters of a low-rank layer with every adapted mode at its rank cap (the most the target rule can
    give it)."""
    return _params_at(layer, 1)


def _params_at(layer, bound: int) -> int:
    shape = [min(layer.rank_bounds[i][bound], n) if a else n
             for i, (n, a) in enumerate(zip(layer.full_shape, layer.adapted))]
    return layer_params(shape, layer.full_shape, layer.adapted)


def allocate_ranks(spectra: Sequence[Sequence[float]], units: Sequence[Tuple[int, Tuple[int, ...]]],
                   shapes: Sequence[Sequence[int]], sizes: Sequence[Sequence[int]],
                   bounds: Sequence[Tuple[int, int]], budget: float) -> List[int]:
    """The rank of every unit under a parameter budget, chosen greedily by energy per parameter.

    A unit ``(layer l, modes)`` is one adapted mode of a Tucker layer, ``(l, (i,))``, or both modes of a
    matrix, ``(l, (0, 1))``, which share one rank (the two unfoldings of a matrix have the same spectrum, and
    a direction counts only if both keep it). ``spectra[u]``: the squared singular values of ``Mat_i(C_hat)``
    of the unit's (first) mode, descending; ``shapes[l]``: layer l's augmented core shape (a mode that is not
    adapted keeps its size); ``sizes[l]``: its full sizes ``n``; ``bounds[u] = (lo, hi)``, already clipped to
    ``[1, len(spectra[u])]``.

    Every unit starts at ``lo``. A unit at rank r offers its next direction with score
    ``spectra[u][r] / ||C_hat_l||^2 / cost``, ``cost`` the parameters one more rank adds to the layer
    (``n_i + prod_{m != i} r_m`` for one Tucker mode: a column of ``U_i`` and a slice of the core); the best
    offer that fits the remaining budget is taken, an offer that does not fit is withdrawn, until no offer
    is left. The result keeps the layers' parameters within the budget unless the lower bounds alone exceed
    it (then every unit is at lo).
    """
    layers = sorted({li for li, _ in units})
    ranks = {li: list(shapes[li]) for li in layers}
    adapted = {li: [False] * len(shapes[li]) for li in layers}
    energy = {li: 0.0 for li in layers}
    for (li, modes), lam, (lo, _) in zip(units, spectra, bounds):
        for i in modes:
            adapted[li][i] = True
            ranks[li][i] = lo
        energy[li] = max(energy[li], float(sum(lam)))  # ||C_hat||^2 (every mode's spectrum sums to it)

    def params(li: int) -> int:
        return layer_params(ranks[li], sizes[li], adapted[li])

    spent = sum(params(li) for li in layers)
    units_of = {li: [u for u, (l2, _) in enumerate(units) if l2 == li] for li in layers}
    version = {li: 0 for li in layers}  # bumped when a layer's ranks change: its older offers are stale

    def cost(u: int) -> int:
        li, modes = units[u]
        before = params(li)
        grown = list(ranks[li])
        for i in modes:
            grown[i] += 1
        return layer_params(grown, sizes[li], adapted[li]) - before

    def offer(u: int):
        li, modes = units[u]
        r = ranks[li][modes[0]]
        if r >= bounds[u][1]:
            return None
        share = float(spectra[u][r]) / energy[li] if energy[li] > 0 else 0.0
        return (-share / cost(u), u, version[li])  # a heap pops the smallest: the largest score first

    heap = [o for o in (offer(u) for u in range(len(units))) if o is not None]
    heapq.heapify(heap)
    while heap:
        _, u, seen = heapq.heappop(heap)
        li, modes = units[u]
        if seen != version[li]:
            continue  # stale: the layer changed since this offer was made
        c = cost(u)
        if spent + c > budget:
            continue  # does not fit: withdrawn (a cheaper offer may still fit)
        for i in modes:
            ranks[li][i] += 1
        spent += c
        version[li] += 1
        for k in units_of[li]:  # the layer's costs changed: fresh offers from each of its units
            o = offer(k)
            if o is not None:
                heapq.heappush(heap, o)
    return [ranks[li][modes[0]] for li, modes in units]
