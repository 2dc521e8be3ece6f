"""nn.MultiheadAttention with prunable heads.

nn.MultiheadAttention holds its fused in-projection as a bare parameter (`in_proj_weight`, read
by its own forward and by torch's fused kernels), so no mask reaches it, and torch's kernels need
embed_dim = num_heads * head_dim, so no head can go. `QKVAttention` computes the same function
with the in-projection as a Linear (`in_proj`, E -> 3 * num_heads * head_dim; the rows of q, k
and v of head h where nn.MultiheadAttention has them) and the output projection as a Linear
reading num_heads * head_dim: the timm attention pattern (`ticketsmith.structure.heads`), whose
heads refill keeps or drops whole and compaction removes.

`prunable_attention(model)` swaps every nn.MultiheadAttention it can for one, in place, with
the same weights. `ticketsmith.models.build` does it for every user's model (`--model`), so
the CLI prunes their attention; a model handed to the Python API is swapped by calling it.
`fused_attention(model)` swaps back where no head went (`ticketsmith.bench` times the dense
baseline so: torch's own module, which a user would run).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class QKVAttention(nn.Module):
    """nn.MultiheadAttention's function, call signature and outputs, with the q, k, v
    in-projection as one Linear (`in_proj`) and `num_heads` heads of `head_dim` that
    compaction may lower (`embed_dim`, the model width, stays)."""

    # torch's TransformerEncoder(Layer) take their fused fast path (reading in_proj_weight
    # itself) only when this is True: False keeps them calling this module's forward
    _qkv_same_embed_dim = False

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 batch_first: bool = False):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.dropout, self.batch_first = dropout, batch_first
        self.in_proj = nn.Linear(embed_dim, 3 * embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    @property
    def in_proj_bias(self):
        """Read by torch's TransformerEncoderLayer before it checks `_qkv_same_embed_dim`."""
        return self.in_proj.bias

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention) -> "QKVAttention":
        """A copy of `mha` (weights, dropout, layout, training mode, device and dtype)."""
        why = unsupported(mha)
        if why:
            raise ValueError(f"cannot swap this nn.MultiheadAttention: {why}")
        new = cls(mha.embed_dim, mha.num_heads, mha.dropout, mha.in_proj_bias is not None,
                  mha.batch_first).to(device=mha.in_proj_weight.device, dtype=mha.in_proj_weight.dtype)
        pairs = [(new.in_proj.weight, mha.in_proj_weight), (new.out_proj.weight, mha.out_proj.weight)]
        if mha.in_proj_bias is not None:
            pairs += [(new.in_proj.bias, mha.in_proj_bias), (new.out_proj.bias, mha.out_proj.bias)]
        with torch.no_grad():
            for mine, theirs in pairs:
                mine.copy_(theirs)
                mine.requires_grad_(theirs.requires_grad)  # a frozen attention stays frozen
        return new.train(mha.training)

    def to_mha(self) -> nn.MultiheadAttention:
        """The nn.MultiheadAttention this computes (all heads still there: embed_dim =
        num_heads * head_dim), with its weights, layout and mode."""
        if self.num_heads * self.head_dim != self.embed_dim:
            raise ValueError(f"{self.num_heads} heads of {self.head_dim} are narrower than "
                             f"embed_dim {self.embed_dim}: no nn.MultiheadAttention computes that")
        w = self.in_proj.weight
        mha = nn.MultiheadAttention(self.embed_dim, self.num_heads, self.dropout,
                                    bias=self.in_proj.bias is not None, batch_first=self.batch_first,
                                    device=w.device, dtype=w.dtype)
        with torch.no_grad():
            mha.in_proj_weight.copy_(w)
            mha.out_proj.weight.copy_(self.out_proj.weight)
            if self.in_proj.bias is not None:
                mha.in_proj_bias.copy_(self.in_proj.bias)
                mha.out_proj.bias.copy_(self.out_proj.bias)
        return mha.train(self.training)

    def _project(self, query, key, value):
        """q, k, v through the in-projection: one call for self-attention; otherwise each input
        through it and its third kept (the Linear may be an executor without a `.weight`)."""
        width = self.num_heads * self.head_dim
        if query is key and key is value:
            return self.in_proj(query).split(width, dim=-1)
        q = self.in_proj(query)[..., :width]
        kv = self.in_proj(key)
        k = kv[..., width:2 * width]
        v = kv[..., 2 * width:] if value is key else self.in_proj(value)[..., 2 * width:]
        return q, k, v

    def forward(self, query, key, value, key_padding_mask=None, need_weights: bool = True,
                attn_mask=None, average_attn_weights: bool = True, is_causal: bool = False):
        if is_causal and attn_mask is None:  # as nn.MultiheadAttention: the hint needs the mask
            raise RuntimeError("Need attn_mask if specifying the is_causal hint")
        batched = query.dim() == 3
        if not batched:  # (L, E): one sample
            query, key, value = _each(lambda t: t.unsqueeze(0), query, key, value)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:  # (L, N, E) -> (N, L, E)
            query, key, value = _each(lambda t: t.transpose(0, 1), query, key, value)
        n, tgt, src = query.shape[0], query.shape[1], key.shape[1]
        q, k, v = (t.reshape(n, -1, self.num_heads, self.head_dim).transpose(1, 2)
                   for t in self._project(query, key, value))
        mask = _merged_mask(attn_mask, key_padding_mask, n, self.num_heads, tgt, src, q.dtype)
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
            if mask is not None:
                scores = scores + mask
            weights = F.dropout(scores.softmax(dim=-1), p=p)
            out = weights @ v
            if average_attn_weights:
                weights = weights.mean(dim=1)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        out = self.out_proj(out.transpose(1, 2).reshape(n, tgt, self.num_heads * self.head_dim))
        if not batched:
            return out.squeeze(0), (weights.squeeze(0) if weights is not None else None)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights


def _each(fn, *tensors):
    """`fn` of each tensor, once per distinct tensor: self-attention stays recognisable
    (`query is key`) after a reshape."""
    done = {}
    for t in tensors:
        if id(t) not in done:
            done[id(t)] = fn(t)
    return tuple(done[id(t)] for t in tensors)


def _additive(mask, dtype):
    """A boolean mask (True = not attended) as an additive float mask; a float one as it is."""
    if mask is None or mask.is_floating_point():
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))


def _merged_mask(attn_mask, key_padding_mask, n, heads, tgt, src, dtype):
    """nn.MultiheadAttention's masks as one additive mask broadcasting to (N, heads, L, S):
    attn_mask (L, S) or (N * heads, L, S), key_padding_mask (N, S)."""
    mask = _additive(attn_mask, dtype)
    if mask is not None:
        mask = mask.reshape(1, 1, tgt, src) if mask.dim() == 2 else mask.reshape(n, heads, tgt, src)
    pad = _additive(key_padding_mask, dtype)
    if pad is not None:
        pad = pad.reshape(n, 1, 1, src)
        mask = pad if mask is None else mask + pad
    return mask


def unsupported(mha: nn.MultiheadAttention) -> str | None:
    """Why `mha` cannot be swapped for a QKVAttention (None if it can)."""
    if not mha._qkv_same_embed_dim:
        return "its keys or values have another width (kdim / vdim): separate q, k, v weights"
    if mha.bias_k is not None:
        return "it adds learned bias rows to the keys and values (add_bias_kv)"
    if mha.add_zero_attn:
        return "it appends a zero key and value (add_zero_attn)"
    return None


def prunable_attention(model: nn.Module) -> dict[str, str]:
    """Swap, in place, every nn.MultiheadAttention of `model` for a QKVAttention computing the
    same (same weights): its in-projection becomes a Linear that masks reach and its heads
    can be refilled and removed. Returns the modules left as they were, with the reason (an
    unusual configuration: kdim / vdim, add_bias_kv, add_zero_attn). A model that is itself
    an nn.MultiheadAttention is not swapped (there is no parent to hold the new one)."""
    left = {}
    for name, m in list(model.named_modules()):
        if not name or not isinstance(m, nn.MultiheadAttention):
            continue
        why = unsupported(m)
        if why:
            left[name] = why
            continue
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, QKVAttention.from_mha(m))
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoder) and any(
                isinstance(getattr(layer, "self_attn", None), QKVAttention) for layer in m.layers):
            # its padded-batch fast path packs the batch into a nested tensor for torch's fused
            # layer kernels (which read in_proj_weight): the layers now run their own forward
            m.use_nested_tensor = False
    return left


def fused_attention(model: nn.Module) -> int:
    """The inverse of `prunable_attention`, in place, where all heads are still there: each
    such QKVAttention becomes the nn.MultiheadAttention it computes (torch's fused kernels: the
    dense baseline a user would run). Returns how many were swapped back."""
    swapped = 0
    for name, m in list(model.named_modules()):
        if name and isinstance(m, QKVAttention) and m.num_heads * m.head_dim == m.embed_dim:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, m.to_mha())
            swapped += 1
    return swapped


__all__ = ["QKVAttention", "prunable_attention", "fused_attention"]
