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
(``lr=0.01 batch_size=64 data.root=...``); ``method.convert_linear=true`` goes to the fine-tuning run, which then
factorises hidden linear layers too, and leaves out the one-shot run (it decomposes convs only). Every run's
configuration is checked before the first starts; ``out/request.json`` records what made the runs, and a command
with another source or other settings is refused there rather than handed the earlier runs.
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

from .errors import CheckpointError, ConfigError, UserError, exit_on_user_error, say_stopped, stopped_by
from .files import atomic_write_text, load_json, override_value

USAGE = """usage: tdlrt compress SOURCE [target_cr=90] [epochs=5] [out=DIR] [KEY=VALUE ...]

SOURCE: a dense tdlrt run folder or checkpoint; a state dict of a torchvision network (with model.arch=NAME and
data=...); or torchvision weights by name, e.g. ResNet18_Weights.IMAGENET1K_V1 (with data=...).
Trains three runs under out (default outputs/compress/<source>-cr<target>): the source as it is (dense/), its
one-shot decomposition at the target (oneshot/, no training) and TDLRT fine-tuning to the target (finetuned/),
and prints their test accuracy and conv c.r. side by side. Other KEY=VALUE overrides go to all three
`tdlrt train` runs (method.convert_linear=true: to the fine-tuning run, and no one-shot run). Running the same
command again continues a stopped compression; out= folders hold one command's runs."""

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
        if self.out is not None and not self.out.strip():
            raise ConfigError("out= is empty; give a folder for the three runs (or leave out= out)")
        given = {o.split("=", 1)[0].lstrip("+~") for o in self.overrides}
        for key in ("method", "hydra.run.dir", "init_from", "resume", "ckpt_path"):
            if key in given - {"method.convert_linear"} or any(k.startswith(key + ".") for k in given
                                                                 - {"method.convert_linear"}):
                raise ConfigError(f"{key}= is set by tdlrt compress (the three runs are dense, tucker and "
                                  f"tdlrt_target; method.convert_linear=true is the one method key it takes); "
                                  f"leave it out")
        return self

    @property
    def linear(self) -> bool:
        """method.convert_linear=true: the fine-tuning run factorises hidden linear layers too (no one-shot run:
        the one-shot decomposition covers convs only)."""
        return any(o.split("=", 1)[0].lstrip("+~") == "method.convert_linear"
                   and o.split("=", 1)[1].strip().lower() in ("true", "1", "yes") for o in self.overrides)


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
            raise ConfigError(f"{key}={value} must be " + ("a whole number" if key == "epochs" else "a number")) from None
    return opts.validate()


def source_overrides(source: str, given: List[str]) -> List[str]:
    """The `tdlrt train` overrides that start from ``source``: ``init_from`` (a file) or the torchvision weights,
    and for a tdlrt checkpoint the model and data settings it was trained with (those ``given`` leave)."""
    keys = {o.split("=", 1)[0].lstrip("+~") for o in given}
    if WEIGHTS_NAME.match(source) and not Path(source).exists():
        mine = sorted(k for k in keys if k == "model" or k.startswith("model."))
        if mine:
            raise ConfigError(f"{source} names the network and its weights; {mine[0]}= would change them (leave it "
                              f"out)")
        arch, member = torchvision_weights(source)
        found = ["model=torchvision", f"model.arch={arch}", f"model.weights={member}"]
    else:
        from .runs import find_checkpoint

        ckpt = find_checkpoint(source, "selected")
        state = read_source(ckpt)
        found = [f"init_from={override_value(str(ckpt.resolve()))}"]
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


def read_source(path: Path) -> dict:
    """A tdlrt checkpoint as :func:`~tdlrt_cli.checkpoint.load_checkpoint` reads it, or {} for a plain state
    dict (a torchvision network's)."""
    import torch

    from .checkpoint import FORMAT, load_checkpoint

    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the file format before torch 1.6 cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read {path}: not a checkpoint or a state dict ({type(exc).__name__})") from None
    return load_checkpoint(path, mmap=True) if isinstance(state, dict) and state.get("format") == FORMAT else {}


def torchvision_weights(name: str):
    """(arch, member) of torchvision weights named like ``ResNet18_Weights.IMAGENET1K_V1``."""
    from torchvision import models

    from .models.torchvision_nets import architectures

    from .models.torchvision_nets import AUXILIARY_OUTPUTS, check_choice

    enum_name, member = name.split(".", 1)
    for arch in architectures() + list(AUXILIARY_OUTPUTS):
        enum = models.get_model_weights(arch)
        if enum.__name__ == enum_name:
            check_choice(arch, None)
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
    machine = ("data.root", "data.download", "data.num_workers", "model.weights")  # (init_from holds the weights)
    return groups + [f"{k}={override_value(v)}" for k, v in saved.items()
                     if k in composed and composed[k] != v and k not in machine and not k.endswith(".name")]


def default_out(opts: CompressOptions) -> Path:
    stem = Path(opts.source.rstrip("/")).name
    stem = Path(stem).stem if Path(opts.source).is_file() else stem
    if Path(opts.source).is_dir() or Path(opts.source).parent.name == "checkpoints":
        run = Path(opts.source).resolve()
        run = run.parent.parent if run.is_file() else run
        stem = run.name
    return Path("outputs") / "compress" / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', stem)}-cr{opts.target_cr:g}"


def stop_with_parent() -> None:
    """In the child (Linux): a SIGTERM when `tdlrt compress` dies, even by SIGKILL, so that the run stops at a
    checkpoint instead of going on alone, holding its folder."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_train(args: List[str], step: str) -> None:
    """One `tdlrt train` in a child process, its output passed through. Ctrl-C reaches the child too (the same
    process group); a SIGTERM or SIGHUP to this process only is passed on. Either way this waits until the child
    has written its checkpoint and stopped, then ends with one line and 128 + the signal."""
    child = subprocess.Popen([sys.executable, "-m", "tdlrt_cli", "train", *args], preexec_fn=stop_with_parent)
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
    """The three runs' `tdlrt train` overrides (no one-shot run with method.convert_linear=true: it decomposes
    convs only)."""
    common = start + opts.overrides
    t = repr(opts.target_cr)
    base = [o for o in common if not o.lstrip("+~").startswith("method.")]  # convert_linear: fine-tuning only
    runs = {  # (the one-shot run first: a target out of reach is refused before anything else is evaluated)
        "oneshot": base + ["method=tucker", f"method.target_cr={t}", "epochs=0",
                           f"hydra.run.dir={override_value(str(out / 'oneshot'))}"],
        "dense": base + ["method=dense", "epochs=0", f"hydra.run.dir={override_value(str(out / 'dense'))}"],
        "finetuned": common + ["method=tdlrt_target", f"method.target_cr={t}", f"epochs={opts.epochs}",
                               f"hydra.run.dir={override_value(str(out / 'finetuned'))}"],
    }
    if opts.linear:
        del runs["oneshot"]
    return runs


def check_runs(runs: Dict[str, List[str]]) -> None:
    """Every run's configuration composed and checked before the first one starts (a bad value would otherwise
    surface after the earlier runs had trained)."""
    from .launch import Composer, train_config

    with Composer() as compose:
        for step, args in runs.items():
            try:
                train_config(compose([a for a in args if not a.startswith(("init_from=", "hydra.run.dir="))]))
            except UserError as exc:
                raise ConfigError(f"the {step} run: {exc}") from None
            except Exception as exc:  # Hydra's own parse and composition errors
                from .config import error_line

                raise ConfigError(f"the {step} run: {error_line(exc)}") from None


REQUEST = "request.json"  # what made the runs in an out= folder: a rerun with another source or settings is refused


def check_request(opts: CompressOptions, out: Path) -> None:
    """``out`` is a folder (or not there yet) holding runs of this very command (source, target, epochs, the
    overrides that change what is trained; device=, threads=, data.root= ... may differ), so that finished runs
    are only ever reused by the command that made them."""
    from .identity import RESUME_FREE

    free = lambda key: any(key == k or key.startswith(k + ".") for k in RESUME_FREE)  # noqa: E731 (device=, ...)
    mine = {"source": str(Path(opts.source).resolve()) if Path(opts.source).exists() else opts.source,
            "target_cr": opts.target_cr, "epochs": opts.epochs,
            "overrides": sorted(o for o in opts.overrides if not free(o.split("=", 1)[0].lstrip("+~")))}
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out={out} is a file, not a folder; choose a folder for the three runs")
    path = out / REQUEST
    if path.is_file() and any((out / step).exists() for step in STEPS):  # (none: an earlier command was refused)
        try:
            theirs = load_json(path.read_text())
        except (OSError, ValueError, UnicodeDecodeError):
            theirs = None
        if theirs != mine:
            what = "another source or other settings" if theirs is not None else "an unreadable request.json"
            raise ConfigError(f"out={out} holds the runs of {what} ({path}); choose another out= folder, or "
                              f"remove that one to start again")
        return
    if out.is_dir() and any(p.name != REQUEST for p in out.iterdir()):
        raise ConfigError(f"out={out} is not empty and holds no tdlrt compress runs; choose a new or empty folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(mine, indent=1))
    except OSError as exc:
        raise UserError(f"cannot write in out={out} ({exc.strerror or exc}); choose a writable out= folder") from None


def run_json(path: Path) -> Optional[dict]:
    """A JSON file a finished run wrote (start_eval.json), or None where the run wrote none."""
    return load_json(path.read_text()) if path.is_file() else None


def table(opts: CompressOptions, out: Path) -> dict:
    """compress.json's content: each network's test accuracy and conv c.r., read from the runs' files."""
    read = {s: load_json((out / s / "summary.json").read_text()) for s in STEPS if (out / s / "summary.json").is_file()}
    decomposed = run_json(out / "finetuned" / "start_eval.json")
    rows = [{"network": "dense (the source)", "compression_rate": 0.0, "test_acc": read["dense"]["test_acc"]}]
    if "oneshot" in read:
        rows.append({"network": "decomposed to the target (one-shot HOSVD, no training)",
                     "compression_rate": read["oneshot"]["compression_rate"], "test_acc": read["oneshot"]["test_acc"]})
    if decomposed is not None:
        rows.append({"network": "decomposed at the target rule's starting ranks (HOSVD)",
                     "compression_rate": decomposed["compression_rate"], "test_acc": decomposed["test_acc"]})
    done = read["finetuned"]
    rows.append({"network": f"fine-tuned {opts.epochs} epoch{'s' if opts.epochs != 1 else ''} (TDLRT, target rule)",
                 "compression_rate": done["compression_rate"], "test_acc": done["test_acc"],
                 "wall_time_s": done.get("wall_time_s")})
    if opts.linear:  # the target counted conv and linear weights
        for r, run in zip(rows[-1:], [done]):
            r["compression_rate_weights"] = run.get("compression_rate_weights")
    result = {"source": opts.source, "target_cr": opts.target_cr, "epochs": opts.epochs, "out": str(out),
              "rows": rows}
    fresh = (run_json(out / "dense" / "start_eval.json") or {}).get("fresh_layers") or []
    if fresh:  # published weights for another number of classes: the source's classifier is new, untrained
        result["note"] = (f"{', '.join(fresh)} of the source had another size than the data needs and starts at "
                          f"random: the dense and one-shot rows score an untrained classifier, not the source. For a "
                          f"dense baseline on this data, train it first (tdlrt train ... method=dense, from the same "
                          f"weights) and compress that run.")
    return result


def markdown(result: dict) -> str:
    lines = [f"tdlrt compress {result['source']} to {result['target_cr']:g}% c.r. ({result['out']})", "",
             "| network | conv c.r. | test acc |", "|---|---:|---:|"]
    lines += [f"| {r['network']} | {r['compression_rate']:.1f}%"
              + (f" (conv and linear {r['compression_rate_weights']:.1f}%)" if r.get("compression_rate_weights")
                 is not None else "") + f" | {r['test_acc']:.2f}% |" for r in result["rows"]]
    if result.get("note"):
        lines += ["", "Note: " + result["note"]]
    return "\n".join(lines) + "\n"


def main(argv: List[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        sys.exit(0 if argv else 2)
    with exit_on_user_error():
        opts = parse(argv)
        start = source_overrides(opts.source, opts.overrides)
        out = Path(opts.out).expanduser() if opts.out else default_out(opts)
        runs = steps(opts, start, out)
        check_runs(runs)
        check_request(opts, out)
        for step, args in runs.items():
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
