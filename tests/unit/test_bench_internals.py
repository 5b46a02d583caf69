"""`tdlrt bench` called directly: timing statistics (median and IQR), the graph rows and the note on why TDLRT has
none, and graph=true as Hydra passes it."""
import pytest

from tdlrt_cli import bench


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
