"""The attention of torchvision and timm models that no mask or cut reaches, swapped for
modules computing the same function whose heads can go (`prunable_attention`, in
`attention.py`, calls `swap` for every module).

Each original below holds its heads in a way a mask or a cut cannot follow: it adds its q and v
biases through `F.linear` on `qkv.weight` (so the Linear's forward never runs), reshapes the
heads' output to the *input* width (so a module with fewer heads cannot run), or names its
head count `n_heads`. Each swap keeps the original's Linears and per-head tensors (a new `qkv`
Linear where timm's biases must join it), recognises the original by its class name and what it
holds, and computes the same outputs and gradients (tests against replicas of each):

- timm's Swin V2 `WindowAttention` -> `TimmWindowAttentionV2` (a `WindowAttention`);
- timm's BEiT `Attention` -> `BeitAttention`; timm's `EvaAttention` (fused qkv) -> `EvaAttention`;
- timm's PVT-v2 `Attention` and Twins' `GlobalSubSampleAttn` -> `PvtAttention` (q and kv in two
  Linears: `ticketsmith.structure.heads`' q / kv pattern);
- Twins' `LocallyGroupedAttn` -> `GroupedWindowAttention`; timm's XCiT `XCA` -> `XcaAttention`;
- torchvision's MaxViT `RelativePositionalMultiHeadAttention` -> `GridAttention`;
- timm's MaxViT / CoAtNet `AttentionCl` and `Attention2d` -> `MaxxVitAttention` (their relative
  position bias modules size the bias by the head count they were built with);
- timm's CaiT / XCiT `ClassAttn` and CrossViT's `CrossAttention` -> `ClassAttention`;
- timm's LeViT `Attention` and `AttentionDownsample` (on tokens) -> `LevitAttention`,
  `LevitAttentionDownsample` (their Linears hide in LinearNorms).
"""
from __future__ import annotations

import inspect
import math
import sys

import torch
from torch import nn
from torch.nn import functional as F

from .attention import WindowAttention, _qkv_without_keys_bias, _relative_position_index


class TimmWindowAttentionV2(WindowAttention):
    """timm's Swin V2 `WindowAttention` (`timm.models.swin_transformer_v2`): the cosine window
    attention of `WindowAttention(cosine=True)` on windows its block has already cut out
    ([B * windows, N, C]), with the block's shift mask as an argument. timm adds its
    `q_bias`, a zero keys' bias and `v_bias` through `F.linear` on `qkv.weight`, and reshapes
    the heads' output to the input width, so neither a mask nor a cut reaches its heads; here
    the three are the bias of the `qkv` Linear, called as a module (the keys' third zero and
    subtracted again, as in the parent), and the heads' output keeps num_heads * head_dim.

    The swap gives `qkv` a new bias Parameter (timm's `q_bias` and `v_bias` go into it): make
    the optimizer after it, as `ticketsmith.models.build` does. timm's `set_window_size` is not
    carried over: build the model at the input size it will see."""

    def __init__(self, dim: int, window_size, num_heads: int, qkv_bias: bool = True,
                 attention_dropout: float = 0.0, dropout: float = 0.0):
        super().__init__(dim, window_size, (0, 0), num_heads, qkv_bias, True, attention_dropout,
                         dropout, cosine=True)

    @classmethod
    def from_timm(cls, m: nn.Module) -> "TimmWindowAttentionV2":
        """The same module as a TimmWindowAttentionV2 (its Linears, logit scale, bias MLP and
        buffers themselves; the qkv Linear new, with timm's weight and biases)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.window_size, new.shift_size = list(m.window_size), [0, 0]  # the block shifts
        new.num_heads = m.num_heads
        new.head_dim = m.qkv.in_features // m.num_heads
        new.attention_dropout, new.dropout = float(m.attn_drop.p), float(m.proj_drop.p)
        new.qkv = _biased_qkv(m)
        new.proj, new.logit_scale, new.cpb_mlp = m.proj, m.logit_scale, m.cpb_mlp
        for name in ("relative_coords_table", "relative_position_index"):  # as persistent as theirs
            new.register_buffer(name, getattr(m, name), persistent=name not in m._non_persistent_buffers_set)
        new._declare_per_head()
        new.train(m.training)
        return new

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B * windows, N, C] -> [B * windows, N, C]; mask: [windows, N, N] or None."""
        return self._attend(x, mask)



def _biased_qkv(m: nn.Module) -> nn.Linear:
    """A Linear computing timm's `F.linear(x, qkv.weight, cat(q_bias, k_bias, v_bias))`: its
    weight timm's own, its bias a new Parameter from q_bias, zeros and v_bias (no bias where
    timm has none)."""
    w = m.qkv.weight
    qkv = nn.Linear(w.shape[1], w.shape[0], bias=m.q_bias is not None, device=w.device, dtype=w.dtype)
    qkv.weight = w
    if m.q_bias is not None:
        with torch.no_grad():
            qkv.bias.copy_(torch.cat([m.q_bias, torch.zeros_like(m.q_bias), m.v_bias]))
        qkv.bias.requires_grad_(m.q_bias.requires_grad)
    return qkv


class BeitAttention(nn.Module):
    """timm's BEiT `Attention` (`timm.models.beit`, also BEiT v2): the same function with the
    q and v biases as the bias of the `qkv` Linear, called as a module (timm adds `q_bias`,
    a zero keys' bias and `v_bias` through `F.linear` on `qkv.weight`; the keys' third is
    held at zero here and subtracted again), and the heads' output kept at num_heads *
    head_dim (timm reshapes it to the input width), so its heads are refilled and removed,
    each with its column of the relative position bias table (`per_head_params`).

    A bias shared by all layers (`use_shared_rel_pos_bias`) is handed in for every head: a
    layer that lost heads cannot add it, so compaction keeps such layers' heads. The swap
    gives `qkv` a new bias Parameter: make the optimizer after it, as `ticketsmith.models.build`
    does. timm's `set_window_size` is not carried over."""

    def __init__(self, dim: int, num_heads: int, head_dim: int | None = None,
                 qkv_bias: bool = False, window_size=None, attention_dropout: float = 0.0,
                 dropout: float = 0.0):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim or dim // num_heads
        width = self.num_heads * self.head_dim
        self.attention_dropout, self.dropout = attention_dropout, dropout
        self.qkv = nn.Linear(dim, 3 * width, bias=qkv_bias)
        if qkv_bias:
            with torch.no_grad():
                self.qkv.bias[width:2 * width].zero_()
        self.proj = nn.Linear(width, dim)
        self.window_size = tuple(window_size) if window_size else None
        if self.window_size:
            wh, ww = self.window_size
            self.relative_position_bias_table = nn.Parameter(
                torch.zeros((2 * wh - 1) * (2 * ww - 1) + 3, num_heads))
            index = torch.zeros(wh * ww + 1, wh * ww + 1, dtype=torch.long)
            index[1:, 1:] = _relative_position_index(wh, ww).view(wh * ww, wh * ww)
            n = (2 * wh - 1) * (2 * ww - 1)  # the class token's three: to, from, itself
            index[0, 0:], index[0:, 0], index[0, 0] = n, n + 1, n + 2
            self.register_buffer("relative_position_index", index, persistent=False)
        else:
            self.relative_position_bias_table = None
            self.relative_position_index = None
        self._declare_per_head()

    def _declare_per_head(self) -> None:
        self.per_head_params = ((("relative_position_bias_table", 1),)
                                if self.relative_position_bias_table is not None else ())

    @classmethod
    def from_timm(cls, m: nn.Module) -> "BeitAttention":
        """The same module as a BeitAttention (its Linears, bias table and buffers themselves;
        the qkv Linear new, with timm's weight and biases)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.num_heads = m.num_heads
        new.head_dim = m.qkv.out_features // (3 * m.num_heads)
        new.attention_dropout, new.dropout = float(m.attn_drop.p), float(m.proj_drop.p)
        new.qkv, new.proj = _biased_qkv(m), m.proj
        new.window_size = tuple(m.window_size) if m.window_size is not None else None
        new.relative_position_bias_table = m.relative_position_bias_table
        if m.relative_position_index is not None:
            new.register_buffer("relative_position_index", m.relative_position_index,
                                persistent="relative_position_index" not in m._non_persistent_buffers_set)
        else:
            new.relative_position_index = None
        new._declare_per_head()
        new.train(m.training)
        return new

    def forward(self, x: torch.Tensor, shared_rel_pos_bias: torch.Tensor | None = None) -> torch.Tensor:
        b, n, _ = x.shape
        heads, hd = self.num_heads, self.head_dim
        q, k, v = _qkv_without_keys_bias(self.qkv, x).reshape(b, n, 3, heads, hd).permute(2, 0, 3, 1, 4)
        bias = None
        if self.relative_position_bias_table is not None:
            area = self.relative_position_index.shape[0]
            bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
            bias = bias.view(area, area, -1).permute(2, 0, 1).contiguous().unsqueeze(0)
        if shared_rel_pos_bias is not None:
            bias = shared_rel_pos_bias if bias is None else bias + shared_rel_pos_bias
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                           dropout_p=self.attention_dropout if self.training else 0.0)
        x = self.proj(x.transpose(1, 2).reshape(b, n, heads * hd))
        return F.dropout(x, p=self.dropout, training=self.training)


class EvaAttention(nn.Module):
    """timm's EVA / EVA-02 `EvaAttention` with its q, k, v in one Linear (`qkv_fused`, timm's
    default): the same function with the q and v biases as the bias of the `qkv` Linear, called
    as a module (the keys' third held at zero and subtracted again, as in `BeitAttention`), and
    the heads' output kept at num_heads * head_dim, so its heads can be refilled and removed.

    The rotary embedding is applied by the function timm's own module applies it with
    (`apply_rot_embed_cat` of the module defining the swapped class), called rather than
    re-written, so both agree whatever timm's version. A norm over all heads' outputs
    (`scale_norm`) or a gate (`gated`) makes the heads' outputs depend on each other: such
    modules are swapped too, and compaction keeps their heads (a copy with heads cut computes
    another function). The swap gives `qkv` a new bias Parameter: make the optimizer after it."""

    @classmethod
    def from_timm(cls, m: nn.Module) -> "EvaAttention":
        """The same module as an EvaAttention (its Linears, norms and gate themselves; the qkv
        Linear new, with timm's weight and biases)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.num_heads, new.head_dim = m.num_heads, m.head_dim
        new.num_prefix_tokens, new.rotate_half = m.num_prefix_tokens, bool(m.rotate_half)
        new.attention_dropout, new.dropout = float(m.attn_drop.p), float(m.proj_drop.p)
        new.qkv, new.proj = _biased_qkv(m), m.proj
        new.q_norm, new.k_norm, new.norm, new.gate = m.q_norm, m.k_norm, m.norm, m.gate
        new.apply_rope = sys.modules[type(m).__module__].apply_rot_embed_cat
        new.train(m.training)
        return new

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        b, n, _ = x.shape
        heads, hd = self.num_heads, self.head_dim
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        q, k, v = _qkv_without_keys_bias(self.qkv, x).reshape(b, n, 3, heads, hd).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:  # not on the class / register tokens
            p = self.num_prefix_tokens
            q = torch.cat([q[:, :, :p], self.apply_rope(q[:, :, p:], rope, half=self.rotate_half)],
                          dim=2).type_as(v)
            k = torch.cat([k[:, :, :p], self.apply_rope(k[:, :, p:], rope, half=self.rotate_half)],
                          dim=2).type_as(v)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                           dropout_p=self.attention_dropout if self.training else 0.0)
        x = self.norm(x.transpose(1, 2).reshape(b, n, heads * hd))
        if gate is not None:
            x = x * gate
        return F.dropout(self.proj(x), p=self.dropout, training=self.training)


class PvtAttention(nn.Module):
    """timm's PVT-v2 `Attention` (`timm.models.pvt_v2`) or Twins' `GlobalSubSampleAttn` (the
    same function): queries from the tokens, keys and values (`kv`) from the tokens spatially
    reduced (a strided conv and a LayerNorm; with PVT's `linear_attn` a 7 x 7 pooling, a 1x1
    conv, a LayerNorm and a GELU). The same function with
    the heads' output kept at num_heads * head_dim (timm reshapes it to the input width), so
    its heads can be refilled and removed: their q rows, k and v rows of `kv` and columns of
    `proj` (the q / kv pattern of `ticketsmith.structure.heads`)."""

    @classmethod
    def from_timm(cls, m: nn.Module) -> "PvtAttention":
        """The same module (its Linears, reduction conv, norm, pooling and activation
        themselves) as a PvtAttention."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.num_heads = m.num_heads
        new.head_dim = m.q.out_features // m.num_heads
        new.attention_dropout, new.dropout = float(m.attn_drop.p), float(m.proj_drop.p)
        new.q, new.kv, new.proj = m.q, m.kv, m.proj
        # (Twins' has no pooling or activation, and no norm where it does not reduce)
        new.sr, new.norm = m.sr, getattr(m, "norm", None)
        new.pool, new.act = getattr(m, "pool", None), getattr(m, "act", None)
        new.train(m.training)
        return new

    def forward(self, x: torch.Tensor, feat_size) -> torch.Tensor:
        b, n, c = x.shape
        heads, hd = self.num_heads, self.head_dim
        q = self.q(x).reshape(b, n, heads, hd).transpose(1, 2)
        if self.sr is not None:  # the keys' and values' tokens: the map, reduced
            x = x.transpose(1, 2).reshape(b, c, *feat_size)
            if self.pool is not None:
                x = self.pool(x)
            x = self.norm(self.sr(x).reshape(b, c, -1).transpose(1, 2))
            if self.act is not None:
                x = self.act(x)
        k, v = self.kv(x).reshape(b, -1, 2, heads, hd).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v,
                                           dropout_p=self.attention_dropout if self.training else 0.0)
        x = self.proj(x.transpose(1, 2).reshape(b, n, heads * hd))
        return F.dropout(x, p=self.dropout, training=self.training)


class GridAttention(nn.Module):
    """torchvision's MaxViT `RelativePositionalMultiHeadAttention` (its block and grid
    attention, on [B, groups, tokens, D]): the same function with a `num_heads` the head
    pattern reads (torchvision's is `n_heads`), the scale it was built with kept (torchvision
    scales by the model width, not the head width) and the heads' output kept at num_heads *
    head_dim (torchvision reshapes it to the input width). Each head's column of the relative
    position bias table goes with it (`per_head_params`). Its Linears keep their names
    (`to_qkv`, `merge`)."""

    per_head_params = (("relative_position_bias_table", 1),)

    @classmethod
    def from_torchvision(cls, m: nn.Module) -> "GridAttention":
        """The same module (its Linears, bias table and index themselves) as a GridAttention."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.num_heads, new.head_dim = m.n_heads, m.head_dim
        new.scale, new.max_seq_len = float(m.scale_factor), m.max_seq_len
        new.to_qkv, new.merge = m.to_qkv, m.merge
        new.relative_position_bias_table = m.relative_position_bias_table
        new.register_buffer("relative_position_index", m.relative_position_index,
                            persistent="relative_position_index" not in m._non_persistent_buffers_set)
        new.train(m.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, g, p, _ = x.shape
        heads, hd = self.num_heads, self.head_dim
        # groups folded into the batch: 4-D products (a 5-D one broadcasts through an expand
        # that torch-pruning maps as grouped-query heads, wrongly)
        q, k, v = self.to_qkv(x).reshape(b * g, p, 3, heads, hd).permute(2, 0, 3, 1, 4)
        n = self.max_seq_len
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        attn = F.softmax(q @ (k * self.scale).transpose(-2, -1) + bias.permute(2, 0, 1), dim=-1)
        return self.merge((attn @ v).transpose(1, 2).reshape(b, g, p, heads * hd))


class XcaAttention(nn.Module):
    """timm's XCiT `XCA` (cross-covariance attention: each head attends over its channels, the
    tokens' L2-normalised q and k giving a head_dim x head_dim map, scaled by a per-head
    `temperature`). The same function with the heads' output kept at num_heads * head_dim
    (timm reshapes it to the input width), so its heads can be refilled and removed, each
    with its temperature (`per_head_params`)."""

    per_head_params = (("temperature", 0),)

    @classmethod
    def from_timm(cls, m: nn.Module) -> "XcaAttention":
        """The same module (its Linears and temperature themselves) as an XcaAttention."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.num_heads = m.num_heads
        new.head_dim = m.qkv.out_features // (3 * m.num_heads)
        new.attention_dropout, new.dropout = float(m.attn_drop.p), float(m.proj_drop.p)
        new.qkv, new.proj, new.temperature = m.qkv, m.proj, m.temperature
        new.train(m.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        heads, hd = self.num_heads, self.head_dim
        q, k, v = self.qkv(x).reshape(b, n, 3, heads, hd).permute(2, 0, 3, 4, 1)  # [B, H, hd, N]
        attn = (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)) * self.temperature
        attn = F.dropout(attn.softmax(dim=-1), p=self.attention_dropout, training=self.training)
        x = self.proj((attn @ v).permute(0, 3, 1, 2).reshape(b, n, heads * hd))
        return F.dropout(x, p=self.dropout, training=self.training)


class GroupedWindowAttention(nn.Module):
    """Twins' `LocallyGroupedAttn` (`timm.models.twins`): the map ([B, H * W, C] tokens of
    an H x W map) padded to whole ws x ws windows, attention within each window, the padding
    cut off again. The same function with the windows folded into the batch and the heads'
    output kept at num_heads * head_dim (timm reshapes it to the input width), so its heads
    can be refilled and removed."""

    @classmethod
    def from_timm(cls, m: nn.Module) -> "GroupedWindowAttention":
        """The same module (its Linears themselves) as a GroupedWindowAttention."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.ws, new.num_heads = int(m.ws), m.num_heads
        new.head_dim = m.qkv.out_features // (3 * m.num_heads)
        new.attention_dropout, new.dropout = float(m.attn_drop.p), float(m.proj_drop.p)
        new.qkv, new.proj = m.qkv, m.proj
        new.train(m.training)
        return new

    def forward(self, x: torch.Tensor, size) -> torch.Tensor:
        b, n, c = x.shape
        h, w = size
        ws, heads, hd = self.ws, self.num_heads, self.head_dim
        x = F.pad(x.view(b, h, w, c), (0, 0, 0, (ws - w % ws) % ws, 0, (ws - h % ws) % ws))
        gh, gw = x.shape[1] // ws, x.shape[2] // ws
        x = x.reshape(b, gh, ws, gw, ws, c).transpose(2, 3).reshape(b * gh * gw, ws * ws, c)
        q, k, v = self.qkv(x).reshape(b * gh * gw, ws * ws, 3, heads, hd).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v,
                                           dropout_p=self.attention_dropout if self.training else 0.0)
        x = x.transpose(1, 2).reshape(b, gh, gw, ws, ws, heads * hd).transpose(2, 3)
        x = x.reshape(b, gh * ws, gw * ws, heads * hd)[:, :h, :w].reshape(b, n, heads * hd)
        return F.dropout(self.proj(x), p=self.dropout, training=self.training)



class MaxxVitAttention(nn.Module):
    """timm's MaxViT / CoAtNet attention (`timm.models.maxxvit`): `AttentionCl` on channels-last
    tokens ([B, ..., C], Linears) and `Attention2d` on NCHW maps (1x1 convs), with their
    relative position bias (`rel_pos`: timm's `RelPosBias`, `RelPosBiasTf` or `RelPosMlp`) or
    none. timm sizes the bias by the head count its bias module was built with (its
    `bias_shape` and `num_heads`), so no cut reaches the heads; here `num_heads` is handed on to
    the bias module whenever it is set (as head surgery does), its per-head tensors are declared
    (`per_head_params`) and the bias is still timm's own (`rel_pos.get_bias()`). The qkv layout
    stays timm's: head by head where `head_first` (the "rw" models: `structure.heads` reads it),
    else q, k, v. Its Linears / convs and bias module are the original's."""

    # where each bias module keeps its heads: (its per-head tensors, the head axis of bias_shape)
    REL_POS = {"RelPosBias": ((("relative_position_bias_table", 1),), -1),
               "RelPosBiasTf": ((("relative_position_bias_table", 0),), 0),
               "RelPosMlp": ((("mlp.fc2.weight", 0), ("mlp.fc2.bias", 0)), -1)}

    @classmethod
    def from_timm(cls, m: nn.Module) -> "MaxxVitAttention":
        """The same module (its qkv, projection and bias module themselves) as a
        MaxxVitAttention."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.channels_first = isinstance(m.qkv, nn.Conv2d)
        new.head_first, new.head_dim = bool(m.head_first), int(m.dim_head)
        new.attention_dropout, new.dropout = float(m.attn_drop.p), float(m.proj_drop.p)
        new.qkv, new.proj, new.rel_pos = m.qkv, m.proj, m.rel_pos
        new._heads = m.num_heads
        per_head = cls.REL_POS[type(m.rel_pos).__name__][0] if m.rel_pos is not None else ()
        new.per_head_params = tuple((f"rel_pos.{path}", dim) for path, dim in per_head
                                    if _has_tensor(m.rel_pos, path))
        new.train(m.training)
        return new

    @property
    def num_heads(self) -> int:
        return self._heads

    @num_heads.setter
    def num_heads(self, n: int) -> None:
        self._heads = n
        rel_pos = self.rel_pos
        if rel_pos is not None:  # timm's bias module shapes its bias by its own head count
            shape = list(rel_pos.bias_shape)
            shape[self.REL_POS[type(rel_pos).__name__][1]] = n
            rel_pos.bias_shape = tuple(shape)
            if hasattr(rel_pos, "num_heads"):
                rel_pos.num_heads = n

    def forward(self, x: torch.Tensor, shared_rel_pos: torch.Tensor | None = None) -> torch.Tensor:
        heads, hd = self.num_heads, self.head_dim
        b = x.shape[0]
        if self.channels_first:  # [B, C, H, W]: tokens are the map's positions
            qkv = self.qkv(x).flatten(2).transpose(1, 2)
        else:  # [B, ..., C]
            qkv = self.qkv(x).reshape(b, -1, 3 * heads * hd)
        n = qkv.shape[1]
        if self.head_first:
            q, k, v = qkv.reshape(b, n, heads, 3, hd).permute(3, 0, 2, 1, 4)
        else:
            q, k, v = qkv.reshape(b, n, 3, heads, hd).permute(2, 0, 3, 1, 4)
        bias = self.rel_pos.get_bias() if self.rel_pos is not None else shared_rel_pos
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                             dropout_p=self.attention_dropout if self.training else 0.0)
        out = out.transpose(1, 2).reshape(b, n, heads * hd)
        if self.channels_first:
            out = out.transpose(1, 2).reshape(b, heads * hd, *x.shape[2:])
        else:
            out = out.reshape(*x.shape[:-1], heads * hd)
        return F.dropout(self.proj(out), p=self.dropout, training=self.training)


class ClassAttention(nn.Module):
    """timm's CaiT / XCiT `ClassAttn` and CrossViT's `CrossAttention` (the same function): the
    class token's query (from token 0) attends over all tokens, q, k and v in three Linears. The same function with the heads' output kept at
    num_heads * head_dim (timm reshapes it to the input width), so its heads can be refilled
    and removed (the q / k / v pattern of `ticketsmith.structure.heads`). Its Linears are the
    original's."""

    @classmethod
    def from_timm(cls, m: nn.Module) -> "ClassAttention":
        """The same module (its Linears themselves: CrossViT's `wq`, `wk`, `wv` become `q`,
        `k`, `v`) as a ClassAttention."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.num_heads = m.num_heads
        new.q, new.k, new.v = (getattr(m, a) for a in _class_attn_names(m))
        new.head_dim = new.q.out_features // m.num_heads
        new.attention_dropout, new.dropout = float(m.attn_drop.p), float(m.proj_drop.p)
        new.proj = m.proj
        new.train(m.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, N, C] (token 0 the class token) -> [B, 1, C]."""
        b, n, _ = x.shape
        heads, hd = self.num_heads, self.head_dim
        q = self.q(x[:, :1]).reshape(b, 1, heads, hd).transpose(1, 2)
        k, v = (t(x).reshape(b, n, heads, hd).transpose(1, 2) for t in (self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v,
                                             dropout_p=self.attention_dropout if self.training else 0.0)
        out = self.proj(out.transpose(1, 2).reshape(b, 1, heads * hd))
        return F.dropout(out, p=self.dropout, training=self.training)


class LevitAttention(nn.Module):
    """timm's LeViT `Attention` on tokens (not its `use_conv` variant): per head, q and k
    `key_dim` wide and v `val_dim`, head by head in one qkv layer, and a learned bias per head
    and relative offset. Its `qkv` and `proj` are LinearNorms (a Linear, then a BatchNorm1d over
    the tokens flattened into the batch), so no Linear of the module itself holds the heads;
    here the Linears and norms are its own children (`qkv`, `qkv_norm`, `proj_act`, `proj`,
    `proj_norm`: timm's, moved), which `structure.heads` reads as the LeViT family's heads, and
    `row_norms` tells head surgery that `qkv_norm` normalises the rows of `qkv` (its channels
    go with their heads; a head's v is then not zero where its rows are, so only its projection
    columns make it dead). The biases are gathered once per device in eval mode, as timm does."""

    row_norms = {"qkv": "qkv_norm"}

    @classmethod
    def from_timm(cls, m: nn.Module) -> "LevitAttention":
        """The same module (its Linears, norms, activation and biases themselves) as a
        LevitAttention."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for a in ("num_heads", "scale", "key_dim", "key_attn_dim", "val_dim", "val_attn_dim"):
            setattr(new, a, getattr(m, a))
        new.qkv, new.qkv_norm = m.qkv.linear, m.qkv.bn
        new._take_proj_and_biases(m)
        return new

    def _take_proj_and_biases(self, m: nn.Module) -> None:
        self.proj_act, self.proj, self.proj_norm = m.proj.act, m.proj.ln.linear, m.proj.ln.bn
        self.attention_biases = m.attention_biases
        self.register_buffer("attention_bias_idxs", m.attention_bias_idxs,
                             persistent="attention_bias_idxs" not in m._non_persistent_buffers_set)
        self.attention_bias_cache = {}
        self.train(m.training)

    def train(self, mode: bool = True) -> "LevitAttention":
        self.attention_bias_cache = {}  # (the cache holds biases of eval mode only)
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self.attention_bias_cache = {}  # another device or dtype
        return super()._apply(fn, *args, **kwargs)

    def get_attention_biases(self, device: torch.device) -> torch.Tensor:
        if torch.jit.is_tracing() or self.training:
            return self.attention_biases[:, self.attention_bias_idxs]
        key = str(device)
        if key not in self.attention_bias_cache:
            self.attention_bias_cache[key] = self.attention_biases[:, self.attention_bias_idxs]
        return self.attention_bias_cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, N, C] -> [B, N, C]."""
        b, n, _ = x.shape
        qkv = _linear_norm(self.qkv, self.qkv_norm, x).view(b, n, self.num_heads, -1)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.val_dim], dim=3)
        q, k, v = q.permute(0, 2, 1, 3), k.permute(0, 2, 3, 1), v.permute(0, 2, 1, 3)
        return self._attend(q, k, v, x.device)

    def _attend(self, q, k, v, device) -> torch.Tensor:
        """Heads' attention with the biases, then the projection (an activation, a LinearNorm)."""
        attn = (q @ k * self.scale + self.get_attention_biases(device)).softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(q.shape[0], q.shape[2], self.val_attn_dim)
        return _linear_norm(self.proj, self.proj_norm, self.proj_act(out))


class LevitAttentionDownsample(LevitAttention):
    """timm's LeViT `AttentionDownsample` on tokens (not its `use_conv` variant): as
    `LevitAttention`, but the queries come from the tokens subsampled (timm's `Downsample`,
    kept as `q_down`) through a LinearNorm `q` (num_heads * key_dim), the keys and values from
    all tokens through a LinearNorm `kv` (head by head, key_dim then val_dim), so the tokens
    and the width change. Its Linears and norms become children of its own (`q`, `q_norm`,
    `kv`, `kv_norm`, `proj_act`, `proj`, `proj_norm`)."""

    row_norms = {"q": "q_norm", "kv": "kv_norm"}

    @classmethod
    def from_timm(cls, m: nn.Module) -> "LevitAttentionDownsample":
        """The same module (its layers and biases themselves) as a LevitAttentionDownsample."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for a in ("num_heads", "scale", "key_dim", "key_attn_dim", "val_dim", "val_attn_dim"):
            setattr(new, a, getattr(m, a))
        new.q_down, new.q, new.q_norm = m.q.down, m.q.ln.linear, m.q.ln.bn
        new.kv, new.kv_norm = m.kv.linear, m.kv.bn
        new._take_proj_and_biases(m)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, N, C_in] -> [B, N_q, C_out]."""
        b, n, _ = x.shape
        k, v = _linear_norm(self.kv, self.kv_norm, x).view(b, n, self.num_heads, -1).split(
            [self.key_dim, self.val_dim], dim=3)
        q = _linear_norm(self.q, self.q_norm, self.q_down(x))
        q = q.view(b, -1, self.num_heads, self.key_dim).permute(0, 2, 1, 3)
        return self._attend(q, k.permute(0, 2, 3, 1), v.permute(0, 2, 1, 3), x.device)


def _linear_norm(linear: nn.Linear, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's LinearNorm: the Linear on [B, N, C] tokens, the norm over them flattened."""
    y = linear(x)
    return norm(y.flatten(0, 1)).reshape_as(y)


def _has_tensor(module: nn.Module, path: str) -> bool:
    owner, _, leaf = path.rpartition(".")
    try:
        return getattr(module.get_submodule(owner) if owner else module, leaf, None) is not None
    except AttributeError:
        return False


def _is_timm_swin_v2(m: nn.Module) -> bool:
    """timm's Swin V2 WindowAttention (by class name and what it holds)."""
    return type(m).__name__ == "WindowAttention" and not isinstance(m, WindowAttention) and all(
        hasattr(m, a) for a in ("qkv", "proj", "q_bias", "v_bias", "logit_scale", "cpb_mlp",
                                "relative_coords_table", "relative_position_index", "window_size",
                                "num_heads", "attn_drop", "proj_drop")) \
        and isinstance(m.qkv, nn.Linear) and m.qkv.bias is None and isinstance(m.proj, nn.Linear) \
        and m.qkv.out_features == 3 * m.qkv.in_features and m.proj.in_features == m.qkv.in_features \
        and isinstance(m.cpb_mlp, nn.Sequential) and len(m.cpb_mlp) == 3 \
        and isinstance(m.cpb_mlp[2], nn.Linear) and m.cpb_mlp[2].out_features == m.num_heads


def _is_beit_attention(m: nn.Module) -> bool:
    """timm's BEiT Attention (by class name, what it holds and its forward's arguments)."""
    if not (type(m).__name__ == "Attention" and all(hasattr(m, a) for a in (
            "qkv", "proj", "q_bias", "k_bias", "v_bias", "num_heads", "scale", "attn_drop",
            "proj_drop", "window_size", "relative_position_bias_table", "relative_position_index"))
            and isinstance(m.qkv, nn.Linear) and m.qkv.bias is None and isinstance(m.proj, nn.Linear)):
        return False
    width = m.qkv.out_features // 3
    return (m.qkv.out_features == 3 * width and width % m.num_heads == 0
            and m.proj.in_features == width
            and math.isclose(m.scale, (width // m.num_heads) ** -0.5)
            and "shared_rel_pos_bias" in inspect.signature(m.forward).parameters)


def _is_eva_attention(m: nn.Module) -> bool:
    """timm's EvaAttention with a fused qkv Linear (by class name, what it holds, and the
    rotary function of its module)."""
    if not (type(m).__name__ == "EvaAttention" and all(hasattr(m, a) for a in (
            "qkv", "proj", "q_bias", "k_bias", "v_bias", "num_heads", "head_dim", "scale",
            "num_prefix_tokens", "rotate_half", "q_norm", "k_norm", "norm", "gate", "attn_drop",
            "proj_drop")) and isinstance(m.qkv, nn.Linear) and m.qkv.bias is None
            and isinstance(m.proj, nn.Linear)):
        return False
    width = m.num_heads * m.head_dim
    return (m.qkv.out_features == 3 * width and m.proj.in_features == width
            and math.isclose(m.scale, m.head_dim ** -0.5)
            and callable(getattr(sys.modules.get(type(m).__module__), "apply_rot_embed_cat", None)))


def _is_pvt_attention(m: nn.Module) -> bool:
    """timm's PVT-v2 Attention or Twins' GlobalSubSampleAttn (by class name, what it holds
    and its forward's arguments)."""
    pvt = type(m).__name__ == "Attention" and all(hasattr(m, a) for a in ("norm", "pool", "act"))
    twins = type(m).__name__ == "GlobalSubSampleAttn"
    if not ((pvt or twins) and all(hasattr(m, a) for a in (
            "q", "kv", "proj", "sr", "num_heads", "scale", "attn_drop", "proj_drop"))
            and all(type(getattr(m, a)) is nn.Linear for a in ("q", "kv", "proj"))
            and m.q.out_features % m.num_heads == 0):
        return False
    width, hd = m.q.out_features, m.q.out_features // m.num_heads
    args = inspect.signature(m.forward).parameters
    return (m.kv.out_features == 2 * width and m.proj.in_features == width
            and math.isclose(m.scale, hd ** -0.5) and getattr(m, "head_dim", hd) == hd
            and (m.sr is not None or getattr(m, "pool", None) is None)
            and ("feat_size" in args if pvt else "size" in args))


def _is_maxvit_attention(m: nn.Module) -> bool:
    """torchvision's MaxViT RelativePositionalMultiHeadAttention (by class name and what it
    holds)."""
    if not (type(m).__name__ == "RelativePositionalMultiHeadAttention" and all(hasattr(m, a) for a in (
            "n_heads", "head_dim", "to_qkv", "merge", "scale_factor", "max_seq_len",
            "relative_position_bias_table", "relative_position_index"))
            and type(m.to_qkv) is nn.Linear and type(m.merge) is nn.Linear):
        return False
    width = m.n_heads * m.head_dim
    return (m.to_qkv.out_features == 3 * width and m.merge.in_features == width
            and tuple(m.relative_position_bias_table.shape[1:]) == (m.n_heads,))


def _is_xca(m: nn.Module) -> bool:
    """timm's XCiT XCA (by class name and what it holds)."""
    if not (type(m).__name__ == "XCA" and all(hasattr(m, a) for a in (
            "num_heads", "temperature", "qkv", "proj", "attn_drop", "proj_drop"))
            and type(m.qkv) is nn.Linear and type(m.proj) is nn.Linear):
        return False
    width = m.qkv.in_features
    return (m.qkv.out_features == 3 * width and m.proj.in_features == width
            and width % m.num_heads == 0 and tuple(m.temperature.shape) == (m.num_heads, 1, 1))


def _is_twins_local(m: nn.Module) -> bool:
    """Twins' LocallyGroupedAttn (by class name, what it holds and its forward's arguments)."""
    if not (type(m).__name__ == "LocallyGroupedAttn" and all(hasattr(m, a) for a in (
            "ws", "num_heads", "qkv", "proj", "scale", "attn_drop", "proj_drop"))
            and type(m.qkv) is nn.Linear and type(m.proj) is nn.Linear):
        return False
    width = m.qkv.in_features
    return (m.qkv.out_features == 3 * width and m.proj.in_features == width
            and width % m.num_heads == 0 and math.isclose(m.scale, (width // m.num_heads) ** -0.5)
            and "size" in inspect.signature(m.forward).parameters)


def _is_maxxvit_attention(m: nn.Module) -> bool:
    """timm's MaxViT / CoAtNet AttentionCl or Attention2d (by class name, what it holds, its
    bias module and its forward's arguments)."""
    cl = type(m).__name__ == "AttentionCl"
    if not ((cl or type(m).__name__ == "Attention2d") and all(hasattr(m, a) for a in (
            "num_heads", "dim_head", "head_first", "scale", "qkv", "proj", "rel_pos", "attn_drop",
            "proj_drop"))):
        return False
    from ..structure.heads import features
    kind = nn.Linear if cl else nn.Conv2d
    io = [features(t) if type(t) is kind else None for t in (m.qkv, m.proj)]
    if None in io or not isinstance(m.num_heads, int) or not isinstance(m.dim_head, int):
        return False
    width, rel_pos = m.num_heads * m.dim_head, m.rel_pos
    if rel_pos is not None:
        known = MaxxVitAttention.REL_POS.get(type(rel_pos).__name__)
        if known is None or not isinstance(getattr(rel_pos, "bias_shape", None), tuple) \
                or rel_pos.bias_shape[known[1]] != m.num_heads or not callable(getattr(rel_pos, "get_bias", None)):
            return False
    return (io[0][1] == 3 * width and io[1][0] == width and math.isclose(m.scale, m.dim_head ** -0.5)
            and "shared_rel_pos" in inspect.signature(m.forward).parameters)


def _class_attn_names(m: nn.Module) -> tuple[str, str, str]:
    """The q, k, v Linears' names: timm's ClassAttn's, or CrossViT's CrossAttention's."""
    return ("wq", "wk", "wv") if type(m).__name__ == "CrossAttention" else ("q", "k", "v")


def _is_class_attn(m: nn.Module) -> bool:
    """timm's CaiT / XCiT ClassAttn or CrossViT CrossAttention (by class name and what it
    holds)."""
    qkv = _class_attn_names(m)
    if not (type(m).__name__ in ("ClassAttn", "CrossAttention") and all(hasattr(m, a) for a in (
            "num_heads", "scale", *qkv, "proj", "attn_drop", "proj_drop"))
            and all(type(getattr(m, a)) is nn.Linear for a in (*qkv, "proj"))):
        return False
    width = getattr(m, qkv[0]).in_features
    return (all(getattr(m, a).out_features == width for a in qkv)
            and m.proj.in_features == width and width % m.num_heads == 0
            and math.isclose(m.scale, (width // m.num_heads) ** -0.5))


def _is_levit_attention(m: nn.Module) -> bool:
    """timm's LeViT Attention on tokens (by class name, what it holds and its LinearNorms)."""
    if not (type(m).__name__ == "Attention" and all(hasattr(m, a) for a in (
            "use_conv", "num_heads", "scale", "key_dim", "key_attn_dim", "val_dim", "val_attn_dim",
            "qkv", "proj", "attention_biases", "attention_bias_idxs", "attention_bias_cache"))
            and m.use_conv is False and _is_linear_norm(m.qkv) and _is_levit_proj(m.proj)):
        return False
    nh, kd, vd = m.num_heads, m.key_dim, m.val_dim
    return (m.qkv.linear.out_features == nh * (2 * kd + vd) and m.val_attn_dim == nh * vd
            and m.proj.ln.linear.in_features == nh * vd and math.isclose(m.scale, kd ** -0.5)
            and tuple(m.attention_biases.shape[:1]) == (nh,))


def _is_linear_norm(t) -> bool:
    """timm's LinearNorm: a Linear without bias, then a BatchNorm1d."""
    return type(t).__name__ == "LinearNorm" and type(getattr(t, "linear", None)) is nn.Linear \
        and t.linear.bias is None and type(getattr(t, "bn", None)) is nn.BatchNorm1d


def _is_levit_proj(t) -> bool:
    """LeViT's projection: an activation `act`, then a LinearNorm `ln`."""
    return isinstance(t, nn.Sequential) and len(t) == 2 and hasattr(t, "act") \
        and _is_linear_norm(getattr(t, "ln", None))


def _is_levit_attention_downsample(m: nn.Module) -> bool:
    """timm's LeViT AttentionDownsample on tokens (by class name, what it holds and its
    LinearNorms)."""
    if not (type(m).__name__ == "AttentionDownsample" and all(hasattr(m, a) for a in (
            "use_conv", "num_heads", "scale", "key_dim", "key_attn_dim", "val_dim", "val_attn_dim",
            "q", "kv", "proj", "attention_biases", "attention_bias_idxs", "attention_bias_cache"))
            and m.use_conv is False and isinstance(m.q, nn.Sequential) and len(m.q) == 2
            and hasattr(m.q, "down") and _is_linear_norm(getattr(m.q, "ln", None))
            and _is_linear_norm(m.kv) and _is_levit_proj(m.proj)):
        return False
    nh, kd, vd = m.num_heads, m.key_dim, m.val_dim
    return (m.q.ln.linear.out_features == nh * kd and m.kv.linear.out_features == nh * (kd + vd)
            and m.val_attn_dim == nh * vd and m.proj.ln.linear.in_features == nh * vd
            and math.isclose(m.scale, kd ** -0.5) and tuple(m.attention_biases.shape[:1]) == (nh,))


# (is it the original?, the swap) in the order they are tried
SWAPS = ((_is_timm_swin_v2, TimmWindowAttentionV2.from_timm),
         (_is_beit_attention, BeitAttention.from_timm),
         (_is_eva_attention, EvaAttention.from_timm),
         (_is_pvt_attention, PvtAttention.from_timm),
         (_is_twins_local, GroupedWindowAttention.from_timm),
         (_is_xca, XcaAttention.from_timm),
         (_is_maxvit_attention, GridAttention.from_torchvision),
         (_is_maxxvit_attention, MaxxVitAttention.from_timm),
         (_is_class_attn, ClassAttention.from_timm),
         (_is_levit_attention, LevitAttention.from_timm),
         (_is_levit_attention_downsample, LevitAttentionDownsample.from_timm))

# the swapped modules (their forwards branch on shapes: torch.fx keeps them whole)
SWAPPED = (TimmWindowAttentionV2, BeitAttention, EvaAttention, PvtAttention,
           GroupedWindowAttention, XcaAttention, GridAttention, MaxxVitAttention, ClassAttention,
           LevitAttention, LevitAttentionDownsample)


def swap(m: nn.Module) -> nn.Module | None:
    """The prunable module computing what `m` computes, or None if `m` is none of the
    originals above."""
    for is_original, make in SWAPS:
        if is_original(m):
            return make(m)
    return None


__all__ = ["TimmWindowAttentionV2", "BeitAttention", "EvaAttention", "PvtAttention",
           "GroupedWindowAttention", "XcaAttention", "GridAttention", "MaxxVitAttention",
           "ClassAttention", "LevitAttention", "LevitAttentionDownsample", "swap",
           "SWAPPED"]
