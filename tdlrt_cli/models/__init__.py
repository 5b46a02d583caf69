"""Dense networks: the built-in CIFAR/MNIST ones and any torchvision classifier. ``build_model`` is the one
entry point."""
from __future__ import annotations

from typing import Optional

import torch.nn as nn

from .alexnet import AlexNet
from .lenet import LeNet5
from .resnet import ResNet18
from .torchvision_nets import build_torchvision
from .vgg import VGG16

_BUILDERS = {"vgg16": VGG16, "resnet18": ResNet18, "alexnet": AlexNet, "lenet5": LeNet5}
# Smallest input side each network can take (pooling stages must not reach size zero).
MIN_IMAGE_SIZE = {"vgg16": 32, "resnet18": 8, "alexnet": 32, "lenet5": 20}


def build_model(name: str, in_channels: int, num_classes: int, image_size: int, width_mult: float = 1.0,
                arch: Optional[str] = None, weights: Optional[str] = None, load_weights: bool = True) -> nn.Module:
    """``name``: a built-in network, or ``torchvision`` (``arch``: torchvision's name of the network,
    ``weights``: its published weights, fetched when ``load_weights``; see :mod:`.torchvision_nets`)."""
    if name == "torchvision":
        return build_torchvision(arch, in_channels, num_classes, image_size, weights, load=load_weights)
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(_BUILDERS)}")
    if image_size < MIN_IMAGE_SIZE[name]:
        raise ValueError(f"model={name} needs images of at least {MIN_IMAGE_SIZE[name]}x{MIN_IMAGE_SIZE[name]} "
                         f"pixels, the data has {image_size}x{image_size}")
    return _BUILDERS[name](in_channels=in_channels, num_classes=num_classes, image_size=image_size,
                           width_mult=width_mult)


def build_configured(model, in_channels: int, num_classes: int, image_size: int, load_weights: bool = True) -> nn.Module:
    """:func:`build_model` for a model config (``name``, ``width_mult``, ``arch``, ``weights``)."""
    return build_model(model.name, in_channels, num_classes, image_size, model.width_mult,
                       getattr(model, "arch", None), getattr(model, "weights", None), load_weights)


def scaled(width: int, width_mult: float) -> int:
    return max(1, int(round(width * width_mult)))


__all__ = ["build_model", "build_configured", "MIN_IMAGE_SIZE", "VGG16", "ResNet18", "AlexNet", "LeNet5"]
