"""Property-based tests (hypothesis): for random small architectures and random channel, block and
fan-in masks, compaction keeps the function (block and condensed executors included); regroup
blocks never overlap and cover exactly the kept weights; refill keeps exactly k rows; masks stay
binary at the stated sparsity."""
import contextlib
import math
import os
from unittest import mock

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

import ticketsmith as ts
import ticketsmith.compact.blocks as blocks_mod
import ticketsmith.compact.condensed as condensed_mod
from families import LayerNorm2d, StdConv2d
from ticketsmith.models import PrunableGRN


def executors_on_small_layers():
    """The size limits of the executors' rules lifted (what the `small_executors` fixture does;
    hypothesis tests cannot take function-scoped fixtures)."""
    stack = contextlib.ExitStack()
    stack.enter_context(mock.patch.object(blocks_mod, "BLOCK_CONV_MIN_CHANNELS", 1))
    stack.enter_context(mock.patch.object(condensed_mod, "CONDENSED_MIN_WEIGHTS", 1))
    return stack


# (TS_EXAMPLES=200 for a longer search than the suite's)
SETTINGS = settings(max_examples=int(os.environ.get("TS_EXAMPLES", 20)), deadline=None, suppress_health_check=[HealthCheck.too_slow],
                    derandomize=True)


class ScaledConv(nn.Module):
    """A conv whose output a layer scale (a parameter of no torch layer) multiplies."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.gamma = nn.Parameter(torch.ones(c))

    def forward(self, x):
        return self.conv(x) * self.gamma.view(1, -1, 1, 1)


class RandomNet(nn.Module):
    """stem conv -> blocks (plain conv, residual pair, two-branch concat, a weight-standardised
    conv, a conv with GroupNorm or timm's LayerNorm2d, a ConvNeXt-V2 style 1x1 MLP with GRN as
    a residual, or a layer-scaled conv as a residual) -> pool -> MLP."""

    def __init__(self, spec):
        super().__init__()
        c = spec["stem"]
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=spec["bias"]), nn.BatchNorm2d(c))
        self.kinds = []
        self.blocks = nn.ModuleList()
        for kind, width in spec["blocks"]:
            if kind == "plain":
                self.blocks.append(nn.Sequential(nn.Conv2d(c, width, 3, padding=1, bias=spec["bias"]),
                                                 nn.BatchNorm2d(width)))
                c = width
            elif kind == "residual":
                self.blocks.append(nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c),
                                                 nn.ReLU(), nn.Conv2d(c, c, 3, padding=1, bias=False),
                                                 nn.BatchNorm2d(c)))
            elif kind == "std":  # frozen by compaction into a plain conv, then cut
                self.blocks.append(nn.Sequential(StdConv2d(c, width, 3, padding=1, bias=spec["bias"]),
                                                 nn.BatchNorm2d(width)))
                c = width
            elif kind == "gn":  # GroupNorm (2 groups): a dead channel with zero affine is cut
                self.blocks.append(nn.Sequential(nn.Conv2d(c, 2 * width, 3, padding=1, bias=spec["bias"]),
                                                 nn.GroupNorm(2, 2 * width)))
                c = 2 * width
            elif kind == "ln":  # LayerNorm2d: a dead channel with zero affine is cut
                self.blocks.append(nn.Sequential(nn.Conv2d(c, width, 3, padding=1, bias=spec["bias"]),
                                                 LayerNorm2d(width)))
                c = width
            elif kind == "scale":  # a layer scale, cut with the residual's channels
                self.blocks.append(ScaledConv(c))
            elif kind == "grn":  # hidden units through GRN: a dead one's GRN bias is folded
                grn = PrunableGRN(width, channels_last=False)
                self.blocks.append(nn.Sequential(nn.Conv2d(c, width, 1, bias=spec["bias"]),
                                                 nn.GELU(), grn, nn.Conv2d(width, c, 1)))
            else:  # concat of two branches
                self.blocks.append(nn.ModuleList([
                    nn.Sequential(nn.Conv2d(c, width, 1, bias=False), nn.BatchNorm2d(width)),
                    nn.Sequential(nn.Conv2d(c, width, 3, padding=1, bias=False), nn.BatchNorm2d(width))]))
                c = 2 * width
            self.kinds.append(kind)
        self.pool = spec.get("pool", 2)  # 1: global pooling, the flatten keeps the channels
        self.fc1 = nn.Linear(c * self.pool ** 2, spec["hidden"])
        self.fc2 = nn.Linear(spec["hidden"], 5)

    def forward(self, x):
        x = F.relu(self.stem(x))
        for kind, block in zip(self.kinds, self.blocks):
            if kind in ("residual", "grn", "scale"):
                x = F.relu(x + block(x))
            elif kind == "concat":
                x = F.relu(torch.cat([block[0](x), block[1](x)], 1))
            else:
                x = F.relu(block(x))
        x = F.adaptive_avg_pool2d(x, self.pool).flatten(1)
        return self.fc2(F.relu(self.fc1(x)))


specs = st.fixed_dictionaries({
    "stem": st.integers(2, 8),
    "bias": st.booleans(),
    "blocks": st.lists(st.tuples(st.sampled_from(["plain", "residual", "concat", "std", "grn", "gn",
                                                  "ln", "scale"]),
                                 st.integers(2, 8)),
                       min_size=1, max_size=4),
    "hidden": st.integers(3, 12),
    "pool": st.sampled_from([1, 2]),
})


def randomize_bn(model, g):
    for m in model.modules():
        if isinstance(m, nn.GroupNorm):
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.num_channels, generator=g))
                m.bias.copy_(torch.randn(m.num_channels, generator=g))
        if isinstance(m, (nn.LayerNorm, ScaledConv)):
            with torch.no_grad():
                for p in m.parameters(recurse=False):
                    p.copy_(torch.randn(p.shape, generator=g))
        if isinstance(m, PrunableGRN):  # trained values (zero when initialised)
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g))
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g))


def random_channel_masks(model, x, g, p_dead, companions=True):
    """Random whole dead output channels in every prunable layer, then (with `companions`) their
    BatchNorms and biases."""
    base = ts.Masks.ones(model)
    out = {}
    for k in base.weight_names:
        m = base[k].clone()
        dead = torch.rand(m.shape[0], generator=g) < p_dead
        dead[torch.randint(0, m.shape[0], (1,), generator=g)] = False  # never a whole layer
        m[dead] = False
        out[k] = m
    return ts.channel_companions(model, base.updated(out), x[:1]) if companions else ts.Masks(out)


def compact_and_compare(spec, seed, p_dead, companions):
    """The compact random net against the masked one on another batch; returns both models."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = RandomNet(spec)
    randomize_bn(model, g)
    x = torch.randn(4, 3, 8, 8, generator=g)
    masks = random_channel_masks(model, x, g, p_dead, companions)
    masked = RandomNet(spec)
    masked.load_state_dict(model.state_dict())
    masks.apply(masked)
    masked.eval()
    compact = ts.compact(model, masks, x)
    with torch.no_grad():
        xt = torch.randn(3, 3, 8, 8, generator=g)
        ref, got = masked(xt), compact(xt)
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-5 * max(1.0, ref.abs().max().item()))
    return model, compact


@SETTINGS
@given(spec=specs, seed=st.integers(0, 10_000), p_dead=st.floats(0.0, 0.7))
def test_compact_keeps_the_function_of_random_nets_with_random_channel_masks(spec, seed, p_dead):
    model, compact = compact_and_compare(spec, seed, p_dead, companions=True)
    assert sum(p.numel() for p in compact.parameters()) <= sum(p.numel() for p in model.parameters())


@SETTINGS
@given(spec=specs, seed=st.integers(0, 10_000), p_dead=st.floats(0.1, 0.7))
def test_compact_keeps_the_function_where_dead_rows_keep_their_batch_norm(spec, seed, p_dead):
    """Dead weight rows without their companions: each BatchNorm (and bias) turns its dead
    channel into a constant, which the 1x1 branch of a concatenation and fc1 (after the pool
    and flatten) fold into their biases, and padded 3x3 convs keep reading."""
    compact_and_compare(spec, seed, p_dead, companions=False)


@SETTINGS
@given(spec=specs, seed=st.integers(0, 10_000), sparsity=st.floats(0.05, 0.95),
       extra=st.sampled_from([0.0, 0.3]))
def test_refill_keeps_exactly_k_rows_and_masks_stay_binary(spec, seed, sparsity, extra):
    torch.manual_seed(seed)
    model = RandomNet(spec)
    x = torch.randn(2, 3, 8, 8)
    unstructured = ts.prune.random_masks(model, sparsity, seed=seed)
    refilled = ts.refill(model, unstructured, extra=extra, coupling="none", example_inputs=x[:1])
    for k in unstructured.weight_names:
        m = refilled[k]
        assert m.dtype == torch.bool
        rows = m.reshape(m.shape[0], -1)
        assert (rows.all(1) | ~rows.any(1)).all()  # whole channels only
        c_out = rows.shape[0]
        kept, total = int(unstructured[k].sum()), unstructured[k].numel()
        kk = -(-kept * c_out // total)  # exact: a float density of 0.8 may read 0.80000001
        if unstructured[k].reshape(c_out, -1).any(1).sum() > 0:
            assert int(rows.any(1).sum()) == kk + math.floor(extra * (c_out - kk) + 0.5)


@SETTINGS
@given(seed=st.integers(0, 10_000), s1=st.floats(0.0, 0.9), fraction=st.floats(0.05, 0.6))
def test_pruning_keeps_masks_binary_at_the_stated_sparsity(seed, s1, fraction):
    torch.manual_seed(seed)
    model = ts.models.create("lenet5", 1, 10, (8, 8))
    masks = ts.prune.omp(model, s1)
    assert abs(masks.nonzeros() - round((1 - s1) * masks.numel())) <= 1
    nxt = ts.prune.magnitude(model, masks, fraction)
    assert abs(nxt.nonzeros() - (masks.nonzeros() - round(fraction * masks.nonzeros()))) <= 1
    for k in nxt:
        assert nxt[k].dtype == torch.bool and not (nxt[k] & ~masks[k]).any()


def cells(blocks, n_cols):
    """The (row, flattened column) cells each block covers, as flat indices."""
    return [(b.rows[:, None] * n_cols + b.cols[None, :]).reshape(-1) for b in blocks]


@SETTINGS
@given(spec=specs, seed=st.integers(0, 10_000), sparsity=st.floats(0.3, 0.95),
       granularity=st.sampled_from(["element", "channel"]), t1=st.sampled_from([None, 1]),
       b=st.integers(1, 3))  # None: up to 8 groups per layer (rows // b1)
def test_regroup_blocks_never_overlap_and_cover_exactly_the_kept_weights(
        spec, seed, sparsity, granularity, t1, b):
    torch.manual_seed(seed)
    model = RandomNet(spec)
    unstructured = ts.prune.random_masks(model, sparsity, seed=seed)
    # t2=1: a column with one kept weight in a group's rows qualifies, so every layer has a block
    out = ts.regroup(unstructured, t1=t1, t2=1, b1=b, b2=b, granularity=granularity,
                     seed=seed)
    for k in unstructured.weight_names:
        m = out[k]
        assert m.dtype == torch.bool and m.shape == unstructured[k].shape
        flat = m.reshape(m.shape[0], -1)
        covered = cells(out.blocks.get(k, []), flat.shape[1])
        union = torch.cat(covered) if covered else torch.zeros(0, dtype=torch.long)
        assert union.numel() == union.unique().numel()  # no cell in two blocks
        assert torch.equal(torch.sort(union).values, flat.reshape(-1).nonzero().reshape(-1))


def constant_fan_in_mask(shape, g):
    """An SRigL-style mask: every active row keeps the same k inputs count, some rows ablated."""
    rows, cols = shape
    k = int(torch.randint(1, max(2, cols // 3), (1,), generator=g))
    m = torch.zeros(rows, cols, dtype=torch.bool)
    for r in range(rows):
        if r == 0 or torch.rand(1, generator=g) > 0.3:  # never ablate every neuron
            m[r, torch.randperm(cols, generator=g)[:k]] = True
    return m


@SETTINGS
@given(spec=specs, seed=st.integers(0, 10_000), sparsity=st.floats(0.5, 0.95),
       granularity=st.sampled_from(["element", "channel"]))
def test_compact_keeps_the_function_with_random_block_and_fan_in_masks(spec, seed, sparsity, granularity):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = RandomNet(spec)
    randomize_bn(model, g)
    x = torch.randn(4, 3, 8, 8, generator=g)
    convs = [k for k in ts.Masks.ones(model).weight_names if k != "fc1.weight"]
    source = ts.prune.random_masks(model, sparsity, seed=seed)
    assume(all(bool(source[k].any()) for k in convs))  # regroup refuses an all-zero layer
    blocked = ts.regroup(source, t2=1, b1=1, b2=1, granularity=granularity, layers=convs)
    fan_in = constant_fan_in_mask(model.fc1.weight.shape, g)
    masks = blocked.updated({"fc1.weight": fan_in})
    masked = RandomNet(spec)
    masked.load_state_dict(model.state_dict())
    masks.apply(masked)
    masked.eval()
    with executors_on_small_layers():  # else the size rules keep these small layers dense
        compact = ts.compact(model, masks, x)
    with torch.no_grad():
        xt = torch.randn(3, 3, 8, 8, generator=g)
        ref, got = masked(xt), compact(xt)
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-5 * max(1.0, ref.abs().max().item()))
