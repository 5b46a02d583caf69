"""What a run says on the console and in train.log besides its epoch lines: the start block, the pace of a
slow CPU epoch, and the adapted modes that finished at a rank bound."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch

from .config import TrainConfig
from .logs import Console
from .metrics import lowrank_named, parameter_report


def start_block(cfg: TrainConfig, run_dir: Path, data, model, total_epochs: int, device: torch.device,
                resumed_at: Optional[int]) -> list:
    """The lines a run starts with: where it writes, and the settings that decide what it trains."""
    m, o = cfg.method, cfg.optimizer
    method = m.name + (f" tau {cfg.tau}" if cfg.tau is not None else "") + (
        f" rank_frac {m.rank_frac}" if m.rank_frac is not None else "") + (
        f" target_cr {m.target_cr}%" if m.target_cr is not None else "") + (
        f" at the ranks of {m.ranks_from}" if getattr(m, "ranks_from", None) else "") + (
        f" from {cfg.init_from}" + (" (decomposed)" if m.name in ("tucker", "tt", "matrix") else "")
        if cfg.init_from else "")
    params = sum(p.numel() for p in model.parameters())
    return [
        f"tdlrt train: run folder {run_dir}" + (f" (resumed at epoch {resumed_at + 1})" if resumed_at is not None else ""),
        f"  model {cfg.model.name}" + (f" x{cfg.model.width_mult}" if cfg.model.width_mult != 1 else "")
        + (f" {cfg.model.arch}" + (f" (weights {cfg.model.weights})" if cfg.model.weights else "")
           if cfg.model.name == "torchvision" else "")
        + f" ({params:,} trainable parameters) | data {cfg.data.name}: {data_counts(cfg, data)}"
        + f" | method {method}",
        f"  optimizer {o.name} lr {cfg.lr} weight_decay {cfg.weight_decay}, scheduler {cfg.scheduler.name} | "
        f"{total_epochs} epoch{'s' if total_epochs != 1 else ''} of {len(data.train)} steps, batch {cfg.batch_size} | "
        f"device {device}{threads_note() if device.type == 'cpu' else ''}, {cfg.precision} "
        f"| seed {cfg.seed}",
    ] + ([conversion_line(model, m.target_cr is not None and m.name != "dense", m.convert_linear)]
         if m.name != "dense" else [])


LAYER_KINDS = {"TuckerConv2d": "Tucker conv", "MatrixConv2d": "matrix conv", "LowRankLinear": "linear",
               "TrainedTuckerConv2d": "Tucker conv (trained factors)", "FixedTuckerConv2d": "fixed-rank Tucker conv",
               "CPConv2d": "CP conv", "TTConv2d": "TT conv", "MatrixFixedConv2d": "fixed-rank matrix conv"}


def conversion_line(model, target: bool, linear: bool) -> str:
    """How many layers of which kind became low-rank, which stayed dense, and what the target rule counts."""
    import torch.nn as nn

    kinds: dict = {}
    for module in model.modules():
        if callable(getattr(module, "dense_num_params", None)):
            name = LAYER_KINDS.get(type(module).__name__, type(module).__name__)
        elif isinstance(module, nn.Conv2d) and hasattr(module, "weight_mask"):
            name = "pruned conv"
        elif isinstance(module, nn.Conv2d):
            name = "dense grouped/depthwise conv" if module.groups > 1 else "dense conv"
        elif isinstance(module, nn.Linear):
            name = "dense linear"  # the classifier; hidden ones too unless method.convert_linear
        else:
            continue
        kinds[name] = kinds.get(name, 0) + 1
    low = [f"{k} x{n}" for k, n in kinds.items() if not k.startswith(("dense ", "pruned"))]
    kept = [f"{k[len('dense '):] if k.startswith('dense ') else k} x{n}" for k, n in kinds.items()
            if k.startswith(("dense ", "pruned"))]
    line = "  layers: low-rank " + (", ".join(low) if low else "none") + (" | dense " + ", ".join(kept) if kept else "")
    if target:
        report = parameter_report(model)
        counted = report["conv_params_dense"] + (report["linear_params_dense"] if linear else 0)
        line += (f" | the target counts {'conv kernels and linear weights' if linear else 'conv kernels'} "
                 f"({counted:,} dense)")
    return line


def data_counts(cfg: TrainConfig, data) -> str:
    """The examples of each split, and why an epoch sees fewer training examples than there are: the partial
    last batch is dropped (the order is shuffled every epoch, so a different few each time)."""
    def count(loader) -> str:
        n = getattr(loader, "num_examples", None)
        return f"{n:,}" if n is not None else "?"

    size = getattr(data.train, "dataset_size", None)
    world = getattr(data.train, "world", 1)  # data parallel: the batches of all processes
    seen = getattr(data.train, "num_examples", None)
    seen = None if seen is None else seen * world
    text = f"the first {cfg.data.limit_train:,} training images (data.limit_train): " if cfg.data.limit_train else ""
    text += f"{size:,} train" if size is not None else f"{count(data.train)} train"
    if data.val is not None:
        text += f" + {count(data.val)} validation (data.val_split)"
    if size is not None and seen is not None and seen < size:
        text += (f"; an epoch uses {seen:,} ({len(data.train) * world} whole batches of {cfg.batch_size}"
                 f"{f' over {world} processes' if world > 1 else ''}, the {size - seen} left over change every epoch)")
    return text + f"; {count(data.test)} test"


def threads_note() -> str:
    n = torch.get_num_threads()
    return f" ({n} thread{'s' if n != 1 else ''})"


def pace_note(device: torch.device, steps: int, say: Callable[[str], None]) -> Callable[[float], None]:
    """After the first steps: on a CPU, how long an epoch will take when that is long, and what is faster."""
    def note(seconds_per_step: float) -> None:
        epoch_s = seconds_per_step * steps
        if device.type == "cpu" and epoch_s > 600:
            hours, minutes = divmod(round(epoch_s / 60), 60)
            say(f"tdlrt: note: an epoch takes about {f'{hours} h ' if hours else ''}{minutes} min on this CPU "
                f"({seconds_per_step:.1f} s per step, {torch.get_num_threads()} threads); device=cuda on a GPU, "
                f"+experiment=quick for a small run, or threads=N if other jobs share this machine's cores")
    return note


def pinned_modes(model) -> dict:
    """Adapted modes whose final rank sits at a bound: ``{"r_max": [...], "r_min": [...]}`` of "layer/mode".
    At r_max the tolerance never cut that mode (the reported compression is the cap's, not an adaptation);
    at r_min the tolerance took all it was allowed to."""
    pinned = {"r_max": [], "r_min": []}
    for name, layer in lowrank_named(model):
        for i, (r, (lo, hi), adapted) in enumerate(zip(layer.ranks, layer.rank_bounds, layer.adapted)):
            if not adapted or lo == hi:
                continue
            mode = ("out", "in", "kh", "kw")[i] if layer.order == 4 else ("out", "in")[i]
            if r >= min(hi, layer.full_shape[i]):
                pinned["r_max"].append(f"{name}/{mode}")
            elif r <= lo:
                pinned["r_min"].append(f"{name}/{mode}")
    return pinned


def warn_pinned(pinned: dict, total: int, say: Callable[[str], None] = Console(), target: bool = False,
                cap_is_full: bool = False) -> None:
    """``cap_is_full``: the caps are the modes' full sizes (method.r_max_frac=1), which nothing can raise."""
    def listed(modes: list) -> str:
        return ", ".join(modes[:6]) + (", ..." if len(modes) > 6 else "")

    if target:  # the target rule: a mode at a bound is the budget's choice, worth a note, not a warning
        if pinned["r_max"]:
            say(f"tdlrt: note: {len(pinned['r_max'])} of {total} adapted modes finished at "
                + (f"full rank ({listed(pinned['r_max'])}): the budget kept them whole" if cap_is_full else
                   f"their cap ({listed(pinned['r_max'])}): the budget kept them whole (method.r_max_frac raises "
                   f"the cap)"))
        return
    if pinned["r_max"]:
        say(f"tdlrt: warning: {len(pinned['r_max'])} of {total} adapted modes finished at r_max "
            f"({listed(pinned['r_max'])}): their ranks were never cut below the cap; a larger tau, a larger "
            f"method.r_max_frac or more epochs adapts them")
    if pinned["r_min"]:
        say(f"tdlrt: warning: {len(pinned['r_min'])} of {total} adapted modes finished at r_min "
            f"({listed(pinned['r_min'])}): tau may be too large for them (or method.r_min too high)")

