r"""GPU speed of structural tickets (issue 15, item 6): channel tickets and regrouped convs on CUDA,
each against the fastest dense CUDA path, in one run sized for a 15-minute device window.

What it measures (every fast form is first checked against the masked dense model, below):

- channel tickets of full-width VGG-16 and ResNet-18 (CIFAR shapes, 50% and 75% channels, built
  as benchmarks/channel_tickets.py builds them: `channel_ticket(name, 1.0, s)`), dense vs compact,
  BatchNorm folded into both (`ts.deploy.fold_batchnorm`), at batch 1, 64 and 256, in four
  precisions: fp32 (TF32 off), tf32 (TF32 on for cuDNN and matmul), bf16 and fp16 (autocast, and
  the model cast to that dtype). Candidates per model: eager NCHW / channels_last, each also
  replayed as a CUDA graph; then, budget allowing, torch.compile (inductor, default mode,
  dynamic=False, NCHW input: inductor picks the conv layout itself; bf16/fp16: the cast model).
  cudnn.benchmark is on. Per (batch, precision) the fastest dense candidate is timed against the
  fastest compact candidate (the headline row), and each candidate against its own compact form;
- a regrouped conv 256->256, 3x3, 16x16, 75% sparse in 4 blocks (`block_conv.make_blocks`), fp32
  and bf16, batch 1, 64, 256, against the fastest dense conv (F.conv2d/cuDNN NCHW or
  channels_last, unfold + dense matmul, torch.compile): channel-granular blocks as one grouped
  conv (the absorbed form of `ts.compact(..., absorb=True)`: input channels already in block
  order, output left in block order); for both block kinds torch.sparse BSR (`to_sparse_bsr`)
  times the unfolded input (torch's own dispatch, and Triton's `bsr_dense_mm` explicitly), the
  blocks as one batched matmul on a column gather, and the `BlockConv2d` executor's kernels.

Checks: each candidate's output on fresh random inputs against the fp64 CPU model (the masked
dense model for compact forms, the dense one for dense forms), relative error
||out - ref|| / ||ref|| under 1e-4 (fp32), 1e-2 (tf32, fp16), 1e-1 (bf16: 8-bit mantissa, 16
layers; the CPU smoke run saw about 1e-2; a wrong kernel is off by order 1). Eager forms are
checked at batch 3 (not a timed batch size); CUDA graphs and compiled models have a static
shape, so they are checked at the timed batch size on inputs other than the timed ones (first
4 samples compared). A candidate that fails is not timed (listed with its error).

Timing: bursts of calls closed by torch.cuda.synchronize (about --burst-ms each), dense and fast
alternating (`ticketsmith.bench.paired` on burst callables), median per-pair ratio with min-max.

Order and budget: regroup rows, channel rows (eager and CUDA graphs), then compile rows
(channel tickets in bf16 at batch 256, 64, 1; the regrouped conv; channel tickets in tf32, fp32,
fp16). No row starts after --budget-s (default 420 s, counted from start-up), nor a compile row
predicted to end after it; compile rows stop altogether if a first compile takes over
--compile-limit-s (60 s). JSON and Markdown are rewritten after every row, so a killed run
leaves its results.

Device window (an H100/H200 machine whose image has torch but not torch-pruning, pymetis or
pydantic, and no network): `scripts/device.sh prepare` puts the wheels in .device/ (git-ignored),
`scripts/device.sh lean` keeps the committed protocol runs home (the tool sends 64 MiB at most),
and the device tool runs, with carry [".device"] and timeout_s=600,

    scripts/device_gpu.sh speed 540

which installs the wheels there and runs this script with --out $OUT/gpu_speed
(results/README.md, "A GPU window"; `scripts/device.sh restore` afterwards). By hand:

    set -o pipefail; python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
      .device/whl/*.whl && PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1 python3 \
      benchmarks/gpu_speed.py --out $OUT/gpu_speed 2>&1 | tee $OUT/gpu_speed.log

(where pip can reach its index, `pip install -e .` then `python benchmarks/gpu_speed.py --out
$OUT/gpu_speed` is the same). Expected: about 20 s of start-up, 420 s of rows, and at most one
compile row past the budget: 7-8 minutes; give the call timeout_s=600. Writes
$OUT/gpu_speed.json and $OUT/gpu_speed.md (default: benchmarks/results/gpu_speed.*). The eager
and CUDA-graph rows come first and should fit well inside the budget; compile rows get what is
left (likely bf16 only). With device time left over, a second call with `--compile-only
--precisions tf32,fp32 --out $OUT/gpu_speed_compile` adds compile rows for the other precisions.

Without CUDA it prints "no CUDA device: nothing measured" and exits 0; `--device cpu --smoke`
is a tiny dry run of every code path that can run on a CPU (small widths, batch 1 and 2, 2 pairs,
dynamo with the eager backend; no CUDA graphs or Triton):

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/gpu_speed.py --device cpu --smoke --out /tmp/gpu_speed_smoke
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when torch loads libgomp

import time  # noqa: E402

T_START = time.perf_counter()

import argparse  # noqa: E402
import copy  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SHAPE = (3, 32, 32)
TOL = {"fp32": 1e-4, "tf32": 1e-2, "fp16": 1e-2, "bf16": 1e-1}
LOW = {"bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
COMPILE_PRECISION_ORDER = ("bf16", "tf32", "fp32", "fp16")
CHECK_BATCH = 3  # eager forms are checked at a batch size that is never timed
N_BLOCKS = 4


# -- small helpers -------------------------------------------------------------------------------
def elapsed() -> float:
    return time.perf_counter() - T_START


def short(e: BaseException) -> str:
    s = f"{type(e).__name__}: {e}".strip().replace("\n", " ")
    return s if len(s) <= 300 else s[:297] + "..."


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def randn(n: int, shape, seed: int) -> torch.Tensor:
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    e = float((out - ref).norm() / ref.norm().clamp_min(1e-30))
    return e if math.isfinite(e) else float("inf")


@contextmanager
def math_mode(precision: str, dev: torch.device):
    """TF32 on for "tf32" only (cuDNN convs and matmuls); fp32 is strict fp32."""
    if dev.type != "cuda":
        yield
        return
    old = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    on = precision == "tf32"
    torch.backends.cudnn.allow_tf32 = on
    torch.backends.cuda.matmul.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


@contextmanager
def plain_tensors():
    """Modules and weights are made outside inference mode (ordinary tensors, as a user who
    moves a model to the GPU and then serves it under inference_mode has them)."""
    with torch.inference_mode(False), torch.no_grad():
        yield


def free_memory(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


# -- timing --------------------------------------------------------------------------------------
def burst(fn: Callable, reps: int, dev: torch.device) -> Callable:
    def run():
        for _ in range(reps):
            fn()
        sync(dev)
    return run


def calibrate(fn: Callable, dev: torch.device, burst_s: float, warmup: int = 3) -> int:
    """Warm up (cuDNN autotuning happens here), then the calls per burst that take ~burst_s."""
    for _ in range(warmup):
        fn()
    sync(dev)
    n = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync(dev)
        dt = time.perf_counter() - t0
        if dt >= burst_s / 4 or n >= 256:
            break
        n *= 4
    return max(1, min(4000, math.ceil(burst_s / max(dt / n, 1e-7))))


def probe(cands: dict[str, tuple[Callable, int]], rounds: int, dev: torch.device) -> dict[str, float]:
    """Interleaved rounds of bursts over all candidates: median seconds per call of each."""
    times: dict[str, list[float]] = {k: [] for k in cands}
    for _ in range(rounds):
        for k, (fn, reps) in cands.items():
            b = burst(fn, reps, dev)
            t0 = time.perf_counter()
            b()
            times[k].append((time.perf_counter() - t0) / reps)
    return {k: statistics.median(v) for k, v in times.items()}


def pair(fa: Callable, ra: int, fb: Callable, rb: int, pairs: int, dev: torch.device) -> dict:
    """A (baseline) and B alternating in bursts of ra and rb calls (`ticketsmith.bench.paired`);
    speedup = time per call of A / time per call of B, median (min-max) over pairs."""
    from ticketsmith.bench import paired
    r = paired(burst(fa, ra, dev), burst(fb, rb, dev), pairs=pairs, reps=1)
    scale = rb / ra  # per-call ratio = (burst_a / ra) / (burst_b / rb)
    s = r["ratio_median"] * scale
    return {"speedup_median": s, "speedup_min": r["ratio_min"] * scale,
            "speedup_max": r["ratio_max"] * scale, "time_saving": 1 - 1 / s,
            "base_ms": r["a_median_s"] / ra * 1e3, "fast_ms": r["b_median_s"] / rb * 1e3,
            "pairs": pairs, "reps": [ra, rb]}


# -- runners -------------------------------------------------------------------------------------
class Runner:
    """One way of computing a model or layer: `run()` on its own timing input (static buffers),
    `predict(x_cpu)` the output for another input (for the check); `static`: shape fixed to the
    timed batch size (CUDA graphs, compiled)."""

    def __init__(self, run: Callable, predict: Callable, static: bool = False):
        self.run, self.predict, self.static = run, predict, static
        self.reps = 1
        self.err: float | None = None


def graph_runner(call: Callable, prep: Callable, x_static: torch.Tensor, dev: torch.device) -> Runner:
    """`call(x_static)` captured once in a CUDA graph and replayed."""
    s = torch.cuda.Stream(dev)
    s.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(s):
        for _ in range(3):  # cuDNN autotuning and lazy init before capture
            call(x_static)
    torch.cuda.current_stream(dev).wait_stream(s)
    sync(dev)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = call(x_static)

    def predict(x):
        x_static.copy_(prep(x))
        g.replay()
        sync(dev)
        return out.detach().clone()
    r = Runner(g.replay, predict, static=True)
    r.graph = g  # keep the graph (and its memory pool) alive with the runner
    return r


def model_runner(model: nn.Module, dev: torch.device, b: int, fmt: str, mode: str | None,
                 dtype: torch.dtype | None, seed: int, compile_backend: str | None = None
                 ) -> tuple[Runner, Callable, Callable, torch.Tensor]:
    """(runner, call, prep, x_static) of `model` in memory format `fmt`; mode None (fp32 / tf32),
    "autocast" (torch.autocast to dtype, weights fp32) or "cast" (weights and input in dtype);
    compiled with torch.compile when compile_backend is given."""
    in_dtype = torch.float32
    mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    with plain_tensors():
        m = copy.deepcopy(model).eval().to(dev)
        if mode == "cast":
            m, in_dtype = m.to(dtype), dtype
        m = m.to(memory_format=mf)
        for prm in m.parameters():
            prm.requires_grad_(False)
    fwd = torch.compile(m, dynamic=False, backend=compile_backend) if compile_backend else m

    def call(x):
        if mode == "autocast":  # no weight-cast cache: CUDA graph capture needs it off
            with torch.autocast(dev.type, dtype=dtype, cache_enabled=False):
                return fwd(x)
        return fwd(x)

    def prep(x):
        return x.to(dev, in_dtype).contiguous(memory_format=mf)
    with plain_tensors():
        x_static = prep(randn(b, SHAPE, seed))
    r = Runner(lambda: call(x_static), lambda x: call(prep(x)), static=compile_backend is not None)
    r.module = m
    return r, call, prep, x_static


def check(runners: dict[str, Runner], ref: Callable, in_shape, b: int, tol: float,
          unavailable: dict[str, str], failed: dict[str, str], seed: int) -> None:
    """Checks every runner against ref (fp64 CPU) and drops those that fail or raise."""
    for label in list(runners):
        r = runners[label]
        nb = b if r.static else CHECK_BATCH
        x = randn(nb, in_shape, seed + 7919 * nb)
        try:
            out = r.predict(x)
        except Exception as e:  # noqa: BLE001 -- a form the GPU stack cannot run is recorded
            unavailable[label] = "check run: " + short(e)
            del runners[label]
            continue
        k = min(nb, 4)
        err = rel_err(out[:k], ref(x[:k]))
        r.err = err
        if not err < tol:
            failed[label] = f"relative error {err:.2e} >= {tol:.0e}"
            del runners[label]


def time_candidates(runners: dict[str, Runner], dev: torch.device, cfg, unavailable: dict) -> dict[str, float]:
    """Calibrate every runner (dropping those that raise), then probe them interleaved: ms per call."""
    for label in list(runners):
        try:
            runners[label].reps = calibrate(runners[label].run, dev, cfg.burst_s)
        except Exception as e:  # noqa: BLE001
            unavailable[label] = "timing run: " + short(e)
            del runners[label]
    if not runners:
        return {}
    med = probe({k: (r.run, r.reps) for k, r in runners.items()}, cfg.probe_rounds, dev)
    return {k: v * 1e3 for k, v in med.items()}


# -- channel tickets -----------------------------------------------------------------------------
class Tickets:
    """The channel tickets (built once each, on the CPU) and their fp64 references."""

    def __init__(self, cfg):
        self.cfg, self._t, self._dense, self._refs = cfg, {}, {}, {}

    def get(self, name: str, s: float) -> dict:
        with torch.inference_mode(False):
            return self._get(name, s)

    def _get(self, name: str, s: float) -> dict:
        key = (name, s)
        if key not in self._t:
            from channel_tickets import channel_ticket

            import ticketsmith as ts
            from ticketsmith.bench import count_macs
            with torch.inference_mode(False), torch.enable_grad():  # refill traces with autograd
                dense, small, masks, _ = channel_ticket(name, self.cfg.width, s)
            if name not in self._dense:  # the same dense model (seed 0) for every sparsity
                with torch.no_grad():
                    folded, n_folded = ts.deploy.fold_batchnorm(dense)
                self._dense[name] = {"folded": folded, "bn_folded": n_folded,
                                     "ref": copy.deepcopy(dense).double().eval()}
            masked = copy.deepcopy(dense)
            with torch.no_grad():
                masks.apply(masked)
                small_f, n_small = ts.deploy.fold_batchnorm(small)
            x1 = torch.randn(1, *SHAPE)
            macs_d, macs_c = count_macs(dense, x1)[0], count_macs(small, x1)[0]
            p_d = sum(p.numel() for p in dense.parameters())
            p_c = sum(p.numel() for p in small.parameters())
            self._t[key] = {"compact": small_f, "bn_folded_compact": n_small,
                            "ref": masked.double().eval(), "macs_dense": macs_d,
                            "macs_compact": macs_c, "ideal": macs_d / max(macs_c, 1),
                            "params_dense": p_d, "params_compact": p_c,
                            "weight_sparsity": 1 - p_c / p_d}
        return {**self._t[key], "dense": self._dense[name]["folded"],
                "dense_ref": self._dense[name]["ref"], "bn_folded_dense": self._dense[name]["bn_folded"]}

    def ref(self, model: nn.Module, tag) -> Callable:
        """fp64 reference of `model`, cached per input (the check inputs repeat across rows)."""
        def f(x):
            k = (tag, tuple(x.shape), float(x.sum()))
            if k not in self._refs:
                with torch.inference_mode():
                    self._refs[k] = model(x.double())
            return self._refs[k]
        return f


def channel_forms(precision: str, fmts=("NCHW", "channels_last")) -> list[tuple[str, str, str | None]]:
    if precision in LOW:
        return ([(f"autocast {fmt}", fmt, "autocast") for fmt in fmts]
                + [(f"{precision} weights {fmt}", fmt, "cast") for fmt in fmts])
    return [(f"eager {fmt}", fmt, None) for fmt in fmts]


class Compiled:
    """Compiled runners of the current compile key (dense models are shared across sparsities);
    dynamo is reset when the key changes."""

    def __init__(self, limit_s: float):
        self.key, self.cache, self.limit_s = None, {}, limit_s
        self.first_s: float | None = None
        self.last_s: float | None = None
        self.disabled: str | None = None
        self.times: list[dict] = []

    def note(self, dt: float, what: str) -> None:
        """Record a compile's time; the first one over the limit stops all later compile rows."""
        self.times.append({"what": what, "s": round(dt, 2)})
        self.last_s = dt
        if self.first_s is None:
            self.first_s = dt
            if dt > self.limit_s:
                self.disabled = f"the first compile took {dt:.0f} s (> {self.limit_s:.0f} s)"

    def enter(self, key) -> None:
        if key != self.key:
            self.cache.clear()
            torch._dynamo.reset()
            self.key = key


@torch.inference_mode()
def channel_row(ctx, name: str, s: float, b: int, precision: str, with_compile: bool) -> dict:
    cfg, dev = ctx.cfg, ctx.dev
    t = ctx.tickets.get(name, s)
    dtype = LOW.get(precision)
    row = {"kind": "channel", "model": name, "channel_sparsity": s, "batch": b,
           "precision": precision, "compiled": with_compile, "ideal": t["ideal"],
           "weight_sparsity": t["weight_sparsity"], "params_dense": t["params_dense"],
           "params_compact": t["params_compact"], "macs_dense": t["macs_dense"],
           "macs_compact": t["macs_compact"], "bn_folded": [t["bn_folded_dense"], t["bn_folded_compact"]],
           "tolerance": TOL[precision]}
    unavailable: dict[str, str] = {}
    failed: dict[str, str] = {}
    sides: dict[str, dict[str, Runner]] = {"dense": {}, "compact": {}}
    with math_mode(precision, dev):
        for side in sides:
            model = t["dense"] if side == "dense" else t["compact"]
            for label, fmt, mode in channel_forms(precision):
                try:
                    r, call, prep, xs = model_runner(model, dev, b, fmt, mode, dtype, seed=b)
                except Exception as e:  # noqa: BLE001
                    unavailable[f"{side} {label}"] = short(e)
                    continue
                sides[side][label] = r
                if cfg.graphs:
                    try:
                        sides[side][label + " + CUDA graph"] = graph_runner(call, prep, xs, dev)
                    except Exception as e:  # noqa: BLE001
                        unavailable[f"{side} {label} + CUDA graph"] = short(e)
            if with_compile:
                label = "torch.compile" + (f", {precision} weights" if dtype else "")
                key = (name, "dense" if side == "dense" else s)
                try:
                    if key in ctx.compiled.cache:
                        r = ctx.compiled.cache[key]
                    else:
                        r = model_runner(model, dev, b, "NCHW", "cast" if dtype else None, dtype,
                                         seed=b, compile_backend=cfg.compile_backend)[0]
                        t0 = time.perf_counter()
                        r.run()
                        sync(dev)
                        dt = time.perf_counter() - t0
                        ctx.compiled.note(dt, f"{name} {side} {s if side != 'dense' else ''} b{b} {precision}")
                        ctx.compiled.cache[key] = r
                    sides[side][label] = r
                except Exception as e:  # noqa: BLE001
                    unavailable[f"{side} {label}"] = short(e)
        check(sides["dense"], ctx.tickets.ref(t["dense_ref"], (name, "dense")), SHAPE, b,
              TOL[precision], _prefixed(unavailable, "dense "), _prefixed(failed, "dense "), seed=b)
        check(sides["compact"], ctx.tickets.ref(t["ref"], (name, s)), SHAPE, b, TOL[precision],
              _prefixed(unavailable, "compact "), _prefixed(failed, "compact "), seed=b)
        row["errors"] = {f"{side} {k}": r.err for side in sides for k, r in sides[side].items()}
        ms = {side: time_candidates(sides[side], dev, cfg, _prefixed(unavailable, side + " "))
              for side in sides}
        row["candidates_ms"] = ms
        row["unavailable"], row["check_failed"] = unavailable, failed
        if not ms["dense"] or not ms["compact"]:
            row["error"] = "no dense or no compact form ran"
            return row
        bd, bc = min(ms["dense"], key=ms["dense"].get), min(ms["compact"], key=ms["compact"].get)
        rd, rc = sides["dense"][bd], sides["compact"][bc]
        row.update(fastest_dense=bd, fastest_compact=bc,
                   **pair(rd.run, rd.reps, rc.run, rc.reps, cfg.pairs, dev))
        row["realized_over_ideal"] = row["speedup_median"] / t["ideal"]
        same = {}
        for label in (k for k in sides["dense"] if k in sides["compact"]):
            a, c = sides["dense"][label], sides["compact"][label]
            same[label] = pair(a.run, a.reps, c.run, c.reps, max(3, cfg.pairs // 2), dev)
        row["same_form"] = same
    return row


class _prefixed(dict):
    """A view that writes `prefix + key` into another dict (per-side unavailable / failed)."""

    def __init__(self, target: dict, prefix: str):
        super().__init__()
        self.target, self.prefix = target, prefix

    def __setitem__(self, k, v):
        self.target[self.prefix + k] = v


# -- regrouped conv ------------------------------------------------------------------------------
class Regroup:
    """The regrouped conv layer of block_conv.py / absorbed_conv.py, both block kinds."""

    def __init__(self, cfg):
        from block_conv import make_blocks

        from ticketsmith.compact.blocks import BlockConv2d
        c = cfg.regroup_channels
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(0)
        conv = nn.Conv2d(c, c, 3, padding=1).eval()
        self.c, self.hw = c, cfg.regroup_size
        self.layers = {}
        for kind in ("channel", "element"):
            blocks = make_blocks(kind, c, c, 9, N_BLOCKS, g)
            mod = BlockConv2d.from_conv(conv, blocks).eval()
            w = mod.dense_weight().detach().clone()
            bias = conv.bias.detach().clone()
            self.layers[kind] = {"blocks": blocks, "module": mod, "weight": w, "bias": bias,
                                 "channel_granular": bool(mod.channel_granular),
                                 "ideal": c * c * 9 / mod.macs_per_position(),
                                 "ref_w": w.double(), "ref_b": bias.double()}

    def ref(self, kind: str) -> Callable:
        L = self.layers[kind]
        return lambda x: F.conv2d(x.double(), L["ref_w"], L["ref_b"], padding=1)


def bsr_columns(blocks, k_cols: int, bs: int, order: str) -> torch.Tensor:
    """Column order of the unfolded input for a BSR weight: "original" (0..K-1), "channel" (each
    block's columns together, in block order: exact tiles for channel-granular blocks) or
    "signature" (columns grouped by the set of blocks using them, unused ones dropped, padded to a
    multiple of bs with unused columns)."""
    if order == "original":
        return torch.arange(k_cols)
    if order == "channel":
        return torch.cat([bl.cols for bl in blocks])
    sig = torch.zeros(k_cols, dtype=torch.long)
    for i, bl in enumerate(blocks):
        sig[bl.cols] |= 1 << i
    used = (sig > 0).nonzero().flatten()
    used = used[torch.argsort(sig[used], stable=True)]
    pad = (-used.numel()) % bs
    unused = (sig == 0).nonzero().flatten()[:pad]
    return torch.cat([used, unused])


@torch.inference_mode()
def regroup_row(ctx, kind: str, b: int, precision: str, with_compile: bool) -> dict:
    cfg, dev = ctx.cfg, ctx.dev
    L = ctx.regroup.layers[kind]
    c, hw = ctx.regroup.c, ctx.regroup.hw
    dtype = LOW.get(precision, torch.float32)
    in_shape = (c, hw, hw)
    with plain_tensors():
        w = L["weight"].to(dev, dtype)
        bias = L["bias"].to(dev, dtype)
        w_cl = w.contiguous(memory_format=torch.channels_last)
        w2 = w.reshape(c, c * 9)
    blocks = L["blocks"]
    row = {"kind": "regroup", "structure": kind, "channel_granular": L["channel_granular"],
           "layer": f"conv {c}->{c}, 3x3, pad 1, {hw}x{hw}, {N_BLOCKS} blocks", "batch": b,
           "precision": precision, "compiled": with_compile, "ideal": L["ideal"],
           "tolerance": TOL[precision]}
    unavailable: dict[str, str] = {}
    failed: dict[str, str] = {}
    bsr_density: dict[str, float] = {}
    conv_lib = "cuDNN" if dev.type == "cuda" else "oneDNN"

    def prep(x, fmt="NCHW"):
        x = x.to(dev, dtype)
        return x.contiguous(memory_format=torch.channels_last) if fmt == "channels_last" else x.contiguous()

    def simple(fn, fmt="NCHW") -> Runner:
        xs = prep(randn(b, in_shape, b), fmt)
        return Runner(lambda: fn(xs), lambda x: fn(prep(x, fmt)))

    dense: dict[str, Runner] = {}
    fast: dict[str, Runner] = {}
    with math_mode(precision, dev):
        dense[f"F.conv2d ({conv_lib}) NCHW"] = simple(lambda x: F.conv2d(x, w, bias, padding=1))
        dense[f"F.conv2d ({conv_lib}) channels_last"] = simple(
            lambda x: F.conv2d(x, w_cl, bias, padding=1), "channels_last")
        dense["unfold + dense matmul"] = simple(
            lambda x: (torch.matmul(w2, F.unfold(x, 3, padding=1)) + bias[:, None])
            .view(x.shape[0], c, hw, hw))
        # -- the absorbed grouped conv (channel-granular blocks only)
        if L["channel_granular"]:
            with plain_tensors():
                g_in, gconv, g_out = L["module"].grouped_form()
                gconv = gconv.to(dev, dtype).eval().requires_grad_(False)
                g_in, g_out = g_in.to(dev), g_out.to(dev)
            for fmt in ("NCHW", "channels_last"):
                gm = gconv if fmt == "NCHW" else copy.deepcopy(gconv).to(memory_format=torch.channels_last)
                xs = prep(randn(b, in_shape, b), fmt).index_select(1, g_in)
                xs = xs.contiguous(memory_format=torch.channels_last) if fmt == "channels_last" else xs
                # timed: the grouped conv alone (neighbours absorb both channel maps); checked:
                # with the maps applied, against the masked dense conv
                fast[f"grouped conv (absorbed) {fmt}"] = Runner(
                    (lambda gm=gm, xs=xs: gm(xs)),
                    (lambda x, gm=gm, fmt=fmt: gm(absorbed_input(prep(x, fmt), g_in, fmt)).index_select(1, g_out)))
        # -- torch.sparse BSR times the unfolded input (drop-in: output in the layer's order)
        rows = torch.cat([bl.rows for bl in blocks])
        out_index = torch.empty_like(rows)
        out_index[rows] = torch.arange(rows.numel())  # output channel j sits at slot out_index[j]
        out_i = out_index.to(dev)
        orders = ["channel"] if L["channel_granular"] else ["original", "signature"]
        for order in orders:
            for bs in cfg.bsr_blocksizes:
                cols = bsr_columns(blocks, c * 9, bs, order)
                label = f"BSR {bs}x{bs}, {order} column order"
                if c % bs or cols.numel() % bs:
                    unavailable[label] = f"blocksize {bs} does not divide {c} x {cols.numel()}"
                    continue
                try:
                    wsub = L["weight"].reshape(c, c * 9)[rows][:, cols].to(dev, dtype)
                    bsr = wsub.to_sparse_bsr((bs, bs))
                    bsr_density[label] = bsr.values().shape[0] / ((c // bs) * (cols.numel() // bs))
                except Exception as e:  # noqa: BLE001
                    unavailable[label] = short(e)
                    continue
                cols_d, b_rows = cols.to(dev), bias[rows.to(dev)]

                def bsr_fn(x, bsr=bsr, cols_d=cols_d, b_rows=b_rows, mm=None):
                    n = x.shape[0]
                    xu = F.unfold(x, 3, padding=1)                       # [N, K, L]
                    x2 = xu.transpose(0, 1).index_select(0, cols_d).reshape(cols_d.numel(), -1)
                    y = (mm(bsr, x2) if mm else bsr @ x2) + b_rows[:, None]   # [c, N*L]
                    return y.view(c, n, hw * hw).transpose(0, 1).index_select(1, out_i).view(n, c, hw, hw)
                fast[label] = simple(bsr_fn)
                if dev.type == "cuda":
                    try:
                        from torch.sparse._triton_ops import bsr_dense_mm
                        fast[label + ", Triton bsr_dense_mm"] = simple(
                            lambda x, f=bsr_fn: f(x, mm=bsr_dense_mm))
                    except Exception as e:  # noqa: BLE001
                        unavailable[label + ", Triton bsr_dense_mm"] = short(e)
        # -- the blocks as one batched matmul on a column gather (drop-in)
        idx = torch.cat([bl.cols for bl in blocks]).to(dev)
        sizes = {(bl.rows.numel(), bl.cols.numel()) for bl in blocks}
        if len(sizes) == 1:
            (r_b, k_b), = sizes
            wb = torch.stack([L["weight"].reshape(c, c * 9)[bl.rows][:, bl.cols] for bl in blocks]).to(dev, dtype)
            b_rows = bias[rows.to(dev)].view(N_BLOCKS, r_b, 1)

            def gathered(x):
                n = x.shape[0]
                xg = F.unfold(x, 3, padding=1).index_select(1, idx).view(n, N_BLOCKS, k_b, hw * hw)
                y = torch.matmul(wb, xg) + b_rows                   # [N, blocks, r_b, L]
                return y.view(n, c, hw * hw).index_select(1, out_i).view(n, c, hw, hw)
            fast["column gather + batched matmul"] = simple(gathered)
        # -- the ticketsmith executor's own kernels
        for kname in L["module"].candidates():
            try:
                with plain_tensors():
                    mod = copy.deepcopy(L["module"]).to(dev, dtype).eval()
                mod.use(kname)
            except Exception as e:  # noqa: BLE001
                unavailable[f"BlockConv2d executor: {kname}"] = short(e)
                continue
            fast[f"BlockConv2d executor: {kname}"] = simple(mod)
        # -- torch.compile (compile rows)
        if with_compile:
            with plain_tensors():
                conv = nn.Conv2d(c, c, 3, padding=1).to(dev, dtype).eval().requires_grad_(False)
                conv.weight.copy_(w)
                conv.bias.copy_(bias)
            comp = [("dense", "torch.compile conv", conv)]
            if L["channel_granular"]:
                comp.append(("fast", "torch.compile grouped conv (absorbed)", gconv))
            for side, label, module in comp:
                key = (kind, side)
                try:
                    if key in ctx.compiled.cache:
                        r = ctx.compiled.cache[key]
                    else:
                        cm = torch.compile(module, dynamic=False, backend=cfg.compile_backend)
                        if side == "dense":
                            xs = prep(randn(b, in_shape, b))
                            r = Runner(lambda cm=cm, xs=xs: cm(xs), lambda x, cm=cm: cm(prep(x)), static=True)
                        else:
                            xs = prep(randn(b, in_shape, b)).index_select(1, g_in)
                            r = Runner(lambda cm=cm, xs=xs: cm(xs),
                                       lambda x, cm=cm: cm(prep(x).index_select(1, g_in)).index_select(1, g_out),
                                       static=True)
                        t0 = time.perf_counter()
                        r.run()
                        sync(dev)
                        ctx.compiled.note(time.perf_counter() - t0, f"regroup {kind} {side} b{b} {precision}")
                        ctx.compiled.cache[key] = r
                    (dense if side == "dense" else fast)[label] = r
                except Exception as e:  # noqa: BLE001
                    unavailable[label] = short(e)
        ref = ctx.regroup.ref(kind)
        check(dense, ref, in_shape, b, TOL[precision], unavailable, failed, seed=10_000 + b)
        check(fast, ref, in_shape, b, TOL[precision], unavailable, failed, seed=10_000 + b)
        row["errors"] = {k: r.err for k, r in {**dense, **fast}.items()}
        ms_d = time_candidates(dense, dev, cfg, unavailable)
        ms_f = time_candidates(fast, dev, cfg, unavailable)
        row.update(candidates_ms={"dense": ms_d, "fast": ms_f}, unavailable=unavailable,
                   check_failed=failed, bsr_tile_density=bsr_density)
        if not ms_d or not ms_f:
            row["error"] = "no dense or no fast form ran"
            return row
        base = min(ms_d, key=ms_d.get)
        row["fastest_dense"] = base
        rb = dense[base]
        variants = {}
        for label in sorted(fast, key=ms_f.get):
            rf = fast[label]
            v = pair(rb.run, rb.reps, rf.run, rf.reps, cfg.pairs, dev)
            v["realized_over_ideal"] = v["speedup_median"] / L["ideal"]
            variants[label] = v
        row["variants"] = variants
    return row


def absorbed_input(x: torch.Tensor, in_index: torch.Tensor, fmt: str) -> torch.Tensor:
    """x with its channels in block order (what a producer with permuted channels writes)."""
    x = x.index_select(1, in_index)
    return x.contiguous(memory_format=torch.channels_last) if fmt == "channels_last" else x


# -- report --------------------------------------------------------------------------------------
def header(cfg, dev: torch.device) -> dict:
    from ticketsmith.bench import machine
    h = {**machine(), "device": str(dev), "smoke": cfg.smoke}
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        h.update(gpu=torch.cuda.get_device_name(dev), capability=list(torch.cuda.get_device_capability(dev)),
                 gpu_memory_gib=round(p.total_memory / 2 ** 30, 1), sms=p.multi_processor_count,
                 cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                 cudnn_benchmark=torch.backends.cudnn.benchmark)
        try:
            import triton
            h["triton"] = triton.__version__
        except Exception:  # noqa: BLE001
            h["triton"] = None
    else:
        h["gpu"] = "none (CPU smoke run)"
    h["settings"] = {k: v for k, v in vars(cfg).items() if not k.startswith("_")}
    return h


class Report:
    def __init__(self, cfg, dev, out: Path):
        self.out = out
        self.data = {"header": header(cfg, dev), "rows": [], "skipped": [], "row_errors": [],
                     "compile": {}, "elapsed_s": 0.0, "finished": False}

    def save(self, compiled: Compiled | None = None) -> None:
        self.data["elapsed_s"] = round(elapsed(), 1)
        if compiled is not None:
            self.data["compile"] = {"first_s": compiled.first_s, "disabled": compiled.disabled,
                                    "times": compiled.times}
        self.out.parent.mkdir(parents=True, exist_ok=True)
        for suffix, text in ((".json", json.dumps(self.data, indent=1, default=str)),
                             (".md", markdown(self.data))):
            p = self.out.with_suffix(suffix)
            tmp = p.with_name(p.name + ".part")
            tmp.write_text(text)
            os.replace(tmp, p)


def _f(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


def markdown(d: dict) -> str:
    h = d["header"]
    rows = d["rows"]
    lines = ["# GPU speed: channel tickets and regrouped convs against the fastest dense CUDA path", "",
             f"GPU: **{h.get('gpu')}** (compute capability {h.get('capability')}, {h.get('sms')} SMs, "
             f"{h.get('gpu_memory_gib')} GiB); torch {h['torch']}, CUDA {h.get('cuda')}, cuDNN "
             f"{h.get('cudnn')}, Triton {h.get('triton')}; CPU {h['cpu']}. Command: `{h['command']}`. "
             f"Elapsed {d['elapsed_s']:.0f} s{'' if d['finished'] else ' (run not finished: partial results)'}.",
             "", "cudnn.benchmark on; fp32 = strict fp32 (TF32 off), tf32 = TF32 on for cuDNN and "
             "matmul; bf16 / fp16: autocast (weights fp32) or the model cast to that dtype. Every "
             "timed form was checked against the masked dense model (fp64, CPU) on fresh random "
             "inputs: relative error under 1e-4 (fp32), 1e-2 (tf32, fp16), 1e-1 (bf16). Speedup = "
             "median over paired, interleaved bursts of time(fastest dense) / time(fastest compact), "
             "(min-max); time saving = 1 - 1/speedup; ideal = MAC ratio.", ""]
    if h.get("smoke"):
        lines += ["**Smoke run on a CPU (tiny widths, 2 pairs): the figures mean nothing.**", ""]
    ch = [r for r in rows if r["kind"] == "channel" and "speedup_median" in r]
    if ch:
        lines += ["## Channel tickets (CIFAR shapes): fastest dense vs fastest compact", "",
                  "Paper (structural lottery tickets, 2080 Ti): 55-65% GPU time saving at 36-80% sparsity.", "",
                  "| model | channel sparsity | weights removed | batch | precision | with torch.compile "
                  "| fastest dense | fastest compact | dense ms | compact ms | ideal | speedup median "
                  "(min-max) | time saving | realized / ideal |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in ch:
            lines.append(
                f"| {r['model']} | {r['channel_sparsity']:.0%} | {r['weight_sparsity']:.1%} | {r['batch']} "
                f"| {r['precision']} | {'yes' if r['compiled'] else 'no'} | {r['fastest_dense']} "
                f"| {r['fastest_compact']} | {r['base_ms']:.3f} | {r['fast_ms']:.3f} | {r['ideal']:.2f}x "
                f"| {r['speedup_median']:.2f}x ({r['speedup_min']:.2f}-{r['speedup_max']:.2f}) "
                f"| {r['time_saving']:.1%} | {r['realized_over_ideal']:.2f} |")
        lines += ["", "### Same form, dense vs compact (each candidate against its own compact form)", "",
                  "| model | channel sparsity | batch | precision | form | dense ms | compact ms | speedup median (min-max) |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in ch:
            for form, v in r.get("same_form", {}).items():
                lines.append(f"| {r['model']} | {r['channel_sparsity']:.0%} | {r['batch']} | "
                             f"{r['precision']} | {form} | {v['base_ms']:.3f} | {v['fast_ms']:.3f} | "
                             f"{v['speedup_median']:.2f}x ({v['speedup_min']:.2f}-{v['speedup_max']:.2f}) |")
    rg = [r for r in rows if r["kind"] == "regroup" and "variants" in r]
    if rg:
        lines += ["", f"## Regrouped conv ({rg[0]['layer']}, 75% sparse) against the fastest dense conv", "",
                  "| blocks | batch | precision | with torch.compile | fastest dense | dense ms | form "
                  "| form ms | speedup median (min-max) | realized / ideal |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rg:
            for form, v in r["variants"].items():
                lines.append(f"| {r['structure']}-granular | {r['batch']} | {r['precision']} | "
                             f"{'yes' if r['compiled'] else 'no'} | {r['fastest_dense']} | {v['base_ms']:.3f} "
                             f"| {form} | {v['fast_ms']:.3f} | {v['speedup_median']:.2f}x "
                             f"({v['speedup_min']:.2f}-{v['speedup_max']:.2f}) | {v['realized_over_ideal']:.2f} |")
        dens = {k: v for r in rg for k, v in r.get("bsr_tile_density", {}).items()
                if r["structure"] == "element"}
        if dens:
            lines += ["", "Element-granular BSR: fraction of tiles stored: "
                      + ", ".join(f"{k} {v:.0%}" for k, v in dens.items()) + " (ideal 25%)."]
    worst: dict[str, float] = {}
    for r in rows:
        for e in (r.get("errors") or {}).values():
            if e is not None:
                worst[r["precision"]] = max(worst.get(r["precision"], 0.0), e)
    if worst:
        lines += ["", "Largest relative error of a timed form, by precision: "
                  + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()) + "."]
    c = d.get("compile") or {}
    lines += ["", "## Not timed", "",
              f"- torch.compile: first compile {_f(c.get('first_s'), '.1f')} s"
              + (f"; disabled: {c['disabled']}" if c.get("disabled") else "")]
    for r in rows:
        where = (f"{r['model']} {r['channel_sparsity']:.0%}" if r["kind"] == "channel" else
                 f"regroup {r['structure']}") + f", batch {r['batch']}, {r['precision']}" \
                 + (", compile row" if r["compiled"] else "")
        for k, v in r.get("check_failed", {}).items():
            lines.append(f"- check failed: {where}: {k}: {v}")
        for k, v in r.get("unavailable", {}).items():
            lines.append(f"- unavailable: {where}: {k}: {v}")
        if r.get("error"):
            lines.append(f"- {where}: {r['error']}")
    for e in d["row_errors"]:
        lines.append(f"- row failed: {e['row']}: {e['error']}")
    if d["skipped"]:
        lines.append(f"- {len(d['skipped'])} rows not started: " + "; ".join(
            f"{s['row']} ({s['why']})" for s in d["skipped"][:12]) + (" ..." if len(d["skipped"]) > 12 else ""))
    return "\n".join(lines) + "\n"


# -- main ----------------------------------------------------------------------------------------
def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(RESULTS / "gpu_speed"), help="path without suffix: writes .json and .md")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--smoke", action="store_true", help="tiny dry run (with --device cpu: on the CPU)")
    p.add_argument("--budget-s", type=float, default=420.0, help="no row starts after this many seconds")
    p.add_argument("--pairs", type=int, default=None, help="paired bursts per figure (default 10; smoke 2)")
    p.add_argument("--burst-ms", type=float, default=None, help="length of one burst (default 10; smoke 1)")
    p.add_argument("--models", default="vgg16,resnet18")
    p.add_argument("--sparsities", default="0.5,0.75")
    p.add_argument("--batch-sizes", default=None, help="default 1,64,256 (smoke 1,2)")
    p.add_argument("--precisions", default=None,
                   help=f"channel rows (default {','.join(PRECISIONS)}; smoke fp32,bf16: tf32 and fp16 "
                   "run the same code)")
    p.add_argument("--regroup-precisions", default="fp32,bf16")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--compile-only", action="store_true",
                   help="only the compile rows (each still times the eager and CUDA-graph forms too)")
    p.add_argument("--compile-limit-s", type=float, default=60.0,
                   help="no more compile rows once a first compile takes longer")
    a = p.parse_args(argv)
    a.smoke_cpu = a.smoke and a.device == "cpu"
    a.pairs = a.pairs or (2 if a.smoke else 10)
    a.burst_s = (a.burst_ms or (1.0 if a.smoke else 10.0)) / 1e3
    a.probe_rounds = 2 if a.smoke else 3
    a.width = 0.125 if a.smoke else 1.0
    a.batches = [int(v) for v in (a.batch_sizes or ("1,2" if a.smoke else "1,64,256")).split(",")]
    a.models = a.models.split(",")
    a.sparsities = [float(v) for v in a.sparsities.split(",")]
    a.precisions = [v for v in (a.precisions or ("fp32,bf16" if a.smoke else ",".join(PRECISIONS))).split(",") if v]
    a.regroup_precisions = [v for v in a.regroup_precisions.split(",") if v]
    for v in a.precisions + a.regroup_precisions:
        if v not in PRECISIONS:
            p.error(f"unknown precision {v!r}; choose from {', '.join(PRECISIONS)}")
    a.regroup_channels, a.regroup_size = (64, 8) if a.smoke else (256, 16)
    a.bsr_blocksizes = (16, 32, 64)
    a.graphs = a.device == "cuda"
    a.compile_backend = "eager" if a.smoke_cpu else "inductor"  # smoke: dynamo only, no codegen
    a.compile_batches = [max(a.batches)] if a.smoke else sorted(a.batches, reverse=True)
    return a


def jobs(cfg) -> list[tuple]:
    reg = [("regroup", k, b, p) for p in cfg.regroup_precisions for b in cfg.batches
           for k in ("channel", "element")]
    ch = [("channel", m, s, b, p) for m in cfg.models for s in cfg.sparsities for b in cfg.batches
          for p in cfg.precisions]
    out = [] if cfg.compile_only else [(j, False) for j in reg + ch]
    if cfg.compile:
        # compile rows, most wanted first: channel tickets in bf16 (largest batch first), the
        # regrouped conv, then the channel tickets in the other precisions
        order = [q for q in COMPILE_PRECISION_ORDER if q in cfg.precisions]
        for i, p in enumerate(order):
            for b in cfg.compile_batches:
                out += [(("channel", m, s, b, p), True) for m in cfg.models for s in cfg.sparsities]
            if i == 0:
                out += [(("regroup", k, b, q), True) for q in cfg.regroup_precisions
                        for b in cfg.compile_batches for k in ("channel", "element")]
    return out


def label(job, with_compile: bool) -> str:
    if job[0] == "channel":
        _, m, s, b, p = job
        return f"{m} {s:.0%} batch {b} {p}" + (" +compile" if with_compile else "")
    _, k, b, p = job
    return f"regroup {k} batch {b} {p}" + (" +compile" if with_compile else "")


class Ctx:
    pass


def main(argv=None) -> int:
    cfg = parse(argv)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing measured")
        return 0
    if cfg.device == "cpu" and not cfg.smoke:
        print("--device cpu is only for --smoke (a dry run); nothing measured")
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    dev = torch.device(cfg.device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    for name, v in (("recompile_limit", 1024), ("accumulated_recompile_limit", 4096),
                    ("cache_size_limit", 1024), ("accumulated_cache_size_limit", 4096),
                    ("fail_on_recompile_limit_hit", True)):
        if hasattr(torch._dynamo.config, name):  # never fall back to eager silently
            setattr(torch._dynamo.config, name, v)
    ctx = Ctx()
    ctx.cfg, ctx.dev = cfg, dev
    ctx.tickets = Tickets(cfg)
    ctx.compiled = Compiled(cfg.compile_limit_s)
    report = Report(cfg, dev, Path(cfg.out))
    report.save(ctx.compiled)
    print(f"{report.data['header'].get('gpu')}: torch {torch.__version__}, CUDA {torch.version.cuda}; "
          f"budget {cfg.budget_s:.0f} s; start-up {elapsed():.1f} s", flush=True)
    ctx.regroup = None
    for job, with_compile in jobs(cfg):
        name = label(job, with_compile)
        why = None
        if elapsed() > cfg.budget_s:
            why = f"budget of {cfg.budget_s:.0f} s spent"
        elif with_compile and ctx.compiled.disabled:
            why = ctx.compiled.disabled
        elif with_compile and ctx.compiled.last_s is None \
                and elapsed() + cfg.compile_limit_s + 30 > cfg.budget_s:
            why = "too little budget left for a first compile"
        elif with_compile and ctx.compiled.last_s is not None:
            key = ("channel", job[1], job[3], job[4]) if job[0] == "channel" else ("regroup", job[2], job[3])
            n = (1 if (job[1], "dense") in ctx.compiled.cache else 2) if key == ctx.compiled.key else 2
            predicted = n * ctx.compiled.last_s + 3.0
            if elapsed() + predicted > cfg.budget_s:
                why = f"predicted to end after the budget ({predicted:.0f} s of compiles)"
        if why:
            report.data["skipped"].append({"row": name, "why": why})
            continue
        t0 = time.perf_counter()
        try:
            if job[0] == "channel":
                _, m, s, b, p = job
                if with_compile:
                    ctx.compiled.enter(("channel", m, b, p))
                row = channel_row(ctx, m, s, b, p, with_compile)
            else:
                _, k, b, p = job
                if ctx.regroup is None:
                    ctx.regroup = Regroup(cfg)
                if with_compile:
                    ctx.compiled.enter(("regroup", b, p))
                row = regroup_row(ctx, k, b, p, with_compile)
        except Exception as e:  # noqa: BLE001 -- one broken row must not cost the others
            import traceback
            report.data["row_errors"].append({"row": name, "error": short(e),
                                              "traceback": traceback.format_exc()[-3000:]})
            print(f"[{elapsed():5.0f} s] {name}: FAILED {short(e)}", flush=True)
            report.save(ctx.compiled)
            free_memory(dev)
            continue
        row["row_s"] = round(time.perf_counter() - t0, 2)
        report.data["rows"].append(row)
        report.save(ctx.compiled)
        print(f"[{elapsed():5.0f} s] {name}: {summary(row)}", flush=True)
        free_memory(dev)
    ctx.compiled.cache.clear()
    report.data["finished"] = True
    report.save(ctx.compiled)
    bad = [(r, k, v) for r in report.data["rows"] for k, v in r.get("check_failed", {}).items()]
    unavailable: dict[tuple[str, str], int] = {}
    for r in report.data["rows"]:
        for k, v in r.get("unavailable", {}).items():
            unavailable[(k, v)] = unavailable.get((k, v), 0) + 1
    print(final_table(report.data))
    print(f"done in {elapsed():.0f} s: {len(report.data['rows'])} rows, "
          f"{len(report.data['skipped'])} not started, {len(report.data['row_errors'])} failed, "
          f"{len(bad)} forms failed their check, {sum(unavailable.values())} forms unavailable; "
          f"first compile {_f(ctx.compiled.first_s, '.1f')} s; wrote "
          f"{Path(cfg.out).with_suffix('.json')} and .md", flush=True)
    for r, k, v in bad[:20]:
        print(f"  check failed: {label_row(r)}: {k}: {v}")
    for (k, v), n in list(unavailable.items())[:20]:
        print(f"  unavailable in {n} row(s): {k}: {v}")
    for e in report.data["row_errors"][:10]:
        print(f"  row failed: {e['row']}: {e['error']}")
    if cfg.smoke:
        if bad or report.data["row_errors"] or any(r.get("error") for r in report.data["rows"]):
            print("smoke run FAILED")
            return 1
        print("smoke run passed")
    return 0


def final_table(d: dict) -> str:
    """The headline per channel ticket, batch and precision (the compile row where there is
    one), and the best form per regroup row: the lines a device session reads first."""
    best: dict[tuple, dict] = {}
    for r in d["rows"]:
        if r["kind"] == "channel" and "speedup_median" in r:
            best[(r["model"], r["channel_sparsity"], r["batch"], r["precision"])] = r
    lines = [f"GPU {d['header'].get('gpu')}: fastest dense vs fastest compact (time saving; paper: "
             "55-65% on a 2080 Ti)"]
    for (m, s, b, p), r in best.items():
        lines.append(f"  {m:8s} {s:.0%} b{b:<4d} {p:5s} {r['speedup_median']:6.2f}x "
                     f"({r['speedup_min']:.2f}-{r['speedup_max']:.2f}) saving {r['time_saving']:6.1%} "
                     f"ideal {r['ideal']:5.2f}x  dense {r['fastest_dense']}, compact {r['fastest_compact']}"
                     + (" [compile row]" if r["compiled"] else ""))
    for r in d["rows"]:
        if r["kind"] == "regroup" and r.get("variants"):
            lines.append(f"  regroup {r['structure']:7s} b{r['batch']:<4d} {r['precision']:5s}"
                         + (" +compile" if r["compiled"] else "") + ": " + summary(r))
    return "\n".join(lines)


def label_row(r: dict) -> str:
    if r["kind"] == "channel":
        return label(("channel", r["model"], r["channel_sparsity"], r["batch"], r["precision"]), r["compiled"])
    return label(("regroup", r["structure"], r["batch"], r["precision"]), r["compiled"])


def summary(row: dict) -> str:
    if row.get("error"):
        return row["error"]
    if row["kind"] == "channel":
        return (f"{row['speedup_median']:.2f}x ({row['speedup_min']:.2f}-{row['speedup_max']:.2f}), "
                f"saving {row['time_saving']:.0%}, ideal {row['ideal']:.2f}x; dense {row['fastest_dense']} "
                f"{row['base_ms']:.3f} ms, compact {row['fastest_compact']} {row['fast_ms']:.3f} ms "
                f"({row['row_s']:.1f} s)")
    best = max(row["variants"], key=lambda k: row["variants"][k]["speedup_median"])
    v = row["variants"][best]
    return (f"best {best} {v['speedup_median']:.2f}x ({v['speedup_min']:.2f}-{v['speedup_max']:.2f}) "
            f"vs {row['fastest_dense']} {v['base_ms']:.3f} ms ({row['row_s']:.1f} s)")


if __name__ == "__main__":
    sys.exit(main())
