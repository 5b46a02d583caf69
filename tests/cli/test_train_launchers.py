"""Hydra launcher configs through the real CLI: a local parallel (joblib) sweep runs each job in its own folder."""
import pytest

from conftest import TINY, run_dirs, run_tdlrt

pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
pytest.importorskip("hydra_plugins.hydra_joblib_launcher")


def test_local_parallel_sweep_runs_each_job_in_its_own_folder(tmp_path):
    args = [a for a in TINY if not a.startswith("epochs")] + ["epochs=0", "method=dense"]
    run_tdlrt(["train", "-m", "hydra/launcher=local", *args, "seed=0,1"], tmp_path)
    runs = run_dirs(tmp_path / "outputs")
    assert [r.name for r in runs] == ["0", "1"] and all((r / "summary.json").is_file() for r in runs)
