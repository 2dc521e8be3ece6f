"""Mask sources: SNIP, GraSP, SynFlow (pruning at initialization) and ADMM."""
import copy
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

import ticketsmith as ts
from ticketsmith.errors import UsageError
from ticketsmith.prune.admm import admm, admm_train
from ticketsmith.prune.pai import _linearise, grasp, snip, synflow


def expected_keep(masks, s):
    return int(math.floor((1 - s) * masks.numel() + 0.5))


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    after = model.state_dict()
    assert set(after) == set(before)
    for k, v in before.items():  # bit-identical, BN running statistics included
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), k
    assert all(p.grad is None for p in model.parameters())


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models


@pytest.fixture(scope="module")
def setup():
    ds = ts.data.load("digits")
    x, y = next(ts.data.batches(ds, ds.train, 16, train=True, seed=3))
    torch.manual_seed(0)
    model = ts.models.for_dataset("resnet20", ds, width=0.25)
    return ds, model, (x, y)


def run(source, model, s, batch, masks=None, **kw):
    if source == "synflow":
        return synflow(model, s, batch[0], masks=masks, iterations=kw.pop("iterations", 20), **kw)
    return {"snip": snip, "grasp": grasp}[source](model, s, batch, masks=masks, **kw)


@pytest.mark.parametrize("source", ["snip", "grasp", "synflow"])
def test_exact_count_untouched_model_and_determinism(setup, source):
    _, model, batch = setup
    model.train()
    before = snapshot(model)
    base = ts.Masks.ones(model)
    for s in (0.0, 0.5, 0.93):
        m = run(source, model, s, batch)
        assert m.weight_names == base.weight_names
        assert m.nonzeros() == expected_keep(base, s)
    assert m == run(source, model, s, batch)  # deterministic for a fixed batch
    assert_unchanged(model, before)
    assert model.training  # mode restored (never switched: the work is on a copy)


@pytest.mark.parametrize("source", ["snip", "grasp", "synflow"])
def test_restricted_to_base_masks(setup, source):
    _, model, batch = setup
    base = ts.Masks.ones(model, include_first=False)
    base = ts.prune.omp(model, 0.5, base)  # an already sparse base: prune within its support
    m = run(source, model, 0.8, batch, masks=base)
    assert m.weight_names == base.weight_names and "conv1.weight" not in m
    assert m.nonzeros() == expected_keep(base, 0.8)
    for k in m.weight_names:
        assert not (m[k] & ~base[k]).any()
    with pytest.raises(UsageError):  # more than the base keeps
        run(source, model, 0.2, batch, masks=base)


def test_snip_prunes_zero_gradient_weights_first_and_ranks_by_g_times_w():
    torch.manual_seed(0)
    model = ts.models.create("mlp-300-100", 1, 10, (8, 8), width=0.1)
    x = torch.randn(32, 1, 8, 8)
    x[:, :, :, :3] = 0  # 24 dead input pixels: their fan-out weights get zero gradient
    y = torch.randint(0, 10, (32,))
    ref = copy.deepcopy(model)
    F.cross_entropy(ref(x), y).backward()
    p = dict(ref.named_parameters())
    base = ts.Masks.ones(model)
    zero = {k: p[k].grad == 0 for k in base.weight_names}  # dead pixels (and dead units)
    planted = torch.zeros_like(zero["hidden.0.weight"])
    planted.view(-1, 8, 8)[:, :, :3] = True
    assert not (planted & ~zero["hidden.0.weight"]).any()
    n_zero = sum(int(z.sum()) for z in zero.values())
    assert 0 < n_zero < base.numel() // 2
    m = snip(model, n_zero / base.numel(), (x, y))
    assert base.numel() - m.nonzeros() == n_zero
    for k in m.weight_names:  # exactly the zero-gradient weights went
        assert torch.equal(~m[k], zero[k]), k
    # Against |dL/dw * w| over two batches: every kept weight scores at least every pruned one.
    m = snip(model, 0.7, [(x[:16], y[:16]), (x[16:], y[16:])])
    ref.zero_grad()
    (F.cross_entropy(ref(x[:16]), y[:16]) + F.cross_entropy(ref(x[16:]), y[16:])).backward()
    sc = {k: (p[k].grad * p[k]).abs().detach() for k in m.weight_names}
    kept = torch.cat([sc[k][m[k]] for k in m.weight_names])
    gone = torch.cat([sc[k][~m[k]] for k in m.weight_names])
    assert kept.min() >= gone.max() * (1 - 1e-5)


def test_grasp_prunes_highest_minus_w_hg_against_exact_hessian():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    T = 2.0
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat0 = torch.cat([p.detach().flatten() for p in model.parameters()])

    def loss(flat):
        ps, i = {}, 0
        for n, sh in zip(names, shapes):
            ps[n] = flat[i:i + sh.numel()].view(sh)
            i += sh.numel()
        return F.cross_entropy(functional_call(model, ps, (x,)) / T, y)

    flat = flat0.clone().requires_grad_()
    g = torch.autograd.grad(loss(flat), flat)[0]
    hg = torch.autograd.functional.hessian(loss, flat0) @ g
    S, i = {}, 0  # S(-w) = -w * Hg, per parameter
    for n, sh in zip(names, shapes):
        S[n] = (-flat0[i:i + sh.numel()] * hg[i:i + sh.numel()]).view(sh)
        i += sh.numel()
    m = grasp(model, 0.5, (x, y), temperature=T)
    assert m.weight_names == ["0.weight", "2.weight"]
    assert m.nonzeros() == expected_keep(m, 0.5)
    kept = torch.cat([S[k][m[k]] for k in m.weight_names])
    gone = torch.cat([S[k][~m[k]] for k in m.weight_names])
    assert gone.min() >= kept.max() - 1e-6 * gone.abs().max()  # the highest scores went
    assert not torch.equal(S["0.weight"].abs(), S["0.weight"])  # both signs occur: sign matters


def _flow(model, masks, shape):
    w = copy.deepcopy(model).double()
    _linearise(w)
    masks.apply(w)
    with torch.no_grad():
        return float(w(torch.ones((1,) + shape, dtype=torch.float64)).sum())


def test_synflow_avoids_layer_collapse_where_one_shot_pruning_does_not():
    torch.manual_seed(0)
    model = ts.models.create("lenet5", 1, 10, (8, 8), width=0.25)
    s = 0.99
    collapsed = lambda m: [k for k, v in m.layer_sparsity().items() if v == 1.0]  # noqa: E731
    iterative = synflow(model, s, (1, 8, 8), iterations=100)
    assert iterative.nonzeros() == expected_keep(iterative, s)
    assert collapsed(iterative) == []
    assert _flow(model, iterative, (1, 8, 8)) > 0  # input and output still connected
    # The same budget pruned in one shot (by magnitude, or by SynFlow scores without
    # iterating) disconnects the network: the iterations are what prevent it.
    for one_shot in (ts.prune.omp(model, s), synflow(model, s, (1, 8, 8), iterations=1)):
        assert collapsed(one_shot)
        assert _flow(model, one_shot, (1, 8, 8)) == 0


def test_synflow_is_data_free_and_handles_batchnorm_and_depth(setup):
    ds, _, (x, _) = setup
    torch.manual_seed(0)
    model = ts.models.create("resnet56", 1, 10, (8, 8), width=0.25)
    before = snapshot(model)
    a = synflow(model, 0.9, x, iterations=5)
    assert a == synflow(model, 0.9, (1, 8, 8), iterations=5)  # only the shape matters
    assert a.nonzeros() == expected_keep(a, 0.9)
    assert_unchanged(model, before)
    # BatchNorm is a positive per-channel scale |gamma| / sqrt(var + eps): in float32 the raw
    # path products of this deep net overflow, in float64 they do not.
    lin = copy.deepcopy(model).double()
    _linearise(lin)
    with torch.no_grad():
        r = lin(torch.ones(1, 1, 8, 8, dtype=torch.float64)).sum()
        r32 = copy.deepcopy(lin).float()(torch.ones(1, 1, 8, 8)).sum()
    assert torch.isfinite(r) and r > 0 and not torch.isfinite(r32)
    # BatchNorm enters through |gamma|: flipping gamma's sign leaves the scores unchanged.
    with torch.no_grad():
        bn = model.layers[0].bn1
        bn.weight.mul_(-1.0)  # |gamma| is used: a sign flip changes nothing
    assert synflow(model, 0.9, x, iterations=5) == a


def test_admm_on_digits():
    ds = ts.data.load("digits")
    torch.manual_seed(0)
    model = ts.models.for_dataset("lenet5", ds, width=0.5)
    before = snapshot(model)
    s = 0.8
    m, trained, hist = admm_train(model, s, ds, epochs=2, batch_size=64, rho=0.1, rho_max=1.0,
                                  update_every=5, seed=1)
    assert_unchanged(model, before)
    assert m.nonzeros() == expected_keep(m, s)
    assert [h["iteration"] for h in hist] == list(range(5, 2 * 20 + 1, 5))
    rhos = [h["rho"] for h in hist]  # geometric from rho to rho_max over the 8 updates
    assert rhos == pytest.approx([0.1 * 10 ** (i / 7) for i in range(8)])
    # ADMM pulls the pruned weights of the trained copy toward zero: they are small next to
    # the kept ones, and the primal residual ||W - Z|| / ||W|| shrinks.
    p = dict(trained.named_parameters())
    kept = torch.cat([p[k].detach().abs()[m[k]] for k in m.weight_names])
    gone = torch.cat([p[k].detach().abs()[~m[k]] for k in m.weight_names])
    assert kept.mean() > 4 * gone.mean()
    assert hist[-1]["residual"] < hist[0]["residual"]
    # The mask is that of the training, not the input's magnitudes.
    assert m != ts.prune.omp(model, s)
    assert m == admm(model, s, ds, epochs=2, batch_size=64, rho=0.1, rho_max=1.0,
                     update_every=5, seed=1)


def test_bad_input(setup):
    ds, model, batch = setup
    for bad in (-0.1, 1.0, math.nan):
        for call in (lambda: snip(model, bad, batch), lambda: grasp(model, bad, batch),
                     lambda: synflow(model, bad, batch[0]), lambda: admm(model, bad, ds)):
            with pytest.raises(UsageError):
                call()
    for data in ([], iter([]), "xy", [(batch[0],)]):
        with pytest.raises(UsageError):
            snip(model, 0.5, data)
        with pytest.raises(UsageError):
            grasp(model, 0.5, data)
    empty = copy.copy(ds)
    empty.train = ts.data.Split(ds.train.x[:0], ds.train.y[:0])
    with pytest.raises(UsageError):
        admm(model, 0.5, empty)
    with pytest.raises(UsageError):
        admm(model, 0.5, ds, rho=0.0)
    nothing = nn.Sequential(nn.Flatten(), nn.ReLU())
    for call in (lambda: snip(nothing, 0.5, batch), lambda: grasp(nothing, 0.5, batch),
                 lambda: synflow(nothing, 0.5, (1, 8, 8)), lambda: admm(nothing, 0.5, ds)):
        with pytest.raises(UsageError):
            call()
    for shape in ((), (0, 8), torch.zeros(3), "abc"):
        with pytest.raises(UsageError):
            synflow(model, 0.5, shape)
    with pytest.raises(UsageError):
        synflow(model, 0.5, (1, 8, 8), iterations=0)
    with pytest.raises(UsageError):
        grasp(model, 0.5, batch, temperature=0)
    other = ts.Masks.ones(ts.models.create("lenet5", 1, 10, (8, 8)))
    with pytest.raises(UsageError):  # masks of another model
        snip(model, 0.5, batch, masks=other)
