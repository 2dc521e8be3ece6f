"""The model zoo, a registry by name.

`create(name, in_channels, num_classes, image_size, width)`; `width` multiplies every hidden
width (channels or units). The classifier head is each model's last layer, which is what
`ticketsmith.masks.prunable_names` excludes by default.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from ..errors import UsageError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    def deco(fn):
        _REGISTRY[name] = fn
        return fn
    return deco


def names() -> list[str]:
    return sorted(_REGISTRY)


def create(name: str, in_channels: int = 3, num_classes: int = 10,
           image_size: tuple[int, int] = (32, 32), width: float = 1.0) -> nn.Module:
    if name not in _REGISTRY:
        raise UsageError(f"unknown model {name!r}; choose one of: {', '.join(names())}")
    if not width > 0:
        raise UsageError(f"width multiplier must be > 0, got {width}")
    model = _REGISTRY[name](in_channels=in_channels, num_classes=num_classes,
                            image_size=tuple(image_size), width=width)
    model.ticketsmith_name = name
    # enough to rebuild the architecture without pickle (compact save/load)
    model.ticketsmith_config = {"name": name, "in_channels": in_channels, "num_classes": num_classes,
                                "image_size": list(image_size), "width": width}
    return model


def for_dataset(name: str, ds, width: float = 1.0) -> nn.Module:
    """A model shaped for a `ticketsmith.data.Dataset` (input channels, size and classes)."""
    return create(name, ds.in_channels, ds.num_classes, ds.image_size, width)


# SGD learning rates that train each zoo model (momentum 0.9, batch 128, the step schedule):
# 0.1 for the BatchNorm networks and the MLP; LeNet-5 (no normalisation) stays at chance at 0.1
# on Fashion-MNIST and learns best at 0.02 on Fashion-MNIST and digits (measured, 2-5 epochs:
# 0.1 / 0.05 / 0.02 / 0.01 -> 10.0 / 81.7 / 83.8 / 83.2% and 74.2 / 81.1 / 85.0 / 81.7%).
DEFAULT_LR = 0.1
MODEL_LR = {"lenet5": 0.02}


def default_lr(name: str) -> float:
    """The learning rate `ticketsmith run` uses for a zoo model when --lr is not given."""
    return MODEL_LR.get(name, DEFAULT_LR)


def scaled(c: int, width: float) -> int:
    return max(1, int(round(c * width)))


def init_weights(model: nn.Module) -> None:
    """He-normal conv/linear weights, zero biases, BN at identity."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


from . import mlp, mobilenet, resnet, vgg  # noqa: E402,F401  (register models)
