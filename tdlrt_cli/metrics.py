"""Parameter counts, compression rates, FLOPs and test accuracy of a (possibly low-rank) network."""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F

from .distributed import Distributed
from .lowrank import LowRankLayer


def _rate(lowrank: int, dense: int) -> float:
    return 100.0 * (1.0 - lowrank / dense) if dense else 0.0


def parameter_report(model: nn.Module) -> Dict[str, float]:
    """Parameter counts and compression rates (percent), the same way for every method.

    ``compression_rate``: the paper's c.r., conv kernels only: 1 - (conv weights of this network) /
    (conv weights of the dense network). ``compression_rate_total``: all parameters.
    ``compression_rate_train``: all parameters alive during a step (for TDLRT: augmented bases and core).
    ``compression_rate_weights``: conv kernels and linear weight matrices (what ``method.convert_linear`` adapts;
    attention's query, key and value projections, parameters of ``nn.MultiheadAttention``, count as linear).
    Factorised layers count their stored factors; pruned convs count their unmasked weights.
    """
    compressed = [m for m in model.modules() if callable(getattr(m, "dense_num_params", None))]
    pruned = [m for m in model.modules() if isinstance(m, nn.Conv2d) and hasattr(m, "weight_mask")]
    owned = {id(p) for m in compressed for n, p in m.named_parameters() if n != "bias"}
    owned |= {id(m.weight_orig) for m in pruned}
    other = sum(p.numel() for p in model.parameters() if id(p) not in owned)
    plain_convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and not hasattr(m, "weight_mask")]
    kept = sum(int(m.weight_mask.sum()) for m in pruned)
    conv_dense = sum(m.weight.numel() for m in plain_convs + pruned)
    conv_lr = sum(m.weight.numel() for m in plain_convs) + kept
    conv_layers = [m for m in compressed if getattr(m, "is_conv", False)]
    conv_dense += sum(m.dense_num_params() for m in conv_layers)
    conv_lr += sum(m.num_params() for m in conv_layers)
    plain_linears = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    plain_linears += sum(w.numel() for m in model.modules() if isinstance(m, nn.MultiheadAttention)  # its q, k, v
                         for w in (m.in_proj_weight, m.q_proj_weight, m.k_proj_weight, m.v_proj_weight) if w is not None)
    linear_layers = [m for m in compressed if not getattr(m, "is_conv", False)]
    linear_dense = plain_linears + sum(m.dense_num_params() for m in linear_layers)
    linear_lr = plain_linears + sum(m.num_params() for m in linear_layers)
    masked_total = sum(m.weight.numel() for m in pruned)
    dense_total = other + masked_total + sum(m.dense_num_params() for m in compressed)
    params = other + kept + sum(m.num_params() for m in compressed)
    train = other + kept + sum(m.train_num_params() for m in compressed)
    return {
        "params": params, "params_dense": dense_total, "params_train": train,
        "conv_params": conv_lr, "conv_params_dense": conv_dense,
        "linear_params": linear_lr, "linear_params_dense": linear_dense,
        "compression_rate": _rate(conv_lr, conv_dense),
        "compression_rate_total": _rate(params, dense_total),
        "compression_rate_train": _rate(train, dense_total),
        "compression_rate_weights": _rate(conv_lr + linear_lr, conv_dense + linear_dense),
    }


def layer_ranks(model: nn.Module) -> Dict[str, List[int]]:
    """Current ranks of every low-rank layer, per mode (out, in, kh, kw for convs; out, in for linears)."""
    return {name: list(m.ranks) for name, m in model.named_modules()
            if isinstance(m, LowRankLayer) or callable(getattr(m, "dense_num_params", None))}


def flops_per_image(model: nn.Module, example: torch.Tensor) -> Dict[str, float]:
    """Forward and forward+backward FLOPs per image (torch.utils.flop_counter; a multiply-add is 2 FLOPs)."""
    from .cost import flops

    x = example[:2]
    return {"flops_forward": flops(model, x, train=False), "flops_train": flops(model, x, train=True)}


@torch.no_grad()
def evaluate(model, loader, amp, device, dist: Distributed = Distributed()) -> tuple:
    """Test loss and accuracy (%); data parallel processes evaluate their share and add up."""
    model.eval()
    sums = torch.zeros(3, device=device, dtype=torch.float64)  # loss, correct, examples
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with amp():
            out = model(x)
        sums[0] += F.cross_entropy(out.float(), y, reduction="sum").double()
        sums[1] += (out.argmax(1) == y).sum()
        sums[2] += len(y)
    loss, correct, n = dist.sum_(sums).tolist()
    return loss / max(n, 1), 100.0 * correct / max(n, 1)


def lowrank_named(model: nn.Module) -> list:
    """``(name, layer)`` of the network's rank-adaptive layers, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LowRankLayer)]
