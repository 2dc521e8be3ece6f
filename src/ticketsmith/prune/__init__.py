"""Unstructured mask sources. Each returns new `Masks`; none changes the model.

- `magnitude(model, masks, fraction)`: one IMP step, removes `fraction` of the *remaining*
  weights with the globally smallest magnitude.
- `omp(model, sparsity)`: one-shot global magnitude pruning to a target sparsity.
- `random_masks(model, sparsity)`: RP, layer-wise uniform random pruning.
- `null_masks(masks)`: the structure-less null, a random mask with another mask's per-layer
  kept counts (the control that tells whether a structure comes from *where* IMP kept weights).
- `snip`, `grasp`, `synflow` (pruning at initialization, `pai.py`) and `admm` (`admm.py`).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import UsageError
from ..masks import Masks


def check_sparsity(sparsity: float) -> None:
    if not (isinstance(sparsity, (int, float)) and 0 <= sparsity < 1 and math.isfinite(sparsity)):
        raise UsageError(f"sparsity must be in [0, 1), got {sparsity}")


def keep_top(scores: dict[str, torch.Tensor], masks: Masks, keep: int) -> Masks:
    """Keep the `keep` highest-scoring entries among those currently kept, globally across
    layers. Ties go to the earlier layer and the earlier position (a stable sort), so the
    result is deterministic and keeps exactly `keep` entries."""
    names = masks.weight_names
    flat = torch.cat([torch.where(masks[n].flatten(), scores[n].detach().flatten().float(),
                                  torch.tensor(float("-inf"))) for n in names])
    available = int(sum(int(masks[n].sum()) for n in names))
    if not 0 <= keep <= available:
        raise UsageError(f"cannot keep {keep} weights: {available} are left")
    order = torch.sort(flat, descending=True, stable=True).indices[:keep]
    kept = torch.zeros(flat.numel(), dtype=torch.bool)
    kept[order] = True
    out, start = {}, 0
    for n in names:
        size = masks[n].numel()
        out[n] = kept[start:start + size].view_as(masks[n])
        start += size
    return masks.updated(out, drop_blocks=True)


def magnitude(model: nn.Module, masks: Masks, fraction: float = 0.2) -> Masks:
    """Prune `fraction` of the remaining weights by global magnitude (one IMP round)."""
    if not 0 < fraction < 1:
        raise UsageError(f"pruning fraction must be in (0, 1), got {fraction}")
    masks.check(model)
    params = dict(model.named_parameters())
    remaining = masks.nonzeros()
    keep = remaining - int(math.floor(fraction * remaining + 0.5))
    return keep_top({n: params[n].abs() for n in masks.weight_names}, masks, keep)


def omp(model: nn.Module, sparsity: float, masks: Masks | None = None) -> Masks:
    """One-shot global magnitude pruning of (trained) weights to `sparsity`."""
    check_sparsity(sparsity)
    masks = masks if masks is not None else Masks.ones(model)
    params = dict(model.named_parameters())
    keep = int(math.floor((1 - sparsity) * masks.numel() + 0.5))
    return keep_top({n: params[n].abs() for n in masks.weight_names}, masks, keep)


def random_masks(model: nn.Module, sparsity: float, seed: int = 0,
                 masks: Masks | None = None) -> Masks:
    """RP: every layer pruned uniformly at random to the same `sparsity`."""
    check_sparsity(sparsity)
    masks = masks if masks is not None else Masks.ones(model)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n in masks.weight_names:
        m = masks[n]
        keep = int(math.floor((1 - sparsity) * m.numel() + 0.5))
        order = torch.randperm(m.numel(), generator=g)[:keep]
        flat = torch.zeros(m.numel(), dtype=torch.bool)
        flat[order] = True
        out[n] = flat.view_as(m)
    return masks.updated(out, drop_blocks=True)


def null_masks(masks: Masks, seed: int = 0) -> Masks:
    """A random mask keeping exactly as many weights in each layer as `masks` does, placed
    uniformly at random within the layer: what is left of a mask once everything but its
    layer-wise counts is forgotten. Other entries (companions, blocks) are dropped."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n in masks.weight_names:
        m = masks[n]
        flat = torch.zeros(m.numel(), dtype=torch.bool)
        flat[torch.randperm(m.numel(), generator=g)[:int(m.sum())]] = True
        out[n] = flat.view_as(m)
    return Masks(out)


from .admm import admm, admm_train  # noqa: E402, F401  (re-exported; they use keep_top / check_sparsity above)
from .pai import grasp, snip, synflow  # noqa: E402, F401  (re-exported)
