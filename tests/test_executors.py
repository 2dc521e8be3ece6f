"""Block-sparse and condensed executors: every kernel computes the masked dense layer."""
import json
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from ticketsmith.compact.blocks import BlockConv2d, BlockLinear
from ticketsmith.compact.condensed import CondensedLinear, constant_fan_in
from ticketsmith.errors import UsageError
from ticketsmith.io import load_tensors, save_tensors
from ticketsmith.masks import Block


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def make_blocks(kind: str, n_rows: int, n_chans: int, kk: int, g: torch.Generator) -> list[Block]:
    """Random block structures over a [n_rows, n_chans * kk] weight.

    channel: rows partitioned into 3 blocks, each over whole input channels;
    element: 3 blocks over random single columns, some rows left out (bias only);
    overlap: two blocks share rows with disjoint columns, plus one more block;
    single: one block over every row (the identity row placement).
    """
    perm = torch.randperm(n_rows, generator=g)
    cols_all = torch.randperm(n_chans * kk, generator=g)
    if kind == "channel":
        cuts = [0, n_rows // 3, 2 * n_rows // 3, n_rows]
        blocks = []
        for i in range(3):
            chans = torch.randperm(n_chans, generator=g)[: max(1, n_chans // 3)]
            cols = (chans.unsqueeze(1) * kk + torch.arange(kk)).flatten()
            blocks.append(Block(perm[cuts[i]:cuts[i + 1]].sort().values, cols.sort().values))
        return blocks
    if kind == "element":
        rows = perm[: n_rows - 2]  # two rows in no block: they output the bias
        third = rows.numel() // 3
        return [Block(rows[i * third:(i + 1) * third if i < 2 else None].sort().values,
                      torch.randperm(n_chans * kk, generator=g)[: n_chans * kk // 4].sort().values)
                for i in range(3)]
    if kind == "overlap":
        half = cols_all.numel() // 2
        shared = perm[: n_rows // 2].sort().values
        return [Block(shared, cols_all[:half // 2].sort().values),
                Block(shared, cols_all[half:half + 5].sort().values),
                Block(perm[n_rows // 3:].sort().values, cols_all[half // 2: half].sort().values)]
    if kind == "single":
        return [Block(torch.arange(n_rows), cols_all[: cols_all.numel() // 2].sort().values)]
    raise AssertionError(kind)


def union_mask(blocks: list[Block], shape: tuple[int, ...]) -> torch.Tensor:
    m = torch.zeros(shape[0], int(torch.tensor(shape[1:]).prod()), dtype=torch.bool)
    for b in blocks:
        m[b.rows.unsqueeze(1), b.cols.unsqueeze(0)] = True
    return m.reshape(shape)


CONVS = [  # (conv kwargs, input size)
    (dict(in_channels=6, out_channels=10, kernel_size=3, stride=2, padding=1), 9),
    (dict(in_channels=5, out_channels=9, kernel_size=3, padding=0, bias=False), 7),
    (dict(in_channels=4, out_channels=8, kernel_size=(2, 3), padding="same", dilation=2), 8),
]


@pytest.mark.parametrize("kind", ["channel", "element", "overlap", "single"])
@pytest.mark.parametrize("ci", range(len(CONVS)))
def test_block_conv_every_kernel_matches_masked_conv(kind, ci):
    kw, size = CONVS[ci]
    g = torch.Generator().manual_seed(ci * 10 + len(kind))
    torch.manual_seed(ci)
    conv = nn.Conv2d(**kw)
    o, c, kh, kwid = conv.weight.shape
    blocks = make_blocks(kind, o, c, kh * kwid, g)
    mask = union_mask(blocks, tuple(conv.weight.shape))
    before = conv.weight.detach().clone()
    mod = BlockConv2d.from_conv(conv, blocks, name="layer")
    assert torch.equal(conv.weight, before)  # the input layer is left alone
    assert mod.channel_granular == (kind == "channel")
    assert torch.equal(mod.dense_weight(), conv.weight.detach() * mask)
    assert set(mod.candidates()) >= {"per-block", "im2col", "dense"}
    for batch in (1, 3):
        x = torch.randn(batch, c, size, size)
        ref = F.conv2d(x, conv.weight * mask, conv.bias, conv.stride, conv.padding, conv.dilation)
        for fmt in (torch.contiguous_format, torch.channels_last):
            xf = x.contiguous(memory_format=fmt)
            for name in mod.candidates():
                mod.use(name)
                assert mod.executor == name
                with torch.inference_mode():
                    y = mod(xf)
                assert y.shape == ref.shape
                assert rel_err(y, ref) < 1e-4, (name, batch, fmt)
    if kind == "element":  # rows in no block output exactly their bias
        covered = torch.zeros(o, dtype=torch.bool)
        for b in blocks:
            covered[b.rows] = True
        mod.use("per-block")
        y = mod(torch.randn(2, c, size, size))[:, ~covered]
        bias = conv.bias.detach() if conv.bias is not None else torch.zeros(o)
        assert torch.equal(y, bias[~covered].view(1, -1, 1, 1).expand_as(y))


def test_block_conv_grouped_form():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(4)
    conv = nn.Conv2d(9, 12, 3, stride=2, padding=1)
    mod = BlockConv2d.from_conv(conv, make_blocks("channel", 12, 9, 9, g))
    in_index, grouped, out_index = mod.grouped_form()
    assert grouped.groups == 3 and isinstance(grouped, nn.Conv2d)
    x = torch.randn(2, 9, 7, 7)
    y = grouped(x.index_select(1, in_index)).index_select(1, out_index)
    assert rel_err(y, mod(x)) < 1e-5
    with pytest.raises(UsageError, match="exactly one block"):
        BlockConv2d.from_conv(conv, make_blocks("overlap", 12, 9, 9, g)).grouped_form()


def test_block_conv_overlapping_entries_counted_once():
    conv = nn.Conv2d(3, 4, 1)
    rows, cols = torch.tensor([0, 1, 2]), torch.tensor([0, 1])
    mod = BlockConv2d.from_conv(conv, [Block(rows, cols), Block(rows, torch.tensor([1, 2]))])
    x = torch.randn(2, 3, 5, 5)
    for name in mod.candidates():
        mod.use(name)
        ref = F.conv2d(x, conv.weight * union_mask([Block(rows, torch.arange(3))], (4, 3, 1, 1)), conv.bias)
        assert rel_err(mod(x), ref) < 1e-5, name


def test_block_conv_no_blocks_outputs_bias():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    mod = BlockConv2d.from_conv(conv, [Block(torch.tensor([], dtype=torch.int64), torch.tensor([0]))])
    assert mod.candidates() == ["dense"]
    y = mod(torch.randn(2, 3, 5, 5))
    assert torch.equal(y, conv.bias.view(1, -1, 1, 1).expand(2, 4, 5, 5))


def test_condensed_rule_keeps_small_layers_dense():
    g = torch.Generator().manual_seed(0)
    for n_in, n_out, expected in ((784, 300, "dense"), (2048, 1024, "csr")):
        mask = torch.zeros(n_out, n_in, dtype=torch.bool)
        for r in range(n_out):
            mask[r, torch.randperm(n_in, generator=g)[: n_in // 10]] = True
        mod = CondensedLinear.from_linear(nn.Linear(n_in, n_out), mask)
        assert mod.select(1) == expected, (n_in, n_out)


def test_block_conv_rule_keeps_narrow_layers_dense():
    g = torch.Generator().manual_seed(1)
    for c, expected in ((16, "dense"), (128, "per-block")):  # block_conv_sizes.md
        conv = nn.Conv2d(c, c, 3, padding=1)
        chan = BlockConv2d.from_conv(conv, make_blocks("channel", c, c, 9, g))
        assert chan.select(1) == expected and chan.select(64) == expected, c


def test_block_conv_select_and_autotune_keep_the_function(small_executors):  # rule minus size
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 16, 3, padding=1)
    g = torch.Generator().manual_seed(1)
    chan = BlockConv2d.from_conv(conv, make_blocks("channel", 16, 16, 9, g))
    assert chan.select(1) == "per-block" and chan.select(64) == "per-block"
    # random single columns touch nearly every input channel: the blocks cannot pay
    full = [Block(torch.arange(8), torch.randperm(144, generator=g)[:72].sort().values),
            Block(torch.arange(8, 16), torch.randperm(144, generator=g)[:72].sort().values)]
    elem = BlockConv2d.from_conv(conv, full)
    assert elem.select(64) == "dense"
    x = torch.randn(2, 16, 6, 6)
    for mod in (chan, elem):
        mod.use("per-block")
        ref = mod(x)
        best = mod.autotune(x, rounds=2)
        assert best in mod.candidates() and mod.executor == best
        assert set(mod.timings) == set(mod.candidates())
        assert rel_err(mod(x), ref) < 1e-5


def roundtrip(mod, tmp_path):
    """Through JSON and a safetensors file: no pickle anywhere."""
    config = json.loads(json.dumps(mod.to_config()))
    save_tensors(tmp_path / "t.safetensors", mod.tensors())
    tensors, _ = load_tensors(tmp_path / "t.safetensors")
    return type(mod).from_config(config, tensors)


def test_refresh_after_in_place_change():
    conv = nn.Conv2d(4, 6, 3, padding=1)
    mod = BlockConv2d.from_conv(conv, [Block(torch.arange(6), torch.arange(18))])
    x = torch.randn(1, 4, 5, 5)
    for name in mod.candidates():
        mod.use(name)
        before = mod(x)
        with torch.no_grad():
            mod.weight0.mul_(2)
        mod.refresh()
        assert not torch.allclose(mod(x), before)
        with torch.no_grad():
            mod.weight0.div_(2)
        mod.refresh()
        assert rel_err(mod(x), before) < 1e-6


def test_executors_deep_copy_after_use():
    """bench copies models (to channels_last); oneDNN packed weights in the caches are opaque
    tensors that cannot be copied, so a copy starts with empty caches and rebuilds them."""
    import copy
    g = torch.Generator().manual_seed(0)
    conv, lin = nn.Conv2d(8, 12, 3, padding=1), nn.Linear(30, 16)
    mods = [(BlockConv2d.from_conv(conv, make_blocks("channel", 12, 8, 9, g)), torch.randn(64, 8, 6, 6)),
            (BlockLinear.from_linear(lin, [Block(torch.arange(8), torch.arange(10))]), torch.randn(64, 30)),
            (CondensedLinear.from_linear(lin, constant_fan_in_mask_for(lin, 5)), torch.randn(64, 30))]
    for mod, x in mods:
        for name in mod.candidates():
            mod.use(name)
            y = mod(x)
            again = copy.deepcopy(mod)
            assert again.executor == name and torch.equal(again(x), y)
            assert again.to(memory_format=torch.channels_last)(x).shape == y.shape


def constant_fan_in_mask_for(lin: nn.Linear, k: int) -> torch.Tensor:
    m = torch.zeros_like(lin.weight, dtype=torch.bool)
    m[:, :k] = True
    return m


def test_block_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    conv = nn.Conv2d(6, 10, 3, stride=2, padding=1)
    lin = nn.Linear(12, 9)
    mods = [(BlockConv2d.from_conv(conv, make_blocks("overlap", 10, 6, 9, g)), torch.randn(2, 6, 8, 8)),
            (BlockLinear.from_linear(lin, make_blocks("element", 9, 12, 1, g)), torch.randn(3, 12))]
    for mod, x in mods:
        for name in mod.candidates():
            mod.use(name)
            back = roundtrip(mod, tmp_path)
            assert back.executor == name
            assert torch.equal(back(x), mod(x))


@pytest.mark.parametrize("kind", ["channel", "element", "overlap", "single"])
def test_block_linear_every_kernel_matches_masked_linear(kind):
    torch.manual_seed(3)
    g = torch.Generator().manual_seed(len(kind))
    lin = nn.Linear(20, 14, bias=kind != "single")
    blocks = make_blocks(kind, 14, 20, 1, g)
    mask = union_mask(blocks, (14, 20))
    mod = BlockLinear.from_linear(lin, blocks)
    for x in (torch.randn(20), torch.randn(1, 20), torch.randn(5, 20), torch.randn(2, 3, 20)):
        ref = F.linear(x, lin.weight * mask, lin.bias)
        for name in mod.candidates():
            mod.use(name)
            y = mod(x)
            assert y.shape == ref.shape
            assert rel_err(y, ref) < 1e-4, (name, x.shape)
    assert mod.select(1) in mod.candidates()
    if lin.bias is not None:  # batch-1 outputs must never alias (and then overwrite) the bias
        assert torch.equal(mod.bias, lin.bias)


def constant_fan_in_mask(o: int, i: int, k: int, zero_rows: int, g: torch.Generator) -> torch.Tensor:
    m = torch.zeros(o, i, dtype=torch.bool)
    for r in torch.randperm(o, generator=g)[: o - zero_rows]:
        m[r, torch.randperm(i, generator=g)[:k]] = True
    return m


@pytest.mark.parametrize("zero_rows,bias", [(0, True), (3, True), (2, False)])
def test_condensed_every_kernel_matches_masked_linear(zero_rows, bias):
    torch.manual_seed(zero_rows)
    g = torch.Generator().manual_seed(zero_rows)
    lin = nn.Linear(30, 12, bias=bias)
    mask = constant_fan_in_mask(12, 30, 4, zero_rows, g)
    mod = CondensedLinear.from_linear(lin, mask)
    assert mod.fan_in == 4 and mod.n_active == 12 - zero_rows
    assert mod.macs_per_sample() == int(mask.sum())
    assert torch.equal(mod.dense_weight(), lin.weight.detach() * mask)
    assert set(mod.candidates()) >= {"csr", "embedding_bag", "gather", "dense"}
    for x in (torch.randn(30), torch.randn(1, 30), torch.randn(7, 30), torch.randn(2, 3, 30)):
        ref = F.linear(x, lin.weight * mask, lin.bias)
        for name in mod.candidates():
            mod.use(name)
            for mode in (torch.no_grad, torch.inference_mode):
                with mode():
                    y = mod(x)
                assert y.shape == ref.shape
                assert rel_err(y, ref) < 1e-4, (name, x.shape)
    mod.use("embedding_bag")
    mod.bag_tile = 2  # the batch cut into tiles (a remainder tile included)
    x = torch.randn(7, 30)
    assert rel_err(mod(x), F.linear(x, lin.weight * mask, lin.bias)) < 1e-4
    if bias:
        assert torch.equal(mod.bias, lin.bias)
    if zero_rows:  # ablated neurons output their bias (or zero)
        dead = ~mask.any(1)
        y = mod(torch.randn(4, 30))
        expect = lin.bias[dead] if bias else torch.zeros(int(dead.sum()))
        assert torch.equal(y[:, dead], expect.expand(4, -1))


def test_condensed_select_autotune_and_round_trip(tmp_path, small_executors):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(64, 32)
    mod = CondensedLinear.from_linear(lin, constant_fan_in_mask(32, 64, 6, 4, g))
    assert mod.select(1) == "csr"
    assert mod.select(256) == "embedding_bag"
    x = torch.randn(8, 64)
    ref = mod(x)
    best = mod.autotune(x, rounds=2)
    assert mod.executor == best and best in mod.candidates()
    assert rel_err(mod(x), ref) < 1e-5
    for name in mod.candidates():
        mod.use(name)
        back = roundtrip(mod, tmp_path)
        assert back.executor == name and back.fan_in == 6
        assert torch.equal(back(x), mod(x))
    # a dense-enough mask is run dense
    dense = CondensedLinear.from_linear(lin, constant_fan_in_mask(32, 64, 48, 0, g))
    assert dense.select(1) == "dense" and dense.select(256).startswith("dense")


def test_condensed_all_rows_ablated():
    lin = nn.Linear(5, 3)
    mod = CondensedLinear.from_linear(lin, torch.zeros(3, 5))
    assert mod.candidates() == ["dense"] and mod.fan_in == 0
    assert torch.equal(mod(torch.randn(2, 5)), lin.bias.expand(2, 3))


def test_constant_fan_in():
    assert constant_fan_in(torch.tensor([[1, 0, 1], [0, 0, 0], [1, 1, 0]])) == 2
    assert constant_fan_in(torch.tensor([[1, 0, 1], [0, 1, 0]])) is None
    assert constant_fan_in(torch.zeros(2, 3)) == 0


def test_bad_inputs_raise_usage_error():
    conv, lin = nn.Conv2d(4, 6, 3), nn.Linear(8, 5)
    ok = [Block(torch.tensor([0, 1]), torch.tensor([0, 1, 2]))]
    with pytest.raises(UsageError, match="groups"):
        BlockConv2d.from_conv(nn.Conv2d(4, 6, 3, groups=2), ok)
    with pytest.raises(UsageError, match="padding_mode"):
        BlockConv2d.from_conv(nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"), ok)
    with pytest.raises(UsageError, match="nn.Conv2d"):
        BlockConv2d.from_conv(lin, ok)
    with pytest.raises(UsageError, match="out of range"):
        BlockConv2d.from_conv(conv, [Block(torch.tensor([0]), torch.tensor([36]))], name="l1")
    with pytest.raises(UsageError, match="l1.*repeated"):
        BlockConv2d.from_conv(conv, [Block(torch.tensor([0, 0]), torch.tensor([1]))], name="l1")
    with pytest.raises(UsageError, match="integer"):
        BlockLinear.from_linear(lin, [Block(torch.tensor([0.5]), torch.tensor([1]))])
    with pytest.raises(UsageError, match="sequence"):
        BlockLinear.from_linear(lin, torch.ones(5, 8))
    mod = BlockConv2d.from_conv(conv, ok, name="l1")
    with pytest.raises(UsageError, match=r"l1.*\[N, 4, H, W\]"):
        mod(torch.randn(2, 3, 8, 8))
    with pytest.raises(UsageError, match="unknown executor"):
        mod.use("cuda-magic")
    with pytest.raises(UsageError, match="batch_size"):
        mod.select(0)
    with pytest.raises(UsageError, match="BlockLinear"):
        BlockConv2d.from_config(BlockLinear.from_linear(lin, ok).to_config(), {})
    with pytest.raises(UsageError, match="missing tensors"):
        BlockConv2d.from_config(mod.to_config(), {})
    bad = dict(mod.tensors(), cols0=torch.tensor([2, 1, 40]))
    with pytest.raises(UsageError, match="cols0"):
        BlockConv2d.from_config(mod.to_config(), bad)
    with pytest.raises(UsageError, match="constant fan-in.*between 1 and 2"):
        CondensedLinear.from_linear(lin, torch.tensor([[1, 0, 0, 0, 0, 0, 0, 0],
                                                       [1, 1, 0, 0, 0, 0, 0, 0]] + [[0] * 8] * 3))
    with pytest.raises(UsageError, match="shape"):
        CondensedLinear.from_linear(lin, torch.ones(8, 5))
    with pytest.raises(UsageError, match="binary"):
        CondensedLinear.from_linear(lin, torch.full((5, 8), 0.5))
    cl = CondensedLinear.from_linear(lin, torch.ones(5, 8), name="fc")
    with pytest.raises(UsageError, match=r"fc.*\[\.\.\., 8\]"):
        cl(torch.randn(3, 7))


def _onnx_check(mod, x, dynamo=False):
    ort = pytest.importorskip("onnxruntime")
    import io
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            prog = torch.onnx.export(mod, (x,), dynamo=True, verbose=False,
                                     dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
            prog.save(buf)
        else:
            torch.onnx.export(mod, (x,), buf, dynamo=False, input_names=["x"], output_names=["y"],
                              dynamic_axes={"x": {0: "batch"}})
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    for batch in (x.shape[0], 5):  # a batch other than the traced one
        xb = torch.randn((batch,) + tuple(x.shape[1:]))
        (y,) = sess.run(None, {sess.get_inputs()[0].name: xb.numpy()})
        assert rel_err(torch.from_numpy(y), mod(xb)) < 1e-4


def test_onnx_export_runs_under_onnxruntime():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(5)
    conv = nn.Conv2d(6, 10, 3, stride=2, padding=1)
    conv_mod = BlockConv2d.from_conv(conv, make_blocks("element", 10, 6, 9, g))  # uncovered rows
    over_mod = BlockConv2d.from_conv(conv, make_blocks("overlap", 10, 6, 9, g))  # summed rows
    lin_mod = BlockLinear.from_linear(nn.Linear(12, 9), make_blocks("overlap", 9, 12, 1, g))
    cond = CondensedLinear.from_linear(nn.Linear(16, 8), constant_fan_in_mask(8, 16, 3, 2, g))
    x4, x2 = torch.randn(2, 6, 9, 9), torch.randn(2, 12)
    for mod, x in ((conv_mod, x4), (over_mod, x4), (lin_mod, x2)):
        mod.use("per-block")
        _onnx_check(mod, x)
    for name in ("csr", "gather"):
        cond.use(name)
        _onnx_check(cond, torch.randn(2, 16))
    cond.use("embedding_bag")
    _onnx_check(cond, torch.randn(2, 16), dynamo=True)
