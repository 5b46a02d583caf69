"""`tdlrt eval <run folder, checkpoint or export> [data=NAME] [data.KEY=VALUE ...] [device=...]`:
test accuracy and the cost report (dense and low-rank side by side)."""
from __future__ import annotations

import re
import sys
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from .errors import CheckpointError, ConfigError, UserError, exit_on_user_error
from .faults import faults
from .files import atomic_write_text, load_json, strict_json

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class EvalOptions:
    source: str
    checkpoint: str = "selected"  # run folders: selected (the network of summary.json's test_acc), best, last
    device: str = "auto"
    threads: int = 0            # CPU threads of torch; 0: as `tdlrt train` (threads=null)
    batch_size: int = 1024
    repeat: int = 10
    cost_repeat: int = 0        # the name `tdlrt train` uses for repeat= (> 0: overrides repeat)
    latency: bool = True
    out: Optional[str] = None   # also write the report as JSON here

    def validate(self) -> "EvalOptions":
        from .options import check_device, check_output_file

        from .runs import CHOICES

        if self.checkpoint not in CHOICES:
            raise ConfigError(f"checkpoint={self.checkpoint} is not one of: {', '.join(CHOICES)}")
        if self.threads < 0:
            raise ConfigError(f"threads={self.threads} must be >= 1 (0: automatic, as tdlrt train's threads=null)")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size} must be >= 1")
        if self.cost_repeat < 0:
            raise ConfigError(f"cost_repeat={self.cost_repeat} must be >= 1 (the same as repeat=)")
        if self.cost_repeat:
            self.repeat = self.cost_repeat
        if self.repeat < 1:
            raise ConfigError(f"repeat={self.repeat} must be >= 1 (timed blocks per latency figure)")
        check_device(self.device)
        if self.out is not None:
            check_output_file(Path(self.out).expanduser(), "report.json")
        return self


class ExportedNetwork(torch.nn.Module):
    """A loaded ``torch.export`` program as a module; it is fixed in inference mode, so train()/eval()
    only set the flag here."""

    def __init__(self, program_module: torch.nn.Module):
        super().__init__()
        self.program = program_module

    def train(self, mode: bool = True):
        self.training = mode
        return self

    def forward(self, x):
        return self.program(x)


class OnnxNetwork(torch.nn.Module):
    """An ONNX file run by ONNX Runtime on the CPU, called like a module (tensors in, tensors out)."""

    def __init__(self, path: Path):
        super().__init__()
        try:
            import onnxruntime
        except ImportError:
            raise UserError('evaluating an .onnx file needs onnxruntime: pip install onnxruntime') from None
        try:
            self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise CheckpointError(f"cannot load the ONNX file {path} ({type(exc).__name__})") from None
        self.input = self.session.get_inputs()[0].name
        self.path = path

    def forward(self, x):
        return torch.from_numpy(self.session.run(None, {self.input: x.detach().cpu().numpy()})[0])

    def weight_counts(self) -> dict:
        import onnx
        from onnx import numpy_helper

        inits = [numpy_helper.to_array(t) for t in onnx.load(str(self.path)).graph.initializer]
        floats = [a for a in inits if a.dtype.kind == "f"]
        return {"conv": sum(a.size for a in floats if a.ndim == 4), "total": sum(a.size for a in floats)}


def dense_onnx(dense: torch.nn.Module, example: torch.Tensor) -> OnnxNetwork:
    """The dense network exported to ONNX (in a temporary folder) and loaded into ONNX Runtime."""
    from .programs import save_program

    with tempfile.TemporaryDirectory(prefix="tdlrt-eval-") as folder:
        path = Path(folder) / "dense.onnx"
        save_program(dense, example[:2], path, "onnx", {})
        return OnnxNetwork(path)


def load_onnx(path: Path):
    sidecar = Path(str(path) + ".json")
    if not sidecar.is_file():
        raise CheckpointError(f"{sidecar} not found: `tdlrt export ... format=onnx` writes it beside the file")
    return OnnxNetwork(path), load_json(sidecar.read_text())


# The records (paths below the archive's root folder) of a program saved by ``torch.export.save`` as
# `tdlrt export` calls it. ``torch.export.load`` would unpickle other records with ``weights_only=False``
# (legacy ``.pt`` weights and constants, custom and opaque objects, the pre-2.7 format) or load compiled
# libraries (AOTInductor), that is run code chosen by whoever wrote the file.
ARCHIVE_RECORDS = re.compile(r"archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
                             r"|models/\w+\.json|extra/[\w.-]+|data/sample_inputs/\w+\.pt"
                             r"|data/weights/\w+_weights_config\.json|data/weights/weight_\d+"
                             r"|data/constants/\w+_constants_config\.json|data/constants/tensor_\d+")
PAYLOAD_FILES = re.compile(r"(weight|tensor)_\d+")  # a config's raw (never pickled) tensor files


def _unsafe_payloads(config) -> List[str]:
    """The entries of a weights or constants config that ``torch.export.load`` would not read as raw tensor
    bytes: ``use_pickle`` not false (unpickled with ``weights_only=False``) or another kind of file."""
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        return ["<config>"]
    return [name for name, meta in entries.items()
            if not isinstance(meta, dict) or meta.get("use_pickle") is not False
            or not PAYLOAD_FILES.fullmatch(str(meta.get("path_name")))]


def _plain_tensors(data: bytes) -> bool:
    """Whether ``torch.load(weights_only=True)`` reads ``data`` (tensors, containers, numbers, strings)."""
    import io
    import pickle

    try:
        torch.load(io.BytesIO(data), weights_only=True)
    except (pickle.UnpicklingError, RuntimeError):
        return False
    return True


def check_archive(data: bytes, path: Path) -> None:
    """Refuse, before torch reads it, a ``.pt2`` archive (``data``: its bytes) from which
    ``torch.export.load`` could run code: every record must be one that ``torch.export.save`` writes for a
    plain program (:data:`ARCHIVE_RECORDS`), no weight or constant may be pickled, and the sample inputs must
    load with ``torch.load(weights_only=True)`` (torch falls back to ``weights_only=False`` otherwise).
    Guaranteed: an archive that passes is read by torch without unpickling anything outside
    ``weights_only=True``."""
    import io
    import zipfile

    refuse = f"refusing {path}: "
    advice = "; it was not written by `tdlrt export` (export the run again)"
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = archive.namelist()
            records = [name.split("/", 1)[1] if "/" in name else name for name in names]
            if len(set(names)) != len(names):
                raise CheckpointError(f"{refuse}it holds two records of the same name{advice}")
            for name, record in zip(names, records):
                if "/" not in name or not ARCHIVE_RECORDS.fullmatch(record):
                    raise CheckpointError(f"{refuse}it holds {name}, a record `tdlrt export` does not write "
                                          f"(torch.export.load may unpickle or run such records){advice}")
            for name, record in zip(names, records):
                if record.endswith("_config.json"):
                    bad = _unsafe_payloads(load_json(archive.read(name)))
                    if bad:
                        raise CheckpointError(f"{refuse}{name} asks for pickled entries ({', '.join(bad[:3])}), "
                                              f"which loading would execute{advice}")
                elif record.startswith("data/sample_inputs/") and not _plain_tensors(archive.read(name)):
                    raise CheckpointError(f"{refuse}{name} holds more than tensors, which torch would unpickle "
                                          f"with weights_only=False, executing it{advice}")
    except CheckpointError:
        raise
    except Exception as exc:  # a damaged zip or JSON
        raise CheckpointError(f"{refuse}cannot check it ({type(exc).__name__}: "
                              f"{' '.join(str(exc).split())[:160]}){advice}") from None


def load_export(path: Path):
    """An exported ``.pt2`` program and the metadata `tdlrt export` stored in it; the file is read once and
    checked by :func:`check_archive` before torch loads it from the same bytes."""
    import io
    import logging
    import zipfile

    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"cannot load the exported program {path}: not a .pt2 archive")
    data = path.read_bytes()
    check_archive(data, path)
    extra = {"tdlrt.json": ""}
    quiet = logging.getLogger("torch.export")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # torch logs a traceback before its own error on archives it cannot read
    try:
        program = torch.export.load(io.BytesIO(data), extra_files=extra)
    except Exception as exc:
        raise CheckpointError(f"cannot load the exported program {path} ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:160] if str(exc) else ''})") from None
    finally:
        quiet.setLevel(level)
    if not extra["tdlrt.json"]:
        raise CheckpointError(f"{path} was not written by `tdlrt export` (no tdlrt.json inside)")
    return ExportedNetwork(program.module()), load_json(extra["tdlrt.json"])


def export_metadata(meta, where: Path) -> Tuple[dict, Tuple[int, int, int]]:
    """The run's config and the data shape (channels, classes, image size) that `tdlrt export` recorded,
    checked: a hand-edited or foreign file is refused in one line naming it, never read half-way."""
    shape = meta.get("data_shape") if isinstance(meta, dict) else None  # exports before the input spec
    given = meta.get("input") if isinstance(meta, dict) else None
    if isinstance(given, dict) and isinstance(given.get("shape"), list) and len(given["shape"]) == 4:
        _, c, h, w = given["shape"]
        shape = [c, meta.get("classes"), h if h == w else None]
    config = meta.get("config") if isinstance(meta, dict) else None
    if not isinstance(config, dict):
        raise CheckpointError(f"{where} holds no run configuration ('config'): it was not written by `tdlrt export`, "
                              f"or was edited; export the run again")
    if not (isinstance(shape, list) and len(shape) == 3
            and all(isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= top
                    for n, top in zip(shape, (4096, 1_000_000, 65536)))):
        raise CheckpointError(f"{where}: its input shape and classes {str(shape)[:80]} are not (channels, classes, "
                              f"image size) as `tdlrt export` writes them (input.shape [N, C, H, H] and classes: "
                              f"whole numbers, at most 4096, 1000000, 65536); export the run again")
    return config, tuple(shape)


def data_config(saved: dict, overrides: List[str]) -> dict:
    """The run's config with ``data=NAME`` (a configs/data preset) and ``data.KEY=VALUE`` applied."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    cfg = OmegaConf.create(saved)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{item} needs a value: {item}=VALUE")
        key, value = item.split("=", 1)
        if key == "data":
            preset = CONFIG_DIR / "data" / f"{value}.yaml"
            if not preset.is_file():
                names = sorted(p.stem for p in (CONFIG_DIR / "data").glob("*.yaml"))
                raise ConfigError(f"unknown data {value!r}; choose one of: {', '.join(names)}")
            cfg.data = OmegaConf.load(preset)
        else:
            try:
                cfg.merge_with(OmegaConf.from_dotlist([item]))
            except Exception as exc:  # OmegaConf's and YAML's parse errors
                raise ConfigError(f"cannot parse {item} ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"invalid data override ({str(exc).splitlines()[0]})") from None


def evaluate_source(opts: EvalOptions, data_overrides: List[str]) -> dict:
    from omegaconf import OmegaConf
    from torch.fx.experimental.optimization import fuse

    from .config import from_dictconfig
    from .cost import cost_report, flops, weight_counts
    from .data import build_data
    from .runs import load_run
    from .metrics import parameter_report
    from .runs import dense_reference
    from .metrics import evaluate
    from .runtime import resolve_device, set_threads

    set_threads(opts.threads or None)
    device = resolve_device(opts.device)
    path = Path(opts.source).expanduser()
    is_onnx = path.is_file() and path.suffix == ".onnx"
    is_export = path.is_file() and path.suffix == ".pt2" or is_onnx
    if is_export:
        if is_onnx:
            device = torch.device("cpu")  # ONNX Runtime's CPU provider
        model, meta = load_onnx(path) if is_onnx else load_export(path)
        saved, shape = export_metadata(meta, Path(str(path) + ".json") if is_onnx else path)
        origin = meta["checkpoint"].get("described") if isinstance(meta.get("checkpoint"), dict) else None
        network = f"exported from {origin}" if isinstance(origin, str) else "exported"
    else:
        run = load_run(opts.source, opts.checkpoint)
        model, saved, shape = run.model, run.config, run.data_shape
        network = run.describe()
    cfg = from_dictconfig(OmegaConf.create(data_config(saved, data_overrides)))
    data = build_data(cfg.data, cfg.batch_size, opts.batch_size, device, cfg.seed)
    if (data.in_channels, data.num_classes, data.image_size) != tuple(shape):
        raise ConfigError(f"the data has shape (channels, classes, size) = "
                          f"{(data.in_channels, data.num_classes, data.image_size)}, the network was trained on "
                          f"{tuple(shape)}")
    model = model.to(device).eval()
    test_loss, test_acc = evaluate(model, data.test, nullcontext, device)
    faults.signal_at("eval")
    result = {"source": str(path), "network": network, "data": cfg.data.name, "test_acc": test_acc,
              "test_loss": test_loss, "test_examples": data.test.num_examples}
    dense = dense_reference(cfg.model, shape, device)
    example = next(iter(data.test))[0][:128].to(device)
    if is_export:
        dense = fuse(dense)  # compare like with like: BatchNorm folded on both sides
        mine, ref = model.weight_counts() if is_onnx else weight_counts(model), weight_counts(dense)
        params = {"params": mine["total"], "params_dense": ref["total"], "conv_params": mine["conv"],
                  "conv_params_dense": ref["conv"],
                  "compression_rate": 100 * (1 - mine["conv"] / ref["conv"]),
                  "compression_rate_total": 100 * (1 - mine["total"] / ref["total"]),
                  "params_train": None, "compression_rate_train": None}
    else:
        params = parameter_report(model)
    if opts.latency:
        opaque = None
        if is_onnx:  # time the dense network through ONNX Runtime as well: the same runtime on both sides
            opaque = {"lowrank": meta.get("flops_forward"), "dense": flops(dense, example[:2], train=False)}
            dense = dense_onnx(dense, example)
        result["cost"] = cost_report(model, dense, example, params, repeat=opts.repeat, trainable=not is_export,
                                     opaque_flops=opaque, runtime="onnxruntime" if is_onnx else "torch")
    else:
        result["cost"] = {"parameters": params}
    return result


def parse(argv: List[str]):
    from .options import parse_args

    data_overrides = [a for a in argv if a.startswith("data=") or a.startswith("data.")]
    opts = parse_args([a for a in argv if a not in data_overrides], EvalOptions, "source").validate()
    return opts, data_overrides


USAGE = """usage: tdlrt eval <run folder, checkpoint, .pt2 or .onnx export> [data=NAME] [data.KEY=VALUE ...]
                  [checkpoint=selected|best|last] [device=auto|cpu|cuda] [threads=N] [batch_size=1024]
                  [latency=true] [repeat=10] [out=REPORT.json]   (cost_repeat=N, train's name, is repeat=N)

Test accuracy on the run's dataset (or the one given), and the cost report: parameters and compression
rates, FLOPs per image (inference; training), peak memory and latency at batch 1 and 128 (median and
interquartile range over `repeat` blocks timed with torch.utils.benchmark), dense and low-rank side by
side, measured here. checkpoint=selected (the default) evaluates the network whose accuracy summary.json
and `tdlrt report` give: best.pt, chosen on the validation split, or last.pt for a run without one; the
first line names it."""


def main(argv: List[str]) -> None:
    from .cost import format_report
    from .files import remove_stale_temporaries

    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        sys.exit(0 if argv else 2)
    with exit_on_user_error():
        opts, data_overrides = parse(argv)
        result = evaluate_source(opts, data_overrides)
        print(f"{result['source']}: test accuracy {result['test_acc']:.2f}% (loss {result['test_loss']:.4f}) on "
              f"{result['test_examples']} {result['data']} test images; network: {result['network']}")
        if "dense" in result["cost"]:
            print(format_report(result["cost"]))
        if opts.out:
            out = Path(opts.out).expanduser()
            try:  # through a temporary file; those a killed eval left behind go first
                remove_stale_temporaries(out.parent, re.compile(rf"^\.{re.escape(out.name)}\.(?P<pid>\d+)\.tmp$"))
                atomic_write_text(out, strict_json(result))
            except OSError as exc:
                raise UserError(f"cannot write out={opts.out} ({exc.strerror or exc}); choose a writable "
                                f"out=FILE") from None
