"""Factorised layers as standard torch layers, for export: the chain of convs each one computes, or the
dense conv it equals.

``conv_chain(layer)`` builds ``nn.Conv2d`` / ``nn.Linear`` modules that compute exactly what the layer's
forward computes (same order of operations), so an exported network needs nothing but torch.
``merged(layer)`` is the single dense ``nn.Conv2d`` / ``nn.Linear`` with the reconstructed kernel
``W = C x_0 U0 x_1 U1 ...``: the same function, one kernel, often faster for small layers.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn as nn

from .baselines import CPConv2d, FixedTuckerConv2d, MatrixConv2d, MatrixFixedConv2d, TTConv2d
from .layers import LowRankLayer, LowRankLinear, TuckerConv2d

FACTORISED = (LowRankLayer, FixedTuckerConv2d, CPConv2d, TTConv2d, MatrixFixedConv2d)


def is_factorised(module: nn.Module) -> bool:
    return isinstance(module, FACTORISED)


def _conv(weight: torch.Tensor, bias=None, stride=1, padding=0, dilation=1, groups=1) -> nn.Conv2d:
    out_c, in_per_group, kh, kw = weight.shape
    conv = nn.Conv2d(in_per_group * groups, out_c, (kh, kw), stride, padding, dilation, groups, bias is not None,
                     dtype=weight.dtype, device=weight.device)
    conv.weight.data.copy_(weight)
    if bias is not None:
        conv.bias.data.copy_(bias)
    return conv


def _linear(weight: torch.Tensor, bias=None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias is not None, dtype=weight.dtype, device=weight.device)
    lin.weight.data.copy_(weight)
    if bias is not None:
        lin.bias.data.copy_(bias)
    return lin


def _1x1(a: torch.Tensor) -> torch.Tensor:
    return a[:, :, None, None]


@torch.no_grad()
def conv_chain(layer: nn.Module) -> nn.Sequential:
    """The layer as a chain of standard layers computing the same function.

    Tucker:  1x1 ``U1^T`` (in -> r1), kxk ``C x_2 U2 x_3 U3`` (r1 -> r0, the layer's stride/padding/dilation),
             1x1 ``U0`` (r0 -> out) + bias.
    Matrix (DLRT) conv: kxk ``U1^T`` (in -> r1), 1x1 ``U0 C`` (r1 -> out) + bias.
    Linear: ``U1^T`` (in -> r1), ``U0 C`` (r1 -> out) + bias.
    CP, TT, fixed Tucker and fixed matrix: their own conv stages.
    """
    bias = None if getattr(layer, "bias", None) is None else layer.bias.detach()
    parts: List[nn.Module] = []
    if isinstance(layer, TuckerConv2d):
        if layer.U1 is not None:
            parts.append(_conv(_1x1(layer.U1.transpose(0, 1))))
        last = layer.U0 is None
        parts.append(_conv(layer.small_kernel(), bias if last else None, layer.stride, layer.padding, layer.dilation))
        if not last:
            parts.append(_conv(_1x1(layer.U0), bias))
    elif isinstance(layer, MatrixConv2d):
        first = layer._first_kernel(layer.U1) if layer.U1 is not None else None
        if first is None:
            raise ValueError("a matrix conv without an input factor has no chain form; export it merged")
        parts.append(_conv(first, None, layer.stride, layer.padding, layer.dilation))
        out = layer.core if layer.U0 is None else layer.U0 @ layer.core
        parts.append(_conv(_1x1(out), bias))
    elif isinstance(layer, LowRankLinear):
        if layer.U1 is not None:
            parts.append(_linear(layer.U1.transpose(0, 1)))
        out = layer.core if layer.U0 is None else layer.U0 @ layer.core
        parts.append(_linear(out, bias))
    elif isinstance(layer, FixedTuckerConv2d):
        parts += [_conv(_1x1(layer.U1.t())), _conv(layer.core, None, layer.stride, layer.padding, layer.dilation),
                  _conv(_1x1(layer.U0), bias)]
    elif isinstance(layer, CPConv2d):
        r = layer.A.shape[1]
        (sh, sw), (ph, pw), (dh, dw) = layer.stride, layer.padding, layer.dilation
        parts += [_conv(_1x1(layer.B.t())),
                  _conv(layer.Kh.t()[:, None, :, None], None, (sh, 1), (ph, 0), (dh, 1), groups=r),
                  _conv(layer.Kw.t()[:, None, None, :], None, (1, sw), (0, pw), (1, dw), groups=r),
                  _conv(_1x1(layer.A), bias)]
    elif isinstance(layer, TTConv2d):
        (sh, sw), (ph, pw), (dh, dw) = layer.stride, layer.padding, layer.dilation
        parts += [_conv(layer.G1), _conv(layer.G2, None, (sh, 1), (ph, 0), (dh, 1)),
                  _conv(layer.G3, None, (1, sw), (0, pw), (1, dw)), _conv(layer.G4, bias)]
    elif isinstance(layer, MatrixFixedConv2d):
        parts += [_conv(layer.V, None, layer.stride, layer.padding, layer.dilation), _conv(layer.U, bias)]
    else:
        raise TypeError(f"no chain form for {type(layer).__name__}")
    for p in parts:
        p.requires_grad_(False)
    return nn.Sequential(*parts)


@torch.no_grad()
def merged(layer: nn.Module) -> nn.Module:
    """The single dense conv (or linear) whose kernel is the layer's reconstructed weight."""
    weight = layer.weight_full().detach()
    bias = None if getattr(layer, "bias", None) is None else layer.bias.detach()
    if isinstance(layer, LowRankLinear):
        module = _linear(weight, bias)
    else:
        module = _conv(weight, bias, layer.stride, layer.padding, layer.dilation)
    return module.requires_grad_(False)
