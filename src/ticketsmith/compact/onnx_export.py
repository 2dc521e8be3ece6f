"""ONNX export of compact models and running them under ONNX Runtime.

Executors switch to an exportable formulation while `torch.onnx.is_in_onnx_export()` is true;
dense layers export as they are. The batch dimension is exported as dynamic by default.
"""
from __future__ import annotations

import inspect
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UsageError
from .channel import as_inputs, flat_tensors


class _InputsOnly(nn.Module):
    """`model` called with the example's inputs only. torch's TorchScript exporter passes the
    defaults of a forward's other parameters as traced inputs: timm's EVA `forward(x,
    attn_mask=None, is_causal=False)` then hands scaled_dot_product_attention a tensor for
    `is_causal`, and the export fails."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *inputs):
        return self.model(*inputs)


def _more_parameters(model: nn.Module, n_inputs: int) -> bool:
    """Whether `model.forward` takes parameters (with defaults) besides `n_inputs` inputs."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return False
    named = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return len(named) > n_inputs


def export_onnx(model: nn.Module, example_inputs: Any, path: str | os.PathLike, *,
                dynamic_batch: bool = True, opset_version: int = 17,
                dynamo: bool = False) -> Path:
    """Export `model` (eval mode) to an ONNX file at `path`, atomically. Inputs are named
    input0, input1, ..., outputs output0, ...; with `dynamic_batch` dimension 0 of every input
    and output may vary. `dynamo=True` uses the torch.export-based exporter (slower to run)
    instead of the TorchScript one."""
    inputs = as_inputs(example_inputs)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    from . import run_model
    n_out = len(flat_tensors(run_model(model, inputs)))
    in_names = [f"input{i}" for i in range(len(inputs))]
    out_names = [f"output{i}" for i in range(n_out)]
    traced = _InputsOnly(model) if not dynamo and _more_parameters(model, len(inputs)) else model
    from ..io import TMP_SUFFIX
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        # nn.MultiheadAttention / TransformerEncoderLayer in eval mode without autograd call
        # torch's fused kernels (aten::_native_multi_head_attention), which have no ONNX
        # symbolic: exported, they take their decomposed path (the same function)
        torch.backends.mha.set_fastpath_enabled(False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if dynamo:
                dyn = None
                if dynamic_batch:
                    batch = torch.export.Dim("batch")
                    dyn = tuple({0: batch} for _ in inputs)
                torch.onnx.export(model, inputs, tmp, dynamo=True, input_names=in_names,
                                  output_names=out_names, dynamic_shapes=dyn,
                                  opset_version=max(opset_version, 18), verbose=False)
            else:
                axes = ({n: {0: "batch"} for n in in_names + out_names} if dynamic_batch
                        else None)
                torch.onnx.export(traced, inputs, tmp, dynamo=False, input_names=in_names,
                                  output_names=out_names, dynamic_axes=axes,
                                  opset_version=opset_version)
        from ..io import file_mode
        file_mode(tmp)  # torch.onnx.export may have recreated the file
        os.replace(tmp, path)
    except Exception as e:
        raise UsageError(f"ONNX export of {type(model).__name__} failed: "
                         f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                         ) from None
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        if os.path.exists(tmp):
            os.unlink(tmp)
        model.train(was_training)
    return path


def session_options(threads: int | None = None):
    """onnxruntime SessionOptions: `threads` intra-op threads (one inter-op thread), and with
    OMP_WAIT_POLICY=PASSIVE (the user asked threads not to spin-wait) no spinning in
    onnxruntime's own thread pool either. Its threads spin after every run by default: on a
    loaded machine, or with two sessions taking turns (a paired benchmark), the spinning
    threads hold the cores the next run needs; measured on 2 cores, 2 threads, a compact
    ResNet-18 ran 2x slower after a dense run than alone (benchmarks/results/
    channel_tickets_runtimes.md)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE":
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return opts


def onnx_session(path: str | os.PathLike, threads: int | None = None):
    """An onnxruntime InferenceSession (CPU) for an exported model (`session_options`)."""
    import onnxruntime as ort

    if not Path(path).exists():
        raise UsageError(f"{path}: no such ONNX file")
    return ort.InferenceSession(str(path), sess_options=session_options(threads),
                                providers=["CPUExecutionProvider"])


def run_onnx(session_or_path, *inputs: torch.Tensor) -> list[torch.Tensor]:
    """Run an exported model (a session or a path) on tensors; returns its outputs as tensors."""
    session = session_or_path if hasattr(session_or_path, "run") else onnx_session(session_or_path)
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(inputs):
        raise UsageError(f"the ONNX model takes {len(names)} inputs, got {len(inputs)}")
    feed = {n: t.detach().cpu().contiguous().numpy() for n, t in zip(names, inputs)}
    return [torch.from_numpy(o) for o in session.run(None, feed)]
