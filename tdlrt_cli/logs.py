"""Run-folder logging: TensorBoard scalars, metrics.csv / ranks.csv (one row per epoch), ranks_steps.csv (ranks
at step 0 and every logging step), summary.json."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Dict, List, Optional

from .files import atomic_write_text, strict_json


def _truncate_csv(path: Path, max_value: int, column: str = "epoch") -> None:
    """Drop the rows whose ``column`` is above ``max_value`` (written after the checkpoint a run resumes from)."""
    if not path.is_file():
        return
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        return
    header, body = rows[0], rows[1:]
    col = header.index(column) if column in header else None
    keep = [r for r in body if col is None or (r and int(r[col]) <= max_value)]
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows([header] + keep)


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
        if resume_epoch is not None:
            for name in ("metrics.csv", "ranks.csv"):
                _truncate_csv(self.dir / name, resume_epoch)
        if resume_step is not None:
            _truncate_csv(self.dir / "ranks_steps.csv", resume_step, column="step")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = resume_step + 1 if resume_step is not None else None
            self.tb = SummaryWriter(str(self.dir / "tensorboard"), purge_step=purge)

    def scalars(self, step: int, values: Dict[str, float]) -> None:
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)

    def _append(self, name: str, rows: List[dict]) -> None:
        if not self.write:
            return
        path = self.dir / name
        new = not path.is_file() or path.stat().st_size == 0
        if not new:
            with open(path, newline="") as fh:
                header = next(csv.reader(fh))
        else:
            header = list(rows[0].keys())
        with open(path, "a", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=header, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerows(rows)

    def epoch(self, row: dict) -> None:
        self._append("metrics.csv", [row])

    def step_ranks(self, step: int, epoch: int, ranks: Dict[str, List[int]]) -> None:
        """ranks_steps.csv: every layer's ranks at a training step (step 0 and every logging step)."""
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

    def summary(self, data: dict) -> None:
        if not self.write:
            return
        atomic_write_text(self.dir / "summary.json", strict_json(data))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
