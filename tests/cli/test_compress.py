"""`tdlrt compress SOURCE target_cr=T epochs=E` through the real CLI: a dense run compressed to a target, the
accuracy before, after the one-shot decomposition and after fine-tuning read from the three runs' own files;
the same command again continues (finished runs skipped); torchvision weights by name as the source."""
import json
import os

import pytest
import torch
import torchvision

from conftest import TINY, one_line, run_tdlrt

SMALL = [a for a in TINY if not a.startswith("epochs")] + ["cost_report=false"]


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    base = tmp_path_factory.mktemp("compress")
    run_tdlrt(["train", *SMALL, "epochs=1", "method=dense", "hydra.run.dir=dense"], base)
    return base


@pytest.fixture(scope="module")
def compressed(dense):
    """`tdlrt compress` of the dense run to 80%, 1 epoch, into dense/../c (the process it ran as)."""
    return run_tdlrt(["compress", "dense", "target_cr=80", "epochs=1", "out=c", "device=cpu"], dense)


def test_a_dense_run_compressed_reports_each_network_from_its_runs_files(dense, compressed):
    proc = compressed
    out = dense / "c"
    result = json.loads((out / "compress.json").read_text())
    rows = {r["network"].split(" (")[0]: r for r in result["rows"]}
    summary = {s: json.loads((out / s / "summary.json").read_text()) for s in ("dense", "oneshot", "finetuned")}
    source = json.loads((dense / "dense" / "summary.json").read_text())
    assert rows["dense"]["test_acc"] == summary["dense"]["test_acc"] == source["test_acc"]  # the source itself
    assert rows["decomposed to the target"]["compression_rate"] == pytest.approx(80, abs=0.5)
    assert rows["decomposed to the target"]["test_acc"] == summary["oneshot"]["test_acc"]
    assert summary["finetuned"]["config"]["method"]["target_cr"] == 80 and summary["finetuned"]["epochs"] == 1
    assert rows["fine-tuned 1 epoch"]["compression_rate"] == pytest.approx(80, abs=0.5)
    # the source's model and data settings are taken over
    assert summary["finetuned"]["config"]["model"]["width_mult"] == 0.125
    assert summary["finetuned"]["config"]["data"]["train_size"] == 256
    assert proc.stdout == (out / "compress.md").read_text()
    again = run_tdlrt(["compress", "dense", "target_cr=80", "epochs=1", "out=c"], dense)
    assert "tdlrt train" not in again.stderr and again.stdout == proc.stdout  # nothing trained again


def test_the_one_shot_network_is_a_run_that_exports(dense, compressed):
    """The oneshot run trains nothing (epochs=0); its last.pt holds the decomposed network, so the network of
    the table's "decomposed" row exports, and the exported program scores what the table says."""
    oneshot = dense / "c" / "oneshot"
    summary = json.loads((oneshot / "summary.json").read_text())
    assert summary["checkpoint"] == "last.pt" and torch.load(oneshot / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 0
    run_tdlrt(["export", "c/oneshot", "out=oneshot.pt2", "repeat=1"], dense)
    run_tdlrt(["eval", "oneshot.pt2", "latency=false", "out=oneshot.json"], dense)
    assert json.loads((dense / "oneshot.json").read_text())["test_acc"] == pytest.approx(summary["test_acc"])


def test_a_target_out_of_reach_is_refused_before_the_source_is_evaluated(dense):
    proc = run_tdlrt(["compress", "dense", "target_cr=99.99", "epochs=1", "out=far"], dense, check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and last.startswith("tdlrt: error: method.target_cr=99.99 is out of reach"), proc.stderr
    assert "Traceback" not in proc.stderr and not (dense / "far" / "dense").exists()
    # the refused command leaves no runs, so out=far is not held for it: another target is judged on its own
    again = run_tdlrt(["compress", "dense", "target_cr=99.98", "epochs=1", "out=far"], dense, check=False)
    assert "99.98 is out of reach" in again.stderr.strip().splitlines()[-1], again.stderr


def test_a_state_dict_in_the_file_format_before_torch_1_6_is_read(tmp_path):
    from tdlrt_cli.compress import read_source

    path = tmp_path / "old.pt"
    torch.save(torchvision.models.resnet18().state_dict(), path, _use_new_zipfile_serialization=False)
    assert read_source(path) == {}  # a plain state dict (a tdlrt checkpoint would come back whole)


@pytest.mark.parametrize("args,says", [
    (["target_cr=90"], "needs a SOURCE first"),
    (["dense", "target_cr=0.9"], "did you mean 90"),
    (["dense", "epochs=0"], "epochs=0 must be >= 1"),
    (["dense", "method=tdlrt"], "set by tdlrt compress"),
    (["nowhere"], "no such run folder or checkpoint"),
    (["Foo_Weights.X"], "no torchvision network has weights Foo_Weights"),
    (["dense", "epochs=1e9"], "epochs=1e9 must be a whole number"),
    (["dense", "epochs=99999999"], "the finetuned run: epochs=99999999 is larger than tdlrt takes"),
    (["dense", "out=afile"], "out=afile is a file, not a folder"),
    (["ResNet18_Weights.DEFAULT", "model.arch=resnet34"], "model.arch= would change them"),
])
def test_bad_input_is_one_line(dense, args, says):
    (dense / "afile").write_text("keep me\n")
    proc = run_tdlrt(["compress", *args], dense, check=False)
    one_line(proc, says)
    assert not (dense / "outputs").exists() and (dense / "afile").read_text() == "keep me\n"  # nothing written


def test_an_out_folder_of_other_settings_is_refused_before_anything_runs(dense, compressed):
    before = sorted(p.name for p in (dense / "c").iterdir())
    for other in (["target_cr=80", "epochs=2"], ["target_cr=70", "epochs=1"], ["target_cr=80", "epochs=1", "lr=0.5"]):
        one_line(run_tdlrt(["compress", "dense", *other, "out=c"], dense, check=False),
                 "holds the runs of another source or other settings")
    assert sorted(p.name for p in (dense / "c").iterdir()) == before


def test_a_compressed_run_is_not_a_source(dense):
    run_tdlrt(["train", *SMALL, "epochs=1", "method=tdlrt", "tau=0.1", "hydra.run.dir=lowrank"], dense)
    one_line(run_tdlrt(["compress", "lowrank"], dense, check=False), "is a method=tdlrt run")


def test_a_state_dict_of_a_torchvision_network(tmp_path):
    """A plain state dict with torchvision's 1000-class head: the head keeps its fitted initialisation (said)."""
    torch.manual_seed(0)
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), tmp_path / "net.pth")
    proc = run_tdlrt(["compress", "net.pth", "target_cr=80", "epochs=1", "out=c", "model=torchvision",
                      "model.arch=mobilenet_v3_small", "data=synthetic", "data.train_size=128", "data.test_size=64",
                      "batch_size=64", "progress=false", "device=cpu", "cost_report=false"], tmp_path)
    assert "classifier.3.weight, classifier.3.bias keep their initialisation" in proc.stderr
    result = json.loads((tmp_path / "c" / "compress.json").read_text())
    assert result["rows"][-1]["compression_rate"] == pytest.approx(80, abs=0.5)
    # the dense row scores a new classifier, and the table says so
    assert "classifier.3.weight" in result["note"] and "untrained classifier" in proc.stdout


def test_torchvision_weights_by_name(tmp_path):
    weights = torchvision.models.get_model_weights("mobilenet_v3_small").DEFAULT
    path = tmp_path / "torch" / "hub" / "checkpoints" / os.path.basename(weights.url)
    path.parent.mkdir(parents=True)
    torch.manual_seed(3)
    published = torchvision.models.mobilenet_v3_small().state_dict()
    torch.save(published, path)
    run_tdlrt(["compress", "MobileNet_V3_Small_Weights.IMAGENET1K_V1", "target_cr=80", "epochs=1", "out=c",
               "data=synthetic", "data.train_size=128", "data.test_size=64", "batch_size=64", "progress=false",
               "device=cpu", "cost_report=false"], tmp_path, env={"TORCH_HOME": str(tmp_path / "torch")})
    dense = torch.load(tmp_path / "c" / "dense" / "checkpoints" / "last.pt", weights_only=True)["model"]
    for key in ("features.1.block.0.0.weight", "features.12.0.weight", "classifier.0.weight"):  # the file's weights
        assert torch.equal(dense[key], published[key]), key
    note = json.loads((tmp_path / "c" / "compress.json").read_text())["note"]
    assert note.startswith("classifier.3 of the source")  # 1000 classes in the file, 10 in the data
    config = json.loads((tmp_path / "c" / "finetuned" / "summary.json").read_text())["config"]
    assert config["model"] == {"name": "torchvision", "width_mult": 1.0, "arch": "mobilenet_v3_small",
                               "weights": "IMAGENET1K_V1"} and config["init_from"] is None
