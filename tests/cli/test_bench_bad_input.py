"""`tdlrt bench` argument errors through the real CLI, and what its output says about timings."""
import json

import pytest

from conftest import run_tdlrt
from tdlrt_cli import bench

CHEAP = ["model=lenet5", "image_size=28", "channels=1", "batch_size=4", "steps=1", "warmup=0",
         "rank_fracs=[0.5]", "augment_every=[1]", "device=cpu"]


@pytest.mark.parametrize("override, expected", [
    ("image_size=8", ["image_size=8", "model=vgg16", ">= 32"]),
    ("tau=2", ["tau=2", "(0, 1)"]),
    ("precision=fp16", ["precision=fp16", "fp32, bf16"]),
    ("graph=maybe", ["graph=maybe", "auto, true, false"]),
    ("batch_size=0", ["batch_size=0", ">= 1"]),
    ("steps=0", ["steps=0", ">= 1"]),
    ("spectra=approx", ["spectra=approx", "exact, fast"]),
    ("steps=many", ["steps", "could not be converted"]),
])
def test_bad_values_fail_with_one_line_naming_key_and_values(tmp_path, override, expected):
    proc = run_tdlrt(["bench", "model=vgg16", "device=cpu", "steps=1", "warmup=0", override], tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tdlrt: error: "), proc.stderr
    for text in expected:
        assert text.lower() in lines[0].lower(), (text, lines[0])
    assert "Traceback" not in proc.stderr and not proc.stdout


def test_json_reports_median_iqr_and_truncation_time(tmp_path):
    proc = run_tdlrt(["bench", *CHEAP, "steps=5", "spectra=exact", "graph=false", "format=json"], tmp_path)
    out = json.loads(proc.stdout)
    assert out["config"]["spectra"] == "exact" and out["config"]["graph"] == "false" and out["notes"] == []
    dense, tucker, tdlrt = out["results"]
    for row in out["results"]:
        assert row["ms_per_step"] > 0 and 0 <= row["ms_iqr"] < 10 * row["ms_per_step"]
    assert tdlrt["spectra"] == "exact" and dense["spectra"] is None
    assert 0 < tdlrt["truncation_share"] < 1 and tdlrt["truncation_ms"] > 0 and tdlrt["truncation_ms_iqr"] >= 0
    assert tucker["truncation_ms"] is None


def test_statistics_are_median_and_interquartile_range():
    stats = bench.timing_stats([0.001, 0.002, 0.003, 0.004, 0.1])  # one outlier
    assert stats["median"] == pytest.approx(3.0)
    assert stats["iqr"] == pytest.approx(4.0 - 2.0)


def test_graph_rows_come_with_the_reason_there_is_no_tdlrt_graph_row(monkeypatch):
    """With graph rows (graph=true), the compiled dense and Tucker rows are reported and the output says why
    TDLRT has none; the timed steps are stubbed (compilation is not what is tested here)."""
    def fake_run_one(cfg, device, method, rank_frac=None, augment_every=1, graph=False):
        return {"method": method + ("_graph" if graph else ""), "rank_frac": rank_frac,
                "augment_every": augment_every if method == "tdlrt" else None, "ms_per_step": 2.0 if graph else 4.0}

    monkeypatch.setattr(bench, "run_one", fake_run_one)
    cfg = bench.BenchConfig(device="cpu", graph="true", rank_fracs=[0.25], augment_every=[1]).validate()
    out = bench.run_bench(cfg)
    assert [r["method"] for r in out["results"]] == ["dense", "dense_graph", "tucker", "tucker_graph", "tdlrt"]
    assert out["notes"] == [bench.NO_TDLRT_GRAPH] and "cannot replay" in bench.NO_TDLRT_GRAPH
    assert out["results"][3]["ratio_vs_dense_graph"] == 1.0
    cfg = bench.BenchConfig(device="cpu", graph="false", rank_fracs=[0.25], augment_every=[1]).validate()
    assert bench.run_bench(cfg)["notes"] == []


def test_graph_true_from_the_command_line_is_understood():
    """Hydra turns graph=true into the bool True; OmegaConf stores it as the string 'True'."""
    assert bench.BenchConfig(graph="True").validate().graph == "true"
