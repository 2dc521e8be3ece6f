"""The dependency graph behind channel groups and surgery (ticketsmith.structure.graph):
torch-pruning's graph with its reshape / split sizes read from torch 2.x autograd nodes, and
every index mapping bounded (issue 18: Swin-T ran out of memory, ShuffleNet-v2 was refused)."""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import ticketsmith as ts
from ticketsmith import compact as C
from ticketsmith.structure import graph as G

from families import FAMILIES


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models


def build(model: nn.Module, x: torch.Tensor) -> G.DependencyGraph:
    return G.build(model.eval(), x.clone().requires_grad_(True), forward_fn=lambda m, i: m(i))


def groups(graph: G.DependencyGraph, model: nn.Module):
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and m in graph.module2node:
            n = graph.get_out_channels(m)
            yield m, graph.get_pruning_group(m, graph.get_pruner_of_module(m).prune_out_channels,
                                             list(range(n)))


def test_window_attention_index_lists_stay_within_the_layers():
    """A Swin window attention (relative position bias viewed to heads x N x N, inside a cycle
    of the attention graph) got a stride mapping that multiplied the index list on every turn
    of the cycle (> 8 GiB on Swin-T). No list may now exceed the widest layer."""
    build_model, shape, _ = FAMILIES["swin"]
    model = build_model()
    graph = build(model, torch.randn(shape))
    widest = G.widest(model)
    seen = 0
    for _, group in groups(graph, model):
        assert max(len(it.idxs) for it in group) <= widest
        seen += 1
    assert seen >= 6
    assert any("reshape" in why for why in graph.unmapped.values())


def test_channel_shuffle_builds_and_is_left_unmapped():
    """ShuffleNet-v2's channel shuffle (view to [N, 2, C/2, H, W], transpose, view back) made
    torch-pruning's reshape mapping divide by zero: the graph now builds, the shuffle's reshapes
    carry no index mapping, and surgery leaves the groups through them whole, saying so."""
    build_model, shape, _ = FAMILIES["shufflenet_v2"]
    model = build_model()
    x = torch.randn(shape)
    graph = build(model, x)
    sizes = [why for why in graph.unmapped.values() if "reshape" in why]
    assert any("[2, 2, 8, 4, 4]" in s or "[2, 8, 2, 4, 4]" in s for s in sizes), sizes
    report = C.remove_dead_channels(copy.deepcopy(model), x)
    assert any("other than a flatten" in why for why in report.skipped.values())
    # describe says, per layer, why the group of its output channels was not shrunk
    small = C.compact(model, ts.Masks.ones(model), x)
    rows = {r["layer"]: r for r in C.describe(small)}
    assert "other than a flatten" in rows["stage2.0.branch2.5"]["group_left_whole"]
    assert rows["stage2.0.branch2.0"]["group_left_whole"] is None  # inside the branch


class SplitNet(nn.Module):
    """Chunks of unequal size, their consumers traced in the opposite order to the chunks."""

    def __init__(self):
        super().__init__()
        self.c0 = nn.Conv2d(3, 8, 1)
        self.a = nn.Conv2d(2, 4, 1)
        self.b = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        p, q = self.c0(x).split([2, 6], 1)
        return self.a(p) + self.b(q)


class ChunkNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c0 = nn.Conv2d(3, 8, 1)
        self.a = nn.Conv2d(4, 4, 1)
        self.b = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        p, q = self.c0(x).chunk(2, 1)
        return self.a(p) + self.b(q)


@pytest.mark.parametrize("cls,expected", [
    (SplitNet, {("a", 1): 1, ("b", 1): 3}),   # root 1 is chunk 0's channel 1, root 3 chunk 1's 1
    (ChunkNet, {("a", 1): 1, ("a", 3): 3}),   # both in chunk 0 (channels 0-3)
])
def test_split_consumers_get_the_chunk_autograd_says(cls, expected):
    """torch-pruning takes the i-th consumer edge of a split to carry chunk i (and infers a
    chunk's size from its consumers): a consumer traced first got the first chunk's channels.
    The chunk of each edge comes from autograd (`output_nr`)."""
    torch.manual_seed(0)
    model = cls().eval()
    graph = build(model, torch.randn(1, 3, 4, 4))
    prune_out = graph.get_pruner_of_module(model.c0).prune_out_channels
    group = graph.get_pruning_group(model.c0, prune_out, [1, 3])
    names = {m: n for n, m in model.named_modules()}
    got = {}
    for it in group:
        name = names.get(it.dep.target.module)
        if name in ("a", "b") and it.dep.handler.__name__ == "prune_in_channels":
            for i, r in zip(it.idxs, it.root_idxs):
                got[(name, int(i))] = int(r)
    assert got == expected


class Flat(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, 10)

    def forward(self, x):
        return self.fc(F.relu(self.c2(F.relu(self.c1(x)))).flatten(1))


def half_of_flat(model: Flat, x: torch.Tensor) -> ts.Masks:
    """Channels 1 and 3 of both convs dead, with their companions."""
    keep = torch.tensor([True, False, True, False])
    masks = ts.Masks({"c1.weight": keep.view(4, 1, 1, 1).expand(4, 3, 3, 3).clone(),
                      "c2.weight": keep.view(4, 1, 1, 1).expand(4, 4, 3, 3).clone()})
    return ts.channel_companions(model, masks, x)


def test_an_index_mapping_past_its_bound_leaves_its_group_whole(monkeypatch):
    """An index list longer than the bound raises IndexMappingTooLarge (with where) instead of
    growing: compaction leaves that group whole with the reason, the rest of the model goes on
    (here the bound is lowered below a real flatten's 64 features to trip it)."""
    monkeypatch.setattr(G, "MIN_INDICES", 1)
    monkeypatch.setattr(G, "INDEX_FACTOR", 0.5)   # 32 < the 64 features c2's channels fan into
    torch.manual_seed(0)
    model = Flat().eval()
    x = torch.randn(2, 3, 4, 4)
    graph = build(model, x)
    with pytest.raises(G.IndexMappingTooLarge, match="more than 32"):
        graph.get_pruning_group(model.c2, graph.get_pruner_of_module(model.c2).prune_out_channels,
                                list(range(4)))
    masks = half_of_flat(model, x)
    small = C.compact(model, masks, x)
    assert small.c1.out_channels == 2                 # its group maps within the bound
    assert small.c2.out_channels == 4                 # its group is left whole, with why
    assert "more than 32" in small.ticketsmith_compact["skipped_groups"]["c2"]
    masked = copy.deepcopy(model)
    masks.apply(masked)
    with torch.no_grad():
        xi = torch.randn(3, 3, 4, 4)
        assert torch.allclose(masked(xi), small(xi), atol=1e-5)
    # refill goes on too: the layer whose group cannot be mapped is a group of its own
    refilled = ts.refill(model, masks, example_inputs=x)
    assert set(refilled.weight_names) == set(masks.weight_names)


class SlicedCat(nn.Module):
    """DPN's dual path in small: slices of one conv's output added and concatenated."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 14, 1), nn.Conv2d(10, 4, 1)

    def forward(self, x):
        y = self.c1(x)
        return self.c2(torch.cat([y[:, :4] + y[:, 4:8], y[:, 8:]], 1))


def test_concatenation_sizes_come_from_autograd():
    """A concatenation's input sizes are read from autograd (torch-pruning infers them from the
    layers around, which fails past a slice: on timm's DPN its own code then added None and
    the graph could not be built)."""
    model = SlicedCat().eval()
    graph = build(model, torch.randn(1, 3, 4, 4))
    cats = [n for n in graph.module2node.values() if n.type == G.OPTYPE.CONCAT]
    assert [G._concat_sizes(n) for n in cats] == [[4, 6]]
    assert cats[0].module.concat_sizes == [4, 6] and cats[0].module.offsets == [0, 4, 10]


@pytest.mark.parametrize("family", ["mobilenet_v2_se", "dpn", "swin_timm", "pvt_attention"])
def test_indexed_groups_are_torch_prunings_groups(family, monkeypatch):
    """The groups built with dict lookups (`_IndexedGroup`) hold the same items, in the same
    order, with the same indices and root indices, as torch-pruning's own Group builds."""
    build_model, shape, _ = FAMILIES[family]
    model = build_model()
    graph = build(model, torch.randn(shape))

    def all_groups():
        out = []
        for m in graph.module2node:
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                n = graph.get_pruner_of_module(m).get_out_channels(m)
                g = graph.get_pruning_group(m, graph.get_pruner_of_module(m).prune_out_channels,
                                            list(range(n)))
                out.append([(it.dep.target.name, it.dep.handler.__name__, list(it.idxs),
                             list(it.root_idxs)) for it in g])
        return out

    indexed = all_groups()
    monkeypatch.setattr(G, "_indexed_groups", contextlib.nullcontext)
    assert all_groups() == indexed


def assert_matches_masked(model: nn.Module, masks: ts.Masks, small: nn.Module, shape) -> None:
    """`small` computes what `model` with `masks` applied computes, on a random batch of `shape`."""
    masked = copy.deepcopy(model)
    masks.apply(masked)
    with torch.no_grad():
        xi = torch.randn(shape)
        assert torch.allclose(masked(xi), small(xi), atol=1e-5)


def refill_compacts_exactly(model: nn.Module, x: torch.Tensor) -> None:
    """Refill of the layers' median-magnitude masks, compacted: equal to the masked model on
    another batch at another size."""
    params = {n: p.detach().abs() for n, p in model.named_parameters()}
    masks = ts.refill(model, ts.Masks({n: params[n] >= params[n].median() for n in ts.prunable_names(model)}),
                      example_inputs=x)
    small = C.compact(model, masks, x)
    assert_matches_masked(model, masks, small, (3, 3, 7, 7))


class ReadsItsOwnGroup(nn.Module):
    """NeXt-ViT's pattern in small: the stream concatenated after a branch's output, projected
    back onto the stream by a conv whose input and output are both in the stream's group."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.branch = nn.Conv2d(4, 4, 3, padding=1)
        self.back = nn.Conv2d(8, 4, 1)
        self.head = nn.Linear(4, 10)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.back(torch.cat([F.relu(self.branch(x)), x], 1))
        return self.head(x.mean((2, 3)))


def test_a_layer_reading_the_group_it_writes_keeps_its_output_index():
    """`back` writes the stream's group and reads it (inputs 4-7, past its 4 outputs): its index
    stays over its output rows (it once took its input positions, out of bounds), refill and
    compaction go through, exact on other inputs."""
    from ticketsmith.structure.coupling import analyse
    torch.manual_seed(0)
    model = ReadsItsOwnGroup().eval()
    x = torch.randn(2, 3, 6, 6)
    (group,) = [g for g in analyse(model, x).groups if "back.weight" in g.layers]
    assert set(group.layers) == {"stem.weight", "back.weight"}
    assert "back.weight" not in group.consumers and "branch.weight" in group.consumers
    assert torch.equal(group.index["back.weight"], group.index["stem.weight"])
    refill_compacts_exactly(model, x)


@pytest.mark.parametrize("how,why", [("raises", "ZeroDivisionError"), ("no roots", "root indices")])
def test_an_index_mapping_that_fails_leaves_its_group_whole(how, why, monkeypatch):
    """torch-pruning's own mapping raising (its grouped-query mapping divides by a head width it
    read as 0 on timm's GCViT and Hiera) or returning indices without their root channel (the
    same mapping on HaloNet) is IndexMappingFailed, naming the dependency: refill and compaction
    leave that group whole and go on."""
    from torch_pruning import _helpers
    torch.manual_seed(0)
    model = Flat().eval()
    x = torch.randn(2, 3, 4, 4)
    graph = build(model, x)
    real = G._Bounded.__call__

    def fail(idxs):
        if how == "no roots":
            return [_helpers._HybridIndex(idx=i.idx, root_idx=None) for i in idxs]
        raise ZeroDivisionError("integer division or modulo by zero")

    def broken(self, idxs):  # the flatten after c2 (the only mapping with a stride here) fails
        if getattr(self.fn, "_stride", None) is not None:
            return real(G._Bounded(fail, self.limit, self.dep), idxs)
        return real(self, idxs)
    monkeypatch.setattr(G._Bounded, "__call__", broken)
    with pytest.raises(G.IndexMappingFailed, match=why):
        graph.get_pruning_group(model.c2, graph.get_pruner_of_module(model.c2).prune_out_channels,
                                list(range(4)))
    masks = half_of_flat(model, x)
    small = C.compact(model, masks, x)
    assert small.c1.out_channels == 2 and small.c2.out_channels == 4
    assert why in small.ticketsmith_compact["skipped_groups"]["c2"]
    assert set(ts.refill(model, masks, example_inputs=x).weight_names) == set(masks.weight_names)


class ReshapesByInputWidth(nn.Module):
    """timm's LambdaLayer in small: its output reshaped by its *input* width, which a cut of
    the stem's channels changes while the output keeps its own."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.mix = nn.Conv2d(4, 4, 1)
        self.head = nn.Linear(4, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        b, c, h, w = x.shape
        y = self.mix(x).flatten(2).reshape(b, c, h, w)
        return self.head(y.mean((2, 3)))


def test_a_cut_that_breaks_the_forward_is_undone():
    """Cutting the stem's dead channels leaves `mix`'s output wider than the width its forward
    reshapes to: that cut is undone (the group left whole, with the reason) and the rest goes
    on; the compact model is exact."""
    torch.manual_seed(0)
    model = ReshapesByInputWidth().eval()
    x = torch.randn(2, 3, 5, 5)
    keep = torch.tensor([True, False, True, False])
    masks = ts.Masks({"stem.weight": keep.view(4, 1, 1, 1).expand(4, 3, 1, 1).clone(),
                      "mix.weight": torch.ones(4, 4, 1, 1, dtype=torch.bool)})
    masks = ts.channel_companions(model, masks, x)
    small = C.compact(model, masks, x)
    assert small.stem.out_channels == 4 and small.mix.in_channels == 4
    assert "breaks the model's forward" in small.ticketsmith_compact["skipped_groups"]["stem"]
    masked = copy.deepcopy(model)
    masks.apply(masked)
    with torch.no_grad():
        xi = torch.randn(3, 3, 5, 5)
        assert torch.allclose(masked(xi), small(xi), atol=1e-5)


class FocalModulation(nn.Module):
    """timm's FocalNet modulation in small: one conv gives q, the context and one gate per
    focal level, each gate a single channel broadcast over the context's channels."""

    def __init__(self, dim=4, levels=2):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 1)
        self.f = nn.Conv2d(dim, 2 * dim + levels + 1, 1)
        self.focal = nn.ModuleList(nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=False)
                                   for _ in range(levels))
        self.h = nn.Conv2d(dim, dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)
        self.head = nn.Linear(dim, 10)
        self.split = [dim, dim, levels + 1]

    def forward(self, x):
        x = self.stem(x)
        q, ctx, gates = torch.split(self.f(x), self.split, 1)
        ctx_all = 0
        for level, conv in enumerate(self.focal):
            ctx = F.gelu(conv(ctx))
            ctx_all = ctx_all + ctx * gates[:, level:level + 1]
        ctx_all = ctx_all + F.gelu(ctx.mean((2, 3), keepdim=True)) * gates[:, len(self.focal):]
        x = x + self.proj(q * self.h(ctx_all))
        return self.head(x.mean((2, 3)))


def test_a_broadcast_operand_shares_no_channel():
    """A gate of one channel multiplying the context shares no channel with it: the group of a
    context channel holds the layers it reaches (the focal convs, h) and none of the gates (once
    torch-pruning's walk shifted the indices by one a turn through the gates' slices and never
    ended: FocalNet ran out of memory). Refill and compaction go through, exact."""
    torch.manual_seed(0)
    model = FocalModulation().eval()
    x = torch.randn(2, 3, 6, 6)
    graph = build(model, x)
    assert len(graph.broadcasts) == 3
    prune_out = graph.get_pruner_of_module(model.f).prune_out_channels
    group = graph.get_pruning_group(model.f, prune_out, [5])   # the context's channel 1
    hit = {(dep.target.module, dep.handler.__name__): list(idxs) for dep, idxs in group}
    assert hit[(model.h, "prune_in_channels")] == [1]
    assert hit[(model.focal[1], "prune_out_channels")] == [1]
    assert all(i < 2 * 4 + 3 for (m, _), ix in hit.items() if m is model.f for i in ix)
    refill_compacts_exactly(model, x)
    # q's channel 0, the context's 3 and the first gate dead: cut through the split, whose sizes
    # (the list the module holds) shrink; the gates, read by slices, keep their 3 (cut, the
    # slices would read the wrong gates)
    keep = torch.ones(11, dtype=torch.bool)
    keep[[0, 7, 8]] = False
    masks = ts.Masks({"f.weight": keep.view(11, 1, 1, 1).expand(11, 4, 1, 1).clone()})
    masks = ts.channel_companions(model, masks, x)
    small = C.compact(model, masks, x)
    assert small.split == [3, 3, 3] and small.f.out_channels == 9 and small.h.in_channels == 3
    masked = copy.deepcopy(model)
    masks.apply(masked)
    with torch.no_grad():
        xi = torch.randn(3, 3, 7, 7)
        assert torch.allclose(masked(xi), small(xi), atol=1e-5)


@pytest.mark.timeout(120)
def test_a_walk_whose_indices_never_repeat_is_bounded(monkeypatch):
    """Without the broadcast rule (above) the walk of a context channel never repeats: it stops
    at the bound (IndexMappingTooLarge, naming where) instead of growing into gigabytes."""
    monkeypatch.setattr(G.DependencyGraph, "_cut_broadcasts", lambda self, module2node: None)
    model = FocalModulation().eval()
    graph = build(model, torch.randn(2, 3, 6, 6))
    with pytest.raises(G.IndexMappingTooLarge, match="walk of a channel group"):
        graph.get_pruning_group(model.f, graph.get_pruner_of_module(model.f).prune_out_channels, [5])


def test_a_split_by_sizes_a_module_holds_is_cut_and_resized():
    """timm's MixedConv2d splits by `self.splits`, the list its forward passes to torch.split:
    the graph records which attribute holds it, compaction cuts through the split and sets
    the list to the new chunk sizes (a split whose sizes nothing holds keeps its group whole)."""
    from families import TinyMixNet
    torch.manual_seed(0)
    model = TinyMixNet().eval()
    x = torch.randn(2, 3, 8, 8)
    graph = build(model, x)
    assert list(graph.split_attrs.values()) == [(model.mix, "splits")]
    keep = torch.ones(32, dtype=torch.bool)
    keep[[1, 20, 21]] = False   # one channel of the first part, two of the second
    masks = ts.Masks({"expand.0.weight": keep.view(32, 1, 1, 1).expand(32, 16, 1, 1).clone()})
    masks = ts.channel_companions(model, masks, x)
    small = C.compact(model, masks, x)
    assert small.mix.splits == [15, 14] and small.expand[0].out_channels == 29
    assert [c.out_channels for c in small.mix.values()] == [15, 14]
    assert_matches_masked(model, masks, small, (3, 3, 11, 11))
