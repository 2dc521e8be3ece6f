"""The model families users bring, as small replicas of their tricky ops (tests/families.py),
through every structure: refill channel tickets, regroup blocks (element and channel
granularity), SRigL-style constant fan-in masks. Each (family, structure) is one test: the
compact model is exact against the masked model on inputs other than the example, smaller where
a channel or block could go, survives save/load (with `build=`) and ONNX export.

The real torchvision / timm models run under the optional `zoo` marker when installed."""
from __future__ import annotations

import contextlib
import importlib.util
import math
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import ticketsmith as ts
from ticketsmith import compact as C
from ticketsmith.errors import UsageError
from ticketsmith.masks import copy_module

from families import FAMILIES, BatchNormAct2d, Conv2dSame, StdConv2d, TinyPoolFormer
from families import builder as builder_of

STRUCTURES = ("refill", "regroup-element", "regroup-channel", "constant-fan-in")



# (family, structure) pairs whose masks leave nothing to remove: regroup keeps a block in
# every row (no channel dies) and either the blocks cover too much of these small layers for a
# block executor (the GRN MLPs' fc1) or the layer is frozen (BiT's weight-standardised convs:
# a standardised row is dense, its blocks are dropped). Checked: nothing is cut, and the
# model is exact.
NOTHING_TO_REMOVE = {("convnext_v2", "regroup-element"), ("convnext_v2", "regroup-channel"),
                     ("bit", "regroup-element"), ("bit", "regroup-channel")}

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models


def magnitude(model: nn.Module, sparsity: float) -> ts.Masks:
    """Global magnitude pruning over the prunable weights (it may empty a whole layer)."""
    names = ts.prunable_names(model)
    params = dict(model.named_parameters())
    flat = torch.cat([params[n].detach().abs().flatten() for n in names])
    threshold = flat.kthvalue(int(sparsity * flat.numel())).values
    return ts.Masks({n: params[n].detach().abs() > threshold for n in names})


def constant_fan_in(model: nn.Module, x: torch.Tensor, density: float = 0.2) -> ts.Masks:
    """SRigL-style masks: every row keeps its k largest weights (k the same for the layer),
    every fourth row ablated (SRigL's neuron ablation), with the companions that make an
    ablated neuron output zero."""
    params = dict(model.named_parameters())
    out = {}
    for n in ts.prunable_names(model):
        rows = params[n].detach().reshape(params[n].shape[0], -1)
        k = max(1, round(density * rows.shape[1]))
        m = torch.zeros_like(rows, dtype=torch.bool)
        m.scatter_(1, rows.abs().topk(k, dim=1).indices, True)
        m[::4] = False
        out[n] = m.view_as(params[n])
    return ts.channel_companions(model, ts.Masks(out), x)


def structured(kind: str, model: nn.Module, x: torch.Tensor) -> ts.Masks:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # empty / unblocked layers are reported by warnings
        if kind == "refill":
            return ts.refill(model, magnitude(model, 0.5), example_inputs=x)
        if kind.startswith("regroup"):
            return ts.regroup(magnitude(model, 0.8), granularity=kind.split("-")[1])
        return constant_fan_in(model, x)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) / max(float(a.abs().max()), 1e-12)


def assert_matches_masked(model: nn.Module, masks, small: nn.Module, shapes) -> None:
    """`small` computes what `model` with `masks` applied computes, on random inputs of `shapes`."""
    masked = copy_module(model)
    masks.apply(masked)
    with torch.no_grad():
        for s in shapes:
            xi = torch.randn(s)
            assert rel_err(masked(xi), small(xi)) < 1e-4


def assert_loads_the_same(small: nn.Module, build, shape, tmp_path) -> None:
    """`small`, saved and loaded with the builder of its architecture, computes bit-identically."""
    C.save(small, tmp_path / "ticket")
    again = C.load(tmp_path / "ticket", build=build)
    with torch.no_grad():
        xi = torch.randn(shape)
        assert torch.equal(small(xi), again(xi))


def half_per_layer(model: nn.Module, x: torch.Tensor) -> ts.Masks:
    """Refill of a magnitude mask keeping half of each layer (of four heads, two or three
    stay: ties at the median are kept)."""
    params = {n: p.detach().abs() for n, p in model.named_parameters()}
    return ts.refill(model, ts.Masks({n: params[n] >= params[n].median() for n in ts.prunable_names(model)}),
                     example_inputs=x)


def assert_exact_saved_and_exported(model, masks, small, build, x, others, load_shape,
                                    tmp_path) -> None:
    """`small` matches the masked model on `others`, loads bit-identically (checked on
    `load_shape`), and its ONNX export computes the same on `others[0]`."""
    assert_matches_masked(model, masks, small, others)
    assert_loads_the_same(small, build, load_shape, tmp_path)
    pytest.importorskip("onnxruntime")
    path = C.export_onnx(small, x, tmp_path / "ticket.onnx")
    xb = torch.randn(others[0])
    with torch.no_grad():
        assert rel_err(small(xb), C.run_onnx(path, xb)[0]) < 1e-4


def shared_stream_ticket(family: str, first: str):
    """(build, other input shapes, model, example, masks, dead) for a family: a 50% magnitude
    mask refilled with one channel set per residual stream; `dead`: the rows of layer weight
    `first` (the stream's first layer) refill dropped, at least one."""
    build, shape, others = FAMILIES[family]
    model = build()
    x = torch.randn(shape)
    masks = ts.refill(model, magnitude(model, 0.5), example_inputs=x, coupling="shared")
    rows = masks[first]
    dead = ~rows.reshape(rows.shape[0], -1).any(1)
    assert bool(dead.any())
    return build, others, model, x, masks, dead


def n_params(model: nn.Module) -> int:
    return sum(t.numel() for t in model.state_dict().values() if t.is_floating_point())


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_through_structure(family, structure, small_executors, tmp_path):
    build, shape, others = FAMILIES[family]
    model = build()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    masks = structured(structure, model, x)
    masked = copy_module(model)
    masks.apply(masked)
    small = C.compact(model, masks, x)

    # exact on inputs other than the example (another batch, another spatial size)
    g = torch.Generator().manual_seed(2)
    inputs = [torch.randn(s, generator=g) for s in others]
    with torch.no_grad():
        for xi in inputs:
            assert rel_err(masked(xi), small(xi)) < 1e-4, (family, structure, tuple(xi.shape))

    # smaller (a channel or block went); every layer kept whole says why
    rows = C.describe(small)
    if (family, structure) in NOTHING_TO_REMOVE:
        assert not small.ticketsmith_compact["removed_channels"]
    else:
        assert n_params(small) < n_params(model), (family, structure)
    for r in rows:  # every layer kept whole says why
        assert r["reason"]

    # save / load with the builder of the original architecture: bit-identical
    C.save(small, tmp_path / "ticket")
    again = C.load(tmp_path / "ticket", build=build)
    # (by name: a parametrized layer's class is created per instance)
    assert [type(m).__name__ for m in again.modules()] == [type(m).__name__ for m in small.modules()]
    with torch.no_grad():
        for xi in inputs:
            assert torch.equal(small(xi), again(xi))

    # ONNX (dynamic batch): run at another batch size under onnxruntime
    pytest.importorskip("onnxruntime")
    path = C.export_onnx(small, x, tmp_path / "ticket.onnx")
    xb = inputs[0]
    with torch.no_grad():
        ref = small(xb)
    assert rel_err(ref, C.run_onnx(path, xb)[0]) < 1e-4


# -- layers that must not be rebuilt ----------------------------------------------------------
@pytest.mark.parametrize("granularity", ["element", "channel"])
def test_forward_overriding_convs_keep_their_class_or_are_frozen(granularity, small_executors):
    """Conv2dSame pads from the input size: rebuilt from weight/stride/padding it computes
    another function (exact at no size, or only at the example's), so it keeps its class, and
    describe() says why. StdConv2d standardises its weight from its parameters alone: it
    becomes the plain Conv2d holding the standardised weight, and its blocks (which described
    the mask, not the standardised weight, dense in each kept row) are dropped."""
    build, shape, others = FAMILIES["efficientnet_tf"]
    model = build()
    x = torch.randn(shape)
    masks = ts.regroup(ts.Masks({n: torch.rand(p.shape, generator=torch.Generator().manual_seed(3))
                                 < 0.15 for n, p in model.named_parameters()
                                 if n in ("conv_stem.weight", "conv_std.weight")}),
                       granularity=granularity, b1=2, b2=1)
    small = C.compact(model, masks, x)
    rows = {r["layer"]: r for r in C.describe(small)}
    assert type(small.conv_stem) is Conv2dSame and type(small.conv_std) is nn.Conv2d
    assert "Conv2dSame overrides the forward" in rows["conv_stem"]["reason"]
    assert rows["conv_std"]["reason"].startswith("frozen from a StdConv2d")
    assert rows["conv_std"]["executor"] == "dense"
    assert small.ticketsmith_compact["frozen"] == {"conv_std": "StdConv2d"}
    masked = copy_module(model)
    masks.apply(masked)
    with torch.no_grad():
        for s in others:  # 19 px: TF-"same" padding is asymmetric there
            xi = torch.randn(s)
            assert rel_err(masked(xi), small(xi)) < 1e-4


def test_a_forward_overriding_conv_reading_dead_channels_loses_those_inputs():
    """A TF-"same" padding conv (its own forward) whose input channels die: its weight columns
    for them are not zero (refill keeps its rows dense), but the channels are, so a copy with
    those inputs cut computes what it computed on them; they go. (The check compared the cut
    copy with the layer on random values in the dead channels, and kept them.)"""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), Conv2dSame(8, 6, 3, stride=2),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 2)).eval()
    masks = ts.Masks.ones(model)
    rows = masks["0.weight"].clone()
    rows[:3] = False
    masks = masks.updated({"0.weight": rows, "0.bias": torch.arange(8) >= 3})
    x = torch.randn(2, 3, 9, 9)
    small = C.compact(model, masks, x)
    assert type(small[2]) is Conv2dSame and small[2].in_channels == 5
    masked = copy_module(model)
    masks.apply(masked)
    with torch.no_grad():
        xi = torch.randn(1, 3, 12, 13)
        assert rel_err(masked(xi), small(xi)) < 1e-4


def test_compact_checks_inputs_other_than_the_example():
    """compact's self-check runs the masked and the compact model on another batch size and,
    where the model takes it, another (odd) spatial size, at a tolerance that a wrong padding
    (3e-4 at the example size in the issue) does not pass."""
    assert C.VERIFY_TOLERANCE <= 1e-4
    build, shape, _ = FAMILIES["efficientnet_tf"]
    model = build()
    checks = C._check_inputs(model, (torch.randn(shape),))
    assert [tuple(x[0].shape) for _, x, _ in checks] == [(3, 3, 16, 16), (1, 3, 19, 19)]
    fixed = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)).eval()
    checks = C._check_inputs(fixed, (torch.randn(2, 3, 8, 8),))
    assert [tuple(x[0].shape) for _, x, _ in checks] == [(3, 3, 8, 8)]  # one size only


def test_attention_reads_out_proj_weight(small_executors):
    """nn.MultiheadAttention reads out_proj.weight itself: out_proj stays a Linear (with the
    zeros folded in) while the MLP's layers get executors, and the model runs and matches."""
    build, shape, others = FAMILIES["vit_mha"]
    model = build()
    x = torch.randn(shape)
    masks = constant_fan_in(model, x)
    small = C.compact(model, masks, x)
    rows = {r["layer"]: r for r in C.describe(small)}
    assert type(small.block.attn.out_proj) is type(model.block.attn.out_proj)
    assert "its owner reads its parameters directly" in rows["block.attn.out_proj"]["reason"]
    assert rows["block.fc1"]["module"] == "CondensedLinear"
    assert_matches_masked(model, masks, small, others)
    assert bool((small.block.attn.out_proj.weight[~masks["block.attn.out_proj.weight"]] == 0).all())


def test_transformer_mlp_hidden_units_are_removed():
    """Channel tickets of a ViT / Mixer / ConvNeXt block remove MLP hidden units: a Linear on a
    >2-D tensor (features in the last dimension) couples with its consumer through per-feature
    ops only."""
    for family, (first, second) in {"vit_mha": ("block.fc1", "block.fc2"),
                                    "mlp_mixer": ("block.ch1", "block.ch2"),
                                    "convnext": ("block.pwconv1", "block.pwconv2"),
                                    "pvt_mix_ffn": ("mlp.fc1", "mlp.fc2")}.items():
        build, shape, _ = FAMILIES[family]
        model = build()
        x = torch.randn(shape)
        masks = structured("refill", model, x)
        kept = int(masks[f"{first}.weight"].reshape(masks[f"{first}.weight"].shape[0], -1)
                   .any(dim=1).sum())
        small = C.compact(model, masks, x)
        fc1, fc2 = small.get_submodule(first), small.get_submodule(second)
        if family == "pvt_mix_ffn":  # the depthwise conv between them, on the tokens viewed
            # as a map: a unit whose fc1 row or conv row is dead outputs the conv's bias there,
            # one value everywhere (through GELU), which fc2 folds into its bias
            rows = masks["mlp.dwconv.weight"].reshape(masks["mlp.dwconv.weight"].shape[0], -1)
            kept = small.mlp.dwconv.groups
            assert small.mlp.dwconv.in_channels == kept <= int(
                (masks[f"{first}.weight"].any(dim=1) & rows.any(dim=1)).sum())
        assert fc1.out_features == kept < model.get_submodule(first).out_features, family
        assert fc2.in_features == kept, family


def test_star_relu_dead_hidden_units_fold_into_the_next_layer():
    """ConvFormer's MLP: a dead fc1 unit outputs StarReLU's bias, one value everywhere; it goes,
    folded into fc2's bias (fc2 had none). The SepConv's dead units pass a padded depthwise conv
    (borders differ): they stay unless unread."""
    build, shape, others = FAMILIES["convformer"]
    model = build()
    x = torch.randn(shape)
    masks = structured("refill", model, x)
    alive = int(masks["fc1.weight"].any(dim=1).sum())
    assert alive < 64
    small = C.compact(model, masks, x)
    assert small.fc1.out_features == small.fc2.in_features <= alive
    assert model.fc2.bias is None and small.fc2.bias is not None
    masked = copy_module(model)
    masks.apply(masked)
    with torch.no_grad():
        for s in others:
            xi = torch.randn(s)
            torch.testing.assert_close(small(xi), masked(xi), atol=1e-5, rtol=1e-4)


class ScalarShift(nn.Module):
    """A channel shifted by a learned scalar after a ReLU: a dead channel is not dead after it."""

    def __init__(self, padding):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.shift = nn.Parameter(torch.full((1,), 0.5))
        self.conv2 = nn.Conv2d(8, 8, 1 + 2 * padding, padding=padding, bias=False)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.conv2(F.relu(self.conv1(x)) + self.shift).mean((2, 3)))


@pytest.mark.parametrize("padding", [0, 1])
def test_a_scalar_parameter_added_to_a_dead_channel_makes_it_constant(padding):
    """conv1's dead channels hold the shift everywhere: a 1x1 conv without padding reads them
    folded into its bias, and they go; a padded 3x3 conv reads zeros at the border, and they
    stay. Either way the compact model computes the masked one."""
    from ticketsmith.compact.channel import remove_dead_channels
    torch.manual_seed(0)
    model = ScalarShift(padding).eval()
    with torch.no_grad():
        model.conv1.weight[:3] = 0
        model.conv1.bias[:3] = 0
    x = torch.randn(2, 3, 8, 8)
    small = copy_module(model)
    remove_dead_channels(small, x)
    assert small.conv1.out_channels == (5 if padding == 0 else 8)
    assert (small.conv2.bias is not None) == (padding == 0)  # the shift, folded
    with torch.no_grad():
        xi = torch.randn(3, 3, 11, 9)
        torch.testing.assert_close(small(xi), model(xi), atol=1e-5, rtol=1e-4)
        model.shift.zero_()  # dead channels now: they go, and nothing is folded
    small = copy_module(model)
    remove_dead_channels(small, x)
    assert small.conv1.out_channels == 5 and small.conv2.bias is None


def test_levit_mlp_hidden_units_go_through_its_batch_norm_on_flattened_tokens():
    """LeViT's LinearNorm: the hidden units' BatchNorm1d reads them in the last axis of the
    tokens flattened into the batch. Units whose Linear row and BatchNorm affine are zero go,
    in all three layers, exactly; a refill ticket zeroes that BatchNorm with its layer."""
    from families import TinyLeViT, builder
    model = builder(TinyLeViT)()
    x = torch.randn(2, 3, 16, 16)
    dead = torch.zeros(32, dtype=torch.bool)
    dead[::3] = True
    keep = {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters()}
    for key in ("ln1.linear.weight", "ln1.bn.weight", "ln1.bn.bias"):
        keep[key] = (~dead[:, None]).expand_as(keep[key]).clone() if keep[key].dim() > 1 else ~dead
    masks = ts.Masks(keep)
    small = C.compact(model, masks, x)
    kept = int((~dead).sum())
    assert small.ln1.linear.out_features == small.ln1.bn.num_features == kept
    assert small.ln2.linear.in_features == kept
    assert_matches_masked(model, masks, small, [(3, 3, 16, 16), (1, 3, 20, 20)])
    # a refill ticket: its companions zero the BatchNorm1d of the dropped units (reached
    # through the flatten of the tokens), so they go
    masks = structured("refill", model, x)
    dropped = ~masks["ln1.linear.weight"].any(dim=1)
    assert bool(dropped.any()) and not bool((masks["ln1.bn.weight"] & dropped).any())
    small = C.compact(model, masks, x)
    assert small.ln1.bn.num_features == small.ln2.linear.in_features < 32


def test_a_view_that_mixes_tokens_into_channels_keeps_the_group_whole():
    """MixFFN with the tokens reshaped to a map without the transpose: the conv's channels are
    no longer the Linear's features, so the hidden units stay, with the reason, and the
    compact model is exact."""
    from families import TinyPVT, builder
    build, shape, others = builder(TinyPVT, scrambled=True), (2, 3, 16, 16), [(3, 3, 16, 16)]
    model = build()
    x = torch.randn(shape)
    masks = structured("refill", model, x)
    small = C.compact(model, masks, x)
    assert small.mlp.fc1.out_features == model.mlp.fc1.out_features
    why = {r["layer"]: r.get("group_left_whole") for r in C.describe(small)}
    assert "reshape" in (why["mlp.fc1"] or ""), why["mlp.fc1"]
    assert_matches_masked(model, masks, small, others)


@pytest.mark.parametrize("family,qkv,proj,at", [("vit_timm", "qkv", "proj", "block.attn"),
                                                 ("vit_qkv", "in_proj", "out_proj", "block.attn"),
                                                 ("swin_windows", "qkv", "proj", "block3.attn"),
                                                 ("swin_v2_windows", "qkv", "proj", "block3.attn"),
                                                 ("swin_timm", "qkv", "proj", "block3.attn.attn"),
                                                 ("swin_v2_timm", "qkv", "proj", "block3.attn.attn"),
                                                 ("beit", "qkv", "proj", "blocks.1.attn"),
                                                 ("eva", "qkv", "proj", "blocks.0.attn"),
                                                 ("maxvit_attention", "to_qkv", "merge", "attn"),
                                                 ("xcit", "qkv", "proj", "attn"),
                                                 ("twins_local", "qkv", "proj", "attn")])
def test_attention_heads_are_refilled_and_removed(family, qkv, proj, at, tmp_path):
    """A channel ticket of a timm-style attention (or of nn.MultiheadAttention swapped for a
    QKVAttention, or of torchvision's Swin V1 / V2 window attention swapped for a
    WindowAttention, or timm's Swin window attention as it is, or timm's Swin V2 window
    attention swapped for a TimmWindowAttentionV2, or timm's BEiT / EVA attention swapped for a
    BeitAttention / EvaAttention, or torchvision's MaxViT attention swapped for a
    GridAttention, or XCiT's / Twins' local attention swapped for an XcaAttention /
    GroupedWindowAttention) keeps or drops whole heads (q, k,
    v rows and the projection's columns), and compaction removes the dropped ones: num_heads goes
    down, the parameters by the heads' share (Swin: with their columns of the relative position
    bias table, found by shape in timm's; Swin V2: their logit scales and rows of the bias MLP),
    exact on other batch sizes and sequence lengths, and through save / load and ONNX."""
    build, shape, others = FAMILIES[family]
    model = build()
    x = torch.randn(shape)
    masks = structured("refill", model, x)
    attn = model.get_submodule(at)
    nh, dim = attn.num_heads, attn.get_submodule(qkv).in_features
    hd = attn.get_submodule(qkv).out_features // (3 * nh)
    per_head = masks[f"{at}.{qkv}.weight"].reshape(3, nh, hd, dim)
    assert bool((per_head.all(dim=(0, 2, 3)) | ~per_head.any(dim=(0, 2, 3))).all())  # whole heads
    kept = per_head.all(dim=(0, 2, 3))
    k = int(kept.sum())
    assert 0 < k < nh
    assert not bool(masks[f"{at}.{qkv}.bias"].reshape(3, nh, hd)[:, ~kept].any())
    cols = masks[f"{at}.{proj}.weight"].reshape(dim, nh, hd)
    assert not bool(cols[:, ~kept].any())  # the dropped heads' columns read zeros

    small = C.compact(model, masks, x)
    a = small.get_submodule(at)
    assert (a.num_heads, a.get_submodule(qkv).out_features,
            a.get_submodule(proj).in_features) == (k, 3 * k * hd, k * hd)
    heads_share = (nh - k) * (3 * hd * (dim + 1) + dim * hd)
    assert n_params(model) - n_params(small) >= heads_share
    rows = {r["layer"]: r for r in C.describe(small)}
    assert rows[f"{at}.{qkv}"]["heads"] == f"kept {k} of {nh} heads of {at}"
    assert small.ticketsmith_compact["removed_heads"][at]["heads"] == [nh, k]
    if hasattr(attn, "relative_position_bias_table"):
        table = attn.relative_position_bias_table
        assert torch.equal(a.relative_position_bias_table, table[:, kept])

    masked = copy_module(model)
    masks.apply(masked)
    if hasattr(attn, "logit_scale"):  # Swin V2: per head, a logit scale and a bias MLP output
        assert torch.equal(a.logit_scale, attn.logit_scale[kept])
        assert a.cpb_mlp[2].out_features == k
        with torch.no_grad():
            assert torch.allclose(a.relative_position_bias(),
                                  masked.get_submodule(at).relative_position_bias()[:, kept], atol=1e-6)
    g = torch.Generator().manual_seed(2)
    inputs = [torch.randn(s, generator=g) for s in others]  # (1, 3, 24, 24): 36 tokens, not 16
    with torch.no_grad():
        for xi in inputs:
            assert rel_err(masked(xi), small(xi)) < 1e-4

    C.save(small, tmp_path / "ticket")
    again = C.load(tmp_path / "ticket", build=build)
    assert again.get_submodule(at).num_heads == k
    assert getattr(again.get_submodule(at), "attn_dim", k * hd) == k * hd  # timm's derived width too
    with torch.no_grad():
        for xi in inputs:
            assert torch.equal(small(xi), again(xi))

    pytest.importorskip("onnxruntime")
    path = C.export_onnx(small, x, tmp_path / "ticket.onnx")
    with torch.no_grad():
        assert rel_err(small(inputs[0]), C.run_onnx(path, inputs[0])[0]) < 1e-4


def test_a_ticket_saved_without_its_per_head_record_still_loads(tmp_path):
    """A Swin ticket saved before the per-head tensors and kept heads were recorded loads as
    before (the declared bias table, the first heads' slices, then the saved weights); a kept
    head that the module never had is refused, naming the record."""
    import json

    from ticketsmith.errors import ArtifactError
    build, shape, others = FAMILIES["swin_windows"]
    model = build()
    x = torch.randn(shape)
    small = C.compact(model, structured("refill", model, x), x)
    removed = small.ticketsmith_compact["removed_heads"]
    assert removed and all(set(r) >= {"kept", "per_head"} for r in removed.values())
    description = C.save(small, tmp_path / "ticket")
    desc = json.loads(description.read_text())
    for r in desc["compact"]["removed_heads"].values():
        for key in ("kept", "per_head", "linears"):
            r.pop(key)
    description.write_text(json.dumps(desc))
    xi = torch.randn(others[0])
    with torch.no_grad():
        assert torch.equal(C.load(tmp_path / "ticket", build=build)(xi), small(xi))
    for r in desc["compact"]["removed_heads"].values():
        r["kept"] = [99] * r["heads"][1]
    description.write_text(json.dumps(desc))
    with pytest.raises(ArtifactError, match="removed_heads"):
        C.load(tmp_path / "ticket", build=build)


class _ReshapeByInputWidth(nn.Module):
    """Older timm: the heads are reshaped back to the *input* width C, so a module with fewer
    heads would no longer run (the cut copy's check must refuse it)."""

    def __init__(self, dim, num_heads=4):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, attn_mask=None):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(*qkv.unbind(0))
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


def test_attention_whose_cut_computes_otherwise_keeps_its_heads():
    """Heads go only where a cut copy computes what the module computed; elsewhere the module
    keeps them all, exact, with the reason in describe. nn.MultiheadAttention keeps its heads."""
    from families import TimmViT, builder
    build = builder(TimmViT, attn=_ReshapeByInputWidth)
    model = build()
    x = torch.randn(2, 3, 16, 16)
    masks = structured("refill", model, x)
    small = C.compact(model, masks, x)
    assert small.block.attn.num_heads == 4 and small.block.attn.qkv.out_features == 96
    rows = {r["layer"]: r for r in C.describe(small)}
    assert "computes another function" in rows["block.attn.qkv"]["heads"]
    assert "block.attn" in small.ticketsmith_compact["heads_left_whole"]
    masked = copy_module(model)
    masks.apply(masked)
    with torch.no_grad():
        xi = torch.randn(1, 3, 24, 24)
        assert rel_err(masked(xi), small(xi)) < 1e-4

    build, shape, _ = FAMILIES["vit_mha"]
    model = build()
    x = torch.randn(shape)
    small = C.compact(model, structured("refill", model, x), x)
    rows = {r["layer"]: r for r in C.describe(small)}
    assert "nn.MultiheadAttention keeps all its heads" in rows["block.attn.out_proj"]["heads"]


# -- norm-act layers --------------------------------------------------------------------------
def test_norm_act_dropped_channels_are_dead_and_removed(tmp_path):
    """Refill masks a BatchNormAct2d's affine for the channels it drops (the norm-act layer
    applies its affine inside its forward), so they output exactly zero; surgery removes them
    from the norm-act layer, which keeps its class (and activation) through save/load."""
    build, shape, others = FAMILIES["efficientnet_tf"]
    model = build()
    x = torch.randn(shape)
    masks = structured("refill", model, x)
    dropped = ~masks["block.conv_pw.weight"].reshape(32, -1).any(dim=1)
    assert 0 < int(dropped.sum()) < 32
    assert torch.equal(masks["block.bn1.weight"], ~dropped)
    assert torch.equal(masks["block.bn1.bias"], ~dropped)
    masked = copy_module(model)
    masks.apply(masked)
    seen = {}
    masked.block.bn1.register_forward_hook(lambda m, a, out: seen.setdefault("out", out))
    with torch.no_grad():
        masked(torch.randn(others[0]))
    assert bool((seen["out"][:, dropped] == 0).all())

    small = C.compact(model, masks, x)
    assert isinstance(small.block.bn1, BatchNormAct2d)
    assert small.block.bn1.num_features <= int((~dropped).sum())  # (the dw conv may kill more)
    C.save(small, tmp_path / "t")
    again = C.load(tmp_path / "t", build=build)
    assert isinstance(again.block.bn1, BatchNormAct2d) and isinstance(again.block.bn1.act, nn.SiLU)
    assert again.block.bn1.num_features == small.block.bn1.num_features
    with torch.no_grad():
        xi = torch.randn(others[1])
        assert torch.equal(again(xi), small(xi))


# -- ConvTranspose2d ----------------------------------------------------------------------------
def test_conv_transpose_compacts_and_refills_by_output_channel():
    build, shape, others = FAMILIES["unet"]
    model = build()
    x = torch.randn(shape)
    same = C.compact(model, ts.Masks.ones(model), x)  # all-ones masks: no crash, nothing removed
    assert n_params(same) == n_params(model)
    # a transposed conv is no default prunable layer: masked by hand, as a user may
    unstructured = magnitude(model, 0.5)
    up = model.up.weight.detach().abs()
    unstructured = unstructured.updated({"up.weight": up > up.median()})
    masks = ts.refill(model, unstructured, example_inputs=x)
    w = masks["up.weight"]  # in x out x kh x kw: refill keeps whole *output* channels
    per_out = w.transpose(0, 1).reshape(w.shape[1], -1)
    assert bool((per_out.all(dim=1) | ~per_out.any(dim=1)).all())
    assert torch.equal(masks["up.bias"], per_out.any(dim=1))
    small = C.compact(model, masks, x)
    assert small.up.out_channels == int(per_out.any(dim=1).sum()) < 8
    masked = copy_module(model)
    masks.apply(masked)
    with torch.no_grad():
        xi = torch.randn(others[1])
        assert rel_err(masked(xi), small(xi)) < 1e-4


# -- partial support: empty layers, weight_norm -------------------------------------------------
def test_empty_layers_are_skipped_with_a_warning():
    build, shape, _ = FAMILIES["mobilenet_v2_se"]
    model = build()
    x = torch.randn(shape)
    masks = magnitude(model, 0.5)
    masks = masks.updated({"block1.dw.weight": torch.zeros_like(masks["block1.dw.weight"])})
    with pytest.warns(UserWarning, match="block1.dw.weight"):
        refilled = ts.refill(model, masks, example_inputs=x)
    assert not bool(refilled["block1.dw.weight"].any())
    assert not bool(refilled["block1.bn2.weight"].any())  # its channels are dead
    with pytest.raises(UsageError, match="block1.dw.weight.*all zeros"):
        ts.refill(model, masks, example_inputs=x, layers=["block1.dw.weight"])
    only = ts.refill(model, masks, example_inputs=x, layers=["block1.expand.weight"])
    assert torch.equal(only["block2.expand.weight"], masks["block2.expand.weight"])
    with pytest.warns(UserWarning, match="block1.dw.weight"):
        grouped = ts.regroup(masks, granularity="channel", b1=2, b2=1)
    assert "block1.dw.weight" not in grouped.blocks
    with pytest.raises(UsageError, match="block1.dw.weight.*all zeros"):
        ts.regroup(masks, layers=["block1.dw.weight"])
    small = C.compact(model, refilled, x)
    assert n_params(small) < n_params(model)


def test_weight_standardised_convs_are_frozen_and_cut():
    """A StdConv2d (NFNet, BiT) applies a weight standardised per row from its parameters:
    channel surgery may not cut its inputs as it is (each row's statistics would change), so
    the groups it reads were left whole. Frozen into the plain Conv2d holding that weight, the
    dead channels it reads go, its own dead rows (standardised: still zero) go, and the compact
    model computes what the masked one does (save / load: test_family_through_structure)."""
    build, shape, others = FAMILIES["efficientnet_tf"]
    model = build()
    x = torch.randn(shape)
    masks = ts.refill(model, magnitude(model, 0.6), example_inputs=x)
    small = C.compact(model, masks, x)
    info = small.ticketsmith_compact
    assert info["frozen"] == {"conv_std": "StdConv2d"}
    std = model.conv_std
    assert type(std) is StdConv2d  # the model given is not modified
    cut = small.conv_std
    assert cut.in_channels < std.in_channels  # its inputs were cut: it read dead channels
    assert cut.out_channels < std.out_channels  # its wholly masked rows went
    assert "conv_std" not in info["skipped_groups"]
    assert_matches_masked(model, masks, small, others)
    assert C.effective(model, masks, x)["compact_params"] == sum(p.numel() for p in small.parameters())


def test_a_forward_that_changes_its_input_first_is_not_frozen():
    """A forward that pads (or otherwise changes) its input before the kernel, or changes the
    kernel's result, is not one kernel call on its input: it keeps its class."""
    class PadThenConv(nn.Conv2d):
        def forward(self, x):
            return F.conv2d(F.pad(x, [1, 1, 1, 1]), self.weight * 2, self.bias)

    class ConvThenScale(nn.Conv2d):
        def forward(self, x):
            return F.conv2d(x, self.weight, self.bias) * 2

    class InputDependent(nn.Conv2d):
        def forward(self, x):
            return F.conv2d(x, self.weight * x.mean(), self.bias)

    for cls in (PadThenConv, ConvThenScale, InputDependent):
        model = nn.Sequential(cls(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
        x = torch.randn(2, 3, 9, 9)
        masks = ts.Masks.ones(model)
        small = C.compact(model, masks, x)
        assert type(small[0]) is cls and small.ticketsmith_compact["frozen"] == {}, cls


def test_weight_norm_layers_stay_dense_with_a_warning():
    build, shape, _ = FAMILIES["weight_norm_1d"]
    model = build()
    with pytest.warns(UserWarning, match="parametrized.*conv1, conv3"):
        masks = ts.Masks.ones(model)
    assert "conv1.weight" not in masks and "conv3.weight" not in masks
    assert "conv2.weight" in masks
    # compaction freezes them into plain Conv1d layers (the weight they compute): the groups
    # they read are cut (they were left whole, "its weight is parametrized")
    x = torch.randn(shape)
    small = C.compact(model, ts.refill(model, magnitude(model, 0.6), example_inputs=x), x)
    assert small.ticketsmith_compact["frozen"] == {"conv1": "ParametrizedConv1d",
                                                   "conv3": "ParametrizedConv1d"}
    assert type(small.conv1) is nn.Conv1d and type(small.conv3) is nn.Conv1d
    assert small.se2.out_channels < model.se2.out_channels


def test_grn_swap_computes_what_timm_computes():
    """prunable_mlp swaps timm's GlobalResponseNorm (NHWC and NCHW) for a PrunableGRN holding
    the same parameters and computing the same function (its mean a sum over `channels`)."""
    from families import GlobalResponseNorm
    from ticketsmith.models import PrunableGRN, prunable_mlp
    for channels_last, shape in ((True, (2, 5, 6, 12)), (False, (2, 12, 5, 6))):
        grn = GlobalResponseNorm(12, channels_last=channels_last)
        with torch.no_grad():
            grn.weight.normal_()
            grn.bias.normal_()
        holder = nn.Sequential(grn)
        assert prunable_mlp(holder) == 1
        new = holder[0]
        assert type(new) is PrunableGRN and new.weight is grn.weight and new.channels == 12
        x = torch.randn(shape)
        with torch.no_grad():
            assert rel_err(grn(x), new(x)) < 1e-6


@pytest.mark.parametrize("norm", ["grn", "layer_norm"])
def test_norms_as_one_node_have_the_plain_gradients(norm):
    """While the graph is traced a PrunableGRN / PrunableLayerNorm runs as one autograd node;
    should anything call backward through it, it gets the gradients of the plain ops."""
    from ticketsmith.models import PrunableGRN, PrunableLayerNorm
    from ticketsmith.models.norms import tracing
    m = PrunableGRN(6, channels_last=False) if norm == "grn" else \
        PrunableLayerNorm(6, channels_last=False)
    with torch.no_grad():
        m.weight.normal_()
        m.bias.normal_()
    x = torch.randn(2, 6, 4, 5, requires_grad=True)
    grads = []
    for traced in (False, True):
        with tracing() if traced else contextlib.nullcontext():
            out = m(x)
        assert ("OneNode" in type(out.grad_fn).__name__) == traced
        grads.append(torch.autograd.grad((out * out).sum(), [x, m.weight, m.bias]))
    for a, b in zip(*grads):
        assert rel_err(a, b) < 1e-6


def test_an_unswapped_grn_is_named_by_a_warning():
    """A timm GlobalResponseNorm left as it is keeps its MLP's hidden units: prunable_names
    says so, and what to call."""
    from families import GlobalResponseNorm
    model = nn.Sequential(nn.Linear(4, 8), GlobalResponseNorm(8), nn.Linear(8, 2))
    with pytest.warns(UserWarning, match=r"GlobalResponseNorm.*: 1; call ticketsmith.models.prunable_mlp"):
        ts.prunable_names(model)
    ts.models.prunable_mlp(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ts.prunable_names(model)


@pytest.mark.parametrize("family", ["convnext_v2", "convnext_v2_conv"])
def test_grn_hidden_units_are_cut_their_bias_folded(family):
    """A dead hidden unit of a ConvNeXt-V2 MLP adds nothing to GRN's sum of norms, so it can
    go; GRN outputs its bias there, one value everywhere, folded into fc2's bias. The GRN
    keeps dividing its sum by the width it was built with. (These groups were left whole:
    "operation linalgvectornorm not known to be per-channel".)"""
    build, shape, others = FAMILIES[family]
    model = build()
    x = torch.randn(shape)
    masks = ts.refill(model, magnitude(model, 0.5), example_inputs=x)
    small = C.compact(model, masks, x)
    for i in (0, 1):
        grn, before = small.blocks[i].grn, model.blocks[i].grn
        assert grn.num_features == grn.weight.numel() < before.num_features == grn.channels
        w = small.blocks[i].fc1.weight
        assert w.shape[0] == grn.num_features
        assert not torch.equal(small.blocks[i].fc2.bias, model.blocks[i].fc2.bias)  # folded
    assert not any(k.endswith("fc1") for k in small.ticketsmith_compact["skipped_groups"])
    assert_matches_masked(model, masks, small, others)


def test_a_live_grn_unit_stays_where_nothing_reads_it():
    """A hidden unit that is not dead on its way into GRN stays even where fc2 does not read
    it: its norm is in the sum that scales every other unit. (Removing it as unread changes
    the others' outputs.)"""
    build, shape, others = FAMILIES["convnext_v2"]
    model = build()
    x = torch.randn(shape)
    masks = ts.Masks.ones(model)
    fc2 = masks["blocks.0.fc2.weight"].clone()
    fc2[:, :8] = False  # units 0-7 unread (their fc1 rows live)
    fc1 = masks["blocks.0.fc1.weight"].clone()
    fc1[8:16] = False  # units 8-15 dead (fc1 without bias): they go, folded GRN bias and all
    masks = masks.updated({"blocks.0.fc2.weight": fc2, "blocks.0.fc1.weight": fc1})
    small = C.compact(model, masks, x)
    assert small.blocks[0].grn.num_features == 64 - 8
    assert_matches_masked(model, masks, small, others)


def test_group_norm_channels_are_cut_with_their_groups_counts_kept():
    """BiT: refill zeroes the GroupNorm affine of a dead channel (a companion, as a BatchNorm's),
    so the channel outputs zero; compaction cuts it with a PrunableGroupNorm that still counts
    it (as a zero) in its group's statistics. GroupNorms whose channels were not cut are torch's
    GroupNorm again. (These groups were left whole: "gn is not supported".)"""
    from ticketsmith.models import PrunableGroupNorm
    build, shape, others = FAMILIES["bit"]
    model = build()
    x = torch.randn(shape)
    masks = ts.refill(model, magnitude(model, 0.5), example_inputs=x)
    dead = ~masks["blocks.0.conv1.weight"].reshape(8, -1).any(1)
    assert bool(dead.any())
    assert not bool(masks["blocks.0.norm2.weight"][dead].any())  # companions
    assert not bool(masks["blocks.0.norm2.bias"][dead].any())
    small = C.compact(model, masks, x)
    norm2 = small.blocks[0].norm2
    assert type(norm2) is PrunableGroupNorm and norm2.num_channels == int((~dead).sum())
    assert norm2.counts.tolist() == [2.0] * 4  # 8 channels in 4 groups, as built
    uncut = [n for n, m in small.named_modules() if type(m) is nn.GroupNorm]
    assert uncut and all(small.get_submodule(n).num_channels == model.get_submodule(n).num_channels
                         for n in uncut)
    assert_matches_masked(model, masks, small, others)


def test_a_dead_channel_whose_group_norm_weight_is_live_stays():
    """Without its companions a dead channel's GroupNorm output is -mean / std of its group
    times the weight: it depends on the input, and the channel stays (exact)."""
    build, shape, others = FAMILIES["bit"]
    model = build()
    x = torch.randn(shape)
    m = ts.Masks.ones(model)
    rows = m["blocks.0.conv1.weight"].clone()
    rows[:3] = False
    masks = m.updated({"blocks.0.conv1.weight": rows})
    small = C.compact(model, masks, x)
    assert small.blocks[0].conv1.weight.shape[0] == 8
    masked = copy_module(model)
    masks.apply(masked)
    with torch.no_grad():
        xi = torch.randn(others[1])
        assert rel_err(masked(xi), small(xi)) < 1e-4


class GroupNormAct(nn.GroupNorm):
    """timm's GroupNormAct (its class name, attributes and forward): the norm, then drop, act."""

    def __init__(self, num_channels, num_groups):
        super().__init__(num_groups, num_channels)
        self.drop, self.act = nn.Identity(), nn.SiLU()

    def forward(self, x):
        return self.act(self.drop(F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)))


def test_prunable_group_norm_computes_what_group_norm_computes():
    """torch's GroupNorm and timm's GroupNormAct (its activation kept) as PrunableGroupNorms:
    the same parameters, the same function on maps of any rank."""
    from ticketsmith.models import PrunableGroupNorm
    for gn in (nn.GroupNorm(3, 12), GroupNormAct(12, 3)):
        with torch.no_grad():
            gn.weight.normal_()
            gn.bias.normal_()
        p = PrunableGroupNorm.from_group_norm(gn)
        assert p.weight is gn.weight and p.act is (gn.act if hasattr(gn, "act") else p.act)
        for shape in ((2, 12, 5, 7), (3, 12, 9), (1, 12, 2, 3, 4)):
            x = torch.randn(shape) * 3 + 1
            with torch.no_grad():
                assert rel_err(gn(x), p(x)) < 1e-5


def test_group_norm_act_is_cut_and_loaded_with_its_activation(tmp_path):
    """A cut timm GroupNormAct keeps its activation in the compact model and after load."""
    from ticketsmith.models import PrunableGroupNorm
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), GroupNormAct(8, 2),
                          nn.Conv2d(8, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3)).eval()
    x = torch.randn(2, 3, 8, 8)
    masks = ts.refill(model, magnitude(model, 0.5), example_inputs=x)
    small = C.compact(model, masks, x)
    assert type(small[1]) is PrunableGroupNorm and small[1].num_channels < 8
    assert type(small[1].act) is nn.SiLU
    C.save(small, tmp_path / "t")
    again = C.load(tmp_path / "t", build=lambda: copy_module(model))
    assert type(again[1].act) is nn.SiLU
    masked = copy_module(model)
    masks.apply(masked)
    with torch.no_grad():
        xi = torch.randn(3, 3, 9, 9)
        assert rel_err(masked(xi), small(xi)) < 1e-4
        assert torch.equal(small(xi), again(xi))


def test_a_layer_scale_stream_is_cut_with_its_scales(tmp_path):
    """PoolFormer: with one channel set for the whole residual stream (shared coupling), refill
    zeroes every GroupNorm1's affine there, also of the norms reached past another norm (norm2
    after the token mixer on norm1); the stream's dead channels go from the stem, the convs,
    the norms and the layer scales (parameters of no torch layer, viewed to `Scale.shape`,
    which is set to the new width), and the model is exact; save / load restores the scales'
    shapes. (The stream was left whole: "parameter is not supported".)"""
    build, others, model, x, masks, dead = shared_stream_ticket("poolformer", "stem.weight")
    for norm in ("blocks.0.norm2", "blocks.1.norm1", "norm"):  # past the first norm
        assert not bool(masks[f"{norm}.weight"][dead].any())
    small = C.compact(model, masks, x)
    width = int((~dead).sum())
    assert small.stem.out_channels == width
    for block in small.blocks:
        for scale in (block.layer_scale1, block.layer_scale2):
            assert scale.scale.shape == (width,) and scale.shape == (width, 1, 1)
    assert not small.ticketsmith_compact["skipped_groups"]
    assert_matches_masked(model, masks, small, others)
    assert_loads_the_same(small, build, others[1], tmp_path)


def test_a_per_channel_shift_keeps_dead_channels_unless_it_is_zero():
    """A parameter of no layer added to the stream (a learned shift): a channel dead before it
    holds the shift after it, so it stays (exact); where the shift is zero on the dead
    channels they go, the shift cut with them."""
    build = builder_of(TinyPoolFormer, shift=True)
    model = build()
    x = torch.randn(2, 3, 16, 16)
    m = ts.Masks.ones(model)
    dead = torch.zeros(16, dtype=torch.bool)
    dead[[1, 4, 9]] = True
    upd = {}
    for name in ("stem", "blocks.0.fc2", "blocks.1.fc2"):  # every writer of the stream
        rows = m[f"{name}.weight"].clone()
        rows[dead] = False
        upd[f"{name}.weight"] = rows
        upd[f"{name}.bias"] = ~dead
    for n, mod in model.named_modules():
        if isinstance(mod, nn.GroupNorm):
            upd[f"{n}.weight"], upd[f"{n}.bias"] = ~dead, ~dead
    masks = m.updated(upd)
    small = C.compact(model, masks, x)
    assert small.stem.out_channels == 16
    assert_matches_masked(model, masks, small, [(3, 3, 16, 16), (1, 3, 20, 20)])
    with torch.no_grad():
        for block in model.blocks:
            block.shift[:, dead] = 0
    small = C.compact(model, masks, x)
    assert small.stem.out_channels == 13 and small.blocks[0].shift.shape == (1, 13, 1, 1)
    assert_matches_masked(model, masks, small, [(3, 3, 16, 16), (1, 3, 20, 20)])


class ScaleByWidth(nn.Module):
    """A layer scale viewed by a width its module holds as a number: the cut scale no longer
    fits the view."""

    def __init__(self, dim):
        super().__init__()
        self.dim = dim
        self.gamma = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x):
        return x * self.gamma.view(self.dim, 1, 1)


class ScaledConvs(nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.scale = scale
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.conv2(self.scale(F.relu(self.conv1(x)))).mean((2, 3)))


def scaled_convs_with_dead_channels(scale: nn.Module) -> tuple[nn.Module, torch.Tensor]:
    """ScaledConvs around `scale`, conv1's first three channels dead; and an example input."""
    torch.manual_seed(0)
    model = ScaledConvs(scale).eval()
    with torch.no_grad():
        model.conv1.weight[:3] = 0
        model.conv1.bias[:3] = 0
    return model, torch.randn(2, 3, 8, 8)


def test_a_layer_scale_whose_view_breaks_is_put_back_whole():
    """A cut that breaks the forward (the scale's view by a width held as a number) is undone,
    the parameter torch-pruning replaced on its owner put back: the group stays whole with the
    reason, and the model computes what it did."""
    from ticketsmith.compact.channel import remove_dead_channels
    model, x = scaled_convs_with_dead_channels(ScaleByWidth(8))
    small = copy_module(model)
    gamma = small.scale.gamma
    report = remove_dead_channels(small, x)
    assert small.conv1.out_channels == 8 and small.scale.gamma is gamma
    assert "breaks the model's forward" in report.skipped["conv1"]
    with torch.no_grad():
        xi = torch.randn(3, 3, 11, 9)
        torch.testing.assert_close(small(xi), model(xi))


class ScaleLastAxis(nn.Module):
    """A parameter the size of the channels that broadcasts over the last axis (the width of
    a square map as wide as the channels), not over the channels."""

    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x):
        return x * self.gamma


def test_a_parameter_along_another_axis_keeps_the_group_whole():
    """Its entries are not the channels' (torch-pruning ties them to the channels by size): the
    group stays whole, and the model computes what it did."""
    from ticketsmith.compact.channel import remove_dead_channels
    model, x = scaled_convs_with_dead_channels(ScaleLastAxis(8))
    small = copy_module(model)
    report = remove_dead_channels(small, x)
    assert small.conv1.out_channels == 8
    assert "another axis than the channels" in report.skipped["conv1"]
    with torch.no_grad():
        xi = torch.randn(3, 3, 8, 8)
        torch.testing.assert_close(small(xi), model(xi))


class TokenMixerWithGamma(nn.Module):
    """Tokens [B, L, C]: a residual Linear whose output is scaled by a (C,) parameter used as is
    (timm's ConvNeXt / CaiT LayerScale `x * self.gamma`), a mean over tokens, a head."""

    def __init__(self, dim=8):
        super().__init__()
        self.embed = nn.Linear(6, dim)
        self.fc = nn.Linear(dim, dim)
        self.gamma = nn.Parameter(torch.rand(dim) + 0.5)
        self.head = nn.Linear(dim, 4)

    def forward(self, x):
        x = self.embed(x)
        x = x + self.gamma * self.fc(F.gelu(x))
        return self.head(x.mean(1))


def test_a_layer_scale_on_tokens_is_cut_with_the_stream():
    """The scale in the last axis of a token stream (Linear layers on [B, L, C]) goes with the
    stream's dead channels, also through the mean over the tokens. (The group was left whole:
    "operation mean over the channel dimension", the tokens' axis taken for the channels.)"""
    torch.manual_seed(0)
    model = TokenMixerWithGamma().eval()
    x = torch.randn(2, 5, 6)
    masks = ts.refill(model, magnitude(model, 0.5), example_inputs=x, coupling="shared")
    dead = ~masks["embed.weight"].any(1)
    assert bool(dead.any())
    small = C.compact(model, masks, x)
    assert small.gamma.shape == (int((~dead).sum()),)
    assert_matches_masked(model, masks, small, [(3, 5, 6), (1, 7, 6)])


def test_layer_norm_swap_computes_what_layer_norm_computes():
    """torch's LayerNorm (tokens, with and without bias) and timm's LayerNorm2d (NCHW) as
    PrunableLayerNorms: the same parameters and function; cut, it computes the LayerNorm of the
    input with the cut channels as the zeros they were."""
    from families import LayerNorm2d
    from ticketsmith.models import PrunableLayerNorm
    cases = [(nn.LayerNorm(12), (2, 5, 12), -1), (nn.LayerNorm(12, bias=False), (2, 5, 12), -1),
             (LayerNorm2d(12), (2, 12, 5, 6), 1)]
    for ln, shape, dim in cases:
        with torch.no_grad():
            ln.weight.normal_()
            if ln.bias is not None:
                ln.bias.normal_()
        new = PrunableLayerNorm.from_layer_norm(ln)
        assert new.weight is ln.weight and new.channels == 12 and new.channels_last == (dim == -1)
        x = torch.randn(shape)
        with torch.no_grad():
            assert rel_err(ln(x), new(x)) < 1e-6
            keep = torch.tensor([0, 2, 3, 7, 8, 11])
            x.index_fill_(dim, torch.tensor([1, 4, 5, 6, 9, 10]), 0.0)
            cut = PrunableLayerNorm(6, ln.eps, bias=ln.bias is not None, channels_last=dim == -1,
                                    channels=12)
            cut.weight.copy_(ln.weight[keep])
            if ln.bias is not None:
                cut.bias.copy_(ln.bias[keep])
            assert rel_err(ln(x).index_select(dim, keep), cut(x.index_select(dim, keep))) < 1e-5


@pytest.mark.parametrize("family", ["convnext", "convnext_conv"])
def test_a_layer_norm_stream_is_cut_with_its_layer_scales(family, tmp_path):
    """ConvNeXt (LayerNorm on NHWC tokens, and timm's conv_mlp form with LayerNorm2d on NCHW):
    with one channel set for the residual stream (shared coupling) refill zeroes the affine of
    every LayerNorm the stream's channels reach, so a dead stream channel is dead after them;
    compaction cuts it from the stem, the depthwise convs, the norms (PrunableLayerNorms that
    keep dividing by the built width), the layer scales and the head's inputs. Exact, through
    save / load and ONNX. (The stream was left whole: "ln is not supported", or "operation
    permute not known to be per-channel" for LayerNorm2d.)"""
    from ticketsmith.models import PrunableLayerNorm
    stem = "stem.weight" if family == "convnext" else "stem.0.weight"
    build, others, model, x, masks, dead = shared_stream_ticket(family, stem)
    norms = [n for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) >= 2
    for n in norms:
        assert not bool(masks[f"{n}.weight"][dead].any()) and not bool(masks[f"{n}.bias"][dead].any())
    small = C.compact(model, masks, x)
    width = int((~dead).sum())
    stem_conv = small.stem if family == "convnext" else small.stem[0]
    assert stem_conv.out_channels == width
    assert small.head.in_features == width
    cut = [m for m in small.modules() if isinstance(m, PrunableLayerNorm)]
    assert cut and all(m.num_features == width and m.channels == 16 for m in cut)
    assert not small.ticketsmith_compact["skipped_groups"]
    assert_exact_saved_and_exported(model, masks, small, build, x, others, others[1], tmp_path)


class NormOverWidth(nn.Module):
    """A LayerNorm over the last axis of an NCHW map (its width, as wide as the channels)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.conv2(self.norm(self.conv1(x))).mean((2, 3)))


def test_a_layer_norm_over_another_axis_is_no_companion_and_keeps_the_group():
    """Its entries are not the channels: refill does not zero it for the channels conv1 drops,
    and the group stays whole; the model computes what the masked one does."""
    torch.manual_seed(0)
    model = NormOverWidth().eval()
    x = torch.randn(2, 3, 8, 8)
    m = ts.Masks.ones(model)
    rows = m["conv1.weight"].clone()
    rows[:3] = False
    masks = ts.refill(model, m.updated({"conv1.weight": rows}), example_inputs=x, coupling="shared")
    assert "norm.weight" not in masks.keys() or bool(masks["norm.weight"].all())
    small = C.compact(model, masks, x)
    assert small.conv1.out_channels == 8
    assert "another axis than the channels" in small.ticketsmith_compact["skipped_groups"]["conv1"]
    assert_matches_masked(model, masks, small, [(3, 3, 8, 8)])


def test_swin_patch_merging_stream_is_cut_with_its_interleaved_features(tmp_path):
    """timm's Swin patch merging flattens (2, 2, C) neighbours with the channels fastest
    (feature j * C + c) into a LayerNorm(4C) and a Linear(4C, 2C); its stage rolls the map for
    shifted windows. With one channel set for the stream, a dead stream channel c goes from the
    patch embedding, the blocks, and the merge's features c, c + C, c + 2C, c + 3C: exact,
    through save / load and ONNX. (The stream was left whole: "operation roll not known to be
    per-channel", and torch-pruning maps such a flatten as if the channels were slowest.)"""
    from ticketsmith.models import PrunableLayerNorm
    build, others, model, x, masks, dead = shared_stream_ticket("swin_timm", "patch.weight")
    features = dead.repeat(4)  # feature j * 16 + c is channel c
    assert not bool(masks["merge.norm.weight"][features].any())
    small = C.compact(model, masks, x)
    width = int((~dead).sum())
    assert small.patch.out_channels == width and small.merge.reduction.in_features == 4 * width
    assert isinstance(small.merge.norm, PrunableLayerNorm) and small.merge.norm.channels == 64
    # the merge's norm holds the kept features in their order
    kept = torch.nonzero(~features).flatten()
    assert torch.equal(small.merge.norm.weight, model.merge.norm.weight[kept])
    assert not any(k.startswith("blocks.") and "qkv" not in k
                   for k in small.ticketsmith_compact["skipped_groups"])
    assert_exact_saved_and_exported(model, masks, small, build, x, others, others[1], tmp_path)


@pytest.mark.parametrize("family", ["vit_timm_tokens", "vit_timm_no_embed_class", "vit_timm_avg"])
def test_a_vit_stream_is_cut_with_its_class_token_and_position_embedding(family, tmp_path):
    """timm's ViT concatenates its class token before the patch tokens (along the tokens:
    torch-pruning took it for a concatenation of channels, offset by one) and adds a position
    embedding, a value per token and channel. Refill zeroes both on a dead stream channel, as
    it does a bias (the norms after them are zeroed too: they were "external" before; also a
    norm after the mean of the patch tokens, where refill's walk lost the channel axis), and
    compaction cuts them with the stream. The masks count them as no weight. Exact, through
    save / load and ONNX. (The stream was left whole: "a parameter holding more than one
    value per channel".)"""
    build, shape, others = FAMILIES[family]
    model = build()
    x = torch.randn(shape)
    base = magnitude(model, 0.5)
    masks = ts.refill(model, base, example_inputs=x, coupling="shared")
    dead = ~masks["patch.weight"].reshape(32, -1).any(1)
    assert bool(dead.any())
    assert masks.companions == {"pos_embed", "cls_token"}
    assert masks.weight_names == base.weight_names
    norms = [f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)
             and (n != "norm" or family != "vit_timm_avg") for p in ("weight", "bias")]
    for name in ["pos_embed", "cls_token"] + norms:
        assert torch.equal(masks[name].reshape(-1, 32).any(0), ~dead), name
    small = C.compact(model, masks, x)
    width = int((~dead).sum())
    assert small.patch.out_channels == width
    assert small.pos_embed.shape[-1] == small.cls_token.shape[-1] == width
    assert small.pos_embed.shape[1] == model.pos_embed.shape[1]
    assert not any(not k.endswith("qkv") for k in small.ticketsmith_compact["skipped_groups"])
    assert_exact_saved_and_exported(model, masks, small, build, x, others, others[0], tmp_path)


def test_torchvision_vit_stream_is_cut_with_the_width_it_reshapes_to(tmp_path):
    """torchvision's ViT reshapes its patches to `self.hidden_dim` channels: the cut lowers
    that attribute with the stream (the stream was left whole: "cutting its channels breaks
    the model's forward"), and a saved ticket loads with it. Exact, also under ONNX."""
    build, shape, others = FAMILIES["vit_torchvision"]
    model = build()
    x = torch.randn(shape)
    masks = ts.refill(model, magnitude(model, 0.5), example_inputs=x, coupling="shared")
    assert masks.companions == {"pos_embedding", "class_token"}
    small = C.compact(model, masks, x)
    width = small.conv_proj.out_channels
    assert width < 32 and small.hidden_dim == width
    assert small.pos_embedding.shape[-1] == small.class_token.shape[-1] == width
    assert_exact_saved_and_exported(model, masks, small, build, x, others, others[0], tmp_path)


def test_torchvision_swin_patch_merging_stream_is_cut_through_its_strided_slices():
    """torchvision's Swin patch merging takes x[..., 0::2, 0::2, :] of a [B, H, W, C] map (four
    slices of the positions; torch-pruning takes a slice of dimension 1 for a slice of the
    channels) and concatenates them along the channels (its last axis): channel c is features
    c, c + C, c + 2C, c + 3C. With one channel set for the stream, a dead stream channel goes
    from the patch embedding, the blocks and those four features of the merge: exact. (The
    stream was left whole: "slice is not supported by channel surgery".)"""
    build, others, model, x, masks, dead = shared_stream_ticket("swin_windows", "patch.weight")
    features = dead.repeat(4)
    assert not bool(masks["merge.norm.weight"][features].any())
    small = C.compact(model, masks, x)
    width = int((~dead).sum())
    assert small.patch.out_channels == width and small.merge.reduction.in_features == 4 * width
    kept = torch.nonzero(~features).flatten()
    assert torch.equal(small.merge.norm.weight, model.merge.norm.weight[kept])
    assert_matches_masked(model, masks, small, others)


class RolledChannels(nn.Module):
    """A torch.roll of an NCHW map along its channels (`dims` 1), or of the flattened tensor."""

    def __init__(self, dims):
        super().__init__()
        self.dims = dims
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 6, 1)

    def forward(self, x):
        x = self.conv1(x)
        x = torch.roll(x, (1,) * len(self.dims), self.dims) if self.dims else torch.roll(x, 5)
        return self.conv2(x)


@pytest.mark.parametrize("dims", [(1,), (1, 2), None])
def test_a_roll_of_the_channels_keeps_the_group_whole(dims):
    """Rolled along the positions a channel stays itself; along the channels (or over the
    flattened tensor) it is another's: conv1's dead rows are then not dead where conv2 reads
    them, and the group stays whole, exactly."""
    torch.manual_seed(0)
    model = RolledChannels(dims).eval()
    with torch.no_grad():
        model.conv1.bias[:3] = 0
    x = torch.randn(2, 3, 8, 8)
    rows = torch.ones_like(model.conv1.weight, dtype=torch.bool)
    rows[:3] = False
    masks = ts.Masks({"conv1.weight": rows})
    small = C.compact(model, masks, x)
    assert small.conv1.out_channels == 8
    assert "roll" in small.ticketsmith_compact["skipped_groups"]["conv1"]
    assert_matches_masked(model, masks, small, [(3, 3, 8, 8)])
    model.dims = (2, 3)  # the positions only: cut
    small = C.compact(model, masks, x)
    assert small.conv1.out_channels == 5
    assert_matches_masked(model, masks, small, [(3, 3, 8, 8)])


class TokenReadout(nn.Module):
    """A linear layer on tokens [B, 5, 4] read out at one token (ViT's class token, `x[:, 0]`),
    or at one of its features (`x[..., 0]`, the channel axis)."""

    def __init__(self, token: bool):
        super().__init__()
        self.token = token
        self.fc1, self.head = nn.Linear(4, 8), nn.Linear(8 if token else 5, 3)

    def forward(self, x):
        x = torch.relu(self.fc1(x))
        return self.head(x[:, 0] if self.token else x[..., 0])


@pytest.mark.parametrize("token", [True, False])
def test_a_token_readout_is_cut_and_a_feature_readout_keeps_the_group(token):
    """A select of a token keeps each feature itself: fc1's dead features go, with the head's
    columns (the group was left whole: "select not known to be per-channel"). A select of a
    feature reads one channel only: whole. Exact either way."""
    torch.manual_seed(0)
    model = TokenReadout(token).eval()
    with torch.no_grad():
        model.fc1.bias[[1, 4]] = 0
    rows = torch.ones_like(model.fc1.weight, dtype=torch.bool)
    rows[[1, 4]] = False
    masks = ts.Masks({"fc1.weight": rows})
    small = C.compact(model, masks, torch.randn(2, 5, 4))
    assert small.fc1.out_features == (6 if token else 8)
    if not token:
        assert "select of the channel" in small.ticketsmith_compact["skipped_groups"]["fc1"]
    assert_matches_masked(model, masks, small, [(3, 5, 4), (1, 5, 4)])


def test_1d_pooling_and_the_flatten_of_a_sequence_are_cut():
    """MaxPool1d and AdaptiveAvgPool1d run as unsqueeze -> 2-d pooling -> squeeze (autograd
    shows the three), and the head reads a flatten of [N, C, 4]: the groups through them are
    cut, exactly (they were left whole: "unsqueeze not known to be per-channel", "a reshape
    other than a flatten into the next layer")."""
    build, shape, others = FAMILIES["audio_1d"]
    model = build()
    x = torch.randn(shape)
    masks = ts.refill(model, magnitude(model, 0.5), example_inputs=x)
    small = C.compact(model, masks, x)
    info = small.ticketsmith_compact
    assert info["skipped_groups"] == {}
    assert {"conv1", "conv3"} <= set(info["removed_channels"])
    assert small.fc.in_features == 4 * small.conv3.out_channels < model.fc.in_features
    assert_matches_masked(model, masks, small, others)


# -- the real models, when installed -------------------------------------------------------------
def _zoo_models():
    out = []
    if importlib.util.find_spec("timm") is not None:
        out += [("timm", n) for n in ("resnet18", "mobilenetv3_small_050", "tf_efficientnet_b0",
                                      "convnext_atto", "vit_tiny_patch16_224", "regnetx_002",
                                      "ghostnet_100", "dpn68", "swin_tiny_patch4_window7_224",
                                      "pvt_v2_b0", "swinv2_tiny_window8_256",
                                      "eva02_tiny_patch14_224", "maxvit_rmlp_nano_rw_256",
                                      "coatnet_nano_rw_224", "levit_128s", "efficientformer_l1",
                                      "tiny_vit_5m_224", "crossvit_tiny_240", "nextvit_small",
                                      "gcvit_xxtiny", "hiera_tiny_224", "focalnet_tiny_srf",
                                      "mixnet_s", "convformer_s18", "nfnet_l0",
                                      "convnextv2_atto", "resnetv2_50x1_bit")]
    if importlib.util.find_spec("torchvision") is not None:
        out += [("torchvision", n) for n in ("resnet18", "mobilenet_v2", "shufflenet_v2_x0_5",
                                             "vit_b_16", "swin_t", "regnet_y_400mf",
                                             "efficientnet_v2_s", "swin_v2_t", "maxvit_t",
                                             "densenet121")]
    return out or [pytest.param(None, None, marks=pytest.mark.skip(
        reason="neither timm nor torchvision is installed (PyPI's torchvision does not import "
               "beside the CPU torch wheel used here); install the `zoo` extra to run these"))]


def _zoo_model(lib: str, name: str) -> nn.Module:
    """Built as `ticketsmith run --model LIB:NAME` builds it (nn.MultiheadAttention swapped)."""
    try:
        return ts.models.build(f"{lib}:{name}", num_classes=10)
    except UsageError as e:  # an install that does not import: skip with the reason
        pytest.skip(f"{lib} {name} cannot be built here: {e}")


@pytest.mark.zoo
@pytest.mark.parametrize("lib,name", _zoo_models())
def test_zoo_model_refill_compacts_exactly(lib, name):
    torch.manual_seed(0)
    model = _zoo_model(lib, name).eval()
    size = 64  # timm's ViT and Swin fix their input size
    if any(k in name for k in ("vit", "eva", "coatnet", "levit", "efficientformer", "gcvit", "hiera")) \
            or (lib == "timm" and "swin" in name):
        size = 256 if name.endswith("_256") else 224
    x = torch.randn(1, 3, size, size)
    masks = ts.refill(model, magnitude(model, 0.5), example_inputs=x)
    masked = copy_module(model)
    masks.apply(masked)
    small = C.compact(model, masks, x)
    with torch.no_grad():
        xi = torch.randn(2, 3, size, size)
        assert rel_err(masked(xi), small(xi)) < 1e-4
    assert n_params(small) <= n_params(model)
    assert math.isfinite(small.ticketsmith_compact["verified_rel_err"])
    if any(k in name for k in ("vit", "swin", "eva", "pvt", "coatnet", "efficientformer")) \
            and not any(k in name for k in ("nextvit", "gcvit")):
        # timm's (some swapped), the LeViT family's (v wider than q and k); NeXt-ViT's and
        # GCViT's keep their heads (output reshaped to the input width; a global query)
        assert small.ticketsmith_compact["removed_heads"], "no attention head was removed"
    if "eva" in name:  # the GluMlp's hidden units, its fc1 split in two (SplitGluMlp)
        mlp = "blocks.0.mlp"
        assert small.get_submodule(mlp).fc1_x.out_features < model.get_submodule(mlp).fc1_x.out_features
    if "pvt" in name:  # the MLP's hidden units, through its depthwise conv on the tokens as a map
        fc1 = "stages.0.blocks.0.mlp.fc1"
        assert small.get_submodule(fc1).out_features < model.get_submodule(fc1).out_features
    if name == "convformer_s18":  # the MLP's hidden units, through StarReLU (relu(x) ** 2)
        fc1 = "stages.0.blocks.0.mlp.fc1"  # (a 1x1 conv in timm's first stages)
        assert small.get_submodule(fc1).weight.shape[0] < model.get_submodule(fc1).weight.shape[0]
    if name in ("mixnet_s", "focalnet_tiny_srf"):  # cut through splits by a list the module holds
        assert small.ticketsmith_compact["split_sizes"], "no split was resized"
    if name == "convnextv2_atto":  # the MLP's hidden units, through its GRN
        fc1 = "stages.0.blocks.0.mlp.fc1"  # (a 1x1 conv in timm's first stages)
        assert small.get_submodule(fc1).weight.shape[0] < model.get_submodule(fc1).weight.shape[0]
    if name == "resnetv2_50x1_bit":  # GroupNorm before every weight-standardised conv: cut
        assert not small.ticketsmith_compact["skipped_groups"]
        assert any(type(m).__name__ == "PrunableGroupNorm" for m in small.modules())
    if name == "nfnet_l0":  # weight-standardised convs frozen into plain ones, then cut
        assert len(small.ticketsmith_compact["frozen"]) == sum(
            type(m).__name__ == "ScaledStdConv2d" for m in model.modules())
        assert not small.ticketsmith_compact["skipped_groups"]
    if name == "densenet121":  # concatenations into a global pooling's flatten: none whole
        assert not small.ticketsmith_compact["skipped_groups"]
    if "regnet" in name:  # grouped convs: cut with their groups kept, none left whole
        assert not small.ticketsmith_compact["skipped_groups"]
        assert any(isinstance(m, nn.Conv2d) and 1 < m.groups < m.out_channels
                   and m.in_channels < model.get_submodule(n).in_channels
                   for n, m in small.named_modules())


@pytest.mark.zoo
@pytest.mark.parametrize("name", ["convnext_atto", "poolformer_s12"])
def test_zoo_residual_streams_are_cut_with_shared_coupling(name, tmp_path):
    """timm's ConvNeXt (LayerNorm2d, layer scale `gamma`) and PoolFormer (GroupNorm1, layer
    `Scale`): a refill ticket with one channel set per residual stream loses stream channels
    from every stage, through the norms and the layer scales; none is left whole; exact, also
    after save / load (the scales' shapes and `Scale.shape` restored)."""
    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed")
    torch.manual_seed(0)
    model = _zoo_model("timm", name).eval()
    x = torch.randn(1, 3, 64, 64)
    masks = ts.refill(model, magnitude(model, 0.5), example_inputs=x, coupling="shared")
    small = C.compact(model, masks, x)
    assert not small.ticketsmith_compact["skipped_groups"]
    for stage in range(4):
        block = small.get_submodule(f"stages.{stage}.blocks.0")
        scale = block.gamma if name == "convnext_atto" else block.layer_scale2.scale
        assert scale.numel() < model.get_submodule(f"stages.{stage}.blocks.0").get_parameter(
            "gamma" if name == "convnext_atto" else "layer_scale2.scale").numel()
    masked = copy_module(model)
    masks.apply(masked)
    with torch.no_grad():
        xi = torch.randn(2, 3, 64, 64)
        assert rel_err(masked(xi), small(xi)) < 1e-4
    assert_loads_the_same(small, lambda: _zoo_model("timm", name), (2, 3, 64, 64), tmp_path)


def _zoo_stream_ticket(lib: str, name: str, tweak=None):
    """(model, masks, compact model) of a zoo model at 224 px: a 50% magnitude mask refilled
    with one channel set per residual stream, compacted; checked exact on another batch.
    `tweak(model)` runs first (torchvision's ViT starts with a zero head)."""
    if importlib.util.find_spec(lib) is None:
        pytest.skip(f"{lib} is not installed")
    torch.manual_seed(0)
    model = _zoo_model(lib, name).eval()
    if tweak is not None:
        with torch.no_grad():
            tweak(model)
    x = torch.randn(1, 3, 224, 224)
    masks = ts.refill(model, magnitude(model, 0.5), example_inputs=x, coupling="shared")
    small = C.compact(model, masks, x)
    assert_matches_masked(model, masks, small, [(2, 3, 224, 224)])
    return model, masks, small


@pytest.mark.zoo
def test_zoo_swin_streams_are_cut_through_its_patch_merging(tmp_path):
    """timm's Swin-T: a refill ticket with one channel set per residual stream loses channels
    from every stage's stream, through the shifted windows (torch.roll) and each patch
    merging's interleaved 4C features; exact, also after save / load."""
    name = "swin_tiny_patch4_window7_224"
    model, _, small = _zoo_stream_ticket("timm", name)
    assert small.patch_embed.proj.out_channels < model.patch_embed.proj.out_channels
    for stage in (1, 2, 3):
        merge, dense = small.layers[stage].downsample, model.layers[stage].downsample
        assert merge.reduction.in_features < dense.reduction.in_features
        assert merge.reduction.out_features < dense.reduction.out_features
    assert_loads_the_same(small, lambda: _zoo_model("timm", name), (2, 3, 224, 224), tmp_path)


@pytest.mark.zoo
@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "eva02_tiny_patch14_224"])
def test_zoo_vit_streams_are_cut_with_the_class_token_and_position_embedding(name):
    """timm's ViT-Ti and EVA-02-Ti (rotary embedding, SwiGLU, mean of the patch tokens): a
    refill ticket with one channel set for the stream cuts the patch embedding, the class token
    and the position embedding with the blocks' outputs; exact."""
    model, masks, small = _zoo_stream_ticket("timm", name)
    assert masks.companions == {"cls_token", "pos_embed"}
    width = small.patch_embed.proj.out_channels
    assert width < model.patch_embed.proj.out_channels
    assert small.pos_embed.shape[-1] == small.cls_token.shape[-1] == width


@pytest.mark.zoo
def test_zoo_torchvision_vit_stream_is_cut_with_its_hidden_dim():
    """torchvision's ViT-B/16: the stream loses channels with shared coupling, `hidden_dim`
    (its patches' reshape) lowered with them; exact."""
    model, _, small = _zoo_stream_ticket("torchvision", "vit_b_16",
                                         tweak=lambda m: m.heads.head.weight.normal_())
    assert small.conv_proj.out_channels == small.hidden_dim < model.hidden_dim


@pytest.mark.zoo
def test_zoo_torchvision_swin_streams_are_cut_through_its_strided_slices():
    """torchvision's Swin-T: its patch merging's strided slices and concatenation along the
    channels are followed; the streams of its first three stages lose channels with shared
    coupling (its last stage's stays whole: an as_strided after its final norm); exact."""
    model, _, small = _zoo_stream_ticket("torchvision", "swin_t")
    assert small.features[0][0].out_channels < model.features[0][0].out_channels
    for i in (2, 4, 6):  # the patch merging after each of the first three stages
        assert small.features[i].reduction.in_features < model.features[i].reduction.in_features


def test_a_deviating_executor_is_replaced_by_the_dense_layer(small_executors, monkeypatch):
    """An executor that does not compute its layer (a bug) costs the speed-up, not the model:
    the dense layers go back with the reason on record, and the result is exact."""
    from ticketsmith.compact.blocks import Executor
    from ticketsmith.compact.condensed import CondensedLinear

    monkeypatch.setattr(CondensedLinear, "forward", lambda self, x: Executor.forward(self, x) + 1.0)
    build, shape, others = FAMILIES["vit_mha"]
    model = build()
    x = torch.randn(shape)
    masks = constant_fan_in(model, x)
    with pytest.warns(UserWarning, match="deviates.*replaced by dense"):
        small = C.compact(model, masks, x)
    rows = {r["layer"]: r for r in C.describe(small)}
    assert type(small.block.fc1) is nn.Linear
    assert "with executors, compact model deviates" in rows["block.fc1"]["reason"]
    masked = copy_module(model)
    masks.apply(masked)
    with torch.no_grad():
        xi = torch.randn(others[0])
        assert rel_err(masked(xi), small(xi)) < 1e-4


def test_a_depthwise_conv_cut_to_one_channel_compacts():
    """Surgery turns a depthwise conv with one channel left into a plain 1-in 1-out conv; its
    mask (one input wide, as every depthwise mask) must not be indexed by the input channel's
    index in the whole input (seen on torchvision's EfficientNet-B0: an IndexError)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 2, 1)).eval()
    keep = torch.zeros(4, dtype=torch.bool)
    keep[2] = True
    masks = ts.Masks({"0.weight": keep.view(4, 1, 1, 1).expand(4, 3, 1, 1).clone(),
                      "3.weight": keep.view(4, 1, 1, 1).expand(4, 1, 3, 3).clone(),
                      "6.weight": keep.view(1, 4, 1, 1).expand(2, 4, 1, 1).clone()})
    # with a block on it (regroup's), its block columns are positions within a group, not the
    # input channel's index: kept dense with the reason (an IndexError in the block remap once)
    blocked = masks.updated(blocks={"3.weight": [ts.Block(torch.tensor([2]), torch.arange(9))]})
    x = torch.randn(2, 3, 8, 8)
    for m in (masks, blocked):
        small = C.compact(model, m, x)
        assert small[3].weight.shape[:2] == (1, 1)
        masked = copy_module(model)
        m.apply(masked)
        with torch.no_grad():
            xi = torch.randn(3, 3, 10, 10)
            assert rel_err(masked(xi), small(xi)) < 1e-4
    assert "grouped Conv2d" in {r["layer"]: r["reason"] for r in C.describe(small)}["3"]


class Versioned(nn.Module):
    """A module that versions its state, as torchvision's MNASNet does: loading refuses a state
    dict without the version in its metadata."""
    _version = 2

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args):
        if local_metadata.get("version") not in (1, 2):
            raise ValueError(f"version should be set to 1 or 2 instead of {local_metadata.get('version')}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)


def test_load_gives_a_versioned_module_its_version(tmp_path):
    torch.manual_seed(0)
    model = Versioned().eval()
    keep = torch.arange(8) % 2 == 0
    masks = ts.Masks({"conv.weight": keep.view(8, 1, 1, 1).expand(8, 3, 3, 3).clone(),
                      "head.weight": keep.view(1, 8, 1, 1).expand(4, 8, 1, 1).clone()})
    x = torch.randn(2, 3, 8, 8)
    small = C.compact(model, masks, x)
    C.save(small, tmp_path / "t")
    again = C.load(tmp_path / "t", build=Versioned)
    with torch.no_grad():
        assert torch.equal(again(x), small(x))


def test_heads_stay_where_they_depend_on_each_other():
    """BEiT with `use_shared_rel_pos_bias` hands every layer one bias for all heads (a layer
    with heads cut could not add it); EVA with `scale_norm` normalises all heads' outputs
    together (a dead head's zeros count in the statistics). There the heads stay, with the
    reason, and the compact model is exact; without them, the dead heads go."""
    for family, removed in (("beit_shared_bias", False), ("beit", True),
                            ("eva_scale_norm", False), ("eva", True)):
        build, shape, others = FAMILIES[family]
        model = build()
        x = torch.randn(shape)
        masks = structured("refill", model, x)
        small = C.compact(model, masks, x)
        assert bool(small.ticketsmith_compact["removed_heads"]) == removed, family
        heads = {r["layer"]: r["heads"] for r in C.describe(small) if "heads" in r}
        if not removed:
            assert any("computes another function" in h for h in heads.values()), heads
        assert_matches_masked(model, masks, small, others)


@pytest.mark.parametrize("family,mlp", [("eva_glu", "blocks.0.mlp"), ("glu_conv", "mlp")])
def test_gated_mlp_hidden_units_are_refilled_and_removed(family, mlp):
    """timm's GluMlp (one fc1 for both halves, chunked) swapped for a SplitGluMlp: a channel
    ticket drops hidden units from the value half, the gate half and fc2's inputs together,
    and the compact model is exact."""
    build, shape, others = FAMILIES[family]
    model = build()
    x = torch.randn(shape)
    masks = structured("refill", model, x)
    small = C.compact(model, masks, x)
    before, after = model.get_submodule(mlp), small.get_submodule(mlp)
    width = lambda m: getattr(m, "out_features", None) or m.out_channels  # noqa: E731
    assert width(after.fc1_x) == width(after.fc1_g) < width(before.fc1_x)
    assert after.fc2.weight.shape[1] == width(after.fc1_x)
    assert_matches_masked(model, masks, small, others)


def test_heads_of_separate_q_and_kv_linears_are_refilled_and_removed(tmp_path):
    """PVT-v2's attention (swapped for a PvtAttention) computes q from the tokens and k, v (one
    `kv` Linear) from the reduced map: a channel ticket keeps or drops whole heads across both
    Linears (a head's q rows, its k and v rows, its projection columns), and compaction removes
    the dropped ones from all three, exact on another batch and map size and through save /
    load."""
    build, shape, others = FAMILIES["pvt_attention"]
    model = build()
    x = torch.randn(shape)
    masks = structured("refill", model, x)
    nh, hd, dim = 4, 4, 16
    q = masks["attn.q.weight"].reshape(1, nh, hd, dim)
    kv = masks["attn.kv.weight"].reshape(2, nh, hd, dim)
    per_head = torch.cat([q, kv])
    assert bool((per_head.all(dim=(0, 2, 3)) | ~per_head.any(dim=(0, 2, 3))).all())  # whole heads
    kept = per_head.all(dim=(0, 2, 3))
    k = int(kept.sum())
    assert 0 < k < nh
    assert not bool(masks["attn.proj.weight"].reshape(dim, nh, hd)[:, ~kept].any())
    small = C.compact(model, masks, x)
    a = small.attn
    assert (a.num_heads, a.q.out_features, a.kv.out_features, a.proj.in_features) == (
        k, k * hd, 2 * k * hd, k * hd)
    notes = {r["layer"]: r.get("heads") for r in C.describe(small)}
    assert notes["attn.kv"] == notes["attn.q"] == f"kept {k} of {nh} heads of attn"
    assert_matches_masked(model, masks, small, others)
    C.save(small, tmp_path / "ticket")
    again = C.load(tmp_path / "ticket", build=build)
    xi = torch.randn(others[-1])
    with torch.no_grad():
        assert torch.equal(small(xi), again(xi))


@pytest.mark.parametrize("bias", ["table", "tf", "mlp"])
def test_maxxvit_heads_are_refilled_and_removed(bias, tmp_path):
    """timm's CoAtNet Attention2d (1x1 convs on NCHW maps) and MaxViT AttentionCl (Linears on
    channels-last windows), swapped for MaxxVitAttention, with timm's layouts (heads first,
    or q, k, v with "tf") and bias modules: a channel ticket keeps or drops whole heads, and
    compaction removes the dropped ones with their slices of the bias module (table column
    or row, or the bias MLP's output row), exact on another batch and through save / load."""
    from families import TinyMaxxViT, builder

    from ticketsmith.structure.heads import attention_heads
    build = builder(TinyMaxxViT, bias=bias)
    model = build()
    x = torch.randn(2, 3, 32, 32)
    masks = half_per_layer(model, x)
    found = {a.module: a for a in attention_heads(model)}
    assert set(found) == {"attn2d", "attn"}
    kept = {}
    for name, att in found.items():
        assert att.head_first == (bias != "tf")
        per_head = torch.cat([att.part(masks[f"{att.qkv}.weight"], (0, 1, 2), p).flatten(1) for p in range(3)], 1)
        assert bool((per_head.all(dim=1) | ~per_head.any(dim=1)).all())  # whole heads
        kept[name] = per_head.all(dim=1)
        assert 0 < int(kept[name].sum()) < att.num_heads, name
    small = C.compact(model, masks, x)
    for name, att in found.items():
        k = int(kept[name].sum())
        a = small.get_submodule(name)
        assert small.ticketsmith_compact["removed_heads"][name]["heads"] == [att.num_heads, k]
        assert a.num_heads == k and a.rel_pos.get_bias().shape[-3] == k
    assert_matches_masked(model, masks, small, [(3, 3, 32, 32), (1, 3, 32, 32)])
    C.save(small, tmp_path / "ticket")
    again = C.load(tmp_path / "ticket", build=build)
    xi = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(small(xi), again(xi))


@pytest.mark.parametrize("family,q", [("class_attn", "attn.q"), ("cross_attention", "attn.q"),
                                      ("tnt_attention", "attn.qk")])
def test_class_attention_heads_are_removed(family, q):
    """CaiT's / XCiT's class attention, swapped for a ClassAttention, and TNT's (q and k in one
    Linear `qk`, v in another): a channel ticket drops whole heads and compaction removes
    them, exact on another batch and token count."""
    build, shape, others = FAMILIES[family]
    model = build()
    x = torch.randn(shape)
    masks = half_per_layer(model, x)
    k = int(masks["attn.v.weight"].reshape(4, -1).all(dim=1).sum())  # heads kept
    assert bool((masks[f"{q}.weight"].reshape(-1, 4, 4 * 16).all(dim=2)
                 == masks["attn.v.weight"].reshape(4, -1).all(dim=1)).all())  # whole heads
    assert 0 < k < 4
    small = C.compact(model, masks, x)
    assert small.ticketsmith_compact["removed_heads"]["attn"]["heads"] == [4, k]
    assert small.attn.num_heads == k and small.attn.proj.in_features == 4 * k
    assert_matches_masked(model, masks, small, others)


@pytest.mark.parametrize("input_width", [False, True])
def test_heads_of_separate_q_k_v_linears_are_refilled_and_removed(input_width, tmp_path):
    """Attention as users write it (q_proj, k_proj, v_proj, o_proj): a channel ticket keeps or
    drops whole heads across the three input Linears, and compaction removes the dropped ones
    from all four, exact on another batch and token count and through save / load; where the
    forward reshapes the heads' output to the input width, the heads stay, with the reason."""
    from families import TinySeparateQKV, builder

    from ticketsmith.structure.heads import attention_heads
    build = builder(TinySeparateQKV, input_width=input_width)
    model = build()
    x = torch.randn(2, 3, 16, 16)
    (att,) = attention_heads(model)
    assert [n for n, _ in att.inputs()] == ["attn.q_proj", "attn.k_proj", "attn.v_proj"]
    assert att.proj == "attn.o_proj"
    masks = half_per_layer(model, x)
    per_head = torch.stack([masks[f"attn.{p}.weight"].reshape(4, 4, 16)
                            for p in ("q_proj", "k_proj", "v_proj")], dim=1).flatten(1)
    assert bool((per_head.all(dim=1) | ~per_head.any(dim=1)).all())  # whole heads
    kept = per_head.all(dim=1)
    k = int(kept.sum())
    assert 0 < k < 4
    assert not bool(masks["attn.o_proj.weight"].reshape(16, 4, 4)[:, ~kept].any())
    small = C.compact(model, masks, x)
    a = small.attn
    if input_width:
        assert a.num_heads == 4 and "computes another function" in C.describe(small)[
            [r["layer"] for r in C.describe(small)].index("attn.q_proj")]["heads"]
    else:
        assert a.num_heads == k
        assert [getattr(a, p).out_features for p in ("q_proj", "k_proj", "v_proj")] == [4 * k] * 3
        assert a.o_proj.in_features == 4 * k
    assert_matches_masked(model, masks, small, [(3, 3, 16, 16), (1, 3, 24, 24)])
    C.save(small, tmp_path / "ticket")
    again = C.load(tmp_path / "ticket", build=build)
    xi = torch.randn(3, 3, 24, 24)
    with torch.no_grad():
        assert torch.equal(small(xi), again(xi))


@pytest.mark.parametrize("family", ["efficientformer_attention", "levit_attention", "levit_downsample"])
def test_heads_with_a_wider_v_are_refilled_and_removed(family, tmp_path):
    """EfficientFormer's attention (timm's LeViT family: per head, q and k key_dim wide and v
    val_dim, head by head in one qkv Linear, a bias per head gathered once per device in eval
    mode) and LeViT's (swapped: a BatchNorm1d over the qkv rows): a channel ticket keeps or
    drops whole heads, and compaction removes the dropped ones with their bias rows, their
    norm channels and the widths the forward reshapes to, exact on another batch and through
    save / load, also after an eval forward has cached the biases of all heads."""
    from ticketsmith.structure.heads import attention_heads
    build, shape, others = FAMILIES[family]
    model = build()
    x = torch.randn(shape)
    with torch.no_grad():
        model(x)  # eval mode: the attention caches its biases, of all four heads
    (att,) = attention_heads(model)
    down = family == "levit_downsample"  # q from the subsampled tokens, k and v in `kv`
    assert (att.qkv, att.kv, att.proj, att.head_dim, att.v_dim, att.head_first) == \
        ("attn.q" if down else "attn.qkv", "attn.kv" if down else None, "attn.proj", 4, 8, True)
    masks = half_per_layer(model, x)
    if down:  # head by head: 4 rows of q; 4 + 8 rows of kv
        per_head = torch.cat([masks["attn.q.weight"].reshape(4, -1),
                              masks["attn.kv.weight"].reshape(4, -1)], dim=1)
    else:  # head by head: 4 + 4 + 8 rows
        per_head = masks["attn.qkv.weight"].reshape(4, 4 + 4 + 8, -1).flatten(1)
    assert bool((per_head.all(dim=1) | ~per_head.any(dim=1)).all())  # whole heads
    k = int(per_head.all(dim=1).sum())
    assert 0 < k < 4
    small = C.compact(model, masks, x)
    assert small.ticketsmith_compact["removed_heads"]["attn"]["heads"] == [4, k]
    a = small.attn
    assert (a.num_heads, a.key_attn_dim, a.val_attn_dim, a.proj.in_features) == (k, 4 * k, 8 * k, 8 * k)
    assert a.attention_biases.shape[0] == k
    if down:
        assert a.q.out_features == a.q_norm.num_features == 4 * k
        assert a.kv.out_features == a.kv_norm.num_features == 12 * k
    else:
        assert a.qkv.out_features == 16 * k
    if family == "levit_attention":
        assert a.qkv_norm.num_features == 16 * k
    assert_matches_masked(model, masks, small, others)
    C.save(small, tmp_path / "ticket")
    again = C.load(tmp_path / "ticket", build=build)
    xi = torch.randn(others[0])
    with torch.no_grad():
        assert torch.equal(small(xi), again(xi))
