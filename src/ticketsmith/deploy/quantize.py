"""Static int8 quantization of a (compact) model, on top of its structure.

    x_cal = ds.normalize(ds.train.x[:256])          # a few hundred real inputs, as in training
    d = ts.deploy(small, example, runtime="onnxruntime", precision="int8", calibration=x_cal)
    ts.deploy.accuracy(d, ds, ds.test)              # what the int8 model costs in accuracy

The compact model is exported to ONNX and quantized by ONNX Runtime's `quantize_static`: QDQ
format (QuantizeLinear/DequantizeLinear pairs around each quantized op, which both ONNX Runtime
and OpenVINO turn into int8 kernels), weights int8 per output channel, activations uint8 per
tensor, activation ranges from the min/max of the calibration inputs (MinMax: on a Fashion-MNIST
VGG-16 ticket percentile calibration gave the same test accuracy to 0.03 points, at 1.6x the
calibration time). OpenVINO runs the same QDQ model (its low-precision transformations keep the
quantized ops in int8).

An int8 model does not equal the fp32 one to 1e-4 as the fp32 runtimes do: `deploy` checks it
on inputs that are not the calibration data but lie in its range (mixes of two calibration
inputs) against `INT8_TOLERANCE` and `INT8_MIN_AGREEMENT`, and the accuracy on real held-out
data is measured, not assumed (`accuracy`; `ticketsmith export --precision int8` reports it).
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..errors import UsageError
from ..io import TMP_SUFFIX

# Largest |int8 logit - fp32 logit| over a check batch, relative to the largest |fp32 logit| of
# the batch. Why 0.35: on the VGG-16 x0.25 Fashion-MNIST ticket (results/, round 5, 89% sparse,
# 256 calibration images) the worst batch of 64 real test images reached 0.30 (median batch
# 0.11; median single image 0.013), while an input outside the calibrated range (standard normal
# noise for a model calibrated on images) gave 0.9-1.2: the bound separates a working
# quantization from a broken one, it is not a promise of closeness for every input (a LeNet-5
# digits ticket, 3 epochs: 0.13 on the 360 test images, 0.48-0.67 on noise). The argmax must
# agree on at least INT8_MIN_AGREEMENT of the check inputs: the VGG-16 ticket agreed on 98.9% of
# the test images and 97-98% of the check inputs, the weakly trained LeNet-5 (85% accurate, small
# logit margins) on 94.7% and 97% of them; inputs outside the calibrated range on 0-75%.
INT8_TOLERANCE = 0.35
INT8_MIN_AGREEMENT = 0.8
# Rows per calibration batch fed to ONNX Runtime's calibrator (a tensor of N rows is split so).
CALIBRATION_BATCH = 32
HOW_TO_CALIBRATE = ("precision 'int8' needs calibration data: pass calibration= a tensor of a few "
                    "hundred real inputs, normalized as in training (or an iterable of such batches); "
                    "ticketsmith export takes them from the run's training set (--calibration-size N)")


def calibration_batches(calibration: Any, example_inputs: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, ...]]:
    """`calibration` as a list of input tuples shaped like `example_inputs` (all but the batch
    dimension). Accepted: a tensor of N inputs (a model of one input; split into batches of
    `CALIBRATION_BATCH`), a tuple of one tensor per model input (one batch), or an iterable
    of batches, each a tensor or a tuple of tensors."""
    if calibration is None:
        raise UsageError(HOW_TO_CALIBRATE)
    k = len(example_inputs)
    if isinstance(calibration, torch.Tensor):
        if k != 1:
            raise UsageError(f"the model takes {k} inputs: give calibration as a tuple of {k} tensors "
                             "or an iterable of such tuples")
        batches = [(calibration[i:i + CALIBRATION_BATCH],) for i in range(0, len(calibration), CALIBRATION_BATCH)]
    elif (isinstance(calibration, tuple) and k > 1 and len(calibration) == k
          and all(isinstance(t, torch.Tensor) for t in calibration)):
        batches = [calibration]
    else:
        try:
            items = list(calibration)
        except TypeError:
            raise UsageError(f"calibration must be a tensor or an iterable of batches, got "
                             f"{type(calibration).__name__}") from None
        batches = [(b,) if isinstance(b, torch.Tensor) else tuple(b) if isinstance(b, (tuple, list)) else b
                   for b in items]
    out = []
    for i, batch in enumerate(batches):
        if not isinstance(batch, tuple) or len(batch) != k or not all(isinstance(t, torch.Tensor) for t in batch):
            raise UsageError(f"calibration batch {i}: expected {k} tensor(s) (one per model input), "
                             f"got {type(batch).__name__}")
        for t, ex in zip(batch, example_inputs):
            if tuple(t.shape[1:]) != tuple(ex.shape[1:]) or t.dtype != ex.dtype:
                raise UsageError(f"calibration batch {i}: inputs of shape {tuple(t.shape)} {t.dtype}; the "
                                 f"model's example is {tuple(ex.shape)} {ex.dtype} (only the batch may differ)")
        if len(batch[0]):
            out.append(tuple(t.detach().cpu().contiguous() for t in batch))
    if not out:
        raise UsageError("calibration data is empty: " + HOW_TO_CALIBRATE)
    return out


def quantize_onnx(fp32_path: Path, batches: Sequence[tuple[torch.Tensor, ...]], out_path: Path,
                  *, per_channel: bool = True) -> tuple[Path, dict]:
    """Quantize the ONNX model at `fp32_path` to int8 (QDQ, per-channel int8 weights, uint8
    activations, MinMax ranges from `batches`) and write it to `out_path`. Returns the path and
    what was done (for the deployment's details)."""
    if importlib.util.find_spec("onnxruntime") is None:
        from . import RuntimeUnavailable
        raise RuntimeUnavailable("int8 quantization needs onnxruntime: pip install onnxruntime")
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                          QuantType, quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    names = [i.name for i in onnx.load(str(fp32_path), load_external_data=False).graph.input]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter([{n: t.numpy() for n, t in zip(names, b)} for b in batches])

        def get_next(self):
            return next(self._it, None)

    # ONNX Runtime's recommended pre-processing (shape inference, graph clean-up) lets it
    # quantize more ops; a model it cannot pre-process is quantized as exported, and the record says so
    pre = out_path.with_name(out_path.stem + ".pre.onnx")
    try:
        quant_pre_process(str(fp32_path), str(pre))
        source, preprocess = pre, "quant_pre_process"
    except Exception as e:
        source, preprocess = fp32_path, f"skipped: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    # written beside the target under a temporary name, then renamed: a failure (a full disk)
    # leaves the previous artifact, never half of one
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}{TMP_SUFFIX}")
    try:
        quantize_static(str(source), str(tmp), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=per_channel, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
        os.replace(tmp, out_path)
    except Exception as e:
        from . import RuntimeUnavailable
        raise RuntimeUnavailable(f"int8 quantization (onnxruntime quantize_static) failed: {type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:300] if str(e) else ''}") from None
    finally:
        pre.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
    quantized = onnx.load(str(out_path), load_external_data=False)
    ops = {}
    for node in quantized.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return out_path, {"format": "QDQ", "weights": "int8, per channel" if per_channel else "int8, per tensor",
                      "activations": "uint8, per tensor", "calibration_method": "MinMax",
                      "calibration_inputs": sum(len(b[0]) for b in batches), "preprocess": preprocess,
                      "quantize_linear_ops": ops.get("QuantizeLinear", 0)}


def check_inputs(batches: Sequence[tuple[torch.Tensor, ...]], n: int, seed: int) -> tuple[torch.Tensor, ...]:
    """`n` inputs in the calibration data's range that are not calibration inputs: for each, a
    random mix l*a + (1-l)*b of two calibration inputs, l in [0.75, 1) (random noise would
    leave the calibrated ranges, where no int8 model is meant to work). Integer inputs (token
    ids) cannot be mixed: they are drawn from the calibration inputs."""
    rows = [torch.cat(ts) for ts in zip(*batches)]
    g = torch.Generator().manual_seed(seed)
    total = len(rows[0])
    a, b = torch.randint(0, total, (n,), generator=g), torch.randint(0, total, (n,), generator=g)
    lam = torch.rand(n, generator=g) * 0.25 + 0.75
    out = []
    for t in rows:
        if t.is_floating_point():
            w = lam.to(t.dtype).view(-1, *([1] * (t.dim() - 1)))
            out.append(w * t[a] + (1 - w) * t[b])
        else:
            out.append(t[a])
    return tuple(out)


def calibration_images(ds, n: int = 256, seed: int = 0) -> torch.Tensor:
    """`n` images of `ds`'s training split (a fixed random choice, every class in proportion),
    normalized as training normalizes them: the calibration data of `ticketsmith export`."""
    total = len(ds.train)
    if not 1 <= n <= total:
        raise UsageError(f"calibration size must be in [1, {total}] (the training images of "
                         f"{ds.name}), got {n}")
    idx = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return ds.normalize(ds.train.x[idx])


def accuracy(model: Callable[..., Any], ds, split=None, batch_size: int = 500) -> float:
    """Top-1 accuracy of `model` (a `Deployment`, or any callable from a batch of normalized
    inputs to logits) on `split` of `ds` (default: the test split), inputs normalized as in
    training (an nn.Module is run in eval mode)."""
    from .. import data as tsdata
    split = ds.test if split is None else split
    if len(split) == 0:
        raise UsageError(f"{ds.name}: the split is empty")
    module = model if isinstance(model, torch.nn.Module) else None
    was_training = module.training if module is not None else False
    if module is not None:
        module.eval()
    correct = 0
    try:
        with torch.inference_mode():
            for x, y in tsdata.batches(ds, split, batch_size, train=False):
                correct += int((model(x).argmax(1) == y).sum())
    finally:
        if module is not None:
            module.train(was_training)
    return correct / len(split)


def precision_cost(deployment, model: torch.nn.Module, example_inputs: Any, ds, *, batch_size: int = 1,
                   threads: int | None = None, pairs: int = 15, split=None) -> dict:
    """What a reduced-precision `deployment` of `model` costs and gains against fp32 in the same
    runtime: top-1 accuracy of both on `split` of `ds` (default: the whole test split) and the
    drop in points; the speed at `batch_size` on real inputs of the split, as the median of
    `pairs` paired, interleaved ratios fp32 time / reduced time (> 1: the reduced one is faster)."""
    from ..bench import calibrate, paired
    from . import deploy
    split = ds.test if split is None else split
    fp32 = deploy(model, example_inputs, deployment.runtime, threads=threads, batch_size=batch_size)
    acc_fp32, acc_low = accuracy(fp32, ds, split), accuracy(deployment, ds, split)
    idx = torch.arange(batch_size) % len(split)
    x = ds.normalize(split.x[idx])
    reps = max(calibrate(lambda: fp32.run(x)), calibrate(lambda: deployment.run(x)))
    r = paired(lambda: fp32.run(x), lambda: deployment.run(x), pairs=pairs, reps=reps)
    low = deployment.precision
    split_name = next((n for n in ("test", "val", "train") if getattr(ds, n) is split), "given")
    return {"accuracy": {"split": split_name, "examples": len(split), "fp32": acc_fp32, low: acc_low,
                         "drop_points": 100 * (acc_fp32 - acc_low)},
            "speed": {"runtime": deployment.runtime, "batch_size": batch_size,
                      "threads": threads if threads is not None else "runtime default",
                      "fp32_ms": r["a_median_s"] * 1e3, f"{low}_ms": r["b_median_s"] * 1e3,
                      "speedup": r["ratio_median"], "speedup_min": r["ratio_min"],
                      "speedup_max": r["ratio_max"], "pairs": pairs}}


__all__ = ["INT8_TOLERANCE", "INT8_MIN_AGREEMENT", "HOW_TO_CALIBRATE", "accuracy", "calibration_batches",
           "calibration_images", "check_inputs", "precision_cost", "quantize_onnx"]
