"""What a network costs: parameters, FLOPs, peak memory and measured latency, dense and low-rank side by side."""
from __future__ import annotations

import math
import weakref
from contextlib import contextmanager
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class _AllocationTracker(TorchDispatchMode):
    """Bytes of the tensor storages created by the operators run inside it, live and at their peak."""

    def __init__(self):
        super().__init__()
        self.live: Dict[int, list] = {}  # storage pointer -> [bytes, tensors alive]
        self.current = self.peak = 0

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if not key:
                    continue
                if key in self.live:
                    self.live[key][1] += 1
                else:
                    self.live[key] = [storage.nbytes(), 1]
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                weakref.finalize(t, self._release, key)
        return out


def peak_memory_bytes(fn: Callable[[], object], model: nn.Module, inputs: torch.Tensor) -> int:
    """Peak memory of ``fn()``: the CUDA allocator's peak on a GPU; on the CPU the weights and inputs plus
    the peak of the tensors created while it runs (activations, saved tensors, gradients)."""
    if inputs.is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(inputs.device)
        start = torch.cuda.memory_allocated(inputs.device)
        fn()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated(inputs.device) - start + _state_bytes(model) + inputs.nbytes)
    tracker = _AllocationTracker()
    with tracker:
        result = fn()
    del result
    return int(tracker.peak + _state_bytes(model) + inputs.nbytes)


def _state_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def timings_ms(modules: Sequence[nn.Module], x: torch.Tensor, repeat: int = 10,
               min_block_s: float = 0.005) -> List[dict]:
    """Milliseconds per call of each ``module(x)`` under inference mode, measured with
    ``torch.utils.benchmark.Timer`` (which synchronises the GPU): after a warm-up, ``repeat`` rounds that each
    time one block of calls (at least ``min_block_s`` long) of every module in turn, interleaved so that a
    change of machine load hits all of them alike. Per module: ``median`` and ``iqr`` (interquartile range)
    over the blocks and ``times``, every block's time per call."""
    from torch.utils.benchmark import Measurement, Timer

    timers = [Timer("module(x)", globals={"module": m, "x": x}, num_threads=torch.get_num_threads()) for m in modules]
    runs: List[list] = [[] for _ in modules]
    with torch.inference_mode():
        numbers = []
        for timer in timers:
            timer.timeit(1)  # warm-up
            once = timer.timeit(1).median
            numbers.append(max(1, math.ceil(min_block_s / max(once, 1e-9))))
        for _ in range(repeat):
            for timer, number, got in zip(timers, numbers, runs):
                got.append(timer.timeit(number))
    out = []
    for got in runs:
        m = Measurement.merge(got)[0]
        out.append({"median": m.median * 1e3, "iqr": m.iqr * 1e3, "times": [t * 1e3 for t in m.times]})
    return out


def latency(module: nn.Module, x: torch.Tensor, repeat: int = 10) -> dict:
    """``timings_ms`` of one module: ``{"median": ms, "iqr": ms, "times": [ms, ...]}``."""
    return timings_ms([module], x, repeat)[0]


def weight_counts(model: nn.Module) -> Dict[str, int]:
    """Parameters of a plain network (export or dense): conv kernels (4-d weights) and all."""
    state = {k: v for k, v in model.state_dict().items() if v.is_floating_point() and "running_" not in k}
    return {"conv": sum(v.numel() for v in state.values() if v.ndim == 4),
            "total": sum(v.numel() for v in state.values())}


@contextmanager
def measuring(model: nn.Module, train: bool):
    """Run ``model`` in train or eval mode for a measurement and leave no trace: BatchNorm statistics
    restored, captured activations of low-rank layers dropped, the previous mode set back."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    was_training = model.training
    model.train(train)
    try:
        yield model
    finally:
        model.train(was_training)
        with torch.no_grad():
            for b, saved in buffers:
                if b.shape == saved.shape:
                    b.copy_(saved)
        for m in model.modules():
            if hasattr(m, "clear_capture"):
                m.clear_capture()


def _train_step(model: nn.Module, x: torch.Tensor):
    params = [p for p in model.parameters() if p.requires_grad]
    out = model(x)
    if not params:
        return out
    return torch.autograd.grad(F.cross_entropy(out.float(), out.argmax(1)), params, allow_unused=True)


def flops(model: nn.Module, x: torch.Tensor, train: bool) -> float:
    """FLOPs per image of a forward pass, or with ``train`` of forward and backward (a multiply-add is 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    with measuring(model, train), FlopCounterMode(display=False) as counter:
        if train:
            _train_step(model, x)
        else:
            with torch.no_grad():
                model(x)
    return counter.get_total_flops() / x.shape[0]


def training_peak_memory(model: nn.Module, x: torch.Tensor) -> int:
    """Peak memory of one forward and backward pass (bytes)."""
    with measuring(model, True):
        return peak_memory_bytes(lambda: _train_step(model, x), model, x)


def measure(model: nn.Module, example: torch.Tensor, batches=(1, 128), repeat: int = 10, trainable: bool = True,
            opaque_flops: Optional[float] = None, latency_too: bool = True) -> dict:
    """One network's measured costs: FLOPs per image (forward; forward and backward), peak memory
    (inference at the largest batch; a training step at it), latency at each batch size (ms; median and
    interquartile range over ``repeat`` timed blocks).

    ``trainable=False`` (an exported program): no training figures. ``opaque_flops``: a network torch
    cannot look into (an ONNX Runtime session): its forward FLOPs as recorded at export, no memory figures.
    """
    model.eval()
    big = example[:1].expand(max(batches), *example.shape[1:]).contiguous()
    small = example[:2].contiguous()
    row = {"flops_forward": opaque_flops if opaque_flops is not None else flops(model, small, train=False),
           "flops_train": None, "peak_memory_inference_mb": None, "peak_memory_train_mb": None}
    if opaque_flops is None:
        with torch.inference_mode():
            row["peak_memory_inference_mb"] = peak_memory_bytes(lambda: model(big), model, big) / 2 ** 20
        if trainable:
            row["flops_train"] = flops(model, small, train=True)
            row["peak_memory_train_mb"] = training_peak_memory(model, big) / 2 ** 20
    for b in batches if latency_too else ():
        t = latency(model, big[:b], repeat=repeat)
        row[f"latency_ms_batch{b}"], row[f"latency_iqr_ms_batch{b}"] = t["median"], t["iqr"]
    return row


def cost_report(lowrank: nn.Module, dense: nn.Module, example: torch.Tensor, parameters: dict,
                batches=(1, 128), repeat: int = 10, trainable: bool = True, opaque_flops: Optional[dict] = None,
                runtime: str = "torch", latency_too: bool = True) -> dict:
    """The whole report: ``parameters`` (counts and compression rates) and the measured figures of both
    networks on ``example``'s device, both run by ``runtime``. ``opaque_flops`` ({"dense": ..., "lowrank":
    ...}): forward FLOPs of networks torch cannot look into (ONNX Runtime sessions). ``latency_too=False``:
    only the deterministic figures (parameters, FLOPs, memory), no timing."""
    device = torch.cuda.get_device_name(example.device) if example.is_cuda else "cpu"
    opaque = opaque_flops or {}
    return {"parameters": parameters, "batches": list(batches),
            "dense": measure(dense, example, batches, repeat, True, opaque.get("dense"), latency_too),
            "lowrank": measure(lowrank, example, batches, repeat, trainable, opaque.get("lowrank"), latency_too),
            "device": device, "threads": torch.get_num_threads(), "runtime": runtime}


def latency_unreliable(dense: dict, lowrank: dict, b: int) -> bool:
    """A latency comparison at batch ``b`` whose spread (the larger interquartile range) exceeds the
    difference of the medians it reports: the ratio could go either way on a rerun."""
    a, m = dense.get(f"latency_ms_batch{b}"), lowrank.get(f"latency_ms_batch{b}")
    spread = max(dense.get(f"latency_iqr_ms_batch{b}") or 0.0, lowrank.get(f"latency_iqr_ms_batch{b}") or 0.0)
    return a is not None and m is not None and spread > abs(a - m)


def format_report(report: dict) -> str:
    """The cost report as a text table: dense, low-rank and their ratio side by side."""
    p = report["parameters"]
    lines = [f"{'':<30} {'dense':>14} {'low-rank':>14} {'ratio':>8}"]

    def row(label, a, b, fmt="{:,.0f}"):
        ratio = f"{b / a:8.3f}" if a and b is not None else f"{'-':>8}"
        shown = (fmt.format(b) if b is not None else "-")
        lines.append(f"{label:<30} {fmt.format(a):>14} {shown:>14} {ratio}")

    row("parameters (all)", p["params_dense"], p["params"])
    row("parameters (conv kernels)", p["conv_params_dense"], p["conv_params"])
    if p.get("params_train") is not None:
        row("parameters (during training)", p["params_dense"], p["params_train"])
    d, lr = report["dense"], report["lowrank"]
    row("inference MFLOPs / image", d["flops_forward"] / 1e6, lr["flops_forward"] / 1e6, "{:,.2f}")
    if d["flops_train"] is not None:
        row("training MFLOPs / image", d["flops_train"] / 1e6,
            lr["flops_train"] / 1e6 if lr["flops_train"] is not None else None, "{:,.2f}")
    big = max(report.get("batches") or [int(k.rsplit("batch", 1)[1]) for k in d if k.startswith("latency_ms_batch")])
    if d["peak_memory_inference_mb"] is not None and lr["peak_memory_inference_mb"] is not None:
        row(f"peak memory inference b{big} (MB)", d["peak_memory_inference_mb"], lr["peak_memory_inference_mb"],
            "{:,.1f}")
    if lr["peak_memory_train_mb"] is not None:
        row(f"peak memory train step b{big} (MB)", d["peak_memory_train_mb"], lr["peak_memory_train_mb"], "{:,.1f}")
    def latency_text(side, b):  # median [interquartile range]
        iqr = side.get(f"latency_iqr_ms_batch{b}")
        return f"{side[f'latency_ms_batch{b}']:,.2f}" + (f" [{iqr:.2f}]" if iqr is not None else "")

    for b in sorted(int(k.rsplit("batch", 1)[1]) for k in d if k.startswith("latency_ms_batch")):
        a, m = d[f"latency_ms_batch{b}"], lr[f"latency_ms_batch{b}"]
        ratio = f"{m / a:8.3f}" if a else f"{'-':>8}"
        label = f"latency b{b} ms: median [IQR]"
        lines.append(f"{label:<30} {latency_text(d, b):>14} {latency_text(lr, b):>14} {ratio}"
                     + ("  unreliable: spread > difference" if latency_unreliable(d, lr, b) else ""))
    cr = (f"compression rate: conv {p['compression_rate']:.1f}%, whole network {p['compression_rate_total']:.1f}%"
          + (f", during training {p['compression_rate_train']:.1f}%" if p.get("compression_rate_train") is not None
             else " (an export: BatchNorm folded into the convs of both networks, so the whole network counts no "
                  "BatchNorm parameters; a run's summary.json counts them)"))
    lines.append(cr)
    runtime = report.get("runtime", "torch")
    lines.append(f"measured on {report['device']} ({report['threads']} torch threads)"
                 + (f"; both networks run by {runtime} (FLOPs counted by torch at export)" if runtime != "torch"
                    else ""))
    return "\n".join(lines)
