"""int8 deployment (`precision="int8"`): the quantized artifact of a trained ticket runs, its logits
stay within `INT8_TOLERANCE` of the fp32 compact model on real and mixed inputs that were not
calibrated on, the argmax agrees on most of them, and its test accuracy is measured; without
calibration data, or in a runtime that has no int8 path, it is refused with one clear line."""
import importlib.util
import json

import onnx
import pytest
import torch

import ticketsmith as ts
from ticketsmith import compact as C
from ticketsmith import deploy as D
from ticketsmith.cli import main
from ticketsmith.masks import Masks
from ticketsmith.runs import Run, RunConfig, round_dir

needs_openvino = pytest.mark.skipif(importlib.util.find_spec("openvino") is None,
                                    reason="openvino extra not installed")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models


@pytest.fixture(scope="module")
def ticket(tmp_path_factory):
    """A LeNet-5 channel ticket (refill) trained on the bundled digits: (run, compact model, example)."""
    out = tmp_path_factory.mktemp("int8") / "run"
    torch.set_num_threads(1)
    assert main(["run", "--model", "lenet5", "--dataset", "digits", "--epochs", "3", "--rounds", "1",
                 "--batch-size", "64", "--structure", "refill", "--out", str(out), "--no-progress"]) == 0
    run = Run(RunConfig.read(out), out, progress=False)
    d = round_dir(out, 1)
    x = run.structure_batch(2)[0]
    small = C.compact(run.trained(d), Masks.load(d / "masks.safetensors"), x)
    return run, small.eval(), x


def rel_err(ref: torch.Tensor, got: torch.Tensor) -> float:
    return float((ref - got).abs().max() / ref.abs().max())


@pytest.mark.parametrize("runtime", ["onnxruntime", pytest.param("openvino", marks=needs_openvino)])
def test_int8_logits_are_close_to_the_fp32_compact_model(ticket, runtime, tmp_path):
    run, small, x = ticket
    ds = run.ds
    cal = D.calibration_images(ds, 256)
    d = D.deploy(small, x, runtime, precision="int8", calibration=cal, threads=1, out=tmp_path)
    assert d.precision == "int8" and d.runtime == runtime
    assert d.check_rel_err <= D.INT8_TOLERANCE and d.details["check_argmax_agreement"] >= D.INT8_MIN_AGREEMENT
    # it is quantized: QDQ nodes in the artifact, outputs not those of the fp32 model
    q = onnx.load(str(tmp_path / "model.int8.onnx"))
    assert sum(n.op_type == "QuantizeLinear" for n in q.graph.node) >= 3
    assert d.details["int8"]["calibration_inputs"] == 256
    test_x = ds.normalize(ds.test.x)  # real inputs the calibration never saw
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(0, len(test_x), (64,), generator=g), torch.randint(0, len(test_x), (64,), generator=g)
    lam = torch.rand(64, 1, 1, 1, generator=g) * 0.25 + 0.75
    mixed = lam * test_x[a] + (1 - lam) * test_x[b]  # random inputs in range, not calibration data
    with torch.no_grad():
        for inputs in (test_x[:200], mixed, test_x[7:8]):
            ref, got = small(inputs), d(inputs)
            assert got.shape == ref.shape
            assert rel_err(ref, got) <= D.INT8_TOLERANCE
            assert (ref.argmax(1) == got.argmax(1)).float().mean() >= D.INT8_MIN_AGREEMENT
        assert (small(test_x).argmax(1) == d(test_x).argmax(1)).float().mean() >= 0.9  # measured 0.95-0.99
        assert not torch.equal(small(test_x[:200]), d(test_x[:200]))
    fp32_acc, int8_acc = D.accuracy(small, ds), D.accuracy(d, ds)
    assert fp32_acc > 0.5  # a trained ticket, so that the accuracy comparison means something
    assert abs(fp32_acc - int8_acc) < 0.05
    if runtime == "openvino":
        assert d.artifact == tmp_path / "model.xml" and d.details["precision_hint"] == "f32"
    else:
        assert d.artifact == tmp_path / "model.int8.onnx"


def test_int8_takes_batches_and_auto_keeps_the_precision(ticket):
    run, small, x = ticket
    cal = D.calibration_images(run.ds, 96)
    batches = [cal[i:i + 40] for i in range(0, 96, 40)]  # an iterable of batches, the last one short
    d = D.deploy(small, x, "auto", precision="int8", calibration=batches, threads=1,
                 candidates=("torch", "onnxruntime"))
    assert d.runtime == "onnxruntime" and d.precision == "int8"  # torch has no int8 path: not a candidate
    assert "torch" not in d.why and d.details["int8"]["calibration_inputs"] == 96


def test_int8_without_calibration_is_refused(ticket, tmp_path, capsys):
    run, small, x = ticket
    with pytest.raises(ts.UsageError, match=r"needs calibration data: pass calibration=") as e:
        D.deploy(small, x, "onnxruntime", precision="int8")
    assert "\n" not in str(e.value)
    cal = D.calibration_images(run.ds, 16)
    with pytest.raises(ts.UsageError, match="int8.*'onnxruntime' or 'openvino' only, not 'torch'"):
        D.deploy(small, x, "torch", precision="int8", calibration=cal)
    with pytest.raises(ts.UsageError, match="calibration data is for precision='int8' only"):
        D.deploy(small, x, "onnxruntime", calibration=cal)
    with pytest.raises(ts.UsageError, match=r"calibration batch 0: inputs of shape \(16, 1, 4, 4\)"):
        D.deploy(small, x, "onnxruntime", precision="int8", calibration=cal[:, :, :4, :4])
    with pytest.raises(ts.UsageError, match="calibration size must be in"):
        D.calibration_images(run.ds, 0)
    args = ["export", str(run.out), "--round", "1", "--runtime", "ort", "--precision", "int8"]
    assert main(args + ["--calibration-size", "0", "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--calibration-size must be at least 1" in err[0]
    assert main(["export", str(run.out), "--round", "1", "--runtime", "torch", "--precision", "int8",
                 "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'int8' is offered with runtime" in err[0]


def test_a_missing_int8_runtime_is_one_clear_error(ticket, monkeypatch, tmp_path, capsys):
    run, small, x = ticket
    real = importlib.util.find_spec
    missing = {"onnxruntime", "openvino"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in missing else real(name, *a))
    cal = D.calibration_images(run.ds, 16)
    with pytest.raises(D.RuntimeUnavailable, match="runtime 'onnxruntime' is not installed: pip install onnxruntime"):
        D.deploy(small, x, "onnxruntime", precision="int8", calibration=cal)
    with pytest.raises(D.RuntimeUnavailable, match=r'pip install "ticketsmith\[openvino\]"'):
        D.deploy(small, x, "openvino", precision="int8", calibration=cal, out=tmp_path / "ov")
    assert not (tmp_path / "ov").exists()  # refused before anything was written
    with pytest.raises(D.RuntimeUnavailable, match="not installed"):
        D.deploy(small, x, "auto", precision="int8", calibration=cal)
    assert main(["export", str(run.out), "--round", "1", "--runtime", "openvino", "--precision", "int8",
                 "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ticketsmith[openvino]" in err[0]


def test_export_int8_reports_accuracy_next_to_fp32_and_speed(ticket, tmp_path, capsys):
    run, _, _ = ticket
    out = tmp_path / "exp"
    assert main(["export", str(run.out), "--round", "1", "--runtime", "ort", "--precision", "int8",
                 "--calibration-size", "128", "--threads", "1", "--out", str(out)]) == 0
    rec = json.loads((out / "deploy.json").read_text())
    assert rec["precision"] == "int8" and rec["runtime"] == "onnxruntime"
    assert rec["details"]["int8"]["calibration_inputs"] == 128
    acc = rec["accuracy"]
    assert acc["split"] == "test" and acc["examples"] == len(run.ds.test)
    assert 0.5 < acc["fp32"] <= 1 and abs(acc["fp32"] - acc["int8"]) < 0.05
    assert abs(acc["drop_points"] - 100 * (acc["fp32"] - acc["int8"])) < 1e-9
    speed = rec["speed"]
    assert speed["batch_size"] == 1 and speed["fp32_ms"] > 0 and speed["int8_ms"] > 0
    assert 0 < speed["speedup_min"] <= speed["speedup"] <= speed["speedup_max"]
    printed = capsys.readouterr().out
    assert "test accuracy" in printed and f"{100 * acc['int8']:.2f}%" in printed
    (y,) = C.run_onnx(out / "model.int8.onnx", run.ds.normalize(run.ds.test.x[:3]))
    assert y.shape == (3, 10)
