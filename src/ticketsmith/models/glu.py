"""Gated MLPs (GLU, SwiGLU) with prunable hidden units.

timm's `GluMlp` (EVA-02's MLP, `SwiGLUPacked`) computes both halves of its gated hidden layer
with one Linear (`fc1`, 2h outputs) and `chunk`s the result: hidden unit i is the product of
outputs i and h + i. Channel surgery cannot follow a chunk of the last dimension (torch-pruning
maps indices through splits of dimension 1 only), so those hidden units stay. `SplitGluMlp`
computes the same function with the two halves as two Linears (`fc1_x`, the value, and `fc1_g`,
the gate, as timm's `SwiGLU` holds them): their outputs meet in an element-wise product, which
couples unit i of both, and a dead unit goes from both and from `fc2`'s inputs.

`prunable_mlp(model)` swaps every such module, in place, with the same weights (copied into the
two new layers), and every timm GlobalResponseNorm for a `PrunableGRN` (see `norms`).
`ticketsmith.models.build` does it for every user's model (`--model`).
"""
from __future__ import annotations

import torch
from torch import nn

from .attention import replace_module
from .norms import PrunableGRN, is_timm_grn


class SplitGluMlp(nn.Module):
    """timm's GluMlp (`act(gate) * value`, dropout, norm, `fc2`, dropout) with `fc1` split into
    the value half `fc1_x` and the gate half `fc1_g` (Linears, or 1x1 convolutions for the
    convolutional variant). Construct it from timm's module with `from_glu`."""

    def __init__(self, fc1_x: nn.Module, fc1_g: nn.Module, act: nn.Module, drop1: nn.Module,
                 norm: nn.Module, fc2: nn.Module, drop2: nn.Module):
        super().__init__()
        self.fc1_x, self.fc1_g = fc1_x, fc1_g
        self.act, self.drop1, self.norm, self.fc2, self.drop2 = act, drop1, norm, fc2, drop2

    @classmethod
    def from_glu(cls, m: nn.Module) -> "SplitGluMlp":
        """The same module: timm's `fc1` rows split into two new layers (the first half is the
        value where `gate_last`, the gate otherwise); its other modules themselves."""
        h = _out_width(m.fc1) // 2
        first, second = _half(m.fc1, slice(0, h)), _half(m.fc1, slice(h, 2 * h))
        value, gate = (first, second) if m.gate_last else (second, first)
        return cls(value, gate, m.act, m.drop1, m.norm, m.fc2, m.drop2).train(m.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1_x(x) * self.act(self.fc1_g(x))
        return self.drop2(self.fc2(self.norm(self.drop1(x))))


def _out_width(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _half(fc1: nn.Module, rows: slice) -> nn.Module:
    """A new layer computing the outputs `rows` of `fc1` (a copy of those weight rows)."""
    w, b = fc1.weight, fc1.bias
    n = rows.stop - rows.start
    if isinstance(fc1, nn.Linear):
        layer = nn.Linear(fc1.in_features, n, bias=b is not None, device=w.device, dtype=w.dtype)
    else:
        layer = nn.Conv2d(fc1.in_channels, n, 1, bias=b is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        layer.weight.copy_(w[rows])
        if b is not None:
            layer.bias.copy_(b[rows])
    layer.requires_grad_(w.requires_grad)
    return layer


def is_timm_glu_mlp(m: nn.Module) -> bool:
    """timm's GluMlp (by class name, what it holds, and a plain Linear or 1x1 conv `fc1`
    whose halves are chunked along its output features / channels)."""
    if type(m).__name__ != "GluMlp" or not all(hasattr(m, a) for a in (
            "fc1", "act", "drop1", "norm", "fc2", "drop2", "chunk_dim", "gate_last")):
        return False
    fc1 = m.fc1
    if type(fc1) is nn.Linear:
        ok = m.chunk_dim == -1
    elif type(fc1) is nn.Conv2d:
        ok = (m.chunk_dim == 1 and fc1.kernel_size == (1, 1) and fc1.stride == (1, 1)
              and fc1.padding == (0, 0) and fc1.dilation == (1, 1) and fc1.groups == 1)
    else:
        return False
    return ok and _out_width(fc1) % 2 == 0


def prunable_mlp(model: nn.Module) -> int:
    """Swap, in place, every timm GluMlp of `model` for a SplitGluMlp computing the same, and
    every timm GlobalResponseNorm (ConvNeXt-V2's MLP) for a `norms.PrunableGRN` (the same
    parameters), so that their hidden units can be refilled and removed. Returns how many were
    swapped. Call it before the optimizer and the masks are made (it replaces `fc1`'s
    parameters)."""
    swapped = 0
    for name, m in list(model.named_modules()):
        if name and is_timm_glu_mlp(m):
            replace_module(model, name, SplitGluMlp.from_glu(m))
            swapped += 1
        elif name and is_timm_grn(m):
            replace_module(model, name, PrunableGRN.from_timm(m))
            swapped += 1
    return swapped


__all__ = ["SplitGluMlp", "prunable_mlp"]
