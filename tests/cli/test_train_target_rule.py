"""The target rule (method.target_cr) through the real CLI: it lands on the compression asked for with best.pt at
the final ranks, a run killed mid-ramp resumes bitwise, data-parallel replicas stay identical, ranks_steps.csv
has a row at every rank change, and what the rule would ignore is refused in one line."""
import csv
import io
import json
import re

import pytest
import torch

from conftest import TINY, run_dirs, run_tdlrt, same_final_weights, straight_and_resumed, torchrun


def summary_of(base):
    (run,) = run_dirs(base)
    return run, json.loads((run / "summary.json").read_text())


def test_cli_target_cr_lands_on_the_compression_and_best_pt_has_the_final_ranks(tmp_path):
    run_tdlrt(["train", *TINY, "epochs=3", "data.val_split=64", "method=tdlrt", "method.target_cr=80",
               "method.augment_every=2", "cost_report=false", f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path)
    run, summary = summary_of(tmp_path)
    assert abs(summary["compression_rate"] - 80) <= 1
    best = torch.load(run / "checkpoints" / "best.pt", map_location="cpu", weights_only=True)
    assert best["best"]["ranks"] == summary["ranks"]  # the selected network is the final network
    assert summary["selected"]["compression_rate"] == pytest.approx(summary["compression_rate"])
    assert summary["config"]["method"]["target_cr"] == 80
    log = (run / "train.log").read_text()
    assert "target_cr 80" in log and "tau" not in log.split("method", 1)[1].splitlines()[0]
    assert re.search(r"device cpu \(\d+ threads?\)", log)  # the threads the run used


def test_cli_tau_rule_best_pt_is_chosen_among_epochs_at_the_final_ranks(tmp_path):
    run_tdlrt(["train", *TINY, "epochs=3", "data.val_split=64", "method=tdlrt", "tau=0.3", "method.tau_warmup_epochs=0",
               "cost_report=false", f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path)
    run, summary = summary_of(tmp_path)
    best = torch.load(run / "checkpoints" / "best.pt", map_location="cpu", weights_only=True)
    ranks = {name: list(r) for name, r in best["best"]["ranks"].items()}
    assert ranks == summary["ranks"]
    rows = list(csv.DictReader(io.StringIO((run / "ranks.csv").read_text())))
    last = max(int(r["epoch"]) for r in rows)
    final = {r["layer"]: [int(r["r_out"]), int(r["r_in"])] for r in rows if int(r["epoch"]) == last}
    assert final == {name: r[:2] for name, r in ranks.items()}  # best.pt holds the final ranks
    assert summary["selected"]["epoch"] >= 1


@pytest.mark.parametrize("args, says", [
    (["method=tdlrt", "method.target_cr=90", "tau=0.2"], "tau=0.2 is not used with method.target_cr=90"),
    (["method=tdlrt", "+method.sparsity=0.5"], "method=tdlrt does not use method.sparsity"),
    (["method=tucker", "+method.ramp_end=0.3"], "method=tucker does not use method.ramp_end"),
    (["method=tdlrt", "method.ramp_end=0.3"], "method.ramp_end=0.3 is used only by the target rule"),
    (["method=tdlrt", "method.target_cr=100"], "method.target_cr=100.0 must be in (0, 100)"),
    (["method=tdlrt", "method.target_cr=90", "method.ramp_start=0.6", "method.ramp_end=0.5"],
     "0 <= ramp_start <= ramp_end <= 1"),
    (["method=tdlrt", "method.target_cr=90", "method.tau_warmup_epochs=0"],
     "method.tau_warmup_epochs=0.0 is not used by the target rule"),
    (["method=tdlrt", "method.target_cr=90", "method.convert_linear=true"], "cannot be combined with method.target_cr"),
    (["method=tdlrt", "method.target_cr=99.9", "method.r_min=4"], "method.target_cr=99.9 is out of reach"),
    (["method=tdlrt", "method.target_cr=30", "method.r_max_frac=0.5"], "is below the conv compression rate at the rank caps"),
])
def test_cli_refuses_what_the_target_rule_would_ignore_in_one_line(tmp_path, args, says):
    proc = run_tdlrt(["train", *TINY, *args, f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path, check=False)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "warning" not in line]
    assert len(lines) == 1 and says in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


TARGET = ["train", *TINY, "method=tdlrt", "method.target_cr=85", "method.augment_every=2", "method.ramp_end=1", "epochs=3",
          "deterministic=true", "lr=0.1", "cost_report=false", "checkpoint.every_n_steps=3"]


def test_cli_target_run_killed_mid_ramp_resumes_bitwise(tmp_path):
    straight, run = straight_and_resumed(TARGET, tmp_path, kill_at=7)
    assert same_final_weights(straight, run)["global_step"] == 12
    sa, sb = (json.loads((r / "summary.json").read_text()) for r in (straight, run))
    assert sa["compression_rate"] == sb["compression_rate"] and abs(sa["compression_rate"] - 85) <= 1


def test_cli_target_rule_data_parallel_replicas_stay_identical(tmp_path):
    args = [a for a in TARGET[1:] if not a.startswith(("batch_size", "checkpoint"))] + ["batch_size=32"]
    proc = torchrun(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = run_dirs(tmp_path / "outputs")
    summary = json.loads((run / "summary.json").read_text())
    dp = summary["data_parallel"]
    assert dp["world_size"] == 2 and dp["replicas_identical"]
    assert abs(summary["compression_rate"] - 85) <= 1


def test_ranks_steps_has_a_row_at_every_rank_change(tmp_path):
    import csv

    run_tdlrt(["train", *TINY, "method=tdlrt", "method.target_cr=85", "method.augment_every=1", "epochs=2",
               "log_every_n_steps=50", "cost_report=false", f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path)
    with open(tmp_path / "run" / "ranks_steps.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    by_step = {}
    for row in rows:
        by_step.setdefault(int(row["step"]), {})[row["layer"]] = (row["r_out"], row["r_in"])
    steps = sorted(by_step)
    assert len(steps) > 3  # step 0, the last step of each epoch, and the changes between (log_every is 50)
    changed = [b for a, b in zip(steps, steps[1:]) if by_step[a] != by_step[b]]
    assert len(changed) >= 2



def test_cli_dlrt_takes_the_target_rule_too(tmp_path):
    run_tdlrt(["train", *TINY, "method=dlrt", "method.target_cr=85", "method.augment_every=2", "epochs=2",
               "cost_report=false", f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert abs(summary["compression_rate"] - 85) <= 1
    assert all(r[0] == r[1] for r in summary["ranks"].values())  # a matrix: one rank for both modes
