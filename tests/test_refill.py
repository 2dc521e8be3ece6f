"""Refill / Refill+ and channel couplings (paper §3.2, Alg. 2; ALGORITHMS.md "Refill")."""
import copy
import math
from fractions import Fraction

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import ticketsmith as ts
from ticketsmith.errors import UsageError
from ticketsmith.masks import PRUNABLE_TYPES, Masks
from ticketsmith.structure.coupling import channel_companions, channel_groups
from ticketsmith.structure.refill import CRITERIA, channel_scores, refill

X8 = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))


# -- helpers -------------------------------------------------------------------------------------
def alive(mask: torch.Tensor) -> torch.Tensor:
    """Rows (output channels) with at least one kept weight."""
    return mask.reshape(mask.shape[0], -1).any(dim=1)


def ceil_k(kept: int, total: int, c: int, extra: float = 0.0) -> int:
    k = math.ceil(Fraction(kept, total) * c)
    return k + math.floor(extra * (c - k) + 0.5)


def randomize_norms(model: nn.Module, seed: int = 0) -> None:
    """BN affine and running statistics away from identity, so that an unmasked BN really turns
    a zero channel into a nonzero constant (init has beta = 0, which would hide the bug)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g))
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def resnet20():
    torch.manual_seed(0)
    return ts.models.create("resnet20", width=0.25, image_size=(8, 8))  # widths 4-8-16


def check_structure(model, masks, out, coupling="shared", x=X8):
    """Refilled layers are whole rows, coupled layers share one set, companions match."""
    groups = channel_groups(model, x)
    for g in groups:
        names = [n for n in g.layers if n in masks]
        if g.output:
            for n in names:
                assert torch.equal(out[n], masks[n]), f"{n}: output layer changed"
            continue
        sets = {}
        for n in names:
            m = out[n]
            rows = alive(m)
            assert bool(rows.any())
            flat = m.reshape(m.shape[0], -1)
            assert bool(flat[rows].all()), f"{n}: a kept row is not dense"
            assert not bool(flat[~rows].any()), f"{n}: a dropped row is not zero"
            ch = torch.zeros(g.channels, dtype=torch.bool)
            ch[g.index[n][rows]] = True
            sets[n] = ch
        if coupling == "shared" and len(names) > 1:
            first = sets[names[0]]
            for n in names[1:]:
                # one shared set over the channels both cover
                both = torch.zeros(g.channels, dtype=torch.bool)
                both[g.index[n]] = True
                both_first = torch.zeros(g.channels, dtype=torch.bool)
                both_first[g.index[names[0]]] = True
                common = both & both_first
                assert torch.equal(sets[n][common], first[common]), f"{n} vs {names[0]}"
    # companions: with one shared set per fully masked group, zero exactly on dropped channels
    if coupling == "shared":
        for g in groups:
            if g.output or not all(n in masks for n in g.layers):
                continue
            kept = torch.zeros(g.channels, dtype=torch.bool)
            for n in g.layers:
                kept[g.index[n][alive(out[n])]] = True
            for c in g.companions:
                pos = g.index[c] >= 0
                assert torch.equal(out[c][pos], kept[g.index[c][pos]]), c


# -- inline models -------------------------------------------------------------------------------
class CatNet(nn.Module):
    """Two branches concatenated: a and b are NOT tied; the BN after the cat serves both."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 5, 1)
        self.bn = nn.BatchNorm2d(9)
        self.c = nn.Conv2d(9, 6, 3, padding=1)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        y = F.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1)))
        return self.fc(self.c(y).mean((2, 3)))


class CatAddNet(nn.Module):
    """cat(a, b) + d: a's channels tie to d's first four, b's to d's last five."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 5, 1)
        self.d = nn.Conv2d(3, 9, 1, bias=False)
        self.bn = nn.BatchNorm2d(9)
        self.c = nn.Conv2d(9, 6, 3, padding=1)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        y = F.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1) + self.d(x)))
        return self.fc(self.c(y).mean((2, 3)))


class PostAddBN(nn.Module):
    """A BatchNorm after an addition: its channel is zero only if both addends are."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.b = nn.Conv2d(3, 4, 1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.a(x) + self.b(x))).mean((2, 3)))


class InputResidual(nn.Module):
    """bn(x + a(x)): the BN also sees the model input, so zeroing it would lose information."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 3, 1, bias=False)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(self.bn(x + self.a(x)).mean((2, 3)))


# -- coupling ------------------------------------------------------------------------------------
def test_resnet20_groups_from_the_graph():
    model = resnet20()
    groups = channel_groups(model, X8)
    by_layer = {n: g for g in groups for n in g.layers}
    stage1 = by_layer["conv1.weight"]
    assert stage1.layers == ("conv1.weight", "layers.0.conv2.weight", "layers.1.conv2.weight",
                             "layers.2.conv2.weight")
    assert stage1.channels == 4 and not stage1.output
    assert set(stage1.companions) == {"bn1.weight", "bn1.bias"} | {
        f"layers.{i}.bn2.{p}" for i in range(3) for p in ("weight", "bias")}
    assert set(stage1.consumers) == {"layers.0.conv1.weight", "layers.1.conv1.weight",
                                     "layers.2.conv1.weight", "layers.3.conv1.weight",
                                     "layers.3.shortcut.0.weight"}
    for name in stage1.layers + stage1.companions + stage1.consumers:
        assert stage1.index[name].tolist() == [0, 1, 2, 3]
    stage2 = by_layer["layers.3.conv2.weight"]
    assert set(stage2.layers) == {"layers.3.conv2.weight", "layers.3.shortcut.0.weight",
                                  "layers.4.conv2.weight", "layers.5.conv2.weight"}
    assert "layers.3.shortcut.1.weight" in stage2.companions
    inner = by_layer["layers.0.conv1.weight"]
    assert inner.layers == ("layers.0.conv1.weight",)
    assert set(inner.companions) == {"layers.0.bn1.weight", "layers.0.bn1.bias"}
    assert inner.consumers == ("layers.0.conv2.weight",)
    assert by_layer["fc.weight"].output and by_layer["fc.weight"].companions == ("fc.bias",)
    assert sum(g.output for g in groups) == 1
    # each layer in exactly one group
    layers = [n for g in groups for n in g.layers]
    assert len(layers) == len(set(layers)) == 22


def test_concatenation_is_not_a_tie():
    groups = {g.layers: g for g in channel_groups(CatNet(), X8)}
    a, b = groups[("a.weight",)], groups[("b.weight",)]
    assert a.channels == 4 and b.channels == 5
    assert set(a.companions) == {"a.bias", "bn.weight", "bn.bias"}
    assert set(b.companions) == {"b.bias", "bn.weight", "bn.bias"}
    assert a.index["bn.weight"].tolist() == [0, 1, 2, 3, -1, -1, -1, -1, -1]
    assert b.index["bn.bias"].tolist() == [-1, -1, -1, -1, 0, 1, 2, 3, 4]
    assert a.index["c.weight"].tolist() == [0, 1, 2, 3, -1, -1, -1, -1, -1]
    assert b.index["c.weight"].tolist() == [-1, -1, -1, -1, 0, 1, 2, 3, 4]


def test_concatenation_then_addition_ties_with_offsets():
    groups = channel_groups(CatAddNet(), X8)
    g = next(g for g in groups if "d.weight" in g.layers)
    assert set(g.layers) == {"a.weight", "b.weight", "d.weight"} and g.channels == 9
    assert g.index["a.weight"].tolist() == [0, 1, 2, 3]
    assert g.index["b.weight"].tolist() == [4, 5, 6, 7, 8]
    assert g.index["d.weight"].tolist() == list(range(9))
    assert g.index["bn.weight"].tolist() == list(range(9))


def test_depthwise_convs_follow_their_producer():
    model = ts.models.create("mobilenet-v1", width=0.125)
    by_layer = {n: g for g in channel_groups(model, X8) for n in g.layers}
    assert set(by_layer["conv1.weight"].layers) == {"conv1.weight", "layers.0.conv1.weight"}
    assert set(by_layer["layers.0.conv2.weight"].layers) == {"layers.0.conv2.weight",
                                                             "layers.1.conv1.weight"}
    assert {"bn1.weight", "layers.0.bn1.weight"} <= set(by_layer["conv1.weight"].companions)


def test_flatten_consumer_index():
    model = ts.models.create("lenet5", in_channels=1, width=0.5, image_size=(8, 8))
    by_layer = {n: g for g in channel_groups(model) for n in g.layers}  # input shape guessed
    g = by_layer["conv2.weight"]
    fc1 = g.index["fc1.weight"]
    assert len(fc1) == model.fc1.in_features
    stride = model.fc1.in_features // g.channels
    assert fc1.tolist() == [i // stride for i in range(model.fc1.in_features)]


@pytest.mark.parametrize("name", ts.models.names())
def test_every_zoo_model(name):
    torch.manual_seed(0)
    model = ts.models.create(name, in_channels=3, width=0.125, image_size=(8, 8))
    x = torch.randn(1, 3, 8, 8)
    groups = channel_groups(model, x)
    weights = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES)]
    assert sorted(n for g in groups for n in g.layers) == sorted(weights)
    params = dict(model.named_parameters())
    for g in groups:
        for n in g.layers:
            assert g.index[n].shape == (params[n].shape[0],)
            assert 0 <= int(g.index[n].min()) and int(g.index[n].max()) < g.channels
        covered = torch.zeros(g.channels, dtype=torch.bool)
        for n in g.layers:
            covered[g.index[n]] = True
        assert bool(covered.all())
    bns = {f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)
           for p in ("weight", "bias")}
    assert bns <= {c for g in groups for c in g.companions}
    assert [g.output for g in groups].count(True) == 1
    masks = ts.prune.random_masks(model, 0.6, seed=1)
    out = refill(model, masks, coupling="shared", example_inputs=x)
    check_structure(model, masks, out, x=x)
    assert out.sparsity() > 0


# -- refill: counts, structure, coupling ---------------------------------------------------------
def test_uncoupled_keeps_exactly_k_rows_and_refill_plus_adds_extra():
    model = resnet20()
    masks = ts.prune.random_masks(model, 0.7, seed=3)
    kept_rows = {}
    for extra in (0.0, 0.25, 1.0):
        out = refill(model, masks, coupling="none", extra=extra, example_inputs=X8)
        for n in masks.weight_names:
            m, c = masks[n], masks[n].shape[0]
            assert int(alive(out[n]).sum()) == ceil_k(int(m.sum()), m.numel(), c, extra), n
        kept_rows[extra] = sum(int(alive(out[n]).sum()) for n in masks.weight_names)
        if extra == 0.25:
            check_structure(model, masks, out, coupling="none")
    assert kept_rows[0.0] < kept_rows[0.25] < kept_rows[1.0]
    assert out.sparsity() == 0.0  # extra = 1 keeps every channel


def test_k_uses_exact_arithmetic():
    # 3 of 10 weights per row -> density exactly 0.3: k = ceil(0.3 * 10) = 3, not 4
    lin = nn.Sequential(nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 2))
    m = torch.zeros(10, 10, dtype=torch.bool)
    m[:, :3] = True
    out = refill(lin, Masks({"0.weight": m}), coupling="none", example_inputs=torch.randn(1, 10))
    assert int(alive(out["0.weight"]).sum()) == 3


def test_coupled_groups_share_one_channel_set():
    model = resnet20()
    masks = ts.prune.random_masks(model, 0.6, seed=4)
    out = refill(model, masks, coupling="shared", example_inputs=X8)
    check_structure(model, masks, out, coupling="shared")
    for g in channel_groups(model, X8):
        names = [n for n in g.layers if n in masks]
        if not names or g.output:
            continue
        kept = sum(int(masks[n].sum()) for n in names)
        total = sum(masks[n].numel() for n in names)
        k = ceil_k(kept, total, g.channels)
        sets = [alive(out[n]) for n in names]
        for s in sets:
            assert int(s.sum()) == k
            assert torch.equal(s, sets[0])
    # uncoupled refill of the same masks does not align the stage (seed chosen so it differs)
    loose = refill(model, masks, coupling="none", example_inputs=X8)
    stage = ["conv1.weight", "layers.0.conv2.weight", "layers.1.conv2.weight", "layers.2.conv2.weight"]
    assert len({tuple(alive(loose[n]).tolist()) for n in stage}) > 1


@pytest.mark.parametrize("seed", [4, 7, 11])
def test_union_never_keeps_fewer_channels_than_shared_and_aligns_the_stage(seed):
    model = resnet20()
    masks = ts.prune.random_masks(model, 0.7, seed=seed)
    shared = refill(model, masks, coupling="shared", example_inputs=X8)
    union = refill(model, masks, coupling="union", example_inputs=X8)
    own = refill(model, masks, coupling="none", example_inputs=X8)
    for n in masks.weight_names:
        assert int(alive(union[n]).sum()) >= int(alive(shared[n]).sum()), n
        assert bool((alive(own[n]) <= alive(union[n])).all()), n  # every layer's own choice stays
    for g in channel_groups(model, X8):
        names = [n for n in g.layers if n in masks]
        if len(names) > 1 and not g.output:  # one channel set per group: the union of the own sets
            want = torch.zeros(g.channels, dtype=torch.bool)
            for n in names:
                want[g.index[n][alive(own[n])]] = True
            for n in names:
                assert torch.equal(alive(union[n]), want[g.index[n]]), n
    check_structure(model, masks, union, coupling="shared")  # groups share one set, as `shared`


def test_per_layer_refill_leaves_channels_compaction_cannot_remove():
    """`none` (the paper's Alg. 2): a channel conv2 of a block drops is zero in its output but
    the residual stream still carries the partners' value, so the stage keeps its width."""
    model = resnet20()
    randomize_norms(model)
    masks = ts.prune.random_masks(model, 0.7, seed=3)
    out = refill(model, masks, coupling="none", example_inputs=X8)
    small = ts.compact(model, out, torch.randn(2, 3, 8, 8))
    rows = {r["layer"]: r for r in ts.compact.describe(small)}
    stage = ["conv1", "layers.0.conv2", "layers.1.conv2", "layers.2.conv2"]
    kept_rows = {n: int(alive(out[f"{n}.weight"]).sum()) for n in stage}
    union_rows = torch.zeros(out["conv1.weight"].shape[0], dtype=torch.bool)
    for n in stage:
        union_rows |= alive(out[f"{n}.weight"])
    for n in stage:  # the compact layer writes every channel any stage member keeps
        assert rows[n]["shape_after"][0] == int(union_rows.sum())
    assert any(rows[n]["shape_after"][0] > kept_rows[n] for n in stage)  # not removable


def test_unknown_coupling_is_refused():
    with pytest.raises(UsageError, match="coupling"):
        refill(resnet20(), ts.prune.random_masks(resnet20(), 0.5), coupling="tied", example_inputs=X8)


def test_coupled_concat_model():
    torch.manual_seed(1)
    model = CatAddNet()
    x = torch.randn(2, 3, 8, 8)
    masks = ts.prune.random_masks(model, 0.5, seed=2)
    out = refill(model, masks, coupling="shared", example_inputs=x)
    g = next(g for g in channel_groups(model, x) if "d.weight" in g.layers)
    d_rows = alive(out["d.weight"])
    assert torch.equal(alive(out["a.weight"]), d_rows[:4])
    assert torch.equal(alive(out["b.weight"]), d_rows[4:])
    kept = sum(int(masks[n].sum()) for n in g.layers)
    total = sum(masks[n].numel() for n in g.layers)
    assert int(d_rows.sum()) == ceil_k(kept, total, 9)
    # the BN after the sum is zeroed exactly on the dropped channels; the conv biases too
    assert torch.equal(out["bn.weight"], d_rows) and torch.equal(out["bn.bias"], d_rows)
    assert torch.equal(out["a.bias"], d_rows[:4]) and torch.equal(out["b.bias"], d_rows[4:])
    # and on the plain concatenation, a and b choose independently, each with its own k
    model = CatNet()
    masks = ts.prune.random_masks(model, 0.5, seed=2)
    out = refill(model, masks, example_inputs=x)
    for n in ("a.weight", "b.weight", "c.weight"):
        m = masks[n]
        assert int(alive(out[n]).sum()) == ceil_k(int(m.sum()), m.numel(), m.shape[0])
    rows = torch.cat([alive(out["a.weight"]), alive(out["b.weight"])])
    assert torch.equal(out["bn.weight"], rows) and torch.equal(out["bn.bias"], rows)


@pytest.mark.parametrize("coupling", ["shared", "none", "union"])
def test_dropped_channels_output_exactly_zero(coupling):
    model = resnet20()
    randomize_norms(model)
    masks = ts.prune.random_masks(model, 0.7, seed=5)
    out = refill(model, masks, coupling=coupling, example_inputs=X8)
    groups = channel_groups(model, X8)
    by_layer = {n: g for g in groups for n in g.layers}
    # companions are zero exactly on the dropped rows of the layer feeding them
    for i in range(9):
        rows = alive(out[f"layers.{i}.conv2.weight"])
        assert torch.equal(out[f"layers.{i}.bn2.weight"], rows)
        assert torch.equal(out[f"layers.{i}.bn2.bias"], rows)
        rows = alive(out[f"layers.{i}.conv1.weight"])
        assert torch.equal(out[f"layers.{i}.bn1.bias"], rows)
    assert torch.equal(out["bn1.weight"], alive(out["conv1.weight"]))

    def outputs(ticket, train):
        seen = {}
        hooks = [m.register_forward_hook(lambda mod, i, o, n=n: seen.__setitem__(n, o.detach()))
                 for n, m in ticket.named_modules() if isinstance(m, (nn.BatchNorm2d, nn.Conv2d))
                 or n.count(".") == 1 and n.startswith("layers.")]
        ticket.train(train)
        with torch.no_grad():
            ticket(torch.randn(4, 3, 8, 8))
        for h in hooks:
            h.remove()
        return seen

    for train in (True, False):
        ticket = copy.deepcopy(model)
        out.apply(ticket)
        seen = outputs(ticket, train)
        assert sum(int((~alive(out[n])).sum()) for n in masks.weight_names) > 0
        for n in masks.weight_names:
            mod = n[:-len(".weight")]
            dropped = ~alive(out[n])
            assert not bool(seen[mod][:, dropped].any()), f"{mod} {train}"
            bn = mod.replace("conv", "bn") if "conv" in mod else mod[:-1] + "1"
            assert not bool(seen[bn][:, dropped].any()), f"{bn} in train={train}"
        if coupling != "none":
            # the residual stream itself: a stage's dropped channels are zero after every block
            for stage, blocks in ((by_layer["conv1.weight"], range(3)),
                                  (by_layer["layers.3.conv2.weight"], range(3, 6)),
                                  (by_layer["layers.6.conv2.weight"], range(6, 9))):
                dropped = ~alive(out[stage.layers[0]])
                for b in blocks:
                    assert not bool(seen[f"layers.{b}"][:, dropped].any())
    # control: the weight masks alone leave the BN constants on the dropped channels
    ticket = copy.deepcopy(model)
    Masks({n: out[n] for n in out.weight_names}).apply(ticket)
    seen = outputs(ticket, False)
    conv, bn = next((f"layers.{i}.conv{j}.weight", f"layers.{i}.bn{j}") for i in range(9) for j in (2, 1)
                    if bool((~alive(out[f"layers.{i}.conv{j}.weight"])).any()))
    assert bool(seen[bn][:, ~alive(out[conv])].any())


def test_unmasked_first_layer_and_masked_head():
    model = resnet20()
    masks = ts.prune.random_masks(model, 0.6, seed=6,
                                  masks=Masks.ones(model, include_head=True, include_first=False))
    out = refill(model, masks, coupling="shared", example_inputs=X8)
    assert "conv1.weight" not in out
    assert torch.equal(out["fc.weight"], masks["fc.weight"])  # the head is not channel-refilled
    assert "fc.bias" not in out or bool(out["fc.bias"].all())
    stage = ["layers.0.conv2.weight", "layers.1.conv2.weight", "layers.2.conv2.weight"]
    sets = [alive(out[n]) for n in stage]
    assert all(torch.equal(s, sets[0]) for s in sets) and not bool(sets[0].all())
    # the unmasked stem still writes every channel: its BN is never zeroed
    assert "bn1.weight" not in out or bool(out["bn1.weight"].all())
    assert torch.equal(out["layers.0.bn2.weight"], sets[0])
    check_structure(model, masks, out)


# -- criteria ------------------------------------------------------------------------------------
def toy():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[9., 0., 0., 0.],     # big, but pruned away below
                                          [1., 1., 1., 1.],
                                          [2., 2., 0., 0.],
                                          [0.5, 0.5, 0.5, 0.5],
                                          [3., -3., 1., 0.],
                                          [-1., 0., 0., 0.]]))
    m = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1],
                      [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)  # 14 of 24 kept -> k = 4
    return net, Masks({"0.weight": m})


def test_l1_and_count_criteria():
    net, masks = toy()
    x = torch.randn(1, 4)
    s = channel_scores(net, masks, "l1")["0.weight"]
    assert s.tolist() == [0.0, 4.0, 4.0, 2.0, 6.0, 1.0]
    out = refill(net, masks, "l1", example_inputs=x)
    # rows 4 (6), 1 and 2 (4, tie: both kept), 3 (2)
    assert alive(out["0.weight"]).tolist() == [False, True, True, True, True, False]
    c = channel_scores(net, masks, "count")["0.weight"]
    assert c.tolist() == [3.0, 4.0, 2.0, 4.0, 2.0, 1.0]
    out = refill(net, masks, "count", example_inputs=x)
    # 4 (rows 1, 3), 3 (row 0), then a tie at 2 between rows 2 and 4: the lower index wins
    assert alive(out["0.weight"]).tolist() == [True, True, True, True, False, False]
    out = refill(net, masks, "count", extra=0.5, example_inputs=x)  # 4 + round(0.5 * 2) = 5
    assert alive(out["0.weight"]).tolist() == [True, True, True, True, True, False]


def test_feature_criteria_match_a_manual_computation():
    net, masks = toy()
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(2))
    w = net[0].weight.detach() * masks["0.weight"]
    feat = x @ w.T + net[0].bias.detach()
    l1 = channel_scores(net, masks, "feature-l1", x)["0.weight"]
    l2 = channel_scores(net, masks, "feature-l2", x)["0.weight"]
    assert torch.allclose(l1, feat.abs().sum(0).double(), rtol=1e-5)
    assert torch.allclose(l2, feat.pow(2).sum(0).sqrt().double(), rtol=1e-5)
    out = refill(net, masks, "feature-l2", data=(x, y))
    expect = torch.zeros(6, dtype=torch.bool)
    expect[torch.sort(feat.pow(2).sum(0), descending=True, stable=True).indices[:4]] = True
    assert torch.equal(alive(out["0.weight"]), expect)


def test_saliency_matches_a_manual_taylor_estimate():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(inplace=True),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3))
    masks = ts.prune.random_masks(net, 0.5, seed=0)
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 3, (6,))
    ticket = copy.deepcopy(net)
    masks.apply(ticket)
    a = ticket[0](x)
    a.retain_grad()
    F.cross_entropy(ticket[4](ticket[3](ticket[2](torch.relu(a)))), y).backward()
    expect = (a * a.grad).sum((2, 3)).abs().sum(0).double()
    got = channel_scores(net, masks, "saliency", x, y)["0.weight"]
    assert torch.allclose(got, expect, rtol=1e-4, atol=1e-9)
    assert net[0].weight.grad is None  # the caller's model has no gradients


@pytest.mark.parametrize("criterion", CRITERIA)
def test_every_criterion_leaves_model_and_masks_alone(criterion):
    model = resnet20()
    randomize_norms(model)
    model.train()
    masks = ts.prune.random_masks(model, 0.6, seed=7)
    before = {k: v.clone() for k, v in masks.items()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    out = refill(model, masks, criterion, data=(x, y))
    check_structure(model, masks, out, coupling="none")  # the default: the paper's per layer
    again = refill(model, masks, criterion, data=(x, y))
    assert out == again  # deterministic
    assert all(torch.equal(before[k], masks[k]) for k in masks) and set(before) == set(masks)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_ties_go_to_the_lower_channel():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():
        net[0].weight.fill_(1.0)
    m = torch.zeros(8, 4, dtype=torch.bool)
    m[:, 0] = True  # every row equal: one weight of 1.0 -> 8 of 32 kept -> k = 2
    for criterion in ("l1", "count"):
        out = refill(net, Masks({"0.weight": m}), criterion, example_inputs=torch.randn(1, 4))
        assert alive(out["0.weight"]).tolist() == [True, True] + [False] * 6


def test_refill_of_a_refilled_mask_is_a_fixed_point():
    model = resnet20()
    masks = ts.prune.random_masks(model, 0.5, seed=8)
    once = refill(model, masks, example_inputs=X8)
    assert refill(model, once, example_inputs=X8) == once


# -- channel_companions --------------------------------------------------------------------------
def test_companions_after_an_addition_need_every_addend_zero():
    model = PostAddBN()
    a = torch.ones(4, 3, 3, 3, dtype=torch.bool)
    b = torch.ones(4, 3, 1, 1, dtype=torch.bool)
    a[1] = False          # channel 1: a dropped, b alive -> BN alive
    a[2] = b[2] = False   # channel 2: both dropped -> BN zero
    masks = Masks({"a.weight": a, "b.weight": b}, blocks={"b.weight": [ts.Block(
        torch.tensor([0, 1, 3]), torch.arange(3))]})
    out = channel_companions(model, masks, X8)
    assert out["bn.weight"].tolist() == [True, True, False, True]
    assert out["bn.bias"].tolist() == [True, True, False, True]
    assert out.blocks == masks.blocks  # blocks (from regroup) are kept
    assert set(masks) == {"a.weight", "b.weight"}  # input untouched
    assert channel_companions(model, out, X8) == out  # idempotent


def test_companions_never_zero_a_norm_that_sees_the_input():
    model = InputResidual()
    a = torch.ones(3, 3, 1, 1, dtype=torch.bool)
    a[0] = False
    out = channel_companions(model, Masks({"a.weight": a}), X8)
    assert bool(out["bn.weight"].all()) and bool(out["bn.bias"].all())


def test_companions_never_zero_a_norm_fed_by_a_layer_whose_channels_are_not_followed(monkeypatch):
    """Where the walk from b cannot map its channels (torch-pruning's index mapping fails),
    b's rows feed no norm: the BatchNorm after a + b must then not be zeroed with a's rows
    alone (b's live rows would be lost)."""
    from ticketsmith.structure import coupling
    walk = coupling._walk_forward

    def failing_for_b(dg, root, c_out):
        if root.module is model.b:
            raise coupling.IndexMappingFailed("b: not mapped")
        return walk(dg, root, c_out)

    monkeypatch.setattr(coupling, "_walk_forward", failing_for_b)
    model = PostAddBN()
    a = torch.ones(4, 3, 3, 3, dtype=torch.bool)
    a[2] = False
    out = channel_companions(model, Masks({"a.weight": a}), X8)
    assert bool(out["bn.weight"].all()) and bool(out["bn.bias"].all())


class NormAfterNorm(nn.Module):
    """bn2(relu(bn1(a(x)))): a norm whose input comes from another norm."""

    def __init__(self, affine: bool):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1, bias=False)
        self.bn1, self.bn2 = nn.BatchNorm2d(4, affine=affine), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.bn2(F.relu(self.bn1(self.a(x)))).mean((2, 3)))


@pytest.mark.parametrize("affine", [True, False])
def test_companions_past_a_norm_that_is_zeroed_with_the_same_rows(affine):
    """bn2 is zeroed with a's dead rows where bn1 is too (it then outputs zero); where bn1 has
    no affine to zero, a dead row still reaches bn2 as -mean / std: bn2 is never zeroed."""
    model = NormAfterNorm(affine)
    a = torch.ones(4, 3, 1, 1, dtype=torch.bool)
    a[1] = False
    out = channel_companions(model, Masks({"a.weight": a}), X8)
    if affine:
        assert out["bn1.weight"].tolist() == [True, False, True, True]
        assert out["bn2.weight"].tolist() == [True, False, True, True]
    else:
        assert bool(out["bn2.weight"].all()) and bool(out["bn2.bias"].all())


class ScaledShift(nn.Module):
    """bn(a(x) * 0.5 + 1): constants between a layer and its norm do not stop the zeroing."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 3, 1, bias=False)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(self.bn(self.a(x) * 0.5 + 1).mean((2, 3)))


def test_companions_through_constants():
    model = ScaledShift()
    randomize_norms(model)
    a = torch.ones(3, 3, 1, 1, dtype=torch.bool)
    a[1] = False
    out = channel_companions(model, Masks({"a.weight": a}), (X8,))  # a tuple of inputs works
    assert out["bn.weight"].tolist() == [True, False, True]
    seen = {}
    model.bn.register_forward_hook(lambda m, i, o: seen.__setitem__("bn", o))
    out.apply(model)
    for train in (True, False):
        model.train(train)
        with torch.no_grad():
            model(torch.randn(4, 3, 8, 8))
        assert not bool(seen["bn"][:, 1].any()) and bool(seen["bn"][:, 0].any())


def test_companions_of_an_unstructured_mask_cover_only_empty_rows():
    model = resnet20()
    masks = ts.prune.random_masks(model, 0.5, seed=9)
    m = masks["layers.0.conv1.weight"].clone()
    m[2] = False
    masks = masks.updated({"layers.0.conv1.weight": m})
    out = channel_companions(model, masks, X8)
    assert out["layers.0.bn1.weight"].tolist() == [True, True, False, True]
    # conv2 rows of the stage are not all empty in every member: the stage's BNs stay whole
    assert bool(out["layers.0.bn2.weight"].all())


# -- bad input -----------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors():
    model = resnet20()
    masks = ts.prune.random_masks(model, 0.5, seed=10)
    empty = masks.updated({"layers.1.conv1.weight": torch.zeros_like(masks["layers.1.conv1.weight"])})
    # an empty layer (global magnitude pruning empties depthwise layers) is skipped with a
    # warning, not a refusal of the whole model; naming it in layers= is an error
    with pytest.warns(UserWarning, match="all-zero mask.*layers.1.conv1.weight"):
        out = refill(model, empty, example_inputs=X8)
    assert not bool(out["layers.1.conv1.weight"].any())
    with pytest.raises(UsageError, match="layers.1.conv1.weight.*all zeros"):
        refill(model, empty, example_inputs=X8, layers=["layers.1.conv1.weight"])
    with pytest.raises(UsageError, match="'nope.weight' has no weight mask"):
        refill(model, masks, example_inputs=X8, layers=["nope.weight"])
    for criterion in ("feature-l1", "feature-l2", "saliency"):
        with pytest.raises(UsageError, match=f"{criterion}.*needs data"):
            refill(model, masks, criterion)
    with pytest.raises(UsageError, match="saliency.*labels"):
        refill(model, masks, "saliency", data=torch.randn(2, 3, 8, 8))
    with pytest.raises(UsageError, match="l2.*choose one of: l1, count, feature-l1"):
        refill(model, masks, "l2")
    for extra in (-0.1, 1.5, float("nan"), True):
        with pytest.raises(UsageError, match="extra"):
            refill(model, masks, extra=extra)
    wrong = masks.updated({"conv1.weight": torch.ones(4, 3, 1, 1)})
    with pytest.raises(UsageError, match="conv1.weight.*shape"):
        refill(model, wrong, example_inputs=X8)

    class Volume(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv3d(1, 2, 3)

        def forward(self, x):
            return self.c(x)
    with pytest.raises(UsageError, match="example_inputs"):
        channel_groups(Volume())
