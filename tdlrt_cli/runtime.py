"""Process-wide settings a command applies before it works: the device, CPU threads."""
from __future__ import annotations

import os
from typing import Optional

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
    import torch

    n = resolve_threads(threads)
    torch.set_num_threads(n)
    return n


def resolve_device(name: str):
    """``device=`` as a torch.device: auto (CUDA if there is a GPU, else the CPU), cpu, cuda, cuda:N; a GPU
    that is not there is a ConfigError."""
    import torch

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
