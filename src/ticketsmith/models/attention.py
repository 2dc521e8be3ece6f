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

torchvision's Swin `ShiftedWindowAttention` (V1) and `ShiftedWindowAttentionV2` hand their qkv
and proj weights to a function and derive the head width from the input width: `WindowAttention`
is the same function with the Linears called as modules and a fixed `head_dim` (the timm pattern
again), and `prunable_attention` swaps it in as well, with the swaps of `zoo_attention.py`
(timm's Swin V2, BEiT, EVA, PVT-v2, Twins, XCiT and torchvision's MaxViT attention).
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


def _relative_position_index(wh: int, ww: int) -> torch.Tensor:
    """Swin's index of each (query, key) token pair of a wh x ww window into the relative
    position bias table ((2 wh - 1) (2 ww - 1) rows), flattened."""
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    return ((rel[..., 0] + wh - 1) * (2 * ww - 1) + rel[..., 1] + ww - 1).flatten()


def _relative_coords_table(wh: int, ww: int) -> torch.Tensor:
    """Swin V2's log-spaced relative coordinates of a wh x ww window, [1, 2 wh - 1, 2 ww - 1, 2]:
    the input of its bias MLP (as torchvision's `define_relative_position_bias_table`)."""
    h = torch.arange(-(wh - 1), wh, dtype=torch.float32)
    w = torch.arange(-(ww - 1), ww, dtype=torch.float32)
    table = torch.stack(torch.meshgrid([h, w], indexing="ij")).permute(1, 2, 0).contiguous().unsqueeze(0)
    table[:, :, :, 0] /= wh - 1
    table[:, :, :, 1] /= ww - 1
    table *= 8  # normalized to -8 .. 8, then log-spaced
    return torch.sign(table) * torch.log2(torch.abs(table) + 1.0) / 3.0


class WindowAttention(nn.Module):
    """torchvision's Swin `ShiftedWindowAttention` (V1), or with `cosine=True` its
    `ShiftedWindowAttentionV2`: the same function with its `qkv` and `proj` Linears called as
    modules (torchvision's hands their weights to a function, so no mask, executor or cut
    reaches them) and the head width a fixed `head_dim` (torchvision derives it from the input
    width, which stays when heads go): the timm head pattern. Each head has its own column of
    the V1 relative position bias table, or (V2) its own logit scale and output row of the
    bias MLP (`per_head_params`): a removed head's go with it.

    V2 never adds the keys' bias (torchvision zeros that third of the qkv bias in its forward):
    here it is zero from the swap on and subtracted again in the forward, so it adds nothing and
    its gradient cancels."""

    def __init__(self, dim: int, window_size, shift_size, num_heads: int, qkv_bias: bool = True,
                 proj_bias: bool = True, attention_dropout: float = 0.0, dropout: float = 0.0,
                 cosine: bool = False):
        super().__init__()
        if len(window_size) != 2 or len(shift_size) != 2:
            raise ValueError("window_size and shift_size must be of length 2")
        self.window_size, self.shift_size = list(window_size), list(shift_size)
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.attention_dropout, self.dropout = attention_dropout, dropout
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        wh, ww = self.window_size
        if cosine:
            self.logit_scale = nn.Parameter(torch.log(10 * torch.ones((num_heads, 1, 1))))
            self.cpb_mlp = nn.Sequential(nn.Linear(2, 512, bias=True), nn.ReLU(inplace=True),
                                         nn.Linear(512, num_heads, bias=False))
            self.register_buffer("relative_coords_table", _relative_coords_table(wh, ww))
            if qkv_bias:
                with torch.no_grad():
                    self.qkv.bias[dim:2 * dim].zero_()
        else:
            self.relative_position_bias_table = nn.Parameter(
                torch.zeros((2 * wh - 1) * (2 * ww - 1), num_heads))
            nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", _relative_position_index(wh, ww))
        self._declare_per_head()

    @property
    def cosine(self) -> bool:
        """Swin V2: cosine attention with a learned logit scale, the bias from an MLP."""
        return getattr(self, "logit_scale", None) is not None

    def _declare_per_head(self) -> None:
        if not self.cosine:
            self.per_head_params = (("relative_position_bias_table", 1),)
            return
        last = self.cpb_mlp[-1]
        self.per_head_params = (("logit_scale", 0), ("cpb_mlp.2.weight", 0)) + (
            (("cpb_mlp.2.bias", 0),) if last.bias is not None else ())

    @classmethod
    def from_swin(cls, m: nn.Module) -> "WindowAttention":
        """The same module (its qkv / proj Linears, bias table or bias MLP and logit scale, and
        buffers themselves) as a WindowAttention; `m` is torchvision's ShiftedWindowAttention
        or ShiftedWindowAttentionV2 (whose unused keys' bias is zeroed in place)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.window_size, new.shift_size = list(m.window_size), list(m.shift_size)
        new.num_heads = m.num_heads
        new.head_dim = m.qkv.in_features // m.num_heads
        new.attention_dropout, new.dropout = m.attention_dropout, m.dropout
        new.qkv, new.proj = m.qkv, m.proj
        if _is_swin_v2(m):
            new.logit_scale, new.cpb_mlp = m.logit_scale, m.cpb_mlp
            new.register_buffer("relative_coords_table", m.relative_coords_table)
            if m.qkv.bias is not None:
                a = m.qkv.in_features
                with torch.no_grad():
                    m.qkv.bias[a:2 * a].zero_()
        else:
            new.relative_position_bias_table = m.relative_position_bias_table
        new.register_buffer("relative_position_index", m.relative_position_index)
        new._declare_per_head()
        new.train(m.training)
        return new

    def relative_position_bias(self) -> torch.Tensor:
        n = self.window_size[0] * self.window_size[1]
        table = (self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads) if self.cosine
                 else self.relative_position_bias_table)
        bias = table[self.relative_position_index].view(n, n, -1).permute(2, 0, 1).contiguous().unsqueeze(0)
        return 16 * torch.sigmoid(bias) if self.cosine else bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, H, W, C] -> [B, H, W, C], as torchvision's shifted_window_attention."""
        b, h, w, c = x.shape
        wh, ww = self.window_size
        x = F.pad(x, (0, 0, 0, (ww - w % ww) % ww, 0, (wh - h % wh) % wh))
        _, ph, pw, _ = x.shape
        # no shift along a side the window already covers
        shift = [0 if wh >= ph else self.shift_size[0], 0 if ww >= pw else self.shift_size[1]]
        if sum(shift) > 0:
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        nw, n = (ph // wh) * (pw // ww), wh * ww
        x = x.view(b, ph // wh, wh, pw // ww, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(b * nw, n, c)
        mask = _shift_mask(x, ph, pw, self.window_size, shift) if sum(shift) > 0 else None
        x = self._attend(x, mask)
        x = x.view(b, ph // wh, pw // ww, wh, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(b, ph, pw, c)
        if sum(shift) > 0:
            x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
        return x[:, :h, :w, :].contiguous()

    def _attend(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Attention within each window: x [B * windows, N, C] -> [B * windows, N, C]; `mask`
        ([windows, N, N], or None) is added to the scores of every image's windows."""
        bn, n, _ = x.shape
        heads, hd = self.num_heads, self.head_dim
        # V2 adds no keys' bias (zero here: see the class)
        qkv = _qkv_without_keys_bias(self.qkv, x) if self.cosine else self.qkv(x)
        q, k, v = qkv.reshape(bn, n, 3, heads, hd).permute(2, 0, 3, 1, 4)
        if self.cosine:
            attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
            attn = attn * torch.clamp(self.logit_scale, max=math.log(100.0)).exp()
        else:
            attn = (q * hd ** -0.5).matmul(k.transpose(-2, -1))
        attn = attn + self.relative_position_bias()
        if mask is not None:
            nw = mask.shape[0]
            attn = (attn.view(-1, nw, heads, n, n) + mask.unsqueeze(1).unsqueeze(0)).view(-1, heads, n, n)
        attn = F.dropout(F.softmax(attn, dim=-1), p=self.attention_dropout, training=self.training)
        x = self.proj(attn.matmul(v).transpose(1, 2).reshape(bn, n, heads * hd))
        return F.dropout(x, p=self.dropout, training=self.training)


def _qkv_without_keys_bias(qkv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The fused q, k, v projection of x without the keys' third of its bias, for models that
    never add one (Swin V2, BEiT, EVA: a q and a v bias only). That third is held at zero
    from the swap on and subtracted again here, so its gradient cancels; the Linear is still
    called as a module (a mask, an executor or a cut reaches it)."""
    out = qkv(x)
    bias = getattr(qkv, "bias", None)
    if bias is None:
        return out
    a = bias.shape[0] // 3
    return out - F.pad(bias[a:2 * a], (a, a))


def _shift_mask(x: torch.Tensor, ph: int, pw: int, window, shift) -> torch.Tensor:
    """Swin's attention mask of shifted windows, [windows, n, n]: -100 between tokens
    that the roll brought together from different regions of the map."""
    wh, ww = window
    region = x.new_zeros((ph, pw))
    count = 0
    for hs in ((0, -wh), (-wh, -shift[0]), (-shift[0], None)):
        for ws in ((0, -ww), (-ww, -shift[1]), (-shift[1], None)):
            region[hs[0]:hs[1], ws[0]:ws[1]] = count
            count += 1
    region = region.view(ph // wh, wh, pw // ww, ww).permute(0, 2, 1, 3).reshape(-1, wh * ww)
    mask = region.unsqueeze(1) - region.unsqueeze(2)
    mask = mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)
    return mask


_SWIN_ATTRS = ("qkv", "proj", "window_size", "shift_size", "num_heads", "attention_dropout",
               "dropout", "relative_position_index")


def _is_swin_v2(m: nn.Module) -> bool:
    """torchvision's Swin V2 ShiftedWindowAttentionV2 (by class name and what it holds)."""
    return type(m).__name__ == "ShiftedWindowAttentionV2" and all(
        hasattr(m, a) for a in _SWIN_ATTRS + ("logit_scale", "cpb_mlp", "relative_coords_table")) \
        and isinstance(m.cpb_mlp, nn.Sequential) and len(m.cpb_mlp) == 3 \
        and isinstance(m.cpb_mlp[2], nn.Linear) and m.cpb_mlp[2].out_features == m.num_heads


def _is_swin_attention(m: nn.Module) -> bool:
    """torchvision's Swin ShiftedWindowAttention (V1) or ShiftedWindowAttentionV2 (by class
    name and what it holds)."""
    if not (all(hasattr(m, a) for a in _SWIN_ATTRS)
            and isinstance(m.qkv, nn.Linear) and isinstance(m.proj, nn.Linear)):
        return False
    if type(m).__name__ == "ShiftedWindowAttention":
        return hasattr(m, "relative_position_bias_table")
    return _is_swin_v2(m)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule `name` of `model` is."""
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def prunable_attention(model: nn.Module) -> dict[str, str]:
    """Swap, in place, every nn.MultiheadAttention of `model` for a QKVAttention computing the
    same (same weights): its in-projection becomes a Linear that masks reach and its heads
    can be refilled and removed. torchvision's Swin ShiftedWindowAttention (V1 and V2) becomes
    a WindowAttention (the same module, its Linears called as modules) for the same reason,
    and the attention of the torchvision / timm models listed in `zoo_attention` its swap.
    Returns the nn.MultiheadAttention modules left as they were, with the reason (an
    unusual configuration: kdim / vdim, add_bias_kv, add_zero_attn). A model that is itself
    an nn.MultiheadAttention is not swapped (there is no parent to hold the new one)."""
    from .zoo_attention import swap as zoo_swap  # (that module builds on this one)
    left = {}
    for name, m in list(model.named_modules()):
        new = None
        if name:
            new = WindowAttention.from_swin(m) if _is_swin_attention(m) else zoo_swap(m)
        if new is not None:
            replace_module(model, name, new)
            continue
        if not name or not isinstance(m, nn.MultiheadAttention):
            continue
        why = unsupported(m)
        if why:
            left[name] = why
            continue
        replace_module(model, name, QKVAttention.from_mha(m))
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
            replace_module(model, name, m.to_mha())
            swapped += 1
    return swapped


__all__ = ["QKVAttention", "WindowAttention", "prunable_attention", "fused_attention"]
