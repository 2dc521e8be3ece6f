"""Layer-wise nonzero budgets for sparse training: Erdos-Renyi-Kernel (ERK) or uniform.

Both distributions solve the same problem: give every sparse layer a density proportional to a
per-layer raw score (ERK: sum(shape) / prod(shape), i.e. (c_out + c_in + kh + kw) / (c_out *
c_in * kh * kw) for a conv, (c_out + c_in) / (c_out * c_in) for a linear layer; uniform: 1), so
that the whole set of layers keeps exactly round((1 - sparsity) * total) weights. Layers whose
density would exceed 1 become dense and the others are rescaled (repeated until none exceeds 1).
Layers the user keeps dense spend their whole size from the same global budget.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from ..errors import UsageError
from ..masks import layer_keep_count

DISTRIBUTIONS = ("erk", "uniform")


def raw_density(shape: Sequence[int], distribution: str) -> float:
    """A layer's unnormalised density score: ERK's sum(shape) / prod(shape), or 1 (uniform)."""
    if distribution == "uniform":
        return 1.0
    if distribution == "erk":
        return sum(shape) / math.prod(shape)
    raise UsageError(f"unknown layer distribution {distribution!r}; choose one of: "
                     f"{', '.join(DISTRIBUTIONS)}")


def layer_budgets(shapes: Mapping[str, Sequence[int]], sparsity: float,
                  distribution: str = "erk", dense: Sequence[str] = ()) -> dict[str, int]:
    """Nonzero weights per layer (name -> count) meeting the global budget exactly.

    `shapes`: weight shape per layer, in order. `dense`: layers kept fully dense. The counts
    sum to round((1 - sparsity) * total); every count is at most the layer's size. Layers that
    end up dense (user-chosen or saturated) get their full size.
    """
    if distribution not in DISTRIBUTIONS:
        raise UsageError(f"unknown layer distribution {distribution!r}; choose one of: "
                         f"{', '.join(DISTRIBUTIONS)}")
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    total = sum(sizes.values())
    target = layer_keep_count(1.0 - sparsity, total)
    dense_set = set(dense)
    raw = {n: raw_density(s, distribution) for n, s in shapes.items()}
    while True:
        sparse = [n for n in shapes if n not in dense_set]
        rhs = target - sum(sizes[n] for n in dense_set)
        if not sparse or rhs < 0:
            raise UsageError(
                f"sparsity {sparsity} cannot be met: the layers kept dense ("
                f"{', '.join(sorted(dense_set)) or 'none'}) alone hold "
                f"{sum(sizes[n] for n in dense_set)} weights, the budget is {target} of {total}")
        eps = rhs / sum(raw[n] * sizes[n] for n in sparse)
        saturated = [n for n in sparse if eps * raw[n] > 1.0]
        if not saturated:
            break
        # Densifying every saturated layer at once only lowers eps, so no other layer crosses 1.
        dense_set.update(saturated)
    # Integer counts: floors, then the remainder to the largest fractional parts (earlier layer
    # first on ties), so the sum is exactly the target and no count exceeds its layer's size.
    exact = {n: eps * raw[n] * sizes[n] for n in sparse}
    counts = {n: min(sizes[n], int(math.floor(exact[n]))) for n in sparse}
    left = rhs - sum(counts.values())
    order = sorted(sparse, key=lambda n: (-(exact[n] - counts[n]), list(shapes).index(n)))
    for n in order:
        if left <= 0:
            break
        if counts[n] < sizes[n]:
            counts[n] += 1
            left -= 1
    out = {}
    for n in shapes:
        out[n] = sizes[n] if n in dense_set else counts[n]
    return out


def layer_densities(model: torch.nn.Module, names: Sequence[str], sparsity: float,
                    distribution: str = "erk", dense: Sequence[str] = ()) -> dict[str, float]:
    """Per-layer density (kept / size) of the named weights under `layer_budgets`."""
    params = dict(model.named_parameters())
    shapes = {n: tuple(params[n].shape) for n in names}
    budgets = layer_budgets(shapes, sparsity, distribution, dense)
    return {n: budgets[n] / math.prod(shapes[n]) for n in names}
