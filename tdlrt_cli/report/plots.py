"""The report's plots: accuracy against compression (a curve per method and rank rule), each rank-adaptive
run's per-layer rank trajectories, and the loss curves of the ill-conditioned study."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ..errors import UserError
from .collect import (KNOB_KEYS, METHOD_LABEL, METHOD_ORDER, MISSING, Row, Run, canon, csv_rows, fmt, tables,
                      varying_keys)

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["text.parse_math"] = False  # labels come from run files: "$...$" in a name is text
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

    from ..config import MethodConfig, TARGET_AUGMENT_EVERY

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
        written.append(_save(fig, out / png_name("acc_vs_cr", data, model)))
    return written


def _file_part(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "", text.replace(", ", "_"))


def png_name(*parts) -> str:
    """A plot's file name from names read from run files: letters, digits, '.', '_' and '-' only, never
    starting with '.', at most 200 characters (a name in the data cannot reach outside out=)."""
    name = "_".join(_file_part(str(part)) for part in parts).lstrip(".")[:200]
    return (name or "plot") + ".png"


def rank_series(run_dir: Path) -> Tuple[str, Dict[Tuple[str, str], List[Tuple[int, int]]]]:
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


def read_ranks(row: Row, run: Run) -> Tuple[str, Dict[Tuple[str, str], List[Tuple[int, int]]], Dict[str, str]]:
    """What the rank figure of ``row`` shows, read from its run folder before the report writes anything:
    the x-axis (:func:`rank_series`), the series, and the layers' legend labels (:func:`layer_labels`)."""
    x, series = rank_series(run.path)
    labels = layer_labels(run.path, {"model": {"name": row.model},
                                     "method": {"convert_first_conv": row.value("method.convert_first_conv")}})
    return x, series, labels


def plot_rank_trajectories(rows: List[Row], out: Path, ranks_of: Dict[Path, tuple]) -> List[Path]:
    """One figure per TDLRT/DLRT row (its first seed): rank of every layer and mode over training steps,
    each layer with its own colour and line style, integer rank axis. ``ranks_of``: :func:`read_ranks` of
    those runs, by folder."""
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    written = []
    keys = {table: varying_keys(members) for table, members in tables(rows)}
    for row, run in rank_runs(rows):
        x, series, labels = ranks_of[run.path]
        if not series:
            continue
        layers = list(dict.fromkeys(layer for layer, _ in series))
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
        parts = ("ranks", row.data, row.model, row.method, row.knob.replace("=", "")) + ((extra,) if extra else ())
        written.append(_save(fig, out / png_name(*parts)))
    return written


def loss_curve(run: Run) -> Optional[Tuple[List[int], List[float], str]]:
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
    """Training loss of the runs started ill-conditioned; ``curves``: their ``loss_curve``, read before."""
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
