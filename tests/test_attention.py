"""nn.MultiheadAttention made prunable: QKVAttention computes what it computed (every call
form torch's transformer modules and users use), `models.build` swaps it in, and the CLI prunes
its heads. Its compaction is in test_families.py (family `vit_qkv`)."""
import itertools
import json
import warnings

import pytest
import torch
from torch import nn

import ticketsmith as ts
from ticketsmith.cli import main
from ticketsmith.models import QKVAttention, prunable_attention

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models


def close(a, b, tol=1e-5):
    return a.shape == b.shape and float((a - b).abs().max()) <= tol * max(float(a.abs().max()), 1.0)


def _calls(batch_first):
    """(args, kwargs) of the call forms: self-attention, cross-attention (key is value, and
    not), boolean and float masks of either shape, a causal mask with its hint."""
    g = torch.Generator().manual_seed(0)
    shape = (lambda n: (3, n, 16)) if batch_first else (lambda n: (n, 3, 16))
    x, mem, val = (torch.randn(shape(n), generator=g) for n in (5, 7, 7))
    pad = torch.rand(3, 7, generator=g) < 0.3
    pad[:, 0] = False
    banned = torch.rand(5, 7, generator=g) < 0.2
    banned[:, 1] = False
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    return [((x, x, x), {}), ((x, mem, mem), {}), ((x, mem, val), {}),
            ((x, mem, mem), {"key_padding_mask": pad}), ((x, mem, mem), {"attn_mask": banned}),
            ((x, mem, mem), {"attn_mask": torch.randn(12, 5, 7, generator=g),
                             "key_padding_mask": pad.float() * -3}),
            ((x, x, x), {"attn_mask": causal, "is_causal": True})]


@pytest.mark.parametrize("batch_first,bias", list(itertools.product([True, False], [True, False])))
def test_qkv_attention_computes_what_multihead_attention_computes(batch_first, bias):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, bias=bias, batch_first=batch_first).eval()
    qkv = QKVAttention.from_mha(mha).eval()
    assert (qkv.num_heads, qkv.head_dim, qkv.in_proj.out_features) == (4, 4, 48)
    with torch.no_grad():
        for (args, kwargs), need, average in itertools.product(
                _calls(batch_first), [True, False], [True, False]):
            ref = mha(*args, need_weights=need, average_attn_weights=average, **kwargs)
            got = qkv(*args, need_weights=need, average_attn_weights=average, **kwargs)
            assert close(ref[0], got[0]), (kwargs.keys(), need)
            assert (ref[1] is None) == (got[1] is None)
            if ref[1] is not None:
                assert close(ref[1], got[1]), (kwargs.keys(), average)
        one = torch.randn(5, 16)  # unbatched (L, E), with a per-head mask
        for kwargs in ({}, {"attn_mask": torch.randn(4, 5, 5)}):
            ref, got = mha(one, one, one, **kwargs), qkv(one, one, one, **kwargs)
            assert close(ref[0], got[0]) and close(ref[1], got[1])


def test_gradients_match_in_training_mode():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True)  # dropout 0: training is deterministic
    qkv = QKVAttention.from_mha(mha)
    assert qkv.training
    x1 = torch.randn(2, 6, 16, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    mha(x1, x1, x1, need_weights=False)[0].square().sum().backward()
    qkv(x2, x2, x2, need_weights=False)[0].square().sum().backward()
    assert close(x1.grad, x2.grad)
    assert close(mha.in_proj_weight.grad, qkv.in_proj.weight.grad)
    assert close(mha.out_proj.weight.grad, qkv.out_proj.weight.grad)


def test_torch_transformers_keep_their_function_once_swapped():
    """nn.TransformerEncoder / Decoder call their attention with masks and take fused fast paths
    in eval mode (reading in_proj_weight): swapped, they run the layers' own forward."""
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True),
                                2, enable_nested_tensor=True).eval()
    x = torch.randn(3, 6, 16)
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[1, 4:] = True
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: nested tensors are a prototype
        ref = [enc(x), enc(x, src_key_padding_mask=pad)]
        assert prunable_attention(enc) == {}
        got = [enc(x), enc(x, src_key_padding_mask=pad)]
    assert all(type(layer.self_attn) is QKVAttention for layer in enc.layers)
    assert close(ref[0], got[0])
    # torch's packed path leaves zeros where the padding was; the unpadded tokens are the same
    assert close(ref[1][~pad], got[1][~pad])

    dec = nn.TransformerDecoder(nn.TransformerDecoderLayer(16, 4, 32, dropout=0.0), 2).eval()
    tgt, memory = torch.randn(5, 2, 16), torch.randn(7, 2, 16)
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    with torch.no_grad():
        ref = dec(tgt, memory, tgt_mask=causal, tgt_is_causal=True)
        prunable_attention(dec)
        got = dec(tgt, memory, tgt_mask=causal, tgt_is_causal=True)
    assert type(dec.layers[0].multihead_attn) is QKVAttention  # cross-attention too
    assert close(ref, got)


def test_unusual_configurations_stay_with_the_reason():
    model = nn.ModuleDict({"kdim": nn.MultiheadAttention(16, 4, kdim=8, vdim=8),
                           "bias_kv": nn.MultiheadAttention(16, 4, add_bias_kv=True),
                           "zero": nn.MultiheadAttention(16, 4, add_zero_attn=True),
                           "plain": nn.MultiheadAttention(16, 4)})
    left = prunable_attention(model)
    assert set(left) == {"kdim", "bias_kv", "zero"}
    assert "kdim" in left["kdim"] and "add_bias_kv" in left["bias_kv"] and "add_zero_attn" in left["zero"]
    assert type(model["plain"]) is QKVAttention and type(model["kdim"]) is nn.MultiheadAttention
    with pytest.raises(ValueError, match="kdim"):
        QKVAttention.from_mha(model["kdim"])


def test_a_raw_multihead_attention_is_pointed_out_when_masks_are_made():
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(16, 4), "fc": nn.Linear(16, 16),
                           "head": nn.Linear(16, 4)})
    with pytest.warns(UserWarning, match="prunable_attention"):
        names = ts.prunable_names(model)
    assert "attn.out_proj.weight" in names
    prunable_attention(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "attn.in_proj.weight" in ts.prunable_names(model)


BUILDER = '''
from torch import nn


class Net(nn.Module):
    """A user's transformer on 8x8 images: 2x2 patches, one encoder layer of 4 heads."""

    def __init__(self, in_channels, num_classes, dim=16):
        super().__init__()
        self.patch = nn.Conv2d(in_channels, dim, 2, stride=2)
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(dim, 4, 2 * dim, dropout=0.0, batch_first=True), 1)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        return self.head(self.encoder(self.patch(x).flatten(2).transpose(1, 2)).mean(1))


def with_kdim():
    net = Net(1, 10)
    net.extra = nn.MultiheadAttention(16, 4, kdim=8, vdim=8)
    return net
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_transformer.py").write_text(BUILDER)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_build_swaps_a_users_attention_and_warns_about_what_stays(user_module):
    model = ts.models.build("my_transformer:Net", in_channels=1, num_classes=10)
    assert type(model.encoder.layers[0].self_attn) is QKVAttention
    with pytest.warns(UserWarning, match=r"extra: its keys or values have another width"):
        model = ts.models.build("my_transformer:with_kdim")
    assert type(model.extra) is nn.MultiheadAttention
    original = ts.models.original("my_transformer:Net", in_channels=1)  # as its builder made it
    assert type(original.encoder.layers[0].self_attn) is nn.MultiheadAttention


def test_the_cli_prunes_whole_heads_of_a_users_transformer(user_module):
    """`ticketsmith run --model` with Refill: the in-projection is masked, by whole heads; `bench`
    times the user's own modules as a dense candidate too."""
    out = user_module / "run"
    code = main(["run", "--model", "my_transformer:Net", "--dataset", "digits", "--epochs", "1",
                 "--rounds", "1", "--prune-fraction", "0.6", "--structure", "refill", "--lr", "0.02",
                 "--batch-size", "64", "--out", str(out), "--no-progress"])
    assert code == 0
    masks = ts.Masks.load(out / "round_01" / "masks.safetensors")
    per_head = masks["encoder.layers.0.self_attn.in_proj.weight"].reshape(3, 4, 4, 16)
    kept = per_head.all(dim=(0, 2, 3))
    assert bool((kept | ~per_head.any(dim=(0, 2, 3))).all())  # whole heads kept or dropped
    assert 0 < int(kept.sum()) < 4
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"]
    assert main(["bench", str(out), "--batch-sizes", "2", "--pairs", "3", "--runtimes", "torch",
                 "--no-layerwise"]) == 0
    (row,) = [r for r in json.loads((out / "round_01" / "bench.json").read_text())["results"]
              if r["backend"] == "fastest"]
    dense_ms = {k.split(" ", 1)[1]: v for k, v in row["candidates_ms"].items() if k.startswith("dense ")}
    assert set(dense_ms) == {"torch", "torch, original modules"}
    assert row["dense_runtime"] == min(dense_ms, key=dense_ms.get)


def test_fused_attention_swaps_back_where_all_heads_are_there():
    torch.manual_seed(0)
    model = nn.ModuleDict({"a": nn.MultiheadAttention(16, 4, batch_first=True),
                           "b": nn.MultiheadAttention(16, 4, bias=False)}).eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        ref = model["a"](x, x, x)[0], model["b"](x, x, x)[0]
        prunable_attention(model)
        model["b"].num_heads = 2  # as compaction leaves a module whose heads went
        assert ts.models.fused_attention(model) == 1
        assert type(model["a"]) is nn.MultiheadAttention and type(model["b"]) is QKVAttention
        assert torch.equal(model["a"](x, x, x)[0], ref[0])
    with pytest.raises(ValueError, match="narrower than embed_dim 16"):
        model["b"].to_mha()


def test_bench_times_the_users_own_attention_as_the_dense_baseline(monkeypatch):
    """The dense baseline is what the user would run (torch's nn.MultiheadAttention); its MACs
    are counted on the swapped model, whose in-projection is a Linear."""
    import ticketsmith.bench as B
    timed = []
    real = B._runtime_rows
    monkeypatch.setattr(B, "_runtime_rows", lambda dense, *a, **k: timed.append(dense) or real(dense, *a, **k))
    torch.manual_seed(0)
    dense = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True), 1)
    prunable_attention(dense)
    out = B.compare(dense, dense, lambda b: torch.randn(b, 6, 16), batch_sizes=(2,), pairs=2,
                    layerwise=False, burst_s=0.001, runtimes=("torch",))
    assert type(timed[0].layers[0].self_attn) is nn.MultiheadAttention
    assert type(dense.layers[0].self_attn) is QKVAttention  # the caller's model is left as it was
    # in/out projections and MLP per token, and q k^T and weights x v (6 x 6 tokens x 16)
    assert out["dense"]["macs"] == 6 * (16 * 48 + 16 * 16 + 2 * 16 * 32) + 2 * 6 * 6 * 16


def test_multihead_attention_exports_also_without_autograd(tmp_path):
    """Without autograd, eval-mode nn.MultiheadAttention runs torch's fused kernel, which has
    no ONNX form: export takes the decomposed path (the dense baseline of a ViT in onnxruntime
    and OpenVINO needs it)."""
    pytest.importorskip("onnxruntime")
    from ticketsmith import compact as C
    torch.manual_seed(0)
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True),
                                  1, enable_nested_tensor=False).eval()
    x = torch.randn(2, 6, 16)
    with torch.inference_mode():
        path = C.export_onnx(model, x, tmp_path / "dense.onnx")
        assert torch.backends.mha.get_fastpath_enabled()  # left as it was
        other = torch.randn(3, 6, 16)
        assert close(model(other), torch.as_tensor(C.run_onnx(path, other)[0]), tol=1e-4)


def test_loading_with_a_build_that_does_not_swap_says_what_to_add(tmp_path):
    from families import TinyViT, builder
    from ticketsmith import compact as C
    build = builder(TinyViT)
    model = build()
    prunable_attention(model)
    x = torch.randn(2, 3, 16, 16)
    C.save(C.compact(model, ts.refill(model, ts.prune.omp(model, 0.6), example_inputs=x), x),
           tmp_path / "ticket")
    with pytest.raises(ts.UsageError, match=r"held QKVAttention \(prunable swaps.*call "
                       r"ticketsmith.models.prunable_attention\(model\) and prunable_mlp\(model\)"):
        C.load(tmp_path / "ticket", build=build)  # the build without the swap


class _ConvViT(nn.Module):
    """A conv stem with BatchNorm, then a (swapped) attention block and an MLP."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 4, stride=4), nn.BatchNorm2d(16))
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.fc1, self.fc2, self.head = nn.Linear(16, 32), nn.Linear(32, 16), nn.Linear(16, 10)

    def forward(self, x):
        t = self.stem(x).flatten(2).transpose(1, 2)
        t = t + self.attn(t, t, t, need_weights=False)[0]
        return self.head(self.fc2(torch.relu(self.fc1(t))).mean(1))


def test_models_with_qkv_attention_are_still_traced(small_executors):
    """torch.fx cannot trace QKVAttention's forward (it branches on the inputs' rank): it stays
    one opaque node, so a model holding one still gets its BatchNorms folded and its condensed
    layers handed off (fc1 -> fc2), as with nn.MultiheadAttention."""
    from ticketsmith import compact as C
    from ticketsmith import deploy as D
    from test_families import constant_fan_in
    torch.manual_seed(0)
    model = _ConvViT().eval()
    prunable_attention(model)
    x = torch.randn(2, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # (the stem's ablated channels go too, through the tokens: fc1 keeps 2 of 12 inputs;
        # fc2's, through the mean over the tokens; at this density fc2 stays condensed)
        small = C.compact(model, constant_fan_in(model, x, density=0.12), x)
    assert small.fc1.in_features == 12 and small.stem[0].out_channels == 12
    assert small.fc2.out_features < 16
    assert small.ticketsmith_executors["fc2"] != "dense"
    assert small.ticketsmith_executors["fc1"] != "dense" and small.fc1.transposed_out
    d = D.deploy(small, x, "torch", threads=1)
    assert d.details["batchnorms_folded"] == 1


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_window_attention_computes_what_swin_window_attention_computes(version):
    """torchvision's Swin window attention, V1 and V2 (the replicas in families.py: same class
    names, constructors and forwards), swapped for a WindowAttention: the same outputs on maps
    that are and are not multiples of the window, with and without the shift, and the same
    gradients (V2: the keys' bias, which it never adds, gets none); its Linears, bias table or
    bias MLP and logit scale are the original's own (an optimizer made before still holds
    them)."""
    from families import ShiftedWindowAttention, ShiftedWindowAttentionV2

    from ticketsmith.models import WindowAttention
    torch.manual_seed(0)
    cls = ShiftedWindowAttentionV2 if version == "v2" else ShiftedWindowAttention
    for shift in (0, 2):
        swin = cls(16, [4, 4], [shift, shift], 4)
        with torch.no_grad():
            swin.qkv.bias.normal_()  # V2's keys' bias too: it is never added
        holder = nn.Sequential(swin)
        params = set(map(id, swin.parameters()))
        assert not prunable_attention(holder)
        ours = holder[0]
        assert isinstance(ours, WindowAttention) and set(map(id, ours.parameters())) == params
        assert ours.head_dim == 4 and ours.num_heads == 4 and ours.cosine == (version == "v2")
        for shape in [(2, 8, 8, 16), (1, 9, 14, 16), (3, 4, 4, 16)]:
            x = torch.randn(shape, requires_grad=True)
            ref, got = swin(x), ours(x)
            assert torch.allclose(ref, got, atol=1e-6), (shift, shape)
            wrt = [x, swin.qkv.bias] + [p for p in swin.parameters() if p is not swin.qkv.bias]
            g_ref = torch.autograd.grad(ref.square().sum(), wrt)
            g_got = torch.autograd.grad(got.square().sum(), wrt)
            for a, b in zip(g_ref, g_got):
                assert torch.allclose(a, b, atol=1e-5)
            if version == "v2":
                assert not bool(g_got[1][16:32].any())  # qkv.bias: the keys' third


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_timm_swin_v2_attention_is_swapped_for_one_computing_the_same(qkv_bias):
    """timm's Swin V2 WindowAttention (the replica in families.py: class name, attributes,
    forward) swapped for a TimmWindowAttentionV2: the same outputs with and without the
    block's shift mask, in training mode too, and the same gradients: q_bias's and v_bias's are
    those of the qkv bias's first and last thirds, the keys' third gets none; the weights and
    the bias MLP are the original's own; nothing else of the module is left behind."""
    from families import TimmWindowAttentionV2 as Replica

    from ticketsmith.models import TimmWindowAttentionV2
    torch.manual_seed(0)
    timm = Replica(16, 4, 4, qkv_bias=qkv_bias)
    holder = nn.Sequential(timm)
    assert not prunable_attention(holder)
    ours = holder[0]
    assert isinstance(ours, TimmWindowAttentionV2) and (ours.num_heads, ours.head_dim) == (4, 4)
    assert ours.qkv.weight is timm.qkv.weight and ours.cpb_mlp is timm.cpb_mlp
    assert set(ours.state_dict()) == {"qkv.weight", "proj.weight", "proj.bias", "logit_scale",
                                      "cpb_mlp.0.weight", "cpb_mlp.0.bias", "cpb_mlp.2.weight"} | (
        {"qkv.bias"} if qkv_bias else set())  # timm's buffers are not saved: neither are these
    mask = torch.zeros(2, 16, 16).masked_fill(torch.rand(2, 16, 16) < 0.3, -100.0)
    for m in (None, mask):
        x = torch.randn(6, 16, 16, requires_grad=True)
        ref, got = timm(x, m), ours(x, mask=m)
        assert torch.allclose(ref, got, atol=1e-6)
        wrt = [x, timm.qkv.weight, timm.logit_scale, timm.cpb_mlp[2].weight]
        g_ref = torch.autograd.grad(ref.square().sum(), wrt + ([timm.q_bias, timm.v_bias] if qkv_bias else []))
        g_got = torch.autograd.grad(got.square().sum(), wrt + ([ours.qkv.bias] if qkv_bias else []))
        for a, b in zip(g_ref[:4], g_got[:4]):
            assert torch.allclose(a, b, atol=1e-5)
        if qkv_bias:
            assert torch.allclose(g_ref[4], g_got[4][:16], atol=1e-5)
            assert torch.allclose(g_ref[5], g_got[4][32:], atol=1e-5)
            assert g_got[4][16:32].abs().max() < 1e-5  # the keys' bias: cancelled


@pytest.mark.parametrize("qkv_bias,table", [(True, True), (False, True), (True, False)])
def test_beit_attention_is_swapped_for_one_computing_the_same(qkv_bias, table):
    """timm's BEiT Attention (the replica in families.py) swapped for a BeitAttention: the same
    outputs and gradients, with its own bias table or none, with a bias shared by all layers
    added or not; q_bias's and v_bias's gradients are those of the qkv bias's first and last
    thirds, the keys' third gets none. A BeitAttention built directly indexes its bias table
    as timm does (the class token's three rows included)."""
    from families import TimmBeitAttention

    from ticketsmith.models import BeitAttention
    torch.manual_seed(0)
    timm = TimmBeitAttention(16, 4, qkv_bias=qkv_bias, window_size=(3, 2) if table else None)
    holder = nn.Sequential(timm)
    assert not prunable_attention(holder)
    ours = holder[0]
    assert isinstance(ours, BeitAttention) and (ours.num_heads, ours.head_dim) == (4, 4)
    assert ours.qkv.weight is timm.qkv.weight and ours.proj is timm.proj
    assert ours.per_head_params == ((("relative_position_bias_table", 1),) if table else ())
    shared = torch.randn(1, 4, 7, 7)
    for extra in (None, shared):
        x = torch.randn(2, 7, 16, requires_grad=True)
        ref, got = timm(x, shared_rel_pos_bias=extra), ours(x, shared_rel_pos_bias=extra)
        assert torch.allclose(ref, got, atol=1e-5)
        wrt = [x, timm.qkv.weight, timm.proj.weight] + ([timm.relative_position_bias_table] if table else [])
        bias_ref = [timm.q_bias, timm.v_bias] if qkv_bias else []
        g_ref = torch.autograd.grad(ref.square().sum(), wrt + bias_ref)
        g_got = torch.autograd.grad(got.square().sum(), wrt + ([ours.qkv.bias] if qkv_bias else []))
        for a, b in zip(g_ref[:len(wrt)], g_got[:len(wrt)]):
            assert torch.allclose(a, b, atol=1e-4)
        if qkv_bias:
            assert torch.allclose(g_ref[-2], g_got[-1][:16], atol=1e-4)
            assert torch.allclose(g_ref[-1], g_got[-1][32:], atol=1e-4)
            assert g_got[-1][16:32].abs().max() < 1e-5  # the keys' bias: cancelled
    if table:
        direct = BeitAttention(16, 4, qkv_bias=True, window_size=(3, 2))
        assert torch.equal(direct.relative_position_index, timm.relative_position_index)
        assert direct.relative_position_bias_table.shape == timm.relative_position_bias_table.shape
        assert not bool(direct.qkv.bias[16:32].any())


@pytest.mark.parametrize("kw", [{}, {"qk_norm": True}, {"scale_norm": True, "gated": True, "half": True}])
def test_eva_attention_is_swapped_for_one_computing_the_same(kw):
    """timm's EvaAttention with a fused qkv (the replica in families.py) swapped for an
    EvaAttention: the same outputs and gradients with the rotary embedding (the replica
    module's own function), with an additive attention mask, with q / k norms, a norm over all
    heads and a gate; q_bias's and v_bias's gradients are the qkv bias's first and last
    thirds', the keys' third gets none."""
    import families

    from ticketsmith.models import EvaAttention
    torch.manual_seed(0)
    timm = families.EvaAttention(16, 4, **kw)
    holder = nn.Sequential(timm)
    assert not prunable_attention(holder)
    ours = holder[0]
    assert isinstance(ours, EvaAttention) and ours.apply_rope is families.apply_rot_embed_cat
    assert ours.qkv.weight is timm.qkv.weight and ours.norm is timm.norm and ours.gate is timm.gate
    angle = torch.randn(6, 2)
    rope = torch.cat([angle.sin(), angle.cos()], -1).repeat_interleave(2, -1)
    for r, mask in [(None, None), (rope, None), (rope, torch.randn(1, 1, 7, 7))]:
        x = torch.randn(2, 7, 16, requires_grad=True)
        ref, got = timm(x, rope=r, attn_mask=mask), ours(x, rope=r, attn_mask=mask)
        assert torch.allclose(ref, got, atol=1e-5)
        wrt = [x, timm.qkv.weight, timm.proj.weight]
        g_ref = torch.autograd.grad(ref.square().sum(), wrt + [timm.q_bias, timm.v_bias])
        g_got = torch.autograd.grad(got.square().sum(), wrt + [ours.qkv.bias])
        for a, b in zip(g_ref[:3], g_got[:3]):
            assert torch.allclose(a, b, atol=1e-4)
        assert torch.allclose(g_ref[3], g_got[3][:16], atol=1e-4)
        assert torch.allclose(g_ref[4], g_got[3][32:], atol=1e-4)
        assert g_got[3][16:32].abs().max() < 1e-5


@pytest.mark.parametrize("gate_last,use_conv", [(True, False), (False, False), (False, True)])
def test_glu_mlp_is_swapped_for_one_computing_the_same(gate_last, use_conv):
    """timm's GluMlp (the replica in families.py) swapped for a SplitGluMlp: the same outputs,
    and gradients whose value and gate rows are the halves of fc1's (the gate the second half
    with `gate_last`, else the first); fc2, the activation and the norm are the original's."""
    from families import GluMlp

    from ticketsmith.models import SplitGluMlp, prunable_mlp
    torch.manual_seed(0)
    timm = GluMlp(6, 5, gate_last=gate_last, use_conv=use_conv)
    holder = nn.Sequential(timm)
    assert prunable_mlp(holder) == 1
    ours = holder[0]
    assert isinstance(ours, SplitGluMlp) and ours.fc2 is timm.fc2 and ours.act is timm.act
    x = torch.randn((2, 6, 3, 3) if use_conv else (2, 4, 6), requires_grad=True)
    ref, got = timm(x), ours(x)
    assert torch.allclose(ref, got, atol=1e-6)
    g_ref = torch.autograd.grad(ref.square().sum(), [x, timm.fc1.weight, timm.fc1.bias])
    g_got = torch.autograd.grad(got.square().sum(), [x, ours.fc1_x.weight, ours.fc1_g.weight,
                                                     ours.fc1_x.bias, ours.fc1_g.bias])
    assert torch.allclose(g_ref[0], g_got[0], atol=1e-5)
    halves = lambda a, b: torch.cat([a, b] if gate_last else [b, a])  # noqa: E731
    assert torch.allclose(g_ref[1], halves(g_got[1], g_got[2]), atol=1e-5)
    assert torch.allclose(g_ref[2], halves(g_got[3], g_got[4]), atol=1e-5)


def swapped(original: nn.Module, cls) -> nn.Module:
    """`original` swapped by prunable_attention (nothing left unswapped) for a `cls`, holding
    the original's parameters themselves."""
    holder = nn.Sequential(original)
    assert not prunable_attention(holder)
    ours = holder[0]
    assert isinstance(ours, cls)
    assert {id(p) for p in ours.parameters()} == {id(p) for p in original.parameters()}
    return ours


def assert_same_function(original: nn.Module, ours: nn.Module, calls) -> None:
    """The same outputs, and the same gradients for the input and every parameter, on each
    call's arguments (the first a fresh input tensor of that shape)."""
    params = list(original.parameters())
    for shape, *rest in calls:
        x = torch.randn(shape, requires_grad=True)
        ref, got = original(x, *rest), ours(x, *rest)
        assert torch.allclose(ref, got, atol=1e-5)
        for a, b in zip(torch.autograd.grad(ref.square().sum(), [x] + params),
                        torch.autograd.grad(got.square().sum(), [x] + params)):
            assert torch.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("kind", ["pvt", "pvt-linear", "twins", "twins-no-reduction"])
def test_pvt_attention_is_swapped_for_one_computing_the_same(kind):
    """timm's PVT-v2 Attention and Twins' GlobalSubSampleAttn (the replicas in families.py)
    swapped for a PvtAttention: the same outputs and gradients on maps of two sizes, with the
    strided reduction, the pooled one (PVT's `linear_attn`) or none (Twins at sr_ratio 1); its
    Linears and reduction layers are the original's."""
    from families import GlobalSubSampleAttn, PvtV2Attention

    from ticketsmith.models import PvtAttention
    torch.manual_seed(0)
    timm = (PvtV2Attention(16, 4, linear=kind == "pvt-linear") if kind.startswith("pvt")
            else GlobalSubSampleAttn(16, 4, sr_ratio=1 if kind == "twins-no-reduction" else 2))
    ours = swapped(timm, PvtAttention)
    assert ours.kv is timm.kv and ours.sr is timm.sr and ours.head_dim == 4
    assert_same_function(timm, ours, [((2, 24, 16), (4, 6)), ((2, 64, 16), (8, 8))])


def test_maxvit_attention_is_swapped_for_one_computing_the_same():
    """torchvision's MaxViT attention (the replica in families.py) swapped for a GridAttention:
    the same outputs and gradients, the scale it was built with (the model width's) kept, its
    Linears and bias table the original's, with a `num_heads` the head pattern finds."""
    from families import RelativePositionalMultiHeadAttention as Replica

    from ticketsmith.models import GridAttention
    from ticketsmith.structure.heads import attention_heads
    torch.manual_seed(0)
    tv = Replica(16, 4, 4)
    ours = swapped(tv, GridAttention)
    assert ours.scale == 16 ** -0.5
    assert [(a.qkv, a.proj, a.num_heads) for a in attention_heads(nn.Sequential(ours))] == [
        ("0.to_qkv", "0.merge", 4)]
    assert_same_function(tv, ours, [((2, 3, 4, 16),)])


def test_xca_is_swapped_for_one_computing_the_same():
    """timm's XCiT XCA (the replica in families.py) swapped for an XcaAttention: the same
    outputs and gradients on two sequence lengths; its Linears and per-head temperature are
    the original's."""
    from families import XCA

    from ticketsmith.models import XcaAttention
    torch.manual_seed(0)
    timm = XCA(16, 4)
    ours = swapped(timm, XcaAttention)
    assert ours.head_dim == 4
    assert_same_function(timm, ours, [((2, 5, 16),), ((2, 9, 16),)])


def test_twins_locally_grouped_attention_is_swapped_for_one_computing_the_same():
    """Twins' LocallyGroupedAttn (the replica in families.py) swapped for a
    GroupedWindowAttention: the same outputs and gradients on maps that are and are not
    multiples of the window; its Linears are the original's."""
    from families import LocallyGroupedAttn

    from ticketsmith.models import GroupedWindowAttention
    torch.manual_seed(0)
    timm = LocallyGroupedAttn(16, 4, ws=3)
    ours = swapped(timm, GroupedWindowAttention)
    assert (ours.ws, ours.head_dim) == (3, 4)
    assert_same_function(timm, ours, [((2, 36, 16), (6, 6)), ((2, 35, 16), (5, 7))])


@pytest.mark.parametrize("kind,bias,head_first", [
    ("cl", "table", True), ("cl", "tf", False), ("cl", "mlp", True), ("cl", "mlp_swin", True),
    ("cl", None, False), ("2d", "table", True), ("2d", "tf", False), ("2d", "mlp", True)])
def test_maxxvit_attention_is_swapped_for_one_computing_the_same(kind, bias, head_first):
    """timm's MaxViT AttentionCl and CoAtNet Attention2d (the replicas in families.py), with
    each of timm's bias modules or none, swapped for a MaxxVitAttention: the same outputs and
    gradients (a shared bias handed in where it has none); its layers and bias module are the
    original's, the head pattern finds it with timm's layout, and setting `num_heads` (as head
    surgery does) resizes the bias module's output."""
    from functools import partial

    from families import Attention2d, AttentionCl, RelPosBias, RelPosBiasTf, RelPosMlp

    from ticketsmith.compact.heads import cut_heads
    from ticketsmith.masks import copy_module
    from ticketsmith.models import MaxxVitAttention
    from ticketsmith.structure.heads import attention_heads
    torch.manual_seed(0)
    window = (2, 3)
    cls = {"table": RelPosBias, "tf": RelPosBiasTf, "mlp": RelPosMlp,
           "mlp_swin": partial(RelPosMlp, mode="swin")}.get(bias)
    rel_pos = partial(cls, window) if cls else None
    timm = (AttentionCl if kind == "cl" else Attention2d)(16, 4, head_first, rel_pos)
    ours = swapped(timm, MaxxVitAttention)
    assert ours.rel_pos is timm.rel_pos and ours.channels_first == (kind == "2d")
    (att,) = attention_heads(nn.Sequential(ours))
    assert (att.qkv, att.proj, att.num_heads, att.head_dim, att.head_first) == (
        "0.qkv", "0.proj", 4, 4, head_first)
    shape = (3, 2, 3, 16) if kind == "cl" else (3, 16, 2, 3)
    timm.eval(), ours.eval()  # RelPosMlp's MLP has dropout
    if bias is None:
        shared = torch.randn(1, 4, 6, 6)
        assert_same_function(timm, ours, [(shape, shared)])
    else:
        assert_same_function(timm, ours, [(shape,)])
        keep = torch.tensor([0, 2, 3])
        cut = nn.Sequential(copy_module(ours))
        cut_heads(cut[0], attention_heads(cut)[0], keep)
        assert cut[0].num_heads == 3
        with torch.no_grad():
            assert torch.allclose(cut[0].rel_pos.get_bias(), ours.rel_pos.get_bias()[..., keep, :, :])


@pytest.mark.parametrize("cross", [False, True])
def test_class_attention_is_swapped_for_one_computing_the_same(cross):
    """timm's CaiT / XCiT ClassAttn and CrossViT's CrossAttention (the replicas in families.py)
    swapped for a ClassAttention: the same outputs and gradients on two token counts; its
    Linears are the original's, and the head pattern finds its q / k / v Linears."""
    from families import ClassAttn, CrossAttention

    from ticketsmith.models import ClassAttention
    from ticketsmith.structure.heads import attention_heads
    torch.manual_seed(0)
    timm = (CrossAttention if cross else ClassAttn)(16, 4)
    ours = swapped(timm, ClassAttention)
    assert ours.head_dim == 4
    (att,) = attention_heads(nn.Sequential(ours))
    assert [n for n, _ in att.inputs()] == ["0.q", "0.k", "0.v"] and att.proj == "0.proj"
    assert_same_function(timm, ours, [((2, 5, 16),), ((3, 9, 16),)])


def test_levit_attention_is_swapped_for_one_computing_the_same():
    """timm's LeViT Attention (the replica in families.py: LinearNorms for qkv and proj)
    swapped for a LevitAttention: the same outputs and gradients in train and eval mode (the
    norms' batch statistics, then their running ones; the biases cached); its Linears and norms
    are the original's, the head pattern finds them (v wider than q and k, head by head), and
    cutting heads cuts the qkv norm's channels with their rows."""
    from families import LevitAttention as TimmLevitAttention

    from ticketsmith.compact.heads import cut_heads
    from ticketsmith.masks import copy_module
    from ticketsmith.models import LevitAttention
    from ticketsmith.structure.heads import attention_heads
    torch.manual_seed(0)
    timm = TimmLevitAttention(16).train()
    ours = swapped(timm, LevitAttention)
    assert ours.qkv is timm.qkv.linear and ours.qkv_norm is timm.qkv.bn and ours.proj is timm.proj.ln.linear
    (att,) = attention_heads(nn.Sequential(ours))
    assert (att.qkv, att.proj, att.head_dim, att.v_dim, att.head_first) == ("0.qkv", "0.proj", 4, 8, True)
    assert_same_function(timm, ours, [((5, 16, 16),)])
    timm.eval(), ours.eval()
    assert_same_function(timm, ours, [((3, 16, 16),)])
    assert ours.attention_bias_cache  # eval mode: gathered once
    keep = torch.tensor([1, 3])
    cut = nn.Sequential(copy_module(ours))
    cut_heads(cut[0], attention_heads(cut)[0], keep)
    rows = torch.cat([torch.arange(16) + 16 * h for h in keep])  # head by head: 4 + 4 + 8 rows
    assert cut[0].qkv_norm.num_features == 32 and cut[0].val_attn_dim == 16
    assert torch.equal(cut[0].qkv_norm.running_var, ours.qkv_norm.running_var[rows])
    assert torch.equal(cut[0].attention_biases, ours.attention_biases[keep])
    # a head whose v rows are zero is not dead under the norm (its shift is v); zero
    # projection columns make it dead
    from ticketsmith.compact.heads import dead_heads
    model = nn.Sequential(copy_module(ours))
    (att,) = attention_heads(model)
    with torch.no_grad():
        model[0].qkv.weight[8:16] = 0  # head 0's v
        assert not dead_heads(model, att).any()
        model[0].proj.weight[:, 8:16] = 0  # head 1's columns
        assert dead_heads(model, att).tolist() == [False, True, False, False]


def test_levit_attention_downsample_is_swapped_for_one_computing_the_same():
    """timm's LeViT AttentionDownsample (the replica in families.py: q from the subsampled
    tokens, k and v from all, LinearNorms) swapped for a LevitAttentionDownsample: the same
    outputs and gradients in train and eval mode; the head pattern finds `q` and `kv` (k and v
    head by head) with their norms over the rows."""
    from families import AttentionDownsample

    from ticketsmith.models import LevitAttentionDownsample
    from ticketsmith.structure.heads import attention_heads
    torch.manual_seed(0)
    timm = AttentionDownsample(16, 24).train()
    ours = swapped(timm, LevitAttentionDownsample)
    assert ours.q_down is timm.q.down and ours.kv_norm is timm.kv.bn
    assert ours.row_norms == {"q": "q_norm", "kv": "kv_norm"}
    (att,) = attention_heads(nn.Sequential(ours))
    assert [n for n, _ in att.inputs()] == ["0.q", "0.kv"] and att.proj == "0.proj"
    assert (att.head_dim, att.v_dim, att.head_first) == (4, 8, True)
    assert_same_function(timm, ours, [((5, 16, 16),)])
    timm.eval(), ours.eval()
    assert_same_function(timm, ours, [((3, 16, 16),)])
