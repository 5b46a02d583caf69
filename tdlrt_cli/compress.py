"""`tdlrt compress SOURCE [target_cr=90] [epochs=5] [out=DIR] [KEY=VALUE ...]`: a trained network compressed to a
target conv compression rate, with its test accuracy before, right after the decomposition and after fine-tuning.

SOURCE is a dense tdlrt run folder or checkpoint (its model and data settings are taken over), a state dict of a
torchvision network (give ``model.arch=NAME`` and ``data=...``), or torchvision weights by name
(``ResNet50_Weights.IMAGENET1K_V2``; give ``data=...``). Three ``tdlrt train`` runs go under ``out`` (default
``outputs/compress/<source>-cr<target>``), each a run folder of its own, skipped when finished and resumed when
stopped, so the same command continues where it was stopped:

  dense/      method=dense epochs=0: the source network as it is
  oneshot/    method=tucker method.target_cr=T epochs=0: truncated HOSVD of every conv at the ranks the one-shot
              allocation picks for the target (the decomposition without any training)
  finetuned/  method=tdlrt_target method.target_cr=T epochs=E: HOSVD at the target rule's starting ranks, then
              E epochs of TDLRT, the ranks cut to the target on the rule's schedule

then ``compress.json`` and ``compress.md`` (the table it prints). KEY=VALUE overrides go to all three runs
(``lr=0.01 batch_size=64 data.root=...``).
"""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from .errors import ConfigError, UserError, exit_on_user_error, say_stopped, stopped_by
from .files import atomic_write_text, load_json

USAGE = """usage: tdlrt compress SOURCE [target_cr=90] [epochs=5] [out=DIR] [KEY=VALUE ...]

SOURCE: a dense tdlrt run folder or checkpoint; a state dict of a torchvision network (with model.arch=NAME and
data=...); or torchvision weights by name, e.g. ResNet18_Weights.IMAGENET1K_V1 (with data=...).
Trains three runs under out (default outputs/compress/<source>-cr<target>): the source as it is (dense/), its
one-shot decomposition at the target (oneshot/, no training) and TDLRT fine-tuning to the target (finetuned/),
and prints their test accuracy and conv c.r. side by side. Other KEY=VALUE overrides go to all three
`tdlrt train` runs. Running the same command again continues a stopped compression."""

WEIGHTS_NAME = re.compile(r"^[A-Za-z0-9_]+_Weights\.[A-Za-z0-9_]+$")
MODEL_DATA = re.compile(r"^(model|data)(\.|$)")
STEPS = ("dense", "oneshot", "finetuned")


@dataclass
class CompressOptions:
    source: str
    target_cr: float = 90.0
    epochs: int = 5
    out: Optional[str] = None
    overrides: List[str] = field(default_factory=list)  # for every `tdlrt train` run

    def validate(self) -> "CompressOptions":
        if 0 < self.target_cr < 1:
            raise ConfigError(f"target_cr={self.target_cr:g} is a percentage: did you mean {100 * self.target_cr:g}?")
        if not 0 < self.target_cr < 100:
            raise ConfigError(f"target_cr={self.target_cr:g} must be in (0, 100) (a conv compression rate in percent)")
        if self.epochs < 1:
            raise ConfigError(f"epochs={self.epochs} must be >= 1 (the fine-tuning epochs)")
        given = {o.split("=", 1)[0].lstrip("+~") for o in self.overrides}
        for key in ("method", "hydra.run.dir", "init_from", "resume", "ckpt_path"):
            if key in given or any(k.startswith(key + ".") for k in given):
                raise ConfigError(f"{key}= is set by tdlrt compress (the three runs are dense, tucker and "
                                  f"tdlrt_target); leave it out")
        return self


def parse(argv: List[str]) -> CompressOptions:
    if not argv or "=" in argv[0] and not Path(argv[0]).exists():
        raise ConfigError("tdlrt compress needs a SOURCE first: a run folder, a checkpoint, a state dict or "
                          "torchvision weights by name (tdlrt compress --help)")
    opts = CompressOptions(argv[0])
    for arg in argv[1:]:
        key, sep, value = arg.partition("=")
        if not sep:
            raise ConfigError(f"{arg!r} is not KEY=VALUE (tdlrt compress --help)")
        try:
            if key == "target_cr":
                opts.target_cr = float(value)
            elif key == "epochs":
                opts.epochs = int(value)
            elif key == "out":
                opts.out = value
            else:
                opts.overrides.append(arg)
        except ValueError:
            raise ConfigError(f"{key}={value} must be a number") from None
    return opts.validate()


def source_overrides(source: str, given: List[str]) -> List[str]:
    """The `tdlrt train` overrides that start from ``source``: ``init_from`` (a file) or the torchvision weights,
    and for a tdlrt checkpoint the model and data settings it was trained with (those ``given`` leave)."""
    keys = {o.split("=", 1)[0].lstrip("+~") for o in given}
    if WEIGHTS_NAME.match(source) and not Path(source).exists():
        arch, member = torchvision_weights(source)
        found = ["model=torchvision", f"model.arch={arch}", f"model.weights={member}"]
    else:
        from .checkpoint import load_checkpoint
        from .runs import find_checkpoint

        ckpt = find_checkpoint(source, "selected")
        state = load_checkpoint(ckpt, mmap=True)
        found = [f"init_from={hydra_value(str(ckpt.resolve()))}"]
        if isinstance(state.get("config"), dict) and "format" in state:  # a tdlrt checkpoint
            config = state["config"]
            method = (config.get("method") or {}).get("name")
            if method != "dense":
                raise ConfigError(f"{source} is a method={method} run; tdlrt compress starts from a dense network "
                                  f"(its run folder, checkpoint or state dict, or torchvision weights)")
            found += model_and_data(config)
        elif not any(MODEL_DATA.match(k) for k in keys):
            raise ConfigError(f"{source} is a state dict without a tdlrt config: say which network and data it is "
                              f"for (model=torchvision model.arch=NAME data=...)")
    return [o for o in found if o.split("=", 1)[0] not in keys
            and not (o.startswith("model=") and "model" in keys)]


def torchvision_weights(name: str):
    """(arch, member) of torchvision weights named like ``ResNet18_Weights.IMAGENET1K_V1``."""
    from torchvision import models

    from .models.torchvision_nets import architectures

    enum_name, member = name.split(".", 1)
    for arch in architectures():
        enum = models.get_model_weights(arch)
        if enum.__name__ == enum_name:
            if member not in enum.__members__:
                raise ConfigError(f"{name}: {enum_name} has no {member}; choose one of {', '.join(enum.__members__)}")
            return arch, member
    raise ConfigError(f"{name}: no torchvision network has weights {enum_name} (a name like "
                      f"ResNet18_Weights.IMAGENET1K_V1)")


def model_and_data(config: dict) -> List[str]:
    """The model and data settings of a saved config that differ from what its presets compose to (where the data
    lives, data.root, stays this machine's)."""
    from .identity import flatten
    from .launch import Composer

    model, data = config.get("model") or {}, config.get("data") or {}
    groups = [f"model={model.get('name')}", f"data={data.get('name')}"]
    with Composer() as compose:
        from omegaconf import OmegaConf

        composed = OmegaConf.to_container(compose(groups), resolve=False)
        composed.pop("hydra", None)
        composed = flatten(OmegaConf.to_container(OmegaConf.create(composed), resolve=True))
    saved = flatten({"model": model, "data": data})
    machine = ("data.root", "data.download", "data.num_workers")
    return groups + [f"{k}={hydra_value(v)}" for k, v in saved.items()
                     if k in composed and composed[k] != v and k not in machine and not k.endswith(".name")]


def hydra_value(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    from .files import hydra_quoted

    return hydra_quoted(str(value))


def default_out(opts: CompressOptions) -> Path:
    stem = Path(opts.source.rstrip("/")).name
    stem = Path(stem).stem if Path(opts.source).is_file() else stem
    if Path(opts.source).is_dir() or Path(opts.source).parent.name == "checkpoints":
        run = Path(opts.source).resolve()
        run = run.parent.parent if run.is_file() else run
        stem = run.name
    return Path("outputs") / "compress" / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', stem)}-cr{opts.target_cr:g}"


def run_train(args: List[str], step: str) -> None:
    """One `tdlrt train` in a child process, its output passed through. Ctrl-C reaches the child too (the same
    process group); a SIGTERM or SIGHUP to this process only is passed on. Either way this waits until the child
    has written its checkpoint and stopped, then ends with one line and 128 + the signal."""
    child = subprocess.Popen([sys.executable, "-m", "tdlrt_cli", "train", *args])
    try:
        code = child.wait()
    except KeyboardInterrupt:
        name, status = stopped_by()
        if child.poll() is None:
            child.send_signal(signal.Signals[name] if name in ("SIGTERM", "SIGHUP") else signal.SIGINT)
        while child.poll() is None:
            try:
                child.wait()
            except KeyboardInterrupt:  # a second Ctrl-C: the child is finishing its step and its checkpoint
                pass
        say_stopped(f"{name} during tdlrt compress (its {step} run); the same tdlrt compress command continues "
                    f"from where it stopped")
        sys.exit(status)
    if code:
        raise SystemExit(code)  # the run said why, in one line


def steps(opts: CompressOptions, start: List[str], out: Path) -> Dict[str, List[str]]:
    common = start + opts.overrides
    t = f"{opts.target_cr:g}"
    return {
        "dense": common + ["method=dense", "epochs=0", f"hydra.run.dir={hydra_value(str(out / 'dense'))}"],
        "oneshot": common + ["method=tucker", f"method.target_cr={t}", "epochs=0",
                             f"hydra.run.dir={hydra_value(str(out / 'oneshot'))}"],
        "finetuned": common + ["method=tdlrt_target", f"method.target_cr={t}", f"epochs={opts.epochs}",
                               f"hydra.run.dir={hydra_value(str(out / 'finetuned'))}"],
    }


def table(opts: CompressOptions, out: Path) -> dict:
    """compress.json's content: each network's test accuracy and conv c.r., read from the runs' files."""
    read = {s: load_json((out / s / "summary.json").read_text()) for s in STEPS}
    start = out / "finetuned" / "start_eval.json"
    decomposed = load_json(start.read_text()) if start.is_file() else None
    rows = [
        {"network": "dense (the source)", "compression_rate": 0.0, "test_acc": read["dense"]["test_acc"]},
        {"network": "decomposed to the target (one-shot HOSVD, no training)",
         "compression_rate": read["oneshot"]["compression_rate"], "test_acc": read["oneshot"]["test_acc"]},
    ]
    if decomposed is not None:
        rows.append({"network": "decomposed at the target rule's starting ranks (HOSVD)",
                     "compression_rate": decomposed["compression_rate"], "test_acc": decomposed["test_acc"]})
    rows.append({"network": f"fine-tuned {opts.epochs} epoch{'s' if opts.epochs != 1 else ''} (TDLRT, target rule)",
                 "compression_rate": read["finetuned"]["compression_rate"], "test_acc": read["finetuned"]["test_acc"],
                 "wall_time_s": read["finetuned"].get("wall_time_s")})
    return {"source": opts.source, "target_cr": opts.target_cr, "epochs": opts.epochs, "out": str(out),
            "rows": rows}


def markdown(result: dict) -> str:
    lines = [f"tdlrt compress {result['source']} to {result['target_cr']:g}% conv c.r. ({result['out']})", "",
             "| network | conv c.r. | test acc |", "|---|---:|---:|"]
    lines += [f"| {r['network']} | {r['compression_rate']:.1f}% | {r['test_acc']:.2f}% |" for r in result["rows"]]
    return "\n".join(lines) + "\n"


def main(argv: List[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        sys.exit(0 if argv else 2)
    with exit_on_user_error():
        opts = parse(argv)
        start = source_overrides(opts.source, opts.overrides)
        out = Path(opts.out).expanduser() if opts.out else default_out(opts)
        for step, args in steps(opts, start, out).items():
            if not (out / step / "summary.json").is_file():  # finished runs are skipped
                print(f"tdlrt compress: {step} ({out / step})", file=sys.stderr)
                run_train(args, step)
        result = table(opts, out)
        try:
            atomic_write_text(out / "compress.json", json.dumps(result, indent=1))
            atomic_write_text(out / "compress.md", markdown(result))
        except OSError as exc:
            raise UserError(f"cannot write {out}/compress.json ({exc.strerror or exc})") from None
        print(markdown(result), end="")
