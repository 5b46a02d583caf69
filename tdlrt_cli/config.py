"""Schemas of the run configuration, and their validation.

Hydra composes the YAML tree in ``configs/``; :func:`from_dictconfig` merges it into these dataclasses
(unknown keys and wrong types fail there) and :meth:`TrainConfig.validate` checks values. Everything
below ``train.py`` sees only these plain dataclasses.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")

from .errors import ConfigError
from .families import RANK_ADAPTIVE
from .identity import flatten, upgrade_config
from .validation import (DATASETS, METHODS, MODELS, OPTIMIZERS, PRECISIONS, SCHEDULERS, check_data,  # noqa: F401
                         check_method, check_numbers, check_run, check_schedule)

@dataclass
class ModelConfig:
    name: str = "vgg16"
    width_mult: float = 1.0
    arch: Optional[str] = None     # model=torchvision: torchvision's name of the network (resnet50, ...)
    weights: Optional[str] = None  # model=torchvision: its published weights (DEFAULT, IMAGENET1K_V1, ...)


@dataclass
class DataConfig:
    name: str = "cifar10"
    root: str = "data"
    download: bool = True
    limit_train: Optional[int] = None
    limit_test: Optional[int] = None
    val_split: float = 0.0       # held-out end of the training set, chooses best.pt: a fraction (0 < v < 1)
                                 # or a number of examples (v >= 1); 0: none (best.pt chosen on the test set)
    augment: bool = True
    # imagefolder
    train_dir: str = "train"
    test_dir: str = "val"
    num_workers: int = 4
    mean: Optional[List[float]] = None
    std: Optional[List[float]] = None
    crop: str = "auto"           # imagefolder: imagenet (random resized crop; resize + centre crop) or pad; auto:
                                 # imagenet from data.image_size 160 up
    # imagefolder and synthetic
    image_size: Optional[int] = None
    # synthetic
    channels: int = 3
    num_classes: int = 10
    train_size: int = 2048
    test_size: int = 512


@dataclass
class MethodConfig:
    name: str = "dense"
    default_tau: Optional[float] = None
    r_min: int = 2
    r_max: Optional[int] = None
    r_max_frac: Optional[float] = None    # tdlrt/dlrt: null resolves to 0.5 (tau rule) or 1 (target rule)
    init_rank: Optional[int] = None
    init_rank_frac: Optional[float] = None
    adapted_modes: str = "channels"
    augment_every: Optional[int] = None   # tdlrt/dlrt: null resolves to 1 (tau rule) or 10 (target rule)
    tau_warmup_epochs: float = 1.0        # the truncation tolerance ramps from 0 to tau over this many epochs
    tau_warmup_shape: str = "linear"      # linear: tau * t / T; hold: truncate only to the rank caps until T
    convert_linear: bool = False
    convert_first_conv: bool = False
    finetune_epochs: int = 0
    init_decay: float = 0.0               # > 0: ill-conditioned start, core singular values 10^(-decay k)
    rank_frac: Optional[float] = None     # fixed-rank baselines: rank as a fraction of the channels
    ranks_from: Optional[str] = None      # tucker: the final per-layer ranks of this finished run folder
    target_cr: Optional[float] = None     # ... or the fraction that reaches this conv compression rate (%);
                                          # tdlrt/dlrt: the conv c.r. the target rule reaches
    ramp_start: float = 0.0               # tdlrt/dlrt target rule: the asked compression rises from 0 at this
    ramp_end: float = 0.75                # fraction of the training steps to target_cr at this one (cubic)
    sparsity: float = 0.9                 # pruning baselines: fraction of conv weights removed
    rounds: int = 3                       # imp: prune-retrain rounds (epochs each)
    rewind_epoch: int = 1                 # imp: rewind weights to their values after this epoch


@dataclass
class OptimizerConfig:
    name: str = "sgd"
    nesterov: bool = False
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8


@dataclass
class SchedulerConfig:
    name: str = "cosine"
    warmup_epochs: int = 1
    min_lr: float = 0.0
    pct_start: float = 0.25
    step_size: int = 10
    gamma: float = 0.1
    factor: float = 0.1
    patience: int = 5


@dataclass
class CheckpointConfig:
    every_n_steps: int = 0     # > 0: also write last.pt every N training steps (mid-epoch resume)
    auto_resume: bool = True   # a run folder that already holds checkpoints/last.pt (a requeued or restarted
                               # job) continues from it; false: such a folder is an error
    keep_top_k: int = 0        # > 0: also keep the k best epochs (the selection metric of best.pt) as
                               # checkpoints/epochNNN-<metric>XX.XX.pt


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    task_name: str = "train"
    tau: Optional[float] = None
    lr: float = 0.05
    weight_decay: float = 5e-4
    momentum: float = 0.9
    epochs: int = 30
    batch_size: int = 128
    seed: int = 0
    device: str = "auto"
    threads: Optional[int] = None  # CPU threads of torch; null: $OMP_NUM_THREADS, else half the cores (<= 8)
    precision: str = "fp32"
    deterministic: bool = False
    ckpt_path: Optional[str] = None
    init_from: Optional[str] = None
    eval_batch_size: int = 1024
    log_every_n_steps: int = 50
    progress: bool = True
    nan_policy: str = "stop"   # stop: end the run at a NaN/Inf loss; skip: skip such steps
    nan_max_skips: int = 10    # nan_policy=skip: stop after this many skipped steps in the whole run
    cost_report: bool = True   # summary.json gets the cost report (FLOPs, peak memory, latency b1/b128)
    cost_latency: bool = False  # the cost report also times both networks (slow; noisy on a shared machine)
    cost_repeat: int = 10      # timed repetitions per latency figure

    @property
    def starts_trained(self) -> bool:
        """The network starts from trained weights: ``init_from``, or model=torchvision's ``model.weights``."""
        return bool(self.init_from) or (self.model.name == "torchvision" and bool(self.model.weights))

    def validate(self) -> "TrainConfig":
        """Check every value (the first problem found ends it, as one line: :mod:`.validation`); resolve the
        defaults that depend on other keys (a method's rank caps and clock)."""
        check_numbers(self)
        check_run(self)
        check_data(self.data)
        check_schedule(self)
        check_method(self)
        return self


def settings() -> set:
    """Every dotted key of the run configuration (``TrainConfig``'s fields, every method's keys included)."""
    from dataclasses import asdict

    return set(flatten(asdict(TrainConfig())))


def config_groups() -> Dict[str, set]:
    """The config groups of ``configs/`` a run may select (``model=...``), with the presets of each."""
    root = Path(CONFIG_DIR)
    return {d.name: {p.stem for p in d.glob("*.yaml")} for d in sorted(root.iterdir())
            if d.is_dir() and d.name != "hydra"}


def _presets_with(group: str, leaf: str) -> List[str]:
    """The presets of ``configs/<group>/`` that have the key ``leaf`` (``scheduler``, ``pct_start``: onecycle)."""
    from omegaconf import OmegaConf

    found = []
    for name in sorted(config_groups().get(group, ())):
        try:
            preset = OmegaConf.to_container(OmegaConf.load(Path(CONFIG_DIR) / group / f"{name}.yaml"))
        except Exception:
            continue
        if isinstance(preset, dict) and leaf in preset:
            found.append(name)
    return found


def _either(items: List[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} or {items[-1]}"


def unknown_key(key: str, value: Optional[str] = None, keys=None, listed_by: str = "tdlrt train --cfg job") -> str:
    """One line for an override of a key the composed configuration does not have (``target_cr=90``), with
    the keys it may have meant, from the schema (``keys``, dotted and in order; default: every key of
    :class:`TrainConfig`) and with the value typed (``value``): the same last part under a group
    (``method.target_cr=90``; all of them where several groups have it), else the closest spellings
    (difflib: ``method.target_c`` -> ``method.target_cr``). A key of the schema that the chosen preset of its
    group lacks names the presets that have it. ``+key=`` is suggested only under ``hydra.``: tdlrt's schema
    takes no new key (``+target_cr=90`` is refused), but parts of Hydra's own configuration do."""
    import difflib
    from dataclasses import asdict

    listing = f"`{listed_by}` lists the keys"
    if key.split(".")[0] == "hydra":
        return f"unknown option {key!r}: no such config key ({listing}; +{key}=... adds a new one)"
    keys = list(flatten(asdict(TrainConfig()))) if keys is None else list(keys)
    group, _, leaf = key.rpartition(".")
    if key in keys and group and group in config_groups():  # a key of other presets of its group
        having = _presets_with(group, leaf)
        where = f": it is a key of {group}={_either(having)}" if having else ""
        return f"unknown option {key!r}: the chosen {group} preset has no {leaf}{where} ({listing})"
    leaves: Dict[str, List[str]] = {}
    for k in keys:
        leaves.setdefault(k.rpartition(".")[2], []).append(k)
    meant = [k for k in leaves.get(leaf, []) if k != key]  # the key under another group (or none)
    if not meant:  # a misspelt last part, under its own group first: method.target_c -> method.target_cr
        mine = [k.rpartition(".")[2] for k in keys if k.rpartition(".")[0] == group]
        meant = [f"{group}.{near}" if group else near
                 for near in difflib.get_close_matches(leaf, mine, n=3, cutoff=0.7)]
    if not meant:  # ... then anywhere: width_mlt -> model.width_mult
        meant = [k for near in difflib.get_close_matches(leaf, list(leaves), n=3, cutoff=0.7) for k in leaves[near]]
    if not meant:
        return f"unknown option {key!r}: no such config key ({listing})"
    typed = "" if value is None else f"={value}"
    return f"unknown option {key!r}: did you mean {_either([k + typed for k in meant])}? ({listing})"


def error_line(exc: BaseException, keys=None, listed_by: str = "tdlrt train --cfg job") -> str:
    """:func:`tdlrt_cli.errors.one_line` of a Hydra or OmegaConf error, where an override of a key the
    configuration lacks names the keys it may have meant (:func:`unknown_key`: ``keys``, the command's schema,
    default `tdlrt train`'s; ``listed_by``, the command that lists them)."""
    from .errors import one_line

    text = str(exc)
    override = re.match(r"Could not override '([^']*)'", text)
    if not override:
        return one_line(exc)
    key = override.group(1)
    typed = re.search(r"^To append to your config use \+(.*)$", text, re.M)  # Hydra's hint holds the value
    value = typed.group(1).split("=", 1)[1] if typed and typed.group(1).startswith(f"{key}=") else None
    return unknown_key(key, value, keys, listed_by)


def unsafe_in(value: Any, where: str = "") -> Optional[str]:
    """What in settings read from a run folder's files Hydra or OmegaConf would act on rather than store: a key
    of Hydra's instantiation (``_target_``, ``_args_``, any ``_..``) or an interpolation (``${...}``: it reads
    the environment or calls a resolver). None if there is nothing; else what and where, for one line."""
    if isinstance(value, dict):
        for k, v in value.items():
            key = f"{where}.{k}" if where else str(k)
            if str(k).startswith("_"):
                return f"the key {key}"
            found = unsafe_in(v, key)
            if found:
                return found
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            found = unsafe_in(v, f"{where}[{i}]")
            if found:
                return found
    elif isinstance(value, str) and "${" in value:
        return f"an interpolation at {where or 'top level'} ({value[:60]!r})"
    return None


def method_keys(name: str) -> Optional[set]:
    """The keys method ``name`` uses: those of its preset, ``configs/method/<name>.yaml`` (None: no preset)."""
    path = Path(CONFIG_DIR) / "method" / f"{name}.yaml"
    if not path.is_file():
        return None
    from omegaconf import OmegaConf

    return set(OmegaConf.to_container(OmegaConf.load(path)))


def check_method_keys(config: Dict[str, Any]) -> None:
    """Refuse, with one line, settings the chosen method would ignore: a ``method.*`` key its preset does
    not have (``+method.sparsity=0.5`` with method=tdlrt), and a ``tau`` given with ``method.target_cr``."""
    method = config.get("method")
    if not isinstance(method, dict) or not isinstance(method.get("name"), str):
        return
    name = method["name"]
    keys = method_keys(name)
    if keys is not None:
        extra = sorted(set(method) - keys)
        if extra:
            raise ConfigError(f"method={name} does not use {', '.join('method.' + k for k in extra)} "
                              f"(its keys: {', '.join(sorted(keys - {'name', 'default_tau'}))})")
    if name == "tucker" and method.get("ranks_from") is not None and method.get("target_cr") is not None:
        from omegaconf import OmegaConf

        preset = OmegaConf.to_container(OmegaConf.load(Path(CONFIG_DIR) / "method" / "tucker.yaml"))
        if method.get("target_cr") != preset.get("target_cr"):
            raise ConfigError(f"method.target_cr={method['target_cr']:g} is not used with method.ranks_from (the "
                              f"ranks, and so the compression, come from that run); drop one of them")
    if name in RANK_ADAPTIVE and method.get("target_cr") is not None and config.get("tau") is not None \
            and config.get("tau") != method.get("default_tau"):
        raise ConfigError(f"tau={config['tau']} is not used with method.target_cr={method['target_cr']:g} (the target "
                          f"rule chooses ranks by a parameter budget, not by a tolerance); drop one of them")


def from_dictconfig(cfg) -> TrainConfig:
    """Merge a composed Hydra config into :class:`TrainConfig` and validate it (raises ConfigError)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from omegaconf.errors import MissingMandatoryValue

    try:
        container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        container.pop("hydra", None)
        check_method_keys(container)
        container = upgrade_config(container)
        merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), container)
        obj = OmegaConf.to_object(merged)
    except MissingMandatoryValue as exc:
        raise ConfigError(f"{exc.full_key} must be set ({exc.full_key}=...)") from None
    except OmegaConfBaseException as exc:
        msg = str(exc).splitlines()[0]
        key = getattr(exc, "full_key", None)
        if key and re.match(r"Key '[^']*' not in '\w+'$", msg) and key not in settings():  # +target_cr=90
            value = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
            typed = None if isinstance(value, (dict, list)) or OmegaConf.is_config(value) else (
                "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value))
            raise ConfigError(unknown_key(key, typed)) from None
        raise ConfigError(f"invalid config{f' at {key}' if key else ''}: {msg}") from None
    return obj.validate()


# One line per key: `tdlrt train --help` prints them beside the current values (a test keeps it complete).
FIELD_HELP = {
    "model.name": "network: vgg16, resnet18, alexnet (CIFAR variants), lenet5 (MNIST-sized), or torchvision (any of its "
                  "classifiers, model.arch=...); pick with model=NAME",
    "model.arch": "model=torchvision: the network, by torchvision's name (resnet50, mobilenet_v3_small, convnext_tiny, ...)",
    "model.weights": "model=torchvision: its published weights (DEFAULT or a name such as IMAGENET1K_V2), from "
                     "$TORCH_HOME/hub/checkpoints; null: random initialisation",
    "model.width_mult": "scales every hidden width (0.25: a quarter-width network, for CPUs and quick runs)",
    "data.name": "dataset: cifar10, cifar100, mnist, fashion_mnist, imagefolder or synthetic; pick with data=NAME",
    "data.root": "folder holding the dataset (default: $TDLRT_DATA, else ./data)",
    "data.download": "download the dataset into data.root when it is missing (torchvision)",
    "data.limit_train": "use only the first N training examples (quick runs); null: all",
    "data.limit_test": "use only the first N test examples; null: all",
    "data.val_split": "held-out end of the training set that chooses best.pt: a fraction, or N >= 1 examples; 0: none",
    "data.augment": "random crop (padding 1/8 of the size) and horizontal flip of training images",
    "data.train_dir": "imagefolder: training class folders, under data.root",
    "data.test_dir": "imagefolder: test class folders, under data.root",
    "data.num_workers": "imagefolder: DataLoader worker processes (0: load in the main process)",
    "data.mean": "imagefolder: per-channel normalisation mean (3 values)",
    "data.std": "imagefolder: per-channel normalisation standard deviation (3 values, > 0)",
    "data.image_size": "imagefolder and synthetic: side of the square input images",
    "data.crop": "imagefolder: imagenet (training: random resized crop + flip; test: resize to size/0.875, centre crop) "
                 "or pad (resize, centre crop; training: padded random crop + flip); auto: imagenet from 160 px",
    "data.channels": "synthetic: image channels",
    "data.num_classes": "synthetic: number of classes (>= 2)",
    "data.train_size": "synthetic: training examples",
    "data.test_size": "synthetic: test examples",
    "method.name": "training method: dense, tdlrt, dlrt, fixed-rank tucker/cp/tt/matrix, tucker_prune, snip, grasp, imp",
    "method.default_tau": "the tau a method=... preset brings; the top-level tau overrides it",
    "method.r_min": "tdlrt/dlrt: smallest rank of an adapted mode",
    "method.r_max": "tdlrt/dlrt: largest rank of an adapted mode (absolute); null: r_max_frac x mode size",
    "method.r_max_frac": "tdlrt/dlrt/tucker_prune: largest rank as a fraction of the mode size (when r_max is null); "
                         "null: 1 under the target rule, 0.5 under the tau rule",
    "method.init_rank": "tdlrt/dlrt: starting rank (absolute); null: init_rank_frac x mode size, else r_max",
    "method.init_rank_frac": "tdlrt/dlrt/tucker_prune: starting rank as a fraction of the mode size; null: the cap, "
                             "but half the mode size under the target rule with r_max_frac=null",
    "method.adapted_modes": "tdlrt/dlrt: channels (out and in adapted, kernel modes full) or all four modes",
    "method.augment_every": "tdlrt/dlrt: augment bases and truncate every k-th step; fixed bases in between; "
                            "null: 1 with the tau rule, 10 with target_cr",
    "method.ramp_start": "tdlrt/dlrt with target_cr: fraction of the training steps where the asked compression starts rising",
    "method.ramp_end": "tdlrt/dlrt with target_cr, tucker_prune: fraction of the training steps where it reaches "
                       "target_cr (cubic ramp)",
    "method.tau_warmup_epochs": "tdlrt/dlrt: the truncation tolerance ramps from 0 to tau over this many epochs",
    "method.tau_warmup_shape": "tdlrt/dlrt: linear (tau x t/T) or hold (truncate only to the rank caps until T)",
    "method.convert_linear": "also factorise hidden nn.Linear layers (the classifier stays dense)",
    "method.convert_first_conv": "also factorise the first conv (image channels in); dense by default",
    "method.finetune_epochs": "tdlrt/dlrt: last epochs with frozen bases (fixed ranks)",
    "method.init_decay": "> 0: ill-conditioned start, core singular values 10^(-decay k)",
    "method.rank_frac": "fixed-rank baselines: rank as a fraction of the channels",
    "method.ranks_from": "tucker: train at the final per-layer ranks of this finished run folder (replaces target_cr)",
    "method.target_cr": "the conv compression rate (%) to reach: fixed-rank baselines pick their rank fraction; "
                        "tdlrt/dlrt: the target rule (ranks of all layers chosen together under a budget)",
    "method.sparsity": "pruning baselines: fraction of conv weights removed",
    "method.rounds": "imp: prune-retrain rounds (epochs each)",
    "method.rewind_epoch": "imp: rewind the weights to their values after this epoch",
    "optimizer.name": "sgd, adam or adamw; pick with optimizer=NAME",
    "optimizer.nesterov": "sgd: Nesterov momentum",
    "optimizer.betas": "adam/adamw: the two moment decay rates",
    "optimizer.eps": "adam/adamw: denominator term (> 0)",
    "scheduler.name": "learning-rate schedule: cosine, onecycle, step, plateau or none; pick with scheduler=NAME",
    "scheduler.warmup_epochs": "cosine: linear lr warm-up epochs before the decay (default 1; runs before it had 0)",
    "scheduler.min_lr": "cosine/plateau: the lowest learning rate (<= lr)",
    "scheduler.pct_start": "onecycle: fraction of the steps spent raising the learning rate",
    "scheduler.step_size": "step: epochs between two decays",
    "scheduler.gamma": "step: factor of each decay",
    "scheduler.factor": "plateau: factor of each decay (< 1)",
    "scheduler.patience": "plateau: epochs without improvement before a decay",
    "checkpoint.every_n_steps": "> 0: also write checkpoints/last.pt every N steps (resume mid-epoch); 0: per epoch",
    "checkpoint.auto_resume": "a run folder that already holds checkpoints/last.pt continues from it",
    "checkpoint.keep_top_k": "> 0: also keep the k best epochs as checkpoints/epochNNN-<metric>XX.XX.pt (the metric "
                             "of best.pt; rank-adaptive runs: epochs at the final ranks)",
    "task_name": "first folder level under outputs/",
    "tau": "tdlrt/dlrt: relative truncation tolerance in (0, 1); larger prunes more",
    "lr": "peak learning rate",
    "weight_decay": "L2 weight decay on conv/linear weights and low-rank cores",
    "momentum": "sgd momentum",
    "epochs": "training epochs (a resume may raise it)",
    "batch_size": "training batch size",
    "seed": "seed of initialisation, data order and augmentation",
    "device": "auto (CUDA if there is a GPU), cpu, cuda or cuda:N",
    "threads": "CPU threads of torch; null: $OMP_NUM_THREADS if set, else half the CPU cores (at most 8)",
    "precision": "fp32 or bf16 (autocast; the low-rank algebra stays fp32)",
    "deterministic": "torch.use_deterministic_algorithms (slower, bitwise repeatable)",
    "ckpt_path": "resume from this checkpoint, in its run folder (same as resume=)",
    "init_from": "start from dense weights: a checkpoint or state dict path, or torchvision",
    "eval_batch_size": "batch size of evaluation",
    "log_every_n_steps": "TensorBoard step scalars and ranks_steps.csv every N steps",
    "progress": "progress bar on a terminal, plain lines every 30 s otherwise",
    "nan_policy": "stop: end the run at a NaN/Inf loss; skip: skip such steps (at most nan_max_skips)",
    "nan_max_skips": "nan_policy=skip: give up after this many skipped steps in the run",
    "cost_report": "summary.json gets the cost report (params, FLOPs, peak memory, latency, dense vs low-rank)",
    "cost_latency": "the cost report also times both networks at batch 1 and 128 (off: parameters, FLOPs, memory only)",
    "cost_repeat": "timed repetitions per latency figure of the cost report (cost_latency=true)",
}
