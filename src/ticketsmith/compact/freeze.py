"""Layers whose forward computes their weight, frozen into the plain layer holding that weight.

A weight-standardised conv (timm's `StdConv2d`, `ScaledStdConv2d`: NFNets, BiT ResNet-V2s)
or a layer with a parametrized weight (`weight_norm`) applies, on every call, a weight computed
from its parameters. Channel surgery may not cut such a layer's input channels (each row's
statistics would change) and no executor can replace it, so a compact model kept it whole.
In eval mode the computed weight does not depend on the input: the plain `nn.Conv2d` /
`nn.Linear` holding it computes the same function, and is cut and executed like any other
layer. A frozen layer's mask becomes the nonzeros of the weight it applies (a masked entry of
a standardised row is not zero once the row is standardised; a wholly masked row is).

Also here: GroupNorms and LayerNorms swapped for a `models.norms.PrunableGroupNorm` /
`PrunableLayerNorm` (the same function, the counts they divide by fixed as built) while channel
surgery runs, and put back where their channels were not cut (`cuttable_norms`,
`restore_norms`).

Which layers qualify for freezing is read from what their forward does, not from a list of classes: on the
input it gets in the example forward, it must call one convolution / linear kernel on that very
input, return that kernel's result, and pass the same weight on another input; the frozen
layer is then checked against the layer on inputs other than the example.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..models.attention import replace_module
from ..models.norms import PrunableGroupNorm, PrunableLayerNorm, is_group_norm, is_layer_norm
from .channel import _LAYERS, _norm_width, first_calls, opaque_reason

# kernel -> (its parameters in call order, the torch layer that calls it)
_KERNELS = {
    F.conv1d: (("input", "weight", "bias", "stride", "padding", "dilation", "groups"), nn.Conv1d),
    F.conv2d: (("input", "weight", "bias", "stride", "padding", "dilation", "groups"), nn.Conv2d),
    F.conv3d: (("input", "weight", "bias", "stride", "padding", "dilation", "groups"), nn.Conv3d),
    F.linear: (("input", "weight", "bias"), nn.Linear),
}
TOLERANCE = 1e-6  # relative: the frozen layer runs the same kernel on the same weight


class _Kernels(TorchFunctionMode):
    """Records every conv / linear kernel call (bound arguments and result)."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _KERNELS:
            names, _ = _KERNELS[func]
            bound = dict(zip(names, args))
            bound.update(kwargs or {})
            self.calls.append((func, bound, out))
        return out


def _kernel_call(module: nn.Module, x: torch.Tensor) -> tuple | None:
    """(kernel, bound arguments, output) if `module(x)` is one kernel call on `x` itself whose
    result it returns; else None."""
    try:
        with torch.no_grad(), _Kernels() as rec:
            out = module(x)
    except Exception:  # (a forward that does not run on its own: not frozen, kept as it is)
        return None
    if len(rec.calls) != 1:
        return None
    func, bound, result = rec.calls[0]
    if bound.get("input") is not x or out is not result:
        return None  # padded or otherwise changed first, or changed after
    return func, bound, out


def _plain(module: nn.Module, func, bound: dict) -> nn.Module:
    """The torch layer applying `bound`'s weight and bias with `bound`'s settings."""
    w, b = bound["weight"].detach(), bound.get("bias")
    cls = _KERNELS[func][1]
    kw = dict(bias=b is not None, device=w.device, dtype=w.dtype)
    if cls is nn.Linear:
        new = nn.Linear(w.shape[1], w.shape[0], **kw)
    else:
        groups = int(bound.get("groups", 1))
        new = cls(w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]),
                  stride=bound.get("stride", 1), padding=bound.get("padding", 0),
                  dilation=bound.get("dilation", 1), groups=groups, **kw)
    with torch.no_grad():
        new.weight.copy_(w)
        if b is not None:
            new.bias.copy_(b.detach())
    new.weight.requires_grad_(bool(getattr(module, "weight", w).requires_grad))
    new.train(module.training)
    return new


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    scale = float(a.abs().max()) if a.numel() else 0.0
    return a.shape == b.shape and float((a - b).abs().max()) <= TOLERANCE * max(scale, 1e-12)


def freeze_computed_weights(model: nn.Module, inputs: tuple) -> dict[str, str]:
    """Replace, in place, every conv / linear layer of `model` (in eval mode) whose forward
    applies a weight it computes (see the module docstring) by the plain layer holding that
    weight. Returns {layer name: its class before}."""
    candidates = {n: m for n, m in _swappable(model).items()
                  if isinstance(m, _LAYERS) and opaque_reason(m) is not None}
    if not candidates:
        return {}
    seen = first_calls(model, inputs, candidates.values())
    frozen: dict[str, str] = {}
    g = torch.Generator().manual_seed(0)
    for name, module in candidates.items():
        args = seen.get(module)
        if args is None or len(args) != 1 or not isinstance(args[0], torch.Tensor) \
                or not args[0].is_floating_point():
            continue  # never called, or not on one tensor
        x = args[0].detach()
        call = _kernel_call(module, x)
        if call is None:
            continue
        func, bound, out = call
        new = _plain(module, func, bound)
        # another input of the same layout and one with a batch of another size: the same
        # weight is applied (it is computed from parameters alone) and the plain layer agrees
        others = [torch.randn(x.shape, generator=g).to(x),
                  torch.randn((x.shape[0] + 1,) + tuple(x.shape[1:]), generator=g).to(x)]
        with torch.no_grad():
            ok = _same(out, new(x))
            for y in others:
                again = _kernel_call(module, y) if ok else None
                ok = again is not None and torch.equal(again[1]["weight"], bound["weight"]) \
                    and _same(again[2], new(y))
        if not ok:
            continue
        replace_module(model, name, new)
        frozen[name] = type(module).__name__
    return frozen


def _swappable(model: nn.Module) -> dict[str, nn.Module]:
    """The submodules held at one place only (a module held at two, or the model itself,
    cannot be swapped at one name)."""
    uses: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        uses[id(m)] = uses.get(id(m), 0) + 1
    return {n: m for n, m in model.named_modules() if n and uses[id(m)] == 1}


def cuttable_norms(model: nn.Module) -> dict[str, nn.Module]:
    """Swap, in place, every GroupNorm (torch's, timm's GroupNormAct) and LayerNorm over the
    channels (torch's, timm's LayerNorm / LayerNorm2d) of `model` for a
    `models.norms.PrunableGroupNorm` / `PrunableLayerNorm` (the same function and parameters,
    the counts they divide by fixed as built), so that channel surgery may cut their channels.
    Returns {name: the module it was} (`restore_norms` puts back those left whole)."""
    found = {}
    for n, m in _swappable(model).items():
        if is_group_norm(m):
            replace_module(model, n, PrunableGroupNorm.from_group_norm(m))
        elif is_layer_norm(m):
            replace_module(model, n, PrunableLayerNorm.from_layer_norm(m))
        else:
            continue
        found[n] = m
    return found


def restore_norms(model: nn.Module, swapped: dict[str, nn.Module]) -> None:
    """The swaps of `cuttable_norms` whose channels were not cut: the module they were (its own
    kernel; the same parameters)."""
    for n, m in swapped.items():
        built = m.num_channels if isinstance(m, nn.GroupNorm) else m.normalized_shape[0]
        if _norm_width(model.get_submodule(n)) == built:
            replace_module(model, n, m)
