"""Run-folder logging: TensorBoard scalars, metrics.csv / ranks.csv (one row per epoch), ranks_steps.csv (ranks
at step 0 and every logging step), summary.json."""
from __future__ import annotations

import csv
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from .config import flatten
from .errors import ConfigError
from .files import atomic_text, atomic_write_text, strict_json


def read_csv(path: Path) -> List[List[str]]:
    """The rows of a CSV file, without a partial last row (an older writer killed mid-line)."""
    if not path.is_file():
        return []
    try:
        with open(path, newline="") as fh:
            rows = list(csv.reader(fh))
    except (UnicodeDecodeError, csv.Error) as exc:  # binary, or a NUL byte
        raise ConfigError(f"{path} is not a CSV file written by tdlrt ({type(exc).__name__}); restore it or move "
                          f"it away") from None
    return rows[:1] + [r for r in rows[1:] if len(r) == len(rows[0])] if rows else []


def _write_csv(path: Path, rows: List[list]) -> None:
    with atomic_text(path) as fh:
        csv.writer(fh).writerows(rows)


def _truncate_csv(path: Path, max_value: int, column: str = "epoch") -> None:
    """Drop the rows whose ``column`` is above ``max_value`` (written after the checkpoint a run resumes from)."""
    rows = read_csv(path)
    if not rows:
        return
    header, body = rows[0], rows[1:]
    col = header.index(column) if column in header else None
    keep = [r for r in body if col is None or (r[col].isdigit() and int(r[col]) <= max_value)]
    _write_csv(path, [header] + keep)


class Console:
    """What the user reads: a line on stderr, and the same line with its time in the run's ``train.log``."""

    def __init__(self, log: Optional[Path] = None):
        self.log = log

    def __call__(self, line: str) -> None:
        try:
            print(line, file=sys.stderr, flush=True)
        except OSError:
            pass  # the terminal is gone (SIGHUP): the run goes on to its checkpoint, the log keeps the line
        self.record(line)

    def record(self, line: str) -> None:
        """The line in train.log only."""
        if self.log is not None:
            try:
                with open(self.log, "a") as fh:
                    fh.write(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {line}\n")
            except OSError:
                pass  # a full disk ends the run at the next checkpoint, not over a log line


class RunLogger:
    def __init__(self, run_dir: Path, resume_epoch: Optional[int] = None, tensorboard: bool = True,
                 write: bool = True, resume_step: Optional[int] = None):
        """Resuming (``resume_epoch``, ``resume_step``) drops what was logged after the checkpoint: CSV rows
        of later epochs and TensorBoard events of later steps (every scalar is logged against the global
        step). ``write=False``: log nothing (the other processes of a data-parallel run)."""
        self.dir, self.write = Path(run_dir), write
        self.tb = None
        if not write:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        # A fresh start (no resume) keeps nothing logged by an attempt that died before its first checkpoint
        # in this folder (the same command started again): the run starts again from step 0.
        for name in ("metrics.csv", "ranks.csv"):
            _truncate_csv(self.dir / name, resume_epoch if resume_epoch is not None else 0)
        _truncate_csv(self.dir / "ranks_steps.csv", resume_step if resume_step is not None else -1, column="step")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = resume_step + 1 if resume_step is not None else (0 if (self.dir / "tensorboard").is_dir() else None)
            self.tb = SummaryWriter(str(self.dir / "tensorboard"), purge_step=purge)

    def scalars(self, step: int, values: Dict[str, float]) -> None:
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)

    def _append(self, name: str, rows: List[dict]) -> None:
        """Add rows to a CSV file by rewriting it atomically (a kill leaves the file with or without them)."""
        if not self.write:
            return
        path = self.dir / name
        old = read_csv(path)
        header = old[0] if old else list(rows[0].keys())
        added = [k for r in rows for k in r if k not in header]
        if added:  # a column the file lacks (an older version wrote it, or its header was edited): added, not dropped
            added = list(dict.fromkeys(added))
            header = header + added
            old = [header] + [row + [""] * len(added) for row in old[1:]]
        _write_csv(path, (old or [header]) + [[r.get(k, "") for k in header] for r in rows])

    def epoch(self, row: dict) -> None:
        self._append("metrics.csv", [row])

    def step_ranks(self, step: int, epoch: int, ranks: Dict[str, List[int]]) -> None:
        """ranks_steps.csv: every layer's ranks at a training step (step 0, every logging step, and every step
        whose truncation changed a rank)."""
        rows = []
        for layer, r in ranks.items():
            r4 = list(r) + [""] * (4 - len(r))
            rows.append({"step": step, "epoch": epoch, "layer": layer, "r_out": r4[0], "r_in": r4[1],
                         "r_kh": r4[2], "r_kw": r4[3]})
        if rows:
            self._append("ranks_steps.csv", rows)

    def ranks(self, epoch: int, ranks: Dict[str, List[int]], full: Dict[str, List[int]]) -> None:
        rows = []
        for layer, r in ranks.items():
            r4, n4 = list(r) + [""] * (4 - len(r)), list(full[layer]) + [""] * (4 - len(full[layer]))
            rows.append({"epoch": epoch, "layer": layer, "r_out": r4[0], "r_in": r4[1], "r_kh": r4[2], "r_kw": r4[3],
                         "n_out": n4[0], "n_in": n4[1], "n_kh": n4[2], "n_kw": n4[3]})
        if rows:
            self._append("ranks.csv", rows)

    def hparams(self, params: Dict[str, object], metrics: Dict[str, float]) -> None:
        """TensorBoard's HParams tab: this run's settings beside its final metrics (sweeps compare there)."""
        if self.tb is not None:
            clean = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in params.items()}
            self.tb.add_hparams(clean, {f"hparam/{k}": v for k, v in metrics.items() if v is not None},
                                run_name=".")

    def summary(self, data: dict) -> None:
        if not self.write:
            return
        atomic_write_text(self.dir / "summary.json", strict_json(data))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def hparams_of(config: dict) -> dict:
    """The settings shown in TensorBoard's HParams tab (the keys a sweep varies)."""
    keep = ("model.name", "model.width_mult", "data.name", "method.name", "tau", "lr", "weight_decay", "momentum",
            "epochs", "batch_size", "seed", "optimizer.name", "scheduler.name", "precision", "method.rank_frac",
            "method.target_cr", "method.augment_every", "method.tau_warmup_epochs", "method.r_max_frac")
    flat = flatten(config)
    return {k: flat[k] for k in keep if k in flat and flat[k] is not None}

