"""Hydra launcher configs composed by Hydra's compose API: SLURM (submitit) and local parallel (joblib) sweeps."""
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import ROOT

pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
pytest.importorskip("hydra_plugins.hydra_joblib_launcher")


def compose_train(overrides):
    OmegaConf.register_new_resolver("pid", lambda: "1234", replace=True)
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


def test_slurm_launcher_config_composes():
    cfg = compose_train(["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=60",
                         "+experiment=tau_sweep"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.partition, launcher.timeout_min, launcher.gpus_per_node) == ("gpu", 60, 1)
    assert OmegaConf.to_container(launcher, resolve=True)["submitit_folder"].endswith("/.submitit/%j")


def test_slurm_launcher_rejects_unknown_keys():
    with pytest.raises(Exception, match="gpus"):
        compose_train(["hydra/launcher=slurm", "hydra.launcher.gpus=2"])


def test_local_launcher_config_composes():
    cfg = compose_train(["hydra/launcher=local", "hydra.launcher.n_jobs=3"])
    assert cfg.hydra.launcher._target_.endswith("joblib_launcher.JoblibLauncher")
    assert (cfg.hydra.launcher.n_jobs, cfg.hydra.launcher.backend) == (3, "loky")
