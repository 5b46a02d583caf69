"""The width study's table and figure, from the committed run files of `scripts/evidence/width.sh` (widths 0.5 and
1.0 on proxy P; full CIFAR-10 at width 0.25) and of `scripts/evidence/controls.sh` (width 0.25 on proxy P).

    python scripts/evidence/width_report.py [--runs results/width/runs results/controls_p/runs] [--out results/width]

Writes, under --out: width.md (accuracy and gap to dense per width and method, training wall time relative to
dense, the full-CIFAR-10 runs, the targets), headline.md (one sentence for the README's opening) and
width.png / width.svg (gap to dense against the dense network's conv parameters, log axis; wall time relative
to dense beside it). Accuracies are test accuracies at the validation-selected checkpoint, as in `tdlrt report`.
A gap is paired: a method's run minus the dense run of the same width, data and seed, averaged over the seeds.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from controls_report import save_figure, stats  # this folder's: the same statistics and figure files
from tdlrt_cli.files import atomic_write_text
from tdlrt_cli.summary import accuracies

NAME = re.compile(r"^(?:w(?P<w>[\d.]+)_|(?P<full>full)_)?(?P<family>dense|tdlrt|prune)(?:_cr(?P<cr>\d+))?"
                  r"(?:_lr(?P<lr>[\d.]+))?_s(?P<seed>\d+)$")
LABEL = {"dense": "Dense", "tdlrt": "TDLRT (recommended defaults)",
         "prune": "Gradual pruning, no integrator (strongest control)"}
CRS = (90, 97)


def width_name(w: float) -> str:
    return f"{w:.1f}" if w == int(w) else f"{w:g}"


def final_train_acc(run: Path) -> float:
    """The training accuracy of the last epoch in metrics.csv (under-training shows there)."""
    import csv

    with open(run / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return float(rows[-1]["train_acc"])


checks: list = []  # the lr check's runs (load fills it)


def load(dirs) -> list:
    rows = []
    for d in dirs:
        for f in sorted(Path(d).glob("*/summary.json")):
            m = NAME.match(f.parent.name)
            if not m:
                continue  # the controls study's other runs (lr check, fixed-rank controls)
            s = json.loads(f.read_text())
            cfg = s.get("config") or {}
            if m["lr"]:  # an lr check (width 0.25's from the controls study: the same setting), its own table
                checks.append({"family": m["family"], "cr": int(m["cr"]) if m["cr"] else 0,
                               "width": float(cfg["model"]["width_mult"]), "lr": float(cfg["lr"]),
                               "acc": float(accuracies(s)["test_acc"]), "train_acc": final_train_acc(f.parent),
                               "wall": float(s.get("wall_time_s") or 0.0),
                               "commit": (s.get("provenance") or {}).get("git_commit", "?")[:7]})
                continue
            rows.append({"name": f.parent.name, "family": m["family"], "cr": int(m["cr"]) if m["cr"] else 0,
                         "seed": int(m["seed"]), "width": float(cfg["model"]["width_mult"]),
                         "data": "full" if m["full"] else "P", "acc": float(accuracies(s)["test_acc"]),
                         "c.r.": float(s["compression_rate"]), "conv_dense": int(s["conv_params_dense"]),
                         "conv": int(s["conv_params"]), "wall": float(s.get("wall_time_s") or 0.0),
                         "commit": (s.get("provenance") or {}).get("git_commit", "?")[:7], "dir": str(f.parent),
                         "lr": float(cfg.get("lr", 0.0)), "train_acc": final_train_acc(f.parent)})
    return rows


def fmt(st, signed=False) -> str:
    if st is None:
        return "not run yet"
    mean, std, n = st
    m = f"{mean:+.2f}" if signed else f"{mean:.2f}"
    return f"{m} ± {std:.2f} (n={n})" if n > 1 else f"{m} (n=1)"


def runs(rows, family, width, cr=0, data="P"):
    return {r["seed"]: r for r in rows if r["family"] == family and r["width"] == width and r["cr"] == cr
            and r["data"] == data}


def gap(rows, family, width, cr, data="P"):
    """Paired gap to dense (method minus dense, same width, data and seed), over the seeds both have."""
    a, d = runs(rows, family, width, cr, data), runs(rows, "dense", width, 0, data)
    return stats([a[s]["acc"] - d[s]["acc"] for s in sorted(set(a) & set(d))])


def wall_ratio(rows, family, width, cr, data="P"):
    a, d = runs(rows, family, width, cr, data), runs(rows, "dense", width, 0, data)
    return stats([a[s]["wall"] / d[s]["wall"] for s in sorted(set(a) & set(d)) if d[s]["wall"] > 0])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", nargs="+", default=["results/width/runs", "results/controls_p/runs"])
    ap.add_argument("--out", default="results/width")
    a = ap.parse_args()
    rows = load(a.runs)
    out = Path(a.out)
    widths = sorted({r["width"] for r in rows if r["data"] == "P"})
    md = ["VGG16 on proxy P (9,000 CIFAR-10 training images, 20 epochs, 1-epoch lr warm-up for every method) at "
          "three widths: test accuracy (%) at the validation-selected checkpoint; the gap to dense is paired "
          "(each run minus the dense run of the same width and seed), mean ± std over seeds. Read from "
          f"{', '.join(f'`{d}/`' for d in a.runs)} by `python scripts/evidence/width_report.py`.", "",
          "| width | dense conv params | dense | " + " | ".join(
              f"{LABEL[f].split(' (')[0]} {c}% | gap" for c in CRS for f in ("tdlrt", "prune")) + " |",
          "|---|---|---|" + "---|---|" * 2 * len(CRS)]
    for w in widths:
        d = runs(rows, "dense", w)
        conv = next(iter({r["conv_dense"] for r in rows if r["width"] == w}))
        cells = [fmt(stats([r["acc"] for r in d.values()]))]
        for c in CRS:
            for f in ("tdlrt", "prune"):
                cells += [fmt(stats([r["acc"] for r in runs(rows, f, w, c).values()])), fmt(gap(rows, f, w, c), True)]
        md.append(f"| {width_name(w)} | {conv:,} | " + " | ".join(cells) + " |")
    md += ["", "Training wall time relative to dense at the same width and seed (one thread per run, two runs side "
           "by side on a 2-core CPU, so the share of the machine varies by a few tens of percent):", "",
           "| width | " + " | ".join(f"{LABEL[f].split(' (')[0]} {c}%" for c in CRS for f in ("tdlrt", "prune"))
           + " | dense wall time |", "|---|" + "---|" * (2 * len(CRS) + 1)]
    for w in widths:
        cells = [fmt(wall_ratio(rows, f, w, c)) for c in CRS for f in ("tdlrt", "prune")]
        dw = stats([r["wall"] / 60 for r in runs(rows, "dense", w).values()])
        md.append(f"| {width_name(w)} | " + " | ".join(cells) + f" | {'n/a' if dw is None else f'{dw[0]:.0f} min'} |")
    full = [r for r in rows if r["data"] == "full"]
    if full:
        md += ["", "Full CIFAR-10 (45,000 training images, 5,000 for validation, the test set), width 0.25, 20 epochs, "
               "seed 0:", "", "| method | conv c.r. | test acc. | gap to dense |", "|---|---|---|---|"]
        for r in sorted(full, key=lambda r: (r["family"] != "dense", r["cr"])):
            g = gap(rows, r["family"], 0.25, r["cr"], "full") if r["family"] != "dense" else None
            md.append(f"| {LABEL[r['family']]} | {r['c.r.']:.2f}% | {r['acc']:.2f} | "
                      f"{'' if g is None else fmt(g, True)} |")
    md += lr_check(rows)
    md += ["", "**Targets**:", ""] + targets(rows, widths)
    commits = sorted({r["commit"] for r in rows + checks})
    md += ["", f"Runs: {len(rows) + len(checks)} folders, commits {', '.join(commits)}; 2-core CPU, torch 2.14.1, fp32."]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "width.md", "\n".join(md) + "\n")
    atomic_write_text(out / "headline.md", headline(rows, widths) + "\n")
    figure(out, rows, widths)


LR_COLUMNS = (("dense", 0), ("tdlrt", 90), ("prune", 90), ("tdlrt", 97), ("prune", 97))


CHECK_LR = 0.02  # the lr check's lr at every width (width 0.25 also has 0.1)


def lr_run(width: float, family: str, cr: int = 0, lr: float = CHECK_LR):
    """The lr check's run of ``family`` at ``cr``, ``width`` and ``lr`` (None where not run yet)."""
    return next((c for c in checks if c["width"] == width and c["family"] == family and (c["cr"] or 0) == cr
                 and c["lr"] == lr), None)


def lr_pair(width: float, cr: int = 90):
    """The lr check's dense and TDLRT runs at ``width`` and ``cr`` (None where not run yet)."""
    return lr_run(width, "dense"), lr_run(width, "tdlrt", cr)


def lr_check(rows) -> list:
    """Dense, TDLRT and the strongest control at 90% and 97% at each width with the study's lr and with the lr
    check's, seed 0: test accuracy, the gap to dense at the same width and lr, and the last epoch's training
    accuracy (under-training shows there)."""
    if not checks:
        return []
    lines = ["", "lr check (seed 0; under the standard parametrisation a wider network's best lr is smaller; width "
             "0.25's runs are the controls study's lr check, the same setting): test accuracy, its gap to dense at "
             "the same width and lr in round brackets, and the last epoch's training accuracy in square ones.", "",
             "| width | lr | " + " | ".join("dense" if f == "dense" else f"{LABEL[f].split(' (')[0]} {c}%"
                                            for f, c in LR_COLUMNS) + " |", "|---|---" * 1 + "|---" * len(LR_COLUMNS) + "|"]
    for w in sorted({c["width"] for c in checks}):
        base = [r for r in rows if r["width"] == w and r["data"] == "P" and r["seed"] == 0]
        for lr in sorted({r["lr"] for r in base} | {c["lr"] for c in checks if c["width"] == w}, reverse=True):
            have = [r for r in base if r["lr"] == lr] + [c for c in checks if c["lr"] == lr and c["width"] == w]
            find = (lambda f, c: next((r for r in have if r["family"] == f and (r["cr"] or 0) == c), None))
            d = find("dense", 0)
            cells = []
            for f, c in LR_COLUMNS:
                r = find(f, c)
                gap_ = "" if r is None or d is None or f == "dense" else f" ({r['acc'] - d['acc']:+.2f})"
                cells.append("not run" if r is None else f"{r['acc']:.2f}{gap_} [{r['train_acc']:.1f}]")
            lines.append(f"| {width_name(w)} | {lr:g} | " + " | ".join(cells) + " |")
    return lines


def lr_gaps(family: str, cr: int, lr: float) -> list:
    """[(width, gap to dense)] of the lr check's runs of ``family`` at ``cr`` and ``lr`` (seed 0)."""
    out = []
    for w in sorted({c["width"] for c in checks if c["lr"] == lr}):
        d, a = lr_run(w, "dense", lr=lr), lr_run(w, family, cr, lr=lr)
        if d is not None and a is not None:
            out.append((w, a["acc"] - d["acc"]))
    return out


def targets(rows, widths) -> list:
    lines = []
    g90 = [(w, gap(rows, "tdlrt", w, 90)) for w in widths]
    g90 = [(w, g) for w, g in g90 if g is not None]
    if len(g90) > 1:
        shrinks = all(g90[i + 1][1][0] >= g90[i][1][0] for i in range(len(g90) - 1))
        lines.append("- The gap to dense at 90% shrinks with width: " + ("yes" if shrinks else "no") + " ("
                     + ", ".join(f"width {width_name(w)}: {g[0]:+.2f}" for w, g in g90) + ").")
    at_lr = lr_gaps("tdlrt", 90, CHECK_LR)
    if len(at_lr) > 1:
        shrinks = all(at_lr[i + 1][1] >= at_lr[i][1] for i in range(len(at_lr) - 1))
        lines.append(f"- ... and at lr {CHECK_LR:g} (seed 0, every width at the same lr): "
                     + ("yes" if shrinks else "no") + " ("
                     + ", ".join(f"width {width_name(w)}: {g:+.2f}" for w, g in at_lr) + ").")
    for c, within in ((90, 0.5), (97, 2.0)):
        g = gap(rows, "tdlrt", 1.0, c)
        if g is None:
            lines.append(f"- Width 1.0, {c}%: TDLRT within {within:g} of dense: not measured yet.")
            continue
        lines.append(f"- Width 1.0, {c}%: TDLRT {-g[0]:.2f} under dense (n={g[2]}), target within {within:g}: "
                     + ("met." if -g[0] <= within else f"missed by {-g[0] - within:.2f}."))
    for c, within in ((90, 0.5), (97, 2.0)):
        d, a = lr_pair(1.0, c)
        if d is not None and a is not None:
            g = a["acc"] - d["acc"]
            p = lr_run(1.0, "prune", c)
            control = "" if p is None else f"; the strongest control {p['acc']:.2f}, {a['acc'] - p['acc']:+.2f} to TDLRT"
            lines.append(f"- Width 1.0, {c}%, both at the lr check's lr {a['lr']:g} (dense {d['acc']:.2f}, TDLRT "
                         f"{a['acc']:.2f}{control}): TDLRT {-g:.2f} under dense (n=1), target within {within:g}: "
                         + ("met." if -g <= within else f"missed by {-g - within:.2f}."))
    g = gap(rows, "tdlrt", 0.25, 90, "full")
    lines.append("- Full CIFAR-10, width 0.25, 90%: " + ("not measured yet." if g is None else
                 f"TDLRT {-g[0]:.2f} under dense (n={g[2]}), target within 2: "
                 + ("met." if -g[0] <= 2 else f"missed by {-g[0] - 2:.2f}.")))
    return lines


def headline(rows, widths) -> str:
    """What a user loses at 90% and 97%, at the widest width measured at both."""
    both = [w for w in widths if gap(rows, "tdlrt", w, 90) and gap(rows, "tdlrt", w, 97)]
    if not both:
        return "**What you lose**: the width study has no TDLRT and dense runs at 90% and 97% yet."
    w = max(both)
    parts = []
    for c in CRS:
        g = gap(rows, "tdlrt", w, c)
        n = g[2]
        parts.append(f"{abs(g[0]):.2f} points {'under' if g[0] <= 0 else 'above'} dense at {c}% "
                     f"({n} seed{'s' if n > 1 else ''})")
    conv = next(iter({r["conv_dense"] for r in rows if r["width"] == w}))
    lr_parts = []
    for c in CRS:
        d, a = lr_pair(w, c)
        if d is not None and a is not None:
            lr_parts.append(f"{abs(a['acc'] - d['acc']):.2f} points {'under' if a['acc'] <= d['acc'] else 'above'} "
                            f"dense at {c}% ({a['acc']:.2f}% against {d['acc']:.2f}%)")
    lr = "" if not lr_parts else (f" At lr {lr_pair(w)[0]['lr']:g}, which trains both networks further at this "
                                  f"width, TDLRT ends " + " and ".join(lr_parts) + " (1 seed).")
    controls = []
    for c in CRS:
        a, p = lr_pair(w, c)[1], lr_run(w, "prune", c)
        if a is not None and p is not None:
            d = p["acc"] - a["acc"]  # under 1 point: inside the spread over seeds at width 0.25
            said = "level with TDLRT" if abs(d) < 1.0 else f"{abs(d):.2f} points {'above' if d > 0 else 'under'} TDLRT"
            controls.append(f"{p['acc']:.2f}% at {c}% ({said})")
    if controls:
        spread = [st[1] for st in (stats([r["acc"] for r in runs(rows, f, 0.25, c).values()])
                                   for f in ("tdlrt", "prune") for c in CRS) if st is not None and st[2] > 1]
        lr += (" There the strongest control, gradual pruning without the integrator, ends at " + " and ".join(controls)
               + " (one seed" + (f"; at width 0.25 each method's std over seeds is {min(spread):.1f} to "
                                 f"{max(spread):.1f} points" if spread else "") + ").")
    return (f"**What you lose**: on VGG16 at width {width_name(w)} ({conv:,} conv parameters dense) trained on 9,000 CIFAR-10 "
            "images for 20 epochs at lr 0.05, TDLRT with the recommended defaults ends " + " and ".join(parts) + "."
            + lr)


def figure(out: Path, rows, widths) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    conv = {w: next(iter({r["conv_dense"] for r in rows if r["width"] == w})) for w in widths}
    for i, (f, c) in enumerate((f, c) for c in CRS for f in ("tdlrt", "prune")):
        style = dict(color="C0" if f == "tdlrt" else "C1", ls="-" if c == 90 else "--",
                     marker="o" if c == 90 else "s", capsize=3)
        label = f"{LABEL[f].split(' (')[0]}, {c}%"
        for axis, value in ((ax, gap), (bx, wall_ratio)):
            pts = [(conv[w], value(rows, f, w, c)) for w in widths]
            pts = [(x, st) for x, st in pts if st is not None]
            if pts:
                axis.errorbar([x for x, _ in pts], [st[0] for _, st in pts], yerr=[st[1] for _, st in pts],
                              label=label, **style)
    for f in ("tdlrt", "prune"):  # the lr check: every width at lr 0.02, seed 0
        pts = lr_gaps(f, 90, CHECK_LR)
        if pts:
            ax.plot([conv[w] for w, _ in pts if w in conv], [g for w, g in pts if w in conv], ls=":", marker="o",
                    mfc="none", color="C0" if f == "tdlrt" else "C1",
                    label=f"{LABEL[f].split(' (')[0]}, 90%, lr {CHECK_LR:g} (seed 0)")
    ax.axhline(0, color="0.3", lw=1, ls=":")
    bx.axhline(1, color="0.3", lw=1, ls=":")
    for axis in (ax, bx):
        axis.set_xscale("log")
        axis.set_xlabel("conv parameters of the dense network (width 0.25, 0.5, 1.0)")
        axis.grid(alpha=0.3)
    ax.set_ylabel("test acc. gap to dense (points)")
    bx.set_ylabel("training wall time / dense")
    ax.legend(fontsize=8)
    ax.set_title("accuracy gap to dense (mean ± std over seeds)", fontsize=10)
    bx.set_title("training cost (one CPU thread per run)", fontsize=10)
    fig.suptitle("VGG16 on proxy P: TDLRT and gradual pruning against dense as the network widens", fontsize=10)
    save_figure(fig, out, "width")


if __name__ == "__main__":
    main()
