"""SRigL (Lasby et al., ICLR 2024): dynamic sparse training with a constant fan-in per neuron and
neuron ablation.

Per sparse layer (weight viewed as c_out x n) with nonzero budget B:

- Init: every neuron gets exactly k = floor(B / c_out) random inputs; weights are re-drawn
  He-normal with the *sparse* fan-in, std = sqrt(2 / k) (`sparse_init=True`, the default).
- Each update at step t, with n_on = k * a active weights (a = active neurons) and
  n_drop = floor(f(t) * n_on):
  1. Salient weights: the n_on - n_drop active weights of largest |W|, plus the n_drop
     positions of largest |dense grad| among the others (RigL's growth candidates, so exactly
     n_on weights are salient).
  2. Ablation: a neuron with fewer than gamma_sal * k salient weights (k = the *current*
     fan-in) is inactive. Ablation is re-decided at every update, so an ablated neuron whose
     gradients become salient comes back (its weights start at zero). At least ceil(B / n)
     neurons stay active, the most salient ones (ties: lower index), so k never exceeds the
     dense fan-in n. The output layer is never ablated.
  3. k = floor(B / a) for the new number a of active neurons.
  4. Drop: the n_on - n_drop largest-|W| active weights of the active neurons survive the drop,
     then each active neuron keeps at most its top-k of them by |W| (by magnitude: the
     authors' code sorts booleans there and keeps an arbitrary subset).
  5. Grow: each active neuron is filled up to exactly k with the positions of largest
     |dense grad| among those it does not keep; grown weights start at zero with zeroed
     momentum (a kept position is never "grown": it keeps its value).

Budget and fan-in: B is fixed for the whole run (from ERK or uniform). The layer holds k * a
weights, B - a < k * a <= B: the rounding loss is below one weight per active neuron, and the
count changes only when the number of active neurons changes.

The output layer is the model's last conv/linear module (the one `prunable_names` treats as
the classifier head). With the head included (`include_head=True`) it is sparse and keeps all
its neurons. With the head excluded (the default) it stays dense and the last sparse layer is
a hidden layer like any other: ablating one of its neurons removes one input of the dense head,
which is a structured saving, so ablation is allowed there.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ArtifactError, UsageError
from .base import DynamicSparsifier, _is_number, top_mask, top_per_row


class SRigL(DynamicSparsifier):
    """SRigL: constant fan-in RigL with neuron ablation; see the module docstring."""

    method = "srigl"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, sparsity: float,
                 total_steps: int, *, delta_t: int = 100, t_end: float = 0.75, alpha: float = 0.3,
                 gamma_sal: float = 0.3, ablation: bool = True, distribution: str = "erk",
                 dense_layers: Sequence[str] = (), grad_accumulation: int = 1,
                 include_head: bool = False, include_first: bool = True,
                 sparse_init: bool = True, seed: int = 0):
        self._gamma_sal, self._ablation = gamma_sal, ablation
        super().__init__(model, optimizer, sparsity, total_steps, delta_t=delta_t, t_end=t_end,
                         alpha=alpha, distribution=distribution, dense_layers=dense_layers,
                         grad_accumulation=grad_accumulation, include_head=include_head,
                         include_first=include_first, sparse_init=sparse_init, seed=seed)

    def _extra_settings(self) -> dict[str, Any]:
        return {"gamma_sal": self._gamma_sal, "ablation": self._ablation}

    def _validate_extra(self) -> None:
        if not (_is_number(self._gamma_sal) and 0 <= self._gamma_sal <= 1):
            raise UsageError(f"gamma_sal (ablation threshold, a fraction of the fan-in) must be "
                             f"in [0, 1], got {self._gamma_sal!r}")
        if not isinstance(self._ablation, bool):
            raise UsageError(f"ablation must be True or False, got {self._ablation!r}")

    def _check_budget(self, name: str, budget: int, shape: tuple[int, int]) -> None:
        rows, cols = shape
        k = budget // rows
        if k < 1:
            raise UsageError(
                f"layer {name!r}: its budget of {budget} weights is less than one per neuron "
                f"({rows} neurons) at sparsity {self.settings['sparsity']}; constant fan-in needs "
                "k >= 1: lower the sparsity, use another distribution or keep the layer dense")
        if k > cols:
            raise UsageError(f"layer {name!r}: fan-in k = {k} exceeds its dense fan-in {cols}")

    def _initial_mask(self, name: str, budget: int, shape: tuple[int, int]) -> torch.Tensor:
        rows, cols = shape
        k = budget // rows
        pick = torch.rand(rows, cols, generator=self._gen).topk(k, dim=1).indices
        return torch.zeros(rows, cols, dtype=torch.bool).scatter_(1, pick, True)

    def may_ablate(self, name: str) -> bool:
        """Whether neurons of this layer may be ablated (never the output layer)."""
        return self._ablation and name != self.output_layer

    def _update_layer(self, name: str, w: torch.Tensor, g: torch.Tensor | None,
                      m: torch.Tensor, fraction: float) -> torch.Tensor:
        rows, cols = m.shape
        budget = self.budgets[name]
        per_row = m.sum(1)
        active = per_row > 0
        a = int(active.sum())
        k = int(per_row[active][0])  # constant fan-in: every active row holds k
        n_on = k * a
        n_drop = int(fraction * n_on)
        w_score = w.abs()
        g_score = g.abs() if g is not None else torch.zeros_like(w)
        if self.may_ablate(name):
            salient = top_mask(w_score, m, n_on - n_drop)
            salient |= top_mask(g_score, ~salient, n_drop)
            counts = salient.sum(1)
            new_active = counts.to(torch.float64) >= self._gamma_sal * k
            min_active = -(-budget // cols)  # ceil(B / n): otherwise k would exceed n
            if int(new_active.sum()) < min_active:
                order = torch.sort(counts, descending=True, stable=True).indices[:min_active]
                new_active = torch.zeros_like(new_active)
                new_active[order] = True
        else:
            new_active = active
        a = int(new_active.sum())
        k = budget // a
        kept = top_mask(w_score, m & new_active[:, None], n_on - n_drop)
        kept = top_per_row(w_score, kept, k)
        need = torch.where(new_active, k - kept.sum(1), torch.zeros_like(per_row))
        grown = top_per_row(g_score, ~kept, need)
        return kept | grown

    def _fan_in_stat(self, fan: torch.Tensor) -> float | int:
        return int(fan[0]) if len(fan) and bool((fan == fan[0]).all()) else super()._fan_in_stat(fan)

    def _check_masks(self, masks: dict[str, torch.Tensor]) -> None:
        for n, m in masks.items():
            per_row = m.sum(1)
            active = per_row > 0
            a = int(active.sum())
            if a == 0 or not bool((per_row[active] == self.budgets[n] // a).all()):
                raise ArtifactError(f"sparsifier checkpoint: layer {n!r} does not have a constant "
                                    f"fan-in of budget // active neurons")
            if not self.may_ablate(n) and a != m.shape[0]:
                raise ArtifactError(f"sparsifier checkpoint: layer {n!r} has ablated neurons "
                                    "but may not")

    def fan_in(self) -> dict[str, int]:
        """The current constant fan-in k of each sparse layer."""
        out = {}
        for n in self.sparse_names:
            per_row = self._masks[n].reshape(self._masks[n].shape[0], -1).sum(1)
            out[n] = int(per_row[per_row > 0][0])
        return out

    def active_neurons(self) -> dict[str, torch.Tensor]:
        """Per sparse layer, a bool vector: which neurons (rows) are active (not ablated)."""
        return {n: self._masks[n].reshape(self._masks[n].shape[0], -1).any(1)
                for n in self.sparse_names}

