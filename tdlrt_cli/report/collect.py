"""Collecting runs for the report: read every run folder under the given paths (summary.json, metrics.csv,
the Hydra config), check what the tables will show, and group runs into rows (one config, its seeds)."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

from .. import identity
from ..families import FIXED_RANK, METHODS, PRUNED, PRUNING
from ..errors import UserError
from ..files import load_json
from ..families import RANK_ADAPTIVE
from ..identity import MISSING, canon
from ..summary import accuracies

METHOD_ORDER = list(METHODS)
METHOD_LABEL = {"dense": "Dense", "tdlrt": "TDLRT", "dlrt": "Matrix DLRT", "tucker": "Tucker (fixed rank)",
                "tucker_prune": "Tucker (gradual pruning)",
                "cp": "CP (fixed rank)", "tt": "TT (fixed rank)", "matrix": "Matrix (fixed rank)",
                "snip": "SNIP", "grasp": "GraSP", "imp": "IMP (rewinding)"}

SHOWN_KEYS = ("data.name", "model.name", "method.name")  # have columns of their own
OWNED_BY = {"tau": "method"}  # top-level keys that belong to a config group (tau: tdlrt and dlrt only)
KNOB_KEYS = ("tau", "method.rank_frac", "method.target_cr", "method.sparsity")  # what knob_of shows
SOURCE_KEYS = ("method.ranks_from", "init_from")  # paths of other runs: compared by those runs' settings


def grouping_config(config: dict, sources: Optional[dict] = None) -> Dict[str, object]:
    """The flattened config that decides a run's row (:func:`.identity.grouping_config`); a path to another run
    (``SOURCE_KEYS``) stands for that run's setting where summary.json records it."""
    labels = {key: source_label(source) for key, source in (sources or {}).items()
              if key in SOURCE_KEYS and isinstance(source, dict) and isinstance(source.get("config"), dict)}
    return identity.grouping_config(config, labels)


def source_label(source: dict) -> str:
    """A run another one started from (summary.json's ``sources``), by its setting without the seed: its
    method and knob, and a short hash of its grouping config (so that the seeds of one setting match)."""
    config = source.get("config") or {}
    ident = json.dumps(sorted((k, canon(v)) for k, v in grouping_config(config).items()))
    method = (config.get("method") or {}).get("name", "?")
    knob = knob_of(config)
    return f"run of {method}{' ' + knob if knob else ''} (epochs {config.get('epochs')}) #{hashlib.sha1(ident.encode()).hexdigest()[:6]}"


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
        found = accuracies(self.summary) if isinstance(self.summary, dict) else {}
        if found.get("checkpoint") == "best.pt" and found.get("test_acc") is not None:
            return float(found["test_acc"])
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

    if name in RANK_ADAPTIVE:
        if m.get("target_cr") is not None:  # the target rule (tau unused)
            return f"target c.r.={num(m['target_cr'])}%"
        return f"tau={num(config.get('tau'))}"
    if name == "tucker" and m.get("ranks_from"):
        return "ranks of another run"
    if name in PRUNED:
        return f"target c.r.={num(m['target_cr'])}%"
    if name in FIXED_RANK:
        return f"rank={num(m['rank_frac'])}" if m.get("rank_frac") is not None else f"target c.r.={num(m['target_cr'])}%"
    if name in PRUNING:
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
            # never resolved: an interpolation in a run file reads the environment or calls a resolver. The one
            # the project's config has in the keys shown, tau: ${method.default_tau}, is taken by hand.
            config = OmegaConf.to_container(OmegaConf.load(d / "config.yaml"), resolve=False)
            if isinstance(config, dict) and config.get("tau") == "${method.default_tau}":
                config["tau"] = (config.get("method") or {}).get("default_tau")
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
    for key, bounds in (("test_acc", PERCENT), ("test_acc_final", PERCENT), ("test_acc_max_epoch", PERCENT),
                        ("best_test_acc", PERCENT), ("compression_rate", COMPRESSION), ("wall_time_s", (0.0, math.inf))):
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
                s = load_json(f.read_text())
                c = s["config"]
                found = accuracies(s)  # summary.json's names, old and new
                if found["test_acc_final"] is None or s.get("epochs") == 0:  # trained nothing: listed, in no row
                    unfinished.append(empty_run(f.parent, s))
                    continue
                check_metrics(s)
                best = found["test_acc_max_epoch"]
                runs.append(Run(f.parent, c["data"]["name"], c["model"]["name"], c["method"]["name"], knob_of(c),
                                int(c.get("seed", 0)), float(found["test_acc_final"]), float(s["compression_rate"]),
                                float(c["method"].get("init_decay", 0.0) or 0.0),
                                None if best is None else float(best),
                                grouping_config(c, s.get("sources") if isinstance(s.get("sources"), dict) else None), s))
            except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
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
