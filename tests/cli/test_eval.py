"""`tdlrt eval` through the real CLI: accuracy and costs of a run and of its export (and on another test set),
latency as median and IQR, and train's name for the repetitions."""
import json

import pytest
import torch

from conftest import run_tdlrt


def test_eval_reports_accuracy_and_costs_for_run_and_export(trained_run_with_linear, tmp_path):
    out = tmp_path / "net.pt2"
    run_tdlrt(["export", str(trained_run_with_linear), f"out={out}", "merge=chain", "repeat=2"], tmp_path)
    reports = {}
    for name, source in (("run", trained_run_with_linear), ("export", out)):
        run_tdlrt(["eval", str(source), "repeat=2", f"out={tmp_path / name}.json"], tmp_path)
        reports[name] = json.loads((tmp_path / f"{name}.json").read_text())
    summary = json.loads((trained_run_with_linear / "summary.json").read_text())
    assert reports["run"]["test_acc"] == pytest.approx(summary["test_acc"])
    assert reports["export"]["test_acc"] == pytest.approx(summary["test_acc"])  # the same function
    for report in (reports["run"]["cost"], reports["export"]["cost"], summary["cost"]):
        timed = report is not summary["cost"]  # a training run times nothing unless cost_latency=true
        for side in ("dense", "lowrank"):
            for key in ("flops_forward", "peak_memory_inference_mb", "latency_ms_batch1", "latency_ms_batch128"):
                assert report[side][key] > 0 if timed or not key.startswith("latency") else key not in report[side]
        assert report["lowrank"]["flops_forward"] < report["dense"]["flops_forward"]
        assert 0 < report["parameters"]["compression_rate"] < 100
    # the chain export keeps the factorised parameter count (BatchNorm folded adds a bias per conv at most)
    run_p, exp_p = reports["run"]["cost"]["parameters"], reports["export"]["cost"]["parameters"]
    assert abs(exp_p["conv_params"] - run_p["conv_params"]) <= 0.02 * run_p["conv_params"]
    assert summary["cost"]["lowrank"]["flops_train"] < summary["cost"]["dense"]["flops_train"]
    # another test set: data=NAME and data.KEY=VALUE override the run's data config
    run_tdlrt(["eval", str(trained_run_with_linear), "data=synthetic", "data.limit_test=100", "latency=false",
               f"out={tmp_path / 'subset.json'}"], tmp_path)
    subset = json.loads((tmp_path / "subset.json").read_text())
    assert subset["test_examples"] == 100 and subset["data"] == "synthetic" and "dense" not in subset["cost"]


def test_eval_reports_latency_median_and_iqr(trained_run, tmp_path):
    state = torch.load(trained_run / "checkpoints" / "last.pt", weights_only=True)
    del state["rng"]  # eval needs the weights and the config, not the random generators
    torch.save(state, tmp_path / "no_rng.pt")
    proc = run_tdlrt(["eval", str(tmp_path / "no_rng.pt"), "repeat=3", f"out={tmp_path / 'r.json'}"], tmp_path)
    cost = json.loads((tmp_path / "r.json").read_text())["cost"]
    for side in ("dense", "lowrank"):
        for b in (1, 128):
            assert cost[side][f"latency_ms_batch{b}"] > 0 and cost[side][f"latency_iqr_ms_batch{b}"] >= 0
    assert "median [IQR]" in proc.stdout


def test_eval_takes_trains_name_for_the_repetitions(trained_run, tmp_path):
    """`tdlrt train` says cost_repeat=, `tdlrt eval` repeat=: eval takes both."""
    proc = run_tdlrt(["eval", str(trained_run), "cost_repeat=2", f"out={tmp_path / 'r.json'}"], tmp_path)
    assert "median [IQR]" in proc.stdout
    bad = run_tdlrt(["eval", str(trained_run), "cost_repeat=-1"], tmp_path, check=False)
    assert bad.returncode == 2 and "cost_repeat=-1 must be >= 1" in bad.stderr
