"""`tdlrt report PATH... [out=DIR] [band=5]`: run folders -> the paper's tables and plots.

Every ``summary.json`` under the given paths (single runs or multirun sweeps) is one run. Runs are grouped
by data, model, method and the method's own compression knob (tau, rank fraction, target c.r., sparsity);
each group gives mean and standard deviation over its seeds. Within a (data, model) table the best and
second-best accuracies are marked among the rows of comparable compression: rows whose mean conv
compression rate falls in the same ``band``-point band (e.g. 90-95%).
"""
from __future__ import annotations

import csv
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .errors import UserError

METHOD_ORDER = ["dense", "tdlrt", "dlrt", "tucker", "cp", "tt", "matrix", "snip", "grasp", "imp"]
METHOD_LABEL = {"dense": "Dense", "tdlrt": "TDLRT", "dlrt": "Matrix DLRT", "tucker": "Tucker (fixed rank)",
                "cp": "CP (fixed rank)", "tt": "TT (fixed rank)", "matrix": "Matrix (fixed rank)",
                "snip": "SNIP", "grasp": "GraSP", "imp": "IMP (rewinding)"}


@dataclass
class Run:
    path: Path
    data: str
    model: str
    method: str
    knob: str
    seed: int
    test_acc: float
    compression_rate: float
    init_decay: float = 0.0


@dataclass
class Row:
    data: str
    model: str
    method: str
    knob: str
    runs: List[Run] = field(default_factory=list)
    mark: int = 0  # 1 best, 2 second best within its compression band

    def _stats(self, key) -> Tuple[float, float]:
        values = [getattr(r, key) for r in self.runs]
        return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

    @property
    def acc(self):
        return self._stats("test_acc")

    @property
    def cr(self):
        return self._stats("compression_rate")


def knob_of(config: dict) -> str:
    """The method's own compression setting, as a row label."""
    m = config.get("method", {})
    name = m.get("name")

    def num(v):
        return f"{float(v):g}"

    if name in ("tdlrt", "dlrt"):
        return f"tau={num(config.get('tau'))}"
    if name in ("tucker", "cp", "tt", "matrix"):
        return f"rank={num(m['rank_frac'])}" if m.get("rank_frac") is not None else f"target c.r.={num(m['target_cr'])}%"
    if name in ("snip", "grasp", "imp"):
        return f"sparsity={num(m.get('sparsity'))}"
    return ""


def collect(paths: List[Path]) -> List[Run]:
    runs = []
    for base in paths:
        if not base.exists():
            raise UserError(f"{base} does not exist")
        files = [base] if base.is_file() else sorted(base.rglob("summary.json"))
        for f in files:
            try:
                s = json.loads(f.read_text())
                c = s["config"]
                runs.append(Run(f.parent, c["data"]["name"], c["model"]["name"], c["method"]["name"], knob_of(c),
                                int(c.get("seed", 0)), float(s["test_acc"]), float(s["compression_rate"]),
                                float(c["method"].get("init_decay", 0.0) or 0.0)))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                print(f"tdlrt: warning: skipping {f} ({type(exc).__name__}: {exc})", file=sys.stderr)
    if not runs:
        raise UserError(f"no finished runs (summary.json) under {', '.join(map(str, paths))}")
    return runs


def group(runs: List[Run]) -> List[Row]:
    rows: Dict[tuple, Row] = {}
    for r in runs:
        key = (r.data, r.model, r.method, r.knob)
        rows.setdefault(key, Row(*key)).runs.append(r)

    def order(row):
        return (row.data, row.model, METHOD_ORDER.index(row.method) if row.method in METHOD_ORDER else 99,
                row.cr[0])

    return sorted(rows.values(), key=order)


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


def write_tables(rows: List[Row], out: Path, band: float) -> None:
    md = [f"Test accuracy and conv compression rate (mean ± std over seeds). **Best** and _second best_ "
          f"accuracy among rows whose compression rates fall in the same {band:g}-point band.", ""]
    tex = ["\\begin{tabular}{llllrr}", "\\toprule",
           "Data & Model & Method & Setting & Test acc. (\\%) & c.r. (\\%) \\\\", "\\midrule"]
    with open(out / "table.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["data", "model", "method", "setting", "runs", "test_acc_mean", "test_acc_std",
                    "compression_rate_mean", "compression_rate_std", "mark"])
        current = None
        for row in rows:
            (acc, acc_sd), (cr, cr_sd) = row.acc, row.cr
            w.writerow([row.data, row.model, row.method, row.knob, len(row.runs), f"{acc:.4f}", f"{acc_sd:.4f}",
                        f"{cr:.4f}", f"{cr_sd:.4f}", {1: "best", 2: "second"}.get(row.mark, "")])
            if (row.data, row.model) != current:
                current = (row.data, row.model)
                md += ["", f"### {row.model} on {row.data}", "",
                       "| method | setting | runs | test acc. (%) | c.r. (%) |", "|---|---|---|---|---|"]
            text = _pm(acc, acc_sd)
            md_acc = {1: f"**{text}**", 2: f"_{text}_"}.get(row.mark, text)
            tex_acc = {1: f"\\textbf{{{text}}}", 2: f"\\underline{{{text}}}"}.get(row.mark, text).replace("±", "$\\pm$")
            label = METHOD_LABEL.get(row.method, row.method)
            md.append(f"| {label} | {row.knob or '-'} | {len(row.runs)} | {md_acc} | {_pm(cr, cr_sd)} |")
            setting = row.knob.replace("%", "\\%") or "-"
            tex_cr = _pm(cr, cr_sd).replace("±", "$\\pm$")
            tex.append(f"{row.data} & {row.model} & {label} & {setting} & {tex_acc} & {tex_cr} \\\\")
    tex += ["\\bottomrule", "\\end{tabular}"]
    (out / "table.md").write_text("\n".join(md) + "\n")
    (out / "table.tex").write_text("\n".join(tex) + "\n")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _plt().close(fig)
    return path


def plot_accuracy_vs_compression(rows: List[Row], out: Path) -> List[Path]:
    plt = _plt()
    written = []
    for data, model in sorted({(r.data, r.model) for r in rows}):
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for method in METHOD_ORDER:
            pts = sorted((r for r in rows if (r.data, r.model, r.method) == (data, model, method)),
                         key=lambda r: r.cr[0])
            if not pts:
                continue
            xs, xe = zip(*(r.cr for r in pts))
            ys, ye = zip(*(r.acc for r in pts))
            if method == "dense":
                ax.axhline(ys[0], color="grey", linestyle="--", label=f"Dense ({ys[0]:.1f}%)")
                continue
            ax.errorbar(xs, ys, xerr=xe, yerr=ye, marker="o", capsize=3, label=METHOD_LABEL[method])
        ax.set_xlabel("conv compression rate (%)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{model} on {data}: accuracy vs compression")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        written.append(_save(fig, out / f"acc_vs_cr_{data}_{model}.png"))
    return written


def plot_rank_trajectories(rows: List[Row], out: Path) -> List[Path]:
    """One figure per TDLRT/DLRT setting (its first seed): rank of every layer and mode over epochs."""
    plt = _plt()
    written = []
    for row in rows:
        if row.method not in ("tdlrt", "dlrt"):
            continue
        run = min(row.runs, key=lambda r: r.seed)
        ranks = run.path / "ranks.csv"
        if not ranks.is_file():
            continue
        series: Dict[Tuple[str, str], List[Tuple[int, int]]] = {}
        with open(ranks, newline="") as fh:
            for rec in csv.DictReader(fh):
                for mode in ("out", "in"):
                    series.setdefault((rec["layer"], mode), []).append((int(rec["epoch"]), int(rec[f"r_{mode}"])))
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=False)
        for ax, mode in zip(axes, ("out", "in")):
            for (layer, m), pts in series.items():
                if m == mode:
                    ax.plot(*zip(*sorted(pts)), marker=".", label=layer)
            ax.set_xlabel("epoch")
            ax.set_ylabel(f"rank of mode '{mode}'")
            ax.grid(alpha=0.3)
        axes[1].legend(fontsize=6, ncol=2)
        fig.suptitle(f"{row.model} on {row.data}, {METHOD_LABEL[row.method]} {row.knob} (seed {run.seed})")
        written.append(_save(fig, out / f"ranks_{row.data}_{row.model}_{row.method}_{row.knob.replace('=', '')}.png"))
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
    metrics = run.path / "metrics.csv"
    if metrics.is_file():
        with open(metrics, newline="") as fh:
            recs = list(csv.DictReader(fh))
        return [int(r["epoch"]) for r in recs], [float(r["train_loss"]) for r in recs], "epoch"
    return None


def plot_ill_conditioned(runs: List[Run], out: Path) -> List[Path]:
    plt = _plt()
    ill = [r for r in runs if r.init_decay > 0]
    if not ill:
        return []
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    unit = "step"
    for method in METHOD_ORDER:
        for i, run in enumerate(sorted((r for r in ill if r.method == method), key=lambda r: r.seed)):
            curve = _loss_curve(run)
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
              "sweeps) and writes table.md, table.csv, table.tex and PNG plots into DIR (default: report/).")
        sys.exit(0 if args else 2)
    opts = dict(a.split("=", 1) for a in args if "=" in a)
    paths = [Path(a) for a in args if "=" not in a]
    try:
        unknown = set(opts) - {"out", "band"}
        if unknown:
            raise UserError(f"unknown option {sorted(unknown)[0]}=...; report takes out=DIR and band=POINTS")
        try:
            band = float(opts.get("band", 5))
            assert band > 0
        except (ValueError, AssertionError):
            raise UserError(f"band={opts['band']} must be a positive number of percentage points") from None
        if not paths:
            raise UserError("no run folders given: tdlrt report PATH... [out=DIR]")
        out = Path(opts.get("out", "report"))
        out.mkdir(parents=True, exist_ok=True)
        runs = collect(paths)
        rows = group(runs)
        mark_best(rows, band)
        write_tables(rows, out, band)
        pngs = plot_accuracy_vs_compression(rows, out) + plot_rank_trajectories(rows, out) + plot_ill_conditioned(runs, out)
    except UserError as exc:
        print(f"tdlrt: error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(f"{len(runs)} runs in {len(rows)} rows -> {out}/table.md, table.csv, table.tex and {len(pngs)} plots")
