"""Attention heads: the structured unit of a multi-head attention layer.

A timm-style attention module holds an integer `num_heads`, one fused Linear producing q, k and
v (`qkv`, 3 * num_heads * head_dim outputs) and an output projection reading the
num_heads * head_dim concatenated head outputs (`proj`). Its forward reshapes the qkv output to
[..., 3, num_heads, head_dim], so head h owns rows `s * A + h * head_dim + (0 .. head_dim-1)`
of the qkv weight (s = 0, 1, 2 for q, k, v; A = num_heads * head_dim) and the columns
`h * head_dim + (0 .. head_dim-1)` of the projection.

The modules are recognised by that shape pattern (not by class or attribute names): an integer
`num_heads`, exactly one direct Linear child with 3 * A outputs and exactly one other with A
inputs (A from `head_dim` where the module has one). A 1x1 convolution (stride 1, no padding,
one group) counts as a Linear over channels (timm's CoAtNet attention on NCHW maps). A module
whose `head_first` is True lays the qkv rows out head by head instead ([num_heads, 3,
head_dim]: timm's MaxViT / CoAtNet "rw" models): head h owns rows `h * 3 * head_dim + s *
head_dim + (0 .. head_dim-1)`.

timm's LeViT family (EfficientFormer, TinyViT, LeViT) gives each head's q and k `key_dim`
features and its v `val_dim` (`AttentionHeads.v_dim`), in one fused Linear laid out head by
head (LeViT's downsampling attention: `q`, and `kv` head by head); a module naming both widths
is read that way.

Where q, k and v come from more than one Linear, the Linears are found by their names (the only
way to tell `q` from `proj` when both map A features to A):
- `q` (A outputs), `kv` (2 * A outputs, the k rows then the v rows) and `proj` (A inputs):
  attention computing keys and values from other tokens than the queries (PVT's and Twins'
  spatial reduction);
- one each of `q` / `query` / `q_proj`, `k` / `key` / `k_proj`, `v` / `value` / `v_proj` (A
  outputs each) and `proj` / `out_proj` / `o_proj` / `out` (A inputs): attention as many users
  write it;
- `qk` (2 * A outputs, the q rows then the k rows), `v` and `proj` (timm's TNT).

Whether the forward really lays the rows out that way is not read from the code: refill only
masks rows by this layout, and compaction accepts a cut only where a copy of the module, cut
this way, computes what it computed before (checked on random inputs).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class AttentionHeads:
    """One attention module of the timm pattern: its name, its qkv and projection Linears
    (module names) and its head geometry. Where `kv` is set, `qkv` holds the queries only and
    `kv` the keys and values (the keys only where `v` is set too); where only `v` is set,
    `qkv` holds the queries and keys and `v` the values."""
    module: str
    qkv: str
    proj: str
    num_heads: int
    head_dim: int
    kv: str | None = None
    head_first: bool = False
    v: str | None = None  # the values' Linear, where they have one of their own

    v_dim: int | None = None  # each head's value width, where it is not head_dim (LeViT family)

    @property
    def width(self) -> int:
        """The width of q and of k (num_heads * head_dim)."""
        return self.num_heads * self.head_dim

    @property
    def v_width(self) -> int:
        """The width of v, which the projection reads (num_heads * v_dim)."""
        return self.num_heads * (self.v_dim or self.head_dim)

    def dim(self, part: int) -> int:
        """Each head's width in `part` (0 = q, 1 = k, 2 = v)."""
        return (self.v_dim or self.head_dim) if part == 2 else self.head_dim

    def inputs(self) -> list[tuple[str, tuple[int, ...]]]:
        """The Linears computing q, k and v, each with the parts it holds in its rows, in
        order (0 = q, 1 = k, 2 = v)."""
        if self.kv is None:
            return [(self.qkv, (0, 1, 2))] if self.v is None else [(self.qkv, (0, 1)), (self.v, (2,))]
        if self.v is None:
            return [(self.qkv, (0,)), (self.kv, (1, 2))]
        return [(self.qkv, (0,)), (self.kv, (1,)), (self.v, (2,))]

    def part_rows(self, held: tuple[int, ...], part: int) -> torch.Tensor:
        """The rows of `part` in a Linear holding the parts `held` (as `inputs()` gives them),
        per head: int64 [num_heads, dim(part)]. The parts lie one after the other (all heads'
        q, then all heads' k, ...), or head by head where `head_first`."""
        i = held.index(part)
        heads = torch.arange(self.num_heads).unsqueeze(1)
        if self.head_first:
            start = heads * sum(self.dim(p) for p in held) + sum(self.dim(p) for p in held[:i])
        else:
            start = sum(self.num_heads * self.dim(p) for p in held[:i]) + heads * self.dim(part)
        return start + torch.arange(self.dim(part))

    def input_rows(self, heads: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per Linear of `inputs()`, the weight rows of `heads` (int64, ascending: the rows
        kept keep the layout)."""
        heads = torch.as_tensor(heads, dtype=torch.int64)
        return {name: torch.cat([self.part_rows(held, p)[heads].flatten() for p in held]).sort().values
                for name, held in self.inputs()}

    def part(self, t: torch.Tensor, held: tuple[int, ...], part: int) -> torch.Tensor:
        """`t` (rows first: a weight, bias or per-row score of a Linear holding the parts
        `held`), its rows of `part` per head: [num_heads, dim(part), ...]."""
        return t[self.part_rows(held, part).to(t.device)]

    def proj_cols(self, heads: torch.Tensor) -> torch.Tensor:
        """The projection's input columns reading `heads` (int64, ascending)."""
        heads = torch.as_tensor(heads, dtype=torch.int64).sort().values
        d = self.dim(2)
        return (heads.unsqueeze(1) * d + torch.arange(d)).flatten()


def _name(parent: str, child: str) -> str:
    return f"{parent}.{child}" if parent else child


def features(layer: nn.Module) -> tuple[int, int] | None:
    """(in, out) features of a Linear or of a 1x1 convolution (stride 1, no padding, one group:
    a Linear over channels); None for any other module."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    if type(layer) is nn.Conv2d and layer.kernel_size == (1, 1) and layer.stride == (1, 1) \
            and layer.padding in ((0, 0), "valid") and layer.groups == 1:
        return layer.in_channels, layer.out_channels
    return None


def attention_heads(model: nn.Module) -> list[AttentionHeads]:
    """Every module of `model` that follows the timm attention pattern (see the module
    docstring), in module order. nn.MultiheadAttention is not one: it reads its fused
    `in_proj_weight` itself (no qkv Linear); `ticketsmith.models.QKVAttention`, which
    `prunable_attention` swaps in for it, is."""
    found = []
    for name, m in model.named_modules():
        nh = getattr(m, "num_heads", None)
        if isinstance(nh, bool) or not isinstance(nh, int) or nh < 1:
            continue
        linears = [(c, features(lin)) for c, lin in m.named_children() if features(lin)]
        per_part = _key_val_heads(name, m, nh, linears)
        if per_part is not None:
            found.append(per_part)
            continue
        hd = getattr(m, "head_dim", None)
        qkv = [(c, io) for c, io in linears if io[1] % (3 * nh) == 0
               and (not isinstance(hd, int) or io[1] == 3 * nh * hd)]
        if len(qkv) != 1:
            split = _split_qkv(name, m, nh, hd)
            if split is not None:
                found.append(split)
            continue
        width = qkv[0][1][1] // 3
        proj = [c for c, io in linears if c != qkv[0][0] and io[0] == width]
        if len(proj) != 1:
            continue  # no projection, or several Linears reading the heads (a gate): not the pattern
        found.append(AttentionHeads(name, _name(name, qkv[0][0]), _name(name, proj[0]),
                                    nh, width // nh, head_first=getattr(m, "head_first", False) is True))
    return found


def _key_val_heads(name: str, m: nn.Module, nh: int, linears) -> AttentionHeads | None:
    """timm's LeViT family (EfficientFormer, TinyViT, LeViT): each head's q and k are `key_dim`
    wide and its v `val_dim`, one fused Linear of num_heads * (2 * key_dim + val_dim) outputs
    lays them out head by head (or, LeViT's downsampling attention, a Linear `q` of num_heads *
    key_dim outputs beside a Linear `kv` of num_heads * (key_dim + val_dim), head by head), and
    the projection reads num_heads * val_dim; None where `m` names no such widths or has no
    such Linears."""
    kd, vd = getattr(m, "key_dim", None), getattr(m, "val_dim", None)
    if not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in (kd, vd)):
        return None
    out = dict((c, io[1]) for c, io in linears)
    if out.get("q") == nh * kd and out.get("kv") == nh * (kd + vd):
        inputs, kv = ["q", "kv"], _name(name, "kv")
    else:
        inputs, kv = [c for c, o in out.items() if o == nh * (2 * kd + vd)], None
    proj = [c for c, (inp, _) in linears if inp == nh * vd and c not in inputs]
    if len(inputs) != (1 if kv is None else 2) or len(proj) != 1:
        return None
    return AttentionHeads(name, _name(name, inputs[0]), _name(name, proj[0]), nh, kd, kv=kv,
                          head_first=True, v_dim=vd)

# The name-based patterns (see the module docstring), tried in order: the Linears computing q,
# k and v (the names each may have, the parts of q, k, v it holds) and the projection's names.
PATTERNS = (
    (((("q",), 1), (("kv",), 2)), ("proj",)),
    (((("qk",), 2), (("v",), 1)), ("proj",)),
    (((("q", "query", "q_proj"), 1), (("k", "key", "k_proj"), 1), (("v", "value", "v_proj"), 1)),
     ("proj", "out_proj", "o_proj", "out")),
)


def _one_linear(m: nn.Module, names) -> str | None:
    """The one child of `m` among `names` that is a Linear, or None (none, or several)."""
    found = [c for c in names if type(getattr(m, c, None)) is nn.Linear]
    return found[0] if len(found) == 1 else None


def _split_qkv(name: str, m: nn.Module, nh: int, hd) -> AttentionHeads | None:
    """The first name-based pattern (see the module docstring) `m` follows, or None."""
    for inputs, proj_names in PATTERNS:
        children = [_one_linear(m, names) for names, _ in inputs]
        proj = _one_linear(m, proj_names)
        if proj is None or None in children:
            continue
        linears = [getattr(m, c) for c in children]
        width = linears[0].out_features // inputs[0][1]
        if width % nh or (isinstance(hd, int) and hd * nh != width):
            return None
        if any(lin.out_features != parts * width for lin, (_, parts) in zip(linears, inputs)) \
                or getattr(m, proj).in_features != width or len({lin.in_features for lin in linears}) != 1:
            return None
        names = [_name(name, c) for c in children]
        # the first Linear holds q (and k where it holds two parts); then k (and v), or v alone
        return AttentionHeads(name, names[0], _name(name, proj), nh, width // nh,
                              kv=names[1] if inputs[0][1] == 1 else None,
                              v=names[-1] if inputs[-1][1] == 1 else None)
    return None


__all__ = ["AttentionHeads", "attention_heads", "features"]
