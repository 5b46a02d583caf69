"""The controls study's tables and figure, from the committed run files of `scripts/evidence/controls.sh`.

    python scripts/evidence/controls_report.py [results/controls_p/runs] [--out results/controls_p]

Writes, under --out: controls.md (the accuracy table, the split of TDLRT's margin over uniform Tucker into rank
allocation, gradual pruning and the integrator, the targets, the lr check), headline.md (one sentence for the
README's opening) and controls.png / controls.svg (every seed and the mean per method, at each c.r.).
Accuracies are test accuracies at the validation-selected checkpoint (summary.json's test_acc; test_acc_val_selected in older summaries),
as in `tdlrt report`. A run folder is named <family>_cr<C>_s<seed> (or dense_s<seed>, <family>_..._lr<lr>_s0).
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

from tdlrt_cli.files import atomic_write_text
from tdlrt_cli.summary import accuracies

FAMILIES = [  # (folder prefix, label, what it is)
    ("dense", "Dense", "the uncompressed network"),
    ("tdlrt", "TDLRT (recommended)", "the target rule, caps at the full channel count, start at half, target at 3/4"),
    ("prune", "Gradual pruning, no integrator", "method=tucker_prune: factors and core trained every step, ranks cut "
              "on the same schedule and allocation"),
    ("alloc", "Tucker at TDLRT's ranks", "method.ranks_from=<the same seed's tdlrt run>: fixed ranks from scratch"),
    ("finetune", "Dense 10 ep. -> decompose -> fine-tune 10 ep.", "init_from=<dense10 best.pt>, ranks by the target "
                 "rule's allocation from the trained kernels"),
    ("oneshot", "Dense 10 ep. -> decompose (no fine-tuning)", "the finetune runs' starting network (test_acc_at_start)"),
    ("tucker", "Uniform Tucker", "method=tucker method.target_cr=C: one rank fraction for every layer"),
]
NAME = re.compile(r"^(?P<family>[a-z]+?)(?:10)?(?:_cr(?P<cr>\d+))?(?:_lr(?P<lr>[\d.]+))?_s(?P<seed>\d+)$")


def load(runs: Path) -> list:
    rows = []
    for f in sorted(runs.glob("*/summary.json")):
        m = NAME.match(f.parent.name)
        if not m:
            continue
        s = json.loads(f.read_text())
        acc = accuracies(s)["test_acc"]
        base = {"name": f.parent.name, "family": m["family"], "cr": int(m["cr"]) if m["cr"] else None,
                "lr": float(m["lr"]) if m["lr"] else 0.05, "seed": int(m["seed"]), "acc": float(acc),
                "c.r.": float(s["compression_rate"]), "wall": float(s.get("wall_time_s") or 0.0),
                "epochs": int(s.get("epochs") or 0), "commit": (s.get("provenance") or {}).get("git_commit", "?")}
        if f.parent.name.startswith("dense10"):
            base["family"] = "dense10"
        rows.append(base)
        if base["family"] == "finetune" and s.get("test_acc_at_start") is not None:
            rows.append({**base, "name": base["name"] + " (start)", "family": "oneshot",
                         "acc": float(s["test_acc_at_start"])})
    return rows


def stats(values):
    if not values:
        return None
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0, len(values)


def cell(st) -> str:
    if st is None:
        return "not run yet"
    mean, std, n = st
    return f"{mean:.2f} ± {std:.2f} (n={n})" if n > 1 else f"{mean:.2f} (n=1)"


def pick(rows, family, cr=None, lr=0.05):
    return [r for r in rows if r["family"] == family and (cr is None or r["cr"] == cr) and r["lr"] == lr]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="?", default="results/controls_p/runs")
    ap.add_argument("--out", default="results/controls_p")
    a = ap.parse_args()
    rows = load(Path(a.runs))
    out = Path(a.out)
    dense = stats([r["acc"] for r in pick(rows, "dense")])
    dense_wall = stats([r["wall"] for r in pick(rows, "dense")])
    crs = (90, 97)
    md = ["Proxy P (VGG16 x0.25, 9,000 CIFAR-10 training images, 20 epochs, 1-epoch lr warm-up for every method), "
          "test accuracy (%) at the validation-selected checkpoint, mean ± std over seeds. Every figure is read "
          "from `results/controls_p/runs/` by `python scripts/evidence/controls_report.py`.", "",
          "| method | what it is | " + " | ".join(f"{c}% c.r.: test acc. | gap to dense" for c in crs) + " |",
          "|---|---|" + "---|---|" * len(crs)]
    table = {}
    for fam, label, what in FAMILIES:
        cells = []
        for c in crs:
            st = stats([r["acc"] for r in pick(rows, fam, None if fam == "dense" else c)])
            table[fam, c] = st
            gap = "" if st is None or dense is None or fam == "dense" else f"{st[0] - dense[0]:+.2f}"
            cells += [cell(st), gap]
        md.append(f"| {label} | {what} | " + " | ".join(cells) + " |")
    reached = []
    for c in crs:
        v = [r["c.r."] for r in rows if r["cr"] == c and r["family"] not in ("dense", "dense10")]
        if v:
            reached.append(f"{min(v):.2f}-{max(v):.2f}% for the {c}% runs")
    md += ["", "Conv compression reached (min-max over every compressed run): " + "; ".join(reached) + "."]

    md += ["", "**Where TDLRT's margin over uniform Tucker comes from** (paired differences over the seeds both runs "
           "have, mean ± std; each step adds one ingredient):", "", "| step | adds | " + " | ".join(f"{c}%" for c in crs) + " |", "|---|---|"
           + "---|" * len(crs)]
    steps = [("allocation", "Tucker at TDLRT's ranks - uniform Tucker", "alloc", "tucker"),
             ("gradual pruning", "gradual pruning - Tucker at TDLRT's ranks", "prune", "alloc"),
             ("the integrator", "TDLRT - gradual pruning", "tdlrt", "prune"),
             ("total", "TDLRT - uniform Tucker", "tdlrt", "tucker")]
    for step, adds, hi, lo in steps:
        vals = []
        for c in crs:
            a = {r["seed"]: r["acc"] for r in pick(rows, hi, c)}
            b = {r["seed"]: r["acc"] for r in pick(rows, lo, c)}
            st = stats([a[k] - b[k] for k in sorted(set(a) & set(b))])  # paired: the seeds both have
            vals.append("n/a" if st is None else (f"{st[0]:+.2f} ± {st[1]:.2f} (n={st[2]})" if st[2] > 1
                                                  else f"{st[0]:+.2f} (n=1)"))
        md.append(f"| {step} | {adds} | " + " | ".join(vals) + " |")
    md += ["", "The steps are differences between trained networks, not an exact split: gradual pruning ends at ranks "
           "of its own (its allocation on its own spectra), so its step mixes a second allocation with the pruning "
           "schedule; the integrator's step compares TDLRT with a network that differs from it only in how each "
           "step is taken (K-step, augmentation, Galerkin core step with the bases fixed between adaptations, "
           "ranks that may grow back) on the same schedule and budget."]

    md += ["", "**Targets** (means over seeds):", ""]
    for c, within in ((90, 1.0), (97, 4.0)):
        t = table.get(("tdlrt", c))
        if t is None or dense is None:
            md.append(f"- {c}%: not measured yet.")
            continue
        gap = dense[0] - t[0]
        md.append(f"- {c}%: TDLRT {t[0]:.2f} (n={t[2]}) against dense {dense[0]:.2f} (n={dense[2]}): "
                  f"{gap:.2f} under dense, target within {within:g}: {'met' if gap <= within else f'missed by {gap - within:.2f}'}.")
        beaten = [label for fam, label, _ in FAMILIES if fam not in ("dense", "tdlrt")
                  and table.get((fam, c)) is not None and table[fam, c][0] > t[0]]
        md.append(f"- {c}%: TDLRT at or above every control: " + ("yes" if not beaten else "no, below " + ", ".join(
            f"{b} ({table[f, c][0]:.2f})" for f, b, _ in FAMILIES if b in beaten)) + ".")

    lrs = sorted({r["lr"] for r in rows if r["lr"] != 0.05})
    if lrs:
        md += ["", "**The lr check** (seed 0, 90% c.r.; dense at 0% c.r.):", "",
               "| method | " + " | ".join(f"lr {lr:g}" for lr in [0.02, 0.05, 0.1]) + " |", "|---|---|---|---|"]
        for fam in ("dense", "tdlrt", "prune"):
            vals = []
            for lr in (0.02, 0.05, 0.1):
                hit = [r for r in rows if r["family"] == fam and r["lr"] == lr and r["seed"] == 0
                       and (fam == "dense" or r["cr"] == 90)]
                vals.append(f"{hit[0]['acc']:.2f}" if hit else "not run yet")
            md.append(f"| {dict((f, l) for f, l, _ in FAMILIES)[fam]} | " + " | ".join(vals) + " |")

    walls = []
    for fam, label, _ in FAMILIES:
        w = stats([r["wall"] for r in pick(rows, fam) if fam != "oneshot"])
        if w is not None and dense_wall is not None and fam != "oneshot":
            walls.append(f"{label} {w[0] / dense_wall[0]:.2f}")
    commits = sorted({r["commit"][:7] for r in rows})
    md += ["", "Training wall time relative to dense (means; one thread per run, two runs side by side on a 2-core "
           "CPU, so shares of the machine vary): " + "; ".join(walls) + " (fine-tuning: its 10 epochs only; the dense "
           "10-epoch run before it is extra)." if walls else "",
           "", f"Runs: {len(rows)} folders, commits {', '.join(commits)}."]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "controls.md", "\n".join(md) + "\n")
    headline(out, table, dense)
    figure(out, rows, table)


def headline(out: Path, table, dense) -> None:
    parts = []
    for c in (90, 97):
        t = table.get(("tdlrt", c))
        if t is not None and dense is not None:
            gap = dense[0] - t[0]
            parts.append(f"{abs(gap):.2f} points {'under' if gap >= 0 else 'above'} the dense network at {c}% conv "
                         f"compression ({t[0]:.2f}% against {dense[0]:.2f}%, {t[2]} seed{'s' if t[2] > 1 else ''})")
    text = ("**What you lose**: on proxy P (VGG16 at width 0.25, 9,000 CIFAR-10 training images, 20 epochs; dense "
            f"{dense[2] if dense else 0} seed{'s' if dense and dense[2] > 1 else ''}), TDLRT with the recommended "
            "settings ends " + " and ".join(parts) + ".") if parts else \
        "**What you lose**: the controls study has no TDLRT and dense runs yet."
    atomic_write_text(out / "headline.md", text + "\n")


def figure(out: Path, rows, table) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    short = {"tdlrt": "TDLRT", "prune": "gradual\npruning", "alloc": "Tucker at\nTDLRT's ranks",
             "finetune": "dense 10 ep.\n+ fine-tune 10", "oneshot": "one-shot\n(no fine-tune)",
             "tucker": "uniform\nTucker"}
    fams = [(f, short[f]) for f, _, _ in FAMILIES if f != "dense"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    dense = [r["acc"] for r in pick(rows, "dense")]
    for ax, c in zip(axes, (90, 97)):
        for x, (fam, label) in enumerate(fams):
            accs = [r["acc"] for r in pick(rows, fam, c)]
            ax.scatter([x] * len(accs), accs, s=14, color=f"C{x}", alpha=0.6, zorder=3)
            if accs:
                ax.hlines(statistics.fmean(accs), x - 0.3, x + 0.3, color=f"C{x}", lw=2.5, zorder=4)
        if dense:
            ax.axhspan(min(dense), max(dense), color="0.85", zorder=1)
            ax.axhline(statistics.fmean(dense), color="0.3", ls="--", lw=1, label="dense (mean, range)")
        ax.set_xticks(range(len(fams)), [label for _, label in fams], fontsize=8)
        ax.set_title(f"{c}% conv compression")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("test acc. (%), val.-selected checkpoint")
    if dense:
        axes[0].legend(fontsize=8, loc="lower left")
    fig.suptitle("VGG16 x0.25 on proxy P: TDLRT and its controls (dots: seeds, bars: means)", fontsize=10)
    save_figure(fig, out, "controls")


def save_figure(fig, out: Path, stem: str) -> None:
    """``fig`` as out/STEM.png and out/STEM.svg, each written to a temporary file and renamed over the old one;
    the SVG without its date and with fixed element ids, so the same runs give the same bytes."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    for ext in ("png", "svg"):
        tmp = out / f".{stem}.tmp.{ext}"
        with plt.rc_context({"svg.hashsalt": "tdlrt"}):
            fig.savefig(tmp, dpi=150, metadata={"Date": None} if ext == "svg" else None)
        tmp.replace(out / f"{stem}.{ext}")
    plt.close(fig)


if __name__ == "__main__":
    main()
