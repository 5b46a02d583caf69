"""`tdlrt export` through the real CLI: an export runs in a fresh process without tdlrt, the ONNX file matches
the low-rank network in onnxruntime, a pruned run exports with its masks applied, and the compression is kept
by default."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import TINY, run_dirs, run_tdlrt
from tdlrt_cli.export import merge_decision


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
def test_export_runs_in_a_fresh_process_without_tdlrt(trained_run_with_linear, tmp_path, merge):
    out = tmp_path / f"net-{merge}.pt2"
    proc = run_tdlrt(["export", str(trained_run_with_linear), f"out={out}", f"merge={merge}", "repeat=3"], tmp_path)
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
    ref = reference_outputs(trained_run_with_linear, tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, str(script), str(out), str(ref)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "batch 128" in done.stdout


def test_onnx_export_matches_the_lowrank_network(trained_run_with_linear, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    out = tmp_path / "net.onnx"
    run_tdlrt(["export", str(trained_run_with_linear), f"out={out}", "format=onnx", "merge=chain"], tmp_path)
    ref = torch.load(reference_outputs(trained_run_with_linear, tmp_path), weights_only=True)
    session = ort.InferenceSession(str(out))
    name = session.get_inputs()[0].name
    for b, x in ref["x"].items():
        y = session.run(None, {name: x.numpy()})[0]
        assert abs(torch.from_numpy(y) - ref["y"][b]).max() <= 1e-5
    # tdlrt eval runs it (and the dense network, exported on the fly) through ONNX Runtime
    run_tdlrt(["eval", str(out), "repeat=2", f"out={tmp_path / 'onnx.json'}"], tmp_path)
    report = json.loads((tmp_path / "onnx.json").read_text())
    assert report["test_acc"] == pytest.approx(json.loads((trained_run_with_linear / "summary.json").read_text())["test_acc"])
    cost = report["cost"]
    assert cost["runtime"] == "onnxruntime" and cost["lowrank"]["latency_ms_batch128"] > 0
    assert 0 < cost["lowrank"]["flops_forward"] < cost["dense"]["flops_forward"]


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


def test_export_keeps_the_compression_by_default_and_says_so(trained_run_with_linear, tmp_path):
    """No merge= given: every factorised conv stays a chain, and the last line gives the exported network's
    conv c.r., equal to the run's (a timing on a loaded machine cannot undo what was trained)."""
    import re

    out = tmp_path / "default.pt2"
    proc = run_tdlrt(["export", str(trained_run_with_linear), f"out={out}"], tmp_path)
    sidecar = json.loads((out.parent / (out.name + ".json")).read_text())["tdlrt_export"]
    assert sidecar["merge"] == "chain" and {c["exported"] for c in sidecar["layers"]} == {"chain"}
    exported, run = map(float, re.search(r"conv c\.r\. ([\d.]+)% \(the run's: ([\d.]+)%\)", proc.stdout).groups())
    assert exported == run > 0
    assert "merge=auto" not in proc.stderr
