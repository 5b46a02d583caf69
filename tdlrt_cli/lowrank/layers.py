"""Low-rank layers: :class:`TuckerConv2d` (order 4) and :class:`LowRankLinear` (order 2).

Both hold a trainable ``core`` (an ``nn.Parameter``) and factor buffers ``U0``, ``U1`` (, ``U2``, ``U3``)
with orthonormal columns; a factor is ``None`` for a mode kept at full size. The factors are never touched
by an optimizer: the integrator (``integrator.py``) moves them. Each layer records, while ``capture`` is on,
its input ``x`` and the gradient ``g`` of its output, from which the integrator forms every projected
kernel gradient it needs (:meth:`projected_grad`) without a second forward/backward pass.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .tucker import hosvd, multi_mode_product, random_orthonormal, reconstruct


def replace_data(param: nn.Parameter, new: torch.Tensor) -> None:
    """``param.data = new`` for a possibly different shape, keeping the same Parameter object.

    Autograd caches a leaf's gradient accumulator together with its shape, and a graph still alive from
    the previous step keeps that accumulator in use; torch drops it only when dtype or device changes.
    Passing through an empty tensor of another dtype forces a fresh accumulator with the new shape.
    """
    if param.shape != new.shape:
        param.data = torch.empty(0, dtype=torch.float16 if new.dtype != torch.float16 else torch.float32,
                                 device=new.device)
    param.data = new


def default_weight_std(fan_in: int) -> float:
    """Standard deviation of PyTorch's default ``nn.Conv2d`` / ``nn.Linear`` weights: Kaiming-uniform with
    ``a = sqrt(5)`` is U(-1/sqrt(fan_in), 1/sqrt(fan_in)), variance ``1 / (3 fan_in)``."""
    return 1.0 / math.sqrt(3.0 * fan_in)


def weight_rms(weight: torch.Tensor) -> float:
    """Root mean square of a dense weight: the scale a factorised replacement should start at, so that
    under BatchNorm every method sees the same effective learning rate as the dense layer it replaces."""
    return float(weight.detach().double().pow(2).mean().sqrt())


class LowRankLayer(nn.Module):
    """Shared state and bookkeeping of a Tucker-factorised weight of shape ``full_shape``."""

    order: int = 0
    is_conv: bool = False  # counted in the conv-only compression rate

    def _init_lowrank(self, full_shape: Sequence[int], ranks: Sequence[Optional[int]],
                      rank_bounds: Sequence[Tuple[int, int]], dtype=None, device=None,
                      generator: Optional[torch.Generator] = None, weight_std: Optional[float] = None) -> None:
        """Random start: orthonormal factors and a Gaussian core scaled so that the entries of W have standard
        deviation ``weight_std`` (default: that of PyTorch's own conv/linear init, :func:`default_weight_std`)."""
        self.full_shape = tuple(int(n) for n in full_shape)
        self.rank_bounds = [tuple(b) for b in rank_bounds]
        dtype = dtype or torch.get_default_dtype()
        shape = [n if r is None else r for n, r in zip(self.full_shape, ranks)]
        if weight_std is None:
            weight_std = default_weight_std(math.prod(self.full_shape[1:]))
        # ||W||_F = ||C||_F (orthonormal factors), so E||W||^2 = numel(W) std^2 = numel(C) std_C^2.
        std = weight_std * math.sqrt(math.prod(self.full_shape) / math.prod(shape))
        core = torch.randn(shape, generator=generator, dtype=torch.float64) * std
        self.core = nn.Parameter(core.to(dtype=dtype, device=device))
        for i, (n, r) in enumerate(zip(self.full_shape, ranks)):
            u = None if r is None else random_orthonormal(n, r, generator, dtype, device)
            self.register_buffer(f"U{i}", u)
        self.capture = False
        self._x: Optional[torch.Tensor] = None
        self._g: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ factors and ranks
    @property
    def factors(self) -> List[Optional[torch.Tensor]]:
        return [getattr(self, f"U{i}") for i in range(self.order)]

    def set_factor(self, i: int, u: torch.Tensor) -> None:
        setattr(self, f"U{i}", u)

    @property
    def adapted(self) -> List[bool]:
        return [u is not None for u in self.factors]

    @property
    def ranks(self) -> Tuple[int, ...]:
        """Current rank of every mode (the full size for a mode that is not adapted)."""
        return tuple(int(s) for s in self.core.shape)

    def init_from_dense(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> "LowRankLayer":
        """Truncated HOSVD of a dense weight (reshaped to ``full_shape``) at the current ranks; bias copied."""
        ranks = [None if u is None else u.shape[1] for u in self.factors]
        core, factors = hosvd(weight.detach().reshape(self.full_shape), ranks)
        replace_data(self.core, core)
        for i, u in enumerate(factors):
            self.set_factor(i, u)
        if bias is not None:
            self.bias.data = bias.detach().clone()
        return self

    def weight_full(self) -> torch.Tensor:
        """The dense weight this layer represents (for tests, export and diagnostics; not used in forward)."""
        return reconstruct(self.core, self.factors)

    def num_params(self) -> int:
        """Stored weight parameters: prod(r_i) + sum over stored factors of n_i r_i (bias excluded)."""
        return self.core.numel() + sum(u.numel() for u in self.factors if u is not None)

    def dense_num_params(self) -> int:
        return math.prod(self.full_shape)

    def train_num_params(self) -> int:
        """Parameters alive during an integrator step: augmented bases min(2r, n) and their core."""
        aug = [min(2 * r, n) if a else n for r, n, a in zip(self.ranks, self.full_shape, self.adapted)]
        return math.prod(aug) + sum(n * r for n, r, a in zip(self.full_shape, aug, self.adapted) if a)

    # ------------------------------------------------------------------ gradient capture
    def _expand_out(self, h: torch.Tensor) -> torch.Tensor:
        """The last stage of a factorised conv: a 1x1 conv with U0 (r0 -> out channels) plus the bias, once."""
        bias = None if self.bias is None else self.bias.to(h.dtype)
        if self.U0 is None:
            return h if bias is None else h + bias[:, None, None]
        return F.conv2d(h, self.U0[:, :, None, None].to(h.dtype), bias)

    def _forward_core(self, x: torch.Tensor) -> torch.Tensor:
        """The core as the forward pass uses it. On a step that captures (an adapting step), the integrator
        replaces the core's gradient by the Galerkin gradient, so autograd need not form it: the core enters
        detached whenever the output still needs a gradient through the input or the bias, so that the
        capture hook fires and the input's gradient flows as before."""
        if (self.capture and self.training and torch.is_grad_enabled()
                and (x.requires_grad or (self.bias is not None and self.bias.requires_grad))):
            return self.core.detach()
        return self.core

    def _record(self, x: torch.Tensor, out: torch.Tensor) -> None:
        if self.capture and self.training and out.requires_grad:
            self._x = x.detach()
            out.register_hook(self._record_grad)

    def _record_grad(self, g: torch.Tensor) -> None:
        self._g = g.detach()

    @property
    def has_capture(self) -> bool:
        return self._x is not None and self._g is not None

    def clear_capture(self) -> None:
        self._x = self._g = None

    def projected_grad(self, a_out: Optional[torch.Tensor], a_in: Optional[torch.Tensor]) -> torch.Tensor:
        """``Z x_0 a_out^T x_1 a_in^T`` with Z = dL/dW at the captured point (None: identity).

        The kernel modes (2, 3 of a conv) are returned at full size; contract them with
        :func:`~tdlrt_cli.lowrank.tucker.mode_product` where needed.
        """
        raise NotImplementedError

    # ------------------------------------------------------------------ checkpoints with changing ranks
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Resize core and factors to the checkpoint's ranks before the usual copy."""
        for name in ["core"] + [f"U{i}" for i in range(self.order)]:
            key, current = prefix + name, getattr(self, name)
            if key in state_dict and current is not None and current.shape != state_dict[key].shape:
                fresh = torch.empty(state_dict[key].shape, dtype=current.dtype, device=current.device)
                if name == "core":
                    replace_data(self.core, fresh)
                else:
                    setattr(self, name, fresh)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"full_shape={self.full_shape}, ranks={self.ranks}"


def _one_by_one(t: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Apply ``a^T`` to the channels of an image batch (a 1x1 conv with kernel a^T)."""
    return F.conv2d(t, a.transpose(0, 1)[:, :, None, None].to(t.dtype))


class TuckerConv2d(LowRankLayer):
    """A 2-d convolution whose kernel W (out, in, kh, kw) is kept in Tucker form and never built.

    Forward: 1x1 conv with ``U1^T`` (in -> r1), the k x k conv with ``C x_2 U2 x_3 U3`` (r1 -> r0, the
    original stride/padding/dilation), then 1x1 conv with ``U0`` (r0 -> out) plus the bias, once.
    """

    order = 4
    is_conv = True

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 bias: bool = True, ranks: Sequence[Optional[int]] = (None, None, None, None),
                 rank_bounds: Optional[Sequence[Tuple[int, int]]] = None, dtype=None, device=None,
                 generator: Optional[torch.Generator] = None, weight_std: Optional[float] = None):
        super().__init__()
        kh, kw = nn.modules.utils._pair(kernel_size)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, (kh, kw)
        self.stride, self.padding, self.dilation = (nn.modules.utils._pair(v) for v in (stride, padding, dilation))
        full = (out_channels, in_channels, kh, kw)
        bounds = rank_bounds or [(1, n) for n in full]
        self._init_lowrank(full, ranks, bounds, dtype, device, generator, weight_std)
        self.bias = nn.Parameter(torch.zeros(out_channels, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, ranks: Sequence[Optional[int]],
                  rank_bounds: Optional[Sequence[Tuple[int, int]]] = None) -> "TuckerConv2d":
        """Compress an ``nn.Conv2d`` by truncated HOSVD of its kernel (``ranks[i]=None``: mode kept full)."""
        if conv.groups != 1 or not isinstance(conv.padding, tuple) or conv.padding_mode != "zeros":
            raise ValueError("only convs with groups=1, numeric padding and zero padding mode can be factorised")
        w = conv.weight
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.bias is not None, ranks, rank_bounds, dtype=w.dtype, device=w.device)
        return layer.init_from_dense(w, conv.bias)

    def small_kernel(self, core: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The k x k kernel of the middle conv: ``C x_2 U2 x_3 U3`` (shape r0 x r1 x kh x kw)."""
        return multi_mode_product(self.core if core is None else core, [None, None, self.U2, self.U3])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if self.U1 is None else _one_by_one(x, self.U1)
        kernel = self.small_kernel(self._forward_core(x))
        h = F.conv2d(h, kernel.to(h.dtype), None, self.stride, self.padding, self.dilation)
        out = self._expand_out(h)
        self._record(x, out)
        return out

    def projected_grad(self, a_out, a_in):
        dtype = torch.promote_types(self.core.dtype, torch.float32)
        x, g = self._x.to(dtype), self._g.to(dtype)
        if a_in is not None:
            x = _one_by_one(x, a_in)
        if a_out is not None:
            g = _one_by_one(g, a_out)
        shape = (g.shape[1], x.shape[1]) + self.kernel_size
        return torch.nn.grad.conv2d_weight(x, shape, g, self.stride, self.padding, self.dilation)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, ranks={self.ranks}, bias={self.bias is not None}")


class LowRankLinear(LowRankLayer):
    """``y = x W^T + b`` with ``W = U0 C U1^T`` (out x in), the order-2 case of the same integrator."""

    order = 2

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 ranks: Sequence[Optional[int]] = (None, None),
                 rank_bounds: Optional[Sequence[Tuple[int, int]]] = None, dtype=None, device=None,
                 generator: Optional[torch.Generator] = None, weight_std: Optional[float] = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        full = (out_features, in_features)
        self._init_lowrank(full, ranks, rank_bounds or [(1, n) for n in full], dtype, device, generator, weight_std)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, ranks: Sequence[Optional[int]],
                    rank_bounds: Optional[Sequence[Tuple[int, int]]] = None) -> "LowRankLinear":
        """Compress an ``nn.Linear`` by truncated SVD of its weight."""
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, ranks, rank_bounds,
                    dtype=w.dtype, device=w.device)
        return layer.init_from_dense(w, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if self.U1 is None else F.linear(x, self.U1.transpose(0, 1).to(x.dtype))
        h = F.linear(h, self._forward_core(x).to(h.dtype))
        bias = None if self.bias is None else self.bias.to(h.dtype)
        out = F.linear(h, self.U0.to(h.dtype), bias) if self.U0 is not None else (h if bias is None else h + bias)
        self._record(x, out)
        return out

    def projected_grad(self, a_out, a_in):
        dtype = torch.promote_types(self.core.dtype, torch.float32)
        x = self._x.to(dtype).reshape(-1, self.in_features)
        g = self._g.to(dtype).reshape(-1, self.out_features)
        if a_in is not None:
            x = x @ a_in
        if a_out is not None:
            g = g @ a_out
        return g.transpose(0, 1) @ x

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, ranks={self.ranks}"
