"""Export's pieces called directly: conv chains and merged kernels against each layer in float64, BatchNorm
folded into a plain network, merge=auto's decision rule, a write that fails half-way, and the cost report's
latency comparison."""
import pytest
import torch
import torch.nn as nn

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


MERGE_CASES = [  # (id, chain ms, merged ms, decision)
    ("merged-clearly-faster", [1.0, 1.02, 0.98, 1.01, 0.99], [0.5, 0.51, 0.49, 0.5, 0.52], "dense"),
    ("merged-exactly-10%-faster", [1.0] * 5, [0.9] * 5, "dense"),
    ("merged-9%-faster", [1.0] * 5, [0.91] * 5, "chain"),
    ("tie", [1.0] * 5, [1.0] * 5, "chain"),
    ("chain-faster", [0.5] * 5, [1.0] * 5, "chain"),
    ("median-faster-but-noisy", [1.0, 1.0, 1.0, 0.3, 0.3], [0.5, 0.5, 0.5, 1.5, 1.5], "chain"),
    ("one-timing-each", [1.0], [0.8], "dense"),
]


@pytest.mark.parametrize("name, chain, dense, want", MERGE_CASES, ids=[c[0] for c in MERGE_CASES])
def test_merge_decision(name, chain, dense, want):
    from tdlrt_cli.export import MERGE_MARGIN, merge_decision

    assert MERGE_MARGIN == 0.10
    decision, why = merge_decision(chain, dense)
    assert decision == want and "ms" in why


class FailingProgram:
    """Stands for an ONNX program whose write fails half-way (disk full)."""

    def save(self, path):
        with open(path, "wb") as fh:
            fh.write(b"half")
        raise OSError(28, "No space left on device")


def test_a_failed_export_write_keeps_the_old_files_and_no_temporary(tmp_path):
    from tdlrt_cli.errors import UserError
    from tdlrt_cli.export import write_atomically

    out = tmp_path / "net.onnx"
    out.write_bytes(b"old model")
    (tmp_path / "net.onnx.json").write_text("{}")
    with pytest.raises(UserError, match="no space left on the device of .* while writing net.onnx"):
        write_atomically(FailingProgram(), out, "onnx", {"x": 1})
    assert out.read_bytes() == b"old model" and (tmp_path / "net.onnx.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.onnx", "net.onnx.json"]


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
