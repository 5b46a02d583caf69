"""Baselines in the same harness: matrix DLRT layers, fixed-rank factorised convs trained directly by the
optimizer (Tucker, CP, tensor-train, matrix), and pruning masks (SNIP, GraSP, magnitude).

Every factorised conv exposes ``num_params()`` / ``dense_num_params()`` like the Tucker layers, so the
compression rates are counted the same way for every method.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import LowRankLayer, weight_rms
from .tucker import hosvd, random_orthonormal, unfold

_pair = nn.modules.utils._pair


# --------------------------------------------------------------------------- matrix DLRT (order 2 on a conv)

class MatrixConv2d(LowRankLayer):
    """A conv whose kernel, reshaped to the matrix ``W_mat`` (out x in*kh*kw), is ``U0 C U1^T``.

    Forward: the k x k conv with kernel ``U1^T`` (in -> r1, original stride/padding/dilation), a 1x1 conv
    with C (r1 -> r0), a 1x1 conv with U0 (r0 -> out) plus bias. Trained by the same integrator as the
    Tucker layers in its order-2 form (matrix DLRT).
    """

    order = 2
    is_conv = True

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, bias=True,
                 ranks: Sequence[Optional[int]] = (None, None), rank_bounds=None, dtype=None, device=None,
                 generator=None, weight_std: Optional[float] = None):
        super().__init__()
        kh, kw = _pair(kernel_size)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, (kh, kw)
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        full = (out_channels, in_channels * kh * kw)
        self._init_lowrank(full, ranks, rank_bounds or [(1, n) for n in full], dtype, device, generator, weight_std)
        self.bias = nn.Parameter(torch.zeros(out_channels, dtype=dtype, device=device)) if bias else None

    def _first_kernel(self, a: torch.Tensor) -> torch.Tensor:
        return a.transpose(0, 1).reshape(a.shape[1], self.in_channels, *self.kernel_size)

    def _first(self, x, a):
        return F.conv2d(x, self._first_kernel(a).to(x.dtype), None, self.stride, self.padding, self.dilation)

    def weight_full(self) -> torch.Tensor:
        return super().weight_full().reshape(self.out_channels, self.in_channels, *self.kernel_size)

    def forward(self, x):
        h = self._first(x, self.U1)
        h = F.conv2d(h, self._forward_core(x)[:, :, None, None].to(h.dtype))
        out = self._expand_out(h)
        self._record(x, out)
        return out

    def projected_grad(self, a_out, a_in):
        dtype = torch.promote_types(self.core.dtype, torch.float32)
        x, g = self._x.to(dtype), self._g.to(dtype)
        if a_out is not None:
            g = F.conv2d(g, a_out.transpose(0, 1)[:, :, None, None].to(dtype))
        if a_in is None:
            z = torch.nn.grad.conv2d_weight(x, (g.shape[1], self.in_channels, *self.kernel_size), g, self.stride,
                                            self.padding, self.dilation)
            return z.reshape(g.shape[1], -1)
        h = self._first(x, a_in.to(dtype))
        return torch.einsum("bohw,brhw->or", g, h)


# --------------------------------------------------------------------------- fixed-rank factorisations

class _Factorised(nn.Module):
    is_conv = True

    def _conv_args(self, conv: nn.Conv2d) -> None:
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding, self.dilation = conv.kernel_size, conv.stride, conv.padding, conv.dilation
        self.bias = nn.Parameter(conv.bias.detach().clone()) if conv.bias is not None else None

    def dense_num_params(self) -> int:
        return self.out_channels * self.in_channels * math.prod(self.kernel_size)

    def num_params(self) -> int:
        return sum(p.numel() for n, p in self.named_parameters() if n != "bias")

    def train_num_params(self) -> int:
        return self.num_params()

    @property
    def ranks(self) -> Tuple[int, ...]:
        return tuple(self._ranks)

    @property
    def full_shape(self) -> Tuple[int, ...]:
        return (self.out_channels, self.in_channels, *self.kernel_size)


class FixedTuckerConv2d(_Factorised):
    """Tucker-2 conv (channel modes factorised) with core and factors all trained by the optimizer."""

    def __init__(self, conv: nn.Conv2d, r_out: int, r_in: int, init: str = "random", generator=None):
        super().__init__()
        self._conv_args(conv)
        w = conv.weight.detach()
        if init == "hosvd":
            core, (u0, u1, _, _) = hosvd(w, [r_out, r_in, None, None])
        else:
            u0 = random_orthonormal(self.out_channels, r_out, generator, w.dtype)
            u1 = random_orthonormal(self.in_channels, r_in, generator, w.dtype)
            std = weight_rms(w) * math.sqrt(w.numel() / (r_out * r_in * w[0, 0].numel()))  # ||W|| = ||C||
            core = torch.randn(r_out, r_in, *self.kernel_size, generator=generator, dtype=torch.float64).mul(std).to(w.dtype)
        self.core, self.U0, self.U1 = nn.Parameter(core), nn.Parameter(u0), nn.Parameter(u1)
        self._ranks = [r_out, r_in, *self.kernel_size]

    def weight_full(self) -> torch.Tensor:
        return torch.einsum("oa,abhw,ib->oihw", self.U0, self.core, self.U1)

    def forward(self, x):
        h = F.conv2d(x, self.U1.t()[:, :, None, None])
        h = F.conv2d(h, self.core, None, self.stride, self.padding, self.dilation)
        return F.conv2d(h, self.U0[:, :, None, None], self.bias)


class CPConv2d(_Factorised):
    """CP conv, ``W = sum_r A[:, r] o B[:, r] o Kh[:, r] o Kw[:, r]``: 1x1 (in -> R), depthwise kh x 1,
    depthwise 1 x kw (stride, padding and dilation split per axis), 1x1 (R -> out)."""

    def __init__(self, conv: nn.Conv2d, rank: int, generator=None):
        super().__init__()
        self._conv_args(conv)
        kh, kw = self.kernel_size
        dtype = conv.weight.dtype
        scale = (weight_rms(conv.weight) ** 2 / rank) ** 0.125  # Var(W) = R s^8 = Var of the replaced conv

        def rnd(*shape):
            return nn.Parameter(torch.randn(*shape, generator=generator, dtype=torch.float64).mul(scale).to(dtype))

        self.A, self.B, self.Kh, self.Kw = rnd(self.out_channels, rank), rnd(self.in_channels, rank), rnd(kh, rank), rnd(kw, rank)
        self._ranks = [rank]

    def weight_full(self) -> torch.Tensor:
        return torch.einsum("or,ir,hr,wr->oihw", self.A, self.B, self.Kh, self.Kw)

    def forward(self, x):
        r = self.A.shape[1]
        h = F.conv2d(x, self.B.t()[:, :, None, None])
        h = F.conv2d(h, self.Kh.t()[:, None, :, None], None, (self.stride[0], 1), (self.padding[0], 0),
                     (self.dilation[0], 1), groups=r)
        h = F.conv2d(h, self.Kw.t()[:, None, None, :], None, (1, self.stride[1]), (0, self.padding[1]),
                     (1, self.dilation[1]), groups=r)
        return F.conv2d(h, self.A[:, :, None, None], self.bias)


class TTConv2d(_Factorised):
    """Tensor-train conv over the modes (in, kh, kw, out) with TT ranks (r, r, r):
    1x1 (in -> r), kh x 1 (r -> r), 1 x kw (r -> r), 1x1 (r -> out)."""

    def __init__(self, conv: nn.Conv2d, rank: int, generator=None, init: str = "random"):
        super().__init__()
        self._conv_args(conv)
        kh, kw = self.kernel_size
        dtype = conv.weight.dtype
        n_in = self.in_channels
        self._ranks = [rank, rank, rank]
        if init == "hosvd":  # the closed-form truncated decomposition: TT-SVD
            g1, g2, g3, g4 = tt_svd(conv.weight.detach(), rank)
            self.G1, self.G2, self.G3, self.G4 = (nn.Parameter(g.to(dtype)) for g in (g1, g2, g3, g4))
            return

        def rnd(shape, fan_in):
            return nn.Parameter(torch.randn(*shape, generator=generator, dtype=torch.float64)
                                .mul(math.sqrt(2.0 / fan_in)).to(dtype))

        # Var(W) = r^3 * prod of the cores' variances = r^3 (1/in) (1/(r kh)) (1/(r kw)) (var_w in kh kw / r)
        # = var_w, the replaced conv's weight variance
        var_w = weight_rms(conv.weight) ** 2
        self.G1 = rnd((rank, n_in, 1, 1), 2 * n_in)
        self.G2 = rnd((rank, rank, kh, 1), 2 * rank * kh)
        self.G3 = rnd((rank, rank, 1, kw), 2 * rank * kw)
        self.G4 = rnd((self.out_channels, rank, 1, 1), 2 * rank / (var_w * n_in * kh * kw))

    def weight_full(self) -> torch.Tensor:
        return torch.einsum("oc,cbw,bah,ai->oihw", self.G4[:, :, 0, 0], self.G3[:, :, 0, :], self.G2[:, :, :, 0],
                            self.G1[:, :, 0, 0])

    def forward(self, x):
        h = F.conv2d(x, self.G1)
        h = F.conv2d(h, self.G2, None, (self.stride[0], 1), (self.padding[0], 0), (self.dilation[0], 1))
        h = F.conv2d(h, self.G3, None, (1, self.stride[1]), (0, self.padding[1]), (1, self.dilation[1]))
        return F.conv2d(h, self.G4, self.bias)


class MatrixFixedConv2d(_Factorised):
    """``W_mat = U V^T`` (out x in*kh*kw): k x k conv with V^T (in -> r), then 1x1 with U (r -> out)."""

    def __init__(self, conv: nn.Conv2d, rank: int, generator=None, init: str = "random"):
        super().__init__()
        self._conv_args(conv)
        kh, kw = self.kernel_size
        dtype = conv.weight.dtype
        fan = self.in_channels * kh * kw
        self._ranks = [rank]
        if init == "hosvd":  # truncated SVD of the kernel matrix, W_mat ~ (U_r S_r^1/2)(S_r^1/2 V_r^T)
            u, v = _split_svd(conv.weight.detach().reshape(self.out_channels, -1), rank)
            self.U = nn.Parameter(u.reshape(self.out_channels, rank, 1, 1).to(dtype))
            self.V = nn.Parameter(v.reshape(rank, self.in_channels, kh, kw).to(dtype))
            return
        var_w = weight_rms(conv.weight) ** 2  # Var(W) = r (1 / fan) (var_w fan / r) = var of the replaced conv
        self.V = nn.Parameter(torch.randn(rank, self.in_channels, kh, kw, generator=generator, dtype=torch.float64)
                              .mul(math.sqrt(1.0 / fan)).to(dtype))
        self.U = nn.Parameter(torch.randn(self.out_channels, rank, 1, 1, generator=generator, dtype=torch.float64)
                              .mul(math.sqrt(var_w * fan / rank)).to(dtype))

    def weight_full(self) -> torch.Tensor:
        return torch.einsum("or,rihw->oihw", self.U[:, :, 0, 0], self.V)

    def forward(self, x):
        h = F.conv2d(x, self.V, None, self.stride, self.padding, self.dilation)
        return F.conv2d(h, self.U, self.bias)


def _split_svd(m: torch.Tensor, rank: int, balanced: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """``m ~ A B``, the truncated SVD in float64: ``A = U_r S_r^{1/2}``, ``B = S_r^{1/2} V_r^T`` (balanced), or
    ``A = U_r``, ``B = S_r V_r^T``; a rank above ``min(m.shape)`` is padded with zero columns / rows."""
    u, s, vh = torch.linalg.svd(m.to(torch.float64), full_matrices=False)
    k = min(rank, s.numel())
    left, right = (s[:k].sqrt(), s[:k].sqrt()) if balanced else (torch.ones_like(s[:k]), s[:k])
    a = torch.zeros(m.shape[0], rank, dtype=torch.float64)
    b = torch.zeros(rank, m.shape[1], dtype=torch.float64)
    a[:, :k] = u[:, :k] * left
    b[:k] = right[:, None] * vh[:k]
    return a, b


def tt_svd(w: torch.Tensor, rank: int) -> Tuple[torch.Tensor, ...]:
    """TT-SVD (Oseledets 2011) of a kernel over the modes (in, kh, kw, out) with TT ranks (r, r, r):
    sequential truncated SVDs of the unfoldings, ``T(i, h w o) ~ U_1 (S_1 V_1^T)``, then the same of
    ``S_1 V_1^T`` reshaped to ``(a h, w o)``, then of the next remainder reshaped to ``(b w, o)`` (left-orthonormal
    cores, the remainder carried forward); returns the cores in :class:`TTConv2d`'s layout (G1, G2, G3, G4), float64."""
    n_out, n_in, kh, kw = w.shape
    t = w.detach().to(torch.float64).permute(1, 2, 3, 0)  # (in, kh, kw, out)
    a1, b1 = _split_svd(t.reshape(n_in, -1), rank, balanced=False)                  # (in, r), (r, kh kw out)
    a2, b2 = _split_svd(b1.reshape(rank * kh, kw * n_out), rank, balanced=False)     # (r kh, r), (r, kw out)
    a3, b3 = _split_svd(b2.reshape(rank * kw, n_out), rank, balanced=False)          # (r kw, r), (r, out)
    g1 = a1.t().reshape(rank, n_in, 1, 1)                                  # G1[a, i]
    g2 = a2.reshape(rank, kh, rank).permute(2, 0, 1).reshape(rank, rank, kh, 1)   # G2[b, a, h]
    g3 = a3.reshape(rank, kw, rank).permute(2, 0, 1).reshape(rank, rank, 1, kw)   # G3[c, b, w]
    g4 = b3.t().reshape(n_out, rank, 1, 1)                                 # G4[o, c]
    return g1, g2, g3, g4


FIXED = ("tucker", "cp", "tt", "matrix")
DECOMPOSABLE = ("tucker", "tt", "matrix")  # a closed-form truncated decomposition of a trained kernel exists


def fixed_params(kind: str, n_out: int, n_in: int, k: int, frac: float) -> int:
    """Stored parameters of a fixed-rank factorisation whose rank is ``frac`` of the layer's channels."""
    if kind == "tucker":
        r0, r1 = max(1, round(frac * n_out)), max(1, round(frac * n_in))
        return r0 * r1 * k + n_out * r0 + n_in * r1
    r = fixed_rank(kind, n_out, n_in, frac)
    kh = kw = int(round(math.sqrt(k)))
    if kind == "cp":
        return r * (n_out + n_in + kh + kw)
    if kind == "tt":
        return r * n_in + r * r * (kh + kw) + r * n_out
    return r * (n_out + n_in * k)  # matrix


def fixed_rank(kind: str, n_out: int, n_in: int, frac: float) -> int:
    return max(1, round(frac * min(n_out, n_in)))


def frac_for_compression(kind: str, shapes: Sequence[Tuple[int, int, int]], target_cr: float,
                         dense_other: int = 0) -> float:
    """The largest rank fraction whose conv compression rate (over ``shapes``, plus ``dense_other`` conv
    weights kept dense) reaches ``target_cr`` percent; bisection, since parameters grow with the fraction."""
    dense = sum(o * i * k for o, i, k in shapes) + dense_other

    def cr(f):
        return 100 * (1 - (sum(fixed_params(kind, o, i, k, f) for o, i, k in shapes) + dense_other) / dense)

    lo, hi = 1e-4, 1.0
    if cr(lo) < target_cr:
        return lo
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cr(mid) >= target_cr else (lo, mid)
    return lo


def allocate_tucker_ranks(kernels: Sequence[torch.Tensor], budget: float) -> List[Tuple[int, int]]:
    """One-shot compression of trained kernels: the Tucker-2 ranks ``(r_out, r_in)`` of every kernel, chosen
    together by the target rule's allocation (:func:`.allocation.allocate_ranks`) from the spectra of
    ``Mat_0(W)`` and ``Mat_1(W)``, so that the factorised layers hold at most ``budget`` parameters
    (``r_out r_in kh kw + n_out r_out + n_in r_in`` each)."""
    from .allocation import allocate_ranks

    spectra, units, shapes, bounds = [], [], [], []
    for li, w in enumerate(kernels):
        w64 = w.detach().to(torch.float64)
        shapes.append(tuple(w.shape))
        for i in (0, 1):
            spectra.append((torch.linalg.svdvals(unfold(w64, i)) ** 2).tolist())
            units.append((li, (i,)))
            bounds.append((1, len(spectra[-1])))  # at most the unfolding's rank
    ranks = allocate_ranks(spectra, units, shapes, shapes, bounds, budget)
    return [(ranks[2 * li], ranks[2 * li + 1]) for li in range(len(kernels))]


def make_fixed(kind: str, conv: nn.Conv2d, frac: float, generator=None, init: str = "random") -> nn.Module:
    """The fixed-rank factorisation ``kind`` of ``conv`` at rank fraction ``frac``; ``init="hosvd"``: the
    truncated decomposition of ``conv``'s kernel (HOSVD, TT-SVD, SVD; not for CP), else a random start."""
    if init == "hosvd" and kind not in DECOMPOSABLE:
        raise ValueError(f"{kind} has no closed-form truncated decomposition")
    if kind == "tucker":
        return FixedTuckerConv2d(conv, max(1, round(frac * conv.out_channels)), max(1, round(frac * conv.in_channels)),
                                 init=init, generator=generator)
    r = fixed_rank(kind, conv.out_channels, conv.in_channels, frac)
    if kind == "cp":
        return CPConv2d(conv, r, generator=generator)
    return {"tt": TTConv2d, "matrix": MatrixFixedConv2d}[kind](conv, r, generator=generator, init=init)


# --------------------------------------------------------------------------- pruning

def prunable_convs(model: nn.Module, skip_first: bool = True) -> List[Tuple[str, nn.Conv2d]]:
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    return convs[1:] if skip_first else convs


def global_masks(scores: Dict[str, torch.Tensor], sparsity: float) -> Dict[str, torch.Tensor]:
    """Keep the ``1 - sparsity`` fraction of weights with the highest score, across all layers."""
    flat = torch.cat([s.flatten() for s in scores.values()])
    keep = max(1, int(round((1 - sparsity) * flat.numel())))
    threshold = torch.topk(flat, keep, sorted=True).values[-1]
    return {n: (s >= threshold).to(s.dtype) for n, s in scores.items()}


def snip_scores(model, convs, loss_fn) -> Dict[str, torch.Tensor]:
    """SNIP (Lee et al. 2019): connection sensitivity |dL/dw * w| on one batch at initialisation."""
    weights = [m.weight for _, m in convs]
    grads = torch.autograd.grad(loss_fn(model), weights)
    return {n: (g * w).abs().detach() for (n, _), w, g in zip(convs, weights, grads)}


def grasp_scores(model, convs, loss_fn) -> Dict[str, torch.Tensor]:
    """GraSP (Wang et al. 2020): the paper scores S = -w * (H g) and removes the highest scores (their
    removal reduces the gradient flow least... most harmful to keep); as a keep-score that is ``w * (H g)``."""
    weights = [m.weight for _, m in convs]
    grads = torch.autograd.grad(loss_fn(model), weights)
    g_const = [g.detach() for g in grads]
    grads = torch.autograd.grad(loss_fn(model), weights, create_graph=True)
    dot = sum((g * c).sum() for g, c in zip(grads, g_const))
    hg = torch.autograd.grad(dot, weights)
    return {n: (w * h).detach() for (n, _), w, h in zip(convs, weights, hg)}


def magnitude_scores(convs) -> Dict[str, torch.Tensor]:
    return {n: m.weight.detach().abs() for n, m in convs}


def apply_masks(model: nn.Module, masks: Dict[str, torch.Tensor]) -> None:
    """Mask conv weights with torch.nn.utils.prune (weight = weight_orig * weight_mask, kept through training)."""
    from torch.nn.utils import prune

    for name, mask in masks.items():
        module = model.get_submodule(name)
        if prune.is_pruned(module) and hasattr(module, "weight_mask"):
            prune.remove(module, "weight")
        prune.custom_from_mask(module, "weight", mask)
