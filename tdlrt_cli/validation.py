"""The checks of :meth:`.config.TrainConfig.validate`: every value in range, each as one line naming the key, the
value and what it may be (a percentage given for a fraction, or a fraction for a percentage, says so)."""
from __future__ import annotations

import math
from typing import Optional

from .errors import ConfigError
from .families import FIXED_RANK, METHODS, PRUNED, PRUNING, RANK_ADAPTIVE
from .identity import TARGET_AUGMENT_EVERY, TAU_RULE_RAMP, flatten, resolve_rank_defaults

# The presets of each config group (configs/<group>/<name>.yaml) that a run may pick.
MODELS = ("vgg16", "resnet18", "alexnet", "lenet5", "torchvision")
DATASETS = ("cifar10", "cifar100", "mnist", "fashion_mnist", "imagefolder", "synthetic")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("cosine", "onecycle", "step", "plateau", "none")
PRECISIONS = ("fp32", "bf16")

# The largest value of each numeric key that tdlrt takes, and why: beyond it a run cannot be built, cannot
# be held in memory, or only diverges. Every number must also be finite (TrainConfig.validate).
LARGEST = {
    "model.width_mult": (16, "16 times the paper's channels"),
    "data.image_size": (4096, "pixels a side"),
    "data.channels": (64, "image channels"),
    "data.num_classes": (1_000_000, "classes"),
    "data.train_size": (10_000_000, "synthetic images are held in memory"),
    "data.test_size": (10_000_000, "synthetic images are held in memory"),
    "data.num_workers": (256, "loader processes"),
    "method.r_min": (1_000_000, "a rank"), "method.r_max": (1_000_000, "a rank"),
    "method.init_rank": (1_000_000, "a rank"),
    "method.augment_every": (1_000_000_000, "steps"),
    "method.tau_warmup_epochs": (1_000_000, "epochs"),
    "method.init_decay": (30, "core singular values 10^(-decay k) underflow beyond it"),
    "method.rounds": (10_000, "prune-retrain rounds"),
    "lr": (1000, "a larger lr only diverges"),
    "weight_decay": (10, "a larger decay only zeroes the weights"),
    "epochs": (1_000_000, "epochs"),
    "batch_size": (1_000_000, "examples a step"),
    "eval_batch_size": (1_000_000, "examples a batch"),
    "threads": (4096, "CPU threads"),
    "log_every_n_steps": (1_000_000_000, "steps"),
    "nan_max_skips": (1_000_000_000, "steps"),
    "cost_repeat": (1_000_000, "timed repetitions"),
    "checkpoint.every_n_steps": (1_000_000_000, "steps"),
    "checkpoint.keep_top_k": (10_000, "checkpoints"),
    "scheduler.warmup_epochs": (1_000_000, "epochs"),
    "scheduler.step_size": (1_000_000, "epochs"),
    "scheduler.patience": (1_000_000, "epochs"),
    "optimizer.eps": (1.0, "a larger eps stops Adam's steps"),
}

# Keys given in percent (0-100), and what of: a value in (0, 1) is a fraction typed where a percentage belongs
# (a 0.9% compression target is none anyone asks for), refused with the percentage it reads as.
PERCENTAGES = {"method.target_cr": "of the conv parameters removed"}
# Keys that are fractions (the ranges TrainConfig.validate checks), and what of: a value in (1, 100] that is a
# valid fraction once divided by 100 is a percentage typed where a fraction belongs, refused with that fraction.
# (data.val_split is not one: a value >= 1 is a number of examples.)
FRACTIONS = {
    "method.r_max_frac": "of the mode size", "method.init_rank_frac": "of the mode size",
    "method.rank_frac": "of the channels", "method.sparsity": "of the conv weights removed",
    "method.ramp_start": "of the training steps", "method.ramp_end": "of the training steps",
    "scheduler.pct_start": "of the training steps",
}


def _number(value: float) -> str:
    """A number as a user types it: 90, 0.5, 0.125 (no float noise: 0.9 * 100 is 90)."""
    return f"{round(float(value), 10):g}"


def percentage_given(key: str, value, interval: str, ok) -> Optional[str]:
    """One line when a fraction key (:data:`FRACTIONS`) got a percentage: ``value`` in (1, 100] with
    ``ok(value / 100)``; ``interval``: its range as the line shows it, ``(0-1]``. None otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 1 < value <= 100 or not ok(value / 100):
        return None
    return (f"{key}={_number(value)} is a fraction {interval}: did you mean {key}={_number(value / 100)}? "
            f"(a fraction {FRACTIONS.get(key, 'of one')}, not a percentage)")


def fraction_given(key: str, value) -> Optional[str]:
    """One line when a percentage key (:data:`PERCENTAGES`) got a fraction, ``value`` in (0, 1); None otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        return None
    return (f"{key}={_number(value)} is a percentage: did you mean {key}={_number(value * 100)}? (a percentage "
            f"{PERCENTAGES.get(key, '')}, 0-100, not a fraction)").replace("  ", " ")


def need(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def one_of(key: str, value: str, allowed) -> None:
    need(value in allowed, f"{key}={value} is not one of: {', '.join(allowed)}")


def fraction(key: str, value, ok, interval: str, msg: Optional[str]) -> None:
    """A fraction key: a percentage given there gets the fraction it reads as (method.r_max_frac=50: 0.5);
    ``msg`` None: the caller's own check says what else is wrong."""
    if not ok(value):
        hint = percentage_given(key, value, interval, ok) or msg
        if hint:
            raise ConfigError(hint)


def check_numbers(c) -> None:
    """Every number finite, and none beyond what tdlrt takes (:data:`LARGEST`)."""
    from dataclasses import asdict

    for key, value in flatten(asdict(c)).items():
        for v in value if isinstance(value, list) else [value]:
            need(not isinstance(v, float) or math.isfinite(v), f"{key}={value} must be a finite number")
        if key in LARGEST and isinstance(value, (int, float)) and not isinstance(value, bool):
            top, why = LARGEST[key]
            need(value <= top, f"{key}={value} is larger than tdlrt takes (at most {top:g}: {why})")


def check_model(m) -> None:
    """model=torchvision takes model.arch (and model.weights) and no width; the built-in networks neither."""
    if m.name == "torchvision":
        need(bool(m.arch), "model=torchvision needs model.arch=<name> (e.g. resnet50, mobilenet_v3_small, "
                           "convnext_tiny; `tdlrt train --help` lists them)")
        need(m.width_mult == 1, f"model.width_mult={m.width_mult:g} scales the built-in networks only; "
                                f"model=torchvision builds {m.arch} as torchvision does (a smaller one: another arch)")
        from .models.torchvision_nets import check_choice

        check_choice(m.arch, m.weights)  # before any file is written
    else:
        for key in ("arch", "weights"):
            need(getattr(m, key) is None, f"model.{key}={getattr(m, key)} is for model=torchvision (model={m.name} "
                                          f"is a built-in network); drop it or set model=torchvision")


def check_run(c) -> None:
    """The config groups' names and the run's top-level keys."""
    one_of("model", c.model.name, MODELS)
    one_of("data", c.data.name, DATASETS)
    one_of("method", c.method.name, METHODS)
    one_of("optimizer", c.optimizer.name, OPTIMIZERS)
    one_of("scheduler", c.scheduler.name, SCHEDULERS)
    one_of("precision", c.precision, PRECISIONS)
    one_of("nan_policy", c.nan_policy, ("stop", "skip"))
    need(c.device == "auto" or c.device == "cpu" or c.device.startswith("cuda"),
         f"device={c.device} is not one of: auto, cpu, cuda, cuda:N")
    need(c.threads is None or c.threads >= 1, f"threads={c.threads} must be >= 1 (null: automatic)")
    need(c.lr > 0, f"lr={c.lr} must be > 0")
    need(c.weight_decay >= 0, f"weight_decay={c.weight_decay} must be >= 0")
    need(0 <= c.momentum < 1, f"momentum={c.momentum} must be in [0, 1)")
    need(c.epochs >= 0, f"epochs={c.epochs} must be >= 0")
    need(c.batch_size > 0, f"batch_size={c.batch_size} must be > 0")
    need(c.eval_batch_size > 0, f"eval_batch_size={c.eval_batch_size} must be > 0")
    need(c.checkpoint.every_n_steps >= 0,
         f"checkpoint.every_n_steps={c.checkpoint.every_n_steps} must be >= 0 (0: per epoch only)")
    need(c.cost_repeat >= 1, f"cost_repeat={c.cost_repeat} must be >= 1")
    need(c.checkpoint.keep_top_k >= 0,
         f"checkpoint.keep_top_k={c.checkpoint.keep_top_k} must be >= 0 (0: best.pt and last.pt only)")
    need(c.log_every_n_steps > 0, f"log_every_n_steps={c.log_every_n_steps} must be > 0")
    need(c.model.width_mult > 0, f"model.width_mult={c.model.width_mult} must be > 0")
    check_model(c.model)
    need(c.nan_max_skips >= 1, f"nan_max_skips={c.nan_max_skips} must be >= 1")
    need(0 <= c.seed < 2 ** 63, f"seed={c.seed} must be in [0, 2^63)")
    need(bool(c.task_name) and "/" not in c.task_name and "\\" not in c.task_name
         and c.task_name not in (".", ".."),
         f"task_name={c.task_name!r} must be a plain folder name (it is a folder under outputs/)")
    need(c.optimizer.eps > 0, f"optimizer.eps={c.optimizer.eps} must be > 0")
    b = c.optimizer.betas
    need(len(b) == 2 and all(0 <= x < 1 for x in b), f"optimizer.betas={list(b)} must be two numbers in [0, 1)")


def check_data(d) -> None:
    """The data group: sizes, the validation split, what imagefolder and synthetic data need."""
    for key in ("limit_train", "limit_test"):
        value = getattr(d, key)
        need(value is None or value > 0, f"data.{key}={value} must be a positive number of examples")
    v = d.val_split
    need(v == 0 or 0 < v < 1 or v >= 1 and float(v).is_integer(),
         f"data.val_split={v} must be 0 (none), a fraction in (0, 1), or a whole number of examples"
         + (f" (a percentage? {v:g}% is data.val_split={_number(v / 100)})" if 1 < v < 100 else ""))
    need(v == 0 or d.name != "imagefolder",
         "data.val_split is not supported for data=imagefolder (put a validation split in its own folder)")
    one_of("data.crop", d.crop, ("auto", "imagenet", "pad"))
    need(d.name != "imagefolder" or bool(d.root),
         "data=imagefolder needs data.root=DIR (a folder with train/ and val/ class folders)")
    need(d.image_size is None or d.image_size >= 1, f"data.image_size={d.image_size} must be >= 1 (pixels)")
    if d.name == "synthetic":
        need(d.num_classes >= 2, f"data.num_classes={d.num_classes} must be >= 2")
        need(d.channels >= 1, f"data.channels={d.channels} must be >= 1")
        need(d.train_size >= 1 and d.test_size >= 1,
             f"data.train_size={d.train_size} and data.test_size={d.test_size} must be >= 1")


def check_schedule(c) -> None:
    """The learning-rate schedule: its warm-up within the run, its floor below lr, each scheduler's keys."""
    sc = c.scheduler
    need(sc.warmup_epochs >= 0, f"scheduler.warmup_epochs={sc.warmup_epochs} must be >= 0")
    need(sc.name not in ("cosine", "step") or c.epochs == 0 or sc.warmup_epochs <= c.epochs,
         f"scheduler.warmup_epochs={sc.warmup_epochs} is longer than the run (epochs={c.epochs}): the lr would "
         f"never reach lr={c.lr}")
    need(0 <= sc.min_lr <= c.lr, f"scheduler.min_lr={sc.min_lr} must be in [0, lr={c.lr}]")
    if sc.name == "step":
        need(sc.step_size >= 1, f"scheduler.step_size={sc.step_size} must be >= 1 (epochs)")
        need(0 < sc.gamma <= 1, f"scheduler.gamma={sc.gamma} must be in (0, 1]")
    if sc.name == "onecycle":
        fraction("scheduler.pct_start", sc.pct_start, lambda x: 0 < x < 1, "(0-1)",
                 f"scheduler.pct_start={sc.pct_start} must be in (0, 1)")
    if sc.name == "plateau":
        need(0 < sc.factor < 1, f"scheduler.factor={sc.factor} must be in (0, 1)")
        need(sc.patience >= 0, f"scheduler.patience={sc.patience} must be >= 0")


def check_method(c) -> None:
    """The method group: the keys of the method picked, tau only where the tau rule uses it."""
    m = c.method
    for key in PERCENTAGES:  # method.target_cr=0.9: a fraction where a percentage belongs (0 < v < 1)
        group, _, leaf = key.rpartition(".")
        hint = fraction_given(key, getattr(getattr(c, group) if group else c, leaf))
        need(hint is None, hint)
    if m.name == "tucker" and m.ranks_from is not None:
        need(bool(str(m.ranks_from).strip()), "method.ranks_from= is empty (a finished run folder, or null)")
        need(m.rank_frac is None, "method.rank_frac cannot be combined with method.ranks_from (the ranks come "
                                  "from that run)")
    elif m.name in FIXED_RANK:
        need((m.rank_frac is None) != (m.target_cr is None),
             f"method={m.name} needs exactly one of method.rank_frac and method.target_cr")
        if m.rank_frac is not None:
            fraction("method.rank_frac", m.rank_frac, lambda x: 0 < x <= 1, "(0-1]",
                     f"method.rank_frac={m.rank_frac} must be in (0, 1]")
        need(m.target_cr is None or 0 < m.target_cr < 100, f"method.target_cr={m.target_cr} must be in (0, 100)")
    if m.name in PRUNING:
        fraction("method.sparsity", m.sparsity, lambda x: 0 < x < 1, "(0-1)",
                 f"method.sparsity={m.sparsity} must be in (0, 1)")
    if m.name == "imp":
        need(m.rounds >= 1 and 0 <= m.rewind_epoch < max(c.epochs, 1),
             f"method.rounds={m.rounds} must be >= 1 and method.rewind_epoch={m.rewind_epoch} below epochs")
    need(m.init_decay >= 0, f"method.init_decay={m.init_decay} must be >= 0")
    if m.name in PRUNED:
        need(m.target_cr is not None and 0 < m.target_cr < 100,
             f"method.target_cr={m.target_cr} must be in (0, 100) (a conv compression rate in percent)")
        check_ramp(m)
        if m.augment_every is None:
            m.augment_every = TARGET_AUGMENT_EVERY
        need(m.augment_every >= 1, f"method.augment_every={m.augment_every} must be >= 1")
        check_ranks(m)
    if m.name in RANK_ADAPTIVE:
        check_rank_adaptive(c)
    else:
        need(c.tau is None, f"tau={c.tau} applies to method=tdlrt or dlrt only, not method={m.name}")


def check_rank_adaptive(c) -> None:
    """tdlrt and dlrt: the target rule (method.target_cr) or the tau rule, never the other's keys."""
    m = c.method
    if m.target_cr is not None:  # the target rule
        need(0 < m.target_cr < 100, f"method.target_cr={m.target_cr} must be in (0, 100) (a conv "
                                    f"compression rate in percent)")
        check_ramp(m)
        for key, preset in (("tau_warmup_epochs", 1.0), ("tau_warmup_shape", "linear")):
            need(getattr(m, key) == preset, f"method.{key}={getattr(m, key)} is not used by the target rule "
                 f"(method.target_cr={m.target_cr:g}): it belongs to the tau rule; drop one of them")
        if m.augment_every is None:
            m.augment_every = TARGET_AUGMENT_EVERY
    else:  # the tau rule (the paper's)
        need(c.tau is not None and 0 < c.tau < 1, f"tau={c.tau} must be in (0, 1)")
        if (m.ramp_start, m.ramp_end) not in TAU_RULE_RAMP:
            key = "ramp_start" if m.ramp_start != TAU_RULE_RAMP[0][0] else "ramp_end"
            raise ConfigError(f"method.{key}={getattr(m, key)} is used only by the target rule: set "
                              f"method.target_cr=C (a conv compression rate in percent) too, or drop it")
        if m.augment_every is None:
            m.augment_every = 1
    check_ranks(m)
    one_of("method.adapted_modes", m.adapted_modes, ("channels", "all"))
    need(m.augment_every >= 1, f"method.augment_every={m.augment_every} must be >= 1")
    need(m.tau_warmup_epochs >= 0, f"method.tau_warmup_epochs={m.tau_warmup_epochs} must be >= 0 (0: the "
                                   f"plain rule, tau from the first step)")
    one_of("method.tau_warmup_shape", m.tau_warmup_shape, ("linear", "hold"))
    need(0 <= m.finetune_epochs <= c.epochs,
         f"method.finetune_epochs={m.finetune_epochs} must be in [0, epochs={c.epochs}]")


def check_ramp(m) -> None:
    """The target rule's schedule (tdlrt/dlrt with target_cr, tucker_prune)."""
    for key in ("ramp_start", "ramp_end"):
        fraction(f"method.{key}", getattr(m, key), lambda x: 0 <= x <= 1, "[0-1]", None)
    need(0 <= m.ramp_start <= m.ramp_end <= 1, f"method.ramp_start={m.ramp_start} and "
         f"method.ramp_end={m.ramp_end} must satisfy 0 <= ramp_start <= ramp_end <= 1 (fractions of "
         f"the training steps)")


def check_ranks(m) -> None:
    """Rank bounds and start of the rank-adaptive methods (tdlrt, dlrt, tucker_prune)."""
    resolve_rank_defaults(m)
    need(m.r_min >= 1, f"method.r_min={m.r_min} must be >= 1")
    need(m.r_max is None or m.r_max >= m.r_min, f"method.r_min={m.r_min} is larger than method.r_max={m.r_max}")
    fraction("method.r_max_frac", m.r_max_frac, lambda x: 0 < x <= 1, "(0-1]",
             f"method.r_max_frac={m.r_max_frac} must be in (0, 1]")
    need(m.init_rank is None or m.init_rank >= 1, f"method.init_rank={m.init_rank} must be >= 1")
    if m.init_rank_frac is not None:
        fraction("method.init_rank_frac", m.init_rank_frac, lambda x: 0 < x <= 1, "(0-1]",
                 f"method.init_rank_frac={m.init_rank_frac} must be in (0, 1]")
