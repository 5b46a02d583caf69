"""Start a CIFAR-variant network from torchvision's ImageNet weights (``init_from=torchvision``).

The CIFAR variants differ from torchvision's networks in the stem and the classifier, so weights are
matched by order within each layer type (conv, BatchNorm, linear) and copied where the shapes agree;
the rest keeps its fresh initialisation. VGG16 takes every conv and BatchNorm of ``vgg16_bn``; ResNet18
everything but the 7x7 stem and the classifier; AlexNet its four convs after the stem.
"""
from __future__ import annotations

from typing import List, Tuple

import torch.nn as nn

from ..errors import ConfigError, DataError

TORCHVISION_NAMES = {"vgg16": "vgg16_bn", "resnet18": "resnet18", "alexnet": "alexnet"}
_KINDS = (nn.Conv2d, nn.BatchNorm2d, nn.Linear)


def _layers(module: nn.Module, kind) -> List[nn.Module]:
    return [m for m in module.modules() if type(m) is kind]


def copy_matching_weights(source: nn.Module, target: nn.Module) -> Tuple[int, int]:
    """Copy the k-th conv/BatchNorm/linear of ``source`` into the k-th of ``target`` where all shapes agree.

    Returns (layers copied, layers of ``target`` left as they were)."""
    copied = kept = 0
    for kind in _KINDS:
        src, dst = _layers(source, kind), _layers(target, kind)
        for i, d in enumerate(dst):
            s = src[i] if i < len(src) else None
            sd, dd = (s.state_dict() if s is not None else {}), d.state_dict()
            if s is not None and all(k in sd and sd[k].shape == v.shape for k, v in dd.items()):
                d.load_state_dict({k: sd[k] for k in dd})
                copied += 1
            else:
                kept += 1
    return copied, kept


def load_torchvision_weights(model: nn.Module, name: str) -> Tuple[int, int]:
    if name not in TORCHVISION_NAMES:
        raise ConfigError(f"init_from=torchvision: torchvision has no pretrained weights for model={name}; "
                          f"use one of {', '.join(TORCHVISION_NAMES)} or a checkpoint path")
    import torchvision

    try:
        source = torchvision.models.get_model(TORCHVISION_NAMES[name], weights="DEFAULT")
    except Exception as exc:
        raise DataError(f"init_from=torchvision: cannot get the {TORCHVISION_NAMES[name]} weights "
                        f"({type(exc).__name__}: {str(exc)[:120]}); with no network, put them in "
                        f"$TORCH_HOME/hub/checkpoints or pass a checkpoint path") from None
    return copy_matching_weights(source, model)
