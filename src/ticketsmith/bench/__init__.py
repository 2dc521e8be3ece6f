"""Honest speed measurement: dense vs compact, paired and interleaved.

This machine's speed drifts by 30-50% within an hour, so a single absolute time is not
evidence. Every comparison alternates the two variants in short bursts (A B A B ...), takes
the ratio of each pair, and reports the median ratio with its min-max. The dense baseline is
the fastest dense path a user could pick (oneDNN convolution, channels_last when it is faster
for that batch); the compact model gets the same choice. Ideal speedup = ratio of
multiply-accumulates (MACs) actually needed; realized / ideal says how much of it we get.
"""
from __future__ import annotations

import copy
import math
import os
import platform
import statistics
import sys
import time
from typing import Callable, Sequence

import torch
from torch import nn

LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def machine() -> dict:
    """What the figures were measured on."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "command": os.environ.get("TICKETSMITH_COMMAND") or " ".join(sys.argv),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}


def paired(fa: Callable[[], object], fb: Callable[[], object], pairs: int = 20,
           reps: int = 1) -> dict:
    """Run A then B, `pairs` times, each `reps` times in a burst; ratio = time(A) / time(B)
    per pair (> 1: B is faster). Returns the median, min and max ratio and median times."""
    ta, tb = [], []
    for _ in range(pairs):
        t0 = time.perf_counter()
        for _ in range(reps):
            fa()
        t1 = time.perf_counter()
        for _ in range(reps):
            fb()
        t2 = time.perf_counter()
        ta.append((t1 - t0) / reps)
        tb.append((t2 - t1) / reps)
    ratios = [a / b for a, b in zip(ta, tb)]
    return {"ratio_median": statistics.median(ratios), "ratio_min": min(ratios),
            "ratio_max": max(ratios), "a_median_s": statistics.median(ta),
            "b_median_s": statistics.median(tb), "pairs": pairs, "reps": reps}


def calibrate(fn: Callable[[], object], target_s: float = 0.02, warmup: int = 2) -> int:
    """Warm up, then the repetitions per burst that make a burst last about `target_s`."""
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    fn()
    dt = max(time.perf_counter() - t0, 1e-6)
    return max(1, min(1000, math.ceil(target_s / dt)))


def to_format(model: nn.Module, x: torch.Tensor, channels_last: bool):
    """A copy of (model, x) in NCHW or channels_last (4-D inputs only)."""
    if not channels_last or x.dim() != 4:
        return model, x.contiguous()
    return (copy.deepcopy(model).to(memory_format=torch.channels_last),
            x.contiguous(memory_format=torch.channels_last))


@torch.inference_mode()
def fastest_format(model: nn.Module, x: torch.Tensor, pairs: int = 5,
                   burst_s: float = 0.01) -> tuple[bool, float]:
    """(use channels_last?, how much faster it is than NCHW) for this model and input."""
    if x.dim() != 4:
        return False, 1.0
    m_a, x_a = to_format(model, x, False)
    m_b, x_b = to_format(model, x, True)
    reps = calibrate(lambda: m_a(x_a), burst_s)
    calibrate(lambda: m_b(x_b), burst_s)
    r = paired(lambda: m_a(x_a), lambda: m_b(x_b), pairs=pairs, reps=reps)["ratio_median"]
    return r > 1.0, r


def layer_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The layers that do the arithmetic: conv, linear, and ticketsmith executors."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, LAYER_TYPES) or hasattr(m, "executor")}


def _macs_per_position(m: nn.Module) -> int:
    if hasattr(m, "macs_per_position"):  # block conv executor
        return int(m.macs_per_position())
    if hasattr(m, "macs_per_sample"):  # block / condensed linear: one position per sample
        return int(m.macs_per_sample())
    return int(m.weight.numel())  # conv: c_out * c_in/groups * kh * kw; linear: out * in


@torch.inference_mode()
def count_macs(model: nn.Module, x: torch.Tensor) -> tuple[int, dict[str, int], dict[str, int]]:
    """(total MACs per example, MACs per layer, parameters per layer) of one forward pass.

    A layer's MACs = multiply-adds per output position x output positions (H x W for a conv,
    1 for a linear layer); executors report the work their structure needs."""
    per_layer: dict[str, int] = {}
    handles = []
    layers = layer_modules(model)
    nested = {n for n in layers for o in layers if o != n and o and n.startswith(o + ".")}

    for name, m in layers.items():
        if name in nested:  # a conv inside an executor is counted by the executor
            continue

        def hook(mod, inp, out, name=name):
            positions = out[0].numel() // out.shape[1] if out.dim() > 1 else 1
            per_layer[name] = per_layer.get(name, 0) + _macs_per_position(mod) * positions
        handles.append(m.register_forward_hook(hook))
    try:
        was = model.training
        model.eval()
        model(x[:1])
        model.train(was)
    finally:
        for h in handles:
            h.remove()
    params = {n: sum(p.numel() for p in m.parameters()) for n, m in layers.items() if n not in nested}
    return sum(per_layer.values()), per_layer, params


@torch.inference_mode()
def capture_inputs(model: nn.Module, x: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The input each named layer receives when the model runs on x."""
    seen: dict[str, torch.Tensor] = {}
    mods = dict(model.named_modules())
    handles = [mods[n].register_forward_pre_hook(
        lambda mod, inp, n=n: seen.setdefault(n, inp[0].detach().clone())) for n in names if n in mods]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


@torch.inference_mode()
def compare(dense: nn.Module, compact: nn.Module, make_input: Callable[[int], torch.Tensor],
            batch_sizes: Sequence[int] = (1, 64), threads: Sequence[int] | None = None,
            pairs: int = 20, layerwise: bool = True, progress: Callable[[str], None] | None = None,
            burst_s: float = 0.02, select_per_batch: bool = True) -> dict:
    """Time `dense` against `compact` for each batch size and thread count.

    With `select_per_batch`, every executor of `compact` switches to the kernel its measured
    rule picks for each batch size before that batch is timed (CSR at batch 1, embedding_bag at
    256, ...); pass False to keep the kernels as they are (e.g. after autotuning).
    Returns a JSON-able dict: MACs and parameters of both, the ideal speedup, and per
    (batch, threads) the median / min / max of the paired time ratios, the memory format each
    model ran in, and (if `layerwise`) the same per layer (the paper's Figure 7)."""
    dense, compact = dense.eval(), compact.eval()
    x1 = make_input(1)
    macs_d, layer_macs_d, layer_params_d = count_macs(dense, x1)
    macs_c, layer_macs_c, layer_params_c = count_macs(compact, x1)
    params_d = sum(p.numel() for p in dense.parameters())
    params_c = sum(p.numel() for p in compact.parameters())
    ideal = macs_d / max(macs_c, 1)
    out = {"machine": machine(), "dense": {"macs": macs_d, "params": params_d},
           "compact": {"macs": macs_c, "params": params_c}, "ideal_speedup": ideal,
           "results": [], "layers": []}
    threads = list(threads or [torch.get_num_threads()])
    old_threads = torch.get_num_threads()
    try:
        for t in threads:
            torch.set_num_threads(t)
            for b in batch_sizes:
                if progress:
                    progress(f"batch {b}, {t} threads")
                x = make_input(b)
                kernels = {}
                for n, m in compact.named_modules():
                    if hasattr(m, "executor") and hasattr(m, "select"):
                        kernels[n] = m.select(b) if select_per_batch else m.executor
                cl_d, _ = fastest_format(dense, x, burst_s=burst_s / 2)
                cl_c, _ = fastest_format(compact, x, burst_s=burst_s / 2)
                md, xd = to_format(dense, x, cl_d)
                mc, xc = to_format(compact, x, cl_c)
                reps = max(calibrate(lambda: md(xd), burst_s), calibrate(lambda: mc(xc), burst_s))
                r = paired(lambda: md(xd), lambda: mc(xc), pairs=pairs, reps=reps)
                out["results"].append({
                    "batch_size": b, "threads": t, "backend": "torch",
                    "dense_format": "channels_last" if cl_d else "nchw",
                    "compact_format": "channels_last" if cl_c else "nchw",
                    "dense_ms": r["a_median_s"] * 1e3, "compact_ms": r["b_median_s"] * 1e3,
                    "speedup_median": r["ratio_median"], "speedup_min": r["ratio_min"],
                    "speedup_max": r["ratio_max"], "realized_over_ideal": r["ratio_median"] / ideal,
                    "time_saving": 1 - 1 / r["ratio_median"], "pairs": pairs, "reps": reps,
                    "executors": kernels})
                if layerwise:
                    out["layers"] += _layerwise(md, mc, xd, xc, b, t, pairs, layer_macs_d,
                                                layer_macs_c, layer_params_d, layer_params_c,
                                                burst_s / 4)
    finally:
        torch.set_num_threads(old_threads)
    return out


def _layerwise(md, mc, xd, xc, b, t, pairs, macs_d, macs_c, params_d, params_c,
               burst_s: float) -> list[dict]:
    names = [n for n in macs_d if n in macs_c]
    ins_d = capture_inputs(md, xd, names)
    ins_c = capture_inputs(mc, xc, names)
    mods_d, mods_c = dict(md.named_modules()), dict(mc.named_modules())
    rows = []
    for n in names:
        if n not in ins_d or n not in ins_c:
            continue
        ld, lc, xi_d, xi_c = mods_d[n], mods_c[n], ins_d[n], ins_c[n]
        reps = max(calibrate(lambda: ld(xi_d), burst_s), calibrate(lambda: lc(xi_c), burst_s))
        r = paired(lambda: ld(xi_d), lambda: lc(xi_c), pairs=max(5, pairs // 2), reps=reps)
        rows.append({"layer": n, "batch_size": b, "threads": t,
                     "executor": getattr(lc, "executor", "dense"),
                     "macs_dense": macs_d[n], "macs_compact": macs_c[n],
                     "params_dense": params_d.get(n), "params_compact": params_c.get(n),
                     "ideal_speedup": macs_d[n] / max(macs_c[n], 1),
                     "dense_ms": r["a_median_s"] * 1e3, "compact_ms": r["b_median_s"] * 1e3,
                     "speedup_median": r["ratio_median"], "speedup_min": r["ratio_min"],
                     "speedup_max": r["ratio_max"]})
    return rows


def compare_onnx(dense_path: str, compact_path: str, make_input: Callable[[int], torch.Tensor],
                 batch_sizes: Sequence[int], threads: Sequence[int], pairs: int = 20) -> list[dict]:
    """The same paired comparison of two exported models under ONNX Runtime."""
    import onnxruntime as ort
    rows = []
    for t in threads:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = t
        opts.inter_op_num_threads = 1
        sd = ort.InferenceSession(dense_path, opts, providers=["CPUExecutionProvider"])
        sc = ort.InferenceSession(compact_path, opts, providers=["CPUExecutionProvider"])
        nd, nc = sd.get_inputs()[0].name, sc.get_inputs()[0].name
        for b in batch_sizes:
            x = make_input(b).numpy()
            fa = lambda: sd.run(None, {nd: x})  # noqa: E731
            fb = lambda: sc.run(None, {nc: x})  # noqa: E731
            reps = max(calibrate(fa), calibrate(fb))
            r = paired(fa, fb, pairs=pairs, reps=reps)
            rows.append({"batch_size": b, "threads": t, "backend": "onnxruntime",
                         "dense_ms": r["a_median_s"] * 1e3, "compact_ms": r["b_median_s"] * 1e3,
                         "speedup_median": r["ratio_median"], "speedup_min": r["ratio_min"],
                         "speedup_max": r["ratio_max"], "time_saving": 1 - 1 / r["ratio_median"],
                         "pairs": pairs, "reps": reps})
    return rows


def to_markdown(result: dict, title: str = "Benchmark") -> str:
    """A readable report of a `compare` result."""
    m = result["machine"]
    lines = [f"# {title}", "",
             f"Machine: {m['cpu']}, torch {m['torch']}. Command: `{m['command']}`", "",
             f"Dense: {result['dense']['params']:,} parameters, {result['dense']['macs']:,} MACs "
             f"per example. Compact: {result['compact']['params']:,} parameters, "
             f"{result['compact']['macs']:,} MACs. Ideal speedup (MAC ratio): "
             f"{result['ideal_speedup']:.2f}x."
             + (f" Sparsity: {result['sparsity']:.2%} of the mask, {result['effective_sparsity']:.2%} "
                "effective (what the compact model keeps)." if "effective_sparsity" in result else ""), "",
             "| backend | batch | threads | dense format | compact format | dense ms | compact ms "
             "| speedup median (min-max) | realized / ideal | time saving |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["results"]:
        lines.append(
            f"| {r['backend']} | {r['batch_size']} | {r['threads']} | {r.get('dense_format', '-')} "
            f"| {r.get('compact_format', '-')} | {r['dense_ms']:.3f} | {r['compact_ms']:.3f} | "
            f"{r['speedup_median']:.2f}x ({r['speedup_min']:.2f}-{r['speedup_max']:.2f}) | "
            f"{r['speedup_median'] / result['ideal_speedup']:.2f} | {r['time_saving']:.1%} |")
    if result.get("layers"):
        lines += ["", "## Layer-wise (convolution and linear layers only)", "",
                  "| layer | batch | executor | ideal | speedup median (min-max) | dense ms | compact ms |",
                  "|---|---|---|---|---|---|---|"]
        for r in result["layers"]:
            lines.append(f"| {r['layer']} | {r['batch_size']} | {r['executor']} | "
                         f"{r['ideal_speedup']:.2f}x | {r['speedup_median']:.2f}x "
                         f"({r['speedup_min']:.2f}-{r['speedup_max']:.2f}) | {r['dense_ms']:.3f} | "
                         f"{r['compact_ms']:.3f} |")
    lines += ["", "Speedups are medians of paired, interleaved time ratios (dense / compact); the "
              "machine's absolute speed drifts, the ratios hold to about +-10%."]
    return "\n".join(lines) + "\n"


def bench_ticket(dense: nn.Module, ticket: nn.Module, masks, input_shape: Sequence[int], *,
                 batch_sizes: Sequence[int] = (1, 64), threads: Sequence[int] | None = None,
                 pairs: int = 20, layerwise: bool = True, onnx: bool = False, autotune: bool = False,
                 progress: Callable[[str], None] | None = None) -> dict:
    """Compact `ticket` under `masks` and time it against `dense` (same architecture, dense).

    The compact model is checked against the masked ticket on random inputs first. Executors
    follow their measured rule for each batch size timed; with `autotune` they are instead tuned
    once, at the largest batch size (the result records the choices)."""
    from .. import compact as tscompact
    ticket = copy.deepcopy(ticket).eval()
    masks.apply(ticket)
    make = lambda b: torch.randn(b, *input_shape, generator=torch.Generator().manual_seed(b))  # noqa: E731
    example = make(2)
    compact = tscompact.compact(ticket, masks, example, autotune=autotune,
                                batch_size=max(batch_sizes) if autotune else None)
    with torch.inference_mode():
        x = make(3)
        ref, got = ticket(x), compact(x)
        rel_err = float((ref - got).norm() / ref.norm().clamp_min(1e-12))
    result = compare(dense, compact, make, batch_sizes, threads, pairs, layerwise, progress,
                     select_per_batch=not autotune)
    result["check_rel_err"] = rel_err
    result["executors"] = dict(getattr(compact, "ticketsmith_executors", {}))
    result["sparsity"] = masks.sparsity()
    result["effective_sparsity"] = tscompact.effective(ticket, masks, example)["effective_sparsity"]
    if onnx:
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            d = tscompact.export_onnx(dense, example, f"{tmp}/dense.onnx")
            c = tscompact.export_onnx(compact, example, f"{tmp}/compact.onnx")
            result["results"] += compare_onnx(str(d), str(c), make, batch_sizes,
                                              threads or [torch.get_num_threads()], pairs)
    for r in result["results"]:
        r["realized_over_ideal"] = r["speedup_median"] / result["ideal_speedup"]
    return result
