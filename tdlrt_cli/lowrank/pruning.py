"""Gradual rank pruning without the integrator: the control that separates TDLRT's geometry-aware step from
"start large, prune on a schedule".

A :class:`TrainedTuckerConv2d` is a Tucker-2 conv whose factors ``U_0, U_1`` *and* core are ``nn.Parameter``
trained by the optimizer at every step (plain gradients, no projection, no augmentation: ranks can only
shrink). :class:`GradualPruning` wraps the optimizer; on the target rule's schedule
(:class:`~.allocation.BudgetSchedule`, every ``every``-th step until the ramp ends) it cuts all layers
together to the step's parameter budget:

1. :func:`orthonormalise_factors`: ``U_i = Q_i R_i`` (QR), ``U_i <- Q_i``, ``C <- C x_i R_i`` (W unchanged);
2. :func:`cut_to_budget`: the spectra of ``Mat_i(C)`` (now those of ``Mat_i(W)``), the target rule's global
   allocation (:func:`~.allocation.allocate_ranks`), then ``U_i <- Q_i P_i``, ``C <- C x_i P_i^T``: the
   truncated HOSVD of W at the allocated ranks;
3. :func:`transport_state`: the optimizer state follows the parameters through the same linear maps
   (``C``'s through ``P_i^T R_i``, ``U_i``'s through ``R_i^{-1} P_i``; second moments through squared maps).

After the ramp's last cut the network trains as fixed-rank Tucker at the final ranks.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from .allocation import BudgetSchedule, allocate_ranks
from .integrator import VARIANCE_STATES, TruncationInfo, check_finite_cores
from .spectra import clipped_bounds, mode_spectra
from .layers import LowRankLayer, TuckerConv2d, replace_data
from .tucker import mode_product, orthonormalize, unfold


class TrainedTuckerConv2d(TuckerConv2d):
    """:class:`TuckerConv2d` whose factors are parameters the optimizer trains (not buffers the integrator
    moves); between two cuts they drift from orthonormality."""

    def _init_lowrank(self, *args, **kwargs) -> None:
        super()._init_lowrank(*args, **kwargs)
        for i in range(self.order):
            u = self._buffers.pop(f"U{i}")
            self.register_parameter(f"U{i}", None if u is None else nn.Parameter(u))

    def set_factor(self, i: int, u: Optional[torch.Tensor]) -> None:
        if u is None:  # a mode kept at full size has no factor (HOSVD of a dense kernel says so too)
            return
        replace_data(getattr(self, f"U{i}"), u.contiguous())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Resize core and factors (all parameters here) to the checkpoint's ranks before the usual copy."""
        for name in ["core"] + [f"U{i}" for i in range(self.order)]:
            key, current = prefix + name, getattr(self, name)
            if key in state_dict and current is not None and current.shape != state_dict[key].shape:
                replace_data(current, torch.empty(state_dict[key].shape, dtype=current.dtype, device=current.device))
        nn.Module._load_from_state_dict(self, state_dict, prefix, *args, **kwargs)


def orthonormal_parts(layer: LowRankLayer) -> Dict[int, tuple]:
    """``U_i = Q_i R_i`` (QR, float64) of every stored factor: ``{i: (Q_i, R_i)}``; nothing is changed."""
    return {i: orthonormalize(u.detach().to(torch.float64)) for i, u in enumerate(layer.factors) if u is not None}


def orthonormalise_factors(layer: LowRankLayer) -> Dict[int, torch.Tensor]:
    """``U_i = Q_i R_i``; ``U_i <- Q_i`` and ``C <- C x_i R_i`` (the represented W is unchanged). Returns R_i."""
    parts, core = orthonormal_parts(layer), layer.core.detach()
    for i, (q, r) in parts.items():
        layer.set_factor(i, q.to(layer.factors[i].dtype))
        core = mode_product(core, r.to(core.dtype), i)
    replace_data(layer.core, core.contiguous())
    return {i: r for i, (_, r) in parts.items()}


def _map_state(optimizer, param: nn.Parameter, apply) -> None:
    """Every tensor state of ``param`` of the parameter's (old) shape, through ``apply(value, variance)``."""
    state = optimizer.state.get(param) if optimizer is not None else None
    if not state:
        return
    for key, value in list(state.items()):
        if torch.is_tensor(value) and value.dim() > 0:
            state[key] = apply(value.to(torch.float64), key in VARIANCE_STATES).to(value.dtype).contiguous()


def transport_state(optimizer, layer: LowRankLayer, core_maps: Dict[int, torch.Tensor],
                    factor_maps: Dict[int, torch.Tensor]) -> None:
    """The optimizer state of a layer whose parameters went through ``C <- C x_i core_maps[i]`` and
    ``U_i <- U_i factor_maps[i]``: each state tensor through the same maps (elementwise squares for second
    moments, the diagonal of ``M diag(v) M^T``)."""
    def sq(m, variance):
        return m * m if variance else m

    def core_apply(v, variance):
        for i, m in core_maps.items():
            v = mode_product(v, sq(m, variance), i)
        return v

    _map_state(optimizer, layer.core, core_apply)
    for i, m in factor_maps.items():
        _map_state(optimizer, layer.factors[i], lambda v, variance, m=m: v @ sq(m, variance))


def cut_to_budget(layers: Sequence[LowRankLayer], budget: float, optimizer=None) -> List[TruncationInfo]:
    """With ``U_i = Q_i R_i`` (QR) the kernel is ``(C x_i R_i) x_i Q_i``; keep, per adapted mode, the leading
    ``k_i`` left singular vectors ``P_i`` of ``Mat_i(C x_j R_j)``, the ranks of all layers chosen together under
    ``budget`` parameters (the target rule's allocation): ``U_i <- Q_i P_i``, ``C <- C x_i (P_i^T R_i)``, the
    truncated HOSVD of W. A rank never grows (no augmentation): each mode's upper bound is its current rank. A
    layer whose ranks all stay is left as it is (parameters and optimizer state untouched); the others'
    optimizer state is transported (:func:`transport_state`)."""
    if not layers:
        return []
    check_finite_cores([t.detach() for layer in layers for t in [layer.core, *layer.factors] if t is not None])
    before = [layer.ranks for layer in layers]
    parts = [orthonormal_parts(layer) for layer in layers]
    cores = []
    for layer, p in zip(layers, parts):
        core = layer.core.detach().to(torch.float64)
        for i, (_, r) in p.items():
            core = mode_product(core, r, i)
        cores.append(core)
    jobs = [(li, i) for li, p in enumerate(parts) for i in sorted(p)]
    grams = []
    for li, i in jobs:
        m = unfold(cores[li], i)
        grams.append(m @ m.transpose(0, 1))
    pairs = mode_spectra(grams)
    spectra = [lam.tolist() for lam, _ in pairs]
    bounds = [clipped_bounds(layers[li], i, len(lam)) for (li, i), lam in zip(jobs, spectra)]
    ks = allocate_ranks(spectra, [(li, (i,)) for li, i in jobs], [layer.ranks for layer in layers],
                        [layer.full_shape for layer in layers], bounds, budget)
    keep: List[Dict[int, torch.Tensor]] = [{} for _ in layers]
    tails = [0.0] * len(layers)
    norms = [0.0] * len(layers)
    smallest: List[Dict[int, float]] = [{} for _ in layers]
    for (li, i), (lam, vecs), k in zip(jobs, pairs, ks):
        keep[li][i] = vecs[:, :k]
        tails[li] += float(lam[k:].sum())
        norms[li] = float(lam.sum())
        smallest[li][i] = math.sqrt(max(float(lam[k - 1]), 0.0))
    infos = []
    for li, layer in enumerate(layers):
        if any(p.shape[1] < p.shape[0] for p in keep[li].values()):  # some mode is cut
            core_maps, factor_maps = {}, {}
            core = cores[li]
            for i, p in keep[li].items():
                q, r = parts[li][i]
                u = layer.factors[i]
                layer.set_factor(i, (q @ p).to(u.dtype))
                core = mode_product(core, p.transpose(0, 1), i)
                core_maps[i] = p.transpose(0, 1) @ r
                factor_maps[i] = torch.linalg.solve_triangular(r, p, upper=True)  # R_i^{-1} P_i
            replace_data(layer.core, core.to(layer.core.dtype).contiguous())
            transport_state(optimizer, layer, core_maps, factor_maps)
        rel = math.sqrt(tails[li] / norms[li]) if norms[li] > 0 else 0.0
        infos.append(TruncationInfo(before[li], layer.ranks, rel, smallest[li]))
    return infos


class GradualPruning:
    """Train a network of :class:`TrainedTuckerConv2d` layers with a torch optimizer (every parameter, every
    step) and cut its ranks on the target rule's schedule: after optimizer step ``t`` (counted from 0) with
    ``t % every == 0`` and ``t < budget.end``, and at ``t == budget.end`` (the last cut, at the final budget),
    :func:`cut_to_budget` with ``budget.params(t)``. The same optimizer-like surface as
    :class:`~.integrator.TDLRT` (``zero_grad``, ``step``, ``state_dict``), so any loop can drive it."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, budget: BudgetSchedule, every: int = 10):
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.model, self.optimizer, self.budget, self.augment_every = model, optimizer, budget, every
        self.layers = [m for m in model.modules() if isinstance(m, TrainedTuckerConv2d)]
        self._names = {id(m): n for n, m in model.named_modules()}
        self.steps = 0
        self.last_budget = None
        self.last_info: Dict[str, TruncationInfo] = {}
        self.frozen = False

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def scalars(self) -> Dict[str, float]:
        """The compression the schedule asks for at the current step (logged beside the reached one)."""
        return {"compression/target": 100.0 * self.budget.compression(self.steps)}

    def cuts_at(self, step: int) -> bool:
        return not self.frozen and (step == self.budget.end or (step < self.budget.end and step % self.augment_every == 0))

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def prepare_step(self) -> list:
        return []  # nothing happens before the optimizer step (the loop's fault injection calls this)

    def freeze_bases(self) -> None:
        self.frozen = True

    def step(self) -> None:
        self.optimizer.step()
        self.last_info = {}
        if self.cuts_at(self.steps):
            self.last_budget = self.budget.params(self.steps)
            with torch.no_grad():
                infos = cut_to_budget(self.layers, self.last_budget, self.optimizer)
            self.last_info = {self._names.get(id(layer), str(i)): info
                              for i, (layer, info) in enumerate(zip(self.layers, infos))}
        self.steps += 1

    def state_dict(self, optimizer: bool = True) -> dict:
        state = {"steps": self.steps, "frozen": self.frozen}
        if optimizer:
            state["optimizer"] = self.optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.steps, self.frozen = int(state["steps"]), bool(state.get("frozen", False))
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
