"""`tdlrt export <run folder or checkpoint> out=FILE [format=pt2|onnx] [merge=auto|chain|dense]`.

The trained network becomes plain PyTorch: every factorised layer is replaced by its chain of standard
convs (or, where that chain is slower than one dense conv with the reconstructed kernel, by that conv:
``merge=auto`` times both on the layer's real input shape), BatchNorm is folded into the conv before it,
and the result is saved as a ``torch.export`` program (``.pt2``, loaded with ``torch.export.load``, no
tdlrt needed) or as ONNX. A JSON file next to it records the run, the per-layer choices and the check
that the export computes what the low-rank network computes.
"""
from __future__ import annotations

import copy
import json
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

import torch
import torch.nn as nn

from .cost import flops, latency_ms
from .errors import ConfigError, UserError, exit_on_user_error
from .files import atomic_write_text, strict_json
from .lowrank.export import conv_chain, is_factorised, merged
from .runs import load_trained

FORMATS = ("pt2", "onnx")
MERGE = ("auto", "chain", "dense")


@dataclass
class ExportOptions:
    source: str
    out: Optional[str] = None
    format: str = "pt2"
    merge: str = "auto"
    checkpoint: str = "last"      # last | best (run folders)
    device: str = "cpu"           # where merge=auto measures (cpu, cuda, cuda:N, auto)
    merge_batch: int = 1          # the batch size merge=auto measures at
    repeat: int = 20

    def validate(self) -> "ExportOptions":
        if self.format not in FORMATS:
            raise ConfigError(f"format={self.format} is not one of: {', '.join(FORMATS)}")
        if self.merge not in MERGE:
            raise ConfigError(f"merge={self.merge} is not one of: {', '.join(MERGE)}")
        if self.checkpoint not in ("last", "best"):
            raise ConfigError(f"checkpoint={self.checkpoint} is not one of: last, best")
        if self.merge_batch < 1 or self.repeat < 1:
            raise ConfigError("merge_batch and repeat must be >= 1")
        return self


@dataclass
class LayerChoice:
    layer: str
    exported: str                 # "chain" or "dense"
    chain_ms: Optional[float] = None
    dense_ms: Optional[float] = None
    chain_params: int = 0
    dense_params: int = 0


@dataclass
class ExportReport:
    out: str
    format: str
    merge: str
    source: str
    max_abs_error: float
    layers: List[LayerChoice] = field(default_factory=list)


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


def plain_network(model: nn.Module, example: torch.Tensor, merge: str = "auto", device: str = "cpu",
                  merge_batch: int = 1, repeat: int = 20) -> Tuple[nn.Module, List[LayerChoice]]:
    """A copy of ``model`` made of standard torch modules only, BatchNorm folded (a ``torch.fx`` graph)."""
    from torch.fx.experimental.optimization import fuse
    from torch.nn.utils import prune

    net = copy.deepcopy(model).eval().cpu()
    for m in net.modules():
        if isinstance(m, nn.Conv2d) and hasattr(m, "weight_orig"):
            prune.remove(m, "weight")  # pruning baselines: bake the mask into the weight
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
                             dense_params=sum(p.numel() for p in dense.parameters()))
        if merge == "auto" and chain is not None:
            x = torch.randn(merge_batch, *shapes[name][1:], device=device)
            choice.chain_ms = latency_ms(chain.to(device), x, repeat=repeat)
            choice.dense_ms = latency_ms(dense.to(device), x, repeat=repeat)
            choice.exported = "dense" if choice.dense_ms < choice.chain_ms else "chain"
            chain.cpu(), dense.cpu()
        parent, _, child = name.rpartition(".")
        setattr(net.get_submodule(parent) if parent else net, child, dense if choice.exported == "dense" else chain)
        choices.append(choice)
    net.eval().requires_grad_(False)
    return fuse(net).eval(), choices


def save_program(net: nn.Module, example: torch.Tensor, out: Path, fmt: str, metadata: dict) -> None:
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    if fmt == "pt2":
        program = torch.export.export(net, (example,), dynamic_shapes=({0: batch},))
        torch.export.save(program, str(out), extra_files={"tdlrt.json": json.dumps(metadata)})
        return
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise UserError('format=onnx needs the onnx and onnxscript packages: pip install "tdlrt[export]"') from None
    program = torch.onnx.export(net, (example,), dynamo=True, dynamic_shapes=({0: batch},), verbose=False)
    program.save(str(out))


def export(opts: ExportOptions) -> ExportReport:
    opts.validate()
    from .train import resolve_device

    device = str(resolve_device(opts.device))
    run = load_trained(opts.source, opts.checkpoint)
    if opts.out:
        out = Path(opts.out)
    elif run.checkpoint.parent.name == "checkpoints":  # a run folder: <run>/model.<format>
        out = run.checkpoint.parent.parent / f"model.{opts.format}"
    else:
        out = run.checkpoint.with_suffix(f".{opts.format}")
    out.parent.mkdir(parents=True, exist_ok=True)
    example = run.example(batch=4)
    net, choices = plain_network(run.model, example, opts.merge, device, opts.merge_batch, opts.repeat)
    with torch.no_grad():
        want = run.model(example)
        error = float((net(example) - want).abs().max())
    if error > 1e-4 * max(1.0, float(want.abs().max())):
        warnings.warn(f"the exported network differs from the low-rank one by up to {error:.2e} on a test batch")
    report = ExportReport(str(out), opts.format, opts.merge, str(run.checkpoint), error, choices)
    metadata = {"tdlrt_export": asdict(report), "data_shape": list(run.data_shape), "config": run.config,
                "flops_forward": flops(net, example[:2], train=False)}
    tmp = out.with_name(f".tmp-{out.name}")  # same suffix: torch.export wants a .pt2 name
    save_program(net, example, tmp, opts.format, metadata)
    tmp.replace(out)
    atomic_write_text(Path(str(out) + ".json"), strict_json(metadata))
    return report


def print_report(report: ExportReport, file=sys.stdout) -> None:
    print(f"{'layer':<24} {'exported':>8} {'chain ms':>9} {'dense ms':>9} {'chain params':>13} {'dense params':>13}",
          file=file)
    for c in report.layers:
        fmt = (lambda v: f"{v:9.3f}" if v is not None else f"{'-':>9}")
        print(f"{c.layer:<24} {c.exported:>8} {fmt(c.chain_ms)} {fmt(c.dense_ms)} {c.chain_params:>13} "
              f"{c.dense_params:>13}", file=file)
    print(f"wrote {report.out} ({report.format}, merge={report.merge}); max |export - low-rank| = "
          f"{report.max_abs_error:.2e} on a test batch", file=file)


def parse_args(argv: List[str], cls, positional: str):
    """``PATH key=value ...`` into the dataclass ``cls`` (``--help`` prints its fields)."""
    kwargs, names = {}, {f for f in cls.__dataclass_fields__}
    for arg in argv:
        if "=" in arg:
            key, value = arg.split("=", 1)
            if key not in names or key == positional:
                raise ConfigError(f"unknown option {key!r}; options: {', '.join(sorted(names - {positional}))}")
            default = cls.__dataclass_fields__[key].default
            if isinstance(default, bool):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ConfigError(f"{key}={value} is not true or false")
                kwargs[key] = value.lower() in ("true", "1", "yes")
                continue
            try:
                kwargs[key] = type(default)(value) if isinstance(default, (int, float)) else value
            except ValueError:
                raise ConfigError(f"{key}={value} is not a valid {type(default).__name__}") from None
        elif positional not in kwargs:
            kwargs[positional] = arg
        else:
            raise ConfigError(f"unexpected argument {arg!r}")
    if positional not in kwargs:
        raise ConfigError(f"missing the {positional} (a run folder, checkpoint or export file)")
    return cls(**kwargs)


USAGE = """usage: tdlrt export <run folder or checkpoint> [out=FILE] [format=pt2|onnx] [merge=auto|chain|dense]
                    [checkpoint=last|best] [device=cpu|cuda] [merge_batch=1] [repeat=20]

Writes the trained network as plain PyTorch: factorised layers become chains of standard convs (merge=auto
keeps a chain only where it is faster than the merged dense conv, measured), BatchNorm is folded.
out defaults to <run folder>/model.<format>; FILE.json beside it records the choices."""


def main(argv: List[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        sys.exit(0 if argv else 2)
    with exit_on_user_error():
        report = export(parse_args(argv, ExportOptions, "source"))
    print_report(report)
