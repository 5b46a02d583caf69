"""Any classification network of torchvision (``model=torchvision model.arch=resnet50``), optionally with its
published weights (``model.weights=DEFAULT`` or a weights name such as ``IMAGENET1K_V2``).

The network is torchvision's own (``torchvision.models.get_model``); two layers are fitted to the data: the
classifier (the last linear layer, or squeezenet's final conv) gets the data's number of classes, and the
stem (the first conv) the data's channels (published weights: the RGB kernels averaged over the channels and
spread over the new ones). Weights are loaded from ``$TORCH_HOME/hub/checkpoints`` as torchvision does (a
download only where the file is missing). Rebuilding a trained run (``load=False``) makes the same network
without fetching the weights: the checkpoint holds them.
"""
from __future__ import annotations

import difflib
import os
import pickle
from typing import List, Optional

import torch
import torch.nn as nn

from ..errors import ConfigError, DataError

# training-mode outputs that are not one tensor of logits (auxiliary heads): refused
AUXILIARY_OUTPUTS = ("googlenet", "inception_v3")


def architectures() -> List[str]:
    """The classification networks torchvision builds (``torchvision.models.list_models``), minus those whose
    training-mode output is not a tensor of logits."""
    from torchvision import models

    return [n for n in models.list_models(module=models) if n not in AUXILIARY_OUTPUTS]


def check_choice(arch: Optional[str], weights: Optional[str]) -> None:
    """``model.arch`` names a network tdlrt can train, and ``model.weights`` one of its weights."""
    if not arch:
        raise ConfigError("model=torchvision needs model.arch=<name> (e.g. resnet50, mobilenet_v3_small, "
                          "convnext_tiny; `tdlrt train --help` lists them)")
    if arch in AUXILIARY_OUTPUTS:
        raise ConfigError(f"model.arch={arch}: its training-mode output holds auxiliary heads besides the logits, "
                          f"which tdlrt's loop does not train; choose another network")
    known = architectures()
    if arch not in known:
        hint = difflib.get_close_matches(arch, known, n=1)
        raise ConfigError(f"model.arch={arch} is not a torchvision classification network"
                          + (f" (did you mean {hint[0]}?)" if hint else "") + "; `tdlrt train --help` lists them")
    if weights:
        weights_of(arch, weights)


def weights_of(arch: str, name: str):
    """torchvision's weights enum member for ``model.weights=name`` (``DEFAULT``, ``IMAGENET1K_V1`` or the full
    ``ResNet50_Weights.IMAGENET1K_V2``)."""
    from torchvision import models

    enum = models.get_model_weights(arch)
    short = name.split(".", 1)[1] if name.startswith(enum.__name__ + ".") else name
    if short not in enum.__members__:
        raise ConfigError(f"model.weights={name}: {arch} has no such weights; choose one of "
                          f"{', '.join(enum.__members__)}")
    return enum[short]


def checkpoint_file(weights) -> str:
    """Where torchvision keeps (and looks for) the file of ``weights``: $TORCH_HOME/hub/checkpoints/<name>."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))


def build_torchvision(arch: Optional[str], in_channels: int, num_classes: int, image_size: int,
                      weights: Optional[str] = None, load: bool = True) -> nn.Module:
    """torchvision's ``arch`` for images of ``in_channels`` x ``image_size`` x ``image_size`` and
    ``num_classes`` classes; ``weights`` (a weights name of ``arch``, or DEFAULT) loaded when ``load``."""
    from torchvision import models

    check_choice(arch, weights)
    kwargs = {}
    w = weights_of(arch, weights) if weights else None
    vit = arch.startswith("vit_")
    if w is not None:
        if vit and w.meta.get("min_size", (image_size,))[0] != image_size:
            raise ConfigError(f"model.weights={weights}: {arch}'s published weights take "
                              f"{w.meta['min_size'][0]}x{w.meta['min_size'][0]} images (its position embeddings), "
                              f"the data has {image_size}x{image_size}; set data.image_size="
                              f"{w.meta['min_size'][0]} or train without weights")
        if not load:  # the same network, its weights from the checkpoint
            kwargs["num_classes"] = len(w.meta["categories"])
            if vit:
                kwargs["image_size"] = image_size
    else:
        kwargs["num_classes"] = num_classes
        if vit:
            kwargs["image_size"] = image_size
    try:
        model = models.get_model(arch, weights=w if load else None, **kwargs)
    except (OSError, RuntimeError, EOFError, ValueError, AssertionError, pickle.UnpicklingError) as exc:
        said = " ".join(str(exc).split())[:100]
        if w is None or not load or isinstance(exc, AssertionError):  # a size the constructor refuses (ViT: patches)
            raise ConfigError(f"model.arch={arch} cannot take {image_size}x{image_size} images ({type(exc).__name__}: "
                              f"{said}); set data.image_size to a size it takes") from None
        path = checkpoint_file(w)  # no network, or a damaged file
        if os.path.isfile(path):
            raise DataError(f"model.weights={weights}: {path} is damaged or holds another network's weights "
                            f"({type(exc).__name__}: {said}); replace it with {w.url}") from None
        raise DataError(f"model.weights={weights}: cannot read {arch}'s weights ({type(exc).__name__}: {said}); "
                        f"without a network, put the file {os.path.basename(w.url)} ({w.url}) in "
                        f"{os.path.dirname(path)} ($TORCH_HOME/hub/checkpoints)") from None
    new_head = fit_classifier(model, num_classes)
    fit_stem(model, in_channels, pretrained=w is not None)
    # the layers whose published weights could not be kept (like timm's model.pretrained_cfg, on the model)
    model.fresh_layers = [new_head] if new_head and w is not None and load else []
    if load:
        check_input_size(model, arch, in_channels, image_size)
    return model


def check_input_size(model: nn.Module, arch: str, in_channels: int, image_size: int) -> None:
    """One image of the data's size through the network (eval mode, no gradient): a size the network cannot take
    (too small for its poolings, not a multiple of its patches or windows) ends as one line before training."""
    was = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, in_channels, image_size, image_size))
    except (RuntimeError, AssertionError, ValueError, IndexError) as exc:
        said = " ".join(str(exc).split())[:160]
        raise ConfigError(f"model.arch={arch} cannot take {image_size}x{image_size} images ({type(exc).__name__}: "
                          f"{said}); set data.image_size to a size it takes (224 for its published weights)") from None
    finally:
        model.train(was)


def fitted_layers(model: nn.Module) -> List[str]:
    """The layers fitted to the data: the classifier (the last linear layer; squeezenet: the last conv) and the
    stem (the first conv)."""
    return [classifier_name(model), next(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d))]


def classifier_name(model: nn.Module) -> str:
    """The last linear layer; a network without one (squeezenet) ends in its classifying conv, the last one."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)][-1]


def fit_classifier(model: nn.Module, num_classes: int) -> Optional[str]:
    """The last linear layer (squeezenet: the last conv) with ``num_classes`` outputs, freshly initialised
    where its size changes; returns its name when it was replaced."""
    name = classifier_name(model)
    old = model.get_submodule(name)
    if isinstance(old, nn.Linear):
        if old.out_features == num_classes:
            return None
        new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    else:
        if old.out_channels == num_classes:
            return None
        new = nn.Conv2d(old.in_channels, num_classes, old.kernel_size, old.stride, old.padding,
                        bias=old.bias is not None)
    _replace(model, name, new)
    return name


def fit_stem(model: nn.Module, in_channels: int, pretrained: bool) -> None:
    """The first conv taking ``in_channels`` channels; a pretrained RGB kernel is averaged over its three
    channels and spread evenly over the new ones (its response to a grey image is kept)."""
    name, old = next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    if old.in_channels == in_channels:
        return
    new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, old.dilation,
                    old.groups, bias=old.bias is not None)
    if pretrained:
        with torch.no_grad():
            mean = old.weight.sum(dim=1, keepdim=True) / in_channels
            new.weight.copy_(mean.expand(-1, in_channels, -1, -1))
            if old.bias is not None:
                new.bias.copy_(old.bias)
    _replace(model, name, new)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
