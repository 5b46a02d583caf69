"""The TDLRT step: rank-adaptive basis-update & Galerkin integrator on Tucker layers (docs/method.md: "TDLRT in one page"; the paper's Algorithm 1).

One optimisation step on one mini-batch, from one forward/backward pass. ``Z = dL/dW`` is the gradient of
the loss with respect to a layer's represented weight at the current point; every quantity below is a
projection of Z that :meth:`LowRankLayer.projected_grad` forms from the captured input and output gradient.

1. :func:`basis_gradients` (K-step): ``dL/dK_i = Mat_i(Z x_{j!=i} U_j^T) Q_i`` with ``Mat_i(C)^T = Q_i S_i^T``;
   the step forms them with two projected-gradient calls in all (:func:`out_basis_gradient`, then
   :func:`other_basis_gradients` with the augmented output basis, whose result also gives step 3).
2. :func:`augment`: ``U_hat_i = [U_i, orth((I - U_i U_i^T) dL/dK_i)]``; the core is zero-padded, W unchanged.
3. :func:`galerkin_gradient`: ``dL/dC_tilde = Z x_i U_hat_i^T``; the optimizer then steps the core.
4. :func:`truncate_layers`: keep the leading k_i singular vectors of Mat_i(C_hat), k_i chosen by a rank rule
   (:mod:`.rules`; the paper's: the smallest rank whose discarded tail is at most ``tau * ||C_hat||_F``),
   rotate bases and core, re-orthonormalise.
5. :func:`project_optimizer_state` / :func:`carry_optimizer_state`: the optimizer state of the core stays in the
   augmented coordinates of the step that made it and is carried to the next augmented bases by
   ``s <- s x_i (U_hat_new_i^T U_hat_old_i)`` (vector transport), so momentum and Adam moments keep moving
   the bases instead of being projected away by every truncation.

:class:`TDLRT` wraps a torch optimizer and runs these around its ``step()``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn

from .layers import LowRankLayer, replace_data
from .rules import RankRule, as_rule, budget_decisions
from .tucker import mode_product, multi_mode_product, orthonormalize, unfold

# Second moments (Adam, AMSGrad, RMSprop, Adagrad, Adadelta): variances, mapped with squared maps
VARIANCE_STATES = ("exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum", "acc_delta")


# --------------------------------------------------------------------------- step 1: K-step

def _projected(layer: LowRankLayer, bases: Sequence[Optional[torch.Tensor]], skip: Optional[int]) -> torch.Tensor:
    """``Z x_j bases[j]^T`` over all modes but ``skip`` (full size in mode ``skip``)."""
    a_out = None if skip == 0 else bases[0]
    a_in = None if skip == 1 else bases[1]
    t = layer.projected_grad(a_out, a_in)
    for j in range(2, layer.order):
        if j != skip and bases[j] is not None:
            t = mode_product(t, bases[j].transpose(0, 1).to(t.dtype), j)
    return t


def core_q(layer: LowRankLayer) -> Dict[int, torch.Tensor]:
    """``Q_i`` of every adapted mode, ``Mat_i(C)^T = Q_i S_i^T`` (reduced QR of the current core)."""
    core = layer.core.detach()
    return {i: torch.linalg.qr(unfold(core, i).transpose(0, 1).to(u.dtype))[0]
            for i, u in enumerate(layer.factors) if u is not None}


def basis_gradients(layer: LowRankLayer) -> Dict[int, torch.Tensor]:
    """K-step gradients of every adapted mode: ``dL/dK_i = Mat_i(Z x_{j!=i} U_j^T) Q_i``.

    ``K_i = U_i S_i`` where ``Mat_i(C)^T = Q_i S_i^T`` (reduced QR). Formed from Q_i directly, never as
    ``dL/dU_i S_i^{-T}``: S_i may be singular, and the small directions are exactly the ones that matter.
    (The reference form, one projected gradient per mode; the step itself uses :func:`out_basis_gradient`
    and :func:`other_basis_gradients`, two projected gradients in all.)
    """
    factors = layer.factors
    return {i: unfold(_projected(layer, factors, skip=i), i).to(q.dtype) @ q for i, q in core_q(layer).items()}


def out_basis_gradient(layer: LowRankLayer, q0: torch.Tensor) -> torch.Tensor:
    """The K-step of the output mode alone, ``dL/dK_0 = Mat_0(Z x_{j!=0} U_j^T) Q_0``: the first of the two
    projected-gradient calls of a step."""
    return unfold(_projected(layer, layer.factors, skip=0), 0).to(q0.dtype) @ q0


def other_basis_gradients(layer: LowRankLayer, u_hat0: torch.Tensor, qs: Dict[int, torch.Tensor]):
    """The second (and last) projected-gradient call of a step, ``T = Z x_0 U_hat_0^T`` with the augmented
    output basis ``U_hat_0 = [U_0, N_0]``. Its leading ``r_0`` rows are ``Z x_0 U_0^T``, so the K-step of every
    other adapted mode i follows by matrix products, ``dL/dK_i = Mat_i(T[:r_0] x_{j!=0,i} U_j^T) Q_i``, and
    once those bases are augmented, :func:`galerkin_from` gives the Galerkin gradient from T. Returns
    ``({i: dL/dK_i}, T)``."""
    t = layer.projected_grad(u_hat0, None)
    lead = t[:layer.factors[0].shape[1]]
    factors = layer.factors
    grads = {}
    for i, q in qs.items():
        if i == 0:
            continue
        m = lead
        for j, u in enumerate(factors):
            if j not in (0, i) and u is not None:
                m = mode_product(m, u.transpose(0, 1).to(m.dtype), j)
        grads[i] = unfold(m, i).to(q.dtype) @ q
    return grads, t


def galerkin_from(t: torch.Tensor, layer: LowRankLayer) -> torch.Tensor:
    """``dL/dC_tilde = T x_{i!=0} U_hat_i^T`` (``T = Z x_0 U_hat_0^T``), once every basis is augmented."""
    for j, u in enumerate(layer.factors):
        if j != 0 and u is not None:
            t = mode_product(t, u.transpose(0, 1).to(t.dtype), j)
    return t.to(layer.core.dtype)


# --------------------------------------------------------------------------- step 2: augment

def augment_basis(u: torch.Tensor, grad_k: torch.Tensor) -> torch.Tensor:
    """``[U, N]`` with N an orthonormal basis of ``(I - U U^T) dL/dK``, ``min(r, n - r)`` columns.

    N is read off a Householder QR of ``[U, Y]``, ``Y = (I - U U^T) dL/dK``: its columns after the first r
    are orthonormal and orthogonal to U even when Y is rank-deficient (then they complete the basis with
    directions the core step may use or truncation drops). U itself is kept first, unchanged.
    """
    n, r = u.shape
    extra = min(r, n - r)
    if extra == 0:
        return u
    y = grad_k - u @ (u.transpose(0, 1) @ grad_k)
    if y.shape[1] < extra:
        y = torch.cat([y, y.new_zeros(n, extra - y.shape[1])], 1)
    q, _ = torch.linalg.qr(torch.cat([u, y], 1))
    return torch.cat([u, q[:, r:r + extra]], 1)


def augment(layer: LowRankLayer, grads: Dict[int, torch.Tensor],
            optimizer: Optional[torch.optim.Optimizer] = None, stash: Optional["StateStash"] = None) -> None:
    """Augment every adapted basis with its K-step directions and zero-pad the core (W is unchanged); the
    core's optimizer state follows into the augmented coordinates (step 5, from ``stash`` when given)."""
    augment_to(layer, {i: augment_basis(layer.factors[i], g) for i, g in grads.items()}, optimizer, stash)


def augment_to(layer: LowRankLayer, bases: Dict[int, torch.Tensor],
               optimizer: Optional[torch.optim.Optimizer] = None, stash: Optional["StateStash"] = None) -> None:
    """:func:`augment` with the augmented bases ``U_hat_i = [U_i, N_i]`` already formed."""
    old_shape = tuple(layer.core.shape)
    for i, u in bases.items():
        layer.set_factor(i, u)
    new_shape = tuple(layer.core.shape[i] if u is None else u.shape[1] for i, u in enumerate(layer.factors))
    padded = layer.core.new_zeros(new_shape)
    padded[tuple(slice(0, s) for s in old_shape)] = layer.core.detach()
    replace_data(layer.core, padded)
    if optimizer is not None:
        carry_optimizer_state(optimizer, layer.core, old_shape, layer.factors, stash)


# --------------------------------------------------------------------------- step 3: Galerkin core step

def galerkin_gradient(layer: LowRankLayer) -> torch.Tensor:
    """``dL/dC_tilde = Z x_i U_hat_i^T`` over all modes, at the same point as the K-step (W unchanged)."""
    return _projected(layer, layer.factors, skip=None).to(layer.core.dtype)


# --------------------------------------------------------------------------- step 4: truncate

@dataclass
class TruncationInfo:
    """What one truncation of one layer did."""

    ranks_before: tuple
    ranks: tuple
    rel_error: float          # sqrt(sum of discarded tails) / ||C_hat||: bounds ||W_new - W_hat|| / ||W_hat||
    min_singular: Dict[int, float] = field(default_factory=dict)  # smallest kept sigma per adapted mode
    stash: Optional["StateStash"] = None  # the optimizer state of C_hat in the augmented bases (step 5)


class NonFiniteCore(FloatingPointError):
    """A stepped core holds NaN or Inf (the optimizer step diverged, e.g. at an infinite learning rate).

    Raised by :func:`truncate_layers` before any decomposition, which would fail on such a core or keep
    meaningless ranks; the layers are left as the step made them, for the caller to stop the run."""


def check_finite_cores(cores: Sequence[torch.Tensor]) -> None:
    """Raise :class:`NonFiniteCore` when any of ``cores`` holds NaN or Inf (one host synchronisation)."""
    finite = torch.stack([torch.isfinite(c).all() for c in cores])
    if not bool(finite.all()):
        raise NonFiniteCore(f"{int((~finite).sum())} of {len(cores)} stepped cores hold NaN/Inf")


def cholesky_qr(u: torch.Tensor):
    """``u = Q R`` for ``u`` with nearly orthonormal columns: ``R^T R = u^T u`` (Cholesky), ``Q = u R^{-1}``.

    Orthonormal to about ``eps cond(u)^2``, which is eps here: ``u = U_hat P`` with both factors orthonormal.
    R has a positive diagonal, as :func:`orthonormalize` (so R is close to I and no vector flips); about
    twice as fast as Householder QR on the CPU. Falls back to Householder where the Cholesky fails.
    """
    r, info = torch.linalg.cholesky_ex(u.transpose(0, 1) @ u, upper=True)
    if bool(info):
        return orthonormalize(u)
    return torch.linalg.solve_triangular(r, u, upper=True, left=False), r


def _truncate_one(layer: LowRankLayer, core: torch.Tensor, keep: List[Optional[torch.Tensor]]) -> None:
    """``U_i <- Q_i`` and ``C <- C_hat x_i (R_i P_i^T)`` with ``Q_i R_i = U_hat_i P_i`` (:func:`cholesky_qr`):
    the rotation to the kept vectors P_i and the re-orthonormalisation in one pass over the core.
    ``keep[i]`` is P_i (n_hat x k) or None for a mode that is not adapted."""
    maps: List[Optional[torch.Tensor]] = [None] * layer.order
    for i, p in enumerate(keep):
        if p is None:
            continue
        if p.shape[0] == p.shape[1]:  # every vector kept: P = I, only re-orthonormalise
            q, r = cholesky_qr(layer.factors[i])
            maps[i] = r.to(core.dtype)
        else:
            q, r = cholesky_qr(layer.factors[i] @ p)
            maps[i] = (r @ p.transpose(0, 1)).to(core.dtype)
        # row-major like a freshly loaded checkpoint's factor (the triangular solve returns column-major
        # storage): the same layout gives the same floating-point results after a resume, bitwise
        layer.set_factor(i, q.contiguous())
    replace_data(layer.core, multi_mode_product(core, maps).contiguous())


def truncate_layers(layers: Sequence[LowRankLayer], rule: Union[RankRule, float],
                    optimizer: Optional[torch.optim.Optimizer] = None,
                    broadcast: Optional[Callable[[torch.Tensor], None]] = None,
                    step: int = 0, held: float = 0.0) -> List[TruncationInfo]:
    """Step 4 on many layers at once: truncate every adapted mode of each stepped core to the ranks ``rule``
    decides (:mod:`.rules`; a number ``tau`` is the paper's rule with the exact spectra).

    For mode i with Mat_i(C_hat) = P_i Sigma_i V_i^T, keep the leading k_i vectors: ``U_i <- U_hat_i P_i``
    and ``C <- C_hat x_i P_i^T`` for all i (a truncated HOSVD of C_hat), so that
    ``||W_new - W_hat||^2 <= sum_i (discarded tail_i)``; the paper's rule takes the smallest k_i with
    ``sqrt(sum_{j>k_i} sigma_j^2) <= tau ||C_hat||_F``. A mode that keeps every vector is not rotated
    (``P_i = I``): nothing is discarded, and the coordinates of the core and of its optimizer state stay
    put (Adam is not invariant under rotations of its coordinates). Finally ``U_i = Q_i R_i`` (QR, by
    :func:`cholesky_qr`) and ``C <- C x_i R_i``, which leaves W unchanged and removes round-off drift from
    orthonormality. Ranks are decided on the device and read back in one host synchronisation for all
    layers; ``broadcast`` (data parallel) makes every replica keep the first process's ranks. ``step`` and
    ``held`` (parameters of adapted layers not truncated now) are passed to the rule.

    A stepped core holding NaN or Inf raises :class:`NonFiniteCore` before anything is decomposed or
    changed (one more host synchronisation).
    """
    rule = as_rule(rule, spectra="exact")
    return _truncate_with(layers, lambda cores, jobs: rule.decide(layers, cores, jobs, step, held, broadcast),
                          optimizer)


def truncate_to_budget(layers: Sequence[LowRankLayer], budget: float,
                       optimizer: Optional[torch.optim.Optimizer] = None,
                       broadcast: Optional[Callable[[torch.Tensor], None]] = None) -> List[TruncationInfo]:
    """Step 4 with the ranks of all layers chosen together so that they hold at most ``budget`` parameters
    (:func:`.rules.budget_decisions`, the target rule's decision at one step); otherwise as
    :func:`truncate_layers`."""
    return _truncate_with(layers, lambda cores, jobs: budget_decisions(layers, cores, jobs, budget, broadcast),
                          optimizer)


def _truncate_with(layers, decide, optimizer) -> List[TruncationInfo]:
    """The stepped cores, the jobs ``(layer index, mode)`` of their adapted modes, ``decide(cores, jobs)``,
    then :func:`_apply_decisions`."""
    if not layers:
        return []
    cores = [layer.core.detach() for layer in layers]
    check_finite_cores(cores)
    jobs = [(li, i) for li, layer in enumerate(layers) for i, u in enumerate(layer.factors) if u is not None]
    vectors, rows = decide(cores, jobs)
    return _apply_decisions(layers, cores, jobs, vectors, rows, optimizer)


def _apply_decisions(layers, cores, jobs, vectors, host, optimizer) -> List[TruncationInfo]:
    """Rotate and cut every layer to its decided ranks (rows ``(k, tail_k, smallest kept sigma,
    ||C_hat||^2)`` per job), re-orthonormalise, and stash the optimizer state (step 5)."""
    keep: List[List[Optional[torch.Tensor]]] = [[None] * layer.order for layer in layers]
    tail_sq = [0.0] * len(layers)
    norms = [0.0] * len(layers)
    min_sigma: List[Dict[int, float]] = [{} for _ in layers]
    for (li, i), vecs, (k, tail, smallest, norm_sq) in zip(jobs, vectors, host):
        k, n = int(k), vecs.shape[0]
        p = vecs[:, :k] if k < n else torch.eye(n, dtype=vecs.dtype, device=vecs.device)
        keep[li][i] = p.to(cores[li].dtype)
        tail_sq[li] += tail
        norms[li] = norm_sq
        min_sigma[li][i] = smallest
    infos = []
    for li, layer in enumerate(layers):
        ranks_before = tuple(cores[li].shape)
        augmented_bases = list(layer.factors)
        _truncate_one(layer, cores[li], keep[li])
        stash = None
        if optimizer is not None:
            stash = project_optimizer_state(optimizer, layer.core, augmented_bases, layer.factors)
        rel = math.sqrt(tail_sq[li] / norms[li]) if norms[li] > 0 else 0.0
        infos.append(TruncationInfo(ranks_before, layer.ranks, rel, min_sigma[li], stash))
    return infos


def truncate(layer: LowRankLayer, rule: Union[RankRule, float],
             optimizer: Optional[torch.optim.Optimizer] = None) -> TruncationInfo:
    """Step 4 on one layer (see :func:`truncate_layers`)."""
    return truncate_layers([layer], rule, optimizer)[0]


def orthonormality_error(layer: LowRankLayer) -> float:
    """max_i ||U_i^T U_i - I||_max over the stored factors (a diagnostic; synchronises)."""
    err = 0.0
    for u in layer.factors:
        if u is not None:
            u = u.detach()
            eye = torch.eye(u.shape[1], dtype=u.dtype, device=u.device)
            err = max(err, float((u.transpose(0, 1) @ u - eye).abs().max()))
    return err


# --------------------------------------------------------------------------- step 5: optimizer state

@dataclass
class StateStash:
    """The optimizer state of one core in the augmented coordinates of the adapting step that made it.

    ``state[key]`` (shaped like that step's C_hat) represents ``state[key] x_i bases[i]`` in W's space.
    ``fixed_steps`` counts the optimizer steps on fixed bases since then (``augment_every > 1``): each of
    them decays the part of the state outside the current bases by the optimizer's own factor (momentum,
    beta1, beta2), exactly as the optimizer does to coordinates whose gradient is zero.
    """

    bases: List[Optional[torch.Tensor]]
    state: Dict[str, torch.Tensor]
    fixed_steps: int = 0

    def as_dict(self) -> dict:
        return {"bases": list(self.bases), "state": dict(self.state), "fixed_steps": self.fixed_steps}

    @classmethod
    def from_dict(cls, d: dict) -> "StateStash":
        return cls(list(d["bases"]), dict(d["state"]), int(d["fixed_steps"]))


def _transport(value: torch.Tensor, maps: Sequence[Optional[torch.Tensor]], variance: bool) -> torch.Tensor:
    """``value x_i maps[i]``; for a second moment (a variance) the elementwise squares of the maps: the
    diagonal of ``M diag(v) M^T``, exact when the old coordinates are uncorrelated, and never negative."""
    mats = [None if m is None else (m * m if variance else m).to(value.dtype) for m in maps]
    return multi_mode_product(value, mats)


def _transport_maps(new_bases, old_bases) -> List[Optional[torch.Tensor]]:
    """``U_new_i^T U_old_i`` per adapted mode: the coordinates of the old basis vectors in the new basis."""
    return [None if u is None else u.transpose(0, 1) @ b.to(u.dtype) for u, b in zip(new_bases, old_bases)]


def state_decay(optimizer: torch.optim.Optimizer, param: nn.Parameter, key: str) -> float:
    """Per-step decay of optimizer state ``key`` where the gradient is zero; 0 for a key this function does
    not know (such state is not carried across augmentations: it starts at zero in the new directions)."""
    group = next((g for g in optimizer.param_groups if any(p is param for p in g["params"])), {})
    if key == "momentum_buffer":                      # SGD, RMSprop
        return float(group.get("momentum", 0.0))
    if key == "exp_avg":                              # Adam, AdamW
        return float(group.get("betas", (0.0, 0.0))[0])
    if key == "exp_avg_sq":
        return float(group.get("betas", (0.0, 0.0))[1])
    if key in ("max_exp_avg_sq", "sum"):              # AMSGrad's running maximum, Adagrad's sum
        return 1.0
    if key in ("square_avg", "grad_avg"):             # RMSprop (alpha), Adadelta's square_avg (rho)
        return float(group.get("alpha", group.get("rho", 0.0)))
    if key == "acc_delta":                            # Adadelta
        return float(group.get("rho", 0.0))
    return 0.0


def project_optimizer_state(optimizer: torch.optim.Optimizer, param: nn.Parameter,
                            augmented_bases: Sequence[Optional[torch.Tensor]],
                            bases: Sequence[Optional[torch.Tensor]]) -> Optional[StateStash]:
    """At truncation: keep the state of C_hat (augmented coordinates) in a :class:`StateStash` for the next
    augmentation, and give the optimizer its projection onto the truncated bases, ``s x_i (U_i^T U_hat_i)``
    (squared maps for second moments), for any step on fixed bases before then."""
    state = optimizer.state.get(param)
    if not state:
        return None
    shape = tuple(param.shape[i] if b is None else b.shape[1] for i, b in enumerate(augmented_bases))
    maps = _transport_maps(bases, augmented_bases)
    kept = {}
    for key, value in list(state.items()):
        if torch.is_tensor(value) and tuple(value.shape) == shape and value.dim() > 0:
            kept[key] = value
            state[key] = _transport(value, maps, key in VARIANCE_STATES).contiguous()
    return StateStash(list(augmented_bases), kept)  # the layer holds new tensors now: no copy needed


def carry_optimizer_state(optimizer: torch.optim.Optimizer, param: nn.Parameter, old_shape: Sequence[int],
                          bases: Sequence[Optional[torch.Tensor]], stash: Optional[StateStash] = None) -> None:
    """At augmentation: the core's state in the augmented bases ``U_hat_i = [U_i, N_i]``.

    The leading block (the coordinates of U_i) is the optimizer's current state. Every other entry is the
    stash carried to the new bases, ``s x_i (U_hat_i^T U_hat_old_i)``, times ``decay^fixed_steps``; this is
    exact vector transport, since the stash's part inside span(U_i) is what the current state evolved from.
    Without a stash (the first adaptation, or an optimizer key with no known decay) those entries start at
    zero, and a second moment at the mean of its current values where no history reaches (zero there
    would give steps of lr/eps once the bias correction has matured).
    """
    state = optimizer.state.get(param)
    if not state:
        return
    old_shape = tuple(old_shape)
    block = tuple(slice(0, s) for s in old_shape)
    maps = None if stash is None else _transport_maps(bases, stash.bases)
    for key, value in list(state.items()):
        if not torch.is_tensor(value) or tuple(value.shape) != old_shape or value.dim() == 0:
            continue
        variance = key in VARIANCE_STATES
        neutral = value.mean() if variance and value.numel() else value.new_zeros(())  # no host sync
        decay = state_decay(optimizer, param, key) if stash is not None else 0.0
        if stash is not None and key in stash.state and decay > 0:
            carried = _transport(stash.state[key], maps, variance) * decay ** stash.fixed_steps
            if variance:  # the share of each entry that history reaches: prod_i rowsum(M_i o M_i)
                reach = carried.new_ones(())
                for i, m in enumerate(maps):
                    if m is not None:
                        shape = [1] * carried.dim()
                        shape[i] = m.shape[0]
                        reach = reach * (m * m).sum(1).to(carried.dtype).reshape(shape)
                carried = carried + (1 - reach).clamp_min(0) * neutral
        else:
            carried = neutral.expand(tuple(param.shape)).clone()
        carried = carried.to(value.dtype).contiguous()
        carried[block] = value
        state[key] = carried


# --------------------------------------------------------------------------- the optimizer-like wrapper

def lowrank_layers(model: nn.Module) -> List[LowRankLayer]:
    return [m for m in model.modules() if isinstance(m, LowRankLayer)]


class TDLRT:
    """Rank-adaptive training of every :class:`LowRankLayer` in ``model`` around a torch optimizer.

    Usage, in any training loop::

        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)   # cores + dense parameters
        integrator = TDLRT(model, opt, ToleranceRule(tau=0.1))              # or TDLRT(model, opt, 0.1)
        for x, y in loader:
            integrator.zero_grad()
            loss_fn(model(x), y).backward()
            integrator.step()

    ``step()`` runs K-step, augmentation and the Galerkin gradient on every low-rank layer, then
    ``optimizer.step()`` (cores and all other parameters), then truncation to the ranks ``rule`` decides
    (:mod:`.rules`: the paper's :class:`~.rules.ToleranceRule`, the target rule's
    :class:`~.rules.BudgetRule`; a number is the tolerance rule with that ``tau``). Every
    ``augment_every``-th step adapts the ranks; the steps in between, and all steps after
    :meth:`freeze_bases`, train the cores on fixed bases. Factors are buffers: the optimizer never sees
    them, and weight decay on a core equals weight decay on W because the factors are orthonormal.
    Gradient clipping must be applied by the caller to the gradients set by :meth:`prepare_step` (or not
    at all): ``step()`` replaces core gradients.

    Data parallel: ``average(tensors)`` averages a list of tensors over the processes in place (it is
    called on the basis gradients before augmentation, then on all gradients before the optimizer step);
    ``broadcast(tensor)`` gives every process the first one's truncation decisions.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, rule: Union[RankRule, float],
                 augment_every: int = 1, average: Optional[Callable[[List[torch.Tensor]], None]] = None,
                 broadcast: Optional[Callable[[torch.Tensor], None]] = None):
        if augment_every < 1:
            raise ValueError(f"augment_every must be >= 1, got {augment_every}")
        self.rule = as_rule(rule)
        self.model, self.optimizer, self.augment_every = model, optimizer, augment_every
        self.average, self.broadcast = average, broadcast
        self.layers = lowrank_layers(model)
        self._index = {id(layer): i for i, layer in enumerate(self.layers)}  # layer -> its index (stashes)
        self.steps = 0
        self.frozen = False
        self.timing = False             # when on, step() measures truncation_seconds (synchronising)
        self.truncation_seconds = 0.0
        self.last_info: Dict[str, TruncationInfo] = {}
        self.stashes: Dict[int, StateStash] = {}  # layer index -> its core's optimizer state in augmented bases
        self._names = {id(m): n for n, m in model.named_modules()}
        self._arm()

    def scalars(self) -> Dict[str, float]:
        """What the rule logs for the current ranks (the tolerance that decided them, or the scheduled target)."""
        return self.rule.scalars(self.steps)

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def freeze_bases(self) -> None:
        """Fixed-rank phase: from now on only cores (and dense parameters) are trained."""
        self.frozen = True
        self.stashes.clear()
        self._arm()

    def adapts_next(self) -> bool:
        return not self.frozen and self.steps % self.augment_every == 0

    def _arm(self) -> None:
        """Capture inputs and output gradients during the next forward/backward only if it will adapt."""
        on = self.adapts_next()
        for layer in self.layers:
            layer.capture = on
            if not on:
                layer.clear_capture()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def prepare_step(self) -> List[LowRankLayer]:
        """Steps 1-3 on every layer that saw the last forward/backward; returns those layers."""
        if not self.adapts_next():
            return []
        ready = [layer for layer in self.layers if layer.has_capture]
        index = self._index
        with torch.no_grad():
            # two projected-gradient calls per layer: the output mode's K-step, then (with its augmented
            # basis) every other mode's K-step and the Galerkin gradient; data parallel: averaged in between
            qs = [core_q(layer) for layer in ready]
            two = [0 in q and len(q) > 1 for q in qs]  # else (output mode not adapted): one call per mode
            first = [{0: out_basis_gradient(layer, q[0])} if split else basis_gradients(layer)
                     for layer, q, split in zip(ready, qs, two)]
            if self.average is not None:
                self.average([g for per_layer in first for g in per_layer.values()])
            u_hat0 = [augment_basis(layer.factors[0], g[0]) if split else None
                      for layer, g, split in zip(ready, first, two)]
            second = [other_basis_gradients(layer, u, q) if split else ({}, None)
                      for layer, u, q, split in zip(ready, u_hat0, qs, two)]
            if self.average is not None:
                self.average([g for per_layer, _ in second for g in per_layer.values()])
            for layer, split, g1, u0, (g2, t) in zip(ready, two, first, u_hat0, second):
                stash = self.stashes.pop(index[id(layer)], None)
                if split:
                    bases = {0: u0, **{i: augment_basis(layer.factors[i], g) for i, g in g2.items()}}
                    augment_to(layer, bases, self.optimizer, stash)
                    layer.core.grad = galerkin_from(t, layer)
                else:
                    augment(layer, g1, self.optimizer, stash)
                    layer.core.grad = galerkin_gradient(layer)
                layer.clear_capture()
        return ready

    def step(self) -> None:
        """One integrator step: :meth:`prepare_step`, the optimizer's step, :meth:`finish_step`."""
        ready = self.prepare_step()
        if self.average is not None:
            self.average([p.grad for group in self.optimizer.param_groups for p in group["params"]
                          if p.grad is not None])
        self.optimizer.step()
        self.finish_step(ready)

    def finish_step(self, ready: List[LowRankLayer]) -> None:
        """Step 4 on the layers :meth:`prepare_step` returned (after the optimizer stepped their cores), and
        the bookkeeping of step 5: their optimizer states are stashed in the augmented bases."""
        t0 = self._clock() if self.timing else 0.0
        with torch.no_grad():
            stepped = {id(layer) for layer in ready}
            held = sum(layer.num_params() for layer in self.layers if id(layer) not in stepped) if ready else 0
            infos = truncate_layers(ready, self.rule, self.optimizer, self.broadcast, self.steps, held)
        if self.timing:
            self.truncation_seconds += self._clock() - t0
        index = self._index
        stepped = {index[id(layer)] for layer in ready}
        for i, stash in self.stashes.items():
            if i not in stepped and self.layers[i].core.grad is not None:
                stash.fixed_steps += 1  # a step on fixed bases: the stash decays like the optimizer's state
        for layer, info in zip(ready, infos):
            if info.stash is not None:
                self.stashes[index[id(layer)]] = info.stash
        self.last_info = {self._names.get(id(layer), str(i)): info for i, (layer, info) in enumerate(zip(ready, infos))}
        self.steps += 1
        self._arm()

    def _clock(self) -> float:
        if self.layers and self.layers[0].core.is_cuda:
            torch.cuda.synchronize(self.layers[0].core.device)
        return time.perf_counter()

    def state_dict(self, optimizer: bool = True) -> dict:
        """Step count, phase and the stashed optimizer states (and, by default, the optimizer's state)."""
        state = {"steps": self.steps, "frozen": self.frozen,
                 "stashes": {i: stash.as_dict() for i, stash in self.stashes.items()}}
        if optimizer:
            state["optimizer"] = self.optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.steps, self.frozen = int(state["steps"]), bool(state["frozen"])
        self.stashes = {int(i): StateStash.from_dict(d) for i, d in state.get("stashes", {}).items()}
        for stash in self.stashes.values():  # onto the device of the layers
            device = self.layers[0].core.device if self.layers else None
            stash.bases = [None if b is None else b.to(device) for b in stash.bases]
            stash.state = {k: v.to(device) for k, v in stash.state.items()}
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        self._arm()
