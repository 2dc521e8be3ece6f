"""Compaction: rebuild a ticket into a physically smaller, faster model.

    small = ts.compact.compact(model, masks, example_inputs)
    ts.compact.describe(small)            # per layer: executor, shapes, parameters before / after
    ts.compact.save(small, "ticket/")     # safetensors + JSON, no pickle
    small = ts.compact.load("ticket/")    # zoo models; others: load(path, build=make_model)
    ts.compact.export_onnx(small, example_inputs, "ticket.onnx")

`compact` works on a deep copy of the model (the input is never modified), in eval mode, with
the masks folded into the weights, then:

(first) a layer whose forward applies a weight it computes from its parameters (timm's
   `StdConv2d` / `ScaledStdConv2d`, a `weight_norm` parametrization) becomes the plain layer
   holding that weight (`freeze.freeze_computed_weights`; checked on other inputs), its mask
   the nonzeros of that weight; the frozen layers are in `ticketsmith_compact["frozen"]`;

0. head surgery (`heads.remove_dead_heads`): the dead heads of timm-style attention modules (v
   rows or projection columns zero) are removed, their q, k, v rows and projection columns
   with them (and each tensor holding one slice per head: a Swin bias table's column, a Swin V2
   logit scale and bias MLP row) and `num_heads` lowered, where a copy cut this way computes
   what the module computed (checked on random inputs); `nn.MultiheadAttention` keeps its heads
   (the reason is in `describe`, `heads`) unless swapped for a `models.QKVAttention` before
   pruning;
1. channel surgery (`channel.remove_dead_channels`): every channel that is dead or unread in all
   the layers it is coupled with (or holds one value everywhere that each layer reading it
   folds into its bias: a dead unit after sigmoid or timm's StarReLU, an ablated SRigL neuron
   with its bias) is removed, with its BatchNorm, its consumers' input channels,
   residual partners, concatenation slots and the flattened features of a linear layer;
2. per conv / linear layer, an executor (recorded in `model.ticketsmith_executors`):
   - layers whose masks carry regroup blocks (`masks.blocks`) run as a block-sparse executor
     (`blocks.BlockConv2d` / `BlockLinear`) when the blocks cover at most
     `BLOCK_MAX_DENSITY` of the surgered layer (channel-granular blocks: whole input channels)
     or `ELEMENT_BLOCK_MAX_DENSITY` (element-granular blocks, whose column gather costs more);
   - linear layers with a constant fan-in mask (SRigL) run condensed (`condensed.
     CondensedLinear`) when the fan-in is at most `CONDENSED_MAX_DENSITY` of the inputs; a
     condensed layer whose output goes through elementwise operations to another one hands it
     over transposed, the layout the condensed kernels work in, and such a run of layers in an
     nn.Sequential goes tile by tile through all of them (`CondensedLinear.link`);
   - everything else stays a dense layer with the zeros folded in ("dense").
   Some layers always stay dense, with the reason in `describe`: a subclass that overrides
   `forward` and was not frozen (timm's `Conv2dSame`, which pads by the input's size: rebuilt
   from weight/stride/padding it would compute another function), and a layer whose
   forward never runs because its owner reads its parameters (`nn.MultiheadAttention.
   out_proj`). Surgery cuts channels of a forward-overriding layer only where a copy, cut the
   same way, computes the kept channels of what it computed before (checked on random inputs).
   With `autotune=True` each executor layer's kernels and the dense layer are timed on
   inputs of `batch_size` (captured from `example_inputs`), and the fastest is kept;
3. with `absorb=True`, regrouped conv layers run as one grouped conv, their channel gathers
   absorbed into the neighbouring layers where the graph allows it (`absorb.absorb_gathers`;
   what happened to each gather is in `describe`, `gathers`).

The result is checked against the masked model (relative error <= `VERIFY_TOLERANCE`) on
`example_inputs`, on a batch of another size and, where the model takes it, on inputs of another
(odd) spatial size, before it is returned. If it deviates with executors, the dense layers are
put back (a warning, and the reason in `describe`); if it still deviates, compact refuses.
"""
from __future__ import annotations

import importlib
import importlib.util
import statistics
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import TicketsmithError, UsageError
from ..masks import Block, Masks, copy_module
from ..models.attention import replace_module as _set_module
from .channel import (ChannelMap, SurgeryReport, as_inputs, flat_tensors, grouped_in_select,
                      opaque_reason, out_in_view, remove_dead_channels)
from .freeze import cuttable_norms, freeze_computed_weights, restore_norms
from .heads import HeadReport, remove_dead_heads

# Above these densities (kept fraction of the surgered layer) a sparse executor is not worth
# it on a CPU (see docs/BENCHMARKS.md): channel-granular blocks reached 2.1-2.6x at 25% density
# but carry a gather + per-block launch cost; element-granular blocks lost to dense (0.32-0.41x)
# at 25% because of the column gather; condensed kernels do ~3x the work per kept weight of a
# dense GEMM (index loads, gathers), so above ~1/3 density dense wins.
BLOCK_MAX_DENSITY = 0.6
ELEMENT_BLOCK_MAX_DENSITY = 0.1
CONDENSED_MAX_DENSITY = 0.3
# compact() refuses to return a model that deviates more than this (relative to the largest
# output magnitude) from the masked model, on the example inputs and on inputs of another batch
# size and (where the model takes them) another spatial size: that would be a bug here. Exact
# rewrites differ from the masked model by summation order only (~1e-7 in float32); a layer
# that computes another function (wrong padding) shows as 1e-4..1e-2 and must not pass.
VERIFY_TOLERANCE = 1e-4
# autotune's name for the plain dense layer the executor replaced (timed with its kernels)
DENSE_LAYER = "dense-layer"

_EXECUTORS = {  # class name -> module, the only classes save/load will instantiate
    "BlockConv2d": "ticketsmith.compact.blocks",
    "BlockLinear": "ticketsmith.compact.blocks",
    "CondensedLinear": "ticketsmith.compact.condensed",
    "GroupedConv2d": "ticketsmith.compact.absorb",
}

__all__ = ["compact", "absorb_gathers", "describe", "effective", "save", "load", "export_onnx", "onnx_session", "run_onnx",
           "remove_dead_channels", "ChannelMap", "SurgeryReport", "BLOCK_MAX_DENSITY",
           "ELEMENT_BLOCK_MAX_DENSITY", "CONDENSED_MAX_DENSITY"]


def executor_class(name: str) -> type | None:
    """The executor class `name` if its module is present (None if it is not installed)."""
    mod = _EXECUTORS.get(name)
    if mod is None or importlib.util.find_spec(mod) is None:
        return None
    return getattr(importlib.import_module(mod), name, None)


def is_executor(module: nn.Module) -> bool:
    """True if `module` is one of the executor classes save/load know."""
    cls = type(module)
    return cls.__name__ in _EXECUTORS and cls.__module__ == _EXECUTORS[cls.__name__]


# -- running the model with a clear error ------------------------------------------------------
def run_model(model: nn.Module, inputs: tuple) -> Any:
    """model(*inputs) without gradients; a failure becomes a UsageError naming the layer."""
    try:  # without hooks first: hooks would change the path a chain of condensed layers takes
        with torch.no_grad():
            return model(*inputs)
    except Exception as e:  # noqa: BLE001 - run again, with hooks naming the failing layer
        failure = e
    current: list[str] = []
    names = {m: n for n, m in model.named_modules()}

    def pre(m, _args):
        current.append(names.get(m, type(m).__name__))

    def post(m, _args, _out):
        if current:
            current.pop()

    hooks = [m.register_forward_pre_hook(pre) for m in model.modules() if m is not model]
    hooks += [m.register_forward_hook(post) for m in model.modules() if m is not model]
    try:
        with torch.no_grad():
            model(*inputs)
    except Exception as e:
        failure = e
    finally:
        for h in hooks:
            h.remove()
    where = f" at layer {current[-1]!r}" if current else ""
    shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
    msg = str(failure).splitlines()[0][:200] if str(failure) else type(failure).__name__
    raise UsageError(f"example inputs of shape {shapes} do not fit "
                     f"{type(model).__name__}{where}: {msg}") from None


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = float(a.abs().max()) if a.numel() else 0.0
    return float((a - b).abs().max()) / max(scale, 1e-12) if a.numel() else 0.0


# -- masks through surgery -----------------------------------------------------------------------
def _restrict(mask: torch.Tensor, cm: ChannelMap, module: nn.Module) -> torch.Tensor:
    """The mask of a layer after surgery, in the layer's own weight layout."""
    m = out_in_view(module, mask).index_select(0, cm.out)
    if m.dim() >= 2 and m.shape[1] != out_in_view(module, module.weight).shape[1]:
        # inputs were cut; a grouped conv's mask holds one group's inputs per row (a depthwise
        # conv's is one wide, before and after: nothing to select there)
        grouped = isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1
        m = grouped_in_select(m, module.groups, cm.inp) if grouped else m.index_select(1, cm.inp)
    return out_in_view(module, m)


def _remap_blocks(name: str, blocks: Sequence[Block], mask_shape, cm: ChannelMap) -> list[Block]:
    """Blocks of the original layer in the coordinates of the surgered one."""
    c_out, c_in = mask_shape[0], mask_shape[1]
    k = 1
    for s in mask_shape[2:]:
        k *= s
    new_row = torch.full((c_out,), -1, dtype=torch.long)
    new_row[cm.out] = torch.arange(len(cm.out))
    new_ch = torch.full((c_in,), -1, dtype=torch.long)
    new_ch[cm.inp] = torch.arange(len(cm.inp))
    out = []
    for i, b in enumerate(blocks):
        rows, cols = torch.as_tensor(b.rows, dtype=torch.long), torch.as_tensor(b.cols, dtype=torch.long)
        if rows.numel() and (rows.min() < 0 or rows.max() >= c_out):
            raise UsageError(f"block {i} of {name!r} has rows outside 0..{c_out - 1}")
        if cols.numel() and (cols.min() < 0 or cols.max() >= c_in * k):
            raise UsageError(f"block {i} of {name!r} has columns outside 0..{c_in * k - 1}")
        r = new_row[rows]
        r = r[r >= 0]
        ch = new_ch[cols // k]
        keep = ch >= 0
        c = ch[keep] * k + cols[keep] % k
        if r.numel() and c.numel():
            out.append(Block(r, c))
    return out


def _channel_granular(blocks: Sequence[Block], k: int) -> bool:
    """True if every block's columns are whole input channels (all k kernel positions)."""
    for b in blocks:
        ch, counts = torch.unique(b.cols // k, return_counts=True)
        if not bool((counts == k).all()):
            return False
    return True


def _params(module: nn.Module) -> int:
    """Stored floating-point values of a layer (weights, biases, block / condensed values)."""
    return sum(t.numel() for t in module.state_dict().values() if t.is_floating_point())


def _kind(module: nn.Module) -> str:
    return type(module).__name__.lower()


def _dispatch(name: str, layer: nn.Module, mask: torch.Tensor | None, orig_mask_shape,
              blocks: Sequence[Block] | None, constant_fan_in: bool,
              cm: ChannelMap, called: bool = True) -> tuple[nn.Module, str]:
    """Choose the executor of one surgered layer; returns the module and the reason."""
    if mask is None:
        return layer, "no mask"
    why = opaque_reason(layer)
    if why is not None:
        return layer, f"kept dense (zeros folded in): {why}"
    if not called:
        # e.g. nn.MultiheadAttention reads out_proj.weight / .bias itself: an executor would
        # have no `.weight` for it, and nothing would ever call the executor's forward
        return layer, ("kept dense (zeros folded in): its forward never runs, its owner reads "
                       "its parameters directly")
    if (blocks is not None or constant_fan_in) and type(layer) not in (nn.Conv2d, nn.Linear):
        # an executor computes the plain torch layer and has none of a subclass's attributes,
        # which its owner may read: such a layer keeps its own class
        kind = "blocks" if blocks is not None else "a constant fan-in mask"
        return layer, f"kept dense (zeros folded in): {kind} on a {type(layer).__name__}"
    numel = mask.numel()
    if blocks is not None:
        # (a depthwise conv cut to one channel has groups 1 now: its blocks' columns are still
        # positions within a group, which its surviving input channel is not)
        was_grouped = isinstance(layer, nn.Conv2d) and cm.inp.numel() > 0 \
            and int(cm.inp.max()) >= orig_mask_shape[1]
        is_conv2d = isinstance(layer, nn.Conv2d) and layer.groups == 1 and not was_grouped
        if not (is_conv2d or isinstance(layer, nn.Linear)):
            what = "grouped Conv2d" if isinstance(layer, nn.Conv2d) else type(layer).__name__
            return layer, f"kept dense (zeros folded in): no block executor for a {what}"
        remapped = _remap_blocks(name, blocks, orig_mask_shape, cm)
        union = torch.zeros(mask.shape[0], numel // mask.shape[0], dtype=torch.bool)
        area = 0
        for b in remapped:
            union[b.rows.unsqueeze(1), b.cols.unsqueeze(0)] = True
            area += b.rows.numel() * b.cols.numel()
        outside = mask.reshape(union.shape) & ~union
        if bool(outside.any()):
            raise UsageError(f"mask of {name!r} keeps {int(outside.sum())} weights outside its "
                             "blocks: the blocks do not describe the mask")
        k = numel // (mask.shape[0] * mask.shape[1])
        granular = _channel_granular(remapped, k)
        limit = BLOCK_MAX_DENSITY if granular else ELEMENT_BLOCK_MAX_DENSITY
        density = area / max(numel, 1)
        kind = "channel" if granular else "element"
        if density > limit:
            return layer, f"{kind}-granular blocks cover {density:.0%} > {limit:.0%}"
        cls = executor_class("BlockConv2d" if is_conv2d else "BlockLinear")
        if cls is None:
            return layer, "block executor not installed"
        if is_conv2d and layer.padding_mode != "zeros":
            return layer, f"padding mode {layer.padding_mode!r} has no block executor"
        ex = (cls.from_conv(layer, remapped, name=name) if is_conv2d
              else cls.from_linear(layer, remapped, name=name))
        return ex, f"{len(remapped)} {kind}-granular blocks, {density:.0%} of the layer"
    if constant_fan_in and isinstance(layer, nn.Linear):
        nnz = mask.sum(dim=1)
        k = int(nnz.max()) if nnz.numel() else 0
        if k == 0:
            return layer, "no weight left"
        if k > CONDENSED_MAX_DENSITY * mask.shape[1]:
            return layer, f"fan-in {k}/{mask.shape[1]} > {CONDENSED_MAX_DENSITY:.0%}"
        cls = executor_class("CondensedLinear")
        if cls is None:
            return layer, "condensed executor not installed"
        padded = _pad_fan_in(mask, k)
        return cls.from_linear(layer, padded, name=name), f"constant fan-in {k}/{mask.shape[1]}"
    return layer, "dense"


def _pad_fan_in(mask: torch.Tensor, k: int) -> torch.Tensor:
    """Surgery can drop some of a row's inputs (dead channels); pad every nonzero row back to
    fan-in k with positions whose weight is zero (masked), so the fan-in is constant again."""
    mask = mask.clone()
    nnz = mask.sum(dim=1)
    for r in torch.nonzero((nnz > 0) & (nnz < k)).flatten().tolist():
        free = torch.nonzero(~mask[r]).flatten()[: k - int(nnz[r])]
        mask[r, free] = True
    return mask


def _constant_fan_in(mask: torch.Tensor) -> bool:
    nnz = mask.reshape(mask.shape[0], -1).sum(dim=1)
    nz = nnz[nnz > 0]
    return nz.numel() > 0 and bool((nz == nz[0]).all()) and int(nz[0]) < mask[0].numel()


def _verify(model: nn.Module, checks: list[tuple[str, tuple, list[torch.Tensor]]]
            ) -> tuple[float, str | None]:
    """The largest relative error of `model` against the masked model's outputs in `checks`,
    and what went wrong (None if within VERIFY_TOLERANCE everywhere)."""
    err = 0.0
    for what, x, expected in checks:
        try:
            result = flat_tensors(run_model(model, x))
        except UsageError as e:  # the masked model ran on these inputs: this one must too
            return err, (f"compact model fails on {what} where the masked model ran ({e}): a "
                         "bug in compaction")
        if len(result) != len(expected) or any(a.shape != b.shape for a, b in zip(expected, result)):
            return err, (f"compact model's outputs on {what} have other shapes than the masked "
                         "model's: a bug in channel surgery")
        e = max((_rel_err(a, b) for a, b in zip(expected, result)), default=0.0)
        if e > VERIFY_TOLERANCE:
            return err, (f"compact model deviates from the masked model by {e:.2e} (relative) "
                         f"on {what}: a bug in compaction")
        err = max(err, e)
    return err, None


def _called_layers(model: nn.Module, inputs: tuple) -> set[str]:
    """Names of the conv / linear layers whose own forward runs on `inputs` (a layer whose
    parameters its owner reads directly, as attention reads `out_proj.weight`, is not one)."""
    seen: set[str] = set()
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: seen.add(n))
             for n, m in model.named_modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    try:
        run_model(model, inputs)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _check_inputs(model: nn.Module, inputs: tuple) -> list[tuple[str, tuple, list[torch.Tensor]]]:
    """Inputs besides the example to check the compact model on, with the masked model's
    outputs: another batch size, and (for inputs with spatial dimensions) another spatial size,
    each where the masked model runs on it. A layer rebuilt with the wrong padding, or an index
    tied to the example's batch, agrees at the example and nowhere else."""
    if not inputs or not all(t.is_floating_point() and t.dim() >= 2 for t in inputs):
        return []
    g = torch.Generator().manual_seed(0)
    batch = inputs[0].shape[0] + 1
    variants = [("inputs of batch size %d" % batch,
                 tuple(torch.randn((batch,) + tuple(t.shape[1:]), generator=g).to(t)
                       for t in inputs))]
    if all(t.dim() >= 3 for t in inputs):
        # odd sizes: TF-"same" padding and strided layers differ there from the example
        variants.append(("inputs of another spatial size", tuple(
            torch.randn((1, t.shape[1]) + tuple(s + 3 for s in t.shape[2:]), generator=g).to(t)
            for t in inputs)))
    out = []
    for what, x in variants:
        try:
            out.append((what, x, flat_tensors(run_model(model, x))))
        except UsageError:
            continue  # the model takes one size only (a flatten into a fixed linear layer)
    return out


# -- autotune ------------------------------------------------------------------------------------
def capture_calls(model: nn.Module, inputs: tuple, names: Sequence[str]) -> dict[str, tuple]:
    """(args, kwargs) of the first call of each named module of `model` on `inputs`."""
    got: dict[str, tuple] = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, args, kwargs, n=n: got.setdefault(n, (args, kwargs)) and None, with_kwargs=True)
        for n in names]
    try:
        run_model(model, inputs)
    finally:
        for h in hooks:
            h.remove()
    return got


def _capture_inputs(model: nn.Module, inputs: tuple, names: Sequence[str]) -> dict[str, torch.Tensor]:
    return {n: args[0].detach() for n, (args, _) in capture_calls(model, inputs, names).items()}


def _time_candidates(cands: dict[str, tuple[Any, Any]], x: torch.Tensor,
                     rounds: int = 7) -> dict[str, float]:
    """Median seconds per call of each candidate (prepare, run), interleaved round by round
    since the machine drifts; `prepare` (switching kernels) is not timed."""
    times: dict[str, list[float]] = {k: [] for k in cands}
    with torch.inference_mode():
        for prepare, run in cands.values():
            if prepare is not None:
                prepare()
            run(x)
        for _ in range(rounds):
            for k, (prepare, run) in cands.items():
                if prepare is not None:
                    prepare()
                t0 = time.perf_counter()
                run(x)
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _autotune(model: nn.Module, inputs: tuple, batch_size: int | None,
              dense: dict[str, nn.Module], rows: dict[str, dict]) -> None:
    names = list(dense)
    if not names:
        return
    captured = _capture_inputs(model, inputs, names)
    for n in names:
        ex = model.get_submodule(n)
        x = captured.get(n)
        if x is None:  # the layer did not run on the example inputs
            continue
        b = batch_size or x.shape[0]
        x = x[torch.arange(b) % x.shape[0]].contiguous()
        cands = {c: (lambda c=c, ex=ex: ex.use(c), ex) for c in ex.candidates()}
        cands[DENSE_LAYER] = (None, dense[n])
        times = _time_candidates(cands, x)
        best = min(times, key=times.get)
        rows[n]["autotune"] = {"batch_size": b, "seconds": times}
        if best in ("dense", DENSE_LAYER):  # the plain layer does what a folded kernel does
            _set_module(model, n, dense[n])
            rows[n].update(executor="dense", module=type(dense[n]).__name__,
                           params_after=_params(dense[n]), reason="autotune: dense fastest")
        else:
            ex.use(best)
            rows[n].update(executor=best, reason=rows[n]["reason"] + f"; autotune: {best}")


# -- the entry point ----------------------------------------------------------------------------
def compact(model: nn.Module, masks: Masks | Mapping[str, torch.Tensor], example_inputs: Any, *,
            autotune: bool = False, batch_size: int | None = None,
            absorb: bool = False) -> nn.Module:
    """A physically smaller model computing what `model` with `masks` applied computes in eval
    mode: dead channels removed, block / condensed executors where the masks' structure pays,
    dense layers with the zeros folded in elsewhere. `model` is not modified. `example_inputs`
    (a tensor or a tuple of the model's positional arguments) drive the graph tracing, the check
    of the result, and `autotune` (which times each executor layer's kernels and the dense
    layer at `batch_size`, default the example batch, and keeps the fastest). With `absorb`,
    regrouped conv layers run as one grouped conv with their channel gathers absorbed into
    the neighbouring layers where the graph allows it (`absorb.absorb_gathers`)."""
    if not isinstance(model, nn.Module):
        raise UsageError(f"compact() takes an nn.Module, got {type(model).__name__}")
    inputs = as_inputs(example_inputs)
    if not isinstance(masks, Masks):
        if not isinstance(masks, Mapping):
            raise UsageError(f"masks must be a Masks or a mapping, got {type(masks).__name__}")
        masks = Masks(masks)
    masks.check(model)
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise UsageError(f"batch_size must be a positive integer, got {batch_size!r}")
    modules = dict(model.named_modules())
    for key in masks.blocks:
        owner = modules.get(key.rpartition(".")[0])
        if not isinstance(owner, (nn.modules.conv._ConvNd, nn.Linear)) or not key.endswith(".weight"):
            raise UsageError(f"blocks given for {key!r}, which is not a conv or linear weight")

    work = copy_module(model)
    work.eval()
    grad_flags = {n: p.requires_grad for n, p in work.named_parameters()}
    masks.apply(work)
    called = _called_layers(work, inputs)
    reference = flat_tensors(run_model(work, inputs))
    checks = _check_inputs(work, inputs)

    before = {n: (list(m.weight.shape), _params(m)) for n, m in work.named_modules()
              if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))}
    masks, frozen = _freeze(work, masks, inputs)
    norms = cuttable_norms(work)
    heads = remove_dead_heads(work, inputs)
    surgery = _after_heads(remove_dead_channels(work, inputs), heads)  # sees the cut Linears
    restore_norms(work, norms)

    rows: dict[str, dict] = {}
    executors: dict[str, str] = {}
    dense_alt: dict[str, nn.Module] = {}
    for name, layer in list(work.named_modules()):
        if name not in before:
            continue
        key = f"{name}.weight" if name else "weight"
        cm = surgery.kept[name]
        mask = _restrict(masks[key], cm, layer) if key in masks else None
        blocks = masks.blocks.get(key)
        fan_in = key in masks and mask is not None and _constant_fan_in(masks[key])
        new, reason = _dispatch(name, layer, mask, masks[key].shape if key in masks else None,
                                blocks, fan_in, cm, called=name in called)
        if new is not layer and not autotune:
            # the executor's own rule for the batch (default: batch 1, set at construction);
            # when that rule says "dense", the plain dense layer is the simpler module
            if batch_size is not None and hasattr(new, "select"):
                new.select(batch_size)
            if new.executor == "dense":
                new, reason = layer, reason + "; the executor's rule picks dense"
        if new is not layer:
            _set_module(work, name, new)
            dense_alt[name] = layer
        executor = getattr(new, "executor", "dense") if new is not layer else "dense"
        executors[name] = executor
        rows[name] = {"layer": name, "kind": _kind(layer), "module": type(new).__name__,
                      "executor": executor, "reason": reason,
                      "shape_before": before[name][0], "shape_after": list(layer.weight.shape),
                      "params_before": before[name][1], "params_after": _params(new),
                      "density": (float(mask.float().mean()) if mask is not None else 1.0),
                      # why channel surgery could not shrink the group of its output channels
                      "group_left_whole": surgery.whole.get(name)}
        if name in frozen:
            rows[name]["reason"] = (f"frozen from a {frozen[name]} (the weight its forward "
                                    f"computes); {reason}")
        if name in heads.notes:  # a Linear of an attention module: what became of its heads
            rows[name]["heads"] = heads.notes[name]

    for n, p in work.named_parameters():  # executors set their own flags
        if n in grad_flags:
            p.requires_grad_(grad_flags[n])
        p.grad = None
    work.eval()
    if autotune:
        _autotune(work, inputs, batch_size, dense_alt, rows)
        executors = {n: r["executor"] for n, r in rows.items()}

    link = getattr(executor_class("CondensedLinear"), "link", None)
    if link is not None:  # consecutive condensed layers hand their activations over transposed
        for producer, consumer in link(work).items():
            rows[producer]["reason"] += f"; output handed to {consumer!r} transposed"

    checks = [("the example inputs", inputs, reference)] + checks
    err, failure = _verify(work, checks)
    swapped = [n for n, layer in dense_alt.items() if work.get_submodule(n) is not layer]
    if failure is not None and swapped:
        # an executor that does not compute its layer is a bug, but it must not cost the user
        # the model: the dense layers (zeros folded in) go back, the reason is on record
        for n in swapped:
            _set_module(work, n, dense_alt[n])
            rows[n].update(executor="dense", module=type(dense_alt[n]).__name__,
                           params_after=_params(dense_alt[n]),
                           reason=f"kept dense (zeros folded in): with executors, {failure}")
            executors[n] = "dense"
        warnings.warn(f"compact: {failure}; {len(swapped)} executor layer(s) replaced by dense "
                      "layers (see ts.compact.describe)", stacklevel=2)
        if link is not None:  # the hand-offs and chains of the layers that are left
            link(work)
        err, failure = _verify(work, checks)
    if failure is not None:
        raise TicketsmithError(failure)

    work.ticketsmith_executors = executors
    work.ticketsmith_compact = {
        "source": _source(model, inputs, reference),
        "tree": [[n, type(m).__name__] for n, m in model.named_modules()],
        "layers": [rows[n] for n in before if n in rows],
        "removed_channels": surgery.removed,
        "skipped_groups": surgery.skipped,
        "removed_heads": heads.removed,
        "heads_left_whole": heads.whole,
        "split_sizes": surgery.split_sizes,
        "param_shapes": surgery.param_shapes,
        "frozen": frozen,
        "verified_rel_err": err,
    }
    if absorb:
        try:
            work = absorb_checked(work, checks)  # against the masked model's outputs
        except TicketsmithError as e:  # a bug there must not cost the user the compact model
            warnings.warn(f"compact: {e}; the gathers are kept", stacklevel=2)
    return work


def effective(model: nn.Module, masks: Masks | Mapping[str, torch.Tensor], example_inputs: Any) -> dict:
    """The sparsity that is true: what a ticket keeps once channel surgery has removed every
    dead, unread or folded constant channel (a refilled row is dense over inputs whose channels were dropped;
    those weights multiply exact zeros and the compact model does not have them).

    Returns `sparsity` (of the mask), `effective_sparsity` (1 - weights the mask keeps that
    survive surgery / all masked weights), and the parameter counts `params` (the model) and
    `compact_params` (the model after channel surgery: what a compact ticket stores, zeros of
    unstructured masks included). A layer compaction freezes (`freeze`: a weight-standardised
    conv) counts the nonzeros of the weight it applies, not of its mask. `model` is not
    modified."""
    if not isinstance(masks, Masks):
        masks = Masks(masks)
    masks.check(model)
    inputs = as_inputs(example_inputs)
    work = copy_module(model)
    work.eval()
    masks.apply(work)
    true, _ = _freeze(work, masks, inputs)  # a frozen layer keeps the nonzeros it applies
    cuttable_norms(work)
    heads = remove_dead_heads(work, inputs)  # first: channel surgery sees the cut Linears
    surgery = _after_heads(remove_dead_channels(work, inputs), heads)
    kept = 0
    for key in true.weight_names:
        name = key.rpartition(".")[0]
        layer = work.get_submodule(name)
        kept += int(_restrict(true[key], surgery.kept[name], layer).sum())
    total = true.numel()
    return {"sparsity": masks.sparsity(), "effective_sparsity": 1.0 - kept / total if total else 0.0,
            "params": sum(p.numel() for p in model.parameters()),
            "compact_params": sum(p.numel() for p in work.parameters())}


def _freeze(work: nn.Module, masks: Masks, inputs: tuple) -> tuple[Masks, dict[str, str]]:
    """Freeze `work`'s layers that compute their weight (`freeze.freeze_computed_weights`);
    the masks with each frozen layer's mask (its parameters') replaced by the nonzeros of the
    weight it applies, the true structure, and its blocks dropped (they described the mask)."""
    frozen = freeze_computed_weights(work, inputs)
    if not frozen:
        return masks, frozen
    under = {k: next((n for n in frozen if k.startswith(n + ".")), None) for k in masks}
    kept = {k: v for k, v in masks.items() if under[k] is None}
    for n in sorted({n for n in under.values() if n is not None}):
        kept[f"{n}.weight"] = work.get_submodule(n).weight.detach() != 0
    blocks = {k: v for k, v in masks.blocks.items() if under[k] is None}
    return Masks(kept, blocks, masks.companions), frozen


def _after_heads(surgery: SurgeryReport, heads: HeadReport) -> SurgeryReport:
    """The channel maps of `surgery` in the coordinates of the layers before head surgery (which
    ran first: channel surgery saw the Linears already cut)."""
    for name, (out, inp) in heads.cuts.items():
        cm = surgery.kept[name]
        if out is not None:
            cm.out = out[cm.out]
        if inp is not None:
            cm.inp = inp[cm.inp]
    return surgery


def _source(model: nn.Module, inputs: tuple, outputs: list[torch.Tensor]) -> dict:
    """How to rebuild the original architecture: the zoo name and creation arguments."""
    name = getattr(model, "ticketsmith_name", None)
    if name is None:
        return {"zoo": None, "args": None}
    config = getattr(model, "ticketsmith_config", None)  # recorded by models.create
    args = {k: v for k, v in config.items() if k != "name"} if config else None
    if args is None:  # not recorded: infer what the inputs and outputs show
        x = inputs[0]
        args = {"in_channels": int(x.shape[1]) if x.dim() >= 2 else 1,
                "num_classes": int(outputs[0].shape[-1]) if outputs else 10,
                # a flat input (an MLP's): in_channels * 1 * 1 features
                "image_size": [int(s) for s in x.shape[2:4]] if x.dim() >= 4 else [1, 1],
                "width": None}
    return {"zoo": name, "args": {k: (list(v) if isinstance(v, tuple) else v)
                                  for k, v in dict(args).items()}}


def describe(model: nn.Module) -> list[dict]:
    """Per conv / linear layer of a compact model: layer, kind, module, executor (live), reason,
    shapes and stored parameters before / after, mask density, and `group_left_whole`: why
    channel surgery left the channel group of its outputs whole (None where it did not: a
    channel shuffle, a pad adding channels, attention, ... keep their groups whole, dead
    channels and all, with the zeros folded in). The Linears of an attention module also have `heads`:
    how many heads head surgery kept, or why the module kept them all. The model's
    `ticketsmith_compact` holds per attention module `removed_heads` (heads before / after)
    and `heads_left_whole` (the reason), per module whose forward splits the channels by
    sizes it holds (timm's MixNet, FocalNet), views a parameter to a shape it holds (timm's
    layer `Scale`) or reshapes data to a width it holds (torchvision's ViT `hidden_dim`)
    `split_sizes`: the sizes it holds now (the width: an int), and per parameter of no torch layer
    whose channels went (a layer scale) `param_shapes`: its shape now."""
    info = getattr(model, "ticketsmith_compact", None)
    if info is None:
        raise UsageError("describe() takes a model returned by ticketsmith.compact.compact()")
    out = []
    for row in info["layers"]:
        row = dict(row)
        try:
            m = model.get_submodule(row["layer"])
        except AttributeError:
            m = None
        if m is not None:
            # a regrouped layer whose gathers were absorbed is a plain (grouped) nn.Conv2d
            row["executor"] = (getattr(m, "executor", "dense") if is_executor(m) else
                               "grouped" if row.get("gathers") else "dense")
            row["module"] = type(m).__name__
            row["params_after"] = _params(m)
        out.append(row)
    return out


from .onnx_export import export_onnx, onnx_session, run_onnx  # noqa: E402
from .serialize import load, save  # noqa: E402
from .absorb import absorb_checked, absorb_gathers  # noqa: E402


class _CallableModule(type(importlib)):
    """`ts.compact(model, masks, example_inputs)` as the issue spells it, while `ts.compact`
    stays the subpackage (`ts.compact.save`, `ts.compact.describe`, ...)."""

    def __call__(self, model: nn.Module, masks: Masks | Mapping[str, torch.Tensor],
                 example_inputs: Any, **kwargs: Any) -> nn.Module:
        return compact(model, masks, example_inputs, **kwargs)


import sys as _sys  # noqa: E402

_sys.modules[__name__].__class__ = _CallableModule
