"""Swap the ``nn.Conv2d`` (and optionally ``nn.Linear``) layers of any module for low-rank layers."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .layers import LowRankLinear, TuckerConv2d, weight_rms


@dataclass
class RankPolicy:
    """Rank bounds and starting ranks of the adapted modes.

    Channel modes of size n: ``r_max`` (absolute) or ``r_max_frac * n`` (default n/2, so that augmentation
    to 2r fits), ``r_min`` below, starting at ``init_rank`` / ``init_rank_frac * n`` / r_max. Kernel modes,
    adapted only with ``adapted_modes="all"``, range over [1, k] and start full. A matrix (LowRankLinear)
    has one rank for both modes, bounded by its smaller side.
    """

    r_min: int = 2
    r_max: Optional[int] = None
    r_max_frac: float = 0.5
    init_rank: Optional[int] = None
    init_rank_frac: Optional[float] = None
    adapted_modes: str = "channels"  # "channels" (out, in) or "all"

    def check(self, n: int) -> None:
        """Explicit ranks must fit a mode of size ``n`` (``r_max`` is a cap and is clipped to n), and the cap
        ``r_max_frac * n`` may not fall to 0 (it would hold the mode below ``r_min``)."""
        for key in ("init_rank", "r_min"):
            value = getattr(self, key)
            if value is not None and value > n:
                raise ValueError(f"{key}={value} is larger than the layer (a mode of size {n})")
        if self.r_max is None and int(self.r_max_frac * n) < 1:
            raise ValueError(f"r_max_frac={self.r_max_frac:g} caps a mode of size {n} at rank 0, below "
                             f"r_min={self.r_min}")

    def bounds(self, n: int) -> Tuple[int, int]:
        hi = self.r_max if self.r_max is not None else int(self.r_max_frac * n)
        hi = max(1, min(hi, n))
        return min(self.r_min, hi), hi

    def initial(self, n: int) -> int:
        lo, hi = self.bounds(n)
        if self.init_rank is not None:
            r = self.init_rank
        elif self.init_rank_frac is not None:
            r = round(self.init_rank_frac * n)
        else:
            r = hi
        return max(lo, min(r, hi))

    def layout(self, full_shape: Sequence[int]) -> Tuple[List[Optional[int]], List[Tuple[int, int]]]:
        """Starting ranks (None: mode kept full) and rank bounds for a weight of ``full_shape``."""
        if len(full_shape) == 2:  # a matrix: both modes share its rank
            n = min(full_shape)
            self.check(n)
            return [self.initial(n)] * 2, [self.bounds(n)] * 2
        ranks, bounds = [], []
        for i, n in enumerate(full_shape):
            if i < 2:
                self.check(n)
                ranks.append(self.initial(n))
                bounds.append(self.bounds(n))
            elif self.adapted_modes == "all":
                ranks.append(n)
                bounds.append((1, n))
            else:
                ranks.append(None)
                bounds.append((n, n))
        return ranks, bounds


@dataclass
class ConversionRules:
    """Which layers become low-rank. The first conv and the classifier stay dense by default; grouped and
    depthwise convs always (their kernel is not one tensor over the channels), and so do the linear layers of
    ``nn.MultiheadAttention`` (it reads their weights, never calls them). ``pointwise="matrix"``: 1x1 convs are
    the order-2 case, a matrix factorisation U S V^T (matrix DLRT) instead of a Tucker tensor with two
    kernel modes of size 1."""

    convert_conv: bool = True
    convert_linear: bool = False
    convert_first_conv: bool = False
    convert_classifier: bool = False
    exclude: Sequence[str] = field(default_factory=tuple)  # fnmatch patterns of module names
    pointwise: str = "tucker"  # 1x1 convs: "tucker" (as any conv) or "matrix" (the order-2 case)


def _matrix_conv(conv: nn.Conv2d, policy: RankPolicy, generator) -> nn.Module:
    from .baselines import MatrixConv2d

    w = conv.weight
    ranks, bounds = policy.layout((w.shape[0], w[0].numel()))
    return MatrixConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                        conv.dilation, conv.bias is not None, ranks, bounds, dtype=w.dtype, device=w.device,
                        generator=generator, weight_std=weight_rms(w))


def weights_read_directly(model: nn.Module) -> set:
    """Names of the layers whose parent's ``forward`` reads their ``.weight`` instead of calling them (Swin's
    window attention passes ``self.qkv.weight`` to a function): replacing them would break the parent."""
    import inspect

    read = set()
    for name, parent in model.named_modules():
        children = [c for c, _ in parent.named_children()]
        if not children:
            continue
        try:
            source = inspect.getsource(type(parent).forward)
        except (OSError, TypeError):
            continue
        for child in children:
            if f"self.{child}.weight" in source or f"self.{child}.bias" in source:
                read.add(f"{name}.{child}" if name else child)
    return read


def eligible_conv(m: nn.Module) -> bool:
    return (isinstance(m, nn.Conv2d) and m.groups == 1 and isinstance(m.padding, tuple)
            and m.padding_mode == "zeros" and min(m.in_channels, m.out_channels) > 1)


def convert_to_lowrank(model: nn.Module, policy: RankPolicy = RankPolicy(), rules: ConversionRules = ConversionRules(),
                       init: str = "random", generator: Optional[torch.Generator] = None,
                       conv_format: str = "tucker") -> List[str]:
    """Replace eligible layers of ``model`` in place; returns the names of the converted layers.

    ``conv_format="tucker"``: :class:`TuckerConv2d`; ``"matrix"``: :class:`MatrixConv2d` (the kernel
    reshaped to out x in*kh*kw, for matrix DLRT); ``"trained_tucker"``: :class:`.pruning.TrainedTuckerConv2d`
    (factors trained by the optimizer, for gradual pruning without the integrator).
    ``init="random"``: orthonormal random factors and a core scaled so that W starts with the replaced
    layer's weight scale (root mean square), at the policy's starting ranks.
    ``init="hosvd"``: truncated HOSVD of each layer's current weight (compressing a trained network).
    Convs with groups != 1, string padding or non-zero padding modes stay dense.
    """
    if init not in ("random", "hosvd"):
        raise ValueError(f"init must be 'random' or 'hosvd', got {init!r}")
    if rules.pointwise not in ("tucker", "matrix"):
        raise ValueError(f"rules.pointwise must be 'tucker' or 'matrix', got {rules.pointwise!r}")
    named = list(model.named_modules())
    convs = [n for n, m in named if isinstance(m, nn.Conv2d)]
    linears = [n for n, m in named if isinstance(m, nn.Linear)]
    first_conv = convs[0] if convs else None
    classifier = linears[-1] if linears else None
    attention = [n + "." for n, m in named if isinstance(m, nn.MultiheadAttention)]
    read = weights_read_directly(model)
    converted = []
    for name, module in named:
        if any(name.startswith(a) for a in attention) or name in read:
            continue  # nn.MultiheadAttention uses out_proj.weight directly; so does Swin's attention its qkv
        try:
            new = _lowrank_like(name, module, policy, rules, first_conv, classifier, conv_format, generator)
        except ValueError as exc:
            raise ValueError(f"layer {name}: {exc}") from None
        if new is None:
            continue
        if init == "hosvd":
            new.init_from_dense(module.weight, module.bias)
        elif module.bias is not None:
            new.bias.data = module.bias.detach().clone()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        converted.append(name)
    return converted


def _lowrank_like(name: str, module: nn.Module, policy: RankPolicy, rules: ConversionRules, first_conv, classifier,
                  conv_format: str, generator) -> Optional[nn.Module]:
    """The low-rank replacement of ``module`` (at the policy's starting ranks), or None to keep it dense."""
    if any(fnmatch.fnmatch(name, p) for p in rules.exclude):
        return None
    if rules.convert_conv and eligible_conv(module) and (rules.convert_first_conv or name != first_conv):
        if conv_format == "matrix" or (conv_format == "tucker" and rules.pointwise == "matrix"
                                       and tuple(module.kernel_size) == (1, 1)):
            return _matrix_conv(module, policy, generator)
        ranks, bounds = policy.layout(module.weight.shape)
        cls = TuckerConv2d
        if conv_format == "trained_tucker":
            from .pruning import TrainedTuckerConv2d as cls
        return cls(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                            module.padding, module.dilation, module.bias is not None, ranks, bounds,
                            dtype=module.weight.dtype, device=module.weight.device, generator=generator,
                            weight_std=weight_rms(module.weight))
    if (rules.convert_linear and isinstance(module, nn.Linear) and min(module.weight.shape) > 1
            and (rules.convert_classifier or name != classifier)):
        ranks, bounds = policy.layout(module.weight.shape)
        return LowRankLinear(module.in_features, module.out_features, module.bias is not None, ranks, bounds,
                             dtype=module.weight.dtype, device=module.weight.device, generator=generator,
                             weight_std=weight_rms(module.weight))
    return None
