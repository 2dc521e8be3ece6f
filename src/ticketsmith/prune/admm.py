"""ADMM pruning with a hard sparsity constraint (Zhang et al. 2018; Ren et al. 2019, ADMM-NN).

Training minimises the augmented Lagrangian
    L(W) + sum over prunable layers of rho/2 * ||W - Z + U||^2
with SGD; every `update_every` iterations (default: every epoch) Z becomes the projection of
W + U onto the sparsity set (the global top-k magnitudes among the base masks' weights), U the
running sum of W - Z, and rho grows geometrically from `rho` to `rho_max`, pulling W onto its
projection. The mask is the support of the last projection; the masked retraining after it is
the run's (from its rewind point), so the trained weights are not returned by `admm`.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from .. import data as tsdata
from ..errors import DivergenceError, UsageError
from ..masks import Masks, copy_module
from . import check_sparsity, keep_top


def admm(model: nn.Module, sparsity: float, ds: tsdata.Dataset, *, epochs: int = 10,
         rho: float = 1e-2, rho_max: float = 1.0, lr: float = 0.01, momentum: float = 0.9,
         batch_size: int = 128, update_every: int | None = None, masks: Masks | None = None,
         progress: bool = False, seed: int = 0) -> Masks:
    """The ADMM mask of `model` (usually trained) at exactly `sparsity`, restricted to the
    layers (and the kept weights) of `masks` (default: every prunable layer but the head).

    Trains a copy for `epochs` on `ds.train` with SGD (`lr`, `momentum`, no weight decay); the
    penalty weight rises geometrically from `rho` to `rho_max` over the Z/U updates, which
    happen every `update_every` iterations (None: at the end of every epoch) and after the last
    iteration. The model passed in is not changed."""
    return admm_train(model, sparsity, ds, epochs=epochs, rho=rho, rho_max=rho_max, lr=lr,
                      momentum=momentum, batch_size=batch_size, update_every=update_every,
                      masks=masks, progress=progress, seed=seed)[0]


def admm_train(model: nn.Module, sparsity: float, ds: tsdata.Dataset, *, epochs: int = 10,
               rho: float = 1e-2, rho_max: float = 1.0, lr: float = 0.01, momentum: float = 0.9,
               batch_size: int = 128, update_every: int | None = None,
               masks: Masks | None = None, progress: bool = False, seed: int = 0
               ) -> tuple[Masks, nn.Module, list[dict]]:
    """`admm`, also returning the ADMM-trained copy (dense: W is near, not on, its projection)
    and one record per Z/U update (iteration, rho, mean task loss since the last update,
    relative primal residual ||W - Z|| / ||W||)."""
    check_sparsity(sparsity)
    for name, v in (("epochs", epochs), ("batch size", batch_size)):
        if not (isinstance(v, int) and v >= 1):
            raise UsageError(f"ADMM {name} must be a positive integer, got {v}")
    if update_every is not None and not (isinstance(update_every, int) and update_every >= 1):
        raise UsageError(f"ADMM update_every must be a positive integer or None, got {update_every}")
    for name, v in (("rho", rho), ("rho_max", rho_max), ("learning rate", lr)):
        if not (v > 0 and math.isfinite(v)):
            raise UsageError(f"ADMM {name} must be a positive number, got {v}")
    if rho_max < rho:
        raise UsageError(f"ADMM rho_max ({rho_max}) must be at least rho ({rho})")
    if not 0 <= momentum < 1:
        raise UsageError(f"ADMM momentum must be in [0, 1), got {momentum}")
    if not hasattr(ds, "train") or len(ds.train) == 0:
        raise UsageError("ADMM needs a dataset with a non-empty training split")
    masks = masks if masks is not None else Masks.ones(model)  # raises if nothing is prunable
    if not masks.weight_names:
        raise UsageError("the base masks hold no conv or linear weight to prune")
    masks.check(model)
    keep = int(math.floor((1 - sparsity) * masks.numel() + 0.5))

    work = copy_module(model)
    work.train()
    device = next(work.parameters()).device
    params = dict(work.named_parameters())
    weights = {n: params[n] for n in masks.weight_names}
    opt = torch.optim.SGD(work.parameters(), lr=lr, momentum=momentum)
    hold = masks.hold(work, opt)  # weights outside the base masks stay exactly zero

    def project(u: dict[str, torch.Tensor]) -> tuple[Masks, dict[str, torch.Tensor]]:
        with torch.no_grad():
            v = {n: w.detach() + u[n] for n, w in weights.items()}
            support = keep_top({n: t.abs().to(masks[n].device) for n, t in v.items()}, masks, keep)
            return support, {n: v[n] * support[n].to(v[n]) for n in v}

    u = {n: torch.zeros_like(w) for n, w in weights.items()}
    support, z = project(u)
    per_epoch = tsdata.num_batches(len(ds.train), batch_size)
    total = per_epoch * epochs
    every = update_every or per_epoch
    n_updates = -(-total // every)  # the last iteration always updates
    growth = (rho_max / rho) ** (1 / max(n_updates - 1, 1))
    history: list[dict] = []
    loss_sum, loss_n, it = 0.0, 0, 0
    bar = tqdm(total=total, disable=not progress, desc="ADMM", leave=False, mininterval=1.0)
    try:
        for epoch in range(epochs):
            for x, y in tsdata.batches(ds, ds.train, batch_size, train=True, epoch=epoch, seed=seed):
                x, y = x.to(device), y.to(device)
                task = F.cross_entropy(work(x), y)
                penalty = sum(((w - z[n] + u[n]) ** 2).sum() for n, w in weights.items())
                loss = task + rho / 2 * penalty
                if not torch.isfinite(loss):
                    raise DivergenceError(f"ADMM epoch {epoch + 1}, iteration {it}: the loss is "
                                          f"{loss.item()}; lower the learning rate or rho")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum, loss_n, it = loss_sum + task.item(), loss_n + 1, it + 1
                if it % every == 0 or it == total:
                    support, z = project(u)
                    with torch.no_grad():
                        for n, w in weights.items():
                            u[n] += w - z[n]
                        residual = math.sqrt(sum(float(((w - z[n]) ** 2).sum())
                                                 for n, w in weights.items()))
                        norm = math.sqrt(sum(float((w ** 2).sum()) for w in weights.values()))
                    history.append({"iteration": it, "rho": rho, "loss": loss_sum / loss_n,
                                    "residual": residual / max(norm, 1e-12)})
                    loss_sum, loss_n = 0.0, 0
                    # U is the dual scaled by 1/rho: rescale it when rho changes (Boyd et al.
                    # 2011, §3.4.1), or the multiplier would jump with the penalty.
                    new_rho = min(rho * growth, rho_max)
                    with torch.no_grad():
                        for t in u.values():
                            t.mul_(rho / new_rho)
                    rho = new_rho
                bar.update(1)
                bar.set_postfix(loss=f"{task.item():.3f}", rho=f"{rho:.2g}", refresh=False)
    finally:
        bar.close()
        hold.remove()
    return support, work, history
