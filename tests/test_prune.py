import math

import pytest
import torch

import ticketsmith as ts
from ticketsmith.errors import UsageError


def model():
    torch.manual_seed(0)
    return ts.models.create("resnet20", 1, 10, (28, 28), width=0.5)


def test_imp_rounds_follow_point_eight_to_the_r():
    m = model()
    masks = ts.Masks.ones(m)
    total = masks.numel()
    n_layers = len(masks.weight_names)
    for r in range(1, 8):
        with torch.no_grad():  # new "trained" weights each round
            for p in m.parameters():
                p.copy_(torch.randn_like(p))
        masks = ts.prune.magnitude(m, masks, 0.2)
        assert abs(masks.nonzeros() - 0.8 ** r * total) <= n_layers
        assert masks.sparsity() == pytest.approx(1 - 0.8 ** r, abs=n_layers / total)


def test_magnitude_prunes_smallest_among_survivors_only():
    m = model()
    masks = ts.prune.omp(m, 0.5)
    params = dict(m.named_parameters())
    with torch.no_grad():  # a pruned weight with a large value must stay pruned
        name = masks.weight_names[3]
        params[name][~masks[name]] = 100.0
    nxt = ts.prune.magnitude(m, masks, 0.2)
    for k in masks.weight_names:
        assert not (nxt[k] & ~masks[k]).any()
    kept = torch.cat([params[k].abs()[nxt[k]] for k in nxt.weight_names])
    dropped = torch.cat([params[k].abs()[masks[k] & ~nxt[k]] for k in nxt.weight_names])
    assert kept.min() >= dropped.max()


def test_omp_and_random_hit_target_sparsity():
    m = model()
    for s in (0.0, 0.5, 0.9, 0.99):
        omp = ts.prune.omp(m, s)
        assert abs(omp.nonzeros() - round((1 - s) * omp.numel())) <= 1
        rp = ts.prune.random_masks(m, s, seed=1)
        for k in rp.weight_names:  # layer-wise uniform
            assert abs(rp.layer_sparsity()[k] - s) <= 1 / rp[k].numel() + 1e-9
    assert ts.prune.random_masks(m, 0.5, seed=1) == ts.prune.random_masks(m, 0.5, seed=1)
    assert ts.prune.random_masks(m, 0.5, seed=1) != ts.prune.random_masks(m, 0.5, seed=2)
    for bad in (-0.1, 1.0, math.nan):
        with pytest.raises(UsageError):
            ts.prune.omp(m, bad)
