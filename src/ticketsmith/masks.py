"""Masks: parameter name -> boolean tensor (True = kept).

A `Masks` value is never mutated: every operation returns a new one. Sparsity is counted over
the *weight* masks (tensors with two or more dimensions: conv and linear weights). One-dimensional
entries (a conv bias, a BatchNorm's affine weight and bias) are companions that structural
operations add so that a dropped channel outputs exactly zero; they do not count toward sparsity.

Regrouped masks also carry their dense blocks (rows x columns of the layer's `c_out x n` matrix,
columns indexing the flattened `c_in * kh * kw` positions in PyTorch's OIHW order).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import NamedTuple

import torch
from torch import nn
from torch.nn.utils import parametrize

from .errors import ArtifactError, UsageError
from .io import load_tensors, save_tensors, tensors_digest, tensors_from_bytes, tensors_to_bytes

PRUNABLE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class Block(NamedTuple):
    """One dense block of a layer: the rows (output channels) and columns it spans."""
    rows: torch.Tensor  # int64, sorted, unique
    cols: torch.Tensor  # int64, sorted, unique, into the flattened c_in*kh*kw axis


def prunable_names(model: nn.Module, include_head: bool = False,
                   include_first: bool = True) -> list[str]:
    """Names of the prunable parameters: weights of conv and linear layers, in module order.

    The classifier head (the last conv/linear layer) is excluded unless `include_head`; the
    first layer is included unless `include_first` is False.
    """
    layers = [name for name, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES)]
    if not layers:
        raise UsageError(f"{type(model).__name__} has no prunable (conv or linear) layer")
    head, first = layers[-1], layers[0]
    keep = [n for n in layers if (include_head or n != head) and (include_first or n != first)]
    # a parametrized weight (weight_norm: weight = g * v / |v|) is no parameter a mask can
    # hold at zero: it is recomputed from `original0/original1` on every call, and an all-zero
    # row of v would make it NaN. Those layers stay dense; removing the parametrization
    # (torch.nn.utils.parametrize.remove_parametrizations(layer, "weight")) makes them prunable.
    modules = dict(model.named_modules())
    parametrized = [n for n in keep if parametrize.is_parametrized(modules[n], "weight")]
    if parametrized:
        warnings.warn(f"{len(parametrized)} layer(s) with a parametrized weight (weight_norm) are "
                      f"not prunable and stay dense: {', '.join(parametrized)}; call torch.nn."
                      "utils.parametrize.remove_parametrizations(layer, 'weight') to prune them",
                      stacklevel=2)
        keep = [n for n in keep if n not in parametrized]
        if not keep:
            raise UsageError(f"{type(model).__name__}: every prunable layer has a parametrized "
                             "weight (weight_norm); remove the parametrizations to prune them")
    fused = [n for n, m in modules.items() if isinstance(m, nn.MultiheadAttention)]
    if fused:
        warnings.warn(f"{len(fused)} nn.MultiheadAttention module(s) keep their fused "
                      f"in-projection dense and all their heads: {', '.join(fused)}; call "
                      "ticketsmith.models.prunable_attention(model) first to prune them (a "
                      "--model of the CLI gets it)", stacklevel=2)
    from .models.glu import is_timm_glu_mlp
    from .models.norms import is_timm_grn
    mlps = [n for n, m in modules.items() if n and (is_timm_glu_mlp(m) or is_timm_grn(m))]
    if mlps:
        warnings.warn(f"{len(mlps)} timm GluMlp / GlobalResponseNorm module(s) keep their MLP's "
                      f"hidden units through compaction: {', '.join(mlps[:5])}"
                      f"{', ...' if len(mlps) > 5 else ''}; call ticketsmith.models."
                      "prunable_mlp(model) first to prune them (a --model of the CLI gets it)",
                      stacklevel=2)
    if not keep:
        raise UsageError(f"{type(model).__name__}: no prunable layer left once the head "
                         "and first layer are excluded")
    return [f"{n}.weight" if n else "weight" for n in keep]


def copy_module(model: nn.Module) -> nn.Module:
    """`copy.deepcopy(model)`, also for a module holding a tensor with autograd history outside
    its parameters and buffers (a cache its forward filled while autograd was on, such as the
    attention biases timm's LeViT and EfficientFormer keep in eval mode, filled when a graph is
    traced): deepcopy refuses such tensors, so they are copied detached."""
    import copy
    memo: dict = {}
    stack: list = [m.__dict__ for m in model.modules()]
    while stack:
        v = stack.pop()
        if isinstance(v, torch.Tensor):
            if v.grad_fn is not None and id(v) not in memo:
                memo[id(v)] = v.detach().clone()
        elif isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
    return copy.deepcopy(model, memo)


def _as_bool(name: str, t: torch.Tensor) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise UsageError(f"mask {name!r}: expected a tensor, got {type(t).__name__}")
    if t.is_meta:  # no values: every count and comparison below would fail far from here
        raise UsageError(f"mask {name!r} is on the meta device (it has no values); build masks "
                         "from a model with real weights")
    if t.dtype == torch.bool:
        return t
    if t.is_floating_point() or t.dtype in (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64):
        if not bool(((t == 0) | (t == 1)).all()):
            raise UsageError(f"mask {name!r} is not binary (values other than 0 and 1)")
        return t != 0
    raise UsageError(f"mask {name!r}: unsupported dtype {t.dtype}")


class Masks(Mapping[str, torch.Tensor]):
    """An immutable mapping from parameter name to a boolean keep-mask."""

    def __init__(self, masks: Mapping[str, torch.Tensor],
                 blocks: Mapping[str, Sequence[Block]] | None = None,
                 companions: Iterable[str] = ()):
        self._m: dict[str, torch.Tensor] = {k: _as_bool(k, v).detach() for k, v in masks.items()}
        # masks of two or more dimensions that are no layer's weight: a position embedding or
        # class token, zeroed on a dead channel (`structure.coupling`); they count for nothing
        self._companions = frozenset(k for k in companions if k in self._m)
        self._blocks: dict[str, tuple[Block, ...]] = {k: tuple(v) for k, v in (blocks or {}).items()}
        unknown = set(self._blocks) - set(self._m)
        if unknown:
            raise UsageError(f"blocks given for layers without a mask: {sorted(unknown)}")

    # -- mapping -----------------------------------------------------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        return self._m[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._m)

    def __len__(self) -> int:
        return len(self._m)

    def __repr__(self) -> str:
        return (f"Masks({len(self.weight_names)} layers, sparsity={self.sparsity():.4f}"
                + (f", blocks on {len(self._blocks)} layers" if self._blocks else "") + ")")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Masks) or set(self) != set(other):
            return False
        return self._companions == other._companions and \
            all(torch.equal(self[k], other[k]) for k in self)

    __hash__ = None  # type: ignore[assignment]

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def ones(cls, model: nn.Module, include_head: bool = False, include_first: bool = True) -> "Masks":
        """All-kept masks over the model's prunable weights."""
        params = dict(model.named_parameters())
        return cls({n: torch.ones_like(params[n], dtype=torch.bool)
                    for n in prunable_names(model, include_head, include_first)})

    @classmethod
    def from_weights(cls, model: nn.Module, names: Sequence[str] | None = None) -> "Masks":
        """Masks marking the nonzero entries of the model's weights (default: prunable names)."""
        params = dict(model.named_parameters())
        names = list(names) if names is not None else prunable_names(model)
        return cls({n: params[n].detach() != 0 for n in names})

    def updated(self, masks: Mapping[str, torch.Tensor] | None = None,
                blocks: Mapping[str, Sequence[Block]] | None = None,
                drop_blocks: bool = False, companions: Iterable[str] = ()) -> "Masks":
        """A new Masks with some entries replaced or added (and optionally new blocks, and
        the names of new `companions` among them)."""
        m = dict(self._m)
        m.update(masks or {})
        b = {} if drop_blocks else dict(self._blocks)
        b.update(blocks or {})
        return Masks(m, b, self._companions | set(companions))

    @property
    def blocks(self) -> Mapping[str, tuple[Block, ...]]:
        return dict(self._blocks)

    @property
    def companions(self) -> frozenset[str]:
        """The masks of two or more dimensions that are no layer's weight (a position
        embedding's entries of dead channels): not counted among `weight_names`."""
        return self._companions

    @property
    def weight_names(self) -> list[str]:
        """Entries that count toward sparsity: masks with two or more dimensions (but the
        `companions`)."""
        return [k for k, v in self._m.items() if v.dim() >= 2 and k not in self._companions]

    # -- accounting --------------------------------------------------------------------------
    def numel(self) -> int:
        return sum(self._m[k].numel() for k in self.weight_names)

    def nonzeros(self) -> int:
        return sum(int(self._m[k].sum()) for k in self.weight_names)

    def density(self) -> float:
        n = self.numel()
        return self.nonzeros() / n if n else 1.0

    def sparsity(self) -> float:
        """Fraction of pruned weights over all weight masks."""
        return 1.0 - self.density()

    def layer_sparsity(self) -> dict[str, float]:
        return {k: 1.0 - float(self._m[k].float().mean()) for k in self.weight_names}

    def channel_sparsity(self) -> dict[str, float]:
        """Per layer, the fraction of output channels (rows) that are entirely zero."""
        out = {}
        for k in self.weight_names:
            rows = self._m[k].reshape(self._m[k].shape[0], -1).any(dim=1)
            out[k] = 1.0 - float(rows.float().mean())
        return out

    def report(self) -> str:
        """A per-layer sparsity table, then the global figure."""
        lines = [f"{'layer':<40} {'shape':<20} {'kept':>10} {'sparsity':>9}"]
        for k in self.weight_names:
            m = self._m[k]
            lines.append(f"{k:<40} {str(tuple(m.shape)):<20} {int(m.sum()):>10} "
                         f"{1 - float(m.float().mean()):>9.2%}")
        lines.append(f"{'total':<40} {'':<20} {self.nonzeros():>10} {self.sparsity():>9.2%}")
        return "\n".join(lines)

    # -- with a model ------------------------------------------------------------------------
    def check(self, model: nn.Module) -> None:
        """Raise UsageError if a mask names no parameter of the model or has the wrong shape."""
        params = dict(model.named_parameters())
        for k, m in self._m.items():
            if k not in params:
                raise UsageError(f"mask {k!r} names no parameter of {type(model).__name__}")
            if tuple(m.shape) != tuple(params[k].shape):
                raise UsageError(f"mask {k!r} has shape {tuple(m.shape)}, "
                                 f"the parameter has shape {tuple(params[k].shape)}")

    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        """Zero the masked entries of the model's parameters, in place."""
        self.check(model)
        params = dict(model.named_parameters())
        for k, m in self._m.items():
            params[k].mul_(m.to(params[k].device))

    def hold(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
             mask_grads: bool = True) -> "MaskHold":
        """Keep pruned entries exactly zero while training (see `MaskHold`)."""
        return MaskHold(model, self, optimizer, mask_grads)

    # -- files -------------------------------------------------------------------------------
    def _tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {f"mask/{k}": v for k, v in self._m.items()}
        for k, blocks in self._blocks.items():
            for i, b in enumerate(blocks):
                tensors[f"block/{k}/{i}/rows"] = b.rows
                tensors[f"block/{k}/{i}/cols"] = b.cols
        meta = {"kind": "ticketsmith.masks", "order": list(self._m)}
        if self._companions:
            meta["companions"] = sorted(self._companions)
        return tensors, meta

    @classmethod
    def _from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict, source: str) -> "Masks":
        if meta.get("kind") != "ticketsmith.masks":
            raise ArtifactError(f"{source}: not a ticketsmith masks file")
        order = meta.get("order")
        if not (isinstance(order, list) and all(isinstance(k, str) for k in order)):
            raise ArtifactError(f"{source}: field 'order' must be a list of layer names")
        missing = [k for k in order if f"mask/{k}" not in tensors]
        if missing:
            raise ArtifactError(f"{source}: no mask tensor for layer {missing[0]!r} named in 'order'")
        masks = {k: tensors[f"mask/{k}"] for k in order}
        blocks: dict[str, list[Block]] = {}
        rows = [k for k in tensors if k.startswith("block/") and k.endswith("/rows")]
        for key in rows:
            i = key.rsplit("/", 2)[1]
            if not i.isdigit() or f"{key[:-len('rows')]}cols" not in tensors:
                raise ArtifactError(f"{source}: tensor {key!r}: a block index must be an integer "
                                    "and every block needs its rows and cols")
        for key in sorted(rows, key=lambda s: (s.rsplit("/", 3)[0], int(s.rsplit("/", 2)[1]))):
            layer, i = key[len("block/"):].rsplit("/", 2)[0], key.rsplit("/", 2)[1]
            try:
                block = Block(tensors[key], tensors[f"block/{layer}/{i}/cols"])
            except (UsageError, TypeError, ValueError, RuntimeError) as e:
                raise ArtifactError(f"{source}: block {layer}/{i}: {e}") from None
            blocks.setdefault(layer, []).append(block)
        companions = meta.get("companions", [])
        if not (isinstance(companions, list) and all(isinstance(k, str) for k in companions)):
            raise ArtifactError(f"{source}: field 'companions' must be a list of names")
        try:
            return cls(masks, blocks, companions)
        except UsageError as e:  # not binary, blocks of a layer without a mask
            raise ArtifactError(f"{source}: {e}") from None

    def save(self, path) -> None:
        save_tensors(path, *self._tensors())

    @classmethod
    def load(cls, path) -> "Masks":
        return cls._from_tensors(*load_tensors(path), source=str(path))

    def to_bytes(self) -> bytes:
        """The masks (and blocks) as checksummed safetensors bytes, e.g. to broadcast them."""
        return tensors_to_bytes(*self._tensors())

    @classmethod
    def from_bytes(cls, data: bytes) -> "Masks":
        return cls._from_tensors(*tensors_from_bytes(data), source="<masks bytes>")

    def digest(self) -> str:
        """A SHA-256 of the masks and blocks: equal digests mean identical masks."""
        return tensors_digest(self._tensors()[0])


class MaskHold:
    """Holds pruned weights at exactly zero during training, in any training loop.

    Gradients of masked entries are zeroed by a tensor hook (so nothing leaks into momentum or
    into the gradients DDP reduces), and after every `optimizer.step()` the weights and every
    per-parameter optimizer buffer of the same shape (momentum, Adam moments) are multiplied by
    the mask, so weight decay or old momentum cannot bring a pruned weight back.
    """

    def __init__(self, model: nn.Module, masks: Masks, optimizer: torch.optim.Optimizer | None = None,
                 mask_grads: bool = True):
        self.model, self.optimizer = model, optimizer
        self._params = dict(model.named_parameters())
        self._mask_grads = mask_grads
        self._grad_handles: list = []
        self.update(masks)
        self._step_handle = (optimizer.register_step_post_hook(lambda *_: self.enforce())
                             if optimizer is not None else None)

    def update(self, masks: Masks) -> None:
        """Swap in new masks (dynamic sparse training changes them during training) and zero
        the newly masked weights."""
        masks.check(self.model)
        for h in self._grad_handles:
            h.remove()
        self.masks = masks
        self._f = {k: m.to(device=self._params[k].device, dtype=self._params[k].dtype)
                   for k, m in masks.items()}
        self._grad_handles = ([self._params[k].register_hook(lambda g, f=f: g * f)
                               for k, f in self._f.items()] if self._mask_grads else [])
        self.enforce()

    @torch.no_grad()
    def enforce(self) -> None:
        for k, f in self._f.items():
            p = self._params[k]
            p.mul_(f)
            if self.optimizer is not None:
                for buf in self.optimizer.state.get(p, {}).values():
                    if isinstance(buf, torch.Tensor) and buf.shape == p.shape:
                        buf.mul_(f)

    def remove(self) -> None:
        for h in self._grad_handles + ([self._step_handle] if self._step_handle else []):
            h.remove()
        self._grad_handles, self._step_handle = [], None


def layer_keep_count(density: float, numel: int) -> int:
    """How many entries a layer of `numel` keeps at `density`, rounded to nearest."""
    return int(math.floor(density * numel + 0.5))
