"""ts.compact: channel surgery, executor dispatch, save/load of executors, bad input.

Every compact model is compared with the masked dense model on random inputs (eval mode, BN
statistics and affine parameters randomised so that an unmasked BN would show a dropped
channel as a constant)."""
from __future__ import annotations


import pytest
import torch
import torch_pruning as tp
from torch import nn
from torch.nn import functional as F

import ticketsmith as ts
from ticketsmith import compact as C
from ticketsmith.errors import UsageError
from ticketsmith.masks import Block, copy_module


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models


# -- helpers ------------------------------------------------------------------------------------
def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics / affine parameters and biases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g))
            elif isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
    return model.eval()


def _next_bn(model: nn.Module, layer: str) -> str | None:
    """The BatchNorm right after `layer` in module order (before the next conv / linear)."""
    mods = list(model.named_modules())
    i = [n for n, _ in mods].index(layer)
    for n, m in mods[i + 1:]:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            return None
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return n
    return None


def kill_rows(model: nn.Module, masks: dict, layer: str, rows: torch.Tensor,
              companions: bool = True) -> None:
    """Zero `rows` of a layer's weight mask and (with `companions`) its bias and its BN."""
    m = model.get_submodule(layer)
    w = masks.setdefault(f"{layer}.weight", torch.ones_like(m.weight, dtype=torch.bool)).clone()
    w[rows] = False
    masks[f"{layer}.weight"] = w
    if not companions:
        return
    if m.bias is not None:
        b = masks.get(f"{layer}.bias", torch.ones_like(m.bias, dtype=torch.bool)).clone()
        b[rows] = False
        masks[f"{layer}.bias"] = b
    bn = _next_bn(model, layer)
    if bn is not None:
        for p in ("weight", "bias"):
            k = f"{bn}.{p}"
            t = masks.get(k, torch.ones(model.get_submodule(bn).num_features, dtype=torch.bool)).clone()
            t[rows] = False
            masks[k] = t


def random_channel_masks(model: nn.Module, frac: float, seed: int = 0,
                         companions: bool = True) -> ts.Masks:
    """Each prunable layer loses a random `frac` of its output channels (independently)."""
    g = torch.Generator().manual_seed(seed)
    masks: dict = {}
    for key in ts.prunable_names(model):
        layer = key[: -len(".weight")]
        n = model.get_submodule(layer).weight.shape[0]
        kill_rows(model, masks, layer, torch.randperm(n, generator=g)[: int(frac * n)], companions)
    return ts.Masks(masks)


def coupled_channel_masks(model: nn.Module, x: torch.Tensor, frac: float, seed: int = 0) -> ts.Masks:
    """Random dead channels shared by every layer coupled with them (from the model's graph)."""
    g = torch.Generator().manual_seed(seed)
    head = ts.prunable_names(model, include_head=True)[-1][: -len(".weight")]
    names = {m: n for n, m in model.named_modules()}
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x, verbose=False)
    masks: dict = {}
    for group in graph.get_all_groups():
        if names.get(group[0].dep.target.module) == head:
            continue
        n = len(group[0].idxs)
        dead = set(torch.randperm(n, generator=g)[: int(frac * n)].tolist())
        for it in group:
            m, fn = it.dep.target.module, it.dep.handler.__name__
            if not isinstance(m, (nn.Conv2d, nn.Linear)) or fn != "prune_out_channels":
                continue
            local = [i for i, r in zip(it.idxs, it.root_idxs) if r in dead]
            kill_rows(model, masks, names[m], torch.tensor(local, dtype=torch.long))
    return ts.Masks(masks)


def masked(model: nn.Module, masks) -> nn.Module:
    ref = copy_module(model).eval()  # (a cache with autograd history: LeViT family)
    ts.Masks(dict(masks)).apply(ref)
    return ref


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def snapshot(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(model: nn.Module, snap: dict) -> None:
    state = model.state_dict()
    assert set(state) == set(snap)
    for k, v in snap.items():
        assert state[k].shape == v.shape and torch.equal(state[k], v), k


def check_compact(model, masks, x, *, expect_smaller=True, **kw) -> nn.Module:
    snap = snapshot(model)
    small = C.compact(model, masks, x, **kw)
    assert_same(model, snap)  # the input model is never modified
    ref = masked(model, masks)
    x2 = torch.randn((5,) + tuple(x.shape[1:]), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        for inp in (x, x2):
            assert rel_err(ref(inp), small(inp)) < 1e-4
    if expect_smaller:
        assert n_params(small) < n_params(model)
    assert not small.training
    return small


# -- models written here ------------------------------------------------------------------------
class ResCat(nn.Module):
    """A residual block whose inner path concatenates two branches, then a depthwise conv and a
    flatten (2x2 spatial positions) into a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=True)
        self.bn0 = nn.BatchNorm2d(8)
        self.a = nn.Conv2d(8, 5, 3, padding=1, bias=False)
        self.bna = nn.BatchNorm2d(5)
        self.b = nn.Conv2d(8, 3, 1, bias=False)
        self.bnb = nn.BatchNorm2d(3)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bndw = nn.BatchNorm2d(8)
        self.mix = nn.Conv2d(8, 6, 1, bias=False)
        self.bnmix = nn.BatchNorm2d(6)
        self.head = nn.Linear(6 * 4, 5)

    def forward(self, x):
        x0 = F.relu(self.bn0(self.stem(x)))
        y = torch.cat([self.bna(self.a(x0)), self.bnb(self.b(x0))], dim=1)
        x1 = F.relu(y + x0)
        x2 = F.relu(self.bndw(self.dw(x1)))
        x3 = F.relu(self.bnmix(self.mix(x2)))
        return self.head(F.adaptive_avg_pool2d(x3, 2).flatten(1))


class MLP(nn.Module):
    def __init__(self, act=F.relu):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(20, 32), nn.Linear(32, 16), nn.Linear(16, 4)
        self.act = act

    def forward(self, x):
        return self.fc3(self.act(self.fc2(F.gelu(self.fc1(x)))))


ZOO = [  # name, width, input shape
    ("resnet20", 0.25, (2, 3, 16, 16)),
    ("vgg11", 0.125, (2, 3, 16, 16)),
    ("mobilenet-v1", 0.125, (2, 3, 16, 16)),
    ("lenet5", 1.0, (2, 1, 28, 28)),
    ("mlp-300-100", 0.25, (2, 1, 12, 12)),
    ("resnet18", 0.125, (2, 3, 16, 16)),
]


def zoo_model(name, width, shape):
    return randomize(ts.models.create(name, in_channels=shape[1], num_classes=10,
                                      image_size=shape[2:], width=width))


# -- channel surgery ----------------------------------------------------------------------------
@pytest.mark.parametrize("name,width,shape", ZOO, ids=[z[0] for z in ZOO])
def test_zoo_random_channel_masks(name, width, shape):
    model = zoo_model(name, width, shape)
    x = torch.randn(shape)
    small = check_compact(model, random_channel_masks(model, 0.5, seed=1), x)
    rows = C.describe(small)
    assert [r["layer"] for r in rows] == [n for n, m in model.named_modules()
                                          if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert all(r["executor"] == "dense" for r in rows)
    assert set(small.ticketsmith_executors.values()) == {"dense"}
    assert sum(r["params_after"] for r in rows) < sum(r["params_before"] for r in rows)
    # the head's outputs are the model's: never removed
    head = ts.prunable_names(model, include_head=True)[-1][: -len(".weight")]
    assert small.get_submodule(head).weight.shape[0] == 10


@pytest.mark.parametrize("name,width,shape", [z for z in ZOO if z[0] in ("resnet20", "resnet18")],
                         ids=["resnet20", "resnet18"])
def test_residual_coupled_channels_removed_together(name, width, shape):
    model = zoo_model(name, width, shape)
    x = torch.randn(shape)
    # independent random channels: a residual channel survives unless dead in all coupled layers
    small = check_compact(model, random_channel_masks(model, 0.25, seed=2), x)
    coupled = ["layers.0.conv2", "layers.1.conv2", "conv1"]
    before = {n: model.get_submodule(n).weight.shape[0] for n in coupled}
    masks = coupled_channel_masks(model, x, 0.5, seed=3)
    dead = {n: int((~masks[f"{n}.weight"].flatten(1).any(1)).sum()) for n in coupled}
    assert len(set(dead.values())) == 1 and dead["conv1"] > 0
    small = check_compact(model, masks, x)
    for n in coupled:  # coupled dead channels go everywhere at once
        assert small.get_submodule(n).weight.shape[0] == before[n] - dead[n]
    assert small.get_submodule("layers.1.conv1").weight.shape[1] == before["conv1"] - dead["conv1"]


def test_rescat_concat_depthwise_flatten():
    torch.manual_seed(0)
    model = randomize(ResCat())
    x = torch.randn(2, 3, 8, 8)
    masks: dict = {}
    kill_rows(model, masks, "stem", torch.tensor([1, 6]))
    kill_rows(model, masks, "a", torch.tensor([1, 3]))   # concat slots 1 and 3 ...
    kill_rows(model, masks, "b", torch.tensor([1]))      # ... and 6: with the stem's, slots 1 and 6
    kill_rows(model, masks, "dw", torch.tensor([1, 3, 6]))  # its unmasked BN would revive them
    kill_rows(model, masks, "mix", torch.tensor([0, 4]))
    small = check_compact(model, ts.Masks(masks), x)
    # residual-coupled channels dead in stem and in the concatenation: 1 and 6 (not 3)
    assert small.stem.weight.shape[0] == 6
    assert small.a.weight.shape[0] == 4 and small.b.weight.shape[0] == 2
    assert small.dw.weight.shape[0] == 6 and small.dw.groups == 6
    assert small.mix.weight.shape == (4, 6, 1, 1)
    assert small.head.weight.shape == (5, 4 * 4)  # 2 dead channels x 4 positions removed


class DenseTail(nn.Module):
    """DenseNet's tail: the last block's features concatenated, a BatchNorm, global pooling,
    flatten into the classifier (`pool` 2: four positions per channel instead)."""

    def __init__(self, pool=1):
        super().__init__()
        self.pool = pool
        self.stem = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.grow = nn.Conv2d(6, 4, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(10)
        self.classifier = nn.Linear(10 * pool * pool, 5)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(self.norm(torch.cat([x, self.grow(x)], 1)))
        return self.classifier(F.adaptive_avg_pool2d(x, self.pool).flatten(1))


@pytest.mark.parametrize("pool", [1, 2])
def test_a_concatenation_into_a_global_pooling_flatten_is_cut(pool):
    """DenseNet / GoogLeNet / Inception: a flatten after global pooling passes the channels as
    they are, and the concatenation's dead channels go with the classifier's columns; a flatten
    of several positions per channel after a concatenation still leaves the group whole."""
    torch.manual_seed(0)
    model = randomize(DenseTail(pool))
    x = torch.randn(2, 3, 8, 8)
    masks: dict = {}
    kill_rows(model, masks, "grow", torch.tensor([0, 2]))
    masks["norm.weight"] = torch.ones(10, dtype=torch.bool).index_fill(0, torch.tensor([6, 8]), False)
    masks["norm.bias"] = masks["norm.weight"].clone()
    small = check_compact(model, ts.Masks(masks), x, expect_smaller=pool == 1)
    assert small.grow.weight.shape[0] == (2 if pool == 1 else 4)
    assert small.classifier.weight.shape[1] == (8 if pool == 1 else 40)
    whole = {r["layer"]: r["group_left_whole"] for r in C.describe(small)}
    assert (whole["grow"] is None) == (pool == 1)


def test_mlp_hidden_units_and_non_zero_preserving_activation():
    torch.manual_seed(0)
    model = randomize(MLP(act=torch.sigmoid))
    masks: dict = {}
    kill_rows(model, masks, "fc1", torch.arange(0, 32, 2))
    kill_rows(model, masks, "fc2", torch.arange(0, 16, 4))  # sigmoid(0) = 0.5 everywhere
    x = torch.randn(3, 20)
    small = check_compact(model, ts.Masks(masks), x)
    # the dead fc2 units hold 0.5: fc3 reads them folded into its bias
    assert small.fc1.weight.shape == (16, 20) and small.fc2.weight.shape == (12, 16)
    assert small.fc3.weight.shape == (4, 12)
    assert not torch.equal(small.fc3.bias, model.fc3.bias)
    # relu-like activation: dead fc2 units are zero, nothing to fold
    model = randomize(MLP(act=F.relu))
    small = check_compact(model, ts.Masks(masks), x)
    assert small.fc2.weight.shape == (12, 16) and small.fc3.weight.shape == (4, 12)
    assert torch.equal(small.fc3.bias, model.fc3.bias)


def test_unmasked_batchnorm_keeps_the_channel():
    model = zoo_model("vgg11", 0.125, (2, 3, 16, 16))
    x = torch.randn(2, 3, 16, 16)
    masks: dict = {}
    kill_rows(model, masks, "features.0", torch.tensor([0, 3]), companions=False)
    small = check_compact(model, ts.Masks(masks), x, expect_smaller=False)
    # the BN turns the zero channel into a constant the next layer reads: nothing removed
    assert small.features[0].weight.shape[0] == 8
    masks: dict = {}
    kill_rows(model, masks, "features.0", torch.tensor([0, 3]))
    small = check_compact(model, ts.Masks(masks), x)
    assert small.features[0].weight.shape[0] == 6 and small.features[4].weight.shape[1] == 6


def test_unread_channels_are_removed():
    """A channel whose every consumer has an all-zero weight column for it is removable."""
    torch.manual_seed(0)
    model = randomize(MLP())
    m = torch.ones(16, 32, dtype=torch.bool)
    m[:, [2, 5]] = False
    small = check_compact(model, ts.Masks({"fc2.weight": m}), torch.randn(3, 20))
    assert small.fc1.weight.shape == (30, 20) and small.fc2.weight.shape == (16, 30)


def test_all_channels_dead_keeps_one():
    torch.manual_seed(0)
    model = randomize(MLP())
    masks: dict = {}
    kill_rows(model, masks, "fc2", torch.arange(16))
    small = check_compact(model, ts.Masks(masks), torch.randn(3, 20))
    assert small.fc2.weight.shape[0] == 1


class Unsupported(nn.Module):
    """Channel-mixing or constant-adding operations: their groups are left whole."""

    def __init__(self):
        super().__init__()
        self.c1, self.gn = nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = F.relu(self.gn(self.c1(x)))          # a dead channel's GroupNorm output: live
        x = F.relu(self.c2(x) + 1.0)             # a constant makes a dead channel alive
        x = self.c3(x)
        return self.fc(x.mean(dim=(2, 3)) + x.mean(dim=1, keepdim=True).mean(dim=(2, 3)))


def test_unsupported_operations_leave_their_groups_whole():
    torch.manual_seed(0)
    model = randomize(Unsupported())
    masks: dict = {}
    for layer in ("c1", "c2", "c3"):
        kill_rows(model, masks, layer, torch.tensor([0, 1, 2, 3]))
    small = check_compact(model, ts.Masks(masks), torch.randn(2, 3, 8, 8), expect_smaller=False)
    assert [small.get_submodule(n).weight.shape[0] for n in ("c1", "c2", "c3")] == [8, 8, 8]
    skipped = small.ticketsmith_compact["skipped_groups"]
    # (GroupNorm is cut with its counts kept, but these dead channels' affine weights are not
    # zero: -mean / std times the weight depends on the input, and they stay)
    assert "c1" not in skipped
    assert "constant" in skipped["c2"]
    assert "channel dimension" in skipped["c3"]


class ZeroBranches(nn.Module):
    """timm's MobileOne block without a skip or scale branch: a Python 0 in their place, added
    in place (`out = 0; out += conv(x); out += 0`) and to a zero tensor; zero added keeps a
    dead channel dead. `plus`: a constant other than zero there, which does not."""

    def __init__(self, plus: float = 0.0):
        super().__init__()
        self.plus = plus
        self.c1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        identity = 0
        out = 0
        out += self.bn1(self.c1(x))
        out += identity
        out = F.relu(self.c2(out) + torch.zeros(1) + self.plus)
        return self.fc(out.mean(dim=(2, 3)))


@pytest.mark.parametrize("plus", [0.0, 1.0])
def test_a_constant_zero_added_leaves_the_channels_removable(plus):
    torch.manual_seed(0)
    model = randomize(ZeroBranches(plus))
    masks: dict = {}
    for layer in ("c1", "c2"):
        kill_rows(model, masks, layer, torch.tensor([0, 1, 2]))
    small = check_compact(model, ts.Masks(masks), torch.randn(2, 3, 8, 8), expect_smaller=not plus)
    kept = [small.get_submodule(n).weight.shape[0] for n in ("c1", "c2")]
    assert kept == ([5, 8] if plus else [5, 5])
    if plus:
        assert "constant" in small.ticketsmith_compact["skipped_groups"]["c2"]


class PositionsLinear(nn.Module):
    """A linear layer over spatial positions (flatten(2)): channels are not its features."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(16, 5)
        self.out = nn.Linear(30, 2)

    def forward(self, x):
        return self.out(self.fc(F.relu(self.c(x)).flatten(2)).flatten(1))


def test_reshapes_other_than_a_flatten_are_left_alone():
    model = randomize(PositionsLinear())
    masks: dict = {}
    kill_rows(model, masks, "c", torch.tensor([0, 2]))
    small = check_compact(model, ts.Masks(masks), torch.randn(2, 3, 4, 4), expect_smaller=False)
    assert small.c.weight.shape[0] == 6
    skipped = small.ticketsmith_compact["skipped_groups"]
    assert "flatten" in skipped["c"] and "fc" not in skipped


def test_a_flatten_of_tokens_maps_each_feature_to_its_positions():
    """fc's features are the last axis of [N, 6, 5]: flattened, feature f is input t * 5 + f of
    `out` (the channels fastest; torch-pruning's stride mapping takes f * 6 + t, so fc's group
    was left whole). Dead features go from fc and their six inputs from `out`, exactly."""
    model = randomize(PositionsLinear())
    masks: dict = {}
    kill_rows(model, masks, "fc", torch.tensor([1, 3]))
    small = check_compact(model, ts.Masks(masks), torch.randn(2, 3, 4, 4))
    assert small.fc.out_features == 3 and small.out.in_features == 18
    keep = torch.tensor([t * 5 + f for t in range(6) for f in (0, 2, 4)])
    assert torch.equal(small.out.weight, model.out.weight[:, keep])


class ZeroPaddedShortcut(nn.Module):
    """A CIFAR ResNet's "option A" shortcut: the map pooled and zero-padded around its channels
    (8 -> 16) to be added to the block's output."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv, self.bn2 = nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = self.bn2(self.conv(x)) + F.pad(F.avg_pool2d(x, 2), (0, 0, 0, 0, 4, 4))
        return self.fc(F.relu(x).mean((2, 3)))


def test_a_pad_along_the_channels_keeps_its_group_whole():
    """torch-pruning ties channel i of a pad's input to channel i of its output, but the stem's
    channel i is the sum's channel i + 4: cut by that tie, the model deviated ("a bug in
    compaction"). The group stays whole, with the reason; exact."""
    model = randomize(ZeroPaddedShortcut())
    masks: dict = {}
    # the stem's channels 6, 7 and the conv's 6, 7 are dead: tied, they went together, and the
    # stem's channels 2-5 (the sum's 6-9) met other channels of the conv in the sum
    for layer in ("stem", "bn", "conv", "bn2"):
        kill_rows(model, masks, layer, torch.tensor([6, 7]))
    # (16 x 16: the pooled map is 8 wide, as many as its channels: told apart by the sum's 16)
    small = check_compact(model, ts.Masks(masks), torch.randn(2, 3, 16, 16), expect_smaller=False)
    assert small.stem.out_channels == 8
    assert "a pad along the channels" in small.ticketsmith_compact["skipped_groups"]["stem"]


def test_masks_as_plain_mapping_and_unchanged_masks():
    model = zoo_model("lenet5", 1.0, (2, 1, 28, 28))
    masks = dict(random_channel_masks(model, 0.5, seed=4))
    copies = {k: v.clone() for k, v in masks.items()}
    small = check_compact(model, masks, torch.randn(2, 1, 28, 28))
    # the subpackage is callable: ts.compact(model, masks, example_inputs)
    again = C(model, masks, torch.randn(2, 1, 28, 28))
    assert C.describe(again) == C.describe(small)
    assert all(torch.equal(masks[k], copies[k]) for k in masks)


# -- executors (test doubles of blocks.py / condensed.py, per the executor contract) -----------
class BlockConv2d(nn.Module):
    """Test double of blocks.BlockConv2d: the conv with its weight restricted to the blocks."""

    def __init__(self, args: dict, blocks):
        super().__init__()
        self.args = args
        self.n_blocks = len(blocks)
        for i, b in enumerate(blocks):
            self.register_buffer(f"rows{i}", b.rows.clone())
            self.register_buffer(f"cols{i}", b.cols.clone())
        self.weight = nn.Parameter(torch.zeros(args["out"], args["in"], *args["k"]))
        self.bias = nn.Parameter(torch.zeros(args["out"])) if args["bias"] else None
        self.executor = "gather"

    @classmethod
    def from_conv(cls, conv, blocks, name=None):
        args = {"out": conv.out_channels, "in": conv.in_channels, "k": list(conv.kernel_size),
                "stride": list(conv.stride), "padding": list(conv.padding),
                "bias": conv.bias is not None}
        ex = cls(args, blocks)
        union = torch.zeros(conv.weight.shape[0], conv.weight[0].numel(), dtype=torch.bool)
        for b in blocks:
            union[b.rows.unsqueeze(1), b.cols.unsqueeze(0)] = True
        with torch.no_grad():
            ex.weight.copy_(conv.weight * union.view_as(conv.weight))
            if conv.bias is not None:
                ex.bias.copy_(conv.bias)
        return ex

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, self.args["stride"], self.args["padding"])

    def candidates(self):
        return ["gather", "grouped"]

    def use(self, name):
        assert name in self.candidates()
        self.executor = name

    def to_config(self):
        return {"args": self.args, "n_blocks": self.n_blocks}

    @classmethod
    def from_config(cls, config, tensors):
        blocks = [Block(tensors[f"rows{i}"], tensors[f"cols{i}"]) for i in range(config["n_blocks"])]
        ex = cls(config["args"], blocks)
        ex.load_state_dict(tensors)
        return ex


class CondensedLinear(nn.Module):
    """Test double of condensed.CondensedLinear: values and indices per output neuron."""

    def __init__(self, out_f, in_f, k, bias):
        super().__init__()
        self.values = nn.Parameter(torch.zeros(out_f, k))
        self.register_buffer("indices", torch.zeros(out_f, k, dtype=torch.long))
        self.bias = nn.Parameter(torch.zeros(out_f)) if bias else None
        self.shape = (out_f, in_f, k)
        self.executor = "gather"

    @classmethod
    def from_linear(cls, linear, mask, name=None):
        nnz = mask.sum(1)
        k = int(nnz.max())
        assert bool(((nnz == k) | (nnz == 0)).all()), "fan-in is not constant"
        ex = cls(linear.out_features, linear.in_features, k, linear.bias is not None)
        with torch.no_grad():
            for r in range(linear.out_features):
                idx = torch.nonzero(mask[r]).flatten()
                if len(idx):
                    ex.indices[r] = idx
                    ex.values[r] = linear.weight[r, idx]
            if linear.bias is not None:
                ex.bias.copy_(linear.bias)
        return ex

    def forward(self, x):
        y = (x[:, self.indices] * self.values).sum(-1)
        return y + self.bias if self.bias is not None else y

    def candidates(self):
        return ["gather", "embedding_bag"]

    def use(self, name):
        assert name in self.candidates()
        self.executor = name

    def to_config(self):
        return {"shape": list(self.shape), "bias": self.bias is not None}

    @classmethod
    def from_config(cls, config, tensors):
        o, i, k = config["shape"]
        ex = cls(o, i, k, config["bias"])
        ex.load_state_dict(tensors)
        return ex


RefBlockConv2d, RefCondensedLinear = BlockConv2d, CondensedLinear


@pytest.fixture
def ref_executors(monkeypatch):
    """Route the dispatcher (and save/load) to the test doubles above."""
    mod = __name__
    monkeypatch.setitem(C._EXECUTORS, "BlockConv2d", mod)
    monkeypatch.setitem(C._EXECUTORS, "CondensedLinear", mod)


def block_masks(model: nn.Module, layer: str, dead_rows: torch.Tensor, seed: int = 0,
                masks: dict | None = None, element: bool = False) -> tuple[dict, dict]:
    """Two disjoint channel-granular blocks (each 1/4 of the live rows x 1/4 of the input
    channels) on a conv layer, its other rows dead with companions."""
    g = torch.Generator().manual_seed(seed)
    conv = model.get_submodule(layer)
    o, i = conv.out_channels, conv.in_channels
    k = conv.weight[0, 0].numel()
    live = torch.tensor([r for r in range(o) if r not in set(dead_rows.tolist())])
    live = live[torch.randperm(len(live), generator=g)]
    chans = torch.randperm(i, generator=g)
    q, qi = max(1, len(live) // 4), max(1, i // 4)
    blocks = []
    for j in range(2):
        rows = live[j * q:(j + 1) * q].sort().values
        ch = chans[j * qi:(j + 1) * qi].sort().values
        cols = (ch.unsqueeze(1) * k + torch.arange(k)).flatten()
        if element:
            cols = cols[::2]
        blocks.append(Block(rows, cols))
    union = torch.zeros(o, i * k, dtype=torch.bool)
    for b in blocks:
        union[b.rows.unsqueeze(1), b.cols.unsqueeze(0)] = True
    masks = dict(masks or {})
    masks[f"{layer}.weight"] = union.view_as(conv.weight)
    in_blocks = torch.zeros(o, dtype=torch.bool)
    for b in blocks:
        in_blocks[b.rows] = True
    kill_rows(model, masks, layer, torch.nonzero(~in_blocks).flatten())
    return masks, {f"{layer}.weight": blocks}


def test_block_executor_dispatch_through_surgery(ref_executors, monkeypatch):
    model = zoo_model("vgg11", 0.25, (2, 3, 16, 16))
    x = torch.randn(2, 3, 16, 16)
    masks: dict = {}
    kill_rows(model, masks, "features.4", torch.tensor([0, 5, 9]))  # dead inputs of features.8
    masks, blocks = block_masks(model, "features.8", torch.tensor([1, 2, 3]), masks=masks)
    small = check_compact(model, ts.Masks(masks, blocks), x)
    assert isinstance(small.features[8], RefBlockConv2d)
    assert small.ticketsmith_executors["features.8"] == "gather"
    assert small.ticketsmith_executors["features.4"] == "dense"
    row = {r["layer"]: r for r in C.describe(small)}["features.8"]
    assert row["module"] == "BlockConv2d" and "channel-granular" in row["reason"]
    # element-granular blocks are slower than dense above a low density: dense
    masks, blocks = block_masks(model, "features.8", torch.tensor([1]), element=True)
    small = check_compact(model, ts.Masks(masks, blocks), x)
    assert small.ticketsmith_executors["features.8"] == "dense"
    monkeypatch.setattr(C, "ELEMENT_BLOCK_MAX_DENSITY", 0.5)
    small = check_compact(model, ts.Masks(masks, blocks), x)
    assert small.ticketsmith_executors["features.8"] == "gather"
    # autotune times the kernels and the dense layer at the given batch and keeps one
    small = check_compact(model, ts.Masks(masks, blocks), x, autotune=True, batch_size=4)
    row = {r["layer"]: r for r in C.describe(small)}["features.8"]
    assert set(row["autotune"]["seconds"]) == {"gather", "grouped", "dense-layer"}
    assert row["autotune"]["batch_size"] == 4
    assert small.ticketsmith_executors["features.8"] in {"gather", "grouped", "dense"}


def test_blocks_that_do_not_cover_the_mask_are_refused(ref_executors):
    model = zoo_model("vgg11", 0.25, (2, 3, 16, 16))
    masks, blocks = block_masks(model, "features.8", torch.tensor([1]))
    m = masks["features.8.weight"].clone()
    r = int(blocks["features.8.weight"][0].rows[0])
    m[r] = True
    masks["features.8.weight"] = m
    with pytest.raises(UsageError, match="features.8.*outside its blocks"):
        C.compact(model, ts.Masks(masks, blocks), torch.randn(1, 3, 16, 16))


def constant_fan_in_mask(out_f, in_f, k, ablated=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.zeros(out_f, in_f, dtype=torch.bool)
    for r in range(out_f):
        if r not in ablated:
            m[r, torch.randperm(in_f, generator=g)[:k]] = True
    return m


def test_condensed_dispatch_with_dead_inputs_and_ablated_neurons(ref_executors, tmp_path):
    torch.manual_seed(0)
    model = randomize(MLP())
    masks = {"fc1.weight": constant_fan_in_mask(32, 20, 4, ablated=(3, 7)),
             "fc2.weight": constant_fan_in_mask(16, 32, 6, ablated=(0,), seed=1)}
    # ablated fc1 neurons with a zero bias are dead: their columns leave fc2 (fan-in padded)
    masks["fc1.bias"] = torch.ones(32, dtype=torch.bool)
    masks["fc1.bias"][[3, 7]] = False
    x = torch.randn(4, 20)
    small = check_compact(model, ts.Masks(masks), x)
    assert isinstance(small.fc1, RefCondensedLinear) and isinstance(small.fc2, RefCondensedLinear)
    unread = set(torch.nonzero(~masks["fc2.weight"].any(0)).flatten().tolist())
    alive = 32 - len(unread | {3, 7})  # dead (ablated, zero bias) or unread by fc2
    # fc2's ablated neuron 0 outputs relu(its bias) everywhere: fc3 folds it into its bias
    assert small.fc1.values.shape == (alive, 4) and small.fc2.values.shape == (15, 6)
    assert small.ticketsmith_executors == {"fc1": "gather", "fc2": "gather", "fc3": "dense"}
    # save / load through the executors' to_config / from_config, bit-identical
    C.save(small, tmp_path / "m")
    again = C.load(tmp_path / "m", build=MLP)
    assert isinstance(again.fc2, RefCondensedLinear) and again.ticketsmith_executors == small.ticketsmith_executors
    with torch.no_grad():
        assert torch.equal(again(x), small(x))
    (y,) = C.run_onnx(C.export_onnx(small, x, tmp_path / "mlp.onnx"), x)
    with torch.no_grad():
        assert rel_err(small(x), y) < 1e-4
    # dense fan-in above the threshold stays dense
    masks = {"fc1.weight": constant_fan_in_mask(32, 20, 15)}
    small = check_compact(model, ts.Masks(masks), x, expect_smaller=False)
    assert small.ticketsmith_executors["fc1"] == "dense"


def test_missing_executor_modules_fall_back_to_dense(monkeypatch):
    monkeypatch.setitem(C._EXECUTORS, "CondensedLinear", "ticketsmith.compact._no_such_module")
    model = randomize(MLP())
    small = check_compact(model, ts.Masks({"fc1.weight": constant_fan_in_mask(32, 20, 4)}),
                          torch.randn(2, 20), expect_smaller=False)
    row = {r["layer"]: r for r in C.describe(small)}["fc1"]
    assert row["executor"] == "dense" and "not installed" in row["reason"]


# -- bad input ----------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors():
    model = zoo_model("resnet20", 0.25, (2, 3, 16, 16))
    x = torch.randn(2, 3, 16, 16)
    snap = snapshot(model)
    with pytest.raises(UsageError, match="layers.0.conv1.weight.*shape"):
        C.compact(model, {"layers.0.conv1.weight": torch.ones(3, 3)}, x)
    with pytest.raises(UsageError, match="nope.weight"):
        C.compact(model, {"nope.weight": torch.ones(3, 3)}, x)
    with pytest.raises(UsageError, match=r"\(2, 5, 16, 16\).*layer 'conv1'"):
        C.compact(model, ts.Masks.ones(model), torch.randn(2, 5, 16, 16))
    with pytest.raises(UsageError, match="example_inputs"):
        C.compact(model, ts.Masks.ones(model), "not a tensor")
    with pytest.raises(UsageError, match="batch_size"):
        C.compact(model, ts.Masks.ones(model), x, batch_size=0)
    bn_blocks = ts.Masks({"bn1.weight": torch.ones(4, dtype=torch.bool)},
                         {"bn1.weight": [Block(torch.tensor([0]), torch.tensor([0]))]})
    with pytest.raises(UsageError, match="bn1.weight.*not a conv or linear"):
        C.compact(model, bn_blocks, x)
    assert_same(model, snap)

    class Detached(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x).detach()
    with pytest.raises(UsageError, match="tracer cannot follow Detached"):
        C.compact(Detached(), {}, torch.randn(1, 4))
    with pytest.raises(UsageError, match="describe"):
        C.describe(nn.Linear(2, 2))


# -- the real executors (blocks.py / condensed.py), once they are installed ---------------------
def test_real_block_executor_end_to_end(tmp_path, small_executors):
    blocks_mod = pytest.importorskip("ticketsmith.compact.blocks")
    model = zoo_model("vgg11", 0.25, (2, 3, 16, 16))
    x = torch.randn(2, 3, 16, 16)
    masks: dict = {}
    kill_rows(model, masks, "features.4", torch.tensor([0, 5, 9]))
    masks, blocks = block_masks(model, "features.8", torch.tensor([1, 2, 3]), masks=masks)
    small = check_compact(model, ts.Masks(masks, blocks), x, batch_size=64)
    ex = small.features[8]
    assert isinstance(ex, blocks_mod.BlockConv2d)
    assert small.ticketsmith_executors["features.8"] == ex.executor != "dense"
    ref = masked(model, masks)
    with torch.no_grad():
        for kernel in ex.candidates():
            ex.use(kernel)
            assert rel_err(ref(x), small(x)) < 1e-4, kernel
    C.save(small, tmp_path / "v")
    again = C.load(tmp_path / "v")
    assert again.features[8].executor == ex.executor
    (y,) = C.run_onnx(C.export_onnx(small, x, tmp_path / "v.onnx"), x)
    with torch.no_grad():
        assert torch.equal(again(x), small(x))
        assert rel_err(small(x), y) < 1e-4


def test_real_condensed_executor_end_to_end(tmp_path, small_executors):
    condensed = pytest.importorskip("ticketsmith.compact.condensed")
    torch.manual_seed(0)
    model = randomize(MLP())
    masks = {"fc1.weight": constant_fan_in_mask(32, 20, 4, ablated=(3, 7)),
             # (fan-in 5: under the rule's 20% density once the ablated neuron 0, a constant
             # relu(bias), is folded into fc3 and the dead inputs are gone)
             "fc2.weight": constant_fan_in_mask(16, 32, 5, ablated=(0,), seed=1),
             "fc1.bias": torch.ones(32, dtype=torch.bool).index_fill(0, torch.tensor([3, 7]), False)}
    x = torch.randn(4, 20)
    small = check_compact(model, ts.Masks(masks), x, autotune=True, batch_size=8)
    for name in ("fc1", "fc2"):
        row = {r["layer"]: r for r in C.describe(small)}[name]
        assert "dense-layer" in row["autotune"]["seconds"]
    small = check_compact(model, ts.Masks(masks), x)
    assert isinstance(small.fc2, condensed.CondensedLinear)
    ref = masked(model, masks)
    with torch.no_grad():
        for kernel in small.fc2.candidates():
            small.fc2.use(kernel)
            assert rel_err(ref(x), small(x)) < 1e-4, kernel
    C.save(small, tmp_path / "m")
    again = C.load(tmp_path / "m", build=MLP)
    (y,) = C.run_onnx(C.export_onnx(small, x, tmp_path / "m.onnx"), x)
    with torch.no_grad():
        assert torch.equal(again(x), small(x))
        assert rel_err(small(x), y) < 1e-4


class _BiasCache(nn.Module):
    """timm's LeViT / EfficientFormer attention: in eval mode a tensor computed from a parameter
    is cached in a plain dict on first use (with autograd history when autograd is on)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)
        self.shift = nn.Parameter(torch.randn(8))
        self.cache: dict = {}

    def forward(self, x):
        if self.training:
            shift = self.shift * 2
        else:
            shift = self.cache.setdefault("shift", self.shift * 2)
        return self.fc2(torch.relu(self.fc1(x) + shift))


def test_a_module_caching_a_tensor_with_autograd_history_is_compacted():
    """Tracing runs the model with autograd on, which fills such a cache with a non-leaf tensor,
    which copy.deepcopy refuses: refill and compact copy it detached (masks.copy_module)."""
    import copy
    torch.manual_seed(0)
    model = _BiasCache().eval()
    x = torch.randn(2, 6)
    masks = ts.refill(model, ts.prune.omp(model, 0.5), example_inputs=x)
    assert model.cache["shift"].grad_fn is not None
    with pytest.raises(RuntimeError, match="deepcopy"):
        copy.deepcopy(model)
    small = ts.compact(model, masks, x)  # (fc1's dropped rows output the shift: they stay)
    assert small.cache["shift"].grad_fn is None
    ref = ts.masks.copy_module(model)
    masks.apply(ref)
    other = torch.randn(5, 6)
    with torch.no_grad():
        assert torch.allclose(ref(other), small(other), atol=1e-6)
