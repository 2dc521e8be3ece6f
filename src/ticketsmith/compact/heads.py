"""Head surgery: physically remove the dead heads of attention modules.

Channel surgery cannot cut a qkv Linear: its output is reshaped into heads (a reshape the graph
does not map), so its group stays whole. The structured unit there is the head
(`structure.heads`): a head whose v rows and v bias are zero, or whose columns of the output
projection are zero, adds exactly zero to the output, whatever its q and k are (zero q and k
alone give a uniform softmax, not a zero output). Such heads go: their q, k and v rows of the
qkv Linear, their columns of the projection, and the module's `num_heads` (and `attn_dim` /
`all_head_dim`, the derived widths) shrink, with every other tensor of the module that holds one
slice per head (`per_head_tensors`): a Swin relative position bias table's column, a Swin V2
logit scale and the row of its bias MLP's last Linear, the LeViT family's attention biases. A
BatchNorm the module declares over the rows of its qkv Linear (`row_norms`: LeViT's, as
`LevitAttention` holds it) loses the dropped heads' channels with their rows.

A cut is accepted only where a copy of the module, cut this way, computes what the module
computed (on random inputs of the example's shape, of another batch size and of another sequence
length): a forward that lays the heads out otherwise, or that holds another width-sized part (a
norm over all heads, a gate, heads mixed by a Linear), fails the check and the module keeps all
its heads, with the reason on record. So does a forward that reshapes the heads' output to its
input width (many of timm's: CaiT, Twins; `ticketsmith.models.prunable_attention` swaps those
of Swin V2, BEiT, EVA and PVT-v2 for modules that do not). The qkv and projection layers may be
1x1 convolutions (`structure.heads.features`): their channels are cut as a Linear's features. nn.MultiheadAttention keeps its heads (its fused in_proj
weight and the embed_dim = num_heads * head_dim rule inside torch's kernels leave no module to
cut); `ticketsmith.models.prunable_attention` swaps it for a QKVAttention, which follows the
pattern.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..masks import copy_module
from ..structure.heads import AttentionHeads, attention_heads

# Attributes holding the width of all heads in timm's attention modules: they shrink with the
# heads. `key_attn_dim` is that of q (and k): num_heads * head_dim; the others that of v, which
# the projection reads: num_heads * v_dim (the same where v is as wide as q).
WIDTH_ATTRS = ("attn_dim", "all_head_dim", "val_attn_dim", "key_attn_dim")
# TinyViT names its v width `out_dim`: a name too common to touch in other modules.
KEY_VAL_WIDTH_ATTRS = ("out_dim",)

MHA_REASON = ("nn.MultiheadAttention keeps all its heads: it reads its fused in_proj weight "
              "itself and torch's kernels need embed_dim = num_heads * head_dim; "
              "ticketsmith.models.prunable_attention(model) before pruning makes them prunable")


@dataclasses.dataclass
class HeadReport:
    """What head surgery did: per cut Linear, the original rows / columns kept (`cuts`: layer
    name -> (out, inp) int64 indices); per attention module whose heads went, the heads before
    and after and the attributes set (`removed`, as saved with the model); per attention module
    left whole, why (`whole`); per Linear of an attention module, a note for `describe`."""
    cuts: dict[str, tuple[torch.Tensor, torch.Tensor]] = dataclasses.field(default_factory=dict)
    removed: dict[str, dict] = dataclasses.field(default_factory=dict)
    whole: dict[str, str] = dataclasses.field(default_factory=dict)
    notes: dict[str, str] = dataclasses.field(default_factory=dict)


def dead_heads(model: nn.Module, att: AttentionHeads) -> torch.Tensor:
    """Per head: True if it adds exactly zero (v rows and v bias zero, or projection columns
    zero)."""
    name, held = att.inputs()[-1]  # the Linear holding v, its last part
    v_lin, proj = model.get_submodule(name), model.get_submodule(att.proj)
    v_zero = (att.part(v_lin.weight.detach(), held, 2) == 0).flatten(1).all(dim=1)
    if v_lin.bias is not None:
        v_zero &= (att.part(v_lin.bias.detach(), held, 2) == 0).all(dim=1)
    if _local(att, name) in _row_norms(model.get_submodule(att.module)):
        v_zero[:] = False  # a norm's shift follows the zero rows: v is not zero
    w = proj.weight.detach()  # (a 1x1 conv's: [out, in, 1, 1])
    cols = w.reshape(w.shape[0], att.num_heads, att.dim(2), -1)
    return v_zero | (cols == 0).flatten(2).all(dim=2).all(dim=0)


def _cut_linear(lin: nn.Module, out: torch.Tensor | None, inp: torch.Tensor | None) -> None:
    """Keep rows `out` and columns `inp` of a Linear (or of a 1x1 conv: its channels)."""
    with torch.no_grad():
        w = lin.weight
        if out is not None:
            w = w.index_select(0, out.to(w.device))
            if lin.bias is not None:
                lin.bias = nn.Parameter(lin.bias.index_select(0, out.to(w.device)),
                                        requires_grad=lin.bias.requires_grad)
        if inp is not None:
            w = w.index_select(1, inp.to(w.device))
        lin.weight = nn.Parameter(w.contiguous(), requires_grad=lin.weight.requires_grad)
    if isinstance(lin, nn.Linear):
        lin.out_features, lin.in_features = lin.weight.shape
    else:
        lin.out_channels, lin.in_channels = lin.weight.shape[:2]


def _local(att: AttentionHeads, name: str) -> str:
    """A layer's name relative to the attention module."""
    return name[len(att.module) + 1:] if att.module else name


def _row_norms(module: nn.Module) -> dict[str, str]:
    """The norms a module declares over the rows of its q, k, v Linears (`row_norms`: Linear ->
    norm, relative names; LeViT's BatchNorm1d after qkv): their channels go with the rows."""
    return dict(getattr(module, "row_norms", None) or {})


def _cut_norm(norm: nn.Module, rows: torch.Tensor) -> None:
    """Keep channels `rows` of a BatchNorm (its affine parameters and running statistics)."""
    with torch.no_grad():
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            t = getattr(norm, leaf, None)
            if t is None:
                continue
            new = t.detach().index_select(0, rows.to(t.device)).contiguous()
            setattr(norm, leaf, nn.Parameter(new, requires_grad=t.requires_grad)
                    if isinstance(t, nn.Parameter) else new)
    norm.num_features = int(rows.numel())


def _settings(module: nn.Module, att: AttentionHeads, n_keep: int) -> dict:
    """The attributes of `module` that change with the head count, and their new values."""
    new = {"num_heads": n_keep}
    for a in WIDTH_ATTRS + (KEY_VAL_WIDTH_ATTRS if att.v_dim is not None else ()):
        part = 0 if a == "key_attn_dim" else 2
        if getattr(module, a, None) == att.num_heads * att.dim(part):
            new[a] = n_keep * att.dim(part)
    return new


@dataclasses.dataclass(frozen=True)
class PerHead:
    """A tensor of an attention module holding one slice per head along `dim` (a bias table's
    column, a logit scale, a bias MLP's output row). `path` is relative to the attention module;
    `linear` names the Linear whose rows these are, if any."""
    path: str
    dim: int
    linear: str | None = None


def per_head_tensors(module: nn.Module, att: AttentionHeads) -> list[PerHead]:
    """The tensors of `module` (besides its qkv and projection Linears) that hold one slice per
    head. Declared by the module (`per_head_params`: (path, dim) pairs), or else found by shape:
    each floating-point parameter or buffer of the module itself with exactly one dimension of
    `num_heads` entries (timm's Swin bias table). A tensor found so by chance makes the cut copy
    compute another function, so the module keeps its heads (`_differs`)."""
    declared = getattr(module, "per_head_params", None)
    if declared is not None:
        out = []
        for path, dim in declared:
            owner = path.rpartition(".")[0]
            linear = owner if owner and isinstance(module.get_submodule(owner), nn.Linear) else None
            out.append(PerHead(path, int(dim), linear))
        return out
    if att.num_heads < 2:
        return []  # nothing to cut, and every dimension of size 1 would match
    found = []
    for leaf, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
        if t is not None and t.is_floating_point():
            dims = [d for d, n in enumerate(t.shape) if n == att.num_heads]
            if len(dims) == 1:
                found.append(PerHead(leaf, dims[0]))
    return found


def _owner(module: nn.Module, path: str) -> tuple[nn.Module, str]:
    owner, _, leaf = path.rpartition(".")
    return (module.get_submodule(owner) if owner else module), leaf


def _slice_per_head(module: nn.Module, tensors: list[PerHead], keep: torch.Tensor) -> None:
    """Keep the slices of heads `keep` of each per-head tensor (a parameter stays a parameter
    with its requires_grad, a buffer a buffer with its persistence)."""
    for ph in tensors:
        owner, leaf = _owner(module, ph.path)
        t = getattr(owner, leaf)
        with torch.no_grad():
            new = t.detach().index_select(ph.dim, keep.to(t.device)).contiguous()
        if leaf in owner._parameters:
            setattr(owner, leaf, nn.Parameter(new, requires_grad=t.requires_grad))
        else:
            owner.register_buffer(leaf, new, persistent=leaf not in owner._non_persistent_buffers_set)
        if isinstance(owner, nn.Linear) and leaf == "weight":
            owner.out_features = new.shape[0]


def cut_heads(module: nn.Module, att: AttentionHeads, keep: torch.Tensor) -> dict:
    """Cut `module` (the attention module itself, in place) down to the heads `keep`; returns
    what `restore` needs: the attributes set (`set`), the per-head tensors cut (`per_head`) and
    the heads kept (`kept`) and the other Linears whose rows went (`linears`)."""
    tensors = per_head_tensors(module, att)  # found on the module as it is, before the cut
    norms = _row_norms(module)
    for name, rows in att.input_rows(keep).items():
        _cut_linear(module.get_submodule(_local(att, name)), rows, None)
        if _local(att, name) in norms:
            _cut_norm(module.get_submodule(norms[_local(att, name)]), rows)
    _cut_linear(module.get_submodule(_local(att, att.proj)), None, att.proj_cols(keep))
    settings = _settings(module, att, len(keep))
    for a, v in settings.items():
        setattr(module, a, v)
    _slice_per_head(module, tensors, keep)
    _forget_bias_cache(module)
    return {"set": settings, "kept": [int(h) for h in keep],
            "per_head": [[ph.path, ph.dim] for ph in tensors],
            "linears": sorted({ph.linear for ph in tensors if ph.linear})}


def _forget_bias_cache(module: nn.Module) -> None:
    """timm's LeViT family keeps, in eval mode, its gathered attention biases per device
    (`attention_bias_cache`, emptied only by train()): of the heads before the cut."""
    if isinstance(getattr(module, "attention_bias_cache", None), dict):
        module.attention_bias_cache = {}


def _variants(args: tuple, kwargs: dict) -> list[tuple]:
    """Random arguments like the captured ones: the same shapes, then (where every argument is
    a tensor and no keyword argument is one, so no other shape has to follow) one more sample
    and two more tokens. Arguments other than tensors (PVT's map size) are passed as captured."""
    floats = [isinstance(a, torch.Tensor) and a.is_floating_point() for a in args]
    if not any(floats) or any(isinstance(a, torch.Tensor) and not f for a, f in zip(args, floats)):
        return []
    g = torch.Generator().manual_seed(0)

    def like(t, grow):
        if not isinstance(t, torch.Tensor):
            return t
        shape = list(t.shape)
        if grow and len(shape) >= 3:
            shape[0] += 1
            shape[-2] += 2
        return torch.randn(shape, generator=g).to(t)

    out = [tuple(like(a, False) for a in args)]
    if all(floats) and not any(isinstance(v, torch.Tensor) for v in kwargs.values()):
        out.append(tuple(like(a, True) for a in args))
    return out


def _differs(module: nn.Module, cut: nn.Module, args: tuple, kwargs: dict) -> str | None:
    """Why `cut` does not compute what `module` computes on random arguments like the captured
    ones (None if it does)."""
    variants = _variants(args, kwargs)
    if not variants:
        return ("its inputs hold no floating-point tensor (or an integer one): no random inputs "
                "to check a cut on")
    with torch.no_grad():
        for x in variants:
            try:
                ref = module(*x, **kwargs)
            except Exception:  # noqa: BLE001 - the module takes the example's shape only
                if x is variants[0]:
                    return "it does not run on random inputs of the example's shape"
                continue
            try:
                got = cut(*x, **kwargs)
            except Exception:  # noqa: BLE001 - the cut module does not even run
                got = None
            if not _same(ref, got):
                return ("a copy with the dead heads cut computes another function (the forward "
                        "lays out or uses the heads otherwise)")
    return None


def _same(ref, got) -> bool:
    """`got` is `ref` up to rounding: a tensor, or a tuple / list of tensors and Nones (as
    nn.MultiheadAttention returns: the output and, if asked for, the attention weights)."""
    if isinstance(ref, (tuple, list)):
        return isinstance(got, (tuple, list)) and len(ref) == len(got) \
            and all(_same(a, b) for a, b in zip(ref, got))
    if ref is None:
        return got is None
    if not isinstance(ref, torch.Tensor) or not isinstance(got, torch.Tensor) \
            or ref.shape != got.shape:
        return False
    scale = max(float(ref.abs().max()) if ref.numel() else 0.0, 1e-12)
    return not ref.numel() or float((ref - got).abs().max()) <= 1e-5 * scale


def remove_dead_heads(model: nn.Module, inputs: tuple) -> HeadReport:
    """Remove, in place, the dead heads of every timm-style attention module of `model` (eval
    mode, masks applied) where a cut copy computes what the module computed; see the module
    docstring. At least one head of each module is kept."""
    report = HeadReport()
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            report.whole[name] = MHA_REASON
            report.notes[_join(name, "out_proj")] = MHA_REASON
    found = attention_heads(model)
    dying = []
    for att in found:
        dead = dead_heads(model, att)
        if bool(dead.any()):
            dying.append((att, dead))
        else:
            for layer in _layers(att):
                report.notes[layer] = f"no dead head in {att.module or 'the model'}"
    if not dying:
        return report
    from . import capture_calls  # the package imports this module
    calls = capture_calls(model, inputs, [att.module for att, _ in dying])
    for att, dead in dying:
        keep = torch.nonzero(~dead).flatten()
        if keep.numel() == 0:
            keep = torch.zeros(1, dtype=torch.int64)  # no module may end with zero heads
        where = att.module or "the model"
        if att.module not in calls:
            why = f"{where} did not run on the example inputs"
        else:
            module = model.get_submodule(att.module)
            cut = copy_module(module)
            done = cut_heads(cut, att, keep)
            why = _differs(module, cut, *calls[att.module])
            why = f"{where}: {why}" if why else None
        if why is not None:
            report.whole[att.module] = why
            for layer in _layers(att):
                report.notes[layer] = f"kept all {att.num_heads} heads: {why}"
            continue
        cut_heads(model.get_submodule(att.module), att, keep)  # as the copy that passed
        for name, rows in att.input_rows(keep).items():
            report.cuts[name] = (rows, None)
        report.cuts[att.proj] = (None, att.proj_cols(keep))
        report.removed[att.module] = {"heads": [att.num_heads, int(keep.numel())], **done}
        for lin in done["linears"]:  # a bias MLP's last Linear: its rows are heads
            report.cuts[_join(att.module, lin)] = (keep.clone(), None)
        for layer in _layers(att):
            report.notes[layer] = f"kept {keep.numel()} of {att.num_heads} heads of {where}"
    return report


def _layers(att: AttentionHeads) -> list[str]:
    """The module's Linears whose rows or columns are heads: q, k, v and the projection."""
    return [name for name, _ in att.inputs()] + [att.proj]


def _join(parent: str, child: str) -> str:
    return f"{parent}.{child}" if parent else child


def restore(model: nn.Module, removed: dict) -> None:
    """Give the attention modules of a rebuilt model the head counts recorded by `compact`
    (`removed` as in `HeadReport.removed`): their attributes and per-head tensors, cut to the
    heads kept (the saved weights then fill the parameters; a buffer the weights do not hold
    keeps its slices). Their qkv and projection Linears are rebuilt from the description."""
    for name, info in removed.items():
        module = model.get_submodule(name)
        before, after = (int(n) for n in info["heads"])
        for a, v in info["set"].items():
            if a not in ("num_heads",) + WIDTH_ATTRS + KEY_VAL_WIDTH_ATTRS or isinstance(v, bool) \
                    or not isinstance(v, int):
                raise ValueError(f"bad head attribute {a}={v!r}")
            setattr(module, a, v)
        keep = torch.as_tensor(info.get("kept", range(after)), dtype=torch.int64)
        if keep.numel() != after or (keep.numel() and (keep.min() < 0 or keep.max() >= before)):
            raise ValueError(f"kept heads {keep.tolist()} do not fit {before} -> {after} heads")
        recorded = info.get("per_head")
        if recorded is None:  # written before per-head tensors were recorded: declared ones only
            recorded = getattr(module, "per_head_params", ())
        tensors = [PerHead(str(path), int(dim)) for path, dim in recorded]
        # those the description did not rebuild already (a bias MLP's last Linear it did)
        fresh = [ph for ph in tensors
                 if getattr(*_owner(module, ph.path)).shape[ph.dim] == before]
        _slice_per_head(module, fresh, keep)


__all__ = ["HeadReport", "PerHead", "per_head_tensors", "remove_dead_heads", "dead_heads",
           "cut_heads", "restore", "MHA_REASON"]
