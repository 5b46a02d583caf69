"""Which keys make a run what it is: one home for comparing a run's configuration with another.

A resume refuses a command that would train something else (:func:`config_drift`, :func:`check_resume`), the
report puts runs that differ only in their seed (and in keys that never change what is trained) in one row
(:func:`grouping_config`), and both read a config written by an older tdlrt as the run it was: renamed keys
under their new names and defaults that depend on other keys resolved (:func:`upgrade_config`), keys it
predates at the value that reproduces what it did (:data:`LEGACY_VALUES`). Values compare by one rule,
:func:`canon` (numbers by value, ``1 == 1.0``; booleans, None and strings only equal to themselves).
"""
from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Tuple

from .errors import ConfigError
from .families import PRUNED, RANK_ADAPTIVE

TARGET_AUGMENT_EVERY = 10  # the target rule's default clock (method.augment_every=null)
TAU_RULE_RAMP = ((0.0, 0.75), (0.0, 0.5))  # (ramp_start, ramp_end) of the presets, now and before (the tau rule ignores it)


# Keys that never change what a run trains: where its files go, how it logs, when it checkpoints, what it
# measures after training, which device runs it. An entry covers the keys below it ("checkpoint": .every_n_steps
# and .auto_resume). `tdlrt report` averages runs that differ only in these (and the seed); a resume may change
# them (and a few more, RESUME_FREE).
NOT_TRAINING_KEYS = (
    "task_name",                          # the run folder (outputs/<task_name>/...)
    "ckpt_path",                          # the checkpoint a resumed run continued from
    "checkpoint",                         # when last.pt is written, whether a requeued job continues
    "progress", "log_every_n_steps",      # progress bar, TensorBoard step scalars
    "eval_batch_size",                    # batches of the test-set evaluation (eval mode: same accuracy)
    "cost_report", "cost_latency", "cost_repeat",  # the cost report measured after training
    "device", "threads",                  # auto, cpu, cuda:N; CPU threads
    "data.download", "data.num_workers",  # fetching the files, loader processes
    "nan_max_skips",                      # when nan_policy=skip gives up (a finished run skipped fewer)
)

# Keys added after runs were already being made, with the value that reproduces what a run did before the key
# existed: a saved config without the key is compared (resume, report) as if it had that value. Not the
# current defaults: tau_warmup_epochs defaults to 1 and val_split to 0.1, but older runs did neither.
LEGACY_VALUES = {
    "data.val_split": 0.0,
    "method.tau_warmup_epochs": 0.0,
    "method.tau_warmup_shape": "linear",
    "nan_max_skips": 10,
    "method.ranks_from": None,
    "data.crop": "pad",  # data=imagefolder before ImageNet's transforms: the padded crop at every size
    "model.arch": None,
    "model.weights": None,
}

# Keys whose default changed after runs were made with the old one (the controls study: an lr warm-up for every
# method, and the target rule's rank caps at the full channel count, a start at half, the target reached at 3/4
# of training). A resume keeps a run's saved value of these unless the command sets them, so that older runs
# continue (and report) as they were started.
CHANGED_DEFAULTS = ("scheduler.warmup_epochs", "method.r_max_frac", "method.init_rank_frac", "method.ramp_end")


def changed_defaults_of(saved: Dict[str, Any], given, present) -> Dict[str, Any]:
    """The saved values (flattened ``saved`` config) a resume keeps of the keys whose default changed: those the
    command does not set itself (``given``: the keys it names) and the new config has (``present(key)``: e.g.
    not after a switch to a method without the key)."""
    flat = flatten(saved)
    return {k: flat[k] for k in CHANGED_DEFAULTS if k in flat and k not in given and present(k)}


# Keys a resume may change: the ones that never change what is trained, and how long (epochs), from where
# (data.root), how repeatably (deterministic) and with what NaN policy it goes on; init_from acts only at the start.
RESUME_FREE = NOT_TRAINING_KEYS + ("epochs", "data.root", "deterministic", "nan_policy", "init_from")
# ... and of those, the ones a resume takes from this machine's command rather than from the run.
MACHINE_KEYS = ("device", "progress", "data.root", "data.download", "data.num_workers", "checkpoint.auto_resume",
                "ckpt_path", "init_from")
# Runs whose resolved configs differ only in these and in ``seed`` (over which a row averages) share a row;
# any other difference makes another row.
IGNORED_KEYS = ("hydra",) + NOT_TRAINING_KEYS
SEED_KEY = "seed"
# data.root is only where the files of these datasets live (it differs between machines); for
# data=imagefolder it is the dataset itself and stays a grouping key.
ROOT_IS_LOCATION = ("cifar10", "cifar100", "mnist", "fashion_mnist", "synthetic")
MISSING = object()  # a key absent from a run's config (an older tdlrt, a hand-written summary)



def is_free(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in RESUME_FREE)


def is_ignored(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in IGNORED_KEYS)


# Keys added after runs were already being made: a run without the key is compared as if it had the value that
# reproduces what it did (LEGACY_VALUES; not the current defaults: tau_warmup_epochs defaults to 1, but
# older runs used the plain rule), if the key belongs to its method (None: every run).
ADDED_KEYS = {
    "data.val_split": (LEGACY_VALUES["data.val_split"], None),
    "method.tau_warmup_epochs": (LEGACY_VALUES["method.tau_warmup_epochs"], RANK_ADAPTIVE),
    "method.tau_warmup_shape": (LEGACY_VALUES["method.tau_warmup_shape"], RANK_ADAPTIVE),
    "method.ranks_from": (LEGACY_VALUES["method.ranks_from"], ("tucker",)),
}


def has_key(cfg, key: str) -> bool:
    """``key`` (dotted) is in the composed (OmegaConf) config ``cfg``."""
    from omegaconf import OmegaConf

    missing = object()
    return OmegaConf.select(cfg, key, default=missing) is not missing


def flatten(config: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists stay values)."""
    flat: Dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def resolve_rank_defaults(m) -> None:
    """The rank defaults that depend on the rule (a MethodConfig, or a method dict): ``r_max_frac=null`` is 0.5
    under the tau rule (room to augment to 2r) and 1 under the target rule and for tucker_prune;
    with the default caps (``r_max_frac=null``) the target rule starts at half the mode size
    (``init_rank_frac=null`` and no ``init_rank``); otherwise ``init_rank_frac=null`` starts at the cap, as it
    always did. :func:`upgrade_config` resolves the same for comparisons, so that older runs compare and
    report as they were."""
    get = (lambda k: m.get(k)) if isinstance(m, dict) else (lambda k: getattr(m, k, None))

    def put(k, v):
        if isinstance(m, dict):
            m[k] = v
        else:
            setattr(m, k, v)

    target = get("target_cr") is not None or get("name") in PRUNED
    if get("r_max_frac") is None:  # the rule's default caps (an explicit r_max_frac keeps init at its cap)
        put("r_max_frac", 1.0 if target else 0.5)
        if target and get("init_rank") is None and get("init_rank_frac") is None:
            put("init_rank_frac", 0.5)


def upgrade_config(config: Dict[str, Any]) -> Dict[str, Any]:
    """A config in this version's keys, with defaults that depend on other keys resolved: ``data.val_size``
    (a number of examples) became ``data.val_split`` (a fraction or a number of examples); tdlrt/dlrt's
    ``method.augment_every=null`` is 1 under the tau rule and 10 under the target rule (``method.target_cr``),
    which does not use ``tau`` (None)."""
    config = {k: (dict(v) if isinstance(v, dict) else v) for k, v in config.items()}
    data = config.get("data")
    if isinstance(data, dict) and "val_size" in data:
        size = data.pop("val_size")
        data.setdefault("val_split", float(size or 0))
    method = config.get("method")
    if isinstance(method, dict) and method.get("name") in PRUNED and method.get("augment_every", 1) is None:
        method["augment_every"] = TARGET_AUGMENT_EVERY
    if isinstance(method, dict) and method.get("name") == "tucker" and method.get("ranks_from") is not None:
        method["target_cr"] = None  # the ranks (and so the c.r.) come from that run
    if isinstance(method, dict) and method.get("name") in RANK_ADAPTIVE + PRUNED \
            and "r_max_frac" in method:
        resolve_rank_defaults(method)  # the rule's default caps and start (r_max_frac=null: this version's)
    if isinstance(method, dict) and method.get("name") in RANK_ADAPTIVE:
        target = method.get("target_cr") is not None
        if not target and (method.get("ramp_start", 0.0), method.get("ramp_end", 0.5)) in TAU_RULE_RAMP:
            method["ramp_start"], method["ramp_end"] = TAU_RULE_RAMP[1]  # unused by the tau rule: as before
        if method.get("augment_every", 1) is None:  # null: the rule's own clock
            method["augment_every"] = TARGET_AUGMENT_EVERY if target else 1
        if target:  # the target rule does not use tau: a run is not told apart by the preset's tau
            config["tau"] = None
    return config



# --------------------------------------------------------------------------- comparing values and configs

def _norm(v):
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, (int, float)):
        return float(v)  # 1 and 1.0 are the same setting
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _norm(x) for k, x in v.items()}
    return str(v)


def canon(v) -> str:
    """A value as a comparable string (MISSING apart from every value, None included)."""
    return "<missing>" if v is MISSING else json.dumps(_norm(v), sort_keys=True)


def same(a, b) -> bool:
    """``a`` and ``b`` are the same setting (:func:`canon`)."""
    return canon(a) == canon(b)


def config_drift(saved: dict, new: dict) -> List[Tuple[str, object, object]]:
    """The keys that would change what is trained, as ``(key, saved value, new value)``.

    Keys the saved config predates count as the value that reproduces what the run did
    (:data:`LEGACY_VALUES`); renamed keys are read under their new names.
    """
    old, cur = flatten(upgrade_config(saved)), flatten(upgrade_config(new))
    missing = object()
    drift = []
    for key in sorted(set(old) | set(cur)):
        if is_free(key):
            continue
        a, b = old.get(key, missing), cur.get(key, missing)
        if a is missing:
            a = LEGACY_VALUES.get(key, missing)
        if a is missing or b is missing or not same(a, b):
            drift.append((key, None if a is missing else a, None if b is missing else b))
    return drift


def describe_drift(drift, limit: int = 6) -> str:
    """The changed keys, the names of what is trained first (``method.name "tdlrt" -> "dense"`` is the news;
    the keys that differ because another preset was picked follow)."""
    drift = sorted(drift, key=lambda d: not str(d[0]).endswith(".name"))
    shown = ", ".join(f"{k} {json.dumps(a)} -> {json.dumps(b)}" for k, a, b in drift[:limit])
    return shown + (f" (and {len(drift) - limit} more)" if len(drift) > limit else "")


def check_resume(saved: Optional[dict], new: Optional[dict], done: int, epochs: int, where) -> None:
    """Refuse resuming the run in ``where`` (its saved config, ``done`` epochs completed) with ``new`` when
    that would change what is trained or shorten the run to ``epochs`` (the resume checks of `tdlrt train`
    before Hydra, and of the run itself for library use and sweep jobs; without both configs, only the
    epochs)."""
    drift = config_drift(saved, new) if saved is not None and new is not None else []
    if drift:
        raise ConfigError(f"resuming {where} would change what is trained: {describe_drift(drift)} "
                          f"(a resume may change epochs, device, data.root, logging and checkpoint settings; "
                          f"train other settings in a new folder)")
    if done > epochs:
        raise ConfigError(f"epochs={epochs} but the run in {where} has completed {done} epochs (a resume may extend "
                          f"epochs, not shorten them)")


def grouping_config(config: dict, labels: Optional[Dict[str, str]] = None) -> Dict[str, object]:
    """The flattened config that decides a run's row in the report: everything but the seed and the ignored
    keys, keys it predates at their legacy value where they belong to its method; ``labels`` replaces the
    values of present keys (the report: a path to another run stands for that run's setting)."""
    flat = flatten(upgrade_config(config))
    for key, label in (labels or {}).items():
        if key in flat:
            flat[key] = label
    for key, (before, methods) in ADDED_KEYS.items():
        if key not in flat and (methods is None or flat.get("method.name") in methods):
            flat[key] = before
    kept = {k: v for k, v in flat.items() if k != SEED_KEY and not is_ignored(k)}
    if flat.get("data.name") in ROOT_IS_LOCATION:
        kept.pop("data.root", None)
    return kept
