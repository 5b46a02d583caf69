"""Data parallel training under ``torchrun`` (one process per GPU, or gloo processes on the CPU).

Low-rank layers change shape whenever ranks change, so ``DistributedDataParallel`` (which buckets
gradients of fixed shapes once) does not fit. Instead every process keeps a full replica and
:class:`Distributed` supplies three small operations that the training loop and the TDLRT integrator call:

* :meth:`Distributed.mean_` averages a list of tensors of any shapes through one flattened all-reduce
  (basis gradients, Galerkin core gradients, dense gradients), rebuilt at every step;
* :meth:`Distributed.broadcast_` sends the first process's tensor to all (truncation decisions are taken
  on process 0 and broadcast, so every replica keeps the same ranks);
* :meth:`Distributed.sync_model` copies process 0's parameters and buffers to all at the start;
  :meth:`Distributed.sync_batchnorm` its BatchNorm statistics (the only state that is computed from each
  process's own data) once per epoch. Everything else stays identical by construction, which
  :meth:`Distributed.fingerprints` checks at the end of the run.

Only process 0 writes logs and checkpoints.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import List, Sequence

import torch
import torch.nn as nn


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mean_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Average ``tensors`` over the processes, in place, with one all-reduce of their concatenation."""
        tensors = [t for t in tensors if t is not None]
        if not self.enabled or not tensors:
            return
        import torch.distributed as dist

        dtype = tensors[0].dtype
        for t in tensors[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
        flat = torch.cat([t.reshape(-1).to(dtype) for t in tensors])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset:offset + n].view_as(t))
            offset += n

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            import torch.distributed as dist

            dist.all_reduce(tensor)
        return tensor

    def max_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            import torch.distributed as dist

            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def broadcast_(self, tensor: torch.Tensor) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.broadcast(tensor, src=0)

    def broadcast_object(self, obj):
        """Process 0's ``obj`` (any picklable value) on every process."""
        if not self.enabled:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sync_model(self, model: nn.Module) -> None:
        """Process 0's parameters and buffers to every process (shapes agree: ranks are broadcast)."""
        if not self.enabled:
            return
        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                self.broadcast_(t.data)

    def sync_batchnorm(self, model: nn.Module) -> None:
        if not self.enabled:
            return
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    for t in m.buffers():
                        self.broadcast_(t.data)

    def fingerprints(self, model: nn.Module) -> List[str]:
        """A hash of every process's weights and buffers (bitwise), gathered on all processes."""
        h = hashlib.sha256()
        for name, t in sorted(model.state_dict().items()):
            h.update(name.encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        mine = h.hexdigest()[:16]
        if not self.enabled:
            return [mine]
        import torch.distributed as dist

        out: List[str] = [""] * self.world
        dist.all_gather_object(out, mine)
        return out

    def close(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def init_distributed(device: torch.device) -> Distributed:
    """Join the process group ``torchrun`` describes (WORLD_SIZE > 1); a single process otherwise.

    Each process uses ``cuda:LOCAL_RANK`` on GPUs (nccl) or the CPU (gloo).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(rank, world)
