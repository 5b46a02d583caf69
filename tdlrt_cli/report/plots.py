"""The report's plots: accuracy against compression (a curve per method and rank rule), each rank-adaptive
run's per-layer rank trajectories, and the loss curves of the ill-conditioned study."""
from __future__ import annotations

import os
import re
import textwrap
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ..errors import UserError
from ..families import RANK_ADAPTIVE
from .collect import (KNOB_KEYS, METHOD_LABEL, METHOD_ORDER, MISSING, Row, Run, canon, csv_rows, fmt, tables,
                      varying_keys)

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["text.parse_math"] = False  # labels come from run files: "$...$" in a name is text
    # SVG: text stays text (editable, searchable; the viewer's "DejaVu Sans" or its fallback draws it), and the
    # ids of clip paths come from a fixed salt, so the same figure gives the same bytes on every run
    matplotlib.rcParams["svg.fonttype"] = "none"
    matplotlib.rcParams["svg.hashsalt"] = "tdlrt-report"
    import matplotlib.pyplot as plt

    return plt


# how _save writes each format: the SVG without its date (metadata Date=None), so that its bytes depend on the
# figure only (with svg.hashsalt, see _plt)
SAVE_FORMATS = (("png", {"dpi": 120, "bbox_inches": "tight"}),
                ("svg", {"metadata": {"Date": None}, "bbox_inches": "tight"}))  # tight: a legend below the axes


def _save(fig, path: Path) -> Path:
    """The figure as PNG at ``path`` and as SVG beside it (same stem, ``.svg``), each atomically: a temporary
    file in the same folder, fsynced, renamed over the old one. Returns ``path`` (the PNG)."""
    fig.tight_layout()
    try:
        for ext, options in SAVE_FORMATS:
            target = path.with_suffix(f".{ext}")
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")  # files.atomic_write_text's naming
            try:
                with open(tmp, "wb") as fh:
                    fig.savefig(fh, format=ext, **options)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, target)  # a kill leaves the old plot or the new one
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
    finally:
        _plt().close(fig)
    return path


# the temporaries of the report's files: files.atomic_write_text's and _save's naming (PNG and SVG)
REPORT_TEMPORARY = re.compile(
    r"^\.(?:table\.(?:md|csv|tex)|runs\.csv|unfinished\.csv|.+\.(?:png|svg))\.(?P<pid>\d+)\.tmp$")


def _extra(row: Row, keys: List[str]) -> str:
    """The row's values of the given config keys other than its knob, as "lr=0.01, epochs=30"."""
    return ", ".join(f"{k}={fmt(row.value(k))}" for k in keys if k not in KNOB_KEYS and row.value(k) is not MISSING)


def _label_extra(row: Row, keys: List[str]) -> str:
    """:func:`_extra` for a plot legend: without the ``method.`` prefix, and without the keys at their default
    (the schema's; for ``method.augment_every`` the default of the row's rank rule), which the rule names."""
    from dataclasses import fields

    from ..config import MethodConfig
    from ..identity import TARGET_AUGMENT_EVERY

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
    if row.method not in RANK_ADAPTIVE:
        return ""
    target = row.value("method.target_cr")
    return "target rule" if target not in (None, MISSING) else "paper's tau rule"


# the least an axis of the accuracy-vs-compression plot spans (percentage points): points within 90.000-90.175
# c.r. are drawn on 88.1-92.1, not on a 0.175-wide axis whose tick labels are noise
MIN_CR_SPAN = 4.0
MIN_ACC_SPAN = 2.0


def _min_span(set_lim, values: List[float], span: float, top: float = 100.0) -> None:
    """Give an axis at least ``span`` around ``values`` (centred on them; moved down to end a margin above
    ``top``, the highest percentage, if the centred window would reach beyond it); wider data keeps the
    axis matplotlib chose."""
    if not values:
        return
    low, high = min(values), max(values)
    if high - low >= span:
        return
    centre = (low + high) / 2
    low, high = centre - span / 2, centre + span / 2
    limit = top + 0.05 * span
    if high > limit:
        low, high = low - (high - limit), limit
    set_lim(low, high)


def plot_accuracy_vs_compression(rows: List[Row], out: Path) -> List[Path]:
    """Per (data, model): best-checkpoint accuracy against c.r., one curve per method and setting of the
    other differing keys (an lr sweep gets one curve per lr); error bars (std over seeds) on the points of
    rows with several seeds; each axis spans at least MIN_CR_SPAN / MIN_ACC_SPAN points."""
    plt = _plt()
    written = []
    for (data, model), members in sorted(tables(rows)):
        keys = varying_keys(members)
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        x_seen: List[float] = []
        y_seen: List[float] = []
        with_bars = False
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
                if method == "dense":  # a dashed line per dense row, in the next colour of the cycle
                    ax.axhline(ys[0], color=ax._get_lines.get_next_color(), linestyle="--", linewidth=1.2,
                               label=f"{label} ({ys[0]:.1f}%)")
                    y_seen += [ys[0] - ye[0], ys[0] + ye[0]]
                    if len(pts[0].runs) > 1:  # its spread over seeds, as a band
                        ax.axhspan(ys[0] - ye[0], ys[0] + ye[0], color="grey", alpha=0.15, linewidth=0)
                    continue
                (line,) = ax.plot(xs, ys, marker="o", label=label)
                seeded = [i for i, r in enumerate(pts) if len(r.runs) > 1]  # error bars: std over seeds
                if seeded:
                    ax.errorbar([xs[i] for i in seeded], [ys[i] for i in seeded], xerr=[xe[i] for i in seeded],
                                yerr=[ye[i] for i in seeded], fmt="none", ecolor=line.get_color(), capsize=3)
                    with_bars = True
                x_seen += [v for x, e in zip(xs, xe) for v in (x - e, x + e)]
                y_seen += [v for y, e in zip(ys, ye) for v in (y - e, y + e)]
                for r, x, y in zip(pts, xs, ys):  # each point's knob, so that overlapping points can be told apart
                    ax.annotate(r.knob.replace("target c.r.=", "").replace("rank=", "r=") or "", (x, y),
                                textcoords="offset points", xytext=(4, 4), fontsize=6,
                                color=line.get_color())
        _min_span(ax.set_xlim, x_seen, MIN_CR_SPAN)
        _min_span(ax.set_ylim, y_seen, MIN_ACC_SPAN)
        ax.ticklabel_format(useOffset=False, style="plain")  # 90.1, never "+9e1" and offsets
        ax.set_xlabel("conv compression rate (%)")
        ax.set_ylabel("test accuracy (%): validation-selected, else final")
        ax.set_title(f"{model} on {data}: accuracy vs compression"
                     + ("\n(mean over seeds; error bars: std over seeds, none for one seed)" if with_bars else ""),
                     fontsize=10)
        ax.grid(alpha=0.3)
        entries = len(ax.get_legend_handles_labels()[0])
        if entries > 6:  # many rows: the legend below the axes, where it hides no point
            fig.set_size_inches(7.2, 4.4 + 0.17 * entries)
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.13), frameon=False)
        else:
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


# The one naming of layers in the report: the module path (``named_modules`` of the network, what ranks.csv's
# "layer" column holds), with the short name the model's papers use beside it where the network has one
# (tdlrt_cli/models/*.py: VGG16's and AlexNet's Sequential indices, LeNet5's; ResNet18's paths such as
# ``layers.2.conv1`` name their block already). tests/unit/test_report_internals.py checks these paths against the
# models.
LAYER_ALIASES: Dict[str, Dict[str, str]] = {
    "vgg16": {"features.0": "conv1_1", "features.3": "conv1_2", "features.7": "conv2_1", "features.10": "conv2_2",
              "features.14": "conv3_1", "features.17": "conv3_2", "features.20": "conv3_3", "features.24": "conv4_1",
              "features.27": "conv4_2", "features.30": "conv4_3", "features.34": "conv5_1", "features.37": "conv5_2",
              "features.40": "conv5_3", "classifier": "fc"},
    "alexnet": {"features.0": "conv1", "features.4": "conv2", "features.8": "conv3", "features.11": "conv4",
                "features.14": "conv5", "classifier.1": "fc1", "classifier.4": "fc2", "classifier.6": "fc3"},
    "lenet5": {"features.0": "conv1", "features.3": "conv2", "classifier.1": "fc1", "classifier.3": "fc2"},
}


def layer_name(model: str, path: str, detail: str = "") -> str:
    """A layer as the report names it: ``features.3 (conv1_2)``, ``layers.2.conv1``; ``detail`` (e.g. the
    channels) joins the alias in the parentheses: ``features.3 (conv1_2, 16->16)``."""
    inside = ", ".join(p for p in (LAYER_ALIASES.get(model, {}).get(path, ""), detail) if p)
    return f"{path} ({inside})" if inside else path


def layer_labels(run_dir: Path, config: dict) -> Dict[str, str]:
    """Legend labels of a run's low-rank layers (:func:`layer_name` with channels in -> out from ranks.csv):
    ``features.3 (conv1_2, 16->16)`` for VGG16, ``layers.2.conv1 (16->32)`` for ResNet18. Layers without
    sizes in ranks.csv (a cut-short or older file) have no label here: plots name them by layer_name alone."""
    sizes = {}
    try:
        records = csv_rows(run_dir / "ranks.csv", {"layer": str, "n_out": int, "n_in": int})
    except UserError:  # a ranks.csv without the sizes (a cut-short or older file): module names only
        records = []
    for rec in records:
        if rec["layer"] is not None and None not in (rec["n_in"], rec["n_out"]):
            sizes[rec["layer"]] = (rec["n_in"], rec["n_out"])
    model = str((config.get("model") or {}).get("name", ""))
    return {name: layer_name(model, name, f"{n_in}->{n_out}") for name, (n_in, n_out) in sizes.items()}


def rank_runs(rows: List[Row]) -> List[Tuple[Row, Run]]:
    """The runs whose ranks are plotted: every seed of each TDLRT/DLRT row, by seed."""
    return [(row, run) for row in rows if row.method in RANK_ADAPTIVE
            for run in sorted(row.runs, key=lambda r: (r.seed, str(r.path)))]


def read_ranks(row: Row, run: Run) -> Tuple[str, Dict[Tuple[str, str], List[Tuple[int, int]]], Dict[str, str]]:
    """What the rank figure of ``row`` shows of ``run``, read from its folder before the report writes
    anything: the x-axis (:func:`rank_series`), the series, and the layers' legend labels (:func:`layer_labels`)."""
    x, series = rank_series(run.path)
    return x, series, layer_labels(run.path, {"model": {"name": row.model}})


def seed_mean(curves: List[List[Tuple[int, int]]]) -> Tuple[List[Tuple[int, float]], bool]:
    """The mean over seeds of rank curves, each a step function (a rank holds from its row's step to the next
    row, as the plots draw them): at every step of any seed within the steps that every seed covers (from
    the latest first step to the earliest last one). Returns the points and whether that range cut some
    seed's curve short (its steps reach beyond the others')."""
    import bisect

    curves = [sorted(c) for c in curves if c]
    if not curves:
        return [], False
    start, end = max(c[0][0] for c in curves), min(c[-1][0] for c in curves)
    cut = any(c[0][0] < start or c[-1][0] > end for c in curves)
    steps = [[s for s, _ in c] for c in curves]
    points = []
    for s in sorted({s for c in curves for s, _ in c if start <= s <= end}):
        values = [c[bisect.bisect_right(st, s) - 1][1] for c, st in zip(curves, steps)]  # the last row at or before s
        points.append((s, sum(values) / len(values)))
    return points, cut


def plot_rank_trajectories(rows: List[Row], out: Path, ranks_of: Dict[Path, tuple]) -> List[Path]:
    """One figure per TDLRT/DLRT row: rank of every layer and mode over training steps, each layer with its
    own colour and line style, integer rank axis; every seed of the row as a thin line and their mean
    (:func:`seed_mean`, on the steps all seeds cover) as a thick one. ``ranks_of``: :func:`read_ranks` of the
    rows' runs (:func:`rank_runs`), by folder."""
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    written = []
    keys = {table: varying_keys(members) for table, members in tables(rows)}
    by_row: Dict[int, Tuple[Row, List[Run]]] = {}
    for row, run in rank_runs(rows):
        by_row.setdefault(id(row), (row, []))[1].append(run)
    for row, row_runs in by_row.values():
        read = [(run, *ranks_of[run.path]) for run in row_runs]
        read = [r for r in read if r[2]]  # runs without ranks (a method or an old run that logged none)
        if not read:
            continue
        kinds = [x for _, x, _, _ in read]
        x = "step" if kinds.count("step") >= kinds.count("epoch") else "epoch"
        shown = [r for r in read if r[1] == x]
        apart = [run.seed for run, kind, _, _ in read if kind != x]  # their ranks are per epoch (or per step) only
        labels: Dict[str, str] = {}
        for _, _, _, run_labels in reversed(shown):
            labels.update(run_labels)  # the first seed's labels win
        layers = list(dict.fromkeys(layer for _, _, series, _ in shown for layer, _ in series))
        several = len(shown) > 1
        cut_short = False
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=False)
        for ax, mode in zip(axes, ("out", "in")):
            if several:  # what thin and thick lines are, first in the legend
                ax.plot([], [], color="0.35", linewidth=0.8, alpha=0.45, label=f"each seed ({len(shown)})")
                ax.plot([], [], color="0.35", linewidth=2.2, label="mean over seeds")
            for j, layer in enumerate(layers):
                curves = [sorted(series.get((layer, mode), [])) for _, _, series, _ in shown]
                curves = [c for c in curves if c]
                if not curves:
                    continue
                colour, style = layer_style(j)
                label = labels.get(layer) or layer_name(row.model, layer)
                if several:
                    for c in curves:
                        ax.plot(*zip(*c), color=colour, linestyle=style, linewidth=0.8, alpha=0.45,
                                drawstyle="steps-post")
                    mean, cut = seed_mean(curves)
                    cut_short |= cut or len(curves) < len(shown)
                    if mean:
                        ax.plot(*zip(*mean), color=colour, linestyle=style, linewidth=2.2, label=label,
                                marker="." if len(mean) < 30 else None, drawstyle="steps-post")
                else:
                    ax.plot(*zip(*curves[0]), color=colour, linestyle=style, linewidth=1.5, label=label,
                            marker="." if len(curves[0]) < 30 else None, drawstyle="steps-post")
            ax.set_xlabel("training step" if x == "step" else "epoch")
            ax.set_ylabel(f"rank of mode '{mode}'")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
        if cut_short:  # the seeds' step grids differ: say where the mean is taken
            axes[1].plot([], [], color="none", label="mean only on the steps every seed reached")
        axes[1].legend(fontsize=6, ncol=2)
        extra = _extra(row, keys[(row.data, row.model)])
        seeds = [run.seed for run, _, _, _ in shown]
        who = f"seeds {', '.join(map(str, seeds))}" if several else f"seed {seeds[0]}"  # the legend: thin, thick
        if apart:
            who += f"; seed {', '.join(map(str, apart))} not shown: ranks per {'epoch' if x == 'step' else 'step'} only"
        title = (f"{row.model} on {row.data}, {METHOD_LABEL[row.method]} {row.knob}" + (f", {extra}" if extra else "")
                 + f" ({who})")
        fig.suptitle("\n".join(textwrap.wrap(title, 120)), fontsize=10)  # fits the figure's width
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
