"""Quick versions of the paper's experiment presets through the real CLI, and `tdlrt report` on them."""
import csv
import json

import numpy as np
import pytest

from conftest import run_dirs, run_tdlrt
from tdlrt_cli.families import DENSE, FIXED_RANK, PRUNING, RANK_ADAPTIVE

TINY = ["data=synthetic", "data.train_size=64", "data.test_size=32", "batch_size=32", "eval_batch_size=64",
        "model.width_mult=0.125", "device=cpu", "progress=false"]
TINY_MNIST = ["data=synthetic", "data.image_size=28", "data.channels=1", "data.train_size=64", "data.test_size=32",
              "batch_size=32", "device=cpu", "progress=false"]


def sweep(tmp_path, args):
    run_tdlrt(["train", "-m", *args], tmp_path)
    return [json.loads((r / "summary.json").read_text()) for r in run_dirs(tmp_path / "outputs")]


def make_imagefolder(root, classes=3, per_class=4, size=20):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(d / f"{i}.png")


QUICK = {
    "cifar10_table": TINY + ["model=vgg16", "seed=0", "epochs=2",
                             "+variant=dense,tdlrt_tau0.1,dlrt_tau0.1,tucker_cr90,cp_cr90,tt_cr90,matrix_cr90,"
                             "snip_s90,grasp_s90,imp_s90"],
    "tau_sweep": TINY + ["epochs=1", "seed=0,1", "+variant=tdlrt_tau0.1,tdlrt_tau0.3,tucker_cr90"],
    "rank_evolution": TINY + ["epochs=2", "tau=0.1,0.3"],
    "ill_conditioned": TINY_MNIST + ["epochs=1", "seed=0"],
    "lr_sweep": TINY + ["epochs=1", "+variant=dense,tdlrt_tau0.1", "lr=0.01,0.05"],
}


# every preset is marked slow (pytest -m slow): cifar10_table is where every method runs through the CLI (the
# default suite tests the baselines' layers in test_lowrank.py, and dense, tdlrt and imp through the CLI)
@pytest.mark.slow
@pytest.mark.parametrize("preset", list(QUICK))
def test_quick_preset_runs_and_reports(tmp_path, preset):
    summaries = sweep(tmp_path, [f"+experiment={preset}", *QUICK[preset]])
    methods = {s["config"]["method"]["name"] for s in summaries}
    if preset == "cifar10_table":
        assert methods == {*DENSE, *RANK_ADAPTIVE, *FIXED_RANK, *PRUNING}  # every method but tucker_prune
        rates = {s["config"]["method"]["name"]: s["compression_rate"] for s in summaries}
        for name in FIXED_RANK:
            assert rates[name] == pytest.approx(90, abs=1.5), name  # matched to the target rate
        for name in PRUNING:
            assert rates[name] == pytest.approx(90 * 0.99, abs=1.5), name  # 90% of all convs but the first
    if preset == "ill_conditioned":
        assert methods == {"tdlrt", "tucker", "cp"}
        assert all(s["config"]["method"]["init_decay"] == 1.0 for s in summaries)
    out = tmp_path / "report"
    proc = run_tdlrt(["report", str(tmp_path / "outputs"), f"out={out}"], tmp_path)
    assert f"{len(summaries)} runs" in proc.stdout
    for name in ("table.md", "table.csv", "table.tex"):
        assert (out / name).is_file()
    assert list(out.glob("acc_vs_cr_*.png"))
    if preset in ("rank_evolution", "cifar10_table"):
        assert list(out.glob("ranks_*.png"))
    if preset == "ill_conditioned":
        assert (out / "ill_conditioned_loss.png").is_file()
    if preset == "lr_sweep":  # one row per method and lr, never averaged across lr
        rows = list(csv.DictReader(open(out / "table.csv")))
        assert sorted((r["method"], r["lr"]) for r in rows) == [("dense", "0.01"), ("dense", "0.05"),
                                                                ("tdlrt", "0.01"), ("tdlrt", "0.05")]
    if preset == "tau_sweep":  # three settings, each averaged over its two seeds
        rows = list(csv.DictReader(open(out / "table.csv")))
        assert len(rows) == 3 and all(r["runs"] == "2" and r["seeds"] == "0 1" for r in rows)
        assert {r["tau"] for r in rows} == {"0.1", "0.3", "-"} and "seed" not in rows[0]


def test_tiny_imagenet_preset_on_class_folders(tmp_path):
    make_imagefolder(tmp_path / "tiny")
    summaries = sweep(tmp_path, ["+experiment=tiny_imagenet", f"data.root={tmp_path / 'tiny'}", "data.image_size=16",
                                 "data.num_workers=0", "batch_size=4", "eval_batch_size=8", "epochs=1",
                                 "model.width_mult=0.125", "device=cpu", "progress=false",
                                 "+variant=dense,tdlrt_tau0.1"])
    assert len(summaries) == 2
    assert all(s["config"]["model"]["name"] == "resnet18" for s in summaries)


@pytest.mark.slow
def test_full_preset_coverage(tmp_path):
    """Every model and every variant of the CIFAR-10 table preset, tiny sizes (slow: run with -m slow)."""
    summaries = sweep(tmp_path, ["+experiment=cifar10_table", *TINY, "epochs=2", "seed=0"])
    assert len(summaries) == 3 * 12
    assert {s["config"]["model"]["name"] for s in summaries} == {"alexnet", "vgg16", "resnet18"}
