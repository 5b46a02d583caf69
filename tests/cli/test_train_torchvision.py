"""`tdlrt train model=torchvision` through the real CLI: a torchvision ResNet-18 started from "published" weights
that the test writes into $TORCH_HOME, trained with the target rule, then exported and evaluated without the
weights file; the target rule counting linear layers (method.convert_linear); bad model choices."""
import json
import os

import pytest
import torch
import torchvision

from conftest import one_line, run_tdlrt

SMALL = ["data=synthetic", "data.train_size=128", "data.test_size=64", "batch_size=64", "eval_batch_size=64",
         "epochs=1", "progress=false", "device=cpu", "cost_report=false"]


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("tv")
    home = base / "torch"
    weights = torchvision.models.get_model_weights("resnet18").DEFAULT
    path = home / "hub" / "checkpoints" / os.path.basename(weights.url)
    path.parent.mkdir(parents=True)
    torch.manual_seed(3)
    torch.save(torchvision.models.resnet18().state_dict(), path)
    proc = run_tdlrt(["train", "model=torchvision", "model.arch=resnet18", "model.weights=DEFAULT", *SMALL,
                      "method=tdlrt", "method.target_cr=80", "hydra.run.dir=run"], base, env={"TORCH_HOME": str(home)})
    return base, base / "run", proc


def test_the_start_block_names_the_network_and_what_became_low_rank(resnet_run):
    _, run, proc = resnet_run
    lines = proc.stderr.splitlines()
    assert "model torchvision resnet18 (weights DEFAULT)" in lines[1], lines[1]
    layers = next(line for line in lines if line.startswith("  layers: "))
    # 16 3x3 convs (Tucker), 3 1x1 shortcuts (the order-2 case), the stem and the classifier dense
    assert layers.startswith("  layers: low-rank Tucker conv x16, matrix conv x3 | dense conv x1, linear x1 | the "
                             "target counts conv kernels"), layers
    summary = json.loads((run / "summary.json").read_text())
    assert summary["compression_rate"] == pytest.approx(80, abs=0.5)


def test_export_and_eval_need_no_weights_file(resnet_run, tmp_path):
    base, run, _ = resnet_run
    offline = {"TORCH_HOME": str(tmp_path / "empty"), "https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}
    run_tdlrt(["export", str(run), f"out={tmp_path / 'net.pt2'}", "repeat=2"], tmp_path, env=offline)
    summary = json.loads((run / "summary.json").read_text())
    for name, source in (("run", run), ("export", tmp_path / "net.pt2")):
        run_tdlrt(["eval", str(source), "latency=false", f"out={tmp_path / name}.json"], tmp_path, env=offline)
        assert json.loads((tmp_path / f"{name}.json").read_text())["test_acc"] == pytest.approx(summary["test_acc"])
    assert not (tmp_path / "empty").exists() or not any((tmp_path / "empty").rglob("*.pth"))


def test_convert_linear_puts_the_linear_layers_under_the_target(tmp_path):
    proc = run_tdlrt(["train", "model=torchvision", "model.arch=mobilenet_v3_small", *SMALL, "method=tdlrt",
                      "method.target_cr=80", "method.convert_linear=true", "hydra.run.dir=run"], tmp_path)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["compression_rate_weights"] == pytest.approx(80, abs=0.5)
    assert summary["compression_rate"] < 75  # its convs alone are compressed less: the linears carry more
    assert "target counts conv kernels and linear weights" in proc.stderr
    assert f"(conv and linear {summary['compression_rate_weights']:.1f}%, whole network" in proc.stderr.splitlines()[-1]


@pytest.mark.parametrize("args,says", [
    (["model=torchvision", "model.arch=resnet500"], "did you mean resnet50"),
    (["model=torchvision", "model.arch=resnet18", "model.width_mult=0.5"], "scales the built-in networks only"),
    (["model=vgg16", "model.arch=resnet18"], "it is a key of model=torchvision"),
])
def test_bad_model_choices_are_one_line_and_write_nothing(tmp_path, args, says):
    proc = run_tdlrt(["train", *args, *SMALL, "hydra.run.dir=run"], tmp_path, check=False)
    one_line(proc, says)
    assert not (tmp_path / "run").exists()


def test_imagefolder_at_imagenet_resolution_trains_and_evaluates(tmp_path):
    from test_train_data_bad_input import image_tree

    root = image_tree(tmp_path / "images", n=4)
    args = ["model=torchvision", "model.arch=mobilenet_v3_small", "data=imagefolder", f"data.root={root}",
            "data.image_size=160", "data.num_workers=0", "batch_size=4", "eval_batch_size=8", "epochs=1",
            "progress=false", "device=cpu", "cost_report=false", "method=tdlrt", "method.target_cr=80"]
    run_tdlrt(["train", *args, "hydra.run.dir=run"], tmp_path)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["config"]["data"]["crop"] == "auto" and summary["config"]["data"]["image_size"] == 160
    run_tdlrt(["eval", str(tmp_path / "run"), "latency=false", f"out={tmp_path / 'eval.json'}"], tmp_path)
    assert json.loads((tmp_path / "eval.json").read_text())["test_acc"] == pytest.approx(summary["test_acc"])
