"""Dynamic sparse training (ticketsmith.dst): SRigL, RigL, SET, ERK budgets."""
import copy
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import ticketsmith as ts
from ticketsmith import dst
from ticketsmith.errors import UsageError
from ticketsmith.io import load_tensors, save_tensors


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))


def convnet(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 24), nn.ReLU(),
                         nn.Linear(24, 5))


def data(model, n=256, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (n, 32) if isinstance(model[0], nn.Linear) else (n, 3, 8, 8)
    x = torch.randn(shape, generator=g)
    out = model[-1].out_features
    y = (x.flatten(1) @ torch.randn(x[0].numel(), out, generator=g)).argmax(1)
    return x, y


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)


def train(model, opt, s, x, y, steps, batch=32, seed=2, on_update=None):
    """A plain loop (zero_grad, backward, optimizer.step, s.step); `on_update(old, new)` after
    every mask update, with the masks before and after it. Checks after every backward pass
    that the gradients of pruned weights are masked and that the dense gradient is captured
    (in full) during the `grad_accumulation` steps before an update."""
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    for _ in range(steps):
        idx = torch.randint(0, len(y), (batch,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t, dt = s.step_count + 1, s.settings["delta_t"]
        nxt = -(-t // dt) * dt
        window = s.is_update_step(nxt) and nxt - t < s.settings["grad_accumulation"]
        outside = 0
        for n in s.sparse_names:
            assert not params[n].grad[~s.masks[n]].any(), f"{n}: a pruned weight has a gradient"
            if s.needs_dense_grad:
                assert (n in s._dense_grad) == window
                if window:
                    outside += int((s._dense_grad[n][~s.masks[n]] != 0).sum())
        assert outside > 0 or not (window and s.needs_dense_grad), "no dense gradient captured"
        opt.step()
        old = s.masks
        s.step()
        if on_update is not None and s.is_update_step(s.step_count):
            on_update(old, s.masks)


def check_zero_outside(model, masks):
    params = dict(model.named_parameters())
    for n in masks:
        assert not params[n][~masks[n]].any(), f"{n}: a pruned weight is nonzero"


def check_srigl_update(s, model, opt, old, new):
    params = dict(model.named_parameters())
    for n in s.sparse_names:
        m = new[n].reshape(new[n].shape[0], -1)
        per_row = m.sum(1)
        active = per_row > 0
        a = int(active.sum())
        k = s.budgets[n] // a
        assert k <= m.shape[1], f"{n}: fan-in {k} exceeds the dense fan-in"
        assert (per_row[active] == k).all(), f"{n}: fan-in not constant {per_row.tolist()}"
        assert int(m.sum()) == k * a and s.budgets[n] - a < k * a <= s.budgets[n]
        w = params[n].detach().reshape(m.shape)
        assert not w[~active].any(), f"{n}: an ablated neuron has a nonzero weight"
        if n == s.output_layer:
            assert a == m.shape[0], "the output layer lost a neuron"
        grown = new[n] & ~old[n]
        assert not params[n][grown].any(), f"{n}: a grown weight is not zero"
        buf = opt.state[params[n]]["momentum_buffer"]
        assert not buf[grown].any(), f"{n}: a grown weight kept momentum"
        assert not buf[~new[n]].any(), f"{n}: a pruned weight has momentum"
    check_zero_outside(model, new)


@pytest.mark.parametrize("make,include_head,gamma", [(mlp, True, 0.95), (mlp, False, 0.3),
                                                     (convnet, True, 0.6)])
def test_srigl_invariants_over_many_updates(make, include_head, gamma):
    model = make()
    opt = sgd(model)
    x, y = data(model)
    s = dst.SRigL(model, opt, 0.9, 400, delta_t=5, gamma_sal=gamma, include_head=include_head,
                  grad_accumulation=2)
    start = s.masks
    for n in s.sparse_names:  # sparse-aware init: exactly k per neuron, std from the sparse fan-in
        m = start[n].reshape(start[n].shape[0], -1)
        k = s.budgets[n] // m.shape[0]
        assert (m.sum(1) == k).all()
        w = dict(model.named_parameters())[n].detach().reshape(m.shape)[m]
        assert w.std().item() == pytest.approx(math.sqrt(2 / k), rel=0.35)
    check_zero_outside(model, start)
    seen = {"updates": 0, "ablated": 0, "grown": 0}

    def on_update(old, new):
        check_srigl_update(s, model, opt, old, new)
        seen["updates"] += 1
        seen["grown"] += sum(int((new[n] & ~old[n]).sum()) for n in s.sparse_names)
        seen["ablated"] += sum(int((~new[n].reshape(new[n].shape[0], -1).any(1)).sum())
                               for n in s.sparse_names)

    train(model, opt, s, x, y, 400, on_update=on_update)
    assert seen["updates"] == len(range(5, 300, 5)) and s.stats()["updates"] == seen["updates"]
    assert seen["grown"] > 0, "no weight was ever regrown"
    if gamma >= 0.6:
        assert seen["ablated"] > 0, "the test never exercised ablation"
    check_zero_outside(model, s.masks)
    # after T_end the masks are frozen
    frozen = s.masks
    train(model, opt, s, x, y, 10, seed=3)
    assert s.masks == frozen


def test_srigl_drop_keeps_top_k_by_magnitude_and_revives_by_gradient():
    """One crafted update: a revived neuron lowers k, so a neuron holding more than the new k
    must keep its largest weights (not the first ones), and grow where the gradient is largest."""
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    s = dst.SRigL(model, sgd(model), 0.625, 100, delta_t=10, distribution="uniform")
    assert s.sparse_names == ["0.weight"] and s.budgets["0.weight"] == 12
    m = torch.zeros(4, 8, dtype=torch.bool)
    m[0, 2:] = True  # rows 0, 1 active with k = 6; rows 2, 3 ablated
    m[1, :6] = True
    w = torch.zeros(4, 8)
    w[0, 2:] = torch.tensor([7., 8, 9, 10, 11, 12])  # largest at the end: index order is wrong
    w[1, :6] = torch.tensor([6., -5, 4, -3, 2, 1])
    g = torch.zeros(4, 8)
    g[2] = torch.tensor([0., 9, 0, 8, 0, 7, 0, 6])  # row 2 becomes salient by gradient
    g[1, 7] = 5.0
    # n_on = 12, n_drop = 3: salient = 9 largest |W| (row 0: 6, row 1: 3) + 3 largest grads (row 2)
    new = s._update_layer("0.weight", w, g, m, 0.25)
    assert new.sum(1).tolist() == [4, 4, 4, 0]  # a = 3 active, k = 12 // 3 = 4
    assert new[0].nonzero().flatten().tolist() == [4, 5, 6, 7]  # the 4 largest of row 0
    assert new[1].nonzero().flatten().tolist() == [0, 1, 2, 7]  # top 3 kept + top grad grown
    assert new[2].nonzero().flatten().tolist() == [1, 3, 5, 7]  # revived, filled by gradient
    # gamma_sal = 1: only row 0 is salient enough, but at least ceil(B / n) = 2 neurons stay
    # active (else k would exceed n = 8): the most salient, ties to the lower index
    s2 = dst.SRigL(model, sgd(model), 0.625, 100, delta_t=10, distribution="uniform", gamma_sal=1.0)
    m2 = torch.zeros(4, 8, dtype=torch.bool)
    m2[:, :3] = True  # k = 3 everywhere
    w2 = torch.zeros(4, 8)
    w2[:, :3] = torch.tensor([[9., 9, 9], [1, 1, 1], [1, 1, 1], [1, 1, 1]])
    g2 = torch.zeros(4, 8)
    g2[0, 3:], g2[1, 3:5], g2[2, 3:5] = 10.0, 5.0, 4.0
    # n_drop = 9: salient = row 0's three 9s + 9 grads -> counts 8, 2, 2, 0 vs threshold 3
    new2 = s2._update_layer("0.weight", w2, g2, m2, 0.75)
    assert new2[0].nonzero().flatten().tolist() == [0, 1, 2, 3, 4, 5]
    assert new2[1].nonzero().flatten().tolist() == [0, 1, 2, 3, 4, 5]
    assert new2.sum(1).tolist() == [6, 6, 0, 0]


def test_srigl_without_ablation_keeps_every_neuron_and_k():
    model = mlp()
    opt = sgd(model)
    x, y = data(model)
    s = dst.SRigL(model, opt, 0.95, 200, delta_t=4, ablation=False, gamma_sal=1.0,
                  include_head=True)
    k0 = s.fan_in()
    changed = []

    def on_update(old, new):
        check_srigl_update(s, model, opt, old, new)
        assert s.fan_in() == k0
        assert all(bool(v.all()) for v in s.active_neurons().values())
        changed.append(old != new)

    train(model, opt, s, x, y, 100, on_update=on_update)
    assert any(changed)


@pytest.mark.parametrize("cls", [dst.RigL, dst.SET])
def test_rigl_and_set_keep_the_layer_budget(cls):
    model = convnet()
    opt = sgd(model)
    x, y = data(model)
    s = cls(model, opt, 0.8, 120, delta_t=4, include_head=True)
    changes = []

    def on_update(old, new):
        params = dict(model.named_parameters())
        for n in s.sparse_names:
            assert int(new[n].sum()) == s.budgets[n]
            grown = new[n] & ~old[n]
            assert not params[n][grown].any()
            assert not opt.state[params[n]]["momentum_buffer"][grown].any()
        check_zero_outside(model, new)
        changes.append(sum(int((new[n] & ~old[n]).sum()) for n in s.sparse_names))

    train(model, opt, s, x, y, 120, on_update=on_update)
    assert len(changes) == len(range(4, 90, 4)) and sum(changes) > 0
    assert s.masks.sparsity() == pytest.approx(0.8, abs=1e-3)


def test_rigl_grows_where_the_dense_gradient_is_largest():
    model = nn.Sequential(nn.Linear(6, 3), nn.ReLU(), nn.Linear(3, 2))
    s = dst.RigL(model, sgd(model), 0.5, 100, delta_t=10, distribution="uniform")
    m = torch.tensor([[1, 1, 1, 0, 0, 0]] * 3, dtype=torch.bool)
    w = torch.tensor([[5., 4, 0.1, 0, 0, 0], [3, 2, 1, 0, 0, 0], [0.2, 6, 7, 0, 0, 0]])
    g = torch.zeros(3, 6)
    g[1, 4], g[2, 5], g[0, 3] = 3.0, -2.0, 1.0
    new = s._update_layer("0.weight", w, g, m, 0.25)  # 9 on, drop 2 (0.1, 0.2), grow 2
    assert int(new.sum()) == 9
    assert not new[0, 2] and not new[2, 0]
    assert new[1, 4] and new[2, 5] and not new[0, 3]


def test_erk_densities_are_at_most_one_and_meet_the_budget():
    model = ts.models.create("resnet20", 1, 10, (28, 28), width=0.25)
    names = ts.prunable_names(model, include_head=True)
    params = dict(model.named_parameters())
    shapes = {n: tuple(params[n].shape) for n in names}
    total = sum(math.prod(s) for s in shapes.values())
    saw_dense = False
    for sparsity in (0.3, 0.5, 0.8, 0.9, 0.95, 0.99):
        for dist in ("erk", "uniform"):
            b = dst.layer_budgets(shapes, sparsity, dist)
            assert sum(b.values()) == round((1 - sparsity) * total)
            assert all(0 <= b[n] <= math.prod(shapes[n]) for n in names)
            sparse = [n for n in names if b[n] < math.prod(shapes[n])]
            saw_dense |= len(sparse) < len(names)
            # every non-saturated layer has density proportional to its raw ERK score
            ratios = [b[n] / math.prod(shapes[n]) / dst.raw_density(shapes[n], dist) for n in sparse]
            for n, r in zip(sparse, ratios):
                tol = sum(1.0 / math.prod(shapes[q]) / dst.raw_density(shapes[q], dist)
                          for q in (n, sparse[0]))
                assert r == pytest.approx(ratios[0], abs=tol)
    assert saw_dense, "the saturation (dense layer) path was not exercised"
    d = dst.layer_densities(model, names, 0.9)
    assert all(v <= 1 for v in d.values()) and max(d.values()) > min(d.values())
    # user-kept dense layers spend their size from the same budget
    b = dst.layer_budgets(shapes, 0.9, "erk", dense=[names[0]])
    assert b[names[0]] == math.prod(shapes[names[0]])
    assert sum(b.values()) == round(0.1 * total)


def test_same_seed_same_masks_other_seed_other_masks():
    def run(seed):
        model = mlp()
        opt = sgd(model)
        x, y = data(model)
        s = dst.SRigL(model, opt, 0.9, 60, delta_t=5, seed=seed, gamma_sal=0.6)
        first = s.masks
        train(model, opt, s, x, y, 60)
        return first, s.masks, dict(model.named_parameters())["2.weight"].detach().clone()
    a, b, c = run(0), run(0), run(1)
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])
    assert a[0] != c[0]


@pytest.mark.parametrize("method", ["srigl", "rigl", "set"])
def test_state_dict_round_trip_continues_identically(tmp_path, method):
    x, y = data(mlp())

    def build(seed):
        model = mlp(seed)
        opt = sgd(model)
        s = dst.make_sparsifier(method, model, opt, 60, 0.9, delta_t=5, grad_accumulation=3,
                                include_head=True, **({"gamma_sal": 0.9} if method == "srigl" else {}))
        return model, opt, s

    model, opt, s = build(0)
    train(model, opt, s, x, y, 14, seed=5)  # mid-accumulation: steps 13, 14 feed update 15
    tensors, meta = s.state_dict()
    if method != "set":
        assert any(k.startswith("dense_grad/") for k in tensors)
    save_tensors(tmp_path / "s.safetensors", {**{f"s/{k}": v for k, v in tensors.items()},
                                              **{f"m/{k}": v for k, v in model.state_dict().items()}},
                 {"sparsifier": meta, "opt": opt.state_dict()["param_groups"]})
    opt_state = {k: {kk: vv.clone() for kk, vv in v.items()} for k, v in opt.state_dict()["state"].items()}
    train(model, opt, s, x, y, 40, seed=6)
    # a fresh model (another init) and sparsifier, restored from the files
    model2, opt2, s2 = build(7)
    t, meta2 = load_tensors(tmp_path / "s.safetensors")
    model2.load_state_dict({k[2:]: v for k, v in t.items() if k.startswith("m/")})
    opt2.load_state_dict({"state": opt_state, "param_groups": meta2["opt"]})
    s2.load_state_dict(({k[2:]: v for k, v in t.items() if k.startswith("s/")}, meta2["sparsifier"]))
    train(model2, opt2, s2, x, y, 40, seed=6)
    assert s2.masks == s.masks
    assert s2.stats() == s.stats()
    for (n, p), (_, q) in zip(model.named_parameters(), model2.named_parameters()):
        assert torch.equal(p, q), n
    # a checkpoint from other settings is refused
    model3 = mlp()
    s3 = dst.make_sparsifier(method, model3, sgd(model3), 60, 0.8, delta_t=5, grad_accumulation=3,
                             include_head=True)
    with pytest.raises(UsageError, match="sparsity"):
        s3.load_state_dict(s.state_dict())


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kwargs,match", [
    (dict(sparsity=0.0), "sparsity"), (dict(sparsity=1.0), "sparsity"),
    (dict(sparsity=-0.2), "sparsity"), (dict(sparsity=float("nan")), "sparsity"),
    (dict(sparsity=True), "sparsity"), (dict(total_steps=50, delta_t=100), "total_steps"),
    (dict(total_steps=120, delta_t=100), "no mask update"),
    (dict(grad_accumulation=0), "grad_accumulation"), (dict(t_end=0), "t_end"),
    (dict(gamma_sal=1.5), "gamma_sal"), (dict(distribution="er"), "distribution"),
    (dict(dense_layers=["nope"]), "nope"),
    (dict(dense_layers=["0", "2"], sparsity=0.5), "cannot be met"),
])
def test_bad_settings_raise_and_leave_the_model_alone(kwargs, match):
    model = mlp()
    opt = sgd(model)
    before = snapshot(model)
    args = dict(sparsity=0.9, total_steps=200, delta_t=10)
    args.update(kwargs)
    with pytest.raises(UsageError, match=match):
        dst.SRigL(model, opt, **args)
    assert same(before, snapshot(model))
    assert all(not p._backward_hooks for p in model.parameters())
    assert not opt._optimizer_step_post_hooks


def test_bad_models_raise_and_leave_the_model_alone():
    no_layers = nn.Sequential(nn.BatchNorm1d(4))
    with pytest.raises(UsageError, match="no prunable"):
        dst.SRigL(no_layers, sgd(no_layers), 0.9, 100, delta_t=10)
    # 50 neurons, 2 inputs each: 10 weights at 90% sparsity is less than one per neuron
    thin = nn.Sequential(nn.Linear(2, 50), nn.ReLU(), nn.Linear(50, 3))
    before = snapshot(thin)
    with pytest.raises(UsageError, match="0.weight.*less than one per neuron"):
        dst.SRigL(thin, sgd(thin), 0.9, 100, delta_t=10, distribution="uniform")
    assert same(before, snapshot(thin))
    other = mlp()
    with pytest.raises(UsageError, match="optimizer"):
        dst.RigL(other, sgd(mlp()), 0.9, 100, delta_t=10)
    with pytest.raises(UsageError, match="unknown dynamic sparse training method"):
        dst.make_sparsifier("snip", other, sgd(other), 100, 0.9)
    with pytest.raises(UsageError, match="gamma_sal.*does not apply"):
        dst.make_sparsifier("rigl", other, sgd(other), 100, 0.9, delta_t=10, gamma_sal=0.5)
    with pytest.raises(UsageError, match="unknown dynamic sparse training setting"):
        dst.make_sparsifier("srigl", other, sgd(other), 100, 0.9, delta_t=10, beta=1)


def test_make_sparsifier_passes_settings_and_tolerates_defaults_of_other_methods():
    model = mlp()
    s = dst.make_sparsifier("set", model, sgd(model), 100, 0.8, delta_t=10, gamma_sal=0.3,
                            ablation=True, distribution="uniform")
    assert isinstance(s, dst.SET) and s.settings["delta_t"] == 10
    assert s.settings["distribution"] == "uniform"
    s.remove()
    assert all(not p._backward_hooks for p in model.parameters())


def test_trainer_integration_records_stats_and_resumes_bit_exactly(digits):
    cfg = ts.TrainConfig(epochs=2, batch_size=128, lr=0.05, seed=0)

    def setup():
        torch.manual_seed(0)
        model = ts.models.for_dataset("mlp-300-100", digits, width=0.25)
        trainer = ts.Trainer(model, digits, cfg, progress=False)
        s = dst.make_sparsifier("srigl", model, trainer.optimizer, trainer.total_iters, 0.9,
                                delta_t=3, gamma_sal=0.6, include_head=True)
        return model, trainer, s

    model, trainer, s = setup()
    saved = {}

    def on_epoch_end(epoch, history):  # what the run layer writes to disk, copied
        tensors, meta = trainer.state(epoch, history, s)
        saved[epoch] = ({k: v.clone() for k, v in tensors.items()}, copy.deepcopy(meta))

    result = trainer.fit(masks=None, sparsifier=s, on_epoch_end=on_epoch_end)
    assert len(result.history) == 2
    for rec in result.history:
        layers = rec["extra"]["layers"]
        assert set(layers) == set(s.names)
        for v in layers.values():
            assert v["nonzeros"] == v["fan_in"] * v["active_neurons"] <= v["budget"]
    assert result.history[-1]["extra"]["step"] == trainer.total_iters
    assert result.history[-1]["extra"]["updates"] > 0
    check_zero_outside(model, s.masks)
    assert result.history[-1]["train_acc"] > 0.3
    # resume from the epoch-1 checkpoint: the same weights and masks as the uninterrupted run
    model2, trainer2, s2 = setup()
    tensors, meta = saved[1]
    trainer2.fit(masks=None, sparsifier=s2, resume=(tensors, meta))
    assert s2.masks == s.masks
    for (n, p), (_, q) in zip(model.named_parameters(), model2.named_parameters()):
        assert torch.equal(p, q), n
