"""model=torchvision: torchvision's classifiers fitted to the data, their published weights read from $TORCH_HOME
(written here by the test, never downloaded), and the conversion rules that suit them, against float64
references (the network with every low-rank layer replaced by a dense one holding its reconstructed kernel)."""
import copy
import urllib.error

import pytest
import torch
import torch.nn as nn
import torchvision

from tdlrt_cli.errors import ConfigError, DataError
from tdlrt_cli.lowrank import ConversionRules, LowRankLinear, RankPolicy, TuckerConv2d, convert_to_lowrank
from tdlrt_cli.lowrank.baselines import MatrixConv2d
from tdlrt_cli.lowrank.export import is_factorised, merged
from tdlrt_cli.models import build_model
from tdlrt_cli.models.torchvision_nets import checkpoint_file, weights_of


@pytest.mark.parametrize("arch,channels", [("resnet18", 3), ("mobilenet_v3_small", 1), ("squeezenet1_1", 3),
                                           ("efficientnet_b0", 3)])
def test_a_network_is_fitted_to_the_datas_channels_and_classes(arch, channels):
    model = build_model("torchvision", channels, 7, 32, arch=arch).eval()
    assert model(torch.randn(2, channels, 32, 32)).shape == (2, 7)


@pytest.mark.parametrize("method", ["tdlrt", "tucker"])
def test_a_conv_classifier_stays_dense_like_a_linear_one(method):
    """squeezenet has no linear layer: its classifier is its last conv, kept dense by TDLRT and the baselines."""
    from tdlrt_cli.config import TrainConfig
    from tdlrt_cli.methods import factorise

    model = build_model("torchvision", 3, 10, 32, arch="squeezenet1_1")
    cfg = TrainConfig()
    cfg.model.name, cfg.model.arch, cfg.method.name, cfg.method.rank_frac = "torchvision", "squeezenet1_1", method, 0.5
    cfg.method.r_max_frac = 0.5
    factorise(cfg, model, torch.Generator().manual_seed(0))
    assert type(model.classifier[1]) is nn.Conv2d and type(model.features[3].expand3x3) is not nn.Conv2d


def test_a_vision_transformer_takes_the_datas_image_size():
    model = build_model("torchvision", 3, 5, 32, arch="vit_b_32").eval()
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 5)


def reference(model: nn.Module) -> nn.Module:
    """The same network in float64 with every factorised layer a dense one holding its reconstructed kernel."""
    dense = copy.deepcopy(model).double()
    for name, module in list(dense.named_modules()):
        if is_factorised(module):
            parent, _, child = name.rpartition(".")
            setattr(dense.get_submodule(parent) if parent else dense, child, merged(module))
    return dense.eval()


def test_pointwise_convs_are_matrices_grouped_ones_stay_dense_and_the_network_is_its_kernels():
    model = build_model("torchvision", 3, 10, 32, arch="mobilenet_v3_small")
    before = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    first = next(iter(before))
    converted = set(convert_to_lowrank(model, RankPolicy(), ConversionRules(pointwise="matrix"),
                                       generator=torch.Generator().manual_seed(0)))
    for name, conv in before.items():
        new = model.get_submodule(name)
        if conv.groups > 1 or name == first or min(conv.in_channels, conv.out_channels) == 1:
            assert type(new) is nn.Conv2d and name not in converted, name
        else:
            assert conv.kernel_size == (1, 1) and isinstance(new, MatrixConv2d) and name in converted, name
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    model = model.double().eval()
    torch.testing.assert_close(model(x), reference(model)(x), rtol=1e-9, atol=1e-9)


def test_resnet_kxk_convs_are_tucker_and_its_shortcuts_matrices():
    model = build_model("torchvision", 3, 10, 32, arch="resnet18")
    convert_to_lowrank(model, RankPolicy(), ConversionRules(pointwise="matrix"), generator=torch.Generator().manual_seed(0))
    kinds = {type(m) for n, m in model.named_modules() if "downsample.0" in n}
    assert kinds == {MatrixConv2d}
    assert isinstance(model.layer1[0].conv1, TuckerConv2d) and type(model.conv1) is nn.Conv2d
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    model = model.double().eval()
    torch.testing.assert_close(model(x), reference(model)(x), rtol=1e-9, atol=1e-9)


def test_convert_linear_leaves_the_attentions_projections_and_the_classifier_dense():
    from tdlrt_cli.metrics import parameter_report

    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16,
                                               mlp_dim=32, num_classes=10)
    matrices = sum(p.numel() for p in vit.parameters() if p.dim() == 2)  # every linear map (embeddings are 3-D)
    converted = convert_to_lowrank(vit, RankPolicy(), ConversionRules(convert_linear=True, pointwise="matrix"),
                                   generator=torch.Generator().manual_seed(0))
    assert sorted(converted) == sorted(f"encoder.layers.encoder_layer_{i}.mlp.{j}" for i in range(2) for j in (0, 3))
    # what the target counts with convert_linear: every linear weight, attention's q, k, v projection included
    assert parameter_report(vit)["linear_params_dense"] == matrices
    assert all(isinstance(vit.get_submodule(n), LowRankLinear) for n in converted)
    assert not isinstance(vit.encoder.layers[0].self_attention.out_proj, LowRankLinear)
    assert type(vit.heads.head) is nn.Linear and type(vit.conv_proj) is nn.Conv2d  # classifier and stem
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    vit = vit.double().eval()
    torch.testing.assert_close(vit(x), reference(vit)(x), rtol=1e-9, atol=1e-9)


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch"


def published(torch_home) -> dict:
    """A resnet18 state dict saved where torchvision looks for resnet18's DEFAULT weights."""
    torch.manual_seed(1)
    state = torchvision.models.resnet18().state_dict()
    path = checkpoint_file(weights_of("resnet18", "DEFAULT"))
    assert path.startswith(str(torch_home))
    import os
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(state, path)
    return state


def test_published_weights_are_read_from_torch_home_and_the_stem_keeps_a_grey_images_response(torch_home):
    state = published(torch_home)
    model = build_model("torchvision", 1, 10, 32, arch="resnet18", weights="DEFAULT")
    torch.testing.assert_close(model.layer2[1].conv2.weight, state["layer2.1.conv2.weight"], rtol=0, atol=0)
    assert model.fc.out_features == 10
    grey = torch.rand(2, 1, 32, 32)
    rgb = nn.functional.conv2d(grey.expand(-1, 3, -1, -1), state["conv1.weight"], stride=2, padding=3)
    torch.testing.assert_close(model.conv1(grey), rgb, rtol=1e-5, atol=1e-5)
    # a trained run is rebuilt without the file (the checkpoint holds the weights): the same layers
    rebuilt = build_model("torchvision", 1, 10, 32, arch="resnet18", weights="DEFAULT", load_weights=False)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_weights_missing_offline_name_the_file_and_the_folder(torch_home, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(DataError) as err:
        build_model("torchvision", 3, 10, 32, arch="resnet18", weights="IMAGENET1K_V1")
    line = str(err.value)
    assert "resnet18-f37072fd.pth" in line and str(torch_home / "hub" / "checkpoints") in line and "\n" not in line


def test_a_damaged_weights_file_is_one_line(torch_home):
    path = checkpoint_file(weights_of("resnet18", "DEFAULT"))
    import os
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"not a checkpoint")
    with pytest.raises(DataError, match="is damaged or holds another network.s weights .*; replace it with https"):
        build_model("torchvision", 3, 10, 32, arch="resnet18", weights="DEFAULT")


@pytest.mark.parametrize("kwargs,says", [
    ({"arch": None}, "needs model.arch"),
    ({"arch": "resnet500"}, "did you mean resnet50"),
    ({"arch": "inception_v3"}, "auxiliary heads"),
    ({"arch": "resnet18", "weights": "NOPE"}, "choose one of IMAGENET1K_V1, DEFAULT"),
    ({"arch": "vit_b_16", "weights": "DEFAULT"}, "take 224x224 images"),
])
def test_bad_model_choices_are_one_line(kwargs, says):
    with pytest.raises(ConfigError, match=says):
        build_model("torchvision", 3, 10, 32, **kwargs)


def test_the_target_rule_counts_linear_weights_when_they_are_converted():
    from tdlrt_cli.methods import target_budget
    from tdlrt_cli.metrics import parameter_report

    model = build_model("torchvision", 3, 10, 32, arch="mobilenet_v3_small")
    convert_to_lowrank(model, RankPolicy(r_max_frac=1.0, init_rank_frac=0.5),
                       ConversionRules(convert_linear=True, pointwise="matrix"), generator=torch.Generator().manual_seed(0))
    report = parameter_report(model)
    hidden = model.classifier[0]
    assert isinstance(hidden, LowRankLinear) and type(model.classifier[3]) is nn.Linear
    assert report["linear_params_dense"] == hidden.dense_num_params() + model.classifier[3].weight.numel()
    conv = target_budget(model, 50, 0.0, 0.75, 100)
    both = target_budget(model, 50, 0.0, 0.75, 100, linear=True)
    assert conv.dense == report["conv_params_dense"]
    assert both.dense == report["conv_params_dense"] + report["linear_params_dense"]
    # the dense layers are held fixed: every conv kept dense, and the classifier
    adapted = sum(m.num_params() for m in model.modules() if isinstance(m, (LowRankLinear, MatrixConv2d)))
    assert both.fixed == report["conv_params"] + report["linear_params"] - adapted
    assert report["compression_rate_weights"] == pytest.approx(
        100 * (1 - (report["conv_params"] + report["linear_params"]) / both.dense))


def test_attention_projections_read_by_their_parent_stay_dense():
    """Swin's window attention passes ``self.qkv.weight`` to a function: its qkv and proj stay nn.Linear."""
    model = build_model("torchvision", 3, 10, 32, arch="swin_t")
    converted = convert_to_lowrank(model, RankPolicy(), ConversionRules(convert_linear=True, pointwise="matrix"),
                                   generator=torch.Generator().manual_seed(0))
    assert converted and not any(n.endswith(("attn.qkv", "attn.proj")) for n in converted)
    assert any(n.endswith("mlp.0") for n in converted)
    model.eval()(torch.zeros(1, 3, 32, 32))  # runs


@pytest.mark.parametrize("arch,size", [("vit_b_32", 20), ("squeezenet1_1", 8)])
def test_a_size_the_network_cannot_take_is_one_line(arch, size):
    with pytest.raises(ConfigError, match=f"model.arch={arch} cannot take {size}x{size} images"):
        build_model("torchvision", 3, 10, size, arch=arch)


def test_a_vision_transformer_under_a_conv_only_method_says_what_would_help():
    """tucker (tdlrt compress's one-shot run) finds no conv to factorise in a ViT: the line names convert_linear."""
    from tdlrt_cli.config import TrainConfig
    from tdlrt_cli.methods import factorise

    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16,
                                               mlp_dim=32, num_classes=10)
    cfg = TrainConfig()
    cfg.model.name, cfg.model.arch, cfg.method.name, cfg.method.rank_frac = "torchvision", "vit_b_16", "tucker", 0.5
    with pytest.raises(ConfigError, match="no layer of vit_b_16 can be factorised .*method.convert_linear=true "
                                          r"factorises its hidden linear layers under method=tdlrt \(tdlrt compress"):
        factorise(cfg, vit, torch.Generator().manual_seed(0))


def test_tdlrt_steps_on_a_vision_transformers_mlp_match_the_literal_algorithm():
    """convert_linear on a ViT: its MLP layers see (batch, tokens, features) inputs; three integrator steps on
    them (K-step, augmentation, Galerkin core step, truncation) equal the literal two-pass algorithm in float64."""
    import torch.nn.functional as F

    from reference import two_pass_step
    from tdlrt_cli.lowrank import TDLRT

    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=12,
                                               mlp_dim=10, num_classes=4).double()
    converted = convert_to_lowrank(vit, RankPolicy(r_max_frac=0.5), ConversionRules(convert_linear=True),
                                   generator=torch.Generator().manual_seed(0))
    assert len(converted) == 2
    ref = copy.deepcopy(vit)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 3, 16, 16, dtype=torch.float64, generator=g), torch.randint(0, 4, (6,), generator=g)
    integrator = TDLRT(vit, torch.optim.SGD(vit.parameters(), lr=0.2), 0.3)
    for _ in range(3):
        integrator.zero_grad()
        F.cross_entropy(vit(x), y).backward()
        integrator.step()
        two_pass_step(ref, lambda m: F.cross_entropy(m(x), y), 0.2, 0.3)
        for name in converted:
            a, b = vit.get_submodule(name), ref.get_submodule(name)
            assert a.ranks == b.ranks, name
            torch.testing.assert_close(a.weight_full(), b.weight_full(), rtol=0, atol=1e-10)
    torch.testing.assert_close(vit(x), ref(x), rtol=0, atol=1e-9)
