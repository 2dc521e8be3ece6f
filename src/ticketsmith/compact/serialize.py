"""Saving and loading compact models without pickle.

A saved compact model is two files: `model.safetensors` (every tensor of the state dict, written
by `ticketsmith.io.save_tensors`: atomic, with a checksum) and `model.json` (how to rebuild the
module structure). The JSON names the original architecture (a zoo model and its creation
arguments; otherwise the caller's `build` callable rebuilds it), the module tree it had, and for
every conv / linear / BatchNorm / PReLU its new constructor arguments, for every executor its
class (from a fixed list: nothing named in the file is imported freely) and `to_config()`;
a subclass of those layers (timm's BatchNormAct2d, Conv2dSame) keeps the class `build` gives it
and is resized in place to the recorded widths and tensor shapes. An attention module whose
heads compaction removed gets the recorded `num_heads` (and derived widths) back, a module whose
forward splits the channels by sizes it holds (timm's MixNet) the sizes it held, a parameter
of no torch layer whose channels went (a layer scale) its shape.
`load` rebuilds the original architecture, swaps those modules in, and loads the state dict
strictly, so the round trip computes bit-identical outputs.
"""
from __future__ import annotations

import collections

import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..errors import ArtifactError, UsageError
from .. import records
from ..io import load_tensors, read_json, save_tensors, write_json
from ..models.norms import PrunableGRN, PrunableGroupNorm, PrunableLayerNorm
from .heads import restore as restore_heads

FORMAT = "ticketsmith.compact"
VERSION = 1
WEIGHTS, DESCRIPTION = "model.safetensors", "model.json"

_BN = {"BatchNorm1d": nn.BatchNorm1d, "BatchNorm2d": nn.BatchNorm2d, "BatchNorm3d": nn.BatchNorm3d}
_CONV = {"Conv1d": nn.Conv1d, "Conv2d": nn.Conv2d, "Conv3d": nn.Conv3d}


def _paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """(weights, description) for a directory, a .safetensors or a .json path."""
    p = Path(path)
    if p.suffix == ".safetensors":
        return p, p.with_suffix(".json")
    if p.suffix == ".json":
        return p.with_suffix(".safetensors"), p
    return p / WEIGHTS, p / DESCRIPTION


def _spec(module: nn.Module) -> dict | None:
    """Constructor arguments of a layer whose shape surgery may have changed."""
    name = type(module).__name__
    if type(module) in _CONV.values():
        return {"type": name, "in_channels": module.in_channels,
                "out_channels": module.out_channels, "kernel_size": list(module.kernel_size),
                "stride": list(module.stride),
                "padding": module.padding if isinstance(module.padding, str) else list(module.padding),
                "dilation": list(module.dilation), "groups": module.groups,
                "bias": module.bias is not None, "padding_mode": module.padding_mode}
    if type(module) is nn.Linear:
        return {"type": name, "in_features": module.in_features,
                "out_features": module.out_features, "bias": module.bias is not None}
    if type(module) in _BN.values():
        return {"type": name, "num_features": module.num_features, "eps": module.eps,
                "momentum": module.momentum, "affine": module.affine,
                "track_running_stats": module.track_running_stats}
    if type(module) is nn.PReLU:
        return {"type": name, "num_parameters": module.num_parameters}
    if type(module) is PrunableGroupNorm:  # (its channel -> group map is in the state dict)
        return {"type": name, "num_groups": module.num_groups, "num_channels": module.num_channels,
                "eps": module.eps, "affine": module.affine}
    if type(module) is PrunableLayerNorm:
        return {"type": name, "num_features": module.num_features, "channels": module.channels,
                "eps": module.eps, "affine": module.affine, "bias": module.bias is not None,
                "channels_last": module.channels_last}
    if isinstance(module, _RESIZABLE):
        # a subclass (timm's BatchNormAct2d, Conv2dSame, a parametrized layer): its own class is
        # rebuilt by `build` and resized in place, so whatever else it holds (an activation,
        # its own forward) stays; its widths and tensor shapes are recorded here
        attrs = {a: getattr(module, a) for a in _WIDTHS if isinstance(getattr(module, a, None), int)}
        return {"type": "resized", "class": name, "attrs": attrs}
    return None


# Layers channel surgery may narrow, and the attributes holding their widths (a PrunableGRN
# keeps `channels`, the divisor of its mean, as built).
_RESIZABLE = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.PReLU,
              PrunableGRN)
_WIDTHS = ("in_channels", "out_channels", "in_features", "out_features", "num_features",
           "num_parameters", "groups")


def _resize(module: nn.Module, spec: dict, tensors: dict[str, torch.Tensor], name: str,
            description: Path) -> nn.Module:
    """Give a rebuilt layer of its own class the widths and tensor shapes it had when saved:
    the widths from the description, each direct parameter / buffer the shape of its saved
    tensor (the values come with load_state_dict)."""
    if type(module).__name__ != spec.get("class"):
        raise ArtifactError(f"{description}: layer {name!r} is a {type(module).__name__} in the "
                            f"rebuilt model, a {spec.get('class')} in the saved one")
    for attr, value in (spec.get("attrs") or {}).items():
        if attr not in _WIDTHS or not isinstance(value, int):
            raise ArtifactError(f"{description}: layer {name!r}: bad width {attr}={value!r}")
        setattr(module, attr, value)
    prefix = f"{name}." if name else ""
    for pname, p in list(module._parameters.items()):
        saved = tensors.get(prefix + pname)
        if p is None and saved is not None:  # a bias surgery gave it (a constant folded in)
            setattr(module, pname, nn.Parameter(torch.empty(saved.shape, dtype=saved.dtype)))
        elif saved is not None and saved.shape != p.shape:
            setattr(module, pname, nn.Parameter(torch.empty(saved.shape, dtype=p.dtype),
                                                requires_grad=p.requires_grad))
    for bname, b in list(module.named_buffers(recurse=False)):
        saved = tensors.get(prefix + bname)
        if b is not None and saved is not None and saved.shape != b.shape:
            setattr(module, bname, torch.empty(saved.shape, dtype=b.dtype))
    return module


def _build_layer(spec: dict) -> nn.Module:
    t = spec["type"]
    if t in _CONV:
        pad = spec["padding"]
        return _CONV[t](spec["in_channels"], spec["out_channels"], tuple(spec["kernel_size"]),
                        stride=tuple(spec["stride"]),
                        padding=pad if isinstance(pad, str) else tuple(pad),
                        dilation=tuple(spec["dilation"]), groups=spec["groups"],
                        bias=spec["bias"], padding_mode=spec["padding_mode"])
    if t == "Linear":
        return nn.Linear(spec["in_features"], spec["out_features"], bias=spec["bias"])
    if t in _BN:
        return _BN[t](spec["num_features"], eps=spec["eps"], momentum=spec["momentum"],
                      affine=spec["affine"], track_running_stats=spec["track_running_stats"])
    if t == "PReLU":
        return nn.PReLU(spec["num_parameters"])
    if t == "PrunableGroupNorm":
        return PrunableGroupNorm.cut(spec["num_groups"], spec["num_channels"], eps=spec["eps"],
                                     affine=spec["affine"])
    if t == "PrunableLayerNorm":
        return PrunableLayerNorm(spec["num_features"], eps=spec["eps"], affine=spec["affine"],
                                 bias=spec["bias"], channels_last=spec["channels_last"],
                                 channels=spec["channels"])
    raise ArtifactError(f"unknown layer type {t!r} in a compact model description")


def save(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write a compact model (from `compact()`) as safetensors + JSON; `path` is a directory
    (holding model.safetensors and model.json) or a `.safetensors` file (with a `.json` beside
    it). Returns the path of the JSON description."""
    from . import is_executor

    info = getattr(model, "ticketsmith_compact", None)
    if info is None:
        raise UsageError("save() takes a model returned by ticketsmith.compact.compact()")
    weights, description = _paths(path)
    layers: dict[str, dict] = {}
    inside: list[str] = []  # executors' own submodules are theirs to rebuild
    for name, m in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in inside):
            continue
        if is_executor(m):
            config = m.to_config()
            layers[name] = {"type": "executor", "class": type(m).__name__,
                            "executor": m.executor, "config": config}
            inside.append(name)
            continue
        spec = _spec(m)
        if spec is not None:
            layers[name] = spec
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    dtypes = sorted({str(v.dtype) for v in state.values() if v.is_floating_point()})
    save_tensors(weights, state, {"kind": FORMAT, "version": VERSION})
    write_json(description, {
        "kind": FORMAT, "version": VERSION, "weights": weights.name,
        "source": info["source"], "tree": info["tree"], "layers": layers,
        "executors": dict(getattr(model, "ticketsmith_executors", {})),
        "compact": {k: v for k, v in info.items() if k not in ("source", "tree")},
        "float_dtypes": dtypes,
    })
    return description


def load(path: str | os.PathLike, build: Callable[[], nn.Module] | None = None) -> nn.Module:
    """Rebuild a compact model written by `save`. Zoo models rebuild themselves; for any other
    model pass `build`, a callable returning the original (uncompacted) architecture."""
    from . import executor_class

    weights, description = _paths(path)
    if not description.exists():
        raise UsageError(f"{description}: no compact model description found")
    desc = read_json(description)
    if not isinstance(desc, dict) or desc.get("kind") != FORMAT:
        raise ArtifactError(f"{description}: not a ticketsmith compact model description")
    if desc.get("version") != VERSION:
        raise ArtifactError(f"{description}: format version {desc.get('version')} is not "
                            f"supported (expected {VERSION})")
    records.read(description, "compact")  # every field load uses, of the type it expects
    tensors, meta = load_tensors(weights)
    if meta.get("kind") != FORMAT:
        raise ArtifactError(f"{weights}: not the weights of a ticketsmith compact model")

    model = _build_original(desc, build, description)
    for name, spec in desc["layers"].items():
        try:
            model.get_submodule(name)
        except AttributeError:
            raise ArtifactError(f"{description}: layer {name!r} is not in the rebuilt model") from None
        try:  # a spec whose keys or values are not what save wrote: one error naming the layer
            if spec.get("type") == "executor":
                cls = executor_class(spec.get("class", ""))
                if cls is None:
                    raise ArtifactError(f"{description}: executor {spec.get('class')!r} of layer "
                                        f"{name!r} is not available")
                own = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
                new = cls.from_config(spec["config"], own)
                new.use(spec["executor"])
            elif spec.get("type") == "resized":
                _resize(model.get_submodule(name), spec, tensors, name, description)
                continue
            else:
                new = _build_layer(spec)
                if isinstance(new, PrunableGroupNorm):  # timm's GroupNormAct: its activation
                    new.adopt(model.get_submodule(name))
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as e:
            what = f"field {e.args[0]!r} is missing" if isinstance(e, KeyError) else str(e).splitlines()[0][:160]
            raise ArtifactError(f"{description}: layer {name!r}: {what}") from None
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
    try:  # attention modules whose heads went: their head counts (their Linears are above)
        restore_heads(model, (desc.get("compact") or {}).get("removed_heads") or {})
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ArtifactError(f"{description}: removed_heads: {str(e).splitlines()[0][:160]}") from None
    try:  # modules whose forward splits the channels (timm's MixNet) or views a parameter
        # (timm's layer Scale) by sizes they hold
        for name, attrs in ((desc.get("compact") or {}).get("split_sizes") or {}).items():
            module = model.get_submodule(name)
            for attr, sizes in attrs.items():
                old = getattr(module, attr)  # (an int: the width a module reshapes data to)
                setattr(module, attr, int(sizes) if type(old) is int else
                        type(old)(int(v) for v in sizes))
    except (TypeError, ValueError, AttributeError) as e:
        raise ArtifactError(f"{description}: split_sizes: {str(e).splitlines()[0][:160]}") from None
    try:  # parameters of no torch layer whose channels went (a layer scale): their shapes
        for name, shape in ((desc.get("compact") or {}).get("param_shapes") or {}).items():
            path, _, attr = name.rpartition(".")
            owner = model.get_submodule(path) if path else model
            old = getattr(owner, attr)
            if not isinstance(old, nn.Parameter):
                raise AttributeError(f"{name} is not a parameter of the rebuilt model")
            setattr(owner, attr, nn.Parameter(torch.empty([int(d) for d in shape], dtype=old.dtype),
                                              requires_grad=old.requires_grad))
    except (TypeError, ValueError, AttributeError) as e:
        raise ArtifactError(f"{description}: param_shapes: {str(e).splitlines()[0][:160]}") from None
    dtypes = desc.get("float_dtypes") or []
    if len(dtypes) == 1:
        model.to(getattr(torch, dtypes[0].replace("torch.", "")))
    # the rebuilt model's own state-dict metadata (module versions): modules that version their
    # state (torchvision's MNASNet) refuse a state dict without it
    state = collections.OrderedDict(tensors)
    state._metadata = getattr(model.state_dict(), "_metadata", None)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ArtifactError(f"{weights}: the weights do not fit the described model "
                            f"({str(e).splitlines()[0][:200]})") from None
    model.eval()
    chain = getattr(executor_class("CondensedLinear"), "chain", None)
    if chain is not None:  # not saved: rebuilt from the condensed layers' hand-off flags
        chain(model)
    model.ticketsmith_executors = dict(desc.get("executors", {}))
    model.ticketsmith_compact = dict(desc.get("compact", {}), source=desc["source"],
                                     tree=desc["tree"])
    src = desc["source"]
    if src.get("zoo"):
        model.ticketsmith_name = src["zoo"]
    return model


def _build_original(desc: dict, build, description: Path) -> nn.Module:
    src = desc.get("source") or {}
    if build is not None:
        model = build()
        if not isinstance(model, nn.Module):
            raise UsageError(f"build() must return an nn.Module, got {type(model).__name__}")
    elif src.get("zoo"):
        from .. import models
        args = dict(src.get("args") or {})
        if args.get("width") is None:
            # creation width unknown: the zoo's module tree does not depend on it, and every
            # layer whose shape it sets is replaced below from the description
            args["width"] = 1.0
        if args.get("image_size") is None:
            args.pop("image_size", None)
        else:
            args["image_size"] = tuple(args["image_size"])
        model = models.create(src["zoo"], **args)
    else:
        raise UsageError(f"{description}: the model is not from the zoo; pass build=<a callable "
                         "returning the original architecture> to load()")
    tree = [[n, type(m).__name__] for n, m in model.named_modules()]
    if tree != desc.get("tree"):
        diff = next((f"{a} vs {b}" for a, b in zip(tree, desc["tree"]) if a != b),
                    f"{len(tree)} vs {len(desc['tree'])} modules")
        what = "build()" if build is not None else f"zoo model {src.get('zoo')!r}"
        # the compacted model held prunable swaps (ticketsmith.models.build makes them) that
        # the rebuilt one lacks
        from ..models import prunable_swap_names
        built = {t for _, t in tree}
        lacking = sorted({t for _, t in desc["tree"]} & prunable_swap_names() - built)
        hint = (f"; the compacted model held {', '.join(lacking)} (prunable swaps that "
                "ticketsmith.models.build makes): call ticketsmith.models.prunable_attention(model) "
                "and prunable_mlp(model) in build()" if lacking else "")
        raise UsageError(f"{what} does not rebuild the architecture that was compacted "
                         f"(first difference: {diff}){hint}")
    return model
