"""The config tree through Hydra's compose API, validated against the dataclass schemas."""
import pytest
from omegaconf import OmegaConf

from conftest import make
from tdlrt_cli.config import ConfigError, from_dictconfig


def test_default_is_tdlrt_vgg16_on_cifar10():
    cfg = from_dictconfig(make())
    assert (cfg.model.name, cfg.data.name, cfg.method.name, cfg.optimizer.name) == ("vgg16", "cifar10", "tdlrt", "sgd")
    assert cfg.tau == 0.1 and cfg.method.r_max_frac == 0.5 and cfg.method.augment_every == 1


@pytest.mark.parametrize("group, options", [
    ("model", ["vgg16", "resnet18", "alexnet", "lenet5"]),
    ("data", ["cifar10", "cifar100", "mnist", "fashion_mnist", "synthetic"]),
    ("method", ["dense", "tdlrt"]),
    ("optimizer", ["sgd", "adam", "adamw"]),
    ("scheduler", ["cosine", "onecycle", "step", "plateau", "none"]),
])
def test_every_group_option_composes_and_validates(group, options):
    for option in options:
        extra = ["tau=null"] if group == "method" and option == "dense" else []
        cfg = from_dictconfig(make([f"{group}={option}", *extra]))
        assert getattr(cfg, group).name == option


def test_imagefolder_needs_a_root():
    with pytest.raises(ConfigError, match="data.root"):
        from_dictconfig(make(["data=imagefolder"]))
    cfg = from_dictconfig(make(["data=imagefolder", "data.root=/some/dir"]))
    assert cfg.data.train_dir == "train" and cfg.data.test_dir == "val"


def test_dense_method_has_no_tau():
    cfg = from_dictconfig(make(["method=dense"]))
    assert cfg.tau is None
    with pytest.raises(ConfigError, match="applies to method=tdlrt or dlrt only"):
        from_dictconfig(make(["method=dense", "tau=0.2"]))


def test_top_level_keys_users_type():
    cfg = from_dictconfig(make(["model=resnet18", "method=dense", "optimizer=adamw", "lr=0.001", "weight_decay=0.05",
                                "momentum=0.8", "epochs=3", "batch_size=32", "seed=4", "device=cpu",
                                "precision=bf16", "data.limit_train=100", "data.limit_test=50", "data.root=/tmp/x",
                                "data.download=false", "ckpt_path=/tmp/a.pt"]))
    assert (cfg.lr, cfg.weight_decay, cfg.momentum, cfg.epochs, cfg.batch_size, cfg.seed) == (0.001, 0.05, 0.8, 3, 32, 4)
    assert (cfg.device, cfg.precision, cfg.ckpt_path) == ("cpu", "bf16", "/tmp/a.pt")
    assert (cfg.data.limit_train, cfg.data.limit_test, cfg.data.root, cfg.data.download) == (100, 50, "/tmp/x", False)


def test_quick_experiment_preset():
    cfg = from_dictconfig(make(["+experiment=quick"]))
    assert (cfg.model.name, cfg.data.name, cfg.epochs, cfg.data.limit_train) == ("lenet5", "mnist", 3, 2000)
    assert (cfg.method.name, cfg.method.target_cr, cfg.tau, cfg.method.augment_every) == ("tdlrt", 90.0, None, 10)
    dense = from_dictconfig(make(["+experiment=quick", "method=dense"]))  # the same run, dense
    assert (dense.method.name, dense.method.target_cr, dense.epochs) == ("dense", None, 3)


@pytest.mark.parametrize("overrides, message", [
    (["lr=0"], "lr=0.0 must be > 0"),
    (["epochs=-1"], "epochs=-1 must be >= 0"),
    (["precision=fp16"], "precision=fp16 is not one of"),
    (["device=tpu"], "device=tpu is not one of"),
    (["tau=0"], "tau=0.0 must be in (0, 1)"),
    (["method.adapted_modes=some"], "method.adapted_modes=some is not one of"),
    (["method.augment_every=0"], "method.augment_every=0 must be >= 1"),
    (["data.limit_train=0"], "data.limit_train=0 must be a positive number"),
    (["batch_size=ten"], "invalid config at batch_size"),
    (["batch_size=0"], "batch_size=0 must be > 0"),
    (["method.r_min=8", "method.r_max=4"], "method.r_min=8 is larger than method.r_max=4"),
    (["method=tucker", "method.rank_frac=0.2"], "needs exactly one of method.rank_frac and method.target_cr"),
    (["method=snip", "method.sparsity=1.0"], "method.sparsity=1.0 must be in (0, 1)"),
    (["method=imp", "epochs=1"], "method.rewind_epoch=1 below epochs"),
])
def test_bad_values_raise_one_clear_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        from_dictconfig(make(overrides))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_config_is_plain_yaml_serialisable():
    cfg = make()
    OmegaConf.to_yaml(cfg)
    assert "hydra" not in OmegaConf.to_container(cfg)


def test_threads_default_and_setting():
    """threads: given, else $OMP_NUM_THREADS, else half the cores (at most 8)."""
    from tdlrt_cli.runtime import resolve_threads
    import os

    assert resolve_threads(3) == 3
    old = os.environ.get("OMP_NUM_THREADS")
    try:
        os.environ["OMP_NUM_THREADS"] = "2"
        assert resolve_threads(None) == 2
        os.environ.pop("OMP_NUM_THREADS")
        assert 1 <= resolve_threads(None) <= 8
    finally:
        if old is not None:
            os.environ["OMP_NUM_THREADS"] = old


@pytest.mark.parametrize("value", [None, True, False, 0, 3, -2, 0.05, 1e-4, "plain", "a b", "null", "true", "1e3",
                                   "it's", "c:\\dir\\", "/x/a,b=c", "ä", [0.485, 0.456, 0.406], ["a,b", "c"], [],
                                   [1, [2, 3]]])
def test_a_config_value_written_as_an_override_reads_back_as_itself(value):
    """Resume carries saved keys and compress passes a run's model and data keys on as overrides: a list must
    stay a list (not the string of one), a string that looks like a number or null must stay a string."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from tdlrt_cli.files import override_value

    parsed = OverridesParser.create().parse_override(f"key={override_value(value)}").value()
    assert parsed == value and type(parsed) is type(value)
