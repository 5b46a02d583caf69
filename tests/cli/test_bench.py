"""`tdlrt bench` through the real CLI, tiny sizes: every method and ratio, the table, --help, and the JSON's
median, IQR and truncation time (timings are printed, never held to a figure)."""
import json

from conftest import run_tdlrt

CHEAP = ["model=lenet5", "image_size=28", "channels=1", "batch_size=4", "steps=1", "warmup=0",
         "rank_fracs=[0.5]", "augment_every=[1]", "device=cpu"]


def test_bench_json_has_every_method_and_ratio(tmp_path):
    proc = run_tdlrt(["bench", "model=vgg16", "model.width_mult=0.125", "batch_size=8", "steps=2", "warmup=1",
                      "rank_fracs=[0.25]", "augment_every=[1,2]", "device=cpu", "format=json"], tmp_path)
    out = json.loads(proc.stdout)
    methods = [(r["method"], r["augment_every"]) for r in out["results"]]
    assert methods == [("dense", None), ("tucker", None), ("tdlrt", 1), ("tdlrt", 2)]
    for r in out["results"]:
        for key in ("method", "augment_every", "ms_per_step", "ratio_vs_dense", "ratio_vs_dense_graph",
                    "truncation_share", "peak_mem_mib", "compression_rate", "flops_forward", "flops_train"):
            assert key in r
        assert r["ms_per_step"] > 0 and r["flops_train"] > r["flops_forward"] > 0
    dense, tucker, tdlrt1, tdlrt2 = out["results"]
    assert dense["ratio_vs_dense"] == 1.0 and dense["compression_rate"] == 0
    assert tucker["compression_rate"] == tdlrt1["compression_rate"] > 80  # pinned ranks: like with like
    assert tucker["flops_forward"] < 0.3 * dense["flops_forward"]
    assert 0 < tdlrt1["truncation_share"] < 1
    for r in (tdlrt1, tdlrt2):  # the columns of a row come from the same steps
        assert r["truncation_ms"] < r["ms_per_step"] * r["augment_every"]
    assert not list(tmp_path.iterdir())  # bench writes no files


def test_bench_table_and_bad_input(tmp_path):
    proc = run_tdlrt(["bench", "model=lenet5", "image_size=28", "channels=1", "batch_size=8", "steps=1",
                      "warmup=0", "rank_fracs=[0.5]", "augment_every=[1]", "device=cpu"], tmp_path)
    assert "| tdlrt | 50% | 1 |" in proc.stdout and "lenet5" in proc.stdout
    bad = run_tdlrt(["bench", "rank_fracs=[0.9]", "device=cpu"], tmp_path, check=False)
    assert bad.returncode == 2 and "rank_fracs" in bad.stderr and "Traceback" not in bad.stderr


def test_bench_help_lists_every_key(tmp_path):
    from dataclasses import asdict

    from tdlrt_cli.bench import BENCH_HELP, BenchConfig
    from tdlrt_cli.config import flatten

    keys = set(flatten(asdict(BenchConfig())))
    assert keys == set(BENCH_HELP)
    out = run_tdlrt(["bench", "--help"], tmp_path).stdout
    assert out.startswith("usage: tdlrt bench") and all(f"  {k}=" in out for k in keys)


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
