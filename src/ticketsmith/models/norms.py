"""Normalizations over several channels, with prunable channels.

Global Response Normalization (ConvNeXt-V2), GroupNorm and LayerNorm compute a statistic over several
channels and divide by how many there are: removing a channel changes that divisor, so channel
surgery left the groups around them whole. The modules here compute the same functions with
the count fixed at the width they were built with, also after their channels are cut. A channel
that is dead on its way in adds nothing to the sums (for GroupNorm: nothing to the sum, and to
the sum of squared deviations exactly what the count implies), so it can go:

- `PrunableGRN`: timm's `GlobalResponseNorm`, whose mean of the channels' L2 norms divides by
  `channels`. A dead channel outputs its GRN bias, one value everywhere, which compaction folds
  into the next layer's bias. `prunable_mlp(model)` swaps every timm GlobalResponseNorm for one
  (`ticketsmith.models.build` does it for every user's model).
- `PrunableGroupNorm`: `nn.GroupNorm` whose groups keep their channel counts (`counts`) and
  whose channels may be cut from any group (`assign`: channel -> group). A dead channel outputs
  its affine bias where its affine weight is zero (refill zeroes both: `structure.coupling`).
  Compaction swaps a GroupNorm for one only where it cuts its channels (`compact`).
- `PrunableLayerNorm`: `nn.LayerNorm` over the channels (the last axis: a transformer's
  tokens, a channels-last map; or axis 1 of an NCHW map, timm's `LayerNorm2d`) whose mean and
  variance divide by `channels`, the width it was built with. Like a GroupNorm of one group: a
  dead channel outputs its affine bias where its affine weight is zero (refill zeroes both), and
  compaction swaps a LayerNorm for one only where it cuts its channels.

For the graph tracer each is one node (torch-pruning's customized layer, its channels in and
out coupled like a BatchNorm's): while tracing (`tracing`) its forward runs as one autograd
function, so its inner reductions over the channels are members of no group; the rules of that
node (what a dead channel outputs; only a channel dead on its way in may go) are in
`compact.channel`.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn import functional as F

_TRACING = [False]  # set while the dependency graph is traced (`tracing`)


@contextlib.contextmanager
def tracing():
    """While the graph tracer runs: each module here computes as one autograd node."""
    old, _TRACING[0] = _TRACING[0], True
    try:
        yield
    finally:
        _TRACING[0] = old


class _OneNode(torch.autograd.Function):
    """`module._plain(x, *params)` as one autograd node (for the tracer); its backward
    recomputes the plain ops."""

    @staticmethod
    def forward(ctx, module, x, *params):
        ctx.save_for_backward(x, *params)
        ctx.module = module
        return module._plain(x, *params)

    @staticmethod
    def backward(ctx, grad):
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in ctx.saved_tensors]
            out = ctx.module._plain(*leaves)
            grads = torch.autograd.grad(out, leaves, grad, allow_unused=True)
        return (None, *grads)


def _as_one_node(module: nn.Module, x: torch.Tensor, *params) -> torch.Tensor:
    if _TRACING[0] and torch.is_grad_enabled():
        return _OneNode.apply(module, x, *params)
    return module._plain(x, *params)


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
        return _as_one_node(self, x, self.weight, self.bias)

    def _plain(self, x, weight, bias):
        spatial, cdim = ((1, 2), -1) if self.channels_last else ((2, 3), 1)
        shape = (1, 1, 1, -1) if self.channels_last else (1, -1, 1, 1)
        x_g = x.norm(p=2, dim=spatial, keepdim=True)
        x_n = x_g / (x_g.sum(dim=cdim, keepdim=True) / self.channels + self.eps)
        return x + torch.addcmul(bias.view(shape), weight.view(shape), x * x_n)

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


class PrunableGroupNorm(nn.Module):
    """nn.GroupNorm over `num_groups` groups that keep their channel counts (`counts`, as
    built) while channels are cut from any of them: `assign` (channels x groups, one-hot) says
    which group each channel now left is in. A cut channel counts as a zero in its group's
    statistics (what a dead channel was). Without cuts it computes what nn.GroupNorm does.
    `drop` and `act` follow the normalisation (timm's GroupNormAct; identities otherwise)."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        if num_channels % num_groups:
            raise ValueError(f"num_channels {num_channels} is not divisible by num_groups {num_groups}")
        self.num_groups, self.num_channels, self.eps, self.affine = \
            num_groups, num_channels, eps, affine
        group = torch.arange(num_channels) // (num_channels // num_groups)
        self.register_buffer("assign", F.one_hot(group, num_groups).float())
        self.register_buffer("counts", torch.full((num_groups,), float(num_channels // num_groups)))
        if affine:
            self.weight = nn.Parameter(torch.ones(num_channels))
            self.bias = nn.Parameter(torch.zeros(num_channels))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.drop, self.act = nn.Identity(), nn.Identity()

    @classmethod
    def cut(cls, num_groups: int, num_channels: int, eps: float = 1e-5,
            affine: bool = True) -> "PrunableGroupNorm":
        """One with `num_channels` left of `num_groups` groups, its channel map and counts
        (and affine) to be loaded from a state dict (`compact.load`)."""
        new = cls(num_groups, num_groups, eps, affine)
        new.num_channels = num_channels
        new.assign = torch.zeros(num_channels, num_groups)
        if affine:
            new.weight = nn.Parameter(torch.ones(num_channels))
            new.bias = nn.Parameter(torch.zeros(num_channels))
        return new

    @classmethod
    def from_group_norm(cls, m: nn.GroupNorm) -> "PrunableGroupNorm":
        """The same function and parameters as torch's GroupNorm or timm's GroupNormAct (see
        `is_group_norm`)."""
        new = cls(m.num_groups, m.num_channels, m.eps, m.affine)
        new.to(device=m.weight.device if m.affine else None)
        if m.affine:
            new.weight, new.bias = m.weight, m.bias  # the same parameters
        new.adopt(m)
        return new.train(m.training)

    def adopt(self, m: nn.Module) -> None:
        """Take `m`'s dropout and activation after the norm, where it is a timm GroupNormAct."""
        if type(m).__name__ in _TIMM_GROUP_NORM_ACTS and is_group_norm(m):
            self.drop, self.act = m.drop, m.act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = (self.weight, self.bias) if self.affine else ()
        return _as_one_node(self, x, *params)  # (the activation inside: the module's output)

    def _plain(self, x, weight=None, bias=None):
        n, c = x.shape[:2]
        xs = x.reshape(n, c, -1)
        positions = xs.shape[-1]
        assign = self.assign.to(x.dtype)
        size = self.counts.to(x.dtype) * positions  # elements per group, cut channels included
        mean = (xs.sum(-1) @ assign) / size  # n x groups
        dev = xs - (mean @ assign.t()).unsqueeze(-1)
        # a cut channel's elements were zeros: each deviates from the mean by -mean
        cut = (self.counts.to(x.dtype) - assign.sum(0)) * positions
        var = ((dev * dev).sum(-1) @ assign + cut * mean * mean) / size
        y = dev * (torch.rsqrt(var + self.eps) @ assign.t()).unsqueeze(-1)
        if weight is not None:
            y = y * weight.view(1, -1, 1) + bias.view(1, -1, 1)
        return self.act(self.drop(y.reshape(x.shape)))

    def extra_repr(self) -> str:
        return (f"{self.num_groups}, {self.num_channels}, counts={self.counts.int().tolist()}, "
                f"eps={self.eps}, affine={self.affine}")


class PrunableLayerNorm(nn.Module):
    """nn.LayerNorm over the channels (the last axis; axis 1 without `channels_last`, as timm's
    LayerNorm2d normalises an NCHW map) whose mean and variance divide by `channels`, the width
    it was built with, also after its channels were cut (`num_features`: the width now). A cut
    channel counts as the zero it was. Uncut, it computes what nn.LayerNorm does."""

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True,
                 bias: bool = True, channels_last: bool = True, channels: int | None = None):
        super().__init__()
        self.num_features = num_features
        self.channels = channels if channels is not None else num_features
        self.eps, self.affine, self.channels_last = eps, affine, channels_last
        self.weight = nn.Parameter(torch.ones(num_features)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_features)) if affine and bias else None

    @classmethod
    def from_layer_norm(cls, m: nn.LayerNorm) -> "PrunableLayerNorm":
        """The same function and parameters as torch's LayerNorm or timm's LayerNorm /
        LayerNorm2d (see `is_layer_norm`)."""
        new = cls(m.normalized_shape[0], m.eps, m.weight is not None, m.bias is not None,
                  channels_last=type(m).__name__ not in _TIMM_LAYER_NORMS_2D)
        new.weight, new.bias = m.weight, m.bias  # the same parameters
        return new.train(m.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = tuple(p for p in (self.weight, self.bias) if p is not None)
        return _as_one_node(self, x, *params)

    def _plain(self, x, weight=None, bias=None):
        dim = -1 if self.channels_last else 1
        n = self.channels
        mean = x.sum(dim, keepdim=True) / n
        dev = x - mean
        # a cut channel's values were zeros: each deviates from the mean by -mean
        var = ((dev * dev).sum(dim, keepdim=True) + (n - x.shape[dim]) * mean * mean) / n
        y = dev * torch.rsqrt(var + self.eps)
        shape = [1] * x.dim()
        shape[dim] = -1
        if weight is not None:
            y = y * weight.view(shape)
        if bias is not None:
            y = y + bias.view(shape)
        return y

    def extra_repr(self) -> str:
        return (f"{self.num_features}, channels={self.channels}, eps={self.eps}, "
                f"affine={self.affine}, bias={self.bias is not None}, "
                f"channels_last={self.channels_last}")


# timm's LayerNorm subclasses: over the last axis (timm's LayerNorm, its forward F.layer_norm;
# MetaFormer's LayerNormNoBias, torch's forward without a bias) or over axis 1 of an NCHW map
# (LayerNorm2d: permute, F.layer_norm, permute back; MetaFormer's LayerNorm2dNoBias)
_TIMM_LAYER_NORMS = {"LayerNorm", "LayerNormNoBias"}
_TIMM_LAYER_NORMS_2D = {"LayerNorm2d", "LayerNorm2dNoBias"}


def is_layer_norm(m: nn.Module) -> bool:
    """torch's LayerNorm, or timm's LayerNorm / LayerNorm2d, over one axis (the channels)."""
    if not isinstance(m, nn.LayerNorm) or len(m.normalized_shape) != 1:
        return False
    return type(m) is nn.LayerNorm or type(m).__name__ in _TIMM_LAYER_NORMS | _TIMM_LAYER_NORMS_2D


# timm's GroupNorm subclasses whose forward is F.group_norm (GroupNorm1: one group, PoolFormer's
# norm), and those that then apply their `drop` and `act` modules (by class name)
_TIMM_GROUP_NORMS = {"GroupNorm", "GroupNorm1"}
_TIMM_GROUP_NORM_ACTS = {"GroupNormAct", "GroupNorm1Act"}


def is_group_norm(m: nn.Module) -> bool:
    """torch's GroupNorm, or one of timm's (GroupNorm, GroupNorm1; GroupNormAct, GroupNorm1Act:
    the group norm, then their `drop` and `act` modules)."""
    if type(m) is nn.GroupNorm:
        return True
    name = type(m).__name__
    if not isinstance(m, nn.GroupNorm) or name not in _TIMM_GROUP_NORMS | _TIMM_GROUP_NORM_ACTS:
        return False
    return name in _TIMM_GROUP_NORMS or (isinstance(getattr(m, "drop", None), nn.Module)
                                        and isinstance(getattr(m, "act", None), nn.Module))


__all__ = ["PrunableGRN", "PrunableGroupNorm", "PrunableLayerNorm", "is_group_norm",
           "is_layer_norm", "is_timm_grn", "tracing"]
