"""The model zoo, a registry by name.

`create(name, in_channels, num_classes, image_size, width)`; `width` multiplies every hidden
width (channels or units). The classifier head is each model's last layer, which is what
`ticketsmith.masks.prunable_names` excludes by default.

A user's model is named by a builder spec instead of a zoo name (`build`, `ticketsmith run
--model`): `package.module:function` (any callable returning an `nn.Module`), `timm:NAME` or
`torchvision:NAME` (when those libraries are installed; random init, nothing is downloaded).
Its nn.MultiheadAttention modules become `QKVAttention`, torchvision's Swin (V1, V2) window
attention `WindowAttention` (`attention.py`), the attention of the torchvision / timm models
listed in `zoo_attention.py` its swap (same function, prunable heads), timm's GluMlp a
`SplitGluMlp` (`glu.py`: prunable hidden units).
"""
from __future__ import annotations

import importlib
import inspect
import json
import re
import warnings
from typing import Any, Callable

from torch import nn

from ..errors import UsageError
from .attention import (QKVAttention, WindowAttention, fused_attention,  # noqa: F401  (API)
                        prunable_attention)
from .zoo_attention import (SWAPPED, BeitAttention, ClassAttention,  # noqa: F401  (API)
                            EvaAttention, GridAttention, GroupedWindowAttention, LevitAttention,
                            LevitAttentionDownsample, MaxxVitAttention, PvtAttention,
                            TimmWindowAttentionV2, XcaAttention)
from .glu import SplitGluMlp, prunable_mlp  # noqa: F401  (API)
from .norms import PrunableGRN, PrunableGroupNorm, PrunableLayerNorm  # noqa: F401  (API)

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def prunable_swap_names() -> set[str]:
    """The class names of the modules `prunable_attention` and `prunable_mlp` swap in."""
    return {c.__name__ for c in (QKVAttention, WindowAttention, SplitGluMlp, PrunableGRN, *SWAPPED)}


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


def for_dataset(name: str, ds, width: float = 1.0, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """A model shaped for a `ticketsmith.data.Dataset` (input channels, size and classes): a zoo
    model, or a builder spec (see `build`) called with `kwargs`."""
    if is_builder(name):
        return build(name, kwargs, in_channels=ds.in_channels, num_classes=ds.num_classes,
                     image_size=tuple(ds.image_size))
    if kwargs:
        raise UsageError(f"model kwargs are for a builder (--model package.module:function); "
                         f"the zoo model {name!r} takes --width only")
    return create(name, ds.in_channels, ds.num_classes, ds.image_size, width)


def check_classifier(model: nn.Module, ds, name: str) -> None:
    """`ticketsmith run` trains classifiers: the model must map a batch of the dataset's images
    to logits of shape (batch, classes). UsageError in one line otherwise (a segmentation
    model's dict, a wrong number of classes), before anything is written."""
    import torch
    x = ds.train.x[:2].float()
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as e:  # noqa: BLE001 (the model is the user's: say what it raised)
        raise UsageError(f"model {name}: it raised {_one_line(e)} on a batch of the dataset's "
                         f"images {tuple(x.shape)}") from None
    finally:
        model.train(was)
    want = (x.shape[0], ds.num_classes)
    got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if got != want:
        raise UsageError(f"model {name}: ticketsmith run trains classifiers and needs logits of "
                         f"shape {want} (batch, classes); it returns {got}. Other models: the "
                         "Python API (ts.refill, ts.compact) with your own training loop")


# -- users' models: builder specs ------------------------------------------------------------
LIBRARIES = ("timm", "torchvision")
# the dataset's shape, passed to a builder that names these keyword arguments
DATASET_ARGS = ("in_channels", "num_classes", "image_size")
_SPEC = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


def is_builder(name: str) -> bool:
    """True for a builder spec (`module:function`, `timm:NAME`, `torchvision:NAME`), False for
    a zoo name."""
    return ":" in str(name)


def check_spec(name: str) -> None:
    """Refuse a model name that is neither a zoo name nor a well-formed builder spec (no import:
    that happens when the model is built)."""
    if not is_builder(name):
        if name not in _REGISTRY:
            raise UsageError(f"unknown model {name!r}; choose one of: {', '.join(names())}, or a "
                             "builder: package.module:function, timm:NAME, torchvision:NAME")
        return
    lib, _, rest = name.partition(":")
    if lib in LIBRARIES:
        if not rest or not re.fullmatch(r"[\w.\-]+", rest):
            raise UsageError(f"model {name!r}: give a {lib} model name after '{lib}:'")
    elif not _SPEC.match(name):
        raise UsageError(f"model {name!r} is not a builder path: write package.module:function "
                         "(an importable module, a colon, a callable in it)")


def parse_kwargs(text: str) -> dict[str, Any]:
    """Keyword arguments of a builder from JSON text (an object); '' is none."""
    if not str(text).strip():
        return {}
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"model kwargs: not valid JSON ({e.msg} at column {e.colno}): {text!r}") from None
    if not isinstance(obj, dict):
        raise UsageError(f"model kwargs must be a JSON object such as '{{\"width\": 2}}', got {text!r}")
    return obj


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _library(lib: str, spec: str):
    try:
        return importlib.import_module(f"{lib}.models" if lib == "torchvision" else lib)
    except Exception as e:  # noqa: BLE001 (a broken install raises more than ImportError)
        raise UsageError(f"model {spec}: needs the {lib} package, which does not import here "
                         f"({_one_line(e)}); install it: pip install {lib}") from None


def _no_backbone_weights(tv, name: str) -> dict[str, Any]:
    """`weights_backbone=None` where torchvision's builder takes it: its segmentation, detection
    and video models load ImageNet weights into their backbone even with `weights=None`."""
    try:
        params = inspect.signature(tv.get_model_builder(name)).parameters
    except Exception:  # noqa: BLE001 (an unknown name: get_model itself says so)
        return {}
    return {"weights_backbone": None} if "weights_backbone" in params else {}


def _import(name: str):
    """Import a builder's module; a module in the current directory is found as `python -m`
    finds it, also from the `ticketsmith` console script (whose sys.path lacks the directory)."""
    import os
    import sys
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        cwd = os.getcwd()
        if e.name != name.split(".")[0] or cwd in sys.path or "" in sys.path:
            raise
    sys.path.append(cwd)  # last: never shadows an installed module
    return importlib.import_module(name)


def build(spec: str, kwargs: dict[str, Any] | None = None, *, in_channels: int = 3,
          num_classes: int = 10, image_size: tuple[int, int] = (32, 32),
          prunable: bool = True) -> nn.Module:
    """Build a user's model from a builder spec, with `kwargs` (a dict, e.g. from --model-kwargs).

    - `package.module:function`: the module is imported (from sys.path, else from the current
      directory) and the callable called with `kwargs`,
      plus those of `in_channels`, `num_classes` and `image_size` (the dataset's) that its
      signature names and `kwargs` does not give.
    - `timm:NAME`: `timm.create_model(NAME, pretrained=False, num_classes=..., in_chans=...)`.
    - `torchvision:NAME`: `torchvision.models.get_model(NAME, weights=None, num_classes=...)`,
      and `weights_backbone=None` where the builder takes one (segmentation, detection: their
      backbone would load ImageNet weights otherwise); these take 3-channel inputs only.
    Every nn.MultiheadAttention of the model is then swapped for a `QKVAttention` computing
    the same (`prunable_attention`), so its in-projection and heads are prunable; one it
    cannot swap (kdim / vdim, add_bias_kv, add_zero_attn) stays, with a warning.
    torchvision's Swin ShiftedWindowAttention (V1, V2) becomes a `WindowAttention` likewise,
    the attention listed in `zoo_attention` its swap, and timm's GluMlp (one Linear for both
    halves of a gated MLP) a `SplitGluMlp` and timm's GlobalResponseNorm (ConvNeXt-V2) a
    `PrunableGRN` (`prunable_mlp`). With `prunable=False` nothing is
    swapped: the model as its builder made it (the user's own modules: a dense baseline to time).
    A module that does not import, a missing callable, a builder that raises or returns no
    `nn.Module`: UsageError in one line.
    """
    check_spec(spec)
    kwargs = dict(kwargs or {})
    shape = {"in_channels": in_channels, "num_classes": num_classes, "image_size": tuple(image_size)}
    lib, _, name = spec.partition(":")
    if lib == "timm":
        fn = _library("timm", spec).create_model
        args = (name,)
        kwargs = {"pretrained": False, "num_classes": num_classes, "in_chans": in_channels, **kwargs}
    elif lib == "torchvision":
        tv = _library("torchvision", spec)
        fn, args = tv.get_model, (name,)
        if in_channels != 3 and "in_channels" not in kwargs:
            raise UsageError(f"model {spec}: torchvision models take 3-channel inputs; this dataset "
                             f"has {in_channels} channel(s)")
        kwargs = {"weights": None, **_no_backbone_weights(tv, name), "num_classes": num_classes,
                  **kwargs}
    else:
        args = ()
        try:
            module = _import(lib)
        except Exception as e:  # noqa: BLE001 (any error of the user's module is theirs: one line)
            raise UsageError(f"model {spec}: cannot import {lib} ({_one_line(e)})") from None
        fn = module
        for part in name.split("."):
            if not hasattr(fn, part):
                raise UsageError(f"model {spec}: {lib} has no attribute {name!r}")
            fn = getattr(fn, part)
        if not callable(fn):
            raise UsageError(f"model {spec}: {name} is a {type(fn).__name__}, not a callable")
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):
            params = {}
        kwargs = {**{k: v for k, v in shape.items() if k in params}, **kwargs}
    try:
        model = fn(*args, **kwargs)
    except UsageError:
        raise
    except Exception as e:  # noqa: BLE001 (the builder is the user's code: say what it raised)
        raise UsageError(f"model {spec}: the builder raised {_one_line(e)}") from None
    if not isinstance(model, nn.Module):
        raise UsageError(f"model {spec}: the builder returned an object of type "
                         f"{type(model).__name__}, not an nn.Module")
    if not prunable:
        return model
    # the heads and in-projection of nn.MultiheadAttention become prunable (same function)
    left = prunable_attention(model)
    prunable_mlp(model)  # and the hidden units of a gated MLP computed by one Linear
    if left:
        warnings.warn(f"model {spec}: {len(left)} nn.MultiheadAttention module(s) keep their "
                      "in-projection dense and all their heads: " + "; ".join(
                          f"{n}: {why}" for n, why in left.items()), stacklevel=2)
    return model


def original(spec: str, kwargs: dict[str, Any] | None = None, **shape) -> nn.Module | None:
    """The model of a builder spec as its builder made it (`build(..., prunable=False)`: the
    user's own modules, a dense baseline to time), or None where `build` swaps none of its
    modules. `shape`: build's in_channels / num_classes / image_size."""
    built = build(spec, kwargs, **shape)
    if not prunable_swap_names() & {type(m).__name__ for m in built.modules()}:
        return None
    return build(spec, kwargs, prunable=False, **shape)


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
