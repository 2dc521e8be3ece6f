"""Deployment: run a (compact) model in the runtime where it is fastest.

    small = ts.compact.compact(model, masks, example)
    d = ts.deploy.deploy(small, example, runtime="auto", batch_size=64, threads=1)
    y = d(x)                      # a torch.Tensor, computed by d.runtime
    d.runtime, d.why              # which runtime won, and every candidate's median time
    ts.deploy.deploy(small, example, runtime="openvino", out="ticket_ov/")   # an artifact too

Runtimes (`RUNTIMES`): "torch" (eager, in the faster memory format for the batch size),
"torch.compile" (inductor, CPU; needs a C++ compiler), "onnxruntime" and "openvino" (both run
the ONNX export of the model; OpenVINO is the optional extra `ticketsmith[openvino]`). The same
compact model ran 2.7-6.1x faster under ONNX Runtime / OpenVINO than in eager PyTorch at batch 1
on this project's CPU (issue 15's measurements): eager's per-op dispatch dominates small layers.

Before a deployment is returned it is checked against the model it was built from on random
inputs of another batch size than the example (fp32: `CHECK_TOLERANCE`, relative to the largest
output magnitude; int8, `precision="int8", calibration=...`: `quantize.INT8_TOLERANCE` and argmax
agreement on inputs in the calibration data's range, see `ticketsmith.deploy.quantize`); a runtime that cannot take the model is a `RuntimeUnavailable` error naming
the runtime and the reason, and `runtime="auto"` records it in `why` and goes on with the rest.
"""
from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..errors import TicketsmithError, UsageError
from ..io import TMP_SUFFIX
from ..masks import copy_module
from .quantize import (INT8_MIN_AGREEMENT, INT8_TOLERANCE, accuracy, calibration_batches, calibration_images,
                       check_inputs, precision_cost, quantize_onnx)

RUNTIMES = ("torch", "torch.compile", "onnxruntime", "openvino")
# The import each runtime needs and how a user gets it (the message of a missing runtime).
_NEEDS = {"onnxruntime": ("onnxruntime", 'pip install onnxruntime'),
          "openvino": ("openvino", 'pip install "ticketsmith[openvino]"')}
# fp32 runtimes reorder sums (Winograd, blocked GEMMs): agreement to 1e-4 of the output scale
# is what the issue asks for; bf16 keeps ~3 significant digits per operation; int8's bound and
# why it is so loose are in quantize.py (it is checked on in-range inputs, with argmax agreement).
CHECK_TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2, "int8": INT8_TOLERANCE}
PRECISIONS = ("fp32", "bf16", "int8")
# the runtimes that run a QDQ int8 ONNX model (torch's own int8 paths are not offered)
INT8_RUNTIMES = ("onnxruntime", "openvino")


class RuntimeUnavailable(UsageError):
    """The runtime is not installed, or cannot take this model (the message says which)."""


def available(runtime: str) -> str | None:
    """None if `runtime` can run here, else the reason it cannot (with how to install it)."""
    if runtime not in RUNTIMES:
        raise UsageError(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)} or auto")
    if runtime in _NEEDS:
        mod, how = _NEEDS[runtime]
        if importlib.util.find_spec(mod) is None:
            return f"runtime {runtime!r} is not installed: {how}"
    if runtime == "torch.compile" and not (shutil.which("c++") or shutil.which("g++")
                                           or shutil.which("clang++")):
        return "runtime 'torch.compile' needs a C++ compiler on PATH (inductor compiles C++ for the CPU)"
    return None


def available_runtimes() -> list[str]:
    """The runtimes that can run on this machine, in `RUNTIMES` order."""
    return [r for r in RUNTIMES if available(r) is None]


# -- BatchNorm folding -----------------------------------------------------------------------------
def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, int]:
    """A copy of `model` (eval mode) in which every BatchNorm that directly follows a Conv or
    Linear layer, as that layer's only reader, is folded into its weight and bias (exact up to
    float rounding: y = gamma * (Wx + b - mean) / sqrt(var + eps) + beta). Returns (model,
    number of BatchNorms folded); a model torch.fx cannot trace, or with nothing to fold, comes
    back as it was (0).

    Folding saves a pass over each activation, and lets every runtime see conv+bias+activation
    (1.27-1.39x on 75% channel tickets at batch 1 in eager PyTorch)."""
    import torch.fx as fx
    from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

    from ..compact.condensed import CondensedSequential
    from ..models.attention import QKVAttention, WindowAttention
    from ..models.zoo_attention import SWAPPED

    model = copy_module(model).eval()

    class Tracer(fx.Tracer):  # executors stay opaque: their internals are not conv + BN; so do
        def is_leaf_module(self, m, name):  # condensed chains (traced through: run unchained)
            return (hasattr(m, "executor")  # attention: branches on shapes fx can't trace
                    or isinstance(m, (CondensedSequential, QKVAttention, WindowAttention, *SWAPPED))
                    or super().is_leaf_module(m, name))

    try:
        graph = Tracer().trace(model)
    except Exception:
        return model, 0
    gm = fx.GraphModule(model, graph, type(model).__name__)
    mods = dict(gm.named_modules())
    folded = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(mods.get(node.target), nn.modules.batchnorm._BatchNorm):
            continue
        prev = node.args[0] if node.args else None
        if not isinstance(prev, fx.Node) or prev.op != "call_module" or len(prev.users) != 1:
            continue
        layer, bn = mods[prev.target], mods[node.target]
        if not bn.track_running_stats or bn.running_mean is None:
            continue
        if type(layer) in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
            fused = fuse_conv_bn_eval(layer, bn)
        elif type(layer) is nn.Linear and isinstance(bn, nn.BatchNorm1d):
            fused = fuse_linear_bn_eval(layer, bn)
        else:
            continue
        parent, _, attr = prev.target.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, attr, fused)
        mods[prev.target] = fused
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)
        folded += 1
    if not folded:  # the copy as it was: the traced graph would only repackage it (and run a
        return model, 0  # condensed chain at the model's root unchained)
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()  # the folded BatchNorms
    gm.ticketsmith_executors = dict(getattr(model, "ticketsmith_executors", {}))
    return gm, folded


# -- deployments -----------------------------------------------------------------------------------
@dataclass
class Deployment:
    """A model ready to run in one runtime: call it with tensors, get tensors back."""
    runtime: str
    run: Callable[..., list[torch.Tensor]] = field(repr=False)
    threads: int | None = None
    precision: str = "fp32"
    artifact: Path | None = None
    details: dict = field(default_factory=dict)  # memory format, BatchNorms folded, ...
    why: dict = field(default_factory=dict)      # runtime="auto": every candidate's time or failure
    check_rel_err: float | None = None
    _tmp: Any = field(default=None, repr=False)  # keeps a temporary artifact folder alive

    def __call__(self, *inputs: torch.Tensor):
        outs = self.run(*inputs)
        return outs[0] if len(outs) == 1 else outs


def _as_inputs(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    from ..compact.channel import as_inputs
    inputs = as_inputs(example_inputs)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise UsageError("example_inputs must be a tensor or a tuple of tensors")
    return tuple(t.detach().cpu() for t in inputs)


def _resized(inputs: Sequence[torch.Tensor], batch: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Random inputs like `inputs` with `batch` rows (integer inputs keep their value range)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in inputs:
        shape = (batch, *t.shape[1:])
        if t.is_floating_point():
            out.append(torch.randn(shape, generator=g, dtype=t.dtype))
        else:
            hi = int(t.max()) + 1 if t.numel() else 2
            out.append(torch.randint(0, max(hi, 1), shape, generator=g, dtype=t.dtype))
    return tuple(out)


def _torch_outputs(model: nn.Module, inputs) -> list[torch.Tensor]:
    from ..compact.channel import flat_tensors
    with torch.inference_mode():
        return flat_tensors(model(*inputs))


def _with_threads(threads: int | None, fn: Callable) -> Callable:
    if threads is None:
        return fn

    def run(*a):
        old = torch.get_num_threads()
        if old != threads:
            torch.set_num_threads(threads)
        try:
            return fn(*a)
        finally:
            if old != threads:
                torch.set_num_threads(old)
    return run


def _deploy_torch(model, inputs, batch, threads, compiled: bool) -> tuple[Callable, dict]:
    from ..bench import fastest_format
    x = _resized(inputs, batch, 1)
    channels_last = False
    if len(x) == 1 and x[0].dim() == 4:
        old = torch.get_num_threads()
        torch.set_num_threads(threads or old)
        try:
            channels_last, _ = fastest_format(model, x[0], pairs=3)
        finally:
            torch.set_num_threads(old)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    details = {"memory_format": "channels_last" if channels_last else "nchw"}
    fn = model
    if compiled:
        from torch import _dynamo
        _dynamo.reset()  # a fresh cache: another model's graphs must not be reused
        fn = torch.compile(model, backend="inductor", dynamic=False)
        details["compile"] = "inductor"

    def run(*xs):
        if channels_last:
            xs = tuple(t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t for t in xs)
        return _torch_outputs(fn, xs)
    run = _with_threads(threads, run)
    if compiled:  # compile now, not in the caller's first timed call
        try:
            run(*x)
        except Exception as e:
            raise RuntimeUnavailable(f"runtime 'torch.compile' cannot compile {type(model).__name__}: "
                                     f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}") from None
    return run, details


def _onnx_file(model, inputs, folder: Path) -> Path:
    from ..compact.onnx_export import export_onnx
    try:
        return export_onnx(model, inputs, folder / "model.onnx")
    except UsageError as e:
        raise RuntimeUnavailable(f"{e} (ONNX export is the way into onnxruntime / openvino)") from None


def _deploy_ort(model, inputs, threads, folder: Path, onnx_path: Path | None = None) -> tuple[Callable, dict, Path]:
    import onnxruntime as ort

    from ..compact.onnx_export import session_options
    path = onnx_path or _onnx_file(model, inputs, folder)
    opts = session_options(threads)
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise RuntimeUnavailable(f"runtime 'onnxruntime' cannot load the model: {str(e).splitlines()[0][:300]}") from None
    names = [i.name for i in sess.get_inputs()]

    def run(*xs):
        feed = {n: t.detach().contiguous().numpy() for n, t in zip(names, xs)}
        return [torch.from_numpy(o) for o in sess.run(None, feed)]
    return run, {"onnx_opset": 17}, path


def _deploy_openvino(model, inputs, threads, precision, folder: Path,
                     onnx_path: Path | None = None) -> tuple[Callable, dict, Path]:
    import openvino as ov
    onnx_path = onnx_path or _onnx_file(model, inputs, folder)
    folder.mkdir(parents=True, exist_ok=True)
    core = ov.Core()
    # int8: the QDQ graph decides what runs in int8; the rest stays f32 (never bf16 unasked)
    config = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
              "PERFORMANCE_HINT": "LATENCY"}
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = threads
    try:
        ov_model = core.read_model(str(onnx_path))
        xml = folder / "model.xml"
        # into a temporary folder beside it, then renamed file by file: a failure (a full disk)
        # leaves the previous model.xml / model.bin, never half of one
        staging = Path(tempfile.mkdtemp(prefix=".openvino.", suffix=TMP_SUFFIX, dir=folder))
        try:
            ov.save_model(ov_model, str(staging / xml.name), compress_to_fp16=False)
            for f in sorted(staging.iterdir(), key=lambda f: f.suffix != ".bin"):  # weights first
                os.replace(f, folder / f.name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        with _own_signal_stack():
            compiled = core.compile_model(ov_model, "CPU", config)
    except Exception as e:
        raise RuntimeUnavailable(f"runtime 'openvino' cannot take the model: {_openvino_reason(e)}") from None
    request = compiled.create_infer_request()
    n_out = len(compiled.outputs)

    def run(*xs):
        request.infer([t.detach().contiguous().numpy() for t in xs])
        return [torch.from_numpy(request.get_output_tensor(i).data.copy()) for i in range(n_out)]
    details = {"precision_hint": config["INFERENCE_PRECISION_HINT"],
               "cpu_precisions": list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))}
    return run, details, xml


class _SignalStack(ctypes.Structure):  # Linux stack_t
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


@contextlib.contextmanager
def _own_signal_stack():
    """Keep the calling thread's alternate signal stack as it was. OpenVINO's CPU plugin installs
    one on the thread that first compiles a model and frees it with the plugin while it is
    still installed: the next signal (Ctrl-C, SIGTERM) is then delivered onto freed memory and
    the process dies with a segmentation fault (seen after `ticketsmith bench` in one process).
    Measured: the plugin sets it once per thread, at compile time, and runs without it."""
    libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
    before = _SignalStack()
    if libc is None or libc.sigaltstack(None, ctypes.byref(before)) != 0:
        yield
        return
    try:
        yield
    finally:
        now = _SignalStack()
        libc.sigaltstack(None, ctypes.byref(now))
        if (now.ss_sp, now.ss_flags, now.ss_size) != (before.ss_sp, before.ss_flags, before.ss_size):
            libc.sigaltstack(ctypes.byref(before), None)


def _openvino_reason(e: Exception) -> str:
    """The line of an OpenVINO conversion error that names the failing op (its messages start
    with a C++ source location)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    failed = [ln.lstrip("- ") for ln in lines if "Conversion is failed for" in ln]
    detail = next((ln for ln in lines if ln.startswith("While validating ONNX node")), None)
    if failed:
        return failed[0] + (f" ({detail[:200]})" if detail else "")
    return (lines[-1] if lines else type(e).__name__)[:300]


def _build(runtime: str, model: nn.Module, inputs, batch: int, threads, precision: str,
           folder: Path, onnx_path: Path | None = None) -> Deployment:
    """`model` in `runtime`; `onnx_path`: an ONNX file to run instead of exporting `model`
    (the int8 model, quantized once for every candidate runtime)."""
    reason = available(runtime)
    if reason:
        raise RuntimeUnavailable(reason)
    check_precision(runtime, precision)
    artifact = None
    if runtime in ("torch", "torch.compile"):
        run, details = _deploy_torch(model, inputs, batch, threads, runtime == "torch.compile")
    elif runtime == "onnxruntime":
        run, details, artifact = _deploy_ort(model, inputs, threads, folder, onnx_path)
    else:
        run, details, artifact = _deploy_openvino(model, inputs, threads, precision, folder, onnx_path)
    return Deployment(runtime, run, threads, precision, artifact, details)


def check_precision(runtime: str, precision: str) -> None:
    """A UsageError unless `runtime` offers `precision` (bf16: openvino; int8: `INT8_RUNTIMES`)."""
    if precision == "bf16" and runtime != "openvino":
        raise UsageError(f"precision 'bf16' is offered with runtime 'openvino' only, not {runtime!r}")
    if precision == "int8" and runtime not in INT8_RUNTIMES:
        raise UsageError(f"precision 'int8' is offered with runtime {' or '.join(map(repr, INT8_RUNTIMES))} "
                         f"only, not {runtime!r}")


def _check(d: Deployment, reference: nn.Module, inputs, batch: int, calibration=None) -> None:
    """The deployment against the reference model on inputs it was not built from (int8: inputs
    in the calibration data's range that are not calibration inputs, and the argmax agreement)."""
    agree = total = 0
    for b, seed in ((max(1, batch + 1), 11), (1, 12)):
        if d.precision == "int8":  # enough inputs for the agreement to mean something
            x = check_inputs(calibration, max(b, 64) if b > 1 else 1, seed)
        else:
            x = _resized(inputs, b, seed)
        ref = _torch_outputs(reference, x)
        try:
            got = d.run(*x)
        except Exception as e:
            raise RuntimeUnavailable(f"runtime {d.runtime!r} failed on inputs of batch {b}: "
                                     f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}") from None
        err = 0.0
        for r, g in zip(ref, got):
            if r.shape != g.shape:
                raise TicketsmithError(f"runtime {d.runtime!r} returned shape {tuple(g.shape)}, "
                                       f"the model {tuple(r.shape)}: a bug, please report it")
            scale = float(r.abs().max()) if r.numel() else 0.0
            err = max(err, float((r.float() - g.float()).abs().max()) / max(scale, 1e-12) if r.numel() else 0.0)
        if d.precision == "int8":
            if err > CHECK_TOLERANCE["int8"]:
                raise TicketsmithError(f"the int8 model in {d.runtime!r} deviates from the fp32 model by {err:.2f} "
                                       f"of the output scale on inputs in the calibration range (allowed "
                                       f"{CHECK_TOLERANCE['int8']}): calibrate on more, and more representative, "
                                       "inputs, or deploy in fp32")
            if ref[0].dim() == 2:  # logits: rows are inputs
                agree += int((ref[0].argmax(1) == got[0].argmax(1)).sum())
                total += ref[0].shape[0]
        elif err > CHECK_TOLERANCE[d.precision]:
            raise TicketsmithError(f"runtime {d.runtime!r} deviates from the model by {err:.2e} of the "
                                   f"output scale at batch {b} (allowed {CHECK_TOLERANCE[d.precision]:.0e}): "
                                   "a bug, please report it")
        d.check_rel_err = max(d.check_rel_err or 0.0, err)
    if total:
        d.details["check_argmax_agreement"] = agree / total
        if agree / total < INT8_MIN_AGREEMENT:
            raise TicketsmithError(f"the int8 model in {d.runtime!r} picks the fp32 model's class on only "
                                   f"{agree / total:.0%} of {total} inputs in the calibration range (at least "
                                   f"{INT8_MIN_AGREEMENT:.0%} expected): calibrate on more, and more "
                                   "representative, inputs, or deploy in fp32")


def interleaved_times(calls: dict[str, Callable[[], Any]], rounds: int = 7,
                      burst_s: float = 0.02) -> dict[str, list[float]]:
    """Seconds per call of each candidate in each of `rounds` round-robin rounds (A B C A B C
    ...), in bursts of about `burst_s`, so that the machine's drift hits every candidate alike."""
    from ..bench import calibrate
    reps = {k: calibrate(f, burst_s) for k, f in calls.items()}
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(rounds):
        for k, f in calls.items():
            t0 = time.perf_counter()
            for _ in range(reps[k]):
                f()
            times[k].append((time.perf_counter() - t0) / reps[k])
    return times


def time_interleaved(calls: dict[str, Callable[[], Any]], rounds: int = 7,
                     burst_s: float = 0.02) -> dict[str, float]:
    """Median seconds per call of each candidate, timed by `interleaved_times`."""
    return {k: statistics.median(v) for k, v in interleaved_times(calls, rounds, burst_s).items()}


def deploy(model: nn.Module, example_inputs: Any, runtime: str = "auto", *,
           threads: int | None = None, batch_size: int | None = None, out: str | os.PathLike | None = None,
           fold_bn: bool = True, precision: str = "fp32", candidates: Sequence[str] | None = None,
           rounds: int = 7, calibration: Any = None) -> Deployment:
    """`model` (a compact ticket, or any model) as a `Deployment` in `runtime`.

    `runtime`: one of `RUNTIMES`, or "auto": build every available candidate (`candidates`,
    default all available), time them on random inputs of `batch_size` (default: the example's)
    with `threads`, and keep the fastest; `d.why` records each candidate's median milliseconds or
    why it could not run. `threads`: the runtime's intra-op threads (default: torch's current
    count for torch, the runtime's own default otherwise). `out`: a folder for the artifact
    (`model.onnx` for onnxruntime, `model.xml`/`.bin` OpenVINO IR for openvino; torch runtimes
    have none: save the compact model with `ts.compact.save`). `fold_bn`: fold BatchNorms into
    the preceding layers first (`fold_batchnorm`). `precision`: "fp32", "bf16" (openvino only;
    the CPU's bf16 units where it has them, checked to 5e-2) or "int8" (onnxruntime or openvino:
    static quantization calibrated on `calibration`, real inputs normalized as in training: a
    tensor of N inputs or an iterable of batches; the artifact is `model.int8.onnx` (QDQ) next to
    the fp32 `model.onnx`, or OpenVINO IR of it; see `ticketsmith.deploy.quantize`). "auto" only
    chooses among runtimes offering `precision`; it never changes the precision."""
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    if precision != "int8" and calibration is not None:
        raise UsageError(f"calibration data is for precision='int8' only (precision is {precision!r})")
    if runtime != "auto":
        if runtime not in RUNTIMES:
            available(runtime)  # the unknown-runtime error
        check_precision(runtime, precision)
    if threads is not None and threads < 1:
        raise UsageError(f"threads must be at least 1, got {threads}")
    inputs = _as_inputs(example_inputs)
    batches = calibration_batches(calibration, inputs) if precision == "int8" else None
    if precision == "int8":  # before anything is written: can any runtime asked for run int8?
        wanted = [runtime] if runtime != "auto" else list(candidates) if candidates is not None else list(RUNTIMES)
        if not any(available(n) is None for n in wanted if n in INT8_RUNTIMES):
            reason = next((available(n) for n in wanted if n in INT8_RUNTIMES), None)
            raise RuntimeUnavailable(reason or "precision 'int8' needs runtime onnxruntime or openvino")
    if batch_size is None:
        batch_size = int(inputs[0].shape[0]) if inputs[0].dim() else 1
    batch = int(batch_size)
    if batch < 1:
        raise UsageError(f"batch_size must be at least 1, got {batch}")
    reference = copy_module(model).eval()
    folded_model, folded = fold_batchnorm(reference) if fold_bn else (reference, 0)
    if out is not None:
        folder, tmp = Path(out), None
        if folder.exists() and not folder.is_dir():
            raise UsageError(f"{folder} is a file, not a directory")
        folder.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="ticketsmith-deploy-")
        folder = Path(tmp.name)

    int8_onnx, int8_details = None, {}
    if precision == "int8":  # quantized once, in the artifact's folder, for every candidate runtime
        int8_onnx, int8_details = quantize_onnx(_onnx_file(folded_model, inputs, folder), batches,
                                                folder / "model.int8.onnx")

    def build(rt: str, where: Path) -> Deployment:
        d = _build(rt, folded_model, inputs, batch, threads, precision, where, int8_onnx)
        d.details["batchnorms_folded"] = folded
        if int8_onnx is not None:
            d.details["int8"] = dict(int8_details, onnx=str(int8_onnx))
        _check(d, reference, inputs, batch, batches)
        return d

    if runtime != "auto":
        d = build(runtime, folder)
        d._tmp = tmp
        return d
    names = list(candidates) if candidates is not None else available_runtimes()
    if precision == "bf16":  # auto picks a runtime, never another precision
        names = [n for n in names if n == "openvino"]
    elif precision == "int8":
        names = [n for n in names if n in INT8_RUNTIMES]
    why: dict[str, Any] = {}
    built: dict[str, Deployment] = {}
    scratch = tempfile.TemporaryDirectory(prefix="ticketsmith-auto-")
    for rt in names:
        try:
            built[rt] = build(rt, Path(scratch.name) / rt.replace(".", "_"))
        except (UsageError, TicketsmithError) as e:
            why[rt] = {"failed": str(e)}
    if not built:
        raise RuntimeUnavailable("no runtime could run the model: " +
                                 "; ".join(f"{k}: {v['failed']}" for k, v in why.items()))
    x = _resized(inputs, batch, 2)
    medians = time_interleaved({rt: (lambda d=d: d.run(*x)) for rt, d in built.items()}, rounds)
    for rt, s in medians.items():
        why[rt] = {"median_ms": s * 1e3}
    best = min(medians, key=medians.get)
    why["chosen"] = best
    why["batch_size"] = batch
    why["threads"] = threads if threads is not None else torch.get_num_threads()
    # the winner once more, into the user's folder (or a kept temporary one)
    d = build(best, folder) if best in ("onnxruntime", "openvino") else built[best]
    d.why = why
    d._tmp = tmp
    scratch.cleanup()
    return d


__all__ = ["RUNTIMES", "PRECISIONS", "CHECK_TOLERANCE", "INT8_RUNTIMES", "INT8_TOLERANCE", "INT8_MIN_AGREEMENT",
           "Deployment", "RuntimeUnavailable", "accuracy", "available", "available_runtimes",
           "calibration_images", "check_precision", "deploy", "fold_batchnorm", "precision_cost",
           "time_interleaved"]


class _CallableModule(type(importlib)):
    """`ts.deploy(small, example_inputs, runtime=...)` as the issue spells it, while
    `ts.deploy` stays the subpackage (`ts.deploy.fold_batchnorm`, `ts.deploy.RUNTIMES`, ...)."""

    def __call__(self, model: nn.Module, example_inputs: Any, runtime: str = "auto", **kwargs: Any) -> Deployment:
        return deploy(model, example_inputs, runtime, **kwargs)


import sys as _sys  # noqa: E402

_sys.modules[__name__].__class__ = _CallableModule
