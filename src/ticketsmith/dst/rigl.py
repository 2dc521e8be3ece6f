"""Unstructured dynamic sparse training baselines on the shared schedule.

- `RigL` (Evci et al. 2020): at each update, drop the fraction f(t) of a layer's active weights
  with the smallest magnitude, grow as many where the dense gradient is largest.
- `SET` (Mocanu et al. 2018): the same drop, random growth.

Both keep each layer's nonzero count exactly at its budget. Growth candidates are the positions
not kept by the drop (a just-dropped weight may be regrown; it then keeps its value, as in the
reference implementations); newly grown weights start at zero with zeroed momentum.
Like SRigL (and every method here, so that comparisons differ only in the rules), the
weights start He-normal with each neuron's sparse fan-in (`sparse_init=True`); pass
`sparse_init=False` to keep the model's own initialisation, masked.
"""
from __future__ import annotations

import torch

from .base import DynamicSparsifier, top_mask


class RigL(DynamicSparsifier):
    """RigL: magnitude drop, dense-gradient growth, unstructured; see the module docstring."""

    method = "rigl"

    def _initial_mask(self, name: str, budget: int, shape: tuple[int, int]) -> torch.Tensor:
        rows, cols = shape
        flat = torch.zeros(rows * cols, dtype=torch.bool)
        flat[torch.randperm(rows * cols, generator=self._gen)[:budget]] = True
        return flat.view(rows, cols)

    def _grow_scores(self, w: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
        return g.abs() if g is not None else torch.zeros_like(w)

    def _update_layer(self, name: str, w: torch.Tensor, g: torch.Tensor | None,
                      m: torch.Tensor, fraction: float) -> torch.Tensor:
        n_on = int(m.sum())
        n_drop = int(fraction * n_on)
        kept = top_mask(w.abs(), m, n_on - n_drop)
        grown = top_mask(self._grow_scores(w, g), ~kept, n_on - int(kept.sum()))
        return kept | grown


class SET(RigL):
    """SET: magnitude drop, random growth (from the sparsifier's seeded generator)."""

    method = "set"
    needs_dense_grad = False

    def _grow_scores(self, w: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
        return self._random_scores(tuple(w.shape), w.device)
