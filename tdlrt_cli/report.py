"""`tdlrt report PATH... [out=DIR] [band=5]`: run folders -> the paper's tables and plots.

Every ``summary.json`` under the given paths (single runs or multirun sweeps) is one finished run. Runs
are grouped by their whole resolved config except the seed and the keys in :data:`IGNORED_KEYS`: each
group is one row with mean and standard deviation over its seeds, and the config keys that differ
between rows become columns (a tau sweep gets a ``tau`` column, an lr sweep an ``lr`` column). Run
folders without a ``summary.json`` (still running, killed, failed) are listed apart as unfinished, with
the epochs they reached. Within a (data, model) table the best and second-best accuracies are marked
among the rows of comparable compression: rows whose mean conv compression rate falls in the same
``band``-point band (e.g. 90-95%). The accuracy of a row is each run's test accuracy at its
validation-selected checkpoint (``selected`` in summary.json, runs with ``data.val_split > 0``), else after
the last epoch (``test_acc``); the best test accuracy over epochs (``best_test_acc``, selected on the test
set itself, so optimistic) is shown apart and never used to rank rows.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

from .config import LEGACY_VALUES, NOT_TRAINING_KEYS, flatten, upgrade_config
from .errors import UserError
from .files import atomic_text, atomic_write_text, remove_stale_temporaries

METHOD_ORDER = ["dense", "tdlrt", "dlrt", "tucker", "cp", "tt", "matrix", "snip", "grasp", "imp"]
METHOD_LABEL = {"dense": "Dense", "tdlrt": "TDLRT", "dlrt": "Matrix DLRT", "tucker": "Tucker (fixed rank)",
                "cp": "CP (fixed rank)", "tt": "TT (fixed rank)", "matrix": "Matrix (fixed rank)",
                "snip": "SNIP", "grasp": "GraSP", "imp": "IMP (rewinding)"}

# Runs whose resolved configs differ only in these and in ``seed`` (over which a row averages) share a row;
# any other difference makes another row.
IGNORED_KEYS = ("hydra",) + NOT_TRAINING_KEYS
SEED_KEY = "seed"
# data.root is only where the files of these datasets live (it differs between machines); for
# data=imagefolder it is the dataset itself and stays a grouping key.
ROOT_IS_LOCATION = ("cifar10", "cifar100", "mnist", "fashion_mnist", "synthetic")
SHOWN_KEYS = ("data.name", "model.name", "method.name")  # have columns of their own
OWNED_BY = {"tau": "method"}  # top-level keys that belong to a config group (tau: tdlrt and dlrt only)
KNOB_KEYS = ("tau", "method.rank_frac", "method.target_cr", "method.sparsity")  # what knob_of shows
MISSING = object()  # a key absent from a run's config (an older tdlrt, a hand-written summary)


def is_ignored(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in IGNORED_KEYS)


# Keys added after runs were already being made: a run without the key is compared as if it had the value that
# reproduces what it did (config.LEGACY_VALUES; not the current defaults: tau_warmup_epochs defaults to 1, but
# older runs used the plain rule), if the key belongs to its method (None: every run).
ADDED_KEYS = {
    "data.val_split": (LEGACY_VALUES["data.val_split"], None),
    "method.tau_warmup_epochs": (LEGACY_VALUES["method.tau_warmup_epochs"], ("tdlrt", "dlrt")),
    "method.tau_warmup_shape": (LEGACY_VALUES["method.tau_warmup_shape"], ("tdlrt", "dlrt")),
}


def grouping_config(config: dict) -> Dict[str, object]:
    """The flattened config that decides a run's row: everything but the seed and the ignored keys."""
    flat = flatten(upgrade_config(config))
    for key, (before, methods) in ADDED_KEYS.items():
        if key not in flat and (methods is None or flat.get("method.name") in methods):
            flat[key] = before
    kept = {k: v for k, v in flat.items() if k != SEED_KEY and not is_ignored(k)}
    if flat.get("data.name") in ROOT_IS_LOCATION:
        kept.pop("data.root", None)
    return kept


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


def fmt(v) -> str:
    if v is MISSING:
        return "n/a"
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (int, float)):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(fmt(x) for x in v) + "]"
    return str(v)


@dataclass
class Run:
    path: Path
    data: str
    model: str
    method: str
    knob: str
    seed: int
    test_acc: float                  # final: after the last epoch
    compression_rate: float
    init_decay: float = 0.0
    best_test_acc: Optional[float] = None  # max over epochs (test-selected); None when summary.json has none
    config: Dict[str, object] = field(default_factory=dict)  # grouping_config of the run
    summary: Dict[str, object] = field(default_factory=dict, repr=False)  # the run's summary.json

    @property
    def val_selected_acc(self) -> Optional[float]:
        """Test accuracy of the checkpoint chosen on the validation split, if the run had one."""
        sel = self.summary.get("selected") if isinstance(self.summary, dict) else None
        if isinstance(sel, dict) and sel.get("by") == "val_acc" and sel.get("test_acc") is not None:
            return float(sel["test_acc"])
        return None

    @property
    def acc(self) -> float:
        """The accuracy a row reports: at the validation-selected checkpoint, else after the last epoch."""
        v = self.val_selected_acc
        return self.test_acc if v is None else v

    @property
    def max_acc(self) -> float:
        """The best test accuracy over epochs (selected on the test set: optimistic); final if unknown."""
        return self.test_acc if self.best_test_acc is None else self.best_test_acc


@dataclass
class Row:
    data: str
    model: str
    method: str
    knob: str
    config: Dict[str, object] = field(default_factory=dict)
    runs: List[Run] = field(default_factory=list)
    mark: int = 0  # 1 best, 2 second best within its compression band

    def _stats(self, key) -> Tuple[float, float]:
        values = [getattr(r, key) for r in self.runs]
        return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

    @property
    def acc(self):
        """Mean and std of the reported accuracy (validation-selected checkpoint, else final)."""
        return self._stats("acc")

    @property
    def max_acc(self):
        return self._stats("max_acc")

    @property
    def final_acc(self):
        return self._stats("test_acc")

    @property
    def cr(self):
        return self._stats("compression_rate")

    @property
    def acc_source(self) -> str:
        sel = [r.val_selected_acc is not None for r in self.runs]
        return "val_ckpt" if all(sel) else "final" if not any(sel) else "mixed"

    @property
    def seeds(self) -> List[int]:
        return sorted(r.seed for r in self.runs)

    def band(self, width: float) -> Tuple[float, float]:
        low = math.floor(self.cr[0] / width) * width
        return low, low + width

    def value(self, key: str):
        return self.config.get(key, MISSING)


@dataclass
class Unfinished:
    """A run folder without summary.json: still running, killed or failed."""
    path: Path
    data: str
    model: str
    method: str
    knob: str
    seed: Optional[int]
    epochs_done: int                 # the last epoch in metrics.csv (0: none finished)
    epochs_planned: Optional[int]
    last_test_acc: Optional[float]   # of that epoch
    checkpoint: bool                 # checkpoints/last.pt is there (it can be resumed)
    overrides: str                   # .hydra/overrides.yaml of the run
    state: str = "unfinished"        # or "empty": a summary.json without a test accuracy, or after 0 epochs


def knob_of(config: dict) -> str:
    """The method's own compression setting, as a row label."""
    m = config.get("method", {})
    name = m.get("name")

    def num(v):
        return f"{float(v):g}"

    if name in ("tdlrt", "dlrt"):
        if m.get("target_cr") is not None:  # the target rule (tau unused)
            return f"target c.r.={num(m['target_cr'])}%"
        return f"tau={num(config.get('tau'))}"
    if name in ("tucker", "cp", "tt", "matrix"):
        return f"rank={num(m['rank_frac'])}" if m.get("rank_frac") is not None else f"target c.r.={num(m['target_cr'])}%"
    if name in ("snip", "grasp", "imp"):
        return f"sparsity={num(m.get('sparsity'))}"
    return ""


def csv_rows(path: Path, columns: Dict[str, type]) -> List[Dict[str, object]]:
    """The complete rows of a CSV file a run appends to, ``columns`` converted (an empty value: None).

    A run killed while appending leaves its last line cut short (no line end): that line is dropped. A
    file that is not such a CSV (not text, missing columns, values that do not parse) is a UserError."""
    if not path.is_file():
        return []

    def damaged(why: str) -> UserError:
        return UserError(f"{path} is damaged ({why}); delete it or move its run folder out of the report's paths")

    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise damaged("not UTF-8 text") from None
    except OSError as exc:
        raise UserError(f"cannot read {path} ({exc.strerror or exc}); check its permissions") from None
    if text and not text.endswith("\n"):
        text = text[:text.rfind("\n") + 1]  # the cut-short last line of a killed run
    if not text.strip():
        return []
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        recs = list(reader)
    except csv.Error as exc:
        raise damaged(f"csv: {exc}") from None
    missing = [c for c in columns if c not in (reader.fieldnames or [])]
    if missing:
        raise damaged(f"no column {missing[0]!r}")
    rows = []
    for number, rec in enumerate(recs, start=1):
        row = {}
        for c, kind in columns.items():
            value = rec.get(c)
            try:
                row[c] = None if value in ("", None) else kind(value)
            except ValueError:
                raise damaged(f"row {number}: {c}={value!r}") from None
        rows.append(row)
    return rows


def _read_metrics(run_dir: Path) -> Tuple[int, Optional[float]]:
    """(last epoch, its test accuracy) from metrics.csv; (0, None) when it has no complete row."""
    done, acc = 0, None
    for rec in csv_rows(run_dir / "metrics.csv", {"epoch": int, "test_acc": float}):
        if rec["epoch"] is not None and rec["epoch"] >= done:
            done, acc = rec["epoch"], rec["test_acc"]
    return done, acc


def _hydra_config(run_dir: Path) -> Tuple[dict, str]:
    """The config a run folder's (last) session ran with, from .hydra/, and its command-line overrides."""
    from omegaconf import OmegaConf

    hydra_dir = run_dir / ".hydra"
    sessions = sorted(hydra_dir.glob("resume-*"))[::-1] + [hydra_dir]  # a resumed session's config wins
    config, overrides = {}, ""
    for d in sessions:
        if not (d / "config.yaml").is_file():
            continue
        try:
            loaded = OmegaConf.load(d / "config.yaml")
            try:
                config = OmegaConf.to_container(loaded, resolve=True)
            except Exception:
                config = OmegaConf.to_container(loaded, resolve=False)
            if (d / "overrides.yaml").is_file():
                overrides = " ".join(str(o) for o in OmegaConf.to_container(OmegaConf.load(d / "overrides.yaml")))
        except Exception as exc:
            print(f"tdlrt: warning: cannot read {d / 'config.yaml'} ({type(exc).__name__}: {exc})", file=sys.stderr)
            continue
        break
    return (config if isinstance(config, dict) else {}), overrides


def unfinished_run(run_dir: Path) -> Unfinished:
    config, overrides = _hydra_config(run_dir)
    m = config.get("method") if isinstance(config.get("method"), dict) else {}
    done, acc = _read_metrics(run_dir)
    try:
        planned = int(config["epochs"])
        if m.get("name") == "imp":
            planned *= int(m.get("rounds", 3)) + 1
    except (KeyError, TypeError, ValueError):
        planned = None
    try:
        knob = knob_of(config)
    except (KeyError, TypeError, ValueError):
        knob = "?"
    seed = config.get("seed")
    return Unfinished(run_dir, str((config.get("data") or {}).get("name", "?")),
                      str((config.get("model") or {}).get("name", "?")), str(m.get("name", "?")), knob,
                      seed if isinstance(seed, int) else None, done, planned, acc,
                      (run_dir / "checkpoints" / "last.pt").is_file(), overrides)


def empty_run(run_dir: Path, summary: dict) -> Unfinished:
    """A run with a summary.json but nothing trained (epochs=0) or no test accuracy: listed, never ranked."""
    u = unfinished_run(run_dir)
    config = summary.get("config") if isinstance(summary.get("config"), dict) else {}
    if config:
        u.data = str((config.get("data") or {}).get("name", u.data))
        u.model = str((config.get("model") or {}).get("name", u.model))
        u.method = str((config.get("method") or {}).get("name", u.method))
        u.seed = config.get("seed") if isinstance(config.get("seed"), int) else u.seed
    acc = summary.get("test_acc")
    u.last_test_acc = float(acc) if isinstance(acc, (int, float)) else None
    u.state = "empty (0 epochs)" if summary.get("epochs") == 0 else "empty (no test accuracy)"
    return u


def _run_folders(base: Path) -> Iterable[Path]:
    """Folders under base that a training run wrote (Hydra's .hydra/, metrics.csv or checkpoints/last.pt)."""
    found = {p.parent for p in base.rglob(".hydra") if p.is_dir()}
    found |= {p.parent for p in base.rglob("metrics.csv")}
    found |= {p.parent.parent for p in base.rglob("last.pt") if p.parent.name == "checkpoints"}
    return sorted(found)


PERCENT = (0.0, 100.0)
COMPRESSION = (-1000.0, 100.0)  # below 0: more parameters than the dense network (a Tucker layer at full rank)


def metric(summary: dict, key: str, bounds: Tuple[float, float], where: str = "") -> Optional[float]:
    """``summary[key]`` as a float, None when absent or null; a value that is not a number (``true``, a
    string), not finite (``1e400`` reads as inf) or outside ``bounds`` raises ValueError: the run is damaged."""
    value = summary.get(key)
    name = where + key
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}={json.dumps(value)} is not a number")
    if not math.isfinite(value):
        raise ValueError(f"{name}={value} is not finite")
    if not bounds[0] <= value <= bounds[1]:
        raise ValueError(f"{name}={value:g} is outside [{bounds[0]:g}, {bounds[1]:g}]")
    return float(value)


def check_metrics(s: dict) -> None:
    """Refuse a summary.json whose numbers a table or plot would use cannot be a run's (see :func:`metric`)."""
    for key, bounds in (("test_acc", PERCENT), ("best_test_acc", PERCENT), ("compression_rate", COMPRESSION),
                        ("wall_time_s", (0.0, math.inf))):
        metric(s, key, bounds)
    if s.get("compression_rate") is None:
        raise KeyError("compression_rate")
    if isinstance(s.get("selected"), dict):
        metric(s["selected"], "test_acc", PERCENT, where="selected.")


def collect(paths: List[Path]) -> Tuple[List[Run], List[Unfinished]]:
    """Finished runs (summary.json) and unfinished run folders (no summary.json) under the paths."""
    runs, unfinished, seen = [], [], set()
    for base in paths:
        if not base.exists():
            raise UserError(f"{base} does not exist")
        files = [base] if base.is_file() else sorted(base.rglob("summary.json"))
        for f in files:
            if f.resolve() in seen:  # the same run under two of the given paths counts once
                continue
            seen.add(f.resolve())
            try:
                s = json.loads(f.read_text())
                c = s["config"]
                if s.get("test_acc") is None or s.get("epochs") == 0:  # trained nothing: listed, in no row
                    unfinished.append(empty_run(f.parent, s))
                    continue
                check_metrics(s)
                best = s.get("best_test_acc")
                runs.append(Run(f.parent, c["data"]["name"], c["model"]["name"], c["method"]["name"], knob_of(c),
                                int(c.get("seed", 0)), float(s["test_acc"]), float(s["compression_rate"]),
                                float(c["method"].get("init_decay", 0.0) or 0.0),
                                None if best is None else float(best), grouping_config(c), s))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                print(f"tdlrt: warning: skipping {f} ({type(exc).__name__}: {str(exc)[:200]}); listed as damaged",
                      file=sys.stderr)
                unfinished.append(unfinished_run(f.parent))
                unfinished[-1].state = "damaged summary.json"
        if base.is_dir():
            for d in _run_folders(base):
                if not (d / "summary.json").is_file() and d.resolve() not in seen:
                    seen.add(d.resolve())
                    unfinished.append(unfinished_run(d))
    if not runs and not unfinished:
        raise UserError(f"no finished runs (summary.json) and no run folders under {', '.join(map(str, paths))}")
    return runs, unfinished


def group(runs: List[Run]) -> List[Row]:
    """One row per distinct grouping config (the whole resolved config but the seed and IGNORED_KEYS)."""
    rows: Dict[str, Row] = {}
    for r in runs:
        key = json.dumps(sorted((k, canon(v)) for k, v in r.config.items()))
        rows.setdefault(key, Row(r.data, r.model, r.method, r.knob, r.config)).runs.append(r)
    for row in rows.values():
        seeds = [r.seed for r in row.runs]
        if len(set(seeds)) < len(seeds):  # the same run twice: its spread is not a spread over seeds
            print(f"tdlrt: warning: {row.method} {row.knob or ''} on {row.data}/{row.model} has several runs with the "
                  f"same seed ({', '.join(str(r.path) for r in row.runs)}); they are averaged", file=sys.stderr)

    def order(row):
        return (row.data, row.model, METHOD_ORDER.index(row.method) if row.method in METHOD_ORDER else 99,
                row.cr[0], row.knob, sorted((k, canon(v)) for k, v in row.config.items()))

    return sorted(rows.values(), key=order)


def _owner(key: str, config: Dict[str, object]) -> Optional[str]:
    """The config group a key belongs to (method.r_min -> method), if that group has a name."""
    if key in OWNED_BY:
        return OWNED_BY[key]
    head, dot, rest = key.partition(".")
    return head if dot and rest != "name" and f"{head}.name" in config else None


def varying_keys(rows: List[Row]) -> List[str]:
    """The config keys that tell these rows apart, beyond data, model and method: a key counts when two
    rows differ in it; keys of a config group (method.*, optimizer.*, tau, ...) only among rows of the
    same group name, so the defaults of different methods do not all become columns."""
    keys = sorted({k for row in rows for k in row.config} - set(SHOWN_KEYS))
    varying = []
    for key in keys:
        values: Dict[str, set] = {}
        for row in rows:
            owner = _owner(key, row.config)
            scope = canon(row.value(f"{owner}.name")) if owner else ""
            values.setdefault(scope, set()).add(canon(row.value(key)))
        if any(len(v) > 1 for v in values.values()):
            varying.append(key)
    return sorted(varying, key=lambda k: (k.count("."), k))


def tables(rows: List[Row]) -> List[Tuple[Tuple[str, str], List[Row]]]:
    """Rows by (data, model), in order."""
    out: Dict[Tuple[str, str], List[Row]] = {}
    for row in rows:
        out.setdefault((row.data, row.model), []).append(row)
    return list(out.items())


def mark_best(rows: List[Row], band: float) -> None:
    """Best (1) and second best (2) accuracy among the compressed rows of each (data, model, c.r. band)."""
    bands: Dict[tuple, List[Row]] = {}
    for row in rows:
        if row.method != "dense":
            bands.setdefault((row.data, row.model, math.floor(row.cr[0] / band)), []).append(row)
    for members in bands.values():
        ranked = sorted(members, key=lambda r: r.acc[0], reverse=True)
        for place, row in enumerate(ranked[:2], start=1):
            row.mark = place if len(ranked) > 1 or place == 1 else 0


def _pm(mean: float, std: float) -> str:
    return f"{mean:.2f} ± {std:.2f}"


def _tex_pm(mean: float, std: float) -> str:
    return _pm(mean, std).replace("±", "$\\pm$")


def _tex(text: str) -> str:
    return re.sub(r"([_%&#$])", r"\\\1", text)


def _band_label(row: Row, band: float) -> str:
    low, high = row.band(band)
    return f"{low:g}-{high:g}"


ACC_NOTE = ("\"test acc.\" is the test accuracy at each run's validation-selected checkpoint (`checkpoints/best.pt` "
            "chosen on the held-out `data.val_split` examples; `selected` in summary.json) and, for runs without a "
            "validation split (marked †), after the last epoch. \"final\" is after the last epoch. \"max over "
            "epochs\" is the best test accuracy of any epoch: chosen on the test set itself, so optimistic, shown "
            "for reference and never used to rank rows.")


def write_tables(rows: List[Row], out: Path, band: float, unfinished: Optional[List[Unfinished]] = None) -> None:
    unfinished = unfinished or []
    columns = varying_keys(rows)  # csv and tex: one header for all tables
    md = [f"Test accuracy (%) and conv compression rate (%), mean ± std over seeds. A row averages the runs "
          f"whose resolved configs are equal except for the seed and the keys that do not change what is "
          f"trained ({', '.join(IGNORED_KEYS)}; data.root of {', '.join(ROOT_IS_LOCATION)}); the columns "
          f"between \"setting\" and \"c.r. band\" are the config keys that differ between rows. "
          f"**Best** and _second best_ test accuracy among rows whose compression rates fall in "
          f"the same {band:g}-point band (\"c.r. band\").", "", ACC_NOTE]
    tex = ["\\begin{tabular}{llll" + "l" * len(columns) + "lrrr}", "\\toprule",
           "Data & Model & Method & Setting & " + "".join(f"{_tex(c)} & " for c in columns)
           + "c.r. band (\\%) & Test acc. (\\%) & Final (\\%) & Max over epochs (\\%) & c.r. (\\%) \\\\",
           "\\midrule"]
    with atomic_text(out / "table.csv") as fh:
        w = csv.writer(fh)
        w.writerow(["data", "model", "method", "setting", *columns, "compression_band", "runs", "seeds",
                    "acc_source", "test_acc_mean", "test_acc_std", "test_acc_final_mean", "test_acc_final_std",
                    "test_acc_max_epoch_mean", "test_acc_max_epoch_std", "compression_rate_mean",
                    "compression_rate_std", "mark"])
        for (data, model), members in tables(rows):
            local = varying_keys(members)  # md: the keys that differ within this table
            md += ["", f"### {model} on {data}", "",
                   "| method | setting | " + "".join(f"{c} | " for c in local)
                   + "c.r. band (%) | runs | test acc. (%) | final (%) | max over epochs (%) | c.r. (%) |",
                   "|---|---|" + "---|" * len(local) + "---|---|---|---|---|---|"]
            for row in members:
                (acc, acc_sd), (fin, fin_sd), (cr, cr_sd) = row.acc, row.final_acc, row.cr
                mx, mx_sd = row.max_acc
                w.writerow([row.data, row.model, row.method, row.knob, *(fmt(row.value(c)) for c in columns),
                            _band_label(row, band), len(row.runs), " ".join(map(str, row.seeds)), row.acc_source,
                            f"{acc:.4f}", f"{acc_sd:.4f}", f"{fin:.4f}", f"{fin_sd:.4f}", f"{mx:.4f}", f"{mx_sd:.4f}",
                            f"{cr:.4f}", f"{cr_sd:.4f}", {1: "best", 2: "second"}.get(row.mark, "")])
                text = _pm(acc, acc_sd)
                dagger = "" if row.acc_source == "val_ckpt" else " †"
                md_acc = {1: f"**{text}**", 2: f"_{text}_"}.get(row.mark, text) + dagger
                tex_acc = ({1: f"\\textbf{{{text}}}", 2: f"\\underline{{{text}}}"}.get(row.mark, text)
                           .replace("±", "$\\pm$") + ("$^\\dagger$" if dagger else ""))
                label = METHOD_LABEL.get(row.method, row.method)
                md.append(f"| {label} | {row.knob or '-'} | " + "".join(f"{fmt(row.value(c))} | " for c in local)
                          + f"{_band_label(row, band)} | {len(row.runs)} | {md_acc} | {_pm(fin, fin_sd)} | "
                          f"{_pm(mx, mx_sd)} | {_pm(cr, cr_sd)} |")
                setting = _tex(row.knob) or "-"
                tex.append(f"{_tex(row.data)} & {_tex(row.model)} & {label} & {setting} & "
                           + "".join(f"{_tex(fmt(row.value(c)))} & " for c in columns)
                           + f"{_band_label(row, band)} & {tex_acc} & {_tex_pm(fin, fin_sd)} & "
                           f"{_tex_pm(mx, mx_sd)} & {_tex_pm(cr, cr_sd)} \\\\")
    tex += ["\\bottomrule", "\\end{tabular}"]
    with atomic_text(out / "unfinished.csv") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "data", "model", "method", "setting", "seed", "epochs_done", "epochs_planned",
                    "last_test_acc", "last_checkpoint", "overrides", "state"])
        for u in unfinished:
            w.writerow([u.path, u.data, u.model, u.method, u.knob, "" if u.seed is None else u.seed, u.epochs_done,
                        "" if u.epochs_planned is None else u.epochs_planned,
                        "" if u.last_test_acc is None else f"{u.last_test_acc:.4f}", u.checkpoint, u.overrides,
                        u.state])
    if unfinished:
        md += ["", f"### Unfinished runs ({len(unfinished)}): no summary.json (still running, killed or failed), "
                   "or empty (a summary.json after 0 epochs or without a test accuracy); not in the tables above", "",
               "| run folder | state | data | model | method | setting | seed | epochs reached | last test acc. (%) "
               "| last.pt | overrides |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        tex += ["", f"% {len(unfinished)} unfinished run(s) (no summary.json, or empty), not in the table:"]
        for u in unfinished:
            epochs = f"{u.epochs_done}/{'?' if u.epochs_planned is None else u.epochs_planned}"
            last = "-" if u.last_test_acc is None else f"{u.last_test_acc:.2f}"
            seed = "?" if u.seed is None else u.seed
            md.append(f"| {u.path} | {u.state} | {u.data} | {u.model} | {METHOD_LABEL.get(u.method, u.method)} | "
                      f"{u.knob or '-'} | {seed} | {epochs} | {last} | {'yes' if u.checkpoint else 'no'} | "
                      f"{u.overrides or '-'} |")
            tex.append(f"%   {u.path} ({u.state}): {u.data} {u.model} {u.method} {u.knob} seed {seed}, epoch {epochs}")
    atomic_write_text(out / "table.md", "\n".join(md) + "\n")
    atomic_write_text(out / "table.tex", "\n".join(tex) + "\n")


RUN_COLUMNS = ["path", "data", "model", "method", "setting", "seed", "epochs", "test_acc", "best_test_acc",
               "compression_rate", "wall_time_s", "device", "host", "git_commit", "git_dirty", "torch", "started"]


def write_runs(runs: List[Run], out: Path) -> None:
    """runs.csv: one line per finished run, with what a reader needs to trust and rerun it (wall time,
    device, host, the source commit and whether it was dirty, torch version, start time)."""
    with atomic_text(out / "runs.csv") as fh:
        w = csv.writer(fh)
        w.writerow(RUN_COLUMNS)
        for r in sorted(runs, key=lambda r: (r.data, r.model, r.method, r.knob, str(r.path))):
            s, prov = r.summary, r.summary.get("provenance") or {}
            wall = s.get("wall_time_s")
            w.writerow([r.path, r.data, r.model, r.method, r.knob, r.seed, s.get("epochs", ""), f"{r.test_acc:.4f}",
                        "" if r.best_test_acc is None else f"{r.best_test_acc:.4f}", f"{r.compression_rate:.4f}",
                        "" if wall is None else f"{float(wall):.0f}", s.get("device", ""), prov.get("host", ""),
                        prov.get("git_commit", ""), prov.get("git_dirty", ""), prov.get("torch", ""),
                        prov.get("started", "")])


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    """The figure as PNG, atomically: a temporary file in the same folder, fsynced, renamed over ``path``."""
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # files.atomic_write_text's naming
    try:
        with open(tmp, "wb") as fh:
            fig.savefig(fh, dpi=120, format="png")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)  # a kill leaves the old plot or the new one
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        _plt().close(fig)
    return path


# the temporaries of the report's files: files.atomic_write_text's and _save's naming
REPORT_TEMPORARY = re.compile(r"^\.(?:table\.(?:md|csv|tex)|runs\.csv|unfinished\.csv|.+\.png)\.(?P<pid>\d+)\.tmp$")


def _extra(row: Row, keys: List[str]) -> str:
    """The row's values of the given config keys other than its knob, as "lr=0.01, epochs=30"."""
    return ", ".join(f"{k}={fmt(row.value(k))}" for k in keys if k not in KNOB_KEYS and row.value(k) is not MISSING)


def _label_extra(row: Row, keys: List[str]) -> str:
    """:func:`_extra` for a plot legend: without the ``method.`` prefix, and without the keys at their default
    (the schema's; for ``method.augment_every`` the default of the row's rank rule), which the rule names."""
    from dataclasses import fields

    from .config import MethodConfig, TARGET_AUGMENT_EVERY

    defaults = {f"method.{f.name}": f.default for f in fields(MethodConfig)}
    defaults["method.augment_every"] = TARGET_AUGMENT_EVERY if rule_of(row) == "target rule" else 1
    shown = []
    for k in keys:
        v = row.value(k)
        if k in KNOB_KEYS or v is MISSING or (k in defaults and canon(v) == canon(defaults[k])):
            continue
        shown.append(f"{k.removeprefix('method.')}={fmt(v)}")
    return ", ".join(shown)


def rule_of(row: "Row") -> str:
    """TDLRT/DLRT's rank rule: the target rule (method.target_cr) or the paper's tau rule; "" for others."""
    if row.method not in ("tdlrt", "dlrt"):
        return ""
    target = row.value("method.target_cr")
    return "target rule" if target not in (None, MISSING) else "paper's tau rule"


def plot_accuracy_vs_compression(rows: List[Row], out: Path) -> List[Path]:
    """Per (data, model): best-checkpoint accuracy against c.r., one curve per method and setting of the
    other differing keys (an lr sweep gets one curve per lr)."""
    plt = _plt()
    written = []
    for (data, model), members in sorted(tables(rows)):
        keys = varying_keys(members)
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for method in sorted({r.method for r in members},
                             key=lambda m: METHOD_ORDER.index(m) if m in METHOD_ORDER else 99):
            curves: Dict[str, List[Row]] = {}
            for r in members:
                if r.method == method:
                    curves.setdefault(", ".join(p for p in (rule_of(r), _label_extra(r, keys)) if p), []).append(r)
            for extra, pts in curves.items():
                pts.sort(key=lambda r: r.cr[0])
                label = METHOD_LABEL.get(method, method) + (f" ({extra})" if extra else "")
                xs, xe = zip(*(r.cr for r in pts))
                ys, ye = zip(*(r.acc for r in pts))
                if method == "dense":
                    ax.axhline(ys[0], color="grey", linestyle="--", label=f"{label} ({ys[0]:.1f}%)")
                    continue
                line = ax.errorbar(xs, ys, xerr=xe, yerr=ye, marker="o", capsize=3, label=label)
                for r, x, y in zip(pts, xs, ys):  # each point's knob, so that overlapping points can be told apart
                    ax.annotate(r.knob.replace("target c.r.=", "").replace("rank=", "r=") or "", (x, y),
                                textcoords="offset points", xytext=(4, 4), fontsize=6,
                                color=line[0].get_color())
        ax.set_xlabel("conv compression rate (%)")
        ax.set_ylabel("test accuracy (%): validation-selected, else final")
        ax.set_title(f"{model} on {data}: accuracy vs compression")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        written.append(_save(fig, out / f"acc_vs_cr_{data}_{model}.png"))
    return written


def _file_part(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "", text.replace(", ", "_"))


def _rank_series(run_dir: Path) -> Tuple[str, Dict[Tuple[str, str], List[Tuple[int, int]]]]:
    """Rank of every (layer, mode) over training: per step from ranks_steps.csv (step 0 and every logging
    step) when the run has it, else per epoch from ranks.csv. Returns the x-axis name and the series."""
    steps, epochs = run_dir / "ranks_steps.csv", run_dir / "ranks.csv"
    path, x = (steps, "step") if steps.is_file() else (epochs, "epoch")
    series: Dict[Tuple[str, str], List[Tuple[int, int]]] = {}
    for rec in csv_rows(path, {x: int, "layer": str, "r_out": int, "r_in": int}):
        for mode in ("out", "in"):
            if None not in (rec[x], rec["layer"], rec[f"r_{mode}"]):
                series.setdefault((rec["layer"], mode), []).append((rec[x], rec[f"r_{mode}"]))
    return x, series


LINE_STYLES = ("-", "--", ":", "-.")


def layer_style(j: int) -> Tuple[object, str]:
    """Colour and line style of layer ``j`` of a rank plot: tab20's twenty colours (no colour repeats within
    a plot of up to 20 layers), then the next line style, so the first 80 layers never share a combination."""
    from matplotlib import colormaps

    return colormaps["tab20"](j % 20), LINE_STYLES[(j // 20) % len(LINE_STYLES)]


VGG16_CONVS = ["conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3", "conv4_1", "conv4_2",
               "conv4_3", "conv5_1", "conv5_2", "conv5_3"]


def layer_labels(run_dir: Path, config: dict) -> Dict[str, str]:
    """Readable names of a run's low-rank layers for plot legends, ``conv3_1 (32->64)``: VGG16's convs by
    their place in the network (the first conv is dense unless method.convert_first_conv), other models by
    their module name; channels in -> out from ranks.csv."""
    sizes = {}
    try:
        records = csv_rows(run_dir / "ranks.csv", {"layer": str, "n_out": int, "n_in": int})
    except UserError:  # a ranks.csv without the sizes (a cut-short or older file): module names only
        records = []
    for rec in records:
        if rec["layer"] is not None and None not in (rec["n_in"], rec["n_out"]):
            sizes[rec["layer"]] = (rec["n_in"], rec["n_out"])
    names = list(sizes)
    labels = {name: name for name in names}
    method = config.get("method", {}) if isinstance(config.get("method"), dict) else {}
    if config.get("model", {}).get("name") == "vgg16" and all(n.startswith("features.") for n in names):
        first = 0 if method.get("convert_first_conv") else 1
        ordered = sorted(names, key=lambda n: int(n.split(".")[1]) if n.split(".")[1].isdigit() else 0)
        for k, name in enumerate(ordered):
            if first + k < len(VGG16_CONVS):
                labels[name] = VGG16_CONVS[first + k]
    return {name: f"{labels[name]} ({sizes[name][0]}->{sizes[name][1]})" for name in names}


def rank_runs(rows: List[Row]) -> List[Tuple[Row, Run]]:
    """The run of each TDLRT/DLRT row whose ranks are plotted: its first seed."""
    return [(row, min(row.runs, key=lambda r: r.seed)) for row in rows if row.method in ("tdlrt", "dlrt")]


def plot_rank_trajectories(rows: List[Row], out: Path, series_of: Dict[Path, tuple]) -> List[Path]:
    """One figure per TDLRT/DLRT row (its first seed): rank of every layer and mode over training steps,
    each layer with its own colour and line style, integer rank axis. ``series_of``: ``_rank_series`` of
    those runs, read before anything is written."""
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    written = []
    keys = {table: varying_keys(members) for table, members in tables(rows)}
    for row, run in rank_runs(rows):
        x, series = series_of[run.path]
        if not series:
            continue
        layers = list(dict.fromkeys(layer for layer, _ in series))
        labels = layer_labels(run.path, {"model": {"name": row.model},
                                         "method": {"convert_first_conv": row.value("method.convert_first_conv")}})
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=False)
        for ax, mode in zip(axes, ("out", "in")):
            for j, layer in enumerate(layers):
                pts = sorted(series.get((layer, mode), []))
                if pts:
                    colour, style = layer_style(j)
                    ax.plot(*zip(*pts), color=colour, linestyle=style, marker="." if len(pts) < 30 else None,
                            label=labels.get(layer, layer), drawstyle="steps-post")
            ax.set_xlabel("training step" if x == "step" else "epoch")
            ax.set_ylabel(f"rank of mode '{mode}'")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
        axes[1].legend(fontsize=6, ncol=2)
        extra = _extra(row, keys[(row.data, row.model)])
        fig.suptitle(f"{row.model} on {row.data}, {METHOD_LABEL[row.method]} {row.knob}"
                     + (f", {extra}" if extra else "") + f" (seed {run.seed})")
        name = f"ranks_{row.data}_{row.model}_{row.method}_{_file_part(row.knob.replace('=', ''))}"
        written.append(_save(fig, out / (name + (f"_{_file_part(extra)}" if extra else "") + ".png")))
    return written


def _loss_curve(run: Run) -> Optional[Tuple[List[int], List[float], str]]:
    """Per-step training loss from TensorBoard when present, else per-epoch from metrics.csv."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(run.path / "tensorboard"), size_guidance={"scalars": 0})
        acc.Reload()
        if "train/loss_step" in acc.Tags().get("scalars", []):
            events = acc.Scalars("train/loss_step")
            return [e.step for e in events], [e.value for e in events], "step"
    except Exception:
        pass
    recs = [r for r in csv_rows(run.path / "metrics.csv", {"epoch": int, "train_loss": float})
            if None not in r.values()]
    if recs:
        return [r["epoch"] for r in recs], [r["train_loss"] for r in recs], "epoch"
    return None


def plot_ill_conditioned(runs: List[Run], out: Path, curves: Dict[Path, Optional[tuple]]) -> List[Path]:
    """Training loss of the runs started ill-conditioned; ``curves``: their ``_loss_curve``, read before."""
    plt = _plt()
    ill = [r for r in runs if r.init_decay > 0]
    if not ill:
        return []
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    unit = "step"
    for method in METHOD_ORDER:
        for i, run in enumerate(sorted((r for r in ill if r.method == method), key=lambda r: r.seed)):
            curve = curves[run.path]
            if curve is None:
                continue
            xs, ys, unit = curve
            ax.plot(xs, ys, color=f"C{METHOD_ORDER.index(method)}", alpha=0.8,
                    label=f"{METHOD_LABEL[method]}" if i == 0 else None)
    ax.set_yscale("log")
    ax.set_xlabel(unit)
    ax.set_ylabel("training loss")
    ax.set_title("ill-conditioned start (core singular values 10^-k)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return [_save(fig, out / "ill_conditioned_loss.png")]


def main(argv: Optional[List[str]] = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print("usage: tdlrt report PATH... [out=DIR] [band=5]\n\nReads run folders (single runs or multirun "
              "sweeps) and writes table.md, table.csv, table.tex, unfinished.csv and PNG plots into DIR (default: "
              "report/). A row averages the seeds of one config; run folders without summary.json are listed "
              "as unfinished.")
        sys.exit(0 if args else 2)
    is_option = [("=" in a and not Path(a).exists()) for a in args]  # a folder may be named lr=0.1
    opts = dict(a.split("=", 1) for a, o in zip(args, is_option) if o)
    paths = [Path(a) for a, o in zip(args, is_option) if not o]
    try:
        unknown = set(opts) - {"out", "band"}
        if unknown:
            raise UserError(f"unknown option {sorted(unknown)[0]}=...; report takes out=DIR and band=POINTS")
        try:
            band = float(opts.get("band", 5))
            assert 0 < band < math.inf
        except (ValueError, AssertionError):
            raise UserError(f"band={opts['band']} must be a positive number of percentage points") from None
        if not paths:
            raise UserError("no run folders given: tdlrt report PATH... [out=DIR]")
        out = Path(opts.get("out", "report"))
        if out.exists() and not out.is_dir():
            raise UserError(f"out={out} is a file, not a folder; give a folder for the report (out=DIR)")
        runs, unfinished = collect(paths)
        rows = group(runs)
        mark_best(rows, band)
        # read every file the plots need before writing anything: a damaged one leaves the old report whole
        series_of = {run.path: _rank_series(run.path) for _, run in rank_runs(rows)}
        curves = {run.path: _loss_curve(run) for run in runs if run.init_decay > 0}
        try:
            out.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(out, REPORT_TEMPORARY)
            write_tables(rows, out, band, unfinished)
            write_runs(runs, out)
            pngs = (plot_accuracy_vs_compression(rows, out) + plot_rank_trajectories(rows, out, series_of)
                    + plot_ill_conditioned(runs, out, curves))
        except OSError as exc:
            where = exc.filename or out
            raise UserError(f"cannot write the report into out={out} ({where}: {exc.strerror or exc}); "
                            f"choose a writable folder with out=DIR") from None
    except UserError as exc:
        print(f"tdlrt: error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(f"{len(runs)} runs in {len(rows)} rows -> {out}/table.md, table.csv, table.tex, runs.csv and {len(pngs)} plots"
          + (f"; {len(unfinished)} unfinished run(s) (no summary.json, or empty) listed in table.md and unfinished.csv"
             if unfinished else ""))
