"""Dynamic sparse training: SRigL (constant fan-in + neuron ablation), RigL, SET.

    s = ts.dst.SRigL(model, optimizer, sparsity=0.9, total_steps=N)
    ... optimizer.step(); s.step() ...          # after every optimizer step
    s.masks, s.stats(), s.state_dict()

Or, with the project's trainer: `Trainer(model, ds, cfg).fit(masks=None, sparsifier=s)`, the
sparsifier built on `trainer.optimizer` with `total_steps=trainer.total_iters`.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from ..errors import UsageError
from .base import DynamicSparsifier, top_mask, top_per_row
from .erk import DISTRIBUTIONS, layer_budgets, layer_densities, raw_density
from .rigl import SET, RigL
from .srigl import SRigL

METHODS: dict[str, type[DynamicSparsifier]] = {"srigl": SRigL, "rigl": RigL, "set": SET}


def _settings(cls: type[DynamicSparsifier]) -> dict[str, inspect.Parameter]:
    return {k: p for k, p in inspect.signature(cls.__init__).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY}


def make_sparsifier(method: str, model: nn.Module, optimizer: torch.optim.Optimizer,
                    total_steps: int, sparsity: float, **settings: Any) -> DynamicSparsifier:
    """The sparsifier of `method` ('srigl', 'rigl' or 'set') for a model and its optimizer.

    `settings` are the methods' keyword settings. A setting another method takes but this one
    does not (e.g. `gamma_sal` for 'rigl') is accepted at that method's default and refused
    otherwise, so a run layer may pass its whole configuration.
    """
    if method not in METHODS:
        raise UsageError(f"unknown dynamic sparse training method {method!r}; choose one of: "
                         f"{', '.join(METHODS)}")
    cls = METHODS[method]
    own = _settings(cls)
    others = {k: p for c in METHODS.values() if c is not cls for k, p in _settings(c).items()}
    kwargs = {}
    for k, v in settings.items():
        if k in own:
            kwargs[k] = v
        elif k in others:
            if v != others[k].default:
                raise UsageError(f"setting {k!r} does not apply to method {method!r}")
        else:
            raise UsageError(f"unknown dynamic sparse training setting {k!r}; settings of "
                             f"{method!r}: {', '.join(own)}")
    return cls(model, optimizer, sparsity, total_steps, **kwargs)


__all__ = ["SRigL", "RigL", "SET", "DynamicSparsifier", "make_sparsifier", "METHODS",
           "layer_budgets", "layer_densities", "raw_density", "DISTRIBUTIONS", "top_mask",
           "top_per_row"]
