"""scripts/gpu_check.sh --dry-run: the GPU check's whole sequence on the CPU at tiny sizes, and its output."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

STAGES = ["setup", "tests", "bench_fp32", "bench_exact", "bench_bf16", "bench_graph", "train_dense", "train_tdlrt"]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "GPU_CHECK_COMMIT": "0" * 40}
    env.pop("OUT", None)
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:] + (out / "gpu_check.log").read_text()[-3000:]
    return out


def test_json_holds_every_figure(dry_run):
    result = json.loads((dry_run / "gpu_check.json").read_text())
    assert set(result) == {"meta", "stages", "tests", "bench", "bench_runs", "training"}
    meta = result["meta"]
    assert {"date", "git_commit", "git_dirty", "gpu", "torch", "cuda", "python", "host", "dry_run"} <= set(meta)
    assert meta["dry_run"] is True and len(meta["git_commit"]) == 40 and meta["torch"]
    assert list(result["stages"]) == STAGES
    for name, stage in result["stages"].items():
        assert stage["status"] == "ok" and stage["exit_code"] == 0 and stage["seconds"] >= 0, (name, stage)
    assert result["tests"]["passed"] >= 1 and result["tests"]["failed"] == result["tests"]["errors"] == 0

    rows = result["bench"]
    expected = [("dense", None, None), ("tucker", 0.25, None), ("tdlrt", 0.25, 1), ("tdlrt", 0.25, 4),
                ("tucker", 0.1, None), ("tdlrt", 0.1, 1), ("tdlrt", 0.1, 4)]
    for stage in ("bench_fp32", "bench_bf16"):
        assert [(r["method"], r["rank_frac"], r["augment_every"]) for r in rows if r["stage"] == stage] == expected
    exact = [(r["method"], r["spectra"]) for r in rows if r["stage"] == "bench_exact"]
    assert exact == [("dense", None), ("tucker", None), ("tdlrt", "exact")]
    graph = [(r["method"], r["augment_every"]) for r in rows if r["stage"] == "bench_graph"]
    assert graph == [("dense", None), ("tucker", None), ("tdlrt", 1), ("tucker", None), ("tdlrt", 1)]  # no graph on CPU
    assert len(rows) == 2 * len(expected) + 3 + 5
    for r in rows:
        assert r["ms_per_step"] > 0 and r["ms_iqr"] >= 0 and r["ratio_vs_dense"] > 0
        assert (r["truncation_share"] is not None) == (r["method"] == "tdlrt")
        assert r["precision"] == ("bf16" if r["stage"] in ("bench_bf16", "bench_graph") else "fp32")
    assert [(run["stage"], run["spectra"]) for run in result["bench_runs"]] == [
        ("bench_fp32", "fast"), ("bench_exact", "exact"), ("bench_bf16", "fast"), ("bench_graph", "fast")]

    training = {r["method"]: r for r in result["training"]}
    assert set(training) == {"dense", "tdlrt"}
    for r in training.values():
        assert r["model"] == "lenet5" and r["data"] == "synthetic" and r["epochs"] == 2
        assert 0 <= r["test_acc"] <= 100 and r["ms_per_step"] > 0
    assert training["tdlrt"]["compression_rate"] > 0 == training["dense"]["compression_rate"]


def test_markdown_tables(dry_run):
    md = (dry_run / "gpu_check.md").read_text()
    lines = md.splitlines()
    assert lines[0] == "# tdlrt gpu_check (dry run, CPU, tiny sizes)"
    commit = json.loads((dry_run / "gpu_check.json").read_text())["meta"]["git_commit"]
    assert "- GPU: none" in lines and any(line.startswith(f"- git commit: {commit}") for line in lines)
    for name in STAGES:
        assert f"| {name} | ok | 0 |" in md
    header = ("| precision | method | spectra | ranks | augment_every | ms/step (median) | IQR ms | vs dense "
              "| vs dense graph | truncation share | truncation ms | peak MiB | c.r. % |")
    start = lines.index(header)
    bench_rows = [line for line in lines[start + 2:] if line.startswith("| ")]
    bench_rows = bench_rows[:bench_rows.index(next(r for r in bench_rows if r.startswith("| method")))]
    assert len(bench_rows) == 22 and all(len(row.split("|")) == 15 for row in bench_rows)
    assert bench_rows[2].startswith("| fp32 | tdlrt | fast | 25% | 1 |")
    assert bench_rows[9].startswith("| fp32 | tdlrt | exact | 25% | 1 |")
    assert bench_rows[10].startswith("| bf16 | dense | - |")
    assert any(line.startswith("| dense | lenet5 | synthetic | 2 |") for line in lines)
    assert any(line.startswith("| tdlrt | lenet5 | synthetic | 2 |") for line in lines)
    assert (dry_run / "gpu_check.log").read_text().count("== ") == len(STAGES)


def test_bad_argument_is_refused(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--fast"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown argument --fast" in proc.stderr
