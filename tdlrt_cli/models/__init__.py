"""Dense CIFAR/MNIST networks. ``build_model`` is the one entry point used by ``train.py``."""
from __future__ import annotations

import torch.nn as nn

from .alexnet import AlexNet
from .lenet import LeNet5
from .resnet import ResNet18
from .vgg import VGG16

_BUILDERS = {"vgg16": VGG16, "resnet18": ResNet18, "alexnet": AlexNet, "lenet5": LeNet5}
# Smallest input side each network can take (pooling stages must not reach size zero).
MIN_IMAGE_SIZE = {"vgg16": 32, "resnet18": 8, "alexnet": 32, "lenet5": 20}


def build_model(name: str, in_channels: int, num_classes: int, image_size: int, width_mult: float = 1.0) -> nn.Module:
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(_BUILDERS)}")
    if image_size < MIN_IMAGE_SIZE[name]:
        raise ValueError(f"model={name} needs images of at least {MIN_IMAGE_SIZE[name]}x{MIN_IMAGE_SIZE[name]} "
                         f"pixels, the data has {image_size}x{image_size}")
    return _BUILDERS[name](in_channels=in_channels, num_classes=num_classes, image_size=image_size,
                           width_mult=width_mult)


def scaled(width: int, width_mult: float) -> int:
    return max(1, int(round(width * width_mult)))


__all__ = ["build_model", "MIN_IMAGE_SIZE", "VGG16", "ResNet18", "AlexNet", "LeNet5"]
