"""Gather absorption (ts.compact(..., absorb=True) / ts.compact.absorb_gathers): regrouped conv
layers become one grouped conv, their channel gathers taken over by the neighbouring layers.

Every absorbed model is compared with the masked dense model on inputs other than the example
(another batch size, another spatial size); BN statistics and biases are random so that a
channel moved without its BatchNorm entry, or dropped while read, shows."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import fx, nn
from torch.nn import functional as F

import ticketsmith as ts
from ticketsmith import compact as C
from ticketsmith.compact.absorb import GroupedConv2d
from ticketsmith.compact.blocks import BlockConv2d
from ticketsmith.masks import Block


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g))
            elif isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
    return model.eval()


def channel_blocks(conv: nn.Conv2d, n_blocks: int, seed: int, chans_per_block: int | None = None,
                   rows_split: list[int] | None = None,
                   chans_split: list[int] | None = None) -> list[Block]:
    """Channel-granular blocks partitioning the rows of `conv` (equal shares unless
    `rows_split`), each over its own random input channels (disjoint; `chans_per_block` each
    unless `chans_split`), in scattered order."""
    g = torch.Generator().manual_seed(seed)
    o, i = conv.out_channels, conv.in_channels
    k = conv.kernel_size[0] * conv.kernel_size[1]
    rows, chans = torch.randperm(o, generator=g), torch.randperm(i, generator=g)
    split = rows_split or [o // n_blocks] * n_blocks
    per = chans_per_block or i // n_blocks
    csplit = chans_split or [per] * n_blocks
    blocks, r0, c0 = [], 0, 0
    for nr, nc in zip(split, csplit):
        ch = chans[c0:c0 + nc].sort().values
        cols = (ch.unsqueeze(1) * k + torch.arange(k)).flatten()
        blocks.append(Block(rows[r0:r0 + nr].sort().values, cols))
        r0, c0 = r0 + nr, c0 + nc
    return blocks


def block_masks(model: nn.Module, spec: dict[str, list[Block]]) -> ts.Masks:
    masks, blocks = {}, {}
    for layer, bl in spec.items():
        conv = model.get_submodule(layer)
        union = torch.zeros(conv.out_channels, conv.weight[0].numel(), dtype=torch.bool)
        for b in bl:
            union[b.rows.unsqueeze(1), b.cols.unsqueeze(0)] = True
        masks[f"{layer}.weight"] = union.view_as(conv.weight)
        blocks[f"{layer}.weight"] = bl
    return ts.Masks(masks, blocks)


def masked(model: nn.Module, masks: ts.Masks) -> nn.Module:
    ref = copy.deepcopy(model).eval()
    masks.apply(ref)
    return ref


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))


def assert_exact(model: nn.Module, masks: ts.Masks, small: nn.Module, shapes) -> None:
    ref = masked(model, masks)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for shape in shapes:
            x = torch.randn(shape, generator=g)
            assert rel_err(ref(x), small(x)) < 1e-4, shape


def gathers(gm: fx.GraphModule) -> list[str]:
    """Gather-like operations in a traced graph: index_select, gather, indexing by a tensor."""
    out = []
    for n in gm.graph.nodes:
        name = getattr(n.target, "__name__", str(n.target))
        if name in ("index_select", "gather", "take", "take_along_dim"):
            out.append(name)
        elif name == "getitem" and _indexes_with_tensor(n):
            out.append("getitem")
    return out


def _indexes_with_tensor(node: fx.Node) -> bool:
    found: list[bool] = []
    fx.node.map_arg(node.args[1:], lambda a: found.append(True))
    return bool(found)


def onnx_ops(model: nn.Module, x: torch.Tensor, path) -> list:
    onnx = pytest.importorskip("onnx")
    C.export_onnx(model, x, path)
    return list(onnx.load(str(path)).graph.node)


def rows(small: nn.Module) -> dict[str, dict]:
    return {r["layer"]: r for r in C.describe(small)}


# -- models ---------------------------------------------------------------------------------------
class Chain(nn.Module):
    """Two regrouped convs, each between plain convs / a flatten into a linear head."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.conv3, self.bn3 = nn.Conv2d(32, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16)
        self.conv4 = nn.Conv2d(16, 16, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(16 * 4, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        x = self.pool(F.relu(self.conv4(x)))
        return self.fc(torch.flatten(x, 1))


class Residual(nn.Module):
    """The regrouped conv2 reads a tensor that a residual addition also reads."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv3, self.bn3 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(x)))
        return self.head(F.relu(self.bn3(self.conv3(y)) + x))


class TwoRegrouped(nn.Module):
    """Two regrouped convs in a row (blocks that order the channels differently)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv3, self.bn3 = nn.Conv2d(16, 24, 3, padding=1), nn.BatchNorm2d(24)
        self.conv4 = nn.Conv2d(24, 5, 1)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        return self.conv4(x)


class Untraceable(Chain):
    """Chain with a branch on a tensor's value: torch.fx cannot trace it."""

    def forward(self, x):
        if float(x.mean()) > 1e9:  # never taken; the check alone stops symbolic tracing
            x = -x
        return super().forward(x)


# -- tests --------------------------------------------------------------------------------------
def test_chain_runs_as_grouped_convs_without_gathers(small_executors, tmp_path):
    torch.manual_seed(0)
    model = randomize(Chain())
    masks = block_masks(model, {"conv2": channel_blocks(model.conv2, 4, 1),
                                "conv4": channel_blocks(model.conv4, 4, 2)})
    x = torch.randn(2, 3, 12, 12)
    small = C.compact(model, masks, x, absorb=True)
    for name in ("conv2", "conv4"):
        m = small.get_submodule(name)
        assert type(m) is nn.Conv2d and m.groups == 4, name
        row = rows(small)[name]
        assert row["executor"] == "grouped" and small.ticketsmith_executors[name] == "grouped"
        assert row["gathers"]["input"].startswith("absorbed")
        assert row["gathers"]["output"].startswith("absorbed")
    assert "fc" in rows(small)["conv4"]["gathers"]["output"]  # through the flatten
    assert_exact(model, masks, small, [(5, 3, 12, 12), (1, 3, 17, 9)])
    # no gather anywhere: neither in the torch.fx graph nor in the exported ONNX graph
    assert not any(isinstance(m, (BlockConv2d, GroupedConv2d)) for m in small.modules())
    assert gathers(fx.symbolic_trace(small)) == []
    ops = onnx_ops(small, x, tmp_path / "chain.onnx")
    assert not [n.op_type for n in ops if n.op_type in ("Gather", "GatherElements", "GatherND")]
    groups = sorted(next((a.i for a in n.attribute if a.name == "group"), 1)
                    for n in ops if n.op_type == "Conv")
    assert groups == [1, 1, 4, 4]  # conv1, conv3 dense; conv2, conv4 grouped
    y = C.run_onnx(tmp_path / "chain.onnx", x)[0]
    with torch.no_grad():
        assert rel_err(masked(model, masks)(x), y) < 1e-4
    # saved and loaded like any compact model (a custom architecture: build=)
    C.save(small, tmp_path / "chain")
    again = C.load(tmp_path / "chain", build=Chain)
    with torch.no_grad():
        assert torch.equal(again(x), small(x))


def test_absorb_gathers_on_a_compact_model(small_executors):
    torch.manual_seed(1)
    model = randomize(Chain(), seed=1)
    masks = block_masks(model, {"conv2": channel_blocks(model.conv2, 2, 3)})
    x = torch.randn(2, 3, 10, 10)
    small = C.compact(model, masks, x)
    assert isinstance(small.conv2, BlockConv2d)
    absorbed = C.absorb_gathers(small, x)
    assert isinstance(small.conv2, BlockConv2d)  # the input model is left as it was
    assert type(absorbed.conv2) is nn.Conv2d and absorbed.conv2.groups == 2
    assert absorbed.ticketsmith_compact["absorbed"] is True
    assert_exact(model, masks, absorbed, [(3, 3, 10, 10), (1, 3, 7, 13)])
    with pytest.raises(ts.UsageError, match="compact"):
        C.absorb_gathers(model, x)


def test_residual_addition_keeps_the_input_gather(small_executors, tmp_path):
    torch.manual_seed(2)
    model = randomize(Residual(), seed=2)
    masks = block_masks(model, {"conv2": channel_blocks(model.conv2, 4, 4)})
    x = torch.randn(2, 3, 8, 8)
    small = C.compact(model, masks, x, absorb=True)
    m = small.conv2
    assert isinstance(m, GroupedConv2d) and m.in_index is not None and m.out_index is None
    g = rows(small)["conv2"]["gathers"]
    assert g["input"].startswith("kept") and "addition" in g["input"]
    assert g["output"].startswith("absorbed") and "conv3" in g["output"]
    assert "input gather kept" in g["result"]
    assert_exact(model, masks, small, [(4, 3, 8, 8), (1, 3, 11, 5)])
    ops = onnx_ops(small, x, tmp_path / "res.onnx")
    assert [n.op_type for n in ops].count("Gather") == 1
    xg = x.clone().requires_grad_(True)  # a gradient to the input passes the gather kept
    small(xg).sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    C.save(small, tmp_path / "res")
    again = C.load(tmp_path / "res", build=Residual)
    assert isinstance(again.conv2, GroupedConv2d)
    with torch.no_grad():
        assert torch.equal(again(x), small(x))


def test_two_regrouped_layers_compose_their_gathers(small_executors):
    torch.manual_seed(3)
    model = randomize(TwoRegrouped(), seed=3)
    masks = block_masks(model, {"conv2": channel_blocks(model.conv2, 2, 5),
                                "conv3": channel_blocks(model.conv3, 4, 6)})
    x = torch.randn(2, 3, 8, 8)
    small = C.compact(model, masks, x, absorb=True)
    assert type(small.conv2) is nn.Conv2d and small.conv2.groups == 2
    g2, g3 = rows(small)["conv2"]["gathers"], rows(small)["conv3"]["gathers"]
    assert g2["input"].startswith("absorbed") and "conv3" in g2["output"]
    # conv3's blocks split conv2's blocks' channels otherwise: one gather left, not two
    assert isinstance(small.conv3, GroupedConv2d)
    assert small.conv3.in_index is not None and small.conv3.out_index is None
    assert g3["input"].startswith("kept, composed")
    assert g3["output"].startswith("absorbed")
    assert_exact(model, masks, small, [(3, 3, 8, 8), (1, 3, 9, 7)])


def test_unequal_blocks_are_padded_or_keep_the_executor(small_executors, tmp_path):
    torch.manual_seed(4)
    model = randomize(Chain(), seed=4)
    x = torch.randn(2, 3, 8, 8)
    # 12 + 20 rows over 6 + 6 channels: padded to 2 x 20 rows, 1.25x the blocks' work
    blocks = channel_blocks(model.conv2, 2, 7, chans_per_block=6, rows_split=[12, 20])
    masks = block_masks(model, {"conv2": blocks})
    small = C.compact(model, masks, x, absorb=True)
    assert type(small.conv2) is nn.Conv2d and small.conv2.groups == 2
    assert small.conv2.out_channels == 40 and small.conv3.in_channels == 40  # 8 padded rows
    assert small.bn2.num_features == 40
    g = rows(small)["conv2"]["gathers"]
    assert "8 padded rows" in g["output"] and "padded to equal sizes" in g["result"]
    assert_exact(model, masks, small, [(3, 3, 8, 8), (1, 3, 11, 6)])
    C.save(small, tmp_path / "pad")
    with torch.no_grad():
        assert torch.equal(C.load(tmp_path / "pad", build=Chain)(x), small(x))
    # 5 + 6 channels: the smaller block's padding reads a channel the producer computes twice
    blocks = channel_blocks(model.conv2, 2, 8, rows_split=[16, 16], chans_split=[5, 6])
    masks = block_masks(model, {"conv2": blocks})
    small = C.compact(model, masks, x, absorb=True)
    assert type(small.conv2) is nn.Conv2d and small.conv2.in_channels == 12
    assert small.conv1.out_channels == small.bn1.num_features == 12  # 11 read, 1 twice
    assert "1 computed twice" in rows(small)["conv2"]["gathers"]["input"]
    assert_exact(model, masks, small, [(3, 3, 8, 8), (1, 3, 11, 6)])
    # 8 + 24 rows: padding would cost 1.5x the blocks' work: the executor stays
    blocks = channel_blocks(model.conv2, 2, 7, chans_per_block=6, rows_split=[8, 24])
    masks = block_masks(model, {"conv2": blocks})
    small = C.compact(model, masks, x, absorb=True)
    assert isinstance(small.conv2, BlockConv2d)
    g = rows(small)["conv2"]["gathers"]
    assert "unequal sizes" in g["input"] and g["result"] == "block executor kept"
    assert_exact(model, masks, small, [(3, 3, 8, 8)])


def test_rows_in_no_block_fill_padded_slots(small_executors):
    torch.manual_seed(6)
    model = randomize(Chain(), seed=6)
    # 4 blocks of 7 rows: 4 rows in no block output their (nonzero) bias, a constant that
    # BatchNorm shifts, so surgery keeps them; they fill one slot per block, 8 rows each
    blocks = channel_blocks(model.conv2, 4, 9, rows_split=[7, 7, 7, 7])
    masks = block_masks(model, {"conv2": blocks})
    x = torch.randn(2, 3, 8, 8)
    small = C.compact(model, masks, x, absorb=True)
    assert type(small.conv2) is nn.Conv2d and small.conv2.groups == 4
    assert small.conv2.out_channels == 32
    g = rows(small)["conv2"]["gathers"]
    assert "4 bias-only rows" in g["result"] and g["output"].startswith("absorbed")
    assert_exact(model, masks, small, [(3, 3, 8, 8), (1, 3, 11, 6)])


def test_untraceable_model_keeps_the_executor_with_the_reason(small_executors):
    torch.manual_seed(8)
    model = randomize(Untraceable(), seed=8)
    masks = block_masks(model, {"conv2": channel_blocks(model.conv2, 4, 12)})
    x = torch.randn(2, 3, 8, 8)
    small = C.compact(model, masks, x, absorb=True)
    assert isinstance(small.conv2, BlockConv2d)
    g = rows(small)["conv2"]["gathers"]
    assert "cannot be traced by torch.fx" in g["input"] and g["result"] == "block executor kept"
    assert_exact(model, masks, small, [(3, 3, 8, 8)])


def test_zoo_vgg_two_regrouped_layers_round_trip(small_executors, tmp_path):
    torch.manual_seed(7)
    model = randomize(ts.models.create("vgg11", in_channels=3, num_classes=10,
                                       image_size=(16, 16), width=0.25), seed=7)
    f = model.features
    masks = block_masks(model, {"features.8": channel_blocks(f[8], 4, 10),
                                "features.11": channel_blocks(f[11], 4, 11)})
    x = torch.randn(2, 3, 16, 16)
    small = C.compact(model, masks, x, absorb=True)
    r = rows(small)
    assert r["features.8"]["gathers"]["input"].startswith("absorbed")  # through BN, ReLU, pool
    assert "features.11" in r["features.8"]["gathers"]["output"]
    assert r["features.11"]["gathers"]["output"].startswith("absorbed")
    assert_exact(model, masks, small, [(3, 3, 16, 16), (1, 3, 19, 21)])
    C.save(small, tmp_path / "vgg")
    again = C.load(tmp_path / "vgg")  # a zoo model rebuilds itself
    with torch.no_grad():
        assert torch.equal(again(x), small(x))
    assert rows(again)["features.11"]["gathers"] == r["features.11"]["gathers"]
    grouped = next(m for m in small.modules() if isinstance(m, GroupedConv2d))
    with pytest.raises(ts.UsageError, match="features.11"):
        grouped(torch.randn(1, grouped.in_channels + 1, 4, 4))


def test_export_emits_one_grouped_conv_for_equal_blocks(small_executors, tmp_path):
    onnx = pytest.importorskip("onnx")
    torch.manual_seed(5)
    conv = nn.Conv2d(16, 32, 3, padding=1)
    ex = BlockConv2d.from_conv(conv, channel_blocks(conv, 4, 8))
    assert ex.equal_blocks() and ex.executor == "per-block"
    x = torch.randn(2, 16, 9, 9)
    path = tmp_path / "block.onnx"
    C.export_onnx(ex, x, path)  # dynamic batch
    convs = [n for n in onnx.load(str(path)).graph.node if n.op_type == "Conv"]
    assert len(convs) == 1
    assert next(a.i for a in convs[0].attribute if a.name == "group") == 4
    xb = torch.randn(3, 16, 9, 9)
    with torch.no_grad():
        assert rel_err(ex(xb), C.run_onnx(path, xb)[0]) < 1e-4
    # unequal blocks still export one conv per block
    ex2 = BlockConv2d.from_conv(conv, channel_blocks(conv, 2, 9, chans_per_block=5,
                                                     rows_split=[10, 22]))
    assert not ex2.equal_blocks()
    C.export_onnx(ex2, x, path)
    assert [n.op_type for n in onnx.load(str(path)).graph.node].count("Conv") == 2
