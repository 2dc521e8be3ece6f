"""ts.deploy: every runtime's artifact equals the masked model on inputs it was not built from;
BatchNorm folding is exact; auto keeps the fastest and says why; a missing runtime is one
clear line."""
import os
import importlib.util
import json

import pytest
import torch
from torch import nn

import ticketsmith as ts
from ticketsmith import compact as C
from ticketsmith import deploy as D
from ticketsmith.cli import main
from test_compact import (MLP, block_masks, constant_fan_in_mask, kill_rows, masked, randomize, rel_err,
                          zoo_model)

FAST = ("torch", "onnxruntime", "openvino")  # torch.compile costs a compile per shape: one test below
needs_openvino = pytest.mark.skipif(importlib.util.find_spec("openvino") is None,
                                    reason="openvino extra not installed")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models


def channel_ticket():
    model = zoo_model("resnet20", 0.5, (2, 1, 16, 16))
    x = torch.randn(2, 1, 16, 16)
    masks = ts.refill(model, ts.prune.omp(model, 0.7), example_inputs=x[:1])
    return model, masks, x


def block_ticket():
    model = zoo_model("vgg11", 0.25, (2, 3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    masks: dict = {}
    kill_rows(model, masks, "features.4", torch.tensor([0, 5, 9]))
    masks, blocks = block_masks(model, "features.8", torch.tensor([1, 2, 3]), masks=masks)
    return model, ts.Masks(masks, blocks), x


def fan_in_ticket():
    torch.manual_seed(0)
    model = randomize(MLP())
    masks = {"fc1.weight": constant_fan_in_mask(32, 20, 4, ablated=(3, 7)),
             # (fan-in 5: under the condensed rule's 20% density once the ablated neuron 0, a
             # constant relu(bias), is folded into fc3)
             "fc2.weight": constant_fan_in_mask(16, 32, 5, ablated=(0,), seed=1)}
    return model, ts.Masks(masks), torch.randn(4, 20)


def heads_ticket():
    """A ViT block whose nn.MultiheadAttention became a QKVAttention: refill drops whole heads,
    compaction removes them (scaled dot-product attention in every runtime)."""
    from families import FAMILIES
    build, shape, _ = FAMILIES["vit_qkv"]
    model = build()
    x = torch.randn(shape)
    return model, ts.refill(model, ts.prune.omp(model, 0.6), example_inputs=x), x


def window_heads_ticket(family="swin_windows"):
    """A small Swin whose window attention became a WindowAttention: heads dropped with their
    columns of the relative position bias (V2: their logit scales and bias MLP rows; cosine
    attention), rolled, padded windows in every runtime."""
    from families import FAMILIES
    build, shape, _ = FAMILIES[family]
    model = build()
    x = torch.randn(shape)
    return model, ts.refill(model, ts.prune.omp(model, 0.6), example_inputs=x), x


TICKETS = {"channel": channel_ticket, "block": block_ticket, "fan-in": fan_in_ticket,
           "heads": heads_ticket, "window-heads": window_heads_ticket,
           "window-heads-v2": lambda: window_heads_ticket("swin_v2_windows"),
           # the swapped timm / torchvision attention: Swin V2's, BEiT's (class token, bias
           # table), EVA-02's (rotary embedding, split GLU MLP), PVT-v2's (q and kv from a
           # reduced map), MaxViT's (windows as groups), timm's MaxViT / CoAtNet (1x1 convs,
           # heads first; the TF one's einsum bias), a user's q / k / v / o Linears, CaiT's class
           # attention, EfficientFormer's (v wider than q and k, heads first, biases cached), LeViT's
           # (a BatchNorm over the qkv rows)
           **{f"window-heads-{f}": (lambda f=f: window_heads_ticket(f))
              for f in ("swin_v2_timm", "beit", "eva_glu", "pvt_attention", "maxvit_attention",
                        "xcit", "twins_local", "maxxvit", "maxxvit_tf", "separate_qkv",
                        "class_attn", "tnt_attention", "efficientformer_attention",
                        "levit_attention", "levit_downsample", "cross_attention")}}


def reference(model, masks):
    return masked(model, {k: masks[k] for k in masks}).eval()


@pytest.mark.parametrize("kind", sorted(TICKETS))
@pytest.mark.parametrize("runtime", FAST)
def test_every_runtime_matches_the_masked_model(kind, runtime, small_executors, tmp_path):
    if D.available(runtime):
        pytest.skip(D.available(runtime))
    model, masks, x = TICKETS[kind]()
    small = C.compact(model, masks, x)
    if kind == "block":
        assert small.ticketsmith_executors["features.8"] != "dense"
    if kind == "fan-in":
        assert small.ticketsmith_executors["fc2"] != "dense"
    if kind == "heads":
        assert small.block.attn.num_heads < model.block.attn.num_heads
    if kind.startswith("window-heads"):
        assert small.ticketsmith_compact["removed_heads"]
    d = D.deploy(small, x, runtime, threads=1, out=tmp_path)
    assert d.runtime == runtime and d.check_rel_err < 1e-4
    ref = reference(model, masks)
    for b in (1, 5):  # neither the example's batch nor its values
        other = torch.randn(b, *x.shape[1:], generator=torch.Generator().manual_seed(100 + b))
        with torch.no_grad():
            assert rel_err(ref(other), d(other)) < 1e-4
    if runtime == "onnxruntime":
        assert (tmp_path / "model.onnx").is_file() and d.artifact == tmp_path / "model.onnx"
    if runtime == "openvino":
        assert (tmp_path / "model.xml").is_file() and (tmp_path / "model.bin").is_file()


def test_torch_compile_matches_the_masked_model(small_executors):
    if D.available("torch.compile"):
        pytest.skip(D.available("torch.compile"))
    model, masks, x = fan_in_ticket()
    small = C.compact(model, masks, x)
    d = D.deploy(small, x, "torch.compile", threads=1, batch_size=4)
    other = torch.randn(4, 20, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert rel_err(reference(model, masks)(other), d(other)) < 1e-4


def test_batchnorm_folding_is_exact_and_leaves_no_batchnorm_behind_a_conv():
    model, masks, x = channel_ticket()
    small = C.compact(model, masks, x)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in small.modules())
    folded, n = D.fold_batchnorm(small)
    assert n == n_bn > 0  # in a ResNet every BatchNorm follows a conv
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    other = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        assert rel_err(small(other), folded(other)) < 1e-5
    # a linear layer followed by BatchNorm1d, and a BN whose input is read twice (not folded)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.bn = nn.Linear(6, 4), nn.BatchNorm1d(4)
            self.fc2, self.bn2 = nn.Linear(4, 4), nn.BatchNorm1d(4)

        def forward(self, x):
            h = self.bn(self.fc(x)).relu()
            z = self.fc2(h)
            return self.bn2(z) + z  # z has two readers: folding bn2 would change the sum
    net = randomize(Net()).eval()
    for bn in (net.bn, net.bn2):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    folded, n = D.fold_batchnorm(net)
    assert n == 1
    xx = torch.randn(5, 6)
    with torch.no_grad():
        assert rel_err(net(xx), folded(xx)) < 1e-5


def test_auto_keeps_the_fastest_and_records_why(monkeypatch):
    model, masks, x = channel_ticket()
    small = C.compact(model, masks, x)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    d = D.deploy(small, x, "auto", threads=1, batch_size=1, candidates=FAST)
    why = d.why
    assert why["chosen"] == d.runtime and why["batch_size"] == 1 and why["threads"] == 1
    timed = {k: v["median_ms"] for k, v in why.items() if isinstance(v, dict) and "median_ms" in v}
    assert set(timed) == {"torch", "onnxruntime"} and d.runtime == min(timed, key=timed.get)
    assert 'pip install "ticketsmith[openvino]"' in why["openvino"]["failed"]  # the fallback, with its reason
    with torch.no_grad():
        other = torch.randn(2, 1, 16, 16)
        assert rel_err(reference(model, masks)(other), d(other)) < 1e-4


def test_a_missing_runtime_is_one_clear_error(monkeypatch, tmp_path, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    with pytest.raises(D.RuntimeUnavailable, match=r'pip install "ticketsmith\[openvino\]"'):
        D.deploy(nn.Linear(3, 2), torch.randn(2, 3), "openvino")
    with pytest.raises(ts.UsageError, match="unknown runtime"):
        D.deploy(nn.Linear(3, 2), torch.randn(2, 3), "tensorrt")
    with pytest.raises(ts.UsageError, match="bf16"):
        D.deploy(nn.Linear(3, 2), torch.randn(2, 3), "onnxruntime", precision="bf16")
    assert main(["bench", "--model", "lenet5", "--masks", str(tmp_path / "m.safetensors"), "--input-shape",
                 "1,28,28", "--runtimes", "torch,openvino"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ticketsmith[openvino]" in err[0]


@needs_openvino
def test_a_model_a_runtime_cannot_take_names_the_op():
    # VGG-11 on 16 px: its last max-pool sees a 1x1 map (torch pools it with ceil_mode); OpenVINO's
    # shape check refuses the op
    model = zoo_model("vgg11", 0.25, (2, 3, 16, 16))
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(D.RuntimeUnavailable, match="runtime 'openvino'.*MaxPool"):
        D.deploy(model, x, "openvino")
    d = D.deploy(model, x, "auto", candidates=("openvino", "onnxruntime"))
    assert d.runtime == "onnxruntime" and "MaxPool" in d.why["openvino"]["failed"]


@needs_openvino
def test_openvino_bf16_is_close():
    model, masks, x = channel_ticket()
    small = C.compact(model, masks, x)
    d = D.deploy(small, x, "openvino", threads=1, precision="bf16")
    other = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        assert rel_err(reference(model, masks)(other), d(other)) < D.CHECK_TOLERANCE["bf16"]
    assert d.details["precision_hint"] == "bf16"


def test_export_cli_writes_a_checked_artifact(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["run", "--model", "lenet5", "--dataset", "digits", "--epochs", "1", "--rounds", "1",
                 "--batch-size", "64", "--structure", "refill", "--out", str(run), "--no-progress"]) == 0
    out = tmp_path / "exp"
    assert main(["export", str(run), "--round", "1", "--runtime", "ort", "--threads", "1", "--out", str(out)]) == 0
    rec = json.loads((out / "deploy.json").read_text())
    assert rec["runtime"] == "onnxruntime" and rec["check_rel_err"] < 1e-4
    (y,) = C.run_onnx(out / "model.onnx", torch.randn(3, 1, 8, 8))
    assert y.shape == (3, 10)
    assert main(["export", str(run), "--round", "1", "--runtime", "torch", "--out", str(tmp_path / "t")]) == 0
    assert (tmp_path / "t" / "ticket").is_dir()
    assert main(["export", str(run), "--round", "7", "--runtime", "ort", "--out", str(tmp_path / "x")]) == 2
    assert "not a finished sparse round" in capsys.readouterr().err


@needs_openvino
def test_ctrl_c_after_an_openvino_deployment_is_a_keyboard_interrupt(tmp_path):
    """OpenVINO's CPU plugin installs an alternate signal stack on the compiling thread and frees
    it with the plugin: without `_own_signal_stack` the next Ctrl-C in the same process (a
    notebook, a test session) was delivered onto freed memory, a segmentation fault."""
    import subprocess
    import sys
    script = (  # a bench across runtimes, as `ticketsmith bench` does it, then a Ctrl-C
        "import os, signal, sys, torch, contextlib, ticketsmith as ts\n"
        "import ticketsmith.deploy as D\n"
        "if sys.argv[1] == 'unguarded': D._own_signal_stack = contextlib.nullcontext\n"
        "from ticketsmith.cli import main\n"
        "base = ['--model', 'lenet5', '--dataset', 'digits', '--epochs', '1', '--no-progress']\n"
        "assert main(['run', *base, '--rounds', '1', '--structure', 'refill', '--out', 'r']) == 0\n"
        "assert main(['bench', 'r', '--batch-sizes', '1', '--pairs', '3', '--no-layerwise',\n"
        "             '--runtimes', 'torch,openvino']) == 0\n"
        "try:\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    import time; time.sleep(1)\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted cleanly')\n")
    p = subprocess.run([sys.executable, "-c", script, "guarded"], capture_output=True, text=True,
                       timeout=300, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0 and "interrupted cleanly" in p.stdout, (p.returncode, p.stderr[-1500:])


@pytest.mark.parametrize("policy, spins", [("PASSIVE", "0"), ("ACTIVE", None), (None, None)])
def test_onnxruntime_waits_passively_when_openmp_is_asked_to(monkeypatch, policy, spins):
    # onnxruntime's pool spins after each run by default; OMP_WAIT_POLICY=PASSIVE (what the
    # benchmarks and the CLI use on a shared machine) turns that off in onnxruntime too
    pytest.importorskip("onnxruntime")
    from ticketsmith.compact.onnx_export import session_options
    if policy is None:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    else:
        monkeypatch.setenv("OMP_WAIT_POLICY", policy)
    opts = session_options(threads=2)
    assert opts.intra_op_num_threads == 2
    try:
        got = opts.get_session_config_entry("session.intra_op.allow_spinning")
    except RuntimeError:  # not set: onnxruntime's default (spinning)
        got = None
    assert got == spins
