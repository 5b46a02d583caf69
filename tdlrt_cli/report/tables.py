"""The report's tables: table.md, table.csv and table.tex (a table per data and model, the best and second
best accuracies marked within each compression band), runs.csv (a line per run) and unfinished.csv."""
from __future__ import annotations

import csv
import math
import re
from pathlib import Path
from typing import Dict, List, Optional

from ..files import atomic_text, atomic_write_text
from ..identity import IGNORED_KEYS, ROOT_IS_LOCATION
from .collect import METHOD_LABEL, Row, Run, Unfinished, fmt, tables, varying_keys

def beats(row: Row, other: Row) -> bool:
    """``row``'s mean accuracy exceeds ``other``'s by more than their spread (the larger of the two stds over
    seeds). A row of one run has no spread: it never beats another row, nor is it beaten."""
    if len(row.runs) < 2 or len(other.runs) < 2:
        return False
    (mean, std), (other_mean, other_std) = row.acc, other.acc
    return mean - other_mean > max(std, other_std)


MARK_RULE = ("a row is **best** only if its mean test accuracy exceeds the runner-up's by more than the larger "
             "of the two rows' std over seeds, and _second best_ only if the best is marked and it likewise "
             "exceeds the third's; rows of one run have no spread and are never marked, nor is a band with one "
             "compressed row")


def mark_best(rows: List[Row], band: float) -> None:
    """Best (1) and second best (2) accuracy among the compressed rows of each (data, model, c.r. band), marked
    only where the difference is larger than the spread over seeds (:data:`MARK_RULE`, :func:`beats`)."""
    bands: Dict[tuple, List[Row]] = {}
    for row in rows:
        row.mark = 0
        if row.method != "dense":
            bands.setdefault((row.data, row.model, math.floor(row.cr[0] / band)), []).append(row)
    for members in bands.values():
        ranked = sorted(members, key=lambda r: r.acc[0], reverse=True)
        if len(ranked) > 1 and beats(ranked[0], ranked[1]):
            ranked[0].mark = 1
            if len(ranked) > 2 and beats(ranked[1], ranked[2]):
                ranked[1].mark = 2


def _pm(mean: float, std: float, runs: Optional[int] = None) -> str:
    """``mean ± std`` over seeds; of a single run (``runs=1``) the plain value: it has no spread."""
    return f"{mean:.2f}" if runs is not None and runs < 2 else f"{mean:.2f} ± {std:.2f}"


def _tex_pm(mean: float, std: float, runs: Optional[int] = None) -> str:
    return _pm(mean, std, runs).replace("±", "$\\pm$")


def _csv_std(std: float, runs: int) -> str:
    """A std column of table.csv: empty for a single run (no spread over seeds), else the number."""
    return "" if runs < 2 else f"{std:.4f}"


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
          f"A value without ± is a single run (its \"runs\" is 1): it has no spread. "
          f"Marks compare rows whose compression rates fall in the same {band:g}-point band (\"c.r. band\"): "
          f"{MARK_RULE}.", "", ACC_NOTE]
    tex = [f"% mean $\\pm$ std over seeds; a value without $\\pm$ is a single run (n=1). Within a {band:g}-point "
           f"c.r. band, \\textbf{{best}} and \\underline{{second best}}: "
           + MARK_RULE.replace("**", "").replace("_", ""),
           "\\begin{tabular}{llll" + "l" * len(columns) + "lrrrr}", "\\toprule",
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
                n = len(row.runs)
                w.writerow([row.data, row.model, row.method, row.knob, *(fmt(row.value(c)) for c in columns),
                            _band_label(row, band), n, " ".join(map(str, row.seeds)), row.acc_source,
                            f"{acc:.4f}", _csv_std(acc_sd, n), f"{fin:.4f}", _csv_std(fin_sd, n), f"{mx:.4f}",
                            _csv_std(mx_sd, n), f"{cr:.4f}", _csv_std(cr_sd, n),
                            {1: "best", 2: "second"}.get(row.mark, "")])
                text = _pm(acc, acc_sd, n)
                dagger = "" if row.acc_source == "val_ckpt" else " †"
                md_acc = {1: f"**{text}**", 2: f"_{text}_"}.get(row.mark, text) + dagger
                tex_acc = ({1: f"\\textbf{{{text}}}", 2: f"\\underline{{{text}}}"}.get(row.mark, text)
                           .replace("±", "$\\pm$") + ("$^\\dagger$" if dagger else ""))
                label = METHOD_LABEL.get(row.method, row.method)
                md.append(f"| {label} | {row.knob or '-'} | " + "".join(f"{fmt(row.value(c))} | " for c in local)
                          + f"{_band_label(row, band)} | {n} | {md_acc} | {_pm(fin, fin_sd, n)} | "
                          f"{_pm(mx, mx_sd, n)} | {_pm(cr, cr_sd, n)} |")
                setting = _tex(row.knob) or "-"
                tex.append(f"{_tex(row.data)} & {_tex(row.model)} & {label} & {setting} & "
                           + "".join(f"{_tex(fmt(row.value(c)))} & " for c in columns)
                           + f"{_band_label(row, band)} & {tex_acc} & {_tex_pm(fin, fin_sd, n)} & "
                           f"{_tex_pm(mx, mx_sd, n)} & {_tex_pm(cr, cr_sd, n)} \\\\")
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


RUN_COLUMNS = ["path", "data", "model", "method", "setting", "seed", "epochs", "test_acc", "checkpoint",
               "test_acc_final", "test_acc_max_epoch", "compression_rate", "wall_time_s", "device", "host", "git_commit", "git_dirty", "torch", "started"]


def write_runs(runs: List[Run], out: Path) -> None:
    """runs.csv: one line per finished run, with what a reader needs to trust and rerun it (wall time,
    device, host, the source commit and whether it was dirty, torch version, start time). Its accuracies have
    summary.json's names: ``test_acc`` of the network in ``checkpoint`` (best.pt, chosen on the validation split,
    else last.pt; the tables' test acc.), ``test_acc_final`` after the last epoch, ``test_acc_max_epoch``."""
    with atomic_text(out / "runs.csv") as fh:
        w = csv.writer(fh)
        w.writerow(RUN_COLUMNS)
        for r in sorted(runs, key=lambda r: (r.data, r.model, r.method, r.knob, str(r.path))):
            s, prov = r.summary, r.summary.get("provenance") or {}
            wall = s.get("wall_time_s")
            w.writerow([r.path, r.data, r.model, r.method, r.knob, r.seed, s.get("epochs", ""), f"{r.acc:.4f}",
                        "best.pt" if r.val_selected_acc is not None else "last.pt", f"{r.test_acc:.4f}",
                        "" if r.best_test_acc is None else f"{r.best_test_acc:.4f}", f"{r.compression_rate:.4f}",
                        "" if wall is None else f"{float(wall):.0f}", s.get("device", ""), prov.get("host", ""),
                        prov.get("git_commit", ""), prov.get("git_dirty", ""), prov.get("torch", ""),
                        prov.get("started", "")])
