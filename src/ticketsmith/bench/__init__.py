"""Honest speed measurement: dense vs compact, paired and interleaved.

This machine's speed drifts by 30-50% within an hour, so a single absolute time is not
evidence. Every comparison alternates the two variants in short bursts (A B A B ...), takes
the ratio of each pair, and reports the median ratio with its min-max. The dense baseline is
the fastest dense model a user could pick: both models are deployed (`ts.deploy`) in every
runtime asked for (eager PyTorch in its faster memory format, torch.compile, ONNX Runtime,
OpenVINO; BatchNorm folded), and the fastest dense of any runtime is timed against the fastest
compact of any runtime (the "fastest" rows); each runtime's own dense / compact ratio is kept
too. Ideal speedup = ratio of multiply-accumulates (MACs) actually needed; realized / ideal says
how much of it we get.
"""
from __future__ import annotations

import math
import os
import platform
import statistics
import sys
import time
from typing import Callable, Sequence

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ..errors import TicketsmithError, UsageError
from ..masks import copy_module
from ..models.attention import QKVAttention, fused_attention

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
    return (copy_module(model).to(memory_format=torch.channels_last),
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
    if hasattr(m, "macs_per_sample"):  # block / condensed linear: per row of features
        return int(m.macs_per_sample())
    return int(m.weight.numel())  # conv: c_out * c_in/groups * kh * kw; linear: out * in


class _ActivationProducts(TorchDispatchMode):
    """Counts the MACs of matrix products between two activations run outside every layer:
    attention's q k^T and weights x v (also fused in scaled_dot_product_attention). They hold
    no weights, so no layer hook sees them, but the model does that work (and removed heads
    save it). A product with a parameter or buffer as an operand is a layer's, not counted."""

    def __init__(self, held: set[int], depth: list[int]):
        super().__init__()
        self.held, self.depth, self.macs = held, depth, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.depth[0]:
            self.macs += self._macs(func.overloadpacket.__name__, args, out)
        return out

    def _macs(self, op: str, args, out) -> int:
        if any(isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() in self.held
               for a in args):
            return 0
        # (under inference mode the composite matmul and attention arrive undecomposed)
        if op in ("mm", "bmm", "matmul"):  # (.., n, k) x (.., k, m) -> (.., n, m): k per output
            return out.numel() * args[0].shape[-1]
        if op in ("addmm", "baddbmm"):
            return out.numel() * args[1].shape[-1]
        if "scaled_dot_product" in op and "backward" not in op:
            q, k, v = args[:3]  # (.., L, E) (.., S, E) (.., S, Ev): L S E + L S Ev
            return q.numel() // q.shape[-1] * k.shape[-2] * (q.shape[-1] + v.shape[-1])
        return 0


@torch.inference_mode()
def count_macs(model: nn.Module, x: torch.Tensor) -> tuple[int, dict[str, int], dict[str, int]]:
    """(total MACs per example, MACs per layer, parameters per layer) of one forward pass.

    A layer's MACs = multiply-adds per output position x output positions (H x W for a conv,
    1 for a linear layer on a vector, the tokens for one on a sequence); executors report the
    work their structure needs. The total adds the matrix products of two activations outside
    the layers (attention's q k^T and weights x v), which belong to no layer."""
    per_layer: dict[str, int] = {}
    handles = []
    layers = layer_modules(model)
    nested = {n for n in layers for o in layers if o != n and o and n.startswith(o + ".")}
    depth = [0]  # > 0 while a layer runs: its products are its own

    def enter(mod, inp):
        depth[0] += 1

    def leave(mod, inp, out):
        depth[0] -= 1

    for name, m in layers.items():
        handles.append(m.register_forward_pre_hook(enter))
        handles.append(m.register_forward_hook(leave))
        if name in nested:  # a conv inside an executor is counted by the executor
            continue

        def hook(mod, inp, out, name=name):
            # output positions: a conv's outputs hold channels in dim 1, a linear layer's
            # (and a linear executor's) in the last dim, e.g. tokens x features
            conv = isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) or hasattr(mod, "macs_per_position")
            positions = out[0].numel() // out.shape[1 if conv else -1] if out.dim() > 1 else 1
            per_layer[name] = per_layer.get(name, 0) + _macs_per_position(mod) * positions
        handles.append(m.register_forward_hook(hook))
    held = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    products = _ActivationProducts(held, depth)
    try:
        was = model.training
        model.eval()
        with products:
            model(x[:1])
        model.train(was)
    finally:
        for h in handles:
            h.remove()
    params = {n: sum(p.numel() for p in m.parameters()) for n, m in layers.items() if n not in nested}
    return sum(per_layer.values()) + products.macs, per_layer, params


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
            burst_s: float = 0.02, select_per_batch: bool = True,
            runtimes: Sequence[str] | None = None, original: nn.Module | None = None) -> dict:
    """Time `dense` against `compact` for each batch size and thread count, in each runtime.

    `runtimes`: the runtimes both models are deployed in (`ts.deploy.RUNTIMES`; None: every one
    available here). Per (batch, threads) there is a row per runtime (backend = the runtime;
    its speedup is the same-runtime ratio, dense / compact in that runtime) and, with more than
    one runtime, a row with backend "fastest": the fastest dense of any runtime against the
    fastest compact of any runtime, paired and interleaved -- the honest speedup a user gets,
    never a ticket in a fast runtime against a dense model in a slow one. Every deployment folds
    BatchNorm and picks its memory format (torch); a runtime that cannot take a model is listed
    in the row's `unavailable` with the reason.

    `original`: the dense model with the user's own modules, before `ts.models.build` swapped
    some for prunable ones (`build(..., prunable=False)`; its weights do not change its speed).
    It is deployed in every runtime too, and the fastest-vs-fastest row takes the fastest dense
    of both (its runtime then reads "RUNTIME, original modules"): a swap must not make the
    baseline slower than what the user had.

    With `select_per_batch`, every executor of `compact` switches to the kernel its measured
    rule picks for each batch size before that batch is timed (CSR at batch 1, embedding_bag at
    256, ...); pass False to keep the kernels as they are (e.g. after autotuning).
    Returns a JSON-able dict: MACs and parameters of both, the ideal speedup, the rows (median /
    min / max of the paired time ratios) and (if `layerwise`, eager only) the same per layer
    (the paper's Figure 7)."""
    from .. import deploy as tsdeploy
    dense, compact = dense.eval(), compact.eval()
    runtimes = list(runtimes) if runtimes is not None else tsdeploy.available_runtimes()
    for rt in runtimes:
        if rt not in tsdeploy.RUNTIMES:
            raise UsageError(f"unknown runtime {rt!r}; choose from {', '.join(tsdeploy.RUNTIMES)}")
    x1 = make_input(1)
    macs_d, layer_macs_d, layer_params_d = count_macs(dense, x1)
    macs_c, layer_macs_c, layer_params_c = count_macs(compact, x1)
    params_d = sum(p.numel() for p in dense.parameters())
    params_c = sum(p.numel() for p in compact.parameters())
    ideal = macs_d / max(macs_c, 1)
    out = {"machine": machine(), "dense": {"macs": macs_d, "params": params_d},
           "compact": {"macs": macs_c, "params": params_c}, "ideal_speedup": ideal,
           "runtimes": runtimes, "results": [], "layers": []}
    # the dense baseline runs the user's own nn.MultiheadAttention (torch's fused kernels), not
    # the QKVAttention it was swapped for to prune its heads (same function, MACs counted above)
    timed_dense = dense
    if any(isinstance(m, QKVAttention) for m in dense.modules()):
        timed_dense = copy_module(dense)
        fused_attention(timed_dense)
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
                out["results"] += _runtime_rows(timed_dense, compact, x, b, t, runtimes, pairs, burst_s,
                                                ideal, kernels, progress, original)
                if layerwise:
                    cl_d, _ = fastest_format(dense, x, burst_s=burst_s / 2)
                    cl_c, _ = fastest_format(compact, x, burst_s=burst_s / 2)
                    md, xd = to_format(dense, x, cl_d)
                    mc, xc = to_format(compact, x, cl_c)
                    out["layers"] += _layerwise(md, mc, xd, xc, b, t, pairs, layer_macs_d,
                                                layer_macs_c, layer_params_d, layer_params_c,
                                                burst_s / 4)
    finally:
        torch.set_num_threads(old_threads)
    return out


def _row(r: dict, b: int, t: int, ideal: float, pairs: int, **extra) -> dict:
    return {"batch_size": b, "threads": t, "dense_ms": r["a_median_s"] * 1e3,
            "compact_ms": r["b_median_s"] * 1e3, "speedup_median": r["ratio_median"],
            "speedup_min": r["ratio_min"], "speedup_max": r["ratio_max"],
            "realized_over_ideal": r["ratio_median"] / ideal, "time_saving": 1 - 1 / r["ratio_median"],
            "pairs": pairs, "reps": r["reps"], **extra}


def _runtime_rows(dense, compact, x, b, t, runtimes, pairs, burst_s, ideal, kernels, progress,
                  original=None) -> list[dict]:
    """The rows of one (batch, threads): one per runtime, then the fastest-vs-fastest row (its
    dense candidates: `dense`, and `original` where given, in every runtime)."""
    from .. import deploy as tsdeploy
    deps: dict[str, dict[str, tsdeploy.Deployment]] = {"dense": {}, "compact": {}}
    unavailable: dict[str, str] = {}
    for rt in runtimes:
        for kind, key, model in (("dense", rt, dense), ("dense", f"{rt}, original modules", original),
                                 ("compact", rt, compact)):
            if model is None:
                continue
            try:
                deps[kind][key] = tsdeploy.deploy(model, x[:2], rt, threads=t, batch_size=b)
            except (UsageError, TicketsmithError) as e:
                unavailable[f"{kind} {key}"] = str(e)
    rows = []
    both = [rt for rt in runtimes if rt in deps["dense"] and rt in deps["compact"]]
    for rt in both:
        dd, dc = deps["dense"][rt], deps["compact"][rt]
        fa, fb = (lambda: dd.run(x)), (lambda: dc.run(x))
        reps = max(calibrate(fa, burst_s), calibrate(fb, burst_s))
        r = paired(fa, fb, pairs=pairs, reps=reps)
        rows.append(_row(r, b, t, ideal, pairs, backend=rt,
                         dense_format=dd.details.get("memory_format", "-"),
                         compact_format=dc.details.get("memory_format", "-"),
                         executors=kernels if rt == "torch" else {}))
    if len(deps["dense"]) > 1 or len(deps["compact"]) > 1:
        if progress:
            progress(f"batch {b}, {t} threads: fastest of {', '.join(runtimes)}")
        calls = {(kind, rt): (lambda d=d: d.run(x)) for kind in deps for rt, d in deps[kind].items()}
        med = tsdeploy.time_interleaved(calls, rounds=max(5, pairs // 2), burst_s=burst_s)
        best_d = min(deps["dense"], key=lambda rt: med[("dense", rt)])
        best_c = min(deps["compact"], key=lambda rt: med[("compact", rt)])
        dd, dc = deps["dense"][best_d], deps["compact"][best_c]
        fa, fb = (lambda: dd.run(x)), (lambda: dc.run(x))
        reps = max(calibrate(fa, burst_s), calibrate(fb, burst_s))
        r = paired(fa, fb, pairs=pairs, reps=reps)
        same = next((row["speedup_median"] for row in rows if row["backend"] == best_c), None)
        rows.append(_row(r, b, t, ideal, pairs, backend="fastest", dense_runtime=best_d,
                         compact_runtime=best_c, same_runtime_speedup=same,
                         candidates_ms={f"{k} {rt}": s * 1e3 for (k, rt), s in med.items()},
                         unavailable=unavailable))
    elif unavailable:
        for row in rows:
            row["unavailable"] = unavailable
    if not rows:
        raise UsageError(f"no runtime could run both models: {unavailable}")
    return rows


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
             "| backend | batch | threads | dense runs in | compact runs in | dense ms | compact ms "
             "| speedup median (min-max) | realized / ideal | time saving | same-runtime speedup |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["results"]:
        fastest = r["backend"] == "fastest"
        same = r.get("same_runtime_speedup")
        lines.append(
            f"| {'**fastest vs fastest**' if fastest else r['backend']} | {r['batch_size']} | {r['threads']} "
            f"| {r['dense_runtime'] if fastest else r.get('dense_format', '-')} "
            f"| {r['compact_runtime'] if fastest else r.get('compact_format', '-')} "
            f"| {r['dense_ms']:.3f} | {r['compact_ms']:.3f} | "
            f"{r['speedup_median']:.2f}x ({r['speedup_min']:.2f}-{r['speedup_max']:.2f}) | "
            f"{r['speedup_median'] / result['ideal_speedup']:.2f} | {r['time_saving']:.1%} | "
            f"{f'{same:.2f}x' if same else '-'} |")
    gone = {k: v for r in result["results"] for k, v in r.get("unavailable", {}).items()}
    if gone:
        lines += [""] + [f"- not timed: {k}: {v}" for k, v in sorted(gone.items())]
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
              "machine's absolute speed drifts, the ratios hold to about +-10%. A runtime's row "
              "compares both models in that runtime; the fastest-vs-fastest row compares the "
              "fastest dense of any runtime with the fastest compact of any runtime (the honest "
              "figure), its last column the same-runtime speedup in the compact model's runtime."]
    return "\n".join(lines) + "\n"


def bench_ticket(dense: nn.Module, ticket: nn.Module, masks, input_shape: Sequence[int], *,
                 batch_sizes: Sequence[int] = (1, 64), threads: Sequence[int] | None = None,
                 pairs: int = 20, layerwise: bool = True, autotune: bool = False,
                 runtimes: Sequence[str] | None = None, original: nn.Module | None = None,
                 progress: Callable[[str], None] | None = None) -> dict:
    """Compact `ticket` under `masks` and time it against `dense` (same architecture, dense).

    `runtimes` and `original` as in `compare` (None: every runtime available here). The compact model is
    checked against the masked ticket on random inputs first. Executors
    follow their measured rule for each batch size timed; with `autotune` they are instead tuned
    once, at the largest batch size (the result records the choices)."""
    from .. import compact as tscompact
    ticket = copy_module(ticket).eval()
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
                     select_per_batch=not autotune, runtimes=runtimes, original=original)
    result["check_rel_err"] = rel_err
    result["executors"] = dict(getattr(compact, "ticketsmith_executors", {}))
    result["sparsity"] = masks.sparsity()
    result["effective_sparsity"] = tscompact.effective(ticket, masks, example)["effective_sparsity"]
    for r in result["results"]:
        r["realized_over_ideal"] = r["speedup_median"] / result["ideal_speedup"]
    return result


def headline(result: dict, batch_size: int | None = None, threads: int | None = None) -> dict | None:
    """The row a single figure should quote: the fastest-vs-fastest row where there is one,
    else the only runtime's row (first match of `batch_size` / `threads` when given)."""
    rows = [r for r in result.get("results", [])
            if (batch_size is None or r["batch_size"] == batch_size) and (threads is None or r.get("threads") == threads)]
    return next((r for r in rows if r.get("backend") == "fastest"), rows[0] if rows else None)
