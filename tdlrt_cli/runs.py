"""Rebuild the trained network of a run folder or checkpoint (for `tdlrt export` and `tdlrt eval`)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from .checkpoint import load_checkpoint, load_error
from .config import TrainConfig
from .errors import CheckpointError, ConfigError

# (in_channels, num_classes, image_size) of the datasets whose shape the config alone fixes
KNOWN_SHAPES = {"cifar10": (3, 10, 32), "cifar100": (3, 100, 32), "mnist": (1, 10, 28), "fashion_mnist": (1, 10, 28)}


@dataclass
class TrainedRun:
    model: nn.Module          # the trained network, eval mode, on the CPU
    cfg: TrainConfig
    config: dict              # the run's resolved config, as saved
    checkpoint: Path
    data_shape: tuple         # (in_channels, num_classes, image_size)
    state_epoch: int = 0      # the epochs the checkpoint's network was trained for
    selected: Optional[dict] = None  # best.pt's selection record ({"by", "epoch", ...}) when it is best.pt
    data_input: Optional[dict] = None  # {"mean", "std", "classes"} as the run recorded them (newer runs)

    def describe(self) -> str:
        """Which network this is, in words: the file, its epoch and why it was chosen."""
        where = (f"{self.checkpoint.parent.name}/{self.checkpoint.name}" if self.checkpoint.parent.name == "checkpoints"
                 else str(self.checkpoint))
        if self.checkpoint.name == "best.pt" and self.selected:
            how = ("chosen on the validation split" if self.selected.get("by") == "val_acc"
                   else "chosen on the test set")
            return f"{where} (epoch {self.selected.get('epoch')}, {how})"
        return f"{where} (after epoch {self.state_epoch})"

    def example(self, batch: int = 1, device="cpu") -> torch.Tensor:
        c, _, size = self.data_shape
        return torch.randn(batch, c, size, size, generator=torch.Generator().manual_seed(0)).to(device)


CHOICES = ("selected", "best", "last")  # checkpoint= of export, eval and bench


def handed_on(run_dir: Path) -> str:
    """The file of the network a run hands on, the one summary.json's ``test_acc`` is of: ``best.pt`` when
    chosen on the validation split, else ``last.pt`` (summary.accuracies). A run without a readable
    summary.json (unfinished): ``best.pt`` if its selection is by validation accuracy, else ``last.pt``."""
    from .files import load_json
    from .summary import accuracies

    try:
        summary = load_json((run_dir / "summary.json").read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        summary = None
    if isinstance(summary, dict) and accuracies(summary).get("checkpoint") in ("best.pt", "last.pt"):
        return accuracies(summary)["checkpoint"]
    best = run_dir / "checkpoints" / "best.pt"
    if best.is_file():
        try:
            selected = (load_checkpoint(best, mmap=True).get("best") or {}).get("selected") or {}
        except CheckpointError:
            return "last.pt"
        if selected.get("by") == "val_acc":
            return "best.pt"
    return "last.pt"


def find_checkpoint(path: str, which: str = "selected") -> Path:
    """A checkpoint file, or ``<run folder>/checkpoints/<which>.pt`` (``selected``: :func:`handed_on`)."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "checkpoints" / (handed_on(p) if which == "selected" else f"{which}.pt")
        if not p.is_file():
            raise CheckpointError(f"no checkpoint {p.name} in {p.parent} (is {path} a tdlrt run folder?)")
    elif not p.is_file():
        raise CheckpointError(f"{path}: no such run folder or checkpoint")
    return p


def config_of(state: dict, path: Path) -> TrainConfig:
    from omegaconf import OmegaConf

    from .config import from_dictconfig

    if not isinstance(state.get("config"), dict):
        raise CheckpointError(f"{path} holds no run configuration (written by an older tdlrt?)")
    try:
        return from_dictconfig(OmegaConf.create(state["config"]))
    except ConfigError as exc:
        raise CheckpointError(f"{path}: its saved configuration does not validate ({exc})") from None


def data_shape_of(state: dict, cfg: TrainConfig) -> tuple:
    if state.get("data_shape"):
        return tuple(int(v) for v in state["data_shape"])
    if cfg.data.name in KNOWN_SHAPES:
        return KNOWN_SHAPES[cfg.data.name]
    if cfg.data.name == "synthetic":
        return cfg.data.channels, cfg.data.num_classes, cfg.data.image_size or 32
    raise CheckpointError("the checkpoint does not record its input shape; retrain with this tdlrt version")


def build_trained(state: dict, cfg: TrainConfig, data_shape: tuple, path: Path) -> nn.Module:
    """The network of ``cfg`` with the checkpoint's weights: factorised like the run, ranks as saved."""
    from torch.nn.utils import prune

    from .methods import factorise, tucker_ranks_in
    from .models import build_configured

    c, k, size = data_shape
    model = build_configured(cfg.model, c, k, size, load_weights=False)  # the weights are the checkpoint's
    weights = state["model"]
    saved = tucker_ranks_in(weights) if cfg.method.name == "tucker" else None
    factorise(cfg, model, torch.Generator().manual_seed(cfg.seed), saved_ranks=saved)
    for name, m in model.named_modules():  # pruning baselines store weight_orig and weight_mask
        if f"{name}.weight_mask" in weights and isinstance(m, nn.Conv2d):
            prune.identity(m, "weight")
    try:
        model.load_state_dict(weights)
    except (RuntimeError, KeyError) as exc:
        raise CheckpointError(f"{path} does not match model={cfg.model.name} method={cfg.method.name}: "
                              f"{load_error(exc)}") from None
    return model.eval()


def load_trained(path: str, which: str = "selected") -> TrainedRun:
    ckpt = find_checkpoint(path, which)
    state = load_checkpoint(ckpt)
    cfg = config_of(state, ckpt)
    shape = data_shape_of(state, cfg)
    selected = (state.get("best") or {}).get("selected") if ckpt.name == "best.pt" else None
    data_input = state.get("data_input") if isinstance(state.get("data_input"), dict) else None
    return TrainedRun(build_trained(state, cfg, shape, ckpt), cfg, state["config"], ckpt, shape,
                      int(state.get("epoch") or 0), selected if isinstance(selected, dict) else None, data_input)


def dense_reference(model, data_shape: tuple, device) -> nn.Module:
    """The dense network of the same architecture, the baseline of the cost report. Its weights (seed 0)
    do not affect its costs; the caller's random generators are left as they were."""
    from .models import build_configured

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build_configured(model, *data_shape, load_weights=False).to(device).eval()


def load_run(source: str, which: str):
    """``runs.load_trained``; a checkpoint that lacks an entry it needs ends as one line naming the entry."""
    try:
        return load_trained(source, which)
    except KeyError as exc:
        raise CheckpointError(f"{find_checkpoint(source, which)} is missing {exc.args[0]!r} (written by an older "
                              f"tdlrt or damaged); use another checkpoint") from None
    except (TypeError, AttributeError) as exc:
        raise CheckpointError(f"cannot rebuild the network from {find_checkpoint(source, which)} (damaged: "
                              f"{type(exc).__name__}: {str(exc)[:160]}); use another checkpoint") from None
