"""Export to plain PyTorch / ONNX, `tdlrt eval`, and the cost report."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

from conftest import TINY, run_dirs, run_tdlrt
from tdlrt_cli.export import merge_decision
from tdlrt_cli.lowrank import ConversionRules, LowRankLinear, RankPolicy, TuckerConv2d, convert_to_lowrank
from tdlrt_cli.lowrank.baselines import (CPConv2d, FixedTuckerConv2d, MatrixConv2d, MatrixFixedConv2d, TTConv2d)
from tdlrt_cli.lowrank.export import conv_chain, merged

f64 = torch.float64


def layers_to_export():
    g = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(6, 10, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2), dtype=f64)
    yield "tucker", TuckerConv2d(6, 10, (3, 5), (2, 1), (1, 2), (1, 2), True, [4, 3, None, None], dtype=f64,
                                 generator=g)
    yield "tucker-all-modes", TuckerConv2d(6, 10, (3, 5), (2, 1), (1, 2), (1, 2), True, [4, 3, 2, 3], dtype=f64,
                                           generator=g)
    yield "matrix-dlrt", MatrixConv2d(6, 10, (3, 5), (2, 1), (1, 2), (1, 2), True, [4, 4], dtype=f64, generator=g)
    yield "fixed-tucker", FixedTuckerConv2d(conv, 4, 3, generator=g)
    yield "cp", CPConv2d(conv, 5, generator=g)
    yield "tt", TTConv2d(conv, 3, generator=g)
    yield "fixed-matrix", MatrixFixedConv2d(conv, 4, generator=g)


@pytest.mark.parametrize("name, layer", list(layers_to_export()), ids=[n for n, _ in layers_to_export()])
def test_chain_and_merged_conv_compute_the_layer(name, layer):
    with torch.no_grad():
        if getattr(layer, "bias", None) is not None:
            layer.bias.normal_()
        x = torch.randn(3, 6, 13, 11, dtype=f64)
        want = layer(x)
        chain, dense = conv_chain(layer), merged(layer)
        assert all(type(m) is nn.Conv2d for m in chain)
        torch.testing.assert_close(chain(x), want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(dense(x), want, rtol=1e-12, atol=1e-12)
        # the chain stores the factorised parameters, not the dense kernel
        assert sum(p.numel() for p in chain.parameters()) < dense.weight.numel() + dense.bias.numel()


def test_linear_chain_and_merge():
    layer = LowRankLinear(20, 12, True, [5, 5], dtype=f64, generator=torch.Generator().manual_seed(1))
    x = torch.randn(4, 20, dtype=f64)
    with torch.no_grad():
        layer.bias.normal_()
        torch.testing.assert_close(conv_chain(layer)(x), layer(x), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(merged(layer)(x), layer(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("model_name", ["resnet18", "vgg16"])
def test_plain_network_folds_batchnorm_and_matches(model_name):
    from tdlrt_cli.export import plain_network
    from tdlrt_cli.models import build_model

    torch.manual_seed(0)
    model = build_model(model_name, 3, 10, 32, width_mult=0.125)
    convert_to_lowrank(model, RankPolicy(r_max_frac=0.5), ConversionRules(convert_linear=True))
    model.train()
    with torch.no_grad():
        for _ in range(3):  # non-trivial BatchNorm statistics
            model(torch.randn(16, 3, 32, 32))
    model.eval()
    x = torch.randn(5, 3, 32, 32)
    for merge in ("chain", "dense"):
        net, choices = plain_network(model, x, merge=merge)
        assert {c.exported for c in choices} == {merge}
        assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
        assert not any("tdlrt" in type(m).__module__ for m in net.modules())
        with torch.no_grad():
            torch.testing.assert_close(net(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("export")
    run_tdlrt(["train", *[a for a in TINY if not a.startswith("epochs")], "epochs=1", "method=tdlrt",
               "method.convert_linear=true"], base)
    (run,) = run_dirs(base / "outputs")
    return run


def reference_outputs(run, tmp_path):
    """Inputs at batch 1 and 128 and the low-rank network's outputs, saved for another process."""
    from tdlrt_cli.runs import load_trained

    trained = load_trained(str(run))
    xs = {b: trained.example(b) for b in (1, 128)}
    with torch.no_grad():
        ys = {b: trained.model(x) for b, x in xs.items()}
    torch.save({"x": xs, "y": ys}, tmp_path / "reference.pt")
    return tmp_path / "reference.pt"


LOAD_WITHOUT_TDLRT = textwrap.dedent("""
    import importlib.abc, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "tdlrt_cli":
                raise ImportError("tdlrt is not installed here")
    sys.meta_path.insert(0, Block())
    try:
        import tdlrt_cli
        raise SystemExit("tdlrt_cli importable")
    except ImportError:
        pass
    import torch
    program = torch.export.load(sys.argv[1])
    assert not any("batch_norm" in str(n.target) for n in program.graph.nodes), "BatchNorm not folded"
    net = program.module()
    ref = torch.load(sys.argv[2], weights_only=True)
    for b, x in ref["x"].items():
        err = (net(x) - ref["y"][b]).abs().max().item()
        assert err <= 1e-5, (b, err)
        print(f"batch {b}: max error {err:.2e}")
""")


@pytest.mark.parametrize("merge", ["chain", "auto"])
def test_export_runs_in_a_fresh_process_without_tdlrt(trained_run, tmp_path, merge):
    out = tmp_path / f"net-{merge}.pt2"
    proc = run_tdlrt(["export", str(trained_run), f"out={out}", f"merge={merge}", "repeat=3"], tmp_path)
    assert "wrote" in proc.stdout
    meta = json.loads(out.with_name(out.name + ".json").read_text())["tdlrt_export"]
    assert meta["max_abs_error"] <= 1e-5
    for layer in meta["layers"]:
        if merge == "auto":  # the merged conv only where it is clearly faster (merge_decision's margin)
            assert layer["exported"] == merge_decision(layer["chain_times_ms"], layer["dense_times_ms"])[0]
        else:
            assert layer["exported"] == "chain" and layer["chain_params"] < layer["dense_params"]
    script = tmp_path / "load.py"
    script.write_text(LOAD_WITHOUT_TDLRT)
    ref = reference_outputs(trained_run, tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, str(script), str(out), str(ref)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "batch 128" in done.stdout


def test_onnx_export_matches_the_lowrank_network(trained_run, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    out = tmp_path / "net.onnx"
    run_tdlrt(["export", str(trained_run), f"out={out}", "format=onnx", "merge=chain"], tmp_path)
    ref = torch.load(reference_outputs(trained_run, tmp_path), weights_only=True)
    session = ort.InferenceSession(str(out))
    name = session.get_inputs()[0].name
    for b, x in ref["x"].items():
        y = session.run(None, {name: x.numpy()})[0]
        assert abs(torch.from_numpy(y) - ref["y"][b]).max() <= 1e-5
    # tdlrt eval runs it (and the dense network, exported on the fly) through ONNX Runtime
    run_tdlrt(["eval", str(out), "repeat=2", f"out={tmp_path / 'onnx.json'}"], tmp_path)
    report = json.loads((tmp_path / "onnx.json").read_text())
    assert report["test_acc"] == pytest.approx(json.loads((trained_run / "summary.json").read_text())["test_acc"])
    cost = report["cost"]
    assert cost["runtime"] == "onnxruntime" and cost["lowrank"]["latency_ms_batch128"] > 0
    assert 0 < cost["lowrank"]["flops_forward"] < cost["dense"]["flops_forward"]


def test_eval_reports_accuracy_and_costs_for_run_and_export(trained_run, tmp_path):
    out = tmp_path / "net.pt2"
    run_tdlrt(["export", str(trained_run), f"out={out}", "merge=chain", "repeat=2"], tmp_path)
    reports = {}
    for name, source in (("run", trained_run), ("export", out)):
        run_tdlrt(["eval", str(source), "repeat=2", f"out={tmp_path / name}.json"], tmp_path)
        reports[name] = json.loads((tmp_path / f"{name}.json").read_text())
    summary = json.loads((trained_run / "summary.json").read_text())
    assert reports["run"]["test_acc"] == pytest.approx(summary["test_acc"])
    assert reports["export"]["test_acc"] == pytest.approx(summary["test_acc"])  # the same function
    for report in (reports["run"]["cost"], reports["export"]["cost"], summary["cost"]):
        timed = report is not summary["cost"]  # a training run times nothing unless cost_latency=true
        for side in ("dense", "lowrank"):
            for key in ("flops_forward", "peak_memory_inference_mb", "latency_ms_batch1", "latency_ms_batch128"):
                assert report[side][key] > 0 if timed or not key.startswith("latency") else key not in report[side]
        assert report["lowrank"]["flops_forward"] < report["dense"]["flops_forward"]
        assert 0 < report["parameters"]["compression_rate"] < 100
    # the chain export keeps the factorised parameter count (BatchNorm folded adds a bias per conv at most)
    run_p, exp_p = reports["run"]["cost"]["parameters"], reports["export"]["cost"]["parameters"]
    assert abs(exp_p["conv_params"] - run_p["conv_params"]) <= 0.02 * run_p["conv_params"]
    assert summary["cost"]["lowrank"]["flops_train"] < summary["cost"]["dense"]["flops_train"]
    # another test set: data=NAME and data.KEY=VALUE override the run's data config
    run_tdlrt(["eval", str(trained_run), "data=synthetic", "data.limit_test=100", "latency=false",
               f"out={tmp_path / 'subset.json'}"], tmp_path)
    subset = json.loads((tmp_path / "subset.json").read_text())
    assert subset["test_examples"] == 100 and subset["data"] == "synthetic" and "dense" not in subset["cost"]


def test_export_and_eval_bad_input(tmp_path):
    proc = run_tdlrt(["export", str(tmp_path / "nowhere")], tmp_path, check=False)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("tdlrt: error:") and "nowhere" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    not_export = tmp_path / "x.pt2"
    not_export.write_bytes(b"nope")
    proc = run_tdlrt(["eval", str(not_export)], tmp_path, check=False)
    assert proc.returncode == 2 and "cannot load the exported program" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


class CreatesFile:
    """A pickle payload: unpickling it creates the file ``path`` (stands for any code a pickle can run)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def rewrite_archive(src, dst, change=lambda records: records):
    """A copy of the zip ``src`` at ``dst`` whose records (name -> bytes) are ``change(records)``."""
    import zipfile

    with zipfile.ZipFile(src) as zin:
        records = {name: zin.read(name) for name in zin.namelist()}
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for name, data in change(records).items():
            zout.writestr(name, data)


def payload(marker) -> bytes:
    """``torch.save`` of an object whose unpickling creates ``marker``."""
    import io

    buffer = io.BytesIO()
    torch.save((CreatesFile(marker),), buffer)
    return buffer.getvalue()


def pickled_weight(marker):
    """``change`` for :func:`rewrite_archive`: the first weight marked ``use_pickle``, its file replaced by a
    pickle that creates ``marker`` when loaded as ``torch.export.load`` loads such weights."""
    def change(records):
        (name,) = [n for n in records if n.endswith("data/weights/model_weights_config.json")]
        config = json.loads(records[name])
        first = next(iter(config["config"].values()))
        first["use_pickle"] = True
        records[name] = json.dumps(config).encode()
        records[name.replace("model_weights_config.json", first["path_name"])] = payload(marker)
        return records

    return change


def pickled_sample_inputs(marker):
    """``change``: sample inputs that only ``weights_only=False`` reads (torch falls back to it), creating
    ``marker``."""
    def change(records):
        (name,) = [n for n in records if n.endswith("data/sample_inputs/model.pt")]
        records[name] = payload(marker)
        return records

    return change


@pytest.mark.parametrize("craft", [pickled_weight, pickled_sample_inputs])
def test_eval_refuses_an_export_with_pickled_entries_before_loading_it(trained_run, tmp_path, craft):
    good = tmp_path / "net.pt2"
    run_tdlrt(["export", str(trained_run), f"out={good}", "merge=chain", "repeat=2"], tmp_path)
    marker = tmp_path / "payload-ran"
    crafted = tmp_path / "crafted.pt2"
    rewrite_archive(good, crafted, craft(marker))
    (tmp_path / "crafted.pt2.json").write_bytes((tmp_path / "net.pt2.json").read_bytes())
    proc = run_tdlrt(["eval", str(crafted), "latency=false"], tmp_path, check=False)
    assert not marker.exists(), "the pickle in the archive was executed"
    assert proc.returncode == 2 and proc.stderr.strip().startswith("tdlrt: error: refusing")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert str(crafted) in proc.stderr
    # the same rewrite with nothing changed loads (the copy itself is not what is refused)
    copy = tmp_path / "copy.pt2"
    rewrite_archive(good, copy)
    proc = run_tdlrt(["eval", str(copy), "latency=false"], tmp_path)
    assert "test accuracy" in proc.stdout


def test_export_and_eval_of_a_pruned_run(tmp_path):
    """snip (and grasp, imp: the same torch.nn.utils.prune masks) export as plain convs with the mask applied."""
    run_tdlrt(["train", *[a for a in TINY if not a.startswith("epochs")], "epochs=1", "method=snip"], tmp_path)
    (run,) = run_dirs(tmp_path / "outputs")
    out = tmp_path / "pruned.pt2"
    proc = run_tdlrt(["export", str(run), f"out={out}", "repeat=2"], tmp_path)
    assert "wrote" in proc.stdout and "Traceback" not in proc.stderr
    assert json.loads(out.with_name(out.name + ".json").read_text())["tdlrt_export"]["max_abs_error"] <= 1e-5
    program = torch.export.load(str(out))
    assert not any("weight_orig" in k or "weight_mask" in k for k in program.state_dict)
    kernels = [w for w in program.state_dict.values() if w.dim() == 4]
    zeros = sum(int((w == 0).sum()) for w in kernels) / sum(w.numel() for w in kernels)
    assert zeros >= 0.85  # method.sparsity 0.9 of the convs but the first: the masked weights were exported
    run_tdlrt(["eval", str(out), "latency=false", f"out={tmp_path / 'eval.json'}"], tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    assert json.loads((tmp_path / "eval.json").read_text())["test_acc"] == pytest.approx(summary["test_acc"])


def test_export_keeps_the_compression_by_default_and_says_so(trained_run, tmp_path):
    """No merge= given: every factorised conv stays a chain, and the last line gives the exported network's
    conv c.r., equal to the run's (a timing on a loaded machine cannot undo what was trained)."""
    import re

    out = tmp_path / "default.pt2"
    proc = run_tdlrt(["export", str(trained_run), f"out={out}"], tmp_path)
    sidecar = json.loads((out.parent / (out.name + ".json")).read_text())["tdlrt_export"]
    assert sidecar["merge"] == "chain" and {c["exported"] for c in sidecar["layers"]} == {"chain"}
    exported, run = map(float, re.search(r"conv c\.r\. ([\d.]+)% \(the run's: ([\d.]+)%\)", proc.stdout).groups())
    assert exported == run > 0
    assert "merge=auto" not in proc.stderr


def test_a_latency_comparison_within_its_spread_is_marked_unreliable():
    from tdlrt_cli.cost import format_report, latency_unreliable

    noisy = ({"latency_ms_batch1": 14.8, "latency_iqr_ms_batch1": 3.0},
             {"latency_ms_batch1": 16.0, "latency_iqr_ms_batch1": 77.5})
    clear = ({"latency_ms_batch1": 14.8, "latency_iqr_ms_batch1": 0.2},
             {"latency_ms_batch1": 8.5, "latency_iqr_ms_batch1": 0.3})
    assert latency_unreliable(*noisy, 1) and not latency_unreliable(*clear, 1)
    assert not latency_unreliable({}, {}, 1)  # not timed
    params = {"params_dense": 10, "params": 5, "conv_params_dense": 8, "conv_params": 3, "compression_rate": 62.5,
              "compression_rate_total": 50.0}
    side = {"flops_forward": 2e6, "flops_train": None, "peak_memory_inference_mb": 1.0, "peak_memory_train_mb": None}
    text = format_report({"parameters": params, "batches": [1], "dense": {**side, **noisy[0]},
                          "lowrank": {**side, **noisy[1]}, "device": "cpu", "threads": 1})
    assert "unreliable: spread > difference" in text
    untimed = format_report({"parameters": params, "batches": [1, 128], "dense": side, "lowrank": side,
                             "device": "cpu", "threads": 1})
    assert "latency" not in untimed and "b128" in untimed
