"""Bad input through the real CLI: each ends with exit status 2 and exactly one line on stderr,
`tdlrt: error: ...`, naming what is wrong, without a traceback; files a run wrote before are untouched."""
import pickle
import sys

import pytest
import torch

from conftest import TINY, run_tdlrt


def one_error_line(tmp_path, args, *needles, base=TINY):
    proc = run_tdlrt(["train", *base, *args], tmp_path, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("tdlrt: error: "), proc.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0]
    assert not list(tmp_path.rglob("*.pt")) or any("ckpt" in a or "resume" in a for a in args)
    assert not (tmp_path / "outputs").exists(), "a refused command left a run folder behind"
    return lines[0]


def test_unknown_model(tmp_path):
    one_error_line(tmp_path, ["model=resnet99"], "unknown model 'resnet99'", "vgg16", "lenet5")


def test_unknown_data(tmp_path):
    one_error_line(tmp_path, ["data=imagenet21k"], "unknown data 'imagenet21k'", "cifar10")


def test_unknown_method(tmp_path):
    one_error_line(tmp_path, ["method=magic"], "unknown method 'magic'", "tdlrt", "dense")


def test_unknown_optimizer(tmp_path):
    one_error_line(tmp_path, ["optimizer=lion"], "unknown optimizer 'lion'", "sgd", "adamw")


def test_unknown_scheduler(tmp_path):
    one_error_line(tmp_path, ["scheduler=warmup"], "unknown scheduler 'warmup'", "cosine")


def test_tau_zero(tmp_path):
    one_error_line(tmp_path, ["method=tdlrt", "tau=0"], "tau=0", "must be in (0, 1)")


def test_tau_one(tmp_path):
    one_error_line(tmp_path, ["method=tdlrt", "tau=1.0"], "tau=1.0", "must be in (0, 1)")


def test_r_min_above_r_max(tmp_path):
    one_error_line(tmp_path, ["method=tdlrt", "method.r_min=8", "method.r_max=4"],
                   "method.r_min=8 is larger than method.r_max=4")


def test_rank_larger_than_the_layer(tmp_path):
    # the 1/8-width VGG16's second conv has 8 channels
    one_error_line(tmp_path, ["method=tdlrt", "method.init_rank=100"], "init_rank=100 is larger than the layer",
                   "features.3", "size 8")


def test_batch_size_zero(tmp_path):
    one_error_line(tmp_path, ["batch_size=0"], "batch_size=0 must be > 0")


def test_negative_epochs(tmp_path):
    one_error_line(tmp_path, ["epochs=-1"], "epochs=-1 must be >= 0")


def test_value_of_the_wrong_type(tmp_path):
    one_error_line(tmp_path, ["lr=fast"], "lr", "'fast'")


def test_missing_data_with_download_off(tmp_path):
    nowhere = tmp_path / "nowhere"
    one_error_line(tmp_path, [f"data.root={nowhere}", "data.download=false"], str(nowhere), "data.download=true",
                   base=["model=lenet5", "data=mnist", "epochs=1", "device=cpu"])


def test_unreadable_data_files(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        (folder / name).write_bytes(pickle.dumps({"data": "not images"}))
    one_error_line(tmp_path, [f"data.root={tmp_path}", "data.download=false"], "cannot read", "data_batch_1",
                   base=["model=vgg16", "data=cifar10", "epochs=1", "device=cpu"])


def test_image_size_the_model_cannot_take(tmp_path):
    one_error_line(tmp_path, ["model=alexnet", "data.image_size=16"], "model=alexnet needs images of at least 32x32",
                   "16x16")


def test_cuda_without_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    one_error_line(tmp_path, ["device=cuda"], "device=cuda but no CUDA GPU is visible")


def test_unknown_device(tmp_path):
    one_error_line(tmp_path, ["device=tpu"], "device=tpu is not one of")


def test_checkpoint_missing(tmp_path):
    one_error_line(tmp_path, [f"ckpt_path={tmp_path / 'gone.pt'}"], "checkpoint not found", "gone.pt")


def test_checkpoint_corrupt(tmp_path):
    bad = tmp_path / "last.pt"
    bad.write_bytes(b"not a checkpoint")
    one_error_line(tmp_path, [f"ckpt_path={bad}"], "cannot read checkpoint", str(bad))
    assert bad.read_bytes() == b"not a checkpoint"


def test_checkpoint_from_another_model(tmp_path):
    """A checkpoint written under another config is refused before anything is written, naming the keys."""
    from tdlrt_cli.checkpoint import save_checkpoint
    from tdlrt_cli.launch import Composer, train_config

    with Composer() as compose:
        config = train_config(compose([*TINY, "method=tdlrt", "model=lenet5"]))
    other = tmp_path / "elsewhere" / "last.pt"
    save_checkpoint({"model_name": "lenet5", "method": "tdlrt", "epoch": 1, "global_step": 4, "model": {},
                     "optimizer": {}, "scheduler": {}, "rng": {}, "config": config}, other)
    before = other.read_bytes()
    one_error_line(tmp_path, ["method=tdlrt", f"ckpt_path={other}"], "would change what is trained",
                   'model.name "lenet5" -> "vgg16"')
    assert other.read_bytes() == before and not (tmp_path / "outputs").exists()


def test_checkpoint_without_config(tmp_path):
    from tdlrt_cli.checkpoint import save_checkpoint

    other = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint({"model_name": "lenet5", "method": "tdlrt", "epoch": 1, "model": {}}, other)
    one_error_line(tmp_path, [f"resume={other}"], "holds no run configuration", str(other))


def test_unknown_key(tmp_path):
    line = one_error_line(tmp_path, ["lrr=0.1"], "unknown option 'lrr'", "did you mean lr=0.1?")
    assert "+lrr" not in line  # tdlrt's schema takes no new key: +lrr=0.1 would fail too


def test_unknown_nested_key(tmp_path):
    line = one_error_line(tmp_path, ["method.tau_max=0.5"], "unknown option 'method.tau_max'", "no such config key")
    assert "+method.tau_max" not in line and "did you mean" not in line  # nothing close enough to suggest


@pytest.mark.parametrize("args, meant", [
    (["target_cr=90"], "did you mean method.target_cr=90?"),  # a key of a group, given at the top level
    (["width_mult=0.5"], "did you mean model.width_mult=0.5?"),
    (["val_split=0.2"], "did you mean data.val_split=0.2?"),
    (["warmup_epochs=2"], "did you mean scheduler.warmup_epochs=2?"),
    (["model.val_split=0.2"], "did you mean data.val_split=0.2?"),  # ... or under the wrong group
    (["method.target_c=90"], "did you mean method.target_cr=90?"),  # misspelt: the closest key, the value typed
    (["widht_mult=0.25"], "did you mean model.width_mult=0.25?"),
    (["+target_cr=90"], "did you mean method.target_cr=90?"),  # the old advice, +key, is refused the same way
    (["name=lenet5"], "did you mean model.name=lenet5, data.name=lenet5, method.name=lenet5, "
                      "optimizer.name=lenet5 or scheduler.name=lenet5?"),  # several groups: all listed
], ids=lambda v: v[0] if isinstance(v, list) else None)
def test_unknown_key_suggests_the_full_key(tmp_path, args, meant):
    line = one_error_line(tmp_path, args, f"unknown option '{args[0].lstrip('+').split('=')[0]}'", meant)
    assert "adds a new one" not in line and " +" not in line


def test_key_of_another_preset_names_the_presets_that_have_it(tmp_path):
    line = one_error_line(tmp_path, ["method=tdlrt", "method.sparsity=0.9"], "unknown option 'method.sparsity'",
                          "the chosen method preset has no sparsity", "method=grasp, imp or snip")
    assert "+method.sparsity" not in line  # +method.sparsity=0.9 is refused with method=tdlrt


def test_unknown_hydra_key_keeps_the_plus_advice(tmp_path):
    """Parts of Hydra's own configuration take new keys (+hydra.job.env_set.X=1 works); tdlrt's schema none."""
    one_error_line(tmp_path, ["hydra.job.env_set.TDLRT_X=1"], "unknown option 'hydra.job.env_set.TDLRT_X'",
                   "+hydra.job.env_set.TDLRT_X=... adds a new one")


@pytest.mark.parametrize("args, needle", [
    (["method=tdlrt", "method.target_cr=0.9"], "method.target_cr=0.9 is a percentage: did you mean method.target_cr=90?"),
    (["method=tucker", "method.target_cr=0.95"],
     "method.target_cr=0.95 is a percentage: did you mean method.target_cr=95?"),
    (["method=tucker_prune", "method.target_cr=0.5"],
     "method.target_cr=0.5 is a percentage: did you mean method.target_cr=50?"),
], ids=lambda v: v[0] if isinstance(v, list) else None)
def test_fraction_where_a_percentage_belongs(tmp_path, args, needle):
    line = one_error_line(tmp_path, args, needle, "of the conv parameters removed, 0-100")
    assert "rank cap" not in line


@pytest.mark.parametrize("args, needle", [
    (["method=tdlrt", "method.r_max_frac=50"], "method.r_max_frac=50 is a fraction (0-1]: did you mean "
                                               "method.r_max_frac=0.5?"),
    (["method=tdlrt", "method.init_rank_frac=30"], "method.init_rank_frac=30 is a fraction (0-1]: did you mean "
                                                   "method.init_rank_frac=0.3?"),
    (["method=tdlrt", "method.target_cr=90", "method.ramp_end=75"],
     "method.ramp_end=75 is a fraction [0-1]: did you mean method.ramp_end=0.75?"),
    (["method=tucker", "method.target_cr=null", "method.rank_frac=25"],
     "method.rank_frac=25 is a fraction (0-1]: did you mean method.rank_frac=0.25?"),
    (["method=snip", "tau=null", "method.sparsity=90"],
     "method.sparsity=90 is a fraction (0-1): did you mean method.sparsity=0.9?"),
    (["scheduler=onecycle", "scheduler.pct_start=30"],
     "scheduler.pct_start=30 is a fraction (0-1): did you mean scheduler.pct_start=0.3?"),
    (["data.val_split=12.5"], "12.5% is data.val_split=0.125"),  # (a whole 10 is ten examples: not refused)
    (["method=tdlrt", "method.r_max_frac=150"], "method.r_max_frac=150.0 must be in (0, 1]"),  # no percentage
    (["method=snip", "tau=null", "method.sparsity=100"], "method.sparsity=100.0 must be in (0, 1)"),  # 1.0 neither
], ids=lambda v: v[-1] if isinstance(v, list) else None)
def test_percentage_where_a_fraction_belongs(tmp_path, args, needle):
    one_error_line(tmp_path, args, needle)


def test_tau_with_a_method_that_has_none(tmp_path):
    one_error_line(tmp_path, ["method=dense", "tau=0.1"], "tau=0.1 applies to method=tdlrt or dlrt only")


def test_override_that_does_not_parse(tmp_path):
    one_error_line(tmp_path, ["tau=[0.1"], "cannot parse the command line")


def test_debug_switch_shows_the_traceback(tmp_path):
    import os
    import subprocess

    env = {**os.environ, "TDLRT_DEBUG": "1"}
    proc = subprocess.run([sys.executable, "-m", "tdlrt_cli", "train", *TINY, "batch_size=0"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "batch_size=0 must be > 0" in proc.stderr


@pytest.mark.parametrize("split, needle", [("-1", "data.val_split=-1.0 must be 0 (none), a fraction"),
                                           ("2.5", "data.val_split=2.5 must be 0 (none), a fraction"),
                                           ("256", "data.val_split=256.0 holds out 256 of the 256 training"),
                                           ("0.001", "data.val_split=0.001 holds out 0 of the 256")])
def test_validation_split_out_of_range(tmp_path, split, needle):
    one_error_line(tmp_path, [f"data.val_split={split}"], needle)


def test_tolerance_warmup_out_of_range(tmp_path):
    one_error_line(tmp_path, ["method=tdlrt", "method.tau_warmup_epochs=-1"], "method.tau_warmup_epochs=-1")


@pytest.mark.parametrize("args, needle", [
    (["scheduler=step", "scheduler.step_size=0"], "scheduler.step_size=0 must be >= 1"),
    (["scheduler=onecycle", "scheduler.pct_start=2"], "scheduler.pct_start=2 is a fraction (0-1)"),
    (["scheduler=plateau", "scheduler.factor=2"], "scheduler.factor=2.0 must be in (0, 1)"),
    (["optimizer=adam", "optimizer.eps=-1"], "optimizer.eps=-1.0 must be > 0"),
    (["seed=100000000000000000000"], "seed="),
    (["data.num_classes=0"], "data.num_classes=0 must be >= 2"),
    (["data.num_classes=1"], "data.num_classes=1 must be >= 2"),
    (["data.channels=0"], "data.channels=0 must be >= 1"),
    (["data.train_size=0"], "data.train_size=0"),
    (["scheduler.min_lr=1.0", "lr=0.1"], "scheduler.min_lr=1.0 must be in [0, lr=0.1]"),
    (["scheduler.warmup_epochs=-1"], "scheduler.warmup_epochs=-1 must be >= 0"),
    (["method=tdlrt", "method.finetune_epochs=5", "epochs=2"], "method.finetune_epochs=5 must be in [0, epochs=2]"),
    (["task_name=../../x"], "task_name='../../x' must be a plain folder name"),
], ids=lambda v: v[-1] if isinstance(v, list) else None)
def test_values_that_used_to_crash_or_train_garbage(tmp_path, args, needle):
    """(Hydra still creates the run folder, and its .hydra files, before this validation runs: issue 12.)"""
    one_error_line(tmp_path, args, needle)
