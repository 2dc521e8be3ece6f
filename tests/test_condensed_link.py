"""Consecutive condensed layers hand their activations over transposed (`CondensedLinear.link`,
`transposed_out`): exact on every batch size and kernel, set only where the output goes through
elementwise operations to another condensed layer, kept by save / load, ignored by ONNX export."""
import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import ticketsmith as ts
from ticketsmith.compact.condensed import CondensedLinear, CondensedSequential
from ticketsmith.errors import UsageError


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def fan_in_mask(out_f: int, in_f: int, k: int, seed: int, ablated=()) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = torch.zeros(out_f, in_f, dtype=torch.bool)
    for r in range(out_f):
        if r not in ablated:
            m[r, torch.randperm(in_f, generator=g)[:k]] = True
    return m


def fan_in_masks(model: nn.Module, dense: tuple[str, ...] = ()) -> dict:
    """Constant fan-in masks at ~85% sparsity for every linear layer (the ones in `dense` at 50%:
    above CONDENSED_MAX_DENSITY, they stay dense layers); some rows ablated."""
    masks = {}
    for i, (name, m) in enumerate((n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)):
        k = m.in_features // 2 if name in dense else max(1, m.in_features // 7)
        masks[f"{name}.weight"] = fan_in_mask(m.out_features, m.in_features, k, seed=i, ablated=(1,))
    return masks


def masked(model: nn.Module, masks: dict) -> nn.Module:
    ref = copy.deepcopy(model).eval()
    with torch.no_grad():
        for key, m in masks.items():
            ref.get_submodule(key.rpartition(".")[0]).weight.mul_(m)
    return ref


def check(small: nn.Module, ref: nn.Module, in_features: int, batches=(1, 3, 64, 130)) -> None:
    with torch.no_grad():
        for b in batches:
            x = torch.randn(b, in_features, generator=torch.Generator().manual_seed(b))
            y = small(x)
            assert y.shape == ref(x).shape and rel_err(y, ref(x)) < 1e-4, b


def handed(model: nn.Module) -> dict[str, bool]:
    return {n: m.transposed_out for n, m in model.named_modules() if isinstance(m, CondensedLinear)}


class FunctionalMLP(nn.Module):
    """The zoo MLP's pattern: a ModuleList and F.relu in a loop."""

    def __init__(self, dims):
        super().__init__()
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:]))
        self.fc = nn.Linear(dims[-1], 3)

    def forward(self, x):
        for layer in self.hidden:
            x = F.relu(layer(x))
        return self.fc(x)


class NotChains(nn.Module):
    """Condensed outputs that must keep the plain layout: read twice (a residual), normalized
    (LayerNorm mixes features), into a dense layer, and a layer called twice."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(40, 40), nn.Linear(40, 40)
        self.norm = nn.LayerNorm(40)
        self.c = nn.Linear(40, 40)
        self.d = nn.Linear(40, 30)          # dense: its mask keeps half the inputs
        self.e = nn.Linear(30, 30)          # called twice

    def forward(self, x):
        h = self.a(x)
        h = F.relu(self.b(h)) + h           # a's output: to b and to the addition
        h = self.c(self.norm(h))            # b's output: through an addition, not elementwise
        h = self.d(torch.relu(h))           # c: into a dense layer
        return self.e(torch.relu(self.e(h)))


@pytest.mark.parametrize("kernel", ["csr", "embedding_bag", "gather", "dense"])
@pytest.mark.parametrize("ablated,bias", [((), True), ((0, 5), True), ((2,), False)])
def test_transposed_out_layer_is_exact_in_both_input_layouts(kernel, ablated, bias):
    torch.manual_seed(0)
    lin = nn.Linear(30, 12, bias=bias)
    mask = fan_in_mask(12, 30, 4, seed=1, ablated=ablated)
    mod = CondensedLinear.from_linear(lin, mask)
    mod.use(kernel)
    mod.transposed_out = True
    mod.bag_tile = 16  # several tiles and a remainder at batch 37
    for b in (1, 2, 37):
        x = torch.randn(b, 30)
        ref = F.linear(x, lin.weight * mask, lin.bias)
        for inp in (x, x.t().contiguous().t()):  # plain, and handed over transposed
            with torch.inference_mode():
                y = mod(inp)
            assert rel_err(y, ref) < 1e-4, (kernel, b)
            if kernel in ("csr", "embedding_bag", "gather"):
                assert y.t().is_contiguous()  # the layout the next condensed layer reads
    assert "transposed_out=True" in repr(mod)
    if bias:
        assert torch.equal(mod.bias, lin.bias)  # the in-place bias add never touches the bias


def test_compact_links_consecutive_condensed_layers(small_executors, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 40),
                          nn.GELU(), nn.Linear(40, 56), nn.ReLU(), nn.Linear(56, 20),
                          nn.Linear(20, 5)).eval()
    masks = fan_in_masks(model, dense=("8",))
    small = ts.compact(model, masks, torch.randn(64, 48), batch_size=64)
    assert handed(small) == {"0": True, "3": True, "5": True, "7": False}
    assert isinstance(small[8], nn.Linear)  # the dense last layer: 7's output stays plain
    assert type(small) is CondensedSequential and small.runs == [(0, 8)]  # tile by tile
    assert small[3].executor == "embedding_bag"
    with torch.no_grad():
        assert small[0](torch.randn(64, 48)).t().is_contiguous()
    rows = {r["layer"]: r for r in ts.compact.describe(small)}
    assert "output handed to '3' transposed" in rows["0"]["reason"]
    assert "handed" not in rows["7"]["reason"]
    ref = masked(model, masks)
    check(small, ref, 48)
    for m in small:  # tiles of 16 columns: three and a remainder at batch 58
        if isinstance(m, CondensedLinear):
            m.bag_tile = 16
    check(small, ref, 48, batches=(58,))
    with torch.enable_grad():  # autograd: the layers one by one, the gradient reaches the input
        x = torch.randn(5, 48, requires_grad=True)
        y = small(x)
        assert y.requires_grad and rel_err(y, ref(x)) < 1e-4
    for kernel in ("csr", "gather", "dense"):  # every kernel mix stays exact
        small[3].use(kernel)
        check(small, ref, 48, batches=(2, 70))
    small[3].use("embedding_bag")
    layer = small[3]
    dense = nn.Linear(layer.in_features, layer.out_features)
    with torch.no_grad():
        dense.weight.copy_(layer.dense_weight())
        dense.bias.copy_(layer.bias)
    small[3] = dense  # a child replaced behind the chain's back: the run goes one by one
    check(small, ref, 48, batches=(70,))
    small[3] = layer
    seen = []  # forward hooks see every layer of the run (ts.bench counts MACs with them)
    handle = small[5].register_forward_hook(lambda m, inp, out: seen.append(tuple(out.shape)))
    check(small, ref, 48, batches=(70,))
    handle.remove()
    assert [s[0] for s in seen] == [70]  # the hook ran, once
    ts.compact.save(small, tmp_path / "m")
    again = ts.compact.load(tmp_path / "m", build=lambda: copy.deepcopy(model))
    assert handed(again) == handed(small)
    assert type(again) is CondensedSequential and again.runs == small.runs
    x = torch.randn(9, 48)
    with torch.no_grad():
        assert torch.equal(again(x), small(x))
    (y,) = ts.compact.run_onnx(ts.compact.export_onnx(small, torch.randn(2, 48), tmp_path / "m.onnx"), x)
    with torch.no_grad():
        assert rel_err(y, ref(x)) < 1e-4


class Nested(nn.Module):
    """A chained nn.Sequential whose last layer hands over outside it, to a condensed head."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 40))
        self.head = nn.Linear(40, 24)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


def test_nested_chain_hands_over_to_a_layer_outside_it(small_executors, monkeypatch):
    torch.manual_seed(0)
    model = Nested().eval()
    masks = fan_in_masks(model)
    small = ts.compact(model, masks, torch.randn(4, 32), batch_size=100)
    assert handed(small) == {"body.0": True, "body.2": True, "head": False}
    assert type(small.body) is CondensedSequential and small.body.runs == [(0, 3)]
    tiles = []
    forward_t = CondensedLinear._forward_t
    monkeypatch.setattr(CondensedLinear, "_forward_t", lambda m, h: tiles.append(h.shape[1]) or forward_t(m, h))
    with torch.no_grad():
        assert small.body(torch.randn(100, 32)).t().is_contiguous()
    assert tiles == [64, 64, 36, 36]  # two layers per tile of 64 columns
    check(small, masked(model, masks), 32)
    d = ts.deploy(small, torch.randn(100, 32), runtime="torch")  # checked against small there
    assert d.check_rel_err < 1e-4
    small.head.transposed_out = True  # stale flags are recomputed: the chain follows them
    assert CondensedLinear.link(small) == {"body.0": "body.2", "body.2": "head"}
    small.body[2].transposed_out = False
    small.body[0].transposed_out = False
    assert CondensedLinear.chain(small) == [] and type(small.body) is nn.Sequential


def test_functional_relu_between_layers_is_linked(small_executors):
    torch.manual_seed(0)
    model = FunctionalMLP([32, 48, 40]).eval()
    masks = fan_in_masks(model, dense=("fc",))
    small = ts.compact(model, masks, torch.randn(4, 32), batch_size=100)
    assert handed(small) == {"hidden.0": True, "hidden.1": False}
    check(small, masked(model, masks), 32)


def test_link_leaves_non_chain_layers_alone(small_executors):
    torch.manual_seed(0)
    model = NotChains().eval()
    masks = fan_in_masks(model, dense=("d",))
    small = ts.compact(model, masks, torch.randn(8, 40), batch_size=64)
    assert isinstance(small.d, nn.Linear)
    assert handed(small) == {"a": False, "b": False, "c": False, "e": False}
    check(small, masked(model, masks), 40)


def test_untraceable_model_keeps_the_plain_layout(small_executors):
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(24, 24), nn.Linear(24, 24)

        def forward(self, x):
            h = F.relu(self.a(x))
            return self.b(h) if float(h.sum()) >= 0 else -self.b(h)  # data-dependent: fx fails

    torch.manual_seed(0)
    model = Branchy().eval()
    masks = fan_in_masks(model)
    small = ts.compact(model, masks, torch.randn(8, 24), batch_size=64)
    assert handed(small) == {"a": False, "b": False}
    assert CondensedLinear.link(small) == {}
    check(small, masked(model, masks), 24)


def test_link_recomputes_the_flags():
    torch.manual_seed(0)
    a = CondensedLinear.from_linear(nn.Linear(16, 16), fan_in_mask(16, 16, 3, seed=0), name="a")
    b = CondensedLinear.from_linear(nn.Linear(16, 8), fan_in_mask(8, 16, 3, seed=1), name="b")
    seq = nn.Sequential(a, nn.ReLU(), b)
    assert CondensedLinear.link(seq) == {"0": "2"} and a.transposed_out and not b.transposed_out
    b.transposed_out = True  # stale: b's output goes to the model's output
    seq2 = nn.Sequential(b)
    assert CondensedLinear.link(seq2) == {} and not b.transposed_out


def test_config_round_trip_and_refusal():
    torch.manual_seed(0)
    mod = CondensedLinear.from_linear(nn.Linear(16, 8), fan_in_mask(8, 16, 3, seed=0))
    mod.transposed_out = True
    config, tensors = mod.to_config(), mod.tensors()
    assert config["transposed_out"] is True
    assert CondensedLinear.from_config(config, tensors).transposed_out
    old = {k: v for k, v in config.items() if k != "transposed_out"}  # saved before the flag
    assert CondensedLinear.from_config(old, tensors).transposed_out is False
    with pytest.raises(UsageError, match="transposed_out must be true or false, got 'yes'"):
        CondensedLinear.from_config(dict(config, transposed_out="yes"), tensors)
