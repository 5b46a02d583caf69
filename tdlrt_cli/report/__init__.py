"""`tdlrt report PATH... [out=DIR] [band=5]`: run folders -> the paper's tables and plots.

Every ``summary.json`` under the given paths (single runs or multirun sweeps) is one finished run. Runs
are grouped by their whole resolved config except the seed and the keys in :data:`tdlrt_cli.identity.IGNORED_KEYS`: each
group is one row with mean and standard deviation over its seeds, and the config keys that differ
between rows become columns (a tau sweep gets a ``tau`` column, an lr sweep an ``lr`` column). Run
folders without a ``summary.json`` (still running, killed, failed) are listed apart as unfinished, with
the epochs they reached. Within a (data, model) table the best and second-best accuracies are marked
among the rows of comparable compression: rows whose mean conv compression rate falls in the same
``band``-point band (e.g. 90-95%), and only where a row's mean beats the next one's by more than the
larger std over seeds (rows of one run are never marked; :data:`.tables.MARK_RULE`).
The accuracy of a row is each run's ``test_acc`` (summary.json's, the
network that export and eval take by default): at its validation-selected checkpoint (best.pt, runs with
``data.val_split > 0``), else after the last epoch; ``test_acc_final`` (after the last epoch) and the best
test accuracy over epochs (``test_acc_max_epoch``, selected on the test set itself, so optimistic) are shown
apart and the latter is never used to rank rows. Summaries written before these names are read by theirs
(:func:`tdlrt_cli.summary.accuracies`).

The package: :mod:`.collect` reads the run folders and groups runs into rows, :mod:`.tables` writes the
tables, :mod:`.plots` draws the figures; :func:`main` reads everything first and writes after, so a damaged
file leaves an earlier report whole.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path
from typing import List, Optional

from ..errors import UserError
from ..files import pid_alive, remove_stale_temporaries
from .collect import collect, group
from .plots import (REPORT_TEMPORARY, loss_curve, plot_accuracy_vs_compression, plot_ill_conditioned,
                    plot_rank_trajectories, rank_runs, read_ranks)
from .tables import mark_best, write_runs, write_tables


STAGE = re.compile(r"^\.report\.(?P<pid>\d+)\.tmp$")  # a report being made (by that process)


def remove_stale_stages(out: Path) -> None:
    """The staging folders of reports killed while they were being made."""
    for path in out.iterdir():
        match = STAGE.match(path.name)
        if match and path.is_dir() and not path.is_symlink() and not pid_alive(int(match.group("pid"))):
            shutil.rmtree(path, ignore_errors=True)


def main(argv: Optional[List[str]] = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print("usage: tdlrt report PATH... [out=DIR] [band=5]\n\nReads run folders (single runs or multirun "
              "sweeps) and writes table.md, table.csv, table.tex, unfinished.csv and plots (PNG, and SVG beside "
              "each) into DIR (default: report/). A row averages the seeds of one config; run folders without summary.json are listed "
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
            assert 0.01 <= band <= 100
        except (ValueError, AssertionError):
            raise UserError(f"band={opts['band']} must be a number of percentage points in [0.01, 100]") from None
        if not paths:
            raise UserError("no run folders given: tdlrt report PATH... [out=DIR]")
        out = Path(opts.get("out", "report"))
        if out.exists() and not out.is_dir():
            raise UserError(f"out={out} is a file, not a folder; give a folder for the report (out=DIR)")
        runs, unfinished = collect(paths)
        rows = group(runs)
        mark_best(rows, band)
        # read every file the plots need before writing anything: a damaged one leaves the old report whole
        ranks_of = {run.path: read_ranks(row, run) for row, run in rank_runs(rows)}
        curves = {run.path: loss_curve(run) for run in runs if run.init_decay > 0}
        stage = None
        try:
            out.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(out, REPORT_TEMPORARY)
            remove_stale_stages(out)
            # everything is made in a staging folder inside out/ first, then moved in: all or none
            stage = out / f".report.{os.getpid()}.tmp"
            stage.mkdir()
            write_tables(rows, stage, band, unfinished)
            write_runs(runs, stage)
            pngs = (plot_accuracy_vs_compression(rows, stage) + plot_rank_trajectories(rows, stage, ranks_of)
                    + plot_ill_conditioned(runs, stage, curves))
            for made in sorted(stage.iterdir()):
                os.replace(made, out / made.name)
        except OSError as exc:
            where = exc.filename or out
            raise UserError(f"cannot write the report into out={out} ({where}: {exc.strerror or exc}); "
                            f"choose a writable folder with out=DIR") from None
        finally:
            if stage is not None:
                shutil.rmtree(stage, ignore_errors=True)
    except UserError as exc:
        print(f"tdlrt: error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(f"{len(runs)} runs in {len(rows)} rows -> {out}/table.md, table.csv, table.tex, runs.csv and "
          f"{len(pngs)} plots (PNG and SVG)"
          + (f"; {len(unfinished)} unfinished run(s) (no summary.json, or empty) listed in table.md and unfinished.csv"
             if unfinished else ""))
