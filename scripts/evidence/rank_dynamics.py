"""How ranks move over a run, from the small files every run leaves (metrics.csv, ranks_steps.csv, summary.json).

    python scripts/evidence/rank_dynamics.py results/frontier_p/runs [--out results/frontier_p/rank_dynamics.md]

One row per run: its rule (the paper's tau rule or the target rule), the conv compression rate after epochs
1, 2, 5, 10 and at the end, the first epoch whose c.r. is within 1 point of the final one (when the ranks
were in effect decided), and, between consecutive rows of ranks_steps.csv (every `log_every_n_steps`
steps, so a lower bound on the changes in between), how many times an adapted mode's rank went down and up.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from tdlrt_cli.files import atomic_write_text


def read_csv(path: Path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def rank_moves(rows):
    """(decreases, increases) of adapted modes' ranks between consecutive logged steps."""
    by_step = {}
    for row in rows:
        by_step.setdefault(int(row["step"]), {})[row["layer"]] = (int(row["r_out"]), int(row["r_in"]))
    down = up = 0
    steps = sorted(by_step)
    for a, b in zip(steps, steps[1:]):
        for layer, ranks in by_step[b].items():
            before = by_step[a].get(layer)
            if before is None:
                continue
            for r0, r1 in zip(before, ranks):
                down += r1 < r0
                up += r1 > r0
    return down, up


def describe(run: Path) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    config = summary.get("config") or {}
    method = config.get("method", {})
    metrics = read_csv(run / "metrics.csv")
    cr = [float(row["compression_rate"]) for row in metrics]
    final = cr[-1]
    decided = next(i + 1 for i, value in enumerate(cr) if abs(value - final) <= 1.0)
    at = {e: (cr[e - 1] if e <= len(cr) else None) for e in (1, 2, 5, 10)}
    down, up = rank_moves(read_csv(run / "ranks_steps.csv")) if (run / "ranks_steps.csv").is_file() else (0, 0)
    rule = f"target {method.get('target_cr'):g}%" if method.get("target_cr") is not None else f"tau {config.get('tau')}"
    return {"run": run.name, "rule": rule, "seed": config.get("seed"), "cr": at, "final": final,
            "decided": decided, "epochs": len(cr), "down": down, "up": up}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, help="a folder of run folders")
    parser.add_argument("--out", type=Path, help="also write the table (markdown) here")
    args = parser.parse_args()
    rows = []
    for run in sorted(p for p in args.runs.iterdir() if (p / "summary.json").is_file()):
        config = json.loads((run / "summary.json").read_text()).get("config") or {}
        if config.get("method", {}).get("name") in ("tdlrt", "dlrt"):
            rows.append(describe(run))
    if not rows:
        sys.exit(f"no finished tdlrt/dlrt run under {args.runs}")

    def fmt(v):
        return "-" if v is None else f"{v:.1f}"

    lines = ["| run | rule | c.r. epoch 1 | epoch 2 | epoch 5 | epoch 10 | final | within 1 point from epoch | "
             "rank decreases | rank increases |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["rule"], r["seed"] or 0)):
        lines.append(f"| {r['run']} | {r['rule']} | {fmt(r['cr'][1])} | {fmt(r['cr'][2])} | {fmt(r['cr'][5])} | "
                     f"{fmt(r['cr'][10])} | {r['final']:.2f} | {r['decided']} of {r['epochs']} | {r['down']} | {r['up']} |")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        atomic_write_text(args.out, text)


if __name__ == "__main__":
    main()
