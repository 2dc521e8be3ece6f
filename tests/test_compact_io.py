"""ts.compact.save / load (safetensors + JSON, no pickle) and ONNX export under onnxruntime."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import ticketsmith as ts
from ticketsmith import compact as C
from ticketsmith.errors import ArtifactError, UsageError

from test_compact import (MLP, ZOO, ResCat, kill_rows, masked, random_channel_masks, randomize, rel_err,
                          zoo_model)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models


def compacted(name, width, shape, seed=1):
    model = zoo_model(name, width, shape)
    x = torch.randn(shape)
    return model, C.compact(model, random_channel_masks(model, 0.5, seed=seed), x), x


@pytest.mark.parametrize("name,width,shape", ZOO, ids=[z[0] for z in ZOO])
def test_zoo_round_trip_bit_identical(name, width, shape, tmp_path):
    model, small, x = compacted(name, width, shape)
    desc = C.save(small, tmp_path / "ticket")
    assert desc == tmp_path / "ticket" / "model.json"
    assert (tmp_path / "ticket" / "model.safetensors").exists()
    again = C.load(tmp_path / "ticket")  # zoo model: no build needed
    assert type(again) is type(small) and not again.training
    for (n1, m1), (n2, m2) in zip(small.named_modules(), again.named_modules()):
        assert n1 == n2 and type(m1) is type(m2)
    x2 = torch.randn((3,) + tuple(shape[1:]))
    with torch.no_grad():
        for inp in (x, x2):
            assert torch.equal(small(inp), again(inp))
    assert again.ticketsmith_executors == small.ticketsmith_executors
    assert C.describe(again) == C.describe(small)
    assert again.ticketsmith_name == name


def test_user_model_needs_build_and_the_right_one(tmp_path):
    torch.manual_seed(0)
    model = randomize(ResCat())
    masks: dict = {}
    kill_rows(model, masks, "stem", torch.tensor([2]))
    kill_rows(model, masks, "a", torch.tensor([2]))
    kill_rows(model, masks, "dw", torch.tensor([2]))
    kill_rows(model, masks, "mix", torch.tensor([1, 3]))
    x = torch.randn(2, 3, 8, 8)
    small = C.compact(model, ts.Masks(masks), x)
    path = tmp_path / "rescat.safetensors"  # a file path: the JSON goes beside it
    assert C.save(small, path) == tmp_path / "rescat.json"
    with pytest.raises(UsageError, match="not from the zoo.*build="):
        C.load(path)
    with pytest.raises(UsageError, match="build\\(\\) does not rebuild"):
        C.load(path, build=MLP)
    again = C.load(tmp_path / "rescat.json", build=ResCat)
    assert again.stem.weight.shape[0] == 7 and again.mix.weight.shape[0] == 4
    with torch.no_grad():
        assert torch.equal(again(x), small(x))


class OwnLinear(nn.Linear):
    """A user's subclass of nn.Linear (forward inherited): rebuilt by `build`, resized on load."""


class SigmoidMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = OwnLinear(8, 3, bias=False)

    def forward(self, x):
        return self.fc2(torch.sigmoid(self.fc1(x)))


def test_a_bias_given_by_a_folded_constant_survives_save_and_load(tmp_path):
    """fc1's dead units hold sigmoid(0) everywhere: fc2, a subclass built without a bias, gets
    one; load gives the rebuilt layer that bias back."""
    torch.manual_seed(0)
    model = SigmoidMLP().eval()
    masks: dict = {}
    kill_rows(model, masks, "fc1", torch.tensor([1, 4]))
    x = torch.randn(2, 6)
    small = C.compact(model, ts.Masks(masks), x)
    assert small.fc2.in_features == 6 and small.fc2.bias is not None
    C.save(small, tmp_path / "m")
    again = C.load(tmp_path / "m", build=SigmoidMLP)
    assert type(again.fc2) is OwnLinear
    with torch.no_grad():
        assert torch.equal(again(x), small(x))
        torch.testing.assert_close(again(x), masked(model, masks)(x), atol=1e-6, rtol=1e-5)


def test_corrupt_or_foreign_files_are_refused(tmp_path):
    _, small, _ = compacted("lenet5", 1.0, (2, 1, 28, 28))
    C.save(small, tmp_path / "m")
    w = tmp_path / "m" / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-3] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum"):
        C.load(tmp_path / "m")
    C.save(small, tmp_path / "m")
    d = tmp_path / "m" / "model.json"
    desc = json.loads(d.read_text())
    desc["layers"]["fc1"]["out_features"] += 1
    d.write_text(json.dumps(desc))
    with pytest.raises(ArtifactError, match="do not fit"):
        C.load(tmp_path / "m")
    desc["kind"] = "something else"
    d.write_text(json.dumps(desc))
    with pytest.raises(ArtifactError, match="not a ticketsmith compact"):
        C.load(tmp_path / "m")
    with pytest.raises(UsageError, match="no compact model description"):
        C.load(tmp_path / "nowhere")
    with pytest.raises(UsageError, match="compact\\(\\)"):
        C.save(nn.Linear(2, 2), tmp_path / "x")


@pytest.mark.parametrize("name,width,shape", [z for z in ZOO if z[0] in
                                              ("resnet20", "mobilenet-v1", "lenet5", "vgg11")],
                         ids=["resnet20", "mobilenet-v1", "lenet5", "vgg11"])
def test_onnx_matches_pytorch(name, width, shape, tmp_path):
    _, small, x = compacted(name, width, shape)
    path = C.export_onnx(small, x, tmp_path / f"{name}.onnx")
    session = C.onnx_session(path, threads=1)
    x2 = torch.randn((5,) + tuple(shape[1:]))  # another batch size: the batch axis is dynamic
    with torch.no_grad():
        for inp in (x, x2):
            (y,) = C.run_onnx(session, inp)
            assert rel_err(small(inp), y) < 1e-4


class CausalFlag(nn.Module):
    """A forward with optional arguments after its input, as timm's EVA has (attn_mask=None,
    is_causal=False): torch's exporter must not trace their defaults as inputs."""

    def __init__(self):
        super().__init__()
        self.qkv, self.proj = nn.Linear(8, 24), nn.Linear(8, 8)

    def forward(self, x, attn_mask=None, is_causal: bool = False):
        q, k, v = self.qkv(x).reshape(x.shape[0], x.shape[1], 3, 2, 4).permute(2, 0, 3, 1, 4)
        out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        return self.proj(out.transpose(1, 2).reshape(x.shape))


def test_onnx_export_of_a_forward_with_optional_arguments(tmp_path):
    torch.manual_seed(0)
    model = CausalFlag().eval()
    x = torch.randn(2, 5, 8)
    path = C.export_onnx(model, x, tmp_path / "flag.onnx")
    xb = torch.randn(3, 5, 8)  # another batch, other values
    (y,) = C.run_onnx(path, xb)
    with torch.no_grad():
        assert rel_err(model(xb), y) < 1e-4


def test_onnx_inline_models(tmp_path):
    torch.manual_seed(0)
    model = randomize(MLP())
    masks: dict = {}
    kill_rows(model, masks, "fc1", torch.arange(0, 32, 3))
    x = torch.randn(3, 20)
    small = C.compact(model, ts.Masks(masks), x)
    (y,) = C.run_onnx(C.export_onnx(small, x, tmp_path / "mlp.onnx"), x)
    with torch.no_grad():
        assert rel_err(small(x), y) < 1e-4
    model = randomize(ResCat())
    x = torch.randn(2, 3, 8, 8)
    small = C.compact(model, ts.Masks({}), x)
    (y,) = C.run_onnx(C.export_onnx(small, (x,), tmp_path / "rescat.onnx"), x)
    with torch.no_grad():
        assert rel_err(small(x), y) < 1e-4
    with pytest.raises(UsageError, match="takes 1 inputs"):
        C.run_onnx(tmp_path / "rescat.onnx", x, x)


def structured_masks(model, seed=0):
    """Channel-granular regroup blocks on the convs (a random 97%-sparse mask regrouped) and an
    SRigL-style constant fan-in mask (some neurons ablated) on the linear layers but the head."""
    g = torch.Generator().manual_seed(seed)
    names = ts.prunable_names(model)
    convs = [k for k in names if isinstance(model.get_submodule(k[:-7]), nn.Conv2d)]
    masks = ts.prune.random_masks(model, 0.97, seed=seed)
    if convs:
        masks = ts.regroup(masks, t2=1, b1=1, b2=1, granularity="channel", layers=convs)
    fan_in = {}
    for k in names:
        if k not in convs:
            rows, cols = model.get_submodule(k[:-7]).weight.shape
            m = torch.zeros(rows, cols, dtype=torch.bool)
            for r in range(rows):
                if r % 5 != 1:  # every fifth neuron ablated
                    # (fan-in an eighth of the inputs: under the condensed rule's 20% density
                    # also after surgery takes the inputs that hold a constant, folded)
                    m[r, torch.randperm(cols, generator=g)[: max(1, cols // 8)]] = True
            fan_in[k] = m
    return masks.updated(fan_in)


@pytest.mark.parametrize("name,width,shape", [z for z in ZOO if z[0] in
                                              ("resnet20", "vgg11", "lenet5", "mlp-300-100")],
                         ids=["resnet20", "vgg11", "lenet5", "mlp-300-100"])
def test_zoo_block_and_fan_in_tickets_match_save_load_and_onnx(name, width, shape, tmp_path,
                                                               small_executors):
    # these narrow zoo layers are below the size where the executors pay (the rules keep them
    # dense); small_executors lifts that so the executors go through compact, save and ONNX
    model = zoo_model(name, width, shape)
    masks = structured_masks(model)
    x = torch.randn(shape)
    small = C.compact(model, masks, x)
    assert any(e != "dense" for e in small.ticketsmith_executors.values())
    ref = masked(model, masks)
    x2 = torch.randn((3,) + tuple(shape[1:]))
    C.save(small, tmp_path / "t")
    again = C.load(tmp_path / "t")
    (y,) = C.run_onnx(C.export_onnx(small, x, tmp_path / "t.onnx"), x2)
    with torch.no_grad():
        assert rel_err(ref(x2), small(x2)) < 1e-4
        assert torch.equal(again(x2), small(x2))
        assert rel_err(small(x2), y) < 1e-4

