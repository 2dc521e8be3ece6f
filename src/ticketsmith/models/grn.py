"""Global Response Normalization (ConvNeXt-V2) with prunable channels.

timm's `GlobalResponseNorm` scales each channel by its spatial L2 norm over the *mean* of those
norms across the channels: removing a channel changes that mean's divisor, so channel surgery
left the MLP hidden units around it whole. `PrunableGRN` computes the same function with the
mean written as a sum over the channels divided by the width it was built with (`channels`,
fixed through cuts). A dead channel adds nothing to the sum, so it can go; what it outputs is
its GRN bias, one value everywhere, which compaction folds into the next layer's bias.

For the graph tracer it is one node (torch-pruning's customized layer, its channels in and out
coupled like a BatchNorm's): during tracing its forward runs as one autograd function, so its
inner reduction over the channels is not a member of any group; the rules of that node (dead
in: its bias out; only a channel dead on the way in may go) are in `compact.channel`.

`prunable_mlp(model)` swaps every timm GlobalResponseNorm for one (`ticketsmith.models.build`
does it for every user's model).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

_TRACING = [False]  # set while the dependency graph is traced (`tracing`)


@contextlib.contextmanager
def tracing():
    """While the graph tracer runs: each PrunableGRN computes as one autograd node."""
    old, _TRACING[0] = _TRACING[0], True
    try:
        yield
    finally:
        _TRACING[0] = old


def _grn(x, weight, bias, channels: int, eps: float, channels_last: bool):
    spatial, cdim = ((1, 2), -1) if channels_last else ((2, 3), 1)
    shape = (1, 1, 1, -1) if channels_last else (1, -1, 1, 1)
    x_g = x.norm(p=2, dim=spatial, keepdim=True)
    x_n = x_g / (x_g.sum(dim=cdim, keepdim=True) / channels + eps)
    return x + torch.addcmul(bias.view(shape), weight.view(shape), x * x_n)


class _OneNode(torch.autograd.Function):
    """The GRN as one autograd node (for the tracer); its backward recomputes the plain ops."""

    @staticmethod
    def forward(ctx, x, weight, bias, module):
        ctx.save_for_backward(x, weight, bias)
        ctx.module = module
        return _grn(x, weight, bias, module.channels, module.eps, module.channels_last)

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias = ctx.saved_tensors
        m = ctx.module
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in (x, weight, bias)]
            out = _grn(*leaves, m.channels, m.eps, m.channels_last)
            grads = torch.autograd.grad(out, leaves, grad)
        return (*grads, None)


class PrunableGRN(nn.Module):
    """timm's GlobalResponseNorm (NHWC with `channels_last`, else NCHW) whose mean over the
    channels divides by `channels`, the width it was built with, also after its channels were
    cut (`num_features`: the width now)."""

    def __init__(self, num_features: int, eps: float = 1e-6, channels_last: bool = True,
                 channels: int | None = None):
        super().__init__()
        self.num_features = num_features
        self.channels = channels if channels is not None else num_features
        self.eps = eps
        self.channels_last = channels_last
        self.weight = nn.Parameter(torch.zeros(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    @classmethod
    def from_timm(cls, m: nn.Module) -> "PrunableGRN":
        new = cls(m.weight.numel(), m.eps, m.channel_dim == -1)
        new.weight, new.bias = m.weight, m.bias  # the same parameters
        return new.train(m.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _TRACING[0] and torch.is_grad_enabled():
            return _OneNode.apply(x, self.weight, self.bias, self)
        return _grn(x, self.weight, self.bias, self.channels, self.eps, self.channels_last)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, channels={self.channels}, eps={self.eps}, "
                f"channels_last={self.channels_last}")


def is_timm_grn(m: nn.Module) -> bool:
    """timm's GlobalResponseNorm (by class name and what it holds: NHWC or NCHW layout)."""
    if type(m).__name__ != "GlobalResponseNorm" or not all(
            hasattr(m, a) for a in ("weight", "bias", "eps", "spatial_dim", "channel_dim")):
        return False
    return (tuple(m.spatial_dim), m.channel_dim) in (((1, 2), -1), ((2, 3), 1)) \
        and m.weight.dim() == 1 and m.bias.shape == m.weight.shape


__all__ = ["PrunableGRN", "is_timm_grn", "tracing"]
