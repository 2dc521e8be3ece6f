"""Pruning at initialization: SNIP, GraSP and SynFlow (paper 002 §3.1, §5 "different sources
of unstructured masks").

Each function scores the weights of the layers in a base `masks` (default `Masks.ones(model)`,
which leaves the classifier head out) and keeps, globally across those layers, the
`round((1 - sparsity) * masks.numel())` best-scored weights among those the base masks keep
(the same count as `ticketsmith.prune.omp`). Scores are computed on a deep copy of the model
with the base masks applied, so the model passed in -- its weights, gradients and BatchNorm
running statistics -- is never touched.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Union

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import UsageError
from ..masks import Masks, copy_module
from . import check_sparsity, keep_top

Batch = tuple[torch.Tensor, torch.Tensor]
Data = Union[Batch, Iterable[Batch]]


def _setup(model: nn.Module, sparsity: float, masks: Masks | None) -> tuple[nn.Module, Masks, int]:
    """The working copy (base masks applied), the base masks and the number of weights to keep."""
    check_sparsity(sparsity)
    if not isinstance(model, nn.Module):
        raise UsageError(f"expected a torch.nn.Module, got {type(model).__name__}")
    masks = masks if masks is not None else Masks.ones(model)  # raises if nothing is prunable
    if not masks.weight_names:
        raise UsageError("the base masks hold no conv or linear weight to prune")
    masks.check(model)
    work = copy_module(model)
    for p in work.parameters():
        p.grad = None
    masks.apply(work)
    keep = int(math.floor((1 - sparsity) * masks.numel() + 0.5))
    return work, masks, keep


def _batches(data: Data, device: torch.device) -> Iterator[Batch]:
    """`data` as (x, y) batches on `device`, checked one by one and streamed: `data` is one
    batch or an iterable of them (a generator such as `ticketsmith.data.batches` is fine)."""
    if (isinstance(data, (tuple, list)) and len(data) == 2
            and all(isinstance(t, torch.Tensor) for t in data)):
        data = [tuple(data)]
    if isinstance(data, (str, bytes, torch.Tensor)) or not isinstance(data, Iterable):
        raise UsageError(f"data must be an (x, y) batch or an iterable of them, "
                         f"got {type(data).__name__}")
    n = 0
    for b in data:
        if not (isinstance(b, (tuple, list)) and len(b) == 2
                and all(isinstance(t, torch.Tensor) for t in b)):
            raise UsageError(f"data item {n} is not an (x, y) pair of tensors")
        x, y = b
        if len(x) == 0 or len(x) != len(y):
            raise UsageError(f"data batch {n}: {len(x)} inputs and {len(y)} labels")
        n += 1
        yield x.to(device), y.to(device)
    if n == 0:
        raise UsageError("no data: the pruning criterion needs at least one (x, y) batch")


def _on(scores: dict[str, torch.Tensor], masks: Masks) -> dict[str, torch.Tensor]:
    """Scores detached and on their masks' devices, as keep_top compares them there."""
    return {n: t.detach().to(masks[n].device) for n, t in scores.items()}


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def snip(model: nn.Module, sparsity: float, data: Data, masks: Masks | None = None) -> Masks:
    """SNIP (Lee et al. 2019): keep the weights with the largest connection sensitivity
    |dL/dw * w|, the loss gradients summed over the batches of `data`: one (x, y) batch or an
    iterable of them, all of which are used (the paper uses one batch; pass a few, e.g.
    `itertools.islice(ticketsmith.data.batches(...), n)`)."""
    work, masks, keep = _setup(model, sparsity, masks)
    params = dict(work.named_parameters())
    # Train mode: BatchNorm normalises with batch statistics, as in the first training step;
    # the copy's running statistics move, the caller's model's do not.
    work.train()
    for x, y in _batches(data, _device(work)):
        F.cross_entropy(work(x), y).backward()
    scores = {}
    for n in masks.weight_names:
        g = params[n].grad
        scores[n] = (g * params[n]).abs() if g is not None else torch.zeros_like(params[n])
    return keep_top(_on(scores, masks), masks, keep)


def grasp(model: nn.Module, sparsity: float, data: Data, masks: Masks | None = None,
          temperature: float = 200.0) -> Masks:
    """GraSP (Wang et al. 2020): prune the weights whose removal least reduces the gradient
    flow ||g||^2, scored by S(-w) = -w * (H g) on the batches of `data` (as for `snip`; held in
    memory for the two passes; the paper uses 10 examples per class) with the logits divided
    by `temperature`."""
    if not (temperature > 0 and math.isfinite(temperature)):
        raise UsageError(f"temperature must be a positive number, got {temperature}")
    work, masks, keep = _setup(model, sparsity, masks)
    batches = list(_batches(data, _device(work)))  # two passes over the same batches
    work.train()  # batch statistics, as for SNIP
    named = dict(work.named_parameters())
    # theta: every trainable parameter (the paper's gradient norm is over all of them).
    theta = [p for p in work.parameters() if p.requires_grad]
    # Pass 1: g = dL/dtheta, a constant for the Hessian-gradient product.
    g = [torch.zeros_like(p) for p in theta]
    for x, y in batches:
        loss = F.cross_entropy(work(x) / temperature, y)
        for acc, gi in zip(g, torch.autograd.grad(loss, theta, allow_unused=True)):
            if gi is not None:
                acc += gi
    # Pass 2: H g = d(g_const . dL/dtheta)/dtheta (double backward), summed over batches.
    for x, y in batches:
        loss = F.cross_entropy(work(x) / temperature, y)
        grads = torch.autograd.grad(loss, theta, create_graph=True, allow_unused=True)
        z = sum((gc * gi).sum() for gc, gi in zip(g, grads) if gi is not None)
        if isinstance(z, torch.Tensor) and z.requires_grad:
            z.backward()
    # Sign convention (Wang et al. 2020, eq. 8 and Alg. 1): removing w_q changes the gradient
    # flow by about 2 * S(-w)_q with S(-w) = -w * Hg, so a LARGE score means the removal keeps
    # (or raises) the flow: the highest scores are pruned, the lowest kept. keep_top keeps the
    # highest, hence it gets -S = w * Hg.
    scores = {}
    for n in masks.weight_names:
        hg = named[n].grad
        scores[n] = named[n].detach() * hg if hg is not None else torch.zeros_like(named[n])
    return keep_top(_on(scores, masks), masks, keep)


def _input_shape(example_inputs: torch.Tensor | Sequence[int]) -> tuple[int, ...]:
    if isinstance(example_inputs, torch.Tensor):
        if example_inputs.dim() < 2:
            raise UsageError("example_inputs must be a batch (N x ...), got a tensor of shape "
                             f"{tuple(example_inputs.shape)}")
        return tuple(example_inputs.shape[1:])
    try:
        shape = tuple(int(s) for s in example_inputs)
    except (TypeError, ValueError):
        raise UsageError("example_inputs must be a tensor or the shape of one input, got "
                         f"{type(example_inputs).__name__}") from None
    if not shape or any(s < 1 for s in shape):
        raise UsageError(f"input shape must be positive sizes, got {shape}")
    return shape


@torch.no_grad()
def _linearise(work: nn.Module) -> None:
    """Turn the copy into the positive, bias-free network whose output sums to the synaptic
    flow R = 1^T (prod_l |W_l|) 1.

    Weights become |w| and biases zero (the paper's R has no bias terms). BatchNorm is used in
    eval mode, where it is a per-channel affine map; with the running mean and beta zeroed and
    gamma made |gamma| it is the diagonal layer |gamma| / sqrt(var + eps), a positive link of
    every path through it. (Train-mode BatchNorm would normalise the all-ones input away.) At
    initialization (zero biases, beta = 0, running mean 0, var 1) this is exactly the reference
    treatment (eval mode, abs of every state entry); after training it does not let |mean| be
    subtracted, which could make activations negative and break the path-product form.
    """
    work.eval()
    for m in work.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if m.running_mean is not None:
                m.running_mean.zero_()
            if m.running_var is not None:
                m.running_var.abs_()
            if m.affine:
                m.weight.abs_()
                m.bias.zero_()
        else:
            for name, p in m.named_parameters(recurse=False):
                if name == "bias":
                    p.zero_()
                else:
                    p.abs_()


def synflow(model: nn.Module, sparsity: float, example_inputs: torch.Tensor | Sequence[int],
            iterations: int = 100, masks: Masks | None = None) -> Masks:
    """SynFlow (Tanaka et al. 2020): data-free iterative pruning by synaptic saliency
    |dR/dw * w| of the linearised network, over `iterations` rounds whose density falls
    exponentially from the base masks' to the target.

    `example_inputs`: a batch of inputs (only its per-example shape is used) or the shape of
    one input without the batch dimension, e.g. (1, 28, 28).
    """
    if not (isinstance(iterations, int) and iterations >= 1):
        raise UsageError(f"iterations must be a positive integer, got {iterations}")
    shape = _input_shape(example_inputs)
    work, masks, keep = _setup(model, sparsity, masks)
    work.double()  # path products overflow float32 on deep nets
    _linearise(work)
    params = dict(work.named_parameters())
    base = {n: params[n].detach().clone() for n in masks.weight_names}  # |w| under base masks
    ones = torch.ones((1,) + shape, dtype=torch.float64, device=_device(work))
    start = masks.nonzeros()
    if keep > start:
        raise UsageError(f"cannot keep {keep} weights: the base masks keep only {start}")
    current = masks
    for k in range(1, iterations + 1):
        # Exponential schedule: the kept count falls geometrically from `start` to `keep`.
        target = keep if k == iterations or start == 0 else int(math.floor(
            start * (max(keep, 1) / start) ** (k / iterations) + 0.5))
        with torch.no_grad():
            for n in masks.weight_names:
                params[n].copy_(base[n] * current[n].to(base[n]))
        for p in work.parameters():
            p.grad = None
        r = work(ones).sum()
        r.backward()
        if not torch.isfinite(r):
            raise UsageError(f"SynFlow: the synaptic flow overflowed float64 at round {k} "
                             f"({type(model).__name__} is too deep or its weights too large)")
        scores = {}
        for n in masks.weight_names:
            g = params[n].grad
            scores[n] = ((g * params[n]).abs() if g is not None
                         else torch.zeros_like(params[n])).detach()
        # keep_top ranks in float32: rescale so the largest score is 1 (order is unchanged).
        top = max(float(s.max()) for s in scores.values())
        scores = {n: s / top if top > 0 else s for n, s in scores.items()}
        current = keep_top(_on(scores, current), current, target)
    return current
