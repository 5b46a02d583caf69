"""`tdlrt export <run folder or checkpoint> out=FILE [format=pt2|onnx] [merge=chain|auto|dense]`.

The trained network becomes plain PyTorch: every factorised layer is replaced by its chain of standard
convs (or, where one dense conv with the reconstructed kernel is clearly faster, by that conv: ``merge=auto``
times both on the layer's real input shape and merges only at :data:`MERGE_MARGIN` or more), BatchNorm is
folded into the conv before it, and the result is saved as a ``torch.export`` program (``.pt2``, loaded with
``torch.export.load``, no tdlrt needed) or as ONNX. A JSON file next to it (written after it) records the
run, the per-layer choices and the check that the export computes what the low-rank network computes.
"""
from __future__ import annotations

import copy
import os
import re
import statistics
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .cost import flops, timings_ms
from .errors import ConfigError, UserError, exit_on_user_error
from .faults import faults
from .files import (atomic_write_text, disk_full_error, is_disk_full, remove_stale_temporaries, signals_deferred,
                    strict_json)
from .lowrank.export import conv_chain, is_factorised, merged
from .metrics import parameter_report
from .options import check_device, check_output_file, parse_args
from .programs import trace_program, write_program
from .runs import CHOICES, TrainedRun, load_run

FORMATS = ("pt2", "onnx")
MERGE = ("auto", "chain", "dense")
# merge=auto: a layer becomes one dense conv only when that is at least this much faster than its chain
# (median time); slower, equal or less faster keeps the chain, which stores fewer parameters.
MERGE_MARGIN = 0.10


def _quartiles(xs: Sequence[float]) -> Tuple[float, float, float]:
    xs = list(xs)
    return tuple(statistics.quantiles(xs, n=4, method="inclusive")) if len(xs) > 1 else (xs[0],) * 3


def merge_decision(chain_ms: Sequence[float], dense_ms: Sequence[float],
                   margin: float = MERGE_MARGIN) -> Tuple[str, str]:
    """("dense" or "chain", why) from repeated timings of a layer's chain and of its merged conv: merge only
    when the merged conv's median is at least ``margin`` below the chain's and the two do not overlap (its
    upper quartile below the chain's lower quartile: the difference is not noise). Ties keep the chain."""
    (c1, c, _), (_, d, d3) = _quartiles(chain_ms), _quartiles(dense_ms)
    fast_enough = d <= (1 - margin) * c and c > 0
    why = f"median {d:.3g} ms merged vs {c:.3g} ms chain"
    if fast_enough and d3 < c1:
        return "dense", f"{why}: merged {1 - d / c:.0%} faster, >= {margin:.0%}"
    if fast_enough:
        return "chain", f"{why}: the quartiles overlap, the difference is timing noise"
    return "chain", f"{why}: merged not {margin:.0%} faster"


@dataclass
class ExportOptions:
    source: str
    out: Optional[str] = None
    format: str = "pt2"
    merge: str = "chain"          # chain (default: keep the compression), auto (time each layer), dense
    checkpoint: str = "selected"  # run folders: selected (the network of summary.json's test_acc), best, last
    device: str = "cpu"           # where merge=auto measures (cpu, cuda, cuda:N, auto)
    merge_batch: int = 1          # the batch size merge=auto measures at
    repeat: int = 20
    threads: int = 0              # CPU threads of torch; 0: as `tdlrt train` (threads=null)

    def validate(self) -> "ExportOptions":
        if self.format not in FORMATS:
            raise ConfigError(f"format={self.format} is not one of: {', '.join(FORMATS)}")
        if self.merge not in MERGE:
            raise ConfigError(f"merge={self.merge} is not one of: {', '.join(MERGE)}")
        if self.checkpoint not in CHOICES:
            raise ConfigError(f"checkpoint={self.checkpoint} is not one of: {', '.join(CHOICES)}")
        if self.threads < 0:
            raise ConfigError(f"threads={self.threads} must be >= 1 (0: automatic, as tdlrt train's threads=null)")
        if self.merge_batch < 1 or self.repeat < 1:
            raise ConfigError(f"merge_batch={self.merge_batch} and repeat={self.repeat} must be >= 1")
        check_device(self.device)
        return self


@dataclass
class LayerChoice:
    layer: str
    exported: str                 # "chain" or "dense"
    chain_ms: Optional[float] = None  # merge=auto: median ms per call
    dense_ms: Optional[float] = None
    chain_params: int = 0
    dense_params: int = 0
    reason: str = ""              # why: merge=chain/dense, no chain form, or the timing comparison
    chain_iqr_ms: Optional[float] = None
    dense_iqr_ms: Optional[float] = None
    chain_times_ms: List[float] = field(default_factory=list)  # every timed block, ms per call
    dense_times_ms: List[float] = field(default_factory=list)


@dataclass
class ExportReport:
    out: str
    format: str
    merge: str
    source: str
    max_abs_error: float
    layers: List[LayerChoice] = field(default_factory=list)
    compression_rate: Optional[float] = None      # conv c.r. (%) of the exported network
    run_compression_rate: Optional[float] = None  # conv c.r. (%) of the run's network
    checkpoint: str = ""          # which network, in words: the file, its epoch, why it was chosen


def _input_shapes(model: nn.Module, example: torch.Tensor) -> dict:
    shapes, hooks = {}, []

    def record(name):
        def hook(module, args):
            shapes[name] = args[0].shape
        return hook

    for name, m in model.named_modules():
        if is_factorised(m):
            hooks.append(m.register_forward_pre_hook(record(name)))
    with torch.no_grad():
        model(example)
    for h in hooks:
        h.remove()
    return shapes


def unpruned_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in which every layer pruned with ``torch.nn.utils.prune`` (the snip, grasp
    and imp baselines) is a plain layer whose weight is the masked one, ``weight_orig * weight_mask``
    (``prune.remove``); ``model`` itself is left as it is.

    A pruned layer holds its masked weight as a tensor computed from ``weight_orig``, which
    ``copy.deepcopy`` refuses (only graph leaves can be deep-copied): the copy gets a detached clone of it,
    which ``prune.remove`` then replaces by the product of the copied ``weight_orig`` and mask."""
    from torch.nn.utils import prune

    memo = {}
    for m in model.modules():
        for hook in m._forward_pre_hooks.values():
            if isinstance(hook, prune.BasePruningMethod):
                masked = getattr(m, hook._tensor_name)
                memo[id(masked)] = masked.detach().clone()
    net = copy.deepcopy(model, memo)
    for m in net.modules():
        for hook in list(m._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                prune.remove(m, hook._tensor_name)
    return net


def plain_network(model: nn.Module, example: torch.Tensor, merge: str = "auto", device: str = "cpu",
                  merge_batch: int = 1, repeat: int = 20) -> Tuple[nn.Module, List[LayerChoice]]:
    """A copy of ``model`` made of standard torch modules only, BatchNorm folded (a ``torch.fx`` graph)."""
    from torch.fx.experimental.optimization import fuse

    net = unpruned_copy(model).eval().cpu()
    shapes = _input_shapes(net, example.cpu())
    choices = []
    for name, m in list(net.named_modules()):
        if not is_factorised(m):
            continue
        dense = merged(m)
        try:
            chain = conv_chain(m)
        except ValueError:
            chain = None
        choice = LayerChoice(name, "dense" if chain is None or merge == "dense" else "chain",
                             chain_params=sum(p.numel() for p in chain.parameters()) if chain is not None else 0,
                             dense_params=sum(p.numel() for p in dense.parameters()),
                             reason="no chain form" if chain is None else f"merge={merge}")
        if merge == "auto" and chain is not None:
            x = torch.randn(merge_batch, *shapes[name][1:], device=device)
            tc, td = timings_ms([chain.to(device), dense.to(device)], x, repeat=repeat)
            choice.chain_ms, choice.chain_iqr_ms, choice.chain_times_ms = tc["median"], tc["iqr"], tc["times"]
            choice.dense_ms, choice.dense_iqr_ms, choice.dense_times_ms = td["median"], td["iqr"], td["times"]
            choice.exported, choice.reason = merge_decision(tc["times"], td["times"])
            chain.cpu(), dense.cpu()
        parent, _, child = name.rpartition(".")
        setattr(net.get_submodule(parent) if parent else net, child, dense if choice.exported == "dense" else chain)
        choices.append(choice)
    net.eval().requires_grad_(False)
    return fuse(net).eval(), choices


def stale_temporaries(out: Path) -> "re.Pattern":
    """The names of the temporaries an export to ``out`` writes: ``.tmp-<pid>-<name>`` (also the probe of
    :func:`check_output_file`), and ``.tmp-<name>`` of older versions."""
    return re.compile(rf"^\.tmp-(?:(?P<pid>\d+)-)?{re.escape(out.name)}$")


def write_atomically(program, out: Path, fmt: str, metadata: dict) -> None:
    """The program to a temporary file beside ``out``, fsynced, renamed over ``out``; then the sidecar
    ``out.json`` (atomically too). The old sidecar goes first, so no sidecar ever describes another file."""
    sidecar = Path(str(out) + ".json")
    tmp = out.with_name(f".tmp-{os.getpid()}-{out.name}")  # same suffix: torch.export wants a .pt2 name
    try:
        write_program(program, tmp, fmt, metadata)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        faults.signal_at("export_write")
        with signals_deferred():  # a Ctrl-C from here on comes once both files are in place
            sidecar.unlink(missing_ok=True)
            os.replace(tmp, out)
            atomic_write_text(sidecar, strict_json(metadata))
    except (OSError, RuntimeError) as exc:  # torch reports a failed write as a RuntimeError
        if is_disk_full(exc, out.parent):
            raise disk_full_error(out) from None
        reason = getattr(exc, "strerror", None) or str(exc).strip().splitlines()[-1][:160]
        raise UserError(f"cannot write {out} ({reason}); choose a writable out=FILE") from None
    finally:
        tmp.unlink(missing_ok=True)


def export(opts: ExportOptions) -> ExportReport:
    opts.validate()
    from .runtime import resolve_device, set_threads

    set_threads(opts.threads or None)
    device = str(resolve_device(opts.device))
    if opts.out:
        out = Path(opts.out).expanduser()
        if out.suffix != f".{opts.format}" and not out.is_dir():
            raise ConfigError(f"out={out} must end in .{opts.format} for format={opts.format} (tdlrt eval "
                              f"recognises exports by it)")
        check_output_file(out, f"model.{opts.format}")
    if Path(opts.source).suffix in (".pt2", ".onnx") and Path(opts.source).is_file():
        raise ConfigError(f"{opts.source} is an export already; export a run folder or a checkpoint (.pt)")
    run = load_run(opts.source, opts.checkpoint)
    if not opts.out:
        ckpt = run.checkpoint  # a run folder: <run>/model.<format>; a checkpoint file: beside it
        in_run = ckpt.parent.name == "checkpoints"
        out = ckpt.parent.parent / f"model.{opts.format}" if in_run else ckpt.with_suffix(f".{opts.format}")
        check_output_file(out)
    remove_stale_temporaries(out.parent, stale_temporaries(out))
    example = run.example(batch=4)
    net, choices = plain_network(run.model, example, opts.merge, device, opts.merge_batch, opts.repeat)
    with torch.no_grad():
        want = run.model(example)
        error = float((net(example) - want).abs().max())
    if error > 1e-4 * max(1.0, float(want.abs().max())):
        warnings.warn(f"the exported network differs from the low-rank one by up to {error:.2e} on a test batch")
    report = ExportReport(str(out), opts.format, opts.merge, str(run.checkpoint), error, choices,
                          *exported_compression(net, run.model), checkpoint=run.describe())
    metadata = {"tdlrt_export": asdict(report), **input_spec(run), "config": run.config,
                "flops_forward": flops(net, example[:2], train=False)}
    write_atomically(trace_program(net, example, opts.format), out, opts.format, metadata)
    return report


def input_spec(run: TrainedRun) -> dict:
    """What the program takes and gives, for the sidecar: the input's shape (N, C, H, W: N free), dtype and
    normalisation, the classes, and the checkpoint it came from."""
    from .data import normalisation

    c, k, size = run.data_shape
    recorded = run.data_input or {}
    if recorded.get("mean") and recorded.get("std"):
        mean, std, how = recorded["mean"], recorded["std"], "as the run normalised its data"
    else:  # checkpoints written before the run recorded it
        fixed = normalisation(run.cfg.data.name, run.cfg.data)
        mean, std = (list(fixed[0]), list(fixed[1])) if fixed else (None, None)
        how = "the dataset's" if fixed else "unknown: measured on the run's training images, not recorded"
    classes = recorded.get("classes")
    return {
        "input": {"shape": ["N", c, size, size], "layout": "NCHW", "dtype": "float32",
                  "batch": "N from 1 to 65536",
                  "pixels": "RGB" if c == 3 else "grey", "scale": "pixel values / 255, then (x - mean) / std per channel",
                  "mean": mean, "std": std, "normalisation": how},
        "output": {"shape": ["N", k], "meaning": "logits, one per class (argmax: the predicted class)"},
        "classes": k, "class_names": classes if isinstance(classes, list) and len(classes) == k else None,
        "checkpoint": {"file": str(run.checkpoint), "epoch": run.state_epoch, "selected": run.selected,
                       "described": run.describe()},
    }


def exported_compression(net: nn.Module, model: nn.Module) -> Tuple[float, float]:
    """Conv c.r. (%) of the exported network (its conv weights: chains and dense convs) and of the run's."""
    params = parameter_report(model)
    dense = params["conv_params_dense"]
    kept = sum(m.weight.numel() for m in net.modules() if isinstance(m, nn.Conv2d))
    return (100.0 * (1 - kept / dense) if dense else 0.0), params["compression_rate"]


def print_report(report: ExportReport, file=sys.stdout) -> None:
    if report.merge == "auto":  # the decision of every layer, on stderr
        for c in report.layers:
            print(f"tdlrt: merge=auto: {c.layer}: {c.exported} ({c.reason})", file=sys.stderr)
    print(f"{'layer':<24} {'exported':>8} {'chain ms':>9} {'dense ms':>9} {'chain params':>13} {'dense params':>13}",
          file=file)
    for c in report.layers:
        fmt = (lambda v: f"{v:9.3f}" if v is not None else f"{'-':>9}")
        print(f"{c.layer:<24} {c.exported:>8} {fmt(c.chain_ms)} {fmt(c.dense_ms)} {c.chain_params:>13} "
              f"{c.dense_params:>13}", file=file)
    print(f"wrote {report.out} ({report.format}, merge={report.merge}) from {report.checkpoint}; max |export - "
          f"low-rank| = {report.max_abs_error:.2e} on a test batch; conv c.r. {report.compression_rate:.1f}% "
          f"(the run's: {report.run_compression_rate:.1f}%); its input and classes: {report.out}.json", file=file)


USAGE = """usage: tdlrt export <run folder or checkpoint> [out=FILE] [format=pt2|onnx] [merge=chain|auto|dense]
                    [checkpoint=selected|best|last] [device=cpu|cuda] [threads=N] [merge_batch=1]
                    [repeat=20]

Writes the trained network as plain PyTorch: factorised layers become chains of standard convs (the default,
merge=chain, keeps the compression; merge=auto times both forms and merges a layer into one dense conv only
where that is at least 10% faster, which gives the compression of that layer up; the decision of every layer
goes to stderr), BatchNorm is folded. checkpoint=selected (the default) exports the network whose accuracy
summary.json and `tdlrt report` give: best.pt, chosen on the validation split, or last.pt for a run without
one. The last line names the checkpoint and gives the exported network's conv c.r. out defaults to
<run folder>/model.<format>; FILE.json beside it records the input (shape N,C,H,W, dtype, mean and std), the
classes, the checkpoint, and the choices and timings."""


def main(argv: List[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        sys.exit(0 if argv else 2)
    with exit_on_user_error():
        report = export(parse_args(argv, ExportOptions, "source"))
    print_report(report)
