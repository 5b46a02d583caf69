"""What a command sets up before it works: the device, CPU threads, seeds; and a run's optimizer and schedule."""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
import torch.nn as nn

from .config import TrainConfig

MAX_AUTO_THREADS = 8


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def resolve_threads(threads: Optional[int]) -> int:
    """The number of intra-op threads for torch: ``threads`` when given; else ``$OMP_NUM_THREADS`` when set
    to a positive number; else half the available CPUs (at least 1, at most 8). PyTorch's own default (every
    core) collapses when two runs share a machine: threads spin waiting for cores the other run holds."""
    if threads:
        return int(threads)
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, min(MAX_AUTO_THREADS, available_cpus() // 2))


def set_threads(threads: Optional[int]) -> int:
    """Apply :func:`resolve_threads` to torch; returns the number set."""
    n = resolve_threads(threads)
    torch.set_num_threads(n)
    return n


def resolve_device(name: str):
    """``device=`` as a torch.device: auto (CUDA if there is a GPU, else the CPU), cpu, cuda, cuda:N; a GPU
    that is not there is a ConfigError."""
    from .errors import ConfigError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device={name} but no CUDA GPU is visible; use device=cpu or device=auto")
        index = torch.device(name).index or 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device={name} but only {torch.cuda.device_count()} CUDA GPU(s) are visible")
    return torch.device(name)


def seed_everything(seed: int, deterministic: bool) -> None:
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Weight decay on conv/linear weights and low-rank cores (decay on a core = decay on W), none on
    biases and normalisation parameters. Low-rank factors are buffers and never reach the optimizer."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    o = cfg.optimizer
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=o.nesterov and cfg.momentum > 0)
    cls = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
    return cls(groups, lr=cfg.lr, betas=tuple(o.betas), eps=o.eps)


def build_scheduler(cfg: TrainConfig, optimizer, steps_per_epoch: int):
    """Per-step schedules (cosine with warm-up, onecycle, step) or per-epoch ReduceLROnPlateau."""
    s, total = cfg.scheduler, max(1, cfg.epochs * steps_per_epoch)
    if s.name == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total, pct_start=s.pct_start)
    if s.name == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=s.factor, patience=s.patience,
                                                          min_lr=s.min_lr)
    warmup = s.warmup_epochs * steps_per_epoch

    def factor(step: int) -> float:
        if s.name == "none":
            return 1.0
        if s.name == "step":
            return s.gamma ** ((step // steps_per_epoch) // s.step_size)
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        floor = s.min_lr / cfg.lr
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

