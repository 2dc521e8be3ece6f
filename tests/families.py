"""Small hand-written replicas of the tricky operations of the model families users bring
(torchvision / timm / user code), for tests/test_families.py. No downloads: each replica is a
few modules that reproduce the op patterns that broke compaction or structuring (issue 18).

Each family is `(build, example_shape, other_shapes)`: `build()` returns a fresh model (same seed,
same weights), `example_shape` is the input compaction sees, `other_shapes` are inputs the check
runs on besides it (another batch size, another spatial size where the model allows)."""
from __future__ import annotations

import collections
import math

import torch
from torch import nn
from torch.nn import functional as F


# -- timm-style layer replicas ------------------------------------------------------------------
class BatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d: a BatchNorm2d subclass whose forward also applies an activation."""

    def __init__(self, num_features: int, act_layer=nn.SiLU):
        super().__init__(num_features)
        self.act = act_layer()

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, self.momentum, self.eps)
        return self.act(x)


def _same_pad(size: int, k: int, s: int, d: int) -> int:
    return max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)


class Conv2dSame(nn.Conv2d):
    """timm's Conv2dSame: TensorFlow "same" padding computed from the input size in forward."""

    def __init__(self, cin, cout, k, stride=1, groups=1, bias=False):
        super().__init__(cin, cout, k, stride, 0, 1, groups, bias)

    def forward(self, x):
        ih, iw = x.shape[-2:]
        ph = _same_pad(ih, self.kernel_size[0], self.stride[0], self.dilation[0])
        pw = _same_pad(iw, self.kernel_size[1], self.stride[1], self.dilation[1])
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class StdConv2d(nn.Conv2d):
    """timm's StdConv2d: the weight is standardised per output channel in forward."""

    def __init__(self, cin, cout, k, stride=1, padding=0, bias=False, eps=1e-6):
        super().__init__(cin, cout, k, stride, padding, bias=bias)
        self.eps = eps

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                         training=True, momentum=0.0, eps=self.eps).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


# -- MobileNet-v2 / v3: inverted residual, depthwise, SE with expand_as, hardswish ---------------
class SE(nn.Module):
    """Squeeze-excitation: pooled branch, two 1x1 convs, sigmoid gate multiplied by expand_as."""

    def __init__(self, c, r=4):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(c, max(1, c // r), 1)
        self.fc2 = nn.Conv2d(max(1, c // r), c, 1)

    def forward(self, x):
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(self.pool(x)))))
        return x * s.expand_as(x)


class InvertedResidual(nn.Module):
    def __init__(self, c, expand=4, se=True, act=nn.Hardswish):
        super().__init__()
        h = c * expand
        self.expand = nn.Conv2d(c, h, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(h)
        self.act1 = act()
        self.dw = nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False)
        self.bn2 = nn.BatchNorm2d(h)
        self.act2 = act()
        self.se = SE(h) if se else nn.Identity()
        self.project = nn.Conv2d(h, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)

    def forward(self, x):
        y = self.act1(self.bn1(self.expand(x)))
        y = self.se(self.act2(self.bn2(self.dw(y))))
        return x + self.bn3(self.project(y))


class MobileNetV2ish(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.block1 = InvertedResidual(8, act=nn.Hardswish)
        self.block2 = InvertedResidual(8, act=nn.ReLU6, se=False)
        self.head = nn.Conv2d(8, 32, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        x = F.hardswish(self.bn(self.stem(x)))
        x = self.block2(self.block1(x))
        x = F.silu(self.head(x))
        return self.fc(torch.flatten(self.pool(x), 1))


# -- EfficientNet (timm tf_ variants): Conv2dSame, BatchNormAct2d, SE, SiLU, stochastic depth ----
class EffBlock(nn.Module):
    def __init__(self, c, expand=4):
        super().__init__()
        h = c * expand
        self.conv_pw = nn.Conv2d(c, h, 1, bias=False)
        self.bn1 = BatchNormAct2d(h)
        self.conv_dw = Conv2dSame(h, h, 3, groups=h)
        self.bn2 = BatchNormAct2d(h)
        self.se = SE(h)
        self.conv_pwl = nn.Conv2d(h, c, 1, bias=False)
        self.bn3 = BatchNormAct2d(c, act_layer=nn.Identity)

    def forward(self, x):
        y = self.bn2(self.conv_dw(self.bn1(self.conv_pw(x))))
        return x + self.bn3(self.conv_pwl(self.se(y)))  # drop path is the identity in eval


class EfficientNetish(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.conv_stem = Conv2dSame(3, 8, 3, stride=2)
        self.bn1 = BatchNormAct2d(8)
        self.block = EffBlock(8)
        self.conv_std = StdConv2d(8, 16, 3, padding=1)
        self.bn_std = nn.BatchNorm2d(16)
        self.conv_head = nn.Conv2d(16, 32, 1, bias=False)
        self.bn2 = BatchNormAct2d(32)
        self.classifier = nn.Linear(32, classes)

    def forward(self, x):
        x = self.block(self.bn1(self.conv_stem(x)))
        x = F.relu(self.bn_std(self.conv_std(x)))
        x = self.bn2(self.conv_head(x))
        return self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))


# -- ResNeXt / RegNet-Y: a grouped 3x3 conv inside a bottleneck (RegNet-Y: SE on its output) ----
class GroupedBottleneck(nn.Module):
    """torchvision's ResNeXt Bottleneck (1x1, grouped 3x3, 1x1, residual); with `se`, RegNet-Y's
    block (squeeze-excitation on the grouped conv's output)."""

    def __init__(self, cin, cout, width, group_width, stride=1, se=False):
        super().__init__()
        self.conv1 = nn.Sequential(*_conv_bn(cin, width))
        self.conv2 = nn.Sequential(*_conv_bn(width, width, 3, stride, groups=width // group_width))
        self.se = SE(width) if se else nn.Identity()
        self.conv3 = nn.Sequential(*_conv_bn(width, cout, relu=False))
        self.down = (nn.Sequential(*_conv_bn(cin, cout, 1, stride, relu=False))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        return F.relu(self.conv3(self.se(self.conv2(self.conv1(x)))) + self.down(x))


class TinyResNeXt(nn.Module):
    def __init__(self, se=False):
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(3, 16, 3))
        self.blocks = nn.Sequential(GroupedBottleneck(16, 32, 16, 4, se=se),
                                    GroupedBottleneck(32, 32, 16, 4, se=se),
                                    GroupedBottleneck(32, 48, 24, 8, stride=2, se=se))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(48, 10)

    def forward(self, x):
        return self.fc(self.pool(self.blocks(self.stem(x))).flatten(1))


# -- GhostNet (timm's): a channel and its depthwise copy concatenated side by side --------------
class GhostModule(nn.Module):
    """Half the outputs from a 1x1 conv, the other half a depthwise conv of those, concatenated
    (and sliced to the width asked for)."""

    def __init__(self, cin, cout, relu=True):
        super().__init__()
        self.out_chs, init = cout, math.ceil(cout / 2)
        act = [nn.ReLU()] if relu else []
        self.primary_conv = nn.Sequential(nn.Conv2d(cin, init, 1, bias=False), nn.BatchNorm2d(init), *act)
        self.cheap_operation = nn.Sequential(nn.Conv2d(init, init, 3, 1, 1, groups=init, bias=False),
                                             nn.BatchNorm2d(init), *act)

    def forward(self, x):
        x1 = self.primary_conv(x)
        out = torch.cat([x1, self.cheap_operation(x1)], dim=1)
        return out[:, :self.out_chs]


class GhostBottleneck(nn.Module):
    """Ghost module, a strided depthwise conv on the concatenation, a second ghost module
    (no activation), a shortcut."""

    def __init__(self, cin, mid, cout, stride=2):
        super().__init__()
        self.ghost1 = GhostModule(cin, mid)
        self.conv_dw = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn_dw = nn.BatchNorm2d(mid)
        self.ghost2 = GhostModule(mid, cout, relu=False)
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False),
                                      nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 1, bias=False),
                                      nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.ghost2(self.bn_dw(self.conv_dw(self.ghost1(x))))
        return y + self.shortcut(x)


class TinyGhostNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(3, 16, 3))
        self.blocks = nn.Sequential(GhostBottleneck(16, 48, 24), GhostBottleneck(24, 72, 40))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(40, 10)

    def forward(self, x):
        return self.fc(self.pool(self.blocks(self.stem(x))).flatten(1))


# -- MixNet (timm's): the channels split in parts by a list the module holds ---------------------
class MixedConv2d(nn.ModuleDict):
    """timm's MixedConv2d: the channels split into parts (`self.splits`, the list its forward
    passes to torch.split), a depthwise conv of its own kernel size on each, concatenated."""

    def __init__(self, ch, kernels=(3, 5)):
        splits = [ch // len(kernels)] * (len(kernels) - 1)
        splits = [ch - sum(splits)] + splits
        super().__init__({str(i): nn.Conv2d(c, c, k, padding=k // 2, groups=c, bias=False)
                          for i, (c, k) in enumerate(zip(splits, kernels))})
        self.splits = splits

    def forward(self, x):
        parts = torch.split(x, self.splits, 1)
        return torch.cat([conv(parts[i]) for i, conv in enumerate(self.values())], 1)


class TinyMixNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(3, 16, 3))
        self.expand = nn.Sequential(*_conv_bn(16, 32))
        self.mix = MixedConv2d(32)
        self.bn = nn.BatchNorm2d(32)
        self.project = nn.Sequential(*_conv_bn(32, 16, relu=False))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.project(F.relu(self.bn(self.mix(self.expand(x)))))
        return self.fc(self.pool(x).flatten(1))


# -- ConvFormer (timm's MetaFormer): StarReLU, s * relu(x) ** 2 + b with learned scalars ---------
class StarReLU(nn.Module):
    """timm's StarReLU (its attributes and forward). Trained, its bias is not zero: a dead hidden
    unit outputs it, one value everywhere, which the next Linear can fold into its bias."""

    def __init__(self, scale=0.9, bias=0.2):
        super().__init__()
        self.relu = nn.ReLU()
        self.scale = nn.Parameter(torch.full((1,), scale))
        self.bias = nn.Parameter(torch.full((1,), bias))

    def forward(self, x):
        return self.scale * self.relu(x) ** 2 + self.bias


class SepConv(nn.Module):
    """timm's MetaFormer SepConv token mixer on a [B, H, W, C] map: Linear, StarReLU, a
    depthwise conv (channels first), Linear, the Linears without bias."""

    def __init__(self, dim, expansion=2):
        super().__init__()
        med = dim * expansion
        self.pwconv1 = nn.Linear(dim, med, bias=False)
        self.act1 = StarReLU()
        self.dwconv = nn.Conv2d(med, med, 3, padding=1, groups=med, bias=False)
        self.pwconv2 = nn.Linear(med, dim, bias=False)

    def forward(self, x):
        x = self.act1(self.pwconv1(x)).permute(0, 3, 1, 2)
        return self.pwconv2(self.dwconv(x).permute(0, 2, 3, 1))


class TinyConvFormer(nn.Module):
    def __init__(self, dim=16):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 4, stride=4)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.mixer = SepConv(dim)
        self.fc1 = nn.Linear(dim, 4 * dim, bias=False)  # (timm's mlp_bias=False)
        self.act = StarReLU(0.8, -0.3)
        self.fc2 = nn.Linear(4 * dim, dim, bias=False)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.stem(x).permute(0, 2, 3, 1)
        x = x + self.mixer(self.norm1(x))
        x = x + self.fc2(self.act(self.fc1(self.norm2(x))))
        return self.head(x.mean((1, 2)))


# -- DPN (timm's): dual paths, a residual and a densely growing one, split by channel slices ------
class DualPathBlock(nn.Module):
    """The block's output is sliced: the first r channels are added to the residual path, the
    rest concatenated to the dense path (which grows by `inc` per block)."""

    def __init__(self, cin, r, inc, project):
        super().__init__()
        self.r = r
        self.proj = nn.Sequential(*_conv_bn(cin, r + 2 * inc)) if project else None
        # pre-activation (BatchNorm, ReLU, conv), as timm's BnActConv2d
        self.a = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, 16, 1, bias=False))
        self.b = nn.Sequential(nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, 1, 1, bias=False))
        self.c = nn.Sequential(nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, r + inc, 1, bias=False))

    def forward(self, x):
        x_in = torch.cat(x, dim=1) if isinstance(x, tuple) else x
        if self.proj is not None:
            xs = self.proj(x_in)
            resid, dense = xs[:, :self.r], xs[:, self.r:]
        else:
            resid, dense = x
        out = self.c(self.b(self.a(x_in)))
        return resid + out[:, :self.r], torch.cat([dense, out[:, self.r:]], dim=1)


class TinyDPN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(3, 16, 3))
        self.block1 = DualPathBlock(16, 24, 8, project=True)
        self.block2 = DualPathBlock(48, 24, 8, project=False)
        self.bn = nn.BatchNorm2d(56)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(56, 10)

    def forward(self, x):
        x = torch.cat(self.block2(self.block1(self.stem(x))), dim=1)
        return self.fc(self.pool(F.relu(self.bn(x))).flatten(1))


# -- ShuffleNet-v2 (torchvision's units): channel split, channel shuffle (view-transpose-view) ----
def channel_shuffle(x, groups):
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(b, -1, h, w)


def _conv_bn(cin, cout, k=1, stride=1, groups=1, relu=True):
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
              nn.BatchNorm2d(cout)]
    return layers + [nn.ReLU()] if relu else layers


class ShuffleUnit(nn.Module):
    """torchvision's ShuffleNetV2 InvertedResidual: stride 1 chunks the input in two and runs
    one half; stride 2 runs two branches on the whole input; the concatenation is shuffled."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.stride = stride
        h = cout // 2
        if stride > 1:
            self.branch1 = nn.Sequential(*_conv_bn(cin, cin, 3, stride, cin, relu=False),
                                         *_conv_bn(cin, h))
        else:
            self.branch1 = nn.Sequential()
        self.branch2 = nn.Sequential(*_conv_bn(cin if stride > 1 else h, h),
                                     *_conv_bn(h, h, 3, stride, h, relu=False), *_conv_bn(h, h))

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetish(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.conv1 = nn.Sequential(*_conv_bn(3, 8, 3, 2))
        self.stage2 = nn.Sequential(ShuffleUnit(8, 16, 2), ShuffleUnit(16, 16, 1),
                                    ShuffleUnit(16, 16, 1))
        self.stage3 = nn.Sequential(ShuffleUnit(16, 32, 2), ShuffleUnit(32, 32, 1))
        self.conv5 = nn.Sequential(*_conv_bn(32, 64))
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        x = self.stage3(self.stage2(self.conv1(x)))
        return self.fc(self.conv5(x).mean([2, 3]))


# -- Swin (torchvision's blocks): windows, shifted by torch.roll, relative position bias ----------
class ShiftedWindowAttention(nn.Module):
    """torchvision's ShiftedWindowAttention (same class name, constructor and attributes, so
    `prunable_attention` swaps it): F.linear with the qkv / proj modules' weights (their forward
    never runs), a relative position bias gathered from a table by an index buffer and viewed
    to heads x N x N, a roll of the feature map and an attention mask for shifted windows."""

    def __init__(self, dim, window_size, shift_size, num_heads, qkv_bias=True, proj_bias=True,
                 attention_dropout=0.0, dropout=0.0):
        super().__init__()
        self.window_size, self.shift_size, self.num_heads = window_size, shift_size, num_heads
        self.attention_dropout, self.dropout = attention_dropout, dropout
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        window = window_size[0]
        self.relative_position_bias_table = nn.Parameter(
            torch.randn((2 * window - 1) ** 2, num_heads) * 0.02)
        r = torch.arange(window)
        coords = torch.flatten(torch.stack(torch.meshgrid(r, r, indexing="ij")), 1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
        rel[:, :, 0] += window - 1
        rel[:, :, 1] += window - 1
        rel[:, :, 0] *= 2 * window - 1
        self.register_buffer("relative_position_index", rel.sum(-1).flatten())

    def forward(self, x):
        B, H, W, C = x.shape
        ws, n, heads = self.window_size[0], self.window_size[0] ** 2, self.num_heads
        pad_r, pad_b = (ws - W % ws) % ws, (ws - H % ws) % ws
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        _, ph, pw, _ = x.shape
        shift = self.shift_size[0] if ws < ph and ws < pw else 0
        if shift > 0:
            x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
        nw = (ph // ws) * (pw // ws)
        x = x.view(B, ph // ws, ws, pw // ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(B * nw, n, C)
        qkv = F.linear(x, self.qkv.weight, self._qkv_bias())
        qkv = qkv.reshape(x.size(0), n, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = self._scores(q, k, C) + self._bias(n)
        if shift > 0:
            mask = x.new_zeros((ph, pw))
            cut = ((0, -ws), (-ws, -shift), (-shift, None))
            count = 0
            for h in cut:
                for w in cut:
                    mask[h[0]:h[1], w[0]:w[1]] = count
                    count += 1
            mask = mask.view(ph // ws, ws, pw // ws, ws).permute(0, 2, 1, 3).reshape(nw, n)
            mask = mask.unsqueeze(1) - mask.unsqueeze(2)
            mask = mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)
            attn = attn.view(x.size(0) // nw, nw, heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, heads, n, n)
        x = F.softmax(attn, dim=-1).matmul(v).transpose(1, 2).reshape(x.size(0), n, C)
        x = F.linear(x, self.proj.weight, self.proj.bias)
        x = x.view(B, ph // ws, pw // ws, ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(B, ph, pw, C)
        if shift > 0:
            x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
        return x[:, :H, :W, :].contiguous()


    def _qkv_bias(self):
        return self.qkv.bias

    def _scores(self, q, k, C):
        return (q * (C // self.num_heads) ** -0.5).matmul(k.transpose(-2, -1))

    def _bias(self, n):
        bias = self.relative_position_bias_table[self.relative_position_index]
        return bias.view(n, n, -1).permute(2, 0, 1).contiguous().unsqueeze(0)


class ShiftedWindowAttentionV2(ShiftedWindowAttention):
    """torchvision's ShiftedWindowAttentionV2 (same class name and attributes): cosine attention
    scaled by a per-head logit scale, the position bias from an MLP on log-spaced relative
    coordinates (16 sigmoid of it, one output per head), the keys' third of the qkv bias never
    added (zeroed in a copy in the forward)."""

    def __init__(self, dim, window_size, shift_size, num_heads, qkv_bias=True, proj_bias=True,
                 attention_dropout=0.0, dropout=0.0):
        super().__init__(dim, window_size, shift_size, num_heads, qkv_bias, proj_bias,
                         attention_dropout, dropout)
        del self.relative_position_bias_table
        self.logit_scale = nn.Parameter(torch.log(10 * torch.ones((num_heads, 1, 1)))
                                        + 0.3 * torch.randn(num_heads, 1, 1))
        self.cpb_mlp = nn.Sequential(nn.Linear(2, 512, bias=True), nn.ReLU(inplace=True),
                                     nn.Linear(512, num_heads, bias=False))
        w = window_size[0]
        r = torch.arange(-(w - 1), w, dtype=torch.float32)
        table = torch.stack(torch.meshgrid([r, r], indexing="ij")).permute(1, 2, 0).unsqueeze(0)
        table = table / (w - 1) * 8
        self.register_buffer("relative_coords_table",
                             torch.sign(table) * torch.log2(table.abs() + 1.0) / 3.0)
        with torch.no_grad():
            self.qkv.bias[dim:2 * dim].zero_()

    def _qkv_bias(self):
        bias = self.qkv.bias.clone()
        n = bias.numel() // 3
        bias[n:2 * n].zero_()
        return bias

    def _scores(self, q, k, C):
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        return attn * torch.clamp(self.logit_scale, max=math.log(100.0)).exp()

    def _bias(self, n):
        table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
        bias = table[self.relative_position_index].view(n, n, -1).permute(2, 0, 1).contiguous()
        return 16 * torch.sigmoid(bias.unsqueeze(0))


def window_relative_position_index(wh, ww):
    """Swin's index of each (query, key) token pair of a wh x ww window into its relative
    position bias table ((2 wh - 1) (2 ww - 1) rows), as a (wh ww) x (wh ww) matrix."""
    r_h, r_w = torch.arange(wh), torch.arange(ww)
    coords = torch.flatten(torch.stack(torch.meshgrid(r_h, r_w, indexing="ij")), 1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + torch.tensor([wh - 1, ww - 1])
    return rel[..., 0] * (2 * ww - 1) + rel[..., 1]


class TimmWindowAttention(nn.Module):
    """timm's Swin WindowAttention: on windows already cut out ([B * windows, N, C]), its qkv
    Linear called as a module, the heads' output reshaped with -1, and a relative position bias
    table of one column per head that it does not declare (found by its shape)."""

    def __init__(self, dim, window, num_heads):
        super().__init__()
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(
            torch.randn((2 * window - 1) ** 2, num_heads) * 0.5)
        self.register_buffer("relative_position_index",
                             window_relative_position_index(window, window), persistent=False)

    def forward(self, x, mask=None):
        B_, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        attn = attn + bias.view(N, N, -1).permute(2, 0, 1).contiguous().unsqueeze(0)
        if mask is not None:
            attn = attn.view(-1, mask.shape[0], self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
        return self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(B_, N, -1))


def timm_biased_qkv(m, dim, qkv_bias):
    """timm's fused qkv of Swin V2, BEiT and EVA: a Linear without bias, q_bias and v_bias
    parameters and a zero keys' bias buffer (None without a bias)."""
    m.qkv = nn.Linear(dim, dim * 3, bias=False)
    if qkv_bias:
        m.q_bias = nn.Parameter(torch.randn(dim) * 0.5)
        m.register_buffer("k_bias", torch.zeros(dim), persistent=False)
        m.v_bias = nn.Parameter(torch.randn(dim) * 0.5)
    else:
        m.q_bias = m.k_bias = m.v_bias = None


def timm_biased_qkv_out(m, x):
    """What timm computes with them: the three biases added through F.linear on qkv.weight."""
    if m.q_bias is None:
        return m.qkv(x)
    return F.linear(x, m.qkv.weight, torch.cat((m.q_bias, m.k_bias, m.v_bias)))


class TimmWindowAttentionV2(nn.Module):
    """timm's Swin V2 WindowAttention (its class name, attributes and forward): q_bias, a zero
    keys' bias buffer and v_bias added through F.linear on qkv.weight, cosine attention scaled
    by a per-head logit scale, 16 sigmoid of a bias MLP's output, the heads' output reshaped to
    the input width C."""

    def __init__(self, dim, window, num_heads, qkv_bias=True):
        super().__init__()
        self.window_size, self.num_heads = (window, window), num_heads
        self.logit_scale = nn.Parameter(torch.log(10 * torch.ones((num_heads, 1, 1)))
                                        + 0.3 * torch.randn(num_heads, 1, 1))
        self.cpb_mlp = nn.Sequential(nn.Linear(2, 512, bias=True), nn.ReLU(inplace=True),
                                     nn.Linear(512, num_heads, bias=False))
        timm_biased_qkv(self, dim, qkv_bias)
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)
        r = torch.arange(-(window - 1), window, dtype=torch.float32)
        table = torch.stack(torch.meshgrid([r, r], indexing="ij")).permute(1, 2, 0).unsqueeze(0)
        table = table / (window - 1) * 8
        self.register_buffer("relative_coords_table",
                             torch.sign(table) * torch.log2(table.abs() + 1.0) / 3.0, persistent=False)
        self.register_buffer("relative_position_index",
                             window_relative_position_index(window, window), persistent=False)

    def forward(self, x, mask=None):
        B_, N, C = x.shape
        qkv = timm_biased_qkv_out(self, x)
        q, k, v = qkv.reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(self.logit_scale, max=math.log(1.0 / 0.01)).exp()
        table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
        bias = table[self.relative_position_index.view(-1)].view(N, N, -1).permute(2, 0, 1)
        attn = attn + 16 * torch.sigmoid(bias.contiguous()).unsqueeze(0)
        if mask is not None:
            attn = attn.view(-1, mask.shape[0], self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
        x = self.attn_drop(attn.softmax(-1))
        return self.proj_drop(self.proj((x @ v).transpose(1, 2).reshape(B_, N, C)))


TimmWindowAttentionV2.__name__ = TimmWindowAttentionV2.__qualname__ = "WindowAttention"  # timm's


class TimmWindows(nn.Module):
    """timm's Swin block around its attention: pad the [B, H, W, C] map to whole windows, roll
    it by `shift`, cut the windows out, attend within each (the shift mask, zero without a
    shift, handed as an argument), put them back. `v2`: timm's Swin V2 attention."""

    def __init__(self, dim, window, num_heads, shift=0, v2=False):
        super().__init__()
        self.window, self.shift = window, shift
        self.attn = (TimmWindowAttentionV2 if v2 else TimmWindowAttention)(dim, window, num_heads)

    def forward(self, x):
        B, H, W, C = x.shape
        w, s = self.window, self.shift
        x = F.pad(x, (0, 0, 0, (w - W % w) % w, 0, (w - H % w) % w))
        ph, pw = x.shape[1:3]
        region = x.new_zeros(ph, pw)
        if s:
            x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))
            for i, hs in enumerate((slice(0, -w), slice(-w, -s), slice(-s, None))):
                for j, ws in enumerate((slice(0, -w), slice(-w, -s), slice(-s, None))):
                    region[hs, ws] = 3 * i + j
        region = region.view(ph // w, w, pw // w, w).permute(0, 2, 1, 3).reshape(-1, w * w)
        mask = region.unsqueeze(1) - region.unsqueeze(2)
        mask = mask.masked_fill(mask != 0, -100.0)
        win = x.view(B, ph // w, w, pw // w, w, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, C)
        out = self.attn(win, mask=mask)
        out = out.view(B, ph // w, pw // w, w, w, C).permute(0, 1, 3, 2, 4, 5).reshape(B, ph, pw, C)
        if s:
            out = torch.roll(out, shifts=(s, s), dims=(1, 2))
        return out[:, :H, :W].contiguous()


class SwinBlock(nn.Module):
    """Pre-norm attention and MLP on a [B, H, W, C] map (nn.Linear on a 4-D tensor)."""

    def __init__(self, dim, window, shift, heads, kind="v1"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        if kind in ("timm", "timm_v2"):
            self.attn = TimmWindows(dim, window, heads, shift, v2=kind == "timm_v2")
        else:
            cls = ShiftedWindowAttentionV2 if kind == "v2" else ShiftedWindowAttention
            self.attn = cls(dim, [window, window], [shift, shift], heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """2x2 neighbours concatenated (strided slices of a [B, H, W, C] map), LayerNorm, Linear."""

    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x):
        H, W = x.shape[1:3]
        x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x))


class TimmPatchMerging(PatchMerging):
    """timm's PatchMerging (its forward): the 2x2 neighbours gathered by a reshape and a permute,
    then flattened with the channels fastest (feature j * C + c: channel c of neighbour j)."""

    def forward(self, x):
        B, H, W, C = x.shape
        x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        _, H, W, _ = x.shape
        x = x.reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.reduction(self.norm(x))


class TinySwin(nn.Module):
    def __init__(self, classes=10, dim=16, window=4, kind="v1"):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.patch_norm = nn.LayerNorm(dim)
        self.blocks = nn.Sequential(SwinBlock(dim, window, 0, 2, kind),
                                    SwinBlock(dim, window, window // 2, 2, kind))
        self.merge = (TimmPatchMerging if kind.startswith("timm") else PatchMerging)(dim)
        self.block3 = SwinBlock(2 * dim, window, 0, 4, kind)
        self.norm = nn.LayerNorm(2 * dim)
        self.head = nn.Linear(2 * dim, classes)

    def forward(self, x):
        x = self.patch_norm(self.patch(x).permute(0, 2, 3, 1))
        x = self.norm(self.block3(self.merge(self.blocks(x))))
        return self.head(x.permute(0, 3, 1, 2).mean([2, 3]))


# -- PVT-v2 / SegFormer: an MLP whose hidden units are viewed as a map for a depthwise conv ---------
class MixFFN(nn.Module):
    """PVT-v2's and SegFormer's MLP (timm's MlpWithDepthwiseConv): a Linear on tokens, the tokens
    viewed as a map (transpose, view) for a 3x3 depthwise conv, flattened back (flatten,
    transpose), GELU, a Linear. `scrambled`: the tokens are viewed as a map without the
    transpose, so the conv's channels mix tokens and features (the group must stay whole)."""

    def __init__(self, dim, hidden, scrambled=False):
        super().__init__()
        self.scrambled = scrambled
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x, size):
        x = self.fc1(x)
        B, N, C = x.shape
        x = x.reshape(B, C, *size) if self.scrambled else x.transpose(1, 2).view(B, C, *size)
        x = self.dwconv(x).flatten(2).transpose(1, 2)
        return self.fc2(self.act(x))


class PvtV2Attention(nn.Module):
    """timm's PVT-v2 Attention (its class name, attributes and forward): q from the tokens,
    k and v (one `kv` Linear) from the tokens viewed as a map and reduced by a strided conv
    and a LayerNorm (or, `linear`, pooled to 2 x 2, a 1x1 conv, a LayerNorm and a GELU), the
    heads' output reshaped to the input width C."""

    def __init__(self, dim, num_heads, sr_ratio=2, linear=False):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)
        self.pool = nn.AdaptiveAvgPool2d(2) if linear else None
        self.sr = nn.Conv2d(dim, dim, 1 if linear else sr_ratio, stride=1 if linear else sr_ratio)
        self.norm = nn.LayerNorm(dim)
        self.act = nn.GELU() if linear else None

    def forward(self, x, feat_size):
        B, N, C = x.shape
        q = self.q(x).reshape(B, N, self.num_heads, -1).permute(0, 2, 1, 3)
        x = x.permute(0, 2, 1).reshape(B, C, *feat_size)
        x = self.sr(self.pool(x) if self.pool is not None else x).reshape(B, C, -1).permute(0, 2, 1)
        x = self.norm(x)
        if self.act is not None:
            x = self.act(x)
        k, v = self.kv(x).reshape(B, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        x = (self.attn_drop(attn) @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


PvtV2Attention.__name__ = PvtV2Attention.__qualname__ = "Attention"  # timm's class name


class GlobalSubSampleAttn(nn.Module):
    """Twins' GlobalSubSampleAttn (its class name, attributes and forward): PVT's attention
    without pooling, no head_dim attribute (C // num_heads in the forward), the map size
    argument named `size`, no reduction (sr None, norm None) at sr_ratio 1."""

    def __init__(self, dim, num_heads, sr_ratio=2):
        super().__init__()
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)
        self.sr = nn.Conv2d(dim, dim, sr_ratio, stride=sr_ratio) if sr_ratio > 1 else None
        self.norm = nn.LayerNorm(dim) if sr_ratio > 1 else None

    def forward(self, x, size):
        B, N, C = x.shape
        q = self.q(x).reshape(B, N, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)
        if self.sr is not None:
            x = self.norm(self.sr(x.permute(0, 2, 1).reshape(B, C, *size)).reshape(B, C, -1).permute(0, 2, 1))
        k, v = self.kv(x).reshape(B, -1, 2, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj_drop(self.proj((self.attn_drop(attn) @ v).transpose(1, 2).reshape(B, N, C)))


class LocallyGroupedAttn(nn.Module):
    """Twins' LocallyGroupedAttn (its class name, attributes and forward): the [B, H * W, C]
    tokens as a map padded to whole ws x ws windows, attention within each window (6-D
    tensors), the heads' output reshaped to the input width C, the padding cut off."""

    def __init__(self, dim, num_heads, ws=2):
        super().__init__()
        self.num_heads, self.ws, self.scale = num_heads, ws, (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x, size):
        B, N, C = x.shape
        H, W = size
        ws = self.ws
        x = F.pad(x.view(B, H, W, C), (0, 0, 0, (ws - W % ws) % ws, 0, (ws - H % ws) % ws))
        _, Hp, Wp, _ = x.shape
        _h, _w = Hp // ws, Wp // ws
        x = x.reshape(B, _h, ws, _w, ws, C).transpose(2, 3)
        qkv = self.qkv(x).reshape(B, _h * _w, ws * ws, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(3, 0, 1, 4, 2, 5).unbind(0)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        x = (self.attn_drop(attn) @ v).transpose(2, 3).reshape(B, _h, _w, ws, ws, C)
        x = x.transpose(2, 3).reshape(B, _h * ws, _w * ws, C)[:, :H, :W].contiguous()
        return self.proj_drop(self.proj(x.reshape(B, N, C)))


class TinyTwins(nn.Module):
    """Patches, a pre-norm residual locally grouped attention (Twins-SVT's) on a map that is
    not a multiple of the window, an MLP, a head; swapped as `ticketsmith.models.build` does
    (GroupedWindowAttention)."""

    def __init__(self, classes=10, dim=16):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = LocallyGroupedAttn(dim, 4, ws=3)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.head = nn.Linear(dim, classes)
        from ticketsmith.models import prunable_attention
        prunable_attention(self)

    def forward(self, x):
        x = self.patch(x)
        size = x.shape[2:]
        x = x.flatten(2).transpose(1, 2)
        x = x + self.attn(self.norm1(x), size)
        x = x + self.mlp(self.norm2(x))
        return self.head(x.mean(1))


class TinyPVT(nn.Module):
    """A patch embedding conv, one pre-norm MixFFN block on its tokens, a mean over tokens;
    `attn` (None, "sr" or "linear"): a pre-norm PVT-v2 attention before it, swapped as
    `ticketsmith.models.build` does (PvtAttention)."""

    def __init__(self, classes=10, dim=16, scrambled=False, attn=None):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        if attn:
            self.norm0 = nn.LayerNorm(dim)
            self.attn = PvtV2Attention(dim, 4, linear=attn == "linear")
        self.norm1 = nn.LayerNorm(dim)
        self.mlp = MixFFN(dim, 4 * dim, scrambled)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)
        if attn:
            from ticketsmith.models import prunable_attention
            prunable_attention(self)

    def forward(self, x):
        x = self.patch(x)
        H, W = x.shape[2:]
        x = x.flatten(2).transpose(1, 2)
        if hasattr(self, "attn"):
            x = x + self.attn(self.norm0(x), (H, W))
        x = x + self.mlp(self.norm1(x), (H, W))
        return self.head(self.norm(x).mean(1))


# -- LeViT: Linear + BatchNorm1d over the tokens flattened into the batch ----------------------
class LinearNorm(nn.Module):
    """LeViT's LinearNorm: a Linear on tokens, then a BatchNorm1d over them flattened into the
    batch ([B * N, C]), reshaped back."""

    def __init__(self, cin, cout):
        super().__init__()
        self.linear = nn.Linear(cin, cout, bias=False)
        self.bn = nn.BatchNorm1d(cout)

    def forward(self, x):
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class TinyLeViT(nn.Module):
    """A conv stem whose map becomes the tokens, and LeViT's residual MLP of two LinearNorms."""

    def __init__(self, classes=10, dim=16):
        super().__init__()
        self.patch = nn.Sequential(nn.Conv2d(3, dim, 4, stride=4), nn.BatchNorm2d(dim))
        self.ln1, self.act, self.ln2 = LinearNorm(dim, 2 * dim), nn.Hardswish(), LinearNorm(2 * dim, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = x + self.ln2(self.act(self.ln1(x)))
        return self.head(x.mean(1))


# -- UNet: ConvTranspose2d decoder, concatenation skips -----------------------------------------
def _double(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(), nn.Conv2d(cout, cout, 3, padding=1, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU())


class TinyUNet(nn.Module):
    def __init__(self, cin=3, cout=2):
        super().__init__()
        self.enc1 = _double(cin, 8)
        self.enc2 = _double(8, 16)
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.dec1 = _double(16, 8)
        self.out = nn.Conv2d(8, cout, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        d = self.dec1(torch.cat([self.up(e2), e1], 1))
        return self.out(d)


# -- ViT block: nn.MultiheadAttention (reads out_proj.weight), LayerNorm, GELU MLP ---------------
class ViTBlock(nn.Module):
    def __init__(self, dim=32, heads=4, mlp=64):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp)
        self.fc2 = nn.Linear(mlp, dim)

    def forward(self, x):
        y = self.norm1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TinyViT(nn.Module):
    def __init__(self, classes=10, dim=32, patch=4):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, stride=patch)
        self.block = ViTBlock(dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = self.norm(self.block(x))
        return self.head(x.mean(1))


# -- timm's BEiT: q and v biases added through F.linear, a class token, a per-head bias table ----
def beit_relative_position_index(wh, ww):
    """timm's BEiT index into its bias table: Swin's relative positions between patches, and
    three more rows for the class token (to the patches, from them, itself)."""
    n = (2 * wh - 1) * (2 * ww - 1) + 3
    index = torch.zeros((wh * ww + 1,) * 2, dtype=torch.long)
    index[1:, 1:] = window_relative_position_index(wh, ww)
    index[0, 0:] = n - 3
    index[0:, 0] = n - 2
    index[0, 0] = n - 1
    return index


def class_and_patch_tokens(m, x):
    """[B, 1 + patches, dim]: the model's class token, then its patch embedding's tokens."""
    x = m.patch(x).flatten(2).transpose(1, 2)
    return torch.cat([m.cls_token.expand(x.shape[0], -1, -1), x], dim=1)


class TimmBeitAttention(nn.Module):
    """timm's BEiT Attention (its class name, attributes and forward): q_bias, a zero keys'
    bias buffer and v_bias added through F.linear on qkv.weight, a relative position bias
    table of one column per head (with the class token's three rows) and an optional bias
    shared by all layers, the heads' output reshaped to the input width C."""

    def __init__(self, dim, num_heads, qkv_bias=True, window_size=None):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        timm_biased_qkv(self, dim, qkv_bias)
        if window_size:
            self.window_size = window_size
            n = (2 * window_size[0] - 1) * (2 * window_size[1] - 1) + 3
            self.relative_position_bias_table = nn.Parameter(torch.randn(n, num_heads) * 0.5)
            self.register_buffer("relative_position_index",
                                 beit_relative_position_index(*window_size), persistent=False)
        else:
            self.window_size = self.relative_position_bias_table = None
            self.relative_position_index = None
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x, shared_rel_pos_bias=None):
        B, N, C = x.shape
        qkv = timm_biased_qkv_out(self, x)
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if self.relative_position_bias_table is not None:
            bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
            attn = attn + bias.view(N, N, -1).permute(2, 0, 1).contiguous().unsqueeze(0)
        if shared_rel_pos_bias is not None:
            attn = attn + shared_rel_pos_bias
        x = self.attn_drop(attn.softmax(dim=-1)) @ v
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))


TimmBeitAttention.__name__ = TimmBeitAttention.__qualname__ = "Attention"  # timm's class name


class BeitBlock(nn.Module):
    def __init__(self, dim, heads, window, own_bias=True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = TimmBeitAttention(dim, heads, window_size=window if own_bias else None)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.gamma_1 = nn.Parameter(0.5 + torch.rand(dim))  # layer scale
        self.gamma_2 = nn.Parameter(0.5 + torch.rand(dim))

    def forward(self, x, shared_rel_pos_bias=None):
        x = x + self.gamma_1 * self.attn(self.norm1(x), shared_rel_pos_bias=shared_rel_pos_bias)
        return x + self.gamma_2 * self.mlp(self.norm2(x))


class TinyBeit(nn.Module):
    """timm's BEiT in small: patches and a class token, blocks with layer scale, each
    attention with its own bias table or (`shared=True`) one table of the model's, added by
    every layer; swapped as `ticketsmith.models.build` does (BeitAttention)."""

    def __init__(self, classes=10, dim=16, patch=8, image=32, heads=4, shared=False):
        super().__init__()
        grid = (image // patch, image // patch)
        self.patch = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        if shared:
            n = (2 * grid[0] - 1) * (2 * grid[1] - 1) + 3
            self.shared_table = nn.Parameter(torch.randn(n, heads) * 0.5)
            self.register_buffer("shared_index", beit_relative_position_index(*grid))
        else:
            self.shared_table = None
        self.blocks = nn.ModuleList([BeitBlock(dim, heads, grid, not shared) for _ in range(2)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)
        from ticketsmith.models import prunable_attention
        prunable_attention(self)

    def forward(self, x):
        x = class_and_patch_tokens(self, x)
        shared = None
        if self.shared_table is not None:
            n = self.shared_index.shape[0]
            shared = self.shared_table[self.shared_index.view(-1)].view(n, n, -1).permute(2, 0, 1)
        for block in self.blocks:
            x = block(x, shared_rel_pos_bias=shared)
        return self.head(self.norm(x)[:, 0])


# -- timm's EVA / EVA-02: fused qkv with q and v biases, rotary embedding, optional norms -----
def apply_rot_embed_cat(x, emb, half=False):
    """A rotary embedding given as [sin | cos] along the last dimension (timm's layout): x cos +
    rot(x) sin, rot pairing neighbours (or the two halves with `half`). The swap calls the one
    of the module defining the attention class: this one for the replica below."""
    sin, cos = emb.chunk(2, -1)
    if half:
        a, b = x.chunk(2, -1)
        rot = torch.cat([-b, a], -1)
    else:
        rot = torch.stack([-x[..., 1::2], x[..., ::2]], -1).reshape(x.shape)
    return x * cos + rot * sin


class EvaAttention(nn.Module):
    """timm's EvaAttention with a fused qkv (its class name, attributes and forward): q_bias, a
    zero keys' bias and v_bias through F.linear, per-head q / k norms, the rotary embedding on
    all but the class token, a norm over all heads' outputs (`scale_norm`) and an optional
    gate, the heads' output reshaped to the input width C."""

    def __init__(self, dim, num_heads, scale_norm=False, gated=False, qk_norm=False, half=False):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.num_prefix_tokens, self.rotate_half = 1, half
        timm_biased_qkv(self, dim, True)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(0.0)
        self.norm = nn.LayerNorm(dim) if scale_norm else nn.Identity()
        self.gate = nn.Linear(dim, dim) if gated else None
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x, rope=None, attn_mask=None, is_causal=False):
        B, N, C = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = timm_biased_qkv_out(self, x)
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            p = self.num_prefix_tokens
            q = torch.cat([q[:, :, :p], apply_rot_embed_cat(q[:, :, p:], rope, self.rotate_half)], 2)
            k = torch.cat([k[:, :, :p], apply_rot_embed_cat(k[:, :, p:], rope, self.rotate_half)], 2)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if attn_mask is not None:
            attn = attn + attn_mask
        x = self.attn_drop(attn.softmax(dim=-1)) @ v
        x = self.norm(x.transpose(1, 2).reshape(B, N, C))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


class GluMlp(nn.Module):
    """timm's GluMlp (its class name, attributes and forward): one fc1 for both halves of the
    gated hidden layer, chunked (the last dimension, or the channels with `use_conv`), the gate
    the second half (`gate_last`) or the first."""

    def __init__(self, dim, hidden, act=nn.SiLU, gate_last=True, use_conv=False):
        super().__init__()
        layer = (lambda i, o: nn.Conv2d(i, o, 1)) if use_conv else nn.Linear
        self.chunk_dim, self.gate_last = (1 if use_conv else -1), gate_last
        self.fc1 = layer(dim, 2 * hidden)
        self.act = act()
        self.drop1 = nn.Dropout(0.0)
        self.norm = nn.Identity()
        self.fc2 = layer(hidden, dim)
        self.drop2 = nn.Dropout(0.0)

    def forward(self, x):
        x1, x2 = self.fc1(x).chunk(2, dim=self.chunk_dim)
        x = x1 * self.act(x2) if self.gate_last else self.act(x1) * x2
        return self.drop2(self.fc2(self.norm(self.drop1(x))))


class EvaBlock(nn.Module):
    def __init__(self, dim, heads, glu=False, **kw):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = EvaAttention(dim, heads, **kw)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = GluMlp(dim, 2 * dim, gate_last=False) if glu else nn.Sequential(
            nn.Linear(dim, 4 * dim), nn.SiLU(), nn.Linear(4 * dim, dim))

    def forward(self, x, rope=None):
        x = x + self.attn(self.norm1(x), rope=rope)
        return x + self.mlp(self.norm2(x))


class TinyEva(nn.Module):
    """timm's EVA-02 in small: patches and a class token, a fixed rotary embedding of the
    patch positions handed to every block; swapped as `ticketsmith.models.build` does
    (EvaAttention; `glu`: EVA-02's SwiGLU MLP, a GluMlp, becomes a SplitGluMlp). `kw` goes to
    the attention (scale_norm, gated, qk_norm, half)."""

    def __init__(self, classes=10, dim=16, patch=8, image=32, heads=4, glu=False, **kw):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        n, hd = (image // patch) ** 2, dim // heads
        angle = torch.arange(n)[:, None] * (0.5 ** torch.arange(hd // 2))[None].repeat_interleave(2, 1)
        self.register_buffer("rope", torch.cat([angle.sin(), angle.cos()], -1), persistent=False)
        self.blocks = nn.ModuleList([EvaBlock(dim, heads, glu, **kw) for _ in range(2)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)
        from ticketsmith.models import prunable_attention, prunable_mlp
        prunable_attention(self)
        prunable_mlp(self)

    def forward(self, x):
        x = class_and_patch_tokens(self, x)
        for block in self.blocks:
            x = block(x, rope=self.rope)
        return self.head(self.norm(x)[:, 0])


class ConvGlu(nn.Module):
    """A conv stem, a convolutional GluMlp (1x1 convs, channels chunked; the gate first, a
    sigmoid: the original GLU) with a residual, pooling and a head; swapped by prunable_mlp."""

    def __init__(self, classes=10, dim=8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dim, 3, padding=1), nn.BatchNorm2d(dim), nn.ReLU())
        self.mlp = GluMlp(dim, 12, act=nn.Sigmoid, gate_last=False, use_conv=True)
        self.head = nn.Linear(dim, classes)
        from ticketsmith.models import prunable_mlp
        assert prunable_mlp(self) == 1

    def forward(self, x):
        x = self.stem(x)
        return self.head((x + self.mlp(x)).mean((2, 3)))


# -- torchvision's MaxViT: attention on [B, groups, tokens, D], n_heads, width-scaled ----------
class RelativePositionalMultiHeadAttention(nn.Module):
    """torchvision's MaxViT attention (its class name, attributes and forward): to_qkv chunked
    into q, k, v, `n_heads` heads, k scaled by the model width's -0.5 power, a relative position
    bias table of one column per head, the heads' output reshaped to the input width D."""

    def __init__(self, feat_dim, head_dim, max_seq_len):
        super().__init__()
        self.n_heads, self.head_dim = feat_dim // head_dim, head_dim
        self.size, self.max_seq_len = int(math.sqrt(max_seq_len)), max_seq_len
        self.to_qkv = nn.Linear(feat_dim, 3 * feat_dim)
        self.scale_factor = feat_dim ** -0.5
        self.merge = nn.Linear(feat_dim, feat_dim)
        s = self.size
        self.relative_position_bias_table = nn.Parameter(torch.randn((2 * s - 1) ** 2, self.n_heads))
        self.register_buffer("relative_position_index", window_relative_position_index(s, s))

    def forward(self, x):
        B, G, P, D = x.shape
        q, k, v = torch.chunk(self.to_qkv(x), 3, dim=-1)
        q, k, v = (t.reshape(B, G, P, self.n_heads, self.head_dim).permute(0, 1, 3, 2, 4)
                   for t in (q, k, v))
        k = k * self.scale_factor
        n = self.max_seq_len
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        attn = F.softmax(torch.einsum("bghid,bghjd->bghij", q, k) + bias.permute(2, 0, 1), dim=-1)
        out = torch.einsum("bghij,bghjd->bghid", attn, v)
        return self.merge(out.permute(0, 1, 3, 2, 4).reshape(B, G, P, D))


class TinyMaxViT(nn.Module):
    """A patch conv, its map cut into 2 x 2 windows ([B, windows, 4, C]: MaxViT's block
    attention), a pre-norm residual attention and MLP, a head; swapped as
    `ticketsmith.models.build` does (GridAttention)."""

    def __init__(self, classes=10, dim=16):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.norm = nn.LayerNorm(dim)
        self.attn = RelativePositionalMultiHeadAttention(dim, 4, 4)
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(),
                                 nn.Linear(4 * dim, dim))
        self.head = nn.Linear(dim, classes)
        from ticketsmith.models import prunable_attention
        prunable_attention(self)

    def forward(self, x):
        x = self.patch(x)
        B, C, H, W = x.shape
        w = x.view(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 3, 5, 1).reshape(B, -1, 4, C)
        w = w + self.attn(self.norm(w))
        w = w + self.mlp(w)
        return self.head(w.mean((1, 2)))


# -- timm's XCiT: cross-covariance attention (heads attend over their channels) --------------
class XCA(nn.Module):
    """timm's XCiT XCA (its class name, attributes and forward): per head, the tokens' L2-
    normalised q and k give a channel-by-channel map scaled by the head's temperature, the
    heads' output reshaped to the input width C."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.temperature = nn.Parameter(0.5 + torch.rand(num_heads, 1, 1))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 4, 1)
        q, k, v = qkv.unbind(0)
        attn = (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)) * self.temperature
        x = (self.attn_drop(attn.softmax(dim=-1)) @ v).permute(0, 3, 1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class TinyTokens(nn.Module):
    """Patches as tokens, one pre-norm residual attention (`make_attn(dim)`) and MLP, a mean
    over tokens."""

    def __init__(self, make_attn, classes=10, dim=16):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = make_attn(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return self.head(x.mean(1))


class TinyXCiT(TinyTokens):
    """TinyTokens with XCiT's XCA, swapped as `ticketsmith.models.build` does (XcaAttention)."""

    def __init__(self, classes=10, dim=16):
        super().__init__(lambda d: XCA(d, 4), classes, dim)
        from ticketsmith.models import prunable_attention
        prunable_attention(self)


# -- timm's MaxViT / CoAtNet: attention on channels-last windows or NCHW maps, bias modules ----
class RelPosBias(nn.Module):
    """timm's RelPosBias (its class name, attributes and get_bias): a Swin bias table of one
    column per head, shaped by the `bias_shape` it was built with."""

    def __init__(self, window_size, num_heads):
        super().__init__()
        self.window_size = window_size
        self.window_area = window_size[0] * window_size[1]
        self.bias_shape = (self.window_area,) * 2 + (num_heads,)
        n = (2 * window_size[0] - 1) * (2 * window_size[1] - 1)
        self.relative_position_bias_table = nn.Parameter(torch.randn(n, num_heads))
        self.register_buffer("relative_position_index",
                             window_relative_position_index(*window_size).reshape(-1), persistent=False)

    def get_bias(self):
        bias = self.relative_position_bias_table[self.relative_position_index]
        return bias.view(self.bias_shape).permute(2, 0, 1).unsqueeze(0).contiguous()

    def forward(self, attn, shared_rel_pos=None):
        return attn + self.get_bias()


def one_hot_lookup(length):
    """timm's generate_lookup_tensor: [i, x, x - i + length - 1] = 1."""
    ret = torch.zeros(length, length, 2 * length - 1)
    for i in range(length):
        for x in range(length):
            ret[i, x, x - i + length - 1] = 1
    return ret


class RelPosBiasTf(nn.Module):
    """timm's RelPosBiasTf (its class name, attributes and get_bias): a [num_heads, 2h-1, 2w-1]
    table read through one-hot height and width lookups."""

    def __init__(self, window_size, num_heads):
        super().__init__()
        self.window_size, self.num_heads = window_size, num_heads
        self.window_area = window_size[0] * window_size[1]
        self.bias_shape = (num_heads, 2 * window_size[0] - 1, 2 * window_size[1] - 1)
        self.relative_position_bias_table = nn.Parameter(torch.randn(self.bias_shape))
        self.register_buffer("height_lookup", one_hot_lookup(window_size[0]), persistent=False)
        self.register_buffer("width_lookup", one_hot_lookup(window_size[1]), persistent=False)

    def get_bias(self):
        t = torch.einsum("nhw,ixh->nixw", self.relative_position_bias_table, self.height_lookup)
        t = torch.einsum("nixw,jyw->nijxy", t, self.width_lookup)
        return t.reshape(t.shape[0], self.window_area, self.window_area)

    def forward(self, attn, shared_rel_pos=None):
        return attn + self.get_bias()


class RelPosMlpInner(nn.Module):
    """timm's Mlp as RelPosMlp builds it: fc1, ReLU, dropout, fc2 (one output per head)."""

    def __init__(self, hidden, heads, bias2=True):
        super().__init__()
        self.fc1, self.act, self.drop1 = nn.Linear(2, hidden), nn.ReLU(), nn.Dropout(0.125)
        self.fc2 = nn.Linear(hidden, heads, bias=bias2)

    def forward(self, x):
        return self.fc2(self.drop1(self.act(self.fc1(x))))


class RelPosMlp(nn.Module):
    """timm's RelPosMlp (its class name, attributes and get_bias): an MLP from the log
    relative coordinates to one bias per head ('swin' mode: a sigmoid, a gain of 16 and no
    bias in the last Linear), indexed and shaped by `num_heads` and `bias_shape`."""

    def __init__(self, window_size, num_heads, mode="cr"):
        super().__init__()
        self.window_size, self.num_heads = window_size, num_heads
        self.window_area = window_size[0] * window_size[1]
        self.bias_shape = (self.window_area,) * 2 + (num_heads,)
        self.bias_act = nn.Sigmoid() if mode == "swin" else nn.Identity()
        self.bias_gain = 16 if mode == "swin" else None
        self.mlp = RelPosMlpInner(8, num_heads, bias2=mode != "swin")
        self.register_buffer("relative_position_index",
                             window_relative_position_index(*window_size).reshape(-1), persistent=False)
        h, w = window_size
        grid = torch.stack(torch.meshgrid(torch.arange(-(h - 1), h).float(),
                                          torch.arange(-(w - 1), w).float(), indexing="ij"), -1)
        self.register_buffer("rel_coords_log", torch.sign(grid) * torch.log(1 + grid.abs()),
                             persistent=False)

    def get_bias(self):
        bias = self.mlp(self.rel_coords_log).view(-1, self.num_heads)[self.relative_position_index]
        bias = self.bias_act(bias.view(self.bias_shape).permute(2, 0, 1))
        if self.bias_gain is not None:
            bias = self.bias_gain * bias
        return bias.unsqueeze(0)

    def forward(self, attn, shared_rel_pos=None):
        return attn + self.get_bias()


class AttentionCl(nn.Module):
    """timm's MaxViT AttentionCl (its class name, attributes and fused forward): channels-last
    tokens [B, ..., C], qkv laid out head by head where `head_first` ("rw" models) or q, k, v
    ("tf" models), the bias module's bias as the attention mask."""

    def __init__(self, dim, dim_head=4, head_first=True, rel_pos=None):
        super().__init__()
        self.num_heads, self.dim_head, self.head_first = dim // dim_head, dim_head, head_first
        self.scale = dim_head ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.rel_pos = rel_pos(num_heads=self.num_heads) if rel_pos else None
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x, shared_rel_pos=None):
        B = x.shape[0]
        restore_shape = x.shape[:-1]
        if self.head_first:
            q, k, v = self.qkv(x).view(B, -1, self.num_heads, self.dim_head * 3).transpose(1, 2).chunk(3, dim=3)
        else:
            q, k, v = self.qkv(x).reshape(B, -1, 3, self.num_heads, self.dim_head).transpose(1, 3).unbind(2)
        bias = self.rel_pos.get_bias() if self.rel_pos is not None else shared_rel_pos
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        x = x.transpose(1, 2).reshape(restore_shape + (-1,))
        return self.proj_drop(self.proj(x))


class Attention2d(nn.Module):
    """timm's CoAtNet Attention2d (its class name, attributes and fused forward): NCHW maps,
    1x1 conv qkv and projection, heads first in the channels where `head_first`."""

    def __init__(self, dim, dim_head=4, head_first=True, rel_pos=None):
        super().__init__()
        self.num_heads, self.dim_head, self.head_first = dim // dim_head, dim_head, head_first
        self.scale = dim_head ** -0.5
        self.qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.rel_pos = rel_pos(num_heads=self.num_heads) if rel_pos else None
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Conv2d(dim, dim, 1)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x, shared_rel_pos=None):
        B, C, H, W = x.shape
        if self.head_first:
            q, k, v = self.qkv(x).view(B, self.num_heads, self.dim_head * 3, -1).chunk(3, dim=2)
        else:
            q, k, v = self.qkv(x).reshape(B, 3, self.num_heads, self.dim_head, -1).unbind(1)
        bias = self.rel_pos.get_bias() if self.rel_pos is not None else shared_rel_pos
        x = F.scaled_dot_product_attention(
            q.transpose(-1, -2).contiguous(), k.transpose(-1, -2).contiguous(),
            v.transpose(-1, -2).contiguous(), attn_mask=bias).transpose(-1, -2).reshape(B, -1, H, W)
        return self.proj_drop(self.proj(x))


class TinyMaxxViT(nn.Module):
    """A patch conv, a CoAtNet-style pre-norm residual Attention2d on the whole 4 x 4 map (NCHW,
    a 1x1-conv MLP), then MaxViT-style AttentionCl on its 2 x 2 windows (channels-last), a
    head; swapped as `ticketsmith.models.build` does (MaxxVitAttention). `bias`: the bias module
    class of both ("tf": RelPosBiasTf with the q, k, v layout; "mlp": RelPosMlp; else
    RelPosBias), heads first unless "tf"."""

    def __init__(self, classes=10, dim=16, bias="table"):
        super().__init__()
        from functools import partial
        cls = {"tf": RelPosBiasTf, "mlp": RelPosMlp, "mlp_swin": partial(RelPosMlp, mode="swin")}.get(bias, RelPosBias)
        head_first = bias != "tf"
        self.patch = nn.Conv2d(3, dim, 8, stride=8)
        self.norm1 = nn.BatchNorm2d(dim)
        self.attn2d = Attention2d(dim, head_first=head_first, rel_pos=partial(cls, (4, 4)))
        self.mlp2d = nn.Sequential(nn.Conv2d(dim, 2 * dim, 1), nn.GELU(), nn.Conv2d(2 * dim, dim, 1))
        self.norm2 = nn.LayerNorm(dim)
        self.attn = AttentionCl(dim, head_first=head_first, rel_pos=partial(cls, (2, 2)))
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(),
                                 nn.Linear(4 * dim, dim))
        self.head = nn.Linear(dim, classes)
        from ticketsmith.models import prunable_attention
        prunable_attention(self)

    def forward(self, x):
        x = self.patch(x)  # 32 px: a 4 x 4 map
        x = x + self.attn2d(self.norm1(x))
        x = x + self.mlp2d(x)
        B, C, H, W = x.shape
        w = x.view(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 3, 5, 1).reshape(B * H * W // 4, 2, 2, C)
        w = w + self.attn(self.norm2(w))
        w = w + self.mlp(w)
        return self.head(w.reshape(B, -1, C).mean(1))


# -- attention as users write it: q, k, v and the output in four Linears -----------------------
class SeparateQKVAttention(nn.Module):
    """q_proj, k_proj, v_proj and o_proj (LLaMA-style names), heads reshaped by num_heads and
    head_dim, the heads' output reshaped with -1 (or, `input_width=True`, to the input width
    C, so that a module with fewer heads cannot run)."""

    def __init__(self, dim, num_heads, input_width=False):
        super().__init__()
        self.num_heads, self.head_dim, self.input_width = num_heads, dim // num_heads, input_width
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, dim) for _ in range(3))
        self.o_proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = (p(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
        return self.o_proj(out.reshape(B, N, C) if self.input_width else out.reshape(B, N, -1))


class TinySeparateQKV(TinyTokens):
    """TinyTokens with a SeparateQKVAttention."""

    def __init__(self, classes=10, dim=16, input_width=False):
        super().__init__(lambda d: SeparateQKVAttention(d, 4, input_width), classes, dim)


# -- timm's CaiT / XCiT class attention: the class token's query over all tokens ---------------
class ClassAttn(nn.Module):
    """timm's ClassAttn (its class name, attributes and fused forward): q from token 0, k and v
    from all tokens, three Linears, the heads' output reshaped to the input width C."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q, self.k, self.v = (nn.Linear(dim, dim) for _ in range(3))
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x):
        B, N, C = x.shape
        q = self.q(x[:, 0]).unsqueeze(1).reshape(B, 1, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)
        k = self.k(x).reshape(B, N, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)
        v = self.v(x).reshape(B, N, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)
        x_cls = F.scaled_dot_product_attention(q, k, v)
        return self.proj_drop(self.proj(x_cls.transpose(1, 2).reshape(B, 1, C)))


class CrossAttention(nn.Module):
    """timm's CrossViT CrossAttention (its class name, attributes and forward): ClassAttn's
    function, its Linears named wq, wk, wv (no bias), the attention written out."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.wq, self.wk, self.wv = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x):
        B, N, C = x.shape
        q = self.wq(x[:, 0:1, ...]).reshape(B, 1, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)
        k = self.wk(x).reshape(B, N, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)
        v = self.wv(x).reshape(B, N, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)
        attn = self.attn_drop(((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1))
        return self.proj_drop(self.proj((attn @ v).transpose(1, 2).reshape(B, 1, C)))


class TinyCaiT(nn.Module):
    """Patches and a class token, one residual class-attention step updating the class token
    (CaiT's / XCiT's last blocks; with `cross`, CrossViT's cross attention), a head on it;
    swapped as `ticketsmith.models.build` does (ClassAttention)."""

    def __init__(self, classes=10, dim=16, cross=False):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.norm = nn.LayerNorm(dim)
        self.attn = (CrossAttention if cross else ClassAttn)(dim, 4)
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(),
                                 nn.Linear(4 * dim, dim))
        self.head = nn.Linear(dim, classes)
        from ticketsmith.models import prunable_attention
        prunable_attention(self)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        u = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        cls = u[:, :1] + self.attn(self.norm(u))
        cls = cls + self.mlp(cls)
        return self.head(cls[:, 0])


# -- timm's TNT: q and k in one Linear, v in another ------------------------------------------
class TntAttention(nn.Module):
    """timm's TNT Attention (its attributes and forward; timm names it Attention): `qk` (2 x
    hidden) reshaped by num_heads and head_dim, `v` by num_heads and -1, the heads' output
    reshaped with -1."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.hidden_dim, self.num_heads = dim, num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qk = nn.Linear(dim, 2 * dim)
        self.v = nn.Linear(dim, dim)
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x):
        B, N, C = x.shape
        qk = self.qk(x).reshape(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = qk.unbind(0)
        v = self.v(x).reshape(B, N, self.num_heads, -1).permute(0, 2, 1, 3)
        attn = self.attn_drop(((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1))
        return self.proj_drop(self.proj((attn @ v).transpose(1, 2).reshape(B, N, -1)))


class TinyTNT(TinyTokens):
    """TinyTokens with TNT's attention."""

    def __init__(self, classes=10, dim=16):
        super().__init__(lambda d: TntAttention(d, 4), classes, dim)


class EfficientFormerAttention(nn.Module):
    """timm's EfficientFormer Attention (its attributes and forward; timm names it Attention;
    TinyViT's is the same with attn_ratio 1): per head, q and k `key_dim` wide and v `val_dim`,
    in one qkv Linear laid out head by head, a learned bias per head and relative offset of the
    tokens of a fixed resolution x resolution map, gathered once per device in eval mode."""

    def __init__(self, dim, key_dim=4, num_heads=4, attn_ratio=2, resolution=4):
        super().__init__()
        self.num_heads = num_heads
        self.scale = key_dim ** -0.5
        self.key_dim = key_dim
        self.key_attn_dim = key_dim * num_heads
        self.val_dim = int(attn_ratio * key_dim)
        self.val_attn_dim = self.val_dim * num_heads
        self.attn_ratio = attn_ratio
        self.qkv = nn.Linear(dim, self.key_attn_dim * 2 + self.val_attn_dim)
        self.proj = nn.Linear(self.val_attn_dim, dim)
        pos = torch.stack(torch.meshgrid(torch.arange(resolution), torch.arange(resolution),
                                         indexing="ij")).flatten(1)
        rel_pos = (pos[..., :, None] - pos[..., None, :]).abs()
        self.attention_biases = nn.Parameter(torch.randn(num_heads, resolution * resolution))
        self.register_buffer("attention_bias_idxs", rel_pos[0] * resolution + rel_pos[1])
        self.attention_bias_cache = {}

    @torch.no_grad()
    def train(self, mode=True):
        super().train(mode)
        if mode and self.attention_bias_cache:
            self.attention_bias_cache = {}
        return self

    def get_attention_biases(self, device):
        if torch.jit.is_tracing() or self.training:
            return self.attention_biases[:, self.attention_bias_idxs]
        key = str(device)
        if key not in self.attention_bias_cache:
            self.attention_bias_cache[key] = self.attention_biases[:, self.attention_bias_idxs]
        return self.attention_bias_cache[key]

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, self.num_heads, -1).permute(0, 2, 1, 3)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.val_dim], dim=3)
        attn = (q @ k.transpose(-2, -1)) * self.scale + self.get_attention_biases(x.device)
        x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N, self.val_attn_dim)
        return self.proj(x)


class TinyEfficientFormer(TinyTokens):
    """TinyTokens (16 x 16 images: a 4 x 4 map) with EfficientFormer's attention."""

    def __init__(self, classes=10, dim=16):
        super().__init__(lambda d: EfficientFormerAttention(d), classes, dim)


class LevitAttention(EfficientFormerAttention):
    """timm's LeViT Attention on tokens (its class name, attributes and forward): as
    EfficientFormer's, but `qkv` a LinearNorm (a Linear without bias, a BatchNorm1d over the
    tokens flattened) and `proj` an activation and a LinearNorm."""

    def __init__(self, dim, key_dim=4, num_heads=4, attn_ratio=2, resolution=4):
        super().__init__(dim, key_dim, num_heads, attn_ratio, resolution)
        self.use_conv = False
        self.qkv = LinearNorm(dim, self.key_attn_dim * 2 + self.val_attn_dim)
        self.proj = nn.Sequential(collections.OrderedDict(
            [("act", nn.Hardswish()), ("ln", LinearNorm(self.val_attn_dim, dim))]))

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, self.num_heads, -1).split(
            [self.key_dim, self.key_dim, self.val_dim], dim=3)
        q, k, v = q.permute(0, 2, 1, 3), k.permute(0, 2, 3, 1), v.permute(0, 2, 1, 3)
        attn = q @ k * self.scale + self.get_attention_biases(x.device)
        x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N, self.val_attn_dim)
        return self.proj(x)


LevitAttention.__name__ = LevitAttention.__qualname__ = "Attention"  # timm's class name


class Downsample(nn.Module):
    """timm's LeViT Downsample (its class name and forward): the tokens as their map, every
    `stride`-th row and column kept, as tokens again."""

    def __init__(self, stride, resolution):
        super().__init__()
        self.stride, self.resolution, self.pool = stride, (resolution, resolution), None

    def forward(self, x):
        B, N, C = x.shape
        x = x.view(B, self.resolution[0], self.resolution[1], C)[:, ::self.stride, ::self.stride]
        return x.reshape(B, -1, C)


class AttentionDownsample(nn.Module):
    """timm's LeViT AttentionDownsample on tokens (its class name, attributes and forward): q
    from the subsampled tokens (a LinearNorm of num_heads * key_dim), k and v from all tokens
    (one LinearNorm, head by head: key_dim, then val_dim), biases per head and offset, the
    output `out_dim` wide on the subsampled tokens."""

    def __init__(self, in_dim, out_dim, key_dim=4, num_heads=4, attn_ratio=2, stride=2, resolution=4):
        super().__init__()
        self.stride, self.resolution, self.use_conv = stride, (resolution, resolution), False
        self.num_heads, self.key_dim = num_heads, key_dim
        self.key_attn_dim = key_dim * num_heads
        self.val_dim = int(attn_ratio * key_dim)
        self.val_attn_dim = self.val_dim * num_heads
        self.scale = key_dim ** -0.5
        self.kv = LinearNorm(in_dim, self.val_attn_dim + self.key_attn_dim)
        self.q = nn.Sequential(collections.OrderedDict(
            [("down", Downsample(stride, resolution)), ("ln", LinearNorm(in_dim, self.key_attn_dim))]))
        self.proj = nn.Sequential(collections.OrderedDict(
            [("act", nn.Hardswish()), ("ln", LinearNorm(self.val_attn_dim, out_dim))]))
        k_pos = torch.stack(torch.meshgrid(torch.arange(resolution), torch.arange(resolution),
                                           indexing="ij")).flatten(1)
        q_pos = torch.stack(torch.meshgrid(torch.arange(0, resolution, stride),
                                           torch.arange(0, resolution, stride), indexing="ij")).flatten(1)
        rel_pos = (q_pos[..., :, None] - k_pos[..., None, :]).abs()
        self.attention_biases = nn.Parameter(torch.randn(num_heads, resolution * resolution))
        self.register_buffer("attention_bias_idxs", rel_pos[0] * resolution + rel_pos[1], persistent=False)
        self.attention_bias_cache = {}

    @torch.no_grad()
    def train(self, mode=True):
        super().train(mode)
        self.attention_bias_cache = {}
        return self

    get_attention_biases = EfficientFormerAttention.get_attention_biases

    def forward(self, x):
        B, N, C = x.shape
        k, v = self.kv(x).view(B, N, self.num_heads, -1).split([self.key_dim, self.val_dim], dim=3)
        k, v = k.permute(0, 2, 3, 1), v.permute(0, 2, 1, 3)
        q = self.q(x).view(B, -1, self.num_heads, self.key_dim).permute(0, 2, 1, 3)
        attn = (q @ k * self.scale + self.get_attention_biases(x.device)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, -1, self.val_attn_dim))


class TinyLevitDownsample(nn.Module):
    """Patches (16 x 16 images: a 4 x 4 map of tokens), LeViT's AttentionDownsample to a 2 x 2
    map of wider tokens, a residual MLP, a mean over them; swapped as `ticketsmith.models.build` does
    (LevitAttentionDownsample)."""

    def __init__(self, classes=10, dim=16):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.attn = AttentionDownsample(dim, 24)
        self.mlp = nn.Sequential(nn.Linear(24, 48), nn.GELU(), nn.Linear(48, 24))
        self.head = nn.Linear(24, classes)
        from ticketsmith.models import prunable_attention
        prunable_attention(self)

    def forward(self, x):
        x = self.attn(self.patch(x).flatten(2).transpose(1, 2))
        return self.head((x + self.mlp(x)).mean(1))


class TinyLevitAttention(TinyTokens):
    """TinyTokens (16 x 16 images: a 4 x 4 map) with LeViT's attention, swapped as
    `ticketsmith.models.build` does (LevitAttention)."""

    def __init__(self, classes=10, dim=16):
        super().__init__(lambda d: LevitAttention(d), classes, dim)
        from ticketsmith.models import prunable_attention
        prunable_attention(self)


class TinySwinWindows(TinySwin):
    """TinySwin with its ShiftedWindowAttention (V1, or V2 with kind="v2") swapped for
    ticketsmith's WindowAttention (what `ticketsmith.models.build` does to torchvision's Swin)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        from ticketsmith.models import prunable_attention
        prunable_attention(self)


class TinyViTQKV(TinyViT):
    """TinyViT with its nn.MultiheadAttention swapped for ticketsmith's QKVAttention (what
    `ticketsmith.models.build` does to a user's model): prunable in-projection and heads."""

    def __init__(self, **kw):
        super().__init__(**kw)
        from ticketsmith.models import prunable_attention
        assert not prunable_attention(self)


# -- timm ViT block: Attention reshaping a fused qkv Linear by num_heads / head_dim -------------
class TimmAttention(nn.Module):
    """timm's Attention (1.0): the qkv output reshaped to [B, N, 3, num_heads, head_dim],
    scaled dot-product attention, the heads concatenated to attn_dim and projected."""

    def __init__(self, dim, num_heads=4):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_dim = num_heads * self.head_dim
        self.qkv = nn.Linear(dim, 3 * self.attn_dim)
        self.proj = nn.Linear(self.attn_dim, dim)

    def forward(self, x, attn_mask=None):
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(x.transpose(1, 2).reshape(B, N, self.attn_dim))


class TimmBlock(nn.Module):
    def __init__(self, dim=32, heads=4, mlp=64, attn=TimmAttention):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = attn(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp)
        self.fc2 = nn.Linear(mlp, dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x), attn_mask=None)  # timm passes keyword arguments
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TimmViT(nn.Module):
    """Patch embedding, one timm block, mean over the tokens (any number of them)."""

    def __init__(self, classes=10, dim=32, patch=4, attn=TimmAttention):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, stride=patch)
        self.block = TimmBlock(dim, attn=attn)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        return self.head(self.norm(self.block(x)).mean(1))


class TimmViTTokens(TimmViT):
    """timm's VisionTransformer: a class token before the patch tokens and a learned position
    embedding (a value per token and channel) added to all of them, or (`embed_class=False`,
    DeiT-III) to the patch tokens before the class token joins; the class token read out, or
    (`pool="avg"`, EVA-02) the mean of the patch tokens, through a norm of its own."""

    def __init__(self, classes=10, dim=32, patch=4, image=16, embed_class=True, pool="token"):
        super().__init__(classes, dim, patch)
        self.embed_class, self.pool = embed_class, pool
        if pool == "avg":
            self.fc_norm = nn.LayerNorm(dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, (image // patch) ** 2 + embed_class, dim))

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        if self.embed_class:
            x = torch.cat([cls, x], dim=1) + self.pos_embed
        else:
            x = torch.cat([cls, x + self.pos_embed], dim=1)
        if self.pool == "avg":
            return self.head(self.fc_norm(self.block(x)[:, 1:].mean(1)))
        return self.head(self.norm(self.block(x))[:, 0])


class TorchvisionViT(nn.Module):
    """torchvision's VisionTransformer in small: the patches reshaped to `self.hidden_dim`
    channels (an attribute the cut must lower), a class token, a position embedding added to
    all tokens, nn.MultiheadAttention blocks (swapped as `ticketsmith.models.build` does), a
    final LayerNorm and the class token read out."""

    def __init__(self, classes=10, hidden_dim=32, patch=4, image=16):
        super().__init__()
        self.hidden_dim, self.patch_size = hidden_dim, patch
        self.conv_proj = nn.Conv2d(3, hidden_dim, patch, stride=patch)
        self.class_token = nn.Parameter(torch.randn(1, 1, hidden_dim))
        self.pos_embedding = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, hidden_dim))
        self.block = ViTBlock(hidden_dim)
        self.ln = nn.LayerNorm(hidden_dim)
        self.head = nn.Linear(hidden_dim, classes)
        from ticketsmith.models import prunable_attention
        prunable_attention(self)

    def forward(self, x):
        n = x.shape[0]
        x = self.conv_proj(x).reshape(n, self.hidden_dim, -1).permute(0, 2, 1)
        x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1)
        return self.head(self.ln(self.block(x + self.pos_embedding))[:, 0])


# -- MLP-Mixer: token mixing (Linear over the transposed token axis), channel mixing -------------
class MixerBlock(nn.Module):
    def __init__(self, tokens, dim, tok_hidden=32, ch_hidden=64):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.tok1 = nn.Linear(tokens, tok_hidden)
        self.tok2 = nn.Linear(tok_hidden, tokens)
        self.norm2 = nn.LayerNorm(dim)
        self.ch1 = nn.Linear(dim, ch_hidden)
        self.ch2 = nn.Linear(ch_hidden, dim)

    def forward(self, x):
        y = self.norm1(x).transpose(1, 2)
        x = x + self.tok2(F.gelu(self.tok1(y))).transpose(1, 2)
        return x + self.ch2(F.gelu(self.ch1(self.norm2(x))))


class TinyMixer(nn.Module):
    def __init__(self, classes=10, dim=32, size=16, patch=4):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, patch, stride=patch)
        self.block = MixerBlock((size // patch) ** 2, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.stem(x).flatten(2).transpose(1, 2)
        return self.head(self.norm(self.block(x)).mean(1))


# -- ConvNeXt: depthwise 7x7, permute to channels-last, LayerNorm, Linear MLP, layer scale --------
class ConvNeXtBlock(nn.Module):
    def __init__(self, dim=16):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))

    def forward(self, x):
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        y = self.gamma * self.pwconv2(F.gelu(self.pwconv1(y)))
        return x + y.permute(0, 3, 1, 2)


class TinyConvNeXt(nn.Module):
    def __init__(self, classes=10, dim=16):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 2, stride=2)
        self.block = ConvNeXtBlock(dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.block(self.stem(x))
        return self.head(self.norm(x.mean([2, 3])))


# -- ConvNeXt with conv_mlp (timm's convnext_atto ... nano): LayerNorm2d on NCHW maps ---------
class LayerNorm2d(nn.LayerNorm):
    """timm's LayerNorm2d (its class name and forward): LayerNorm over the channels of an NCHW
    map, through NHWC."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtConvBlock(nn.Module):
    """Depthwise 7x7, LayerNorm2d, 1x1-conv MLP, layer scale `gamma.reshape(1, -1, 1, 1)`."""

    def __init__(self, dim=16):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = LayerNorm2d(dim, eps=1e-6)
        self.fc1, self.fc2 = nn.Conv2d(dim, 3 * dim, 1), nn.Conv2d(3 * dim, dim, 1)
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))

    def forward(self, x):
        y = self.fc2(F.gelu(self.fc1(self.norm(self.conv_dw(x)))))
        return x + y.mul(self.gamma.reshape(1, -1, 1, 1))


class TinyConvNeXtConv(nn.Module):
    def __init__(self, classes=10, dim=16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dim, 2, stride=2), LayerNorm2d(dim, eps=1e-6))
        self.blocks = nn.Sequential(ConvNeXtConvBlock(dim), ConvNeXtConvBlock(dim))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)
        with torch.no_grad():  # trained values
            for m in self.modules():
                if isinstance(m, nn.LayerNorm):
                    m.weight.copy_(torch.rand(m.weight.shape) + 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape) * 0.1)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.head(self.norm(x.mean([2, 3])))


# -- ConvNeXt-V2: ConvNeXt's block with Global Response Normalization in its MLP ---------------
class GlobalResponseNorm(nn.Module):
    """timm's GlobalResponseNorm (its class name, attributes and forward): each channel scaled
    by its spatial L2 norm over the mean of those norms across the channels."""

    def __init__(self, dim, eps=1e-6, channels_last=True):
        super().__init__()
        self.eps = eps
        self.spatial_dim, self.channel_dim = ((1, 2), -1) if channels_last else ((2, 3), 1)
        self.wb_shape = (1, 1, 1, -1) if channels_last else (1, -1, 1, 1)
        self.weight = nn.Parameter(torch.zeros(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        x_g = x.norm(p=2, dim=self.spatial_dim, keepdim=True)
        x_n = x_g / (x_g.mean(dim=self.channel_dim, keepdim=True) + self.eps)
        return x + torch.addcmul(self.bias.view(self.wb_shape), self.weight.view(self.wb_shape),
                                 x * x_n)


class ConvNeXtV2Block(nn.Module):
    """Depthwise 7x7, LayerNorm, then the MLP with a GRN: channels-last Linears, or (`conv`)
    1x1 convs on NCHW with BatchNorm for the norm (timm's conv_mlp form). `fc1` without a bias
    (timm's has one): a row the mask empties is then dead, not a constant that GRN scales by
    the input (`test_families` shows that such a unit stays)."""

    def __init__(self, dim=16, conv=False, fc1_bias=False):
        super().__init__()
        self.conv = conv
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        if conv:
            self.norm = nn.BatchNorm2d(dim)
            self.fc1 = nn.Conv2d(dim, 4 * dim, 1, bias=fc1_bias)
            self.fc2 = nn.Conv2d(4 * dim, dim, 1)
        else:
            self.norm = nn.LayerNorm(dim, eps=1e-6)
            self.fc1, self.fc2 = nn.Linear(dim, 4 * dim, bias=fc1_bias), nn.Linear(4 * dim, dim)
        self.grn = GlobalResponseNorm(4 * dim, channels_last=not conv)
        with torch.no_grad():  # trained values (timm initialises them to zero)
            self.grn.weight.copy_(torch.rand(4 * dim) + 0.5)
            self.grn.bias.copy_(torch.randn(4 * dim) * 0.1)

    def forward(self, x):
        y = self.dwconv(x)
        if self.conv:
            return x + self.fc2(self.grn(F.gelu(self.fc1(self.norm(y)))))
        y = self.fc2(self.grn(F.gelu(self.fc1(self.norm(y.permute(0, 2, 3, 1))))))
        return x + y.permute(0, 3, 1, 2)


class TinyConvNeXtV2(nn.Module):
    """Two blocks and a head; its GRNs swapped by prunable_mlp (as models.build does)."""

    def __init__(self, classes=10, dim=16, conv=False, fc1_bias=False):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 2, stride=2)
        self.blocks = nn.Sequential(ConvNeXtV2Block(dim, conv, fc1_bias),
                                    ConvNeXtV2Block(dim, conv, fc1_bias))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)
        from ticketsmith.models import prunable_mlp
        prunable_mlp(self)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.head(self.norm(x.mean([2, 3])))


# -- BiT (ResNet-V2): pre-activation bottlenecks, GroupNorm before every weight-standardised conv -
class BiTBlock(nn.Module):
    def __init__(self, c, mid):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(4, c), StdConv2d(c, mid, 1)
        self.norm2, self.conv2 = nn.GroupNorm(4, mid), StdConv2d(mid, mid, 3, padding=1)
        self.norm3, self.conv3 = nn.GroupNorm(4, mid), StdConv2d(mid, c, 1)

    def forward(self, x):
        y = self.conv1(F.relu(self.norm1(x)))
        y = self.conv2(F.relu(self.norm2(y)))
        return x + self.conv3(F.relu(self.norm3(y)))


class TinyBiT(nn.Module):
    def __init__(self, classes=10, dim=16):
        super().__init__()
        self.stem = StdConv2d(3, dim, 3, stride=2, padding=1)
        self.blocks = nn.Sequential(BiTBlock(dim, 8), BiTBlock(dim, 12))
        self.norm = nn.GroupNorm(4, dim)
        self.head = nn.Linear(dim, classes)
        with torch.no_grad():  # trained affine values
            for m in self.modules():
                if isinstance(m, nn.GroupNorm):
                    m.weight.copy_(torch.rand(m.num_channels) + 0.5)
                    m.bias.copy_(torch.randn(m.num_channels) * 0.1)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.head(F.relu(self.norm(x)).mean([2, 3]))


# -- PoolFormer (timm's MetaFormer): GroupNorm1 stream, layer scale outside any torch layer --
class GroupNorm1(nn.GroupNorm):
    """timm's GroupNorm1 (its class name and forward): a GroupNorm of one group."""

    def __init__(self, num_channels, **kwargs):
        super().__init__(1, num_channels, **kwargs)

    def forward(self, x):
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class Scale(nn.Module):
    """timm's MetaFormer Scale (its class name, attributes and forward): a per-channel layer
    scale, a parameter of no torch layer (torch-pruning's "unwrapped parameter"), viewed to
    (C, 1, 1) on NCHW or used as (C,) on NHWC."""

    def __init__(self, dim, init_value=1.0, use_nchw=True):
        super().__init__()
        self.shape = (dim, 1, 1) if use_nchw else (dim,)
        self.scale = nn.Parameter(init_value * torch.ones(dim))

    def forward(self, x):
        return x * self.scale.view(self.shape)


class PoolFormerBlock(nn.Module):
    """norm, token mixer pool(x) - x, layer scale, residual; norm, 1x1-conv MLP, layer scale,
    residual. With `shift`, the second residual also adds a per-channel parameter (a learned
    bias outside any layer: a dead channel holds it, not zero)."""

    def __init__(self, dim, shift=False):
        super().__init__()
        self.norm1, self.norm2 = GroupNorm1(dim), GroupNorm1(dim)
        self.pool = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
        self.layer_scale1, self.layer_scale2 = Scale(dim), Scale(dim)
        self.fc1, self.fc2 = nn.Conv2d(dim, 2 * dim, 1), nn.Conv2d(2 * dim, dim, 1)
        self.shift = nn.Parameter(torch.zeros(1, dim, 1, 1)) if shift else None

    def forward(self, x):
        y = self.norm1(x)
        x = x + self.layer_scale1(self.pool(y) - y)
        x = x + self.layer_scale2(self.fc2(F.gelu(self.fc1(self.norm2(x)))))
        return x + self.shift if self.shift is not None else x


class TinyPoolFormer(nn.Module):
    def __init__(self, classes=10, dim=16, shift=False):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 3, stride=2, padding=1)
        self.blocks = nn.Sequential(PoolFormerBlock(dim, shift), PoolFormerBlock(dim, shift))
        self.norm = GroupNorm1(dim)
        self.head = nn.Linear(dim, classes)
        with torch.no_grad():  # trained values
            for m in self.modules():
                if isinstance(m, nn.GroupNorm):
                    m.weight.copy_(torch.rand(m.num_channels) + 0.5)
                    m.bias.copy_(torch.randn(m.num_channels) * 0.1)
                if isinstance(m, Scale):
                    m.scale.copy_(torch.rand(m.scale.shape) + 0.1)
                if isinstance(m, PoolFormerBlock) and m.shift is not None:
                    m.shift.copy_(torch.randn(m.shift.shape) * 0.1)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.head(self.norm(x).mean([2, 3]))


# -- weight_norm parametrized convs (audio / GAN style), Conv1d, SE with AdaptiveAvgPool1d --------
class WeightNormNet(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        wn = nn.utils.parametrizations.weight_norm
        self.conv1 = wn(nn.Conv1d(4, 16, 3, padding=1))
        self.conv2 = nn.Conv1d(16, 32, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.se1 = nn.Conv1d(32, 8, 1)
        self.se2 = nn.Conv1d(8, 32, 1)
        self.conv3 = wn(nn.Conv1d(32, 32, 3, padding=1))
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        x = F.leaky_relu(self.conv1(x), 0.1)
        x = F.relu(self.conv2(x))
        s = torch.sigmoid(self.se2(F.relu(self.se1(self.pool(x)))))
        x = F.relu(self.conv3(x * s.expand_as(x)))
        return self.fc(self.pool(x).flatten(1))


# -- a 1-d conv net (audio / time series): 1-d pooling runs as unsqueeze -> 2-d pooling ->
# squeeze; SE by broadcasting; a flatten of [N, C, L] into the head --------------------------
class AudioNet(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.conv1 = nn.Conv1d(2, 16, 5, stride=2)
        self.bn1 = nn.BatchNorm1d(16)
        self.pool = nn.MaxPool1d(2)
        self.conv2 = nn.Conv1d(16, 24, 2)  # (lengths 64 and 81 reach the head as 12 and 16:
        # ONNX exports an adaptive pooling only to a factor of its input length)
        self.bn2 = nn.BatchNorm1d(24)
        self.squeeze = nn.AdaptiveAvgPool1d(1)
        self.se1 = nn.Conv1d(24, 6, 1)
        self.se2 = nn.Conv1d(6, 24, 1)
        self.conv3 = nn.Conv1d(24, 16, 3)
        self.bn3 = nn.BatchNorm1d(16)
        self.head_pool = nn.AdaptiveMaxPool1d(4)
        self.fc = nn.Linear(16 * 4, classes)

    def forward(self, x):
        x = self.pool(F.relu(self.bn1(self.conv1(x))))
        x = F.relu(self.bn2(self.conv2(x)))
        x = x * torch.sigmoid(self.se2(F.relu(self.se1(self.squeeze(x)))))
        x = F.relu(self.bn3(self.conv3(x)))
        return self.fc(self.head_pool(x).flatten(1))


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine (as a trained model has), eval mode."""
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def builder(cls, seed: int = 0, **kw):
    """A callable returning the same randomised model every call (the `build=` for load)."""
    def build():
        torch.manual_seed(seed)
        return _randomize(cls(**kw), seed)
    build.__name__ = f"build_{cls.__name__}"
    return build


FAMILIES = {
    # name: (build, example input shape, other input shapes)
    "mobilenet_v2_se": (builder(MobileNetV2ish), (2, 3, 16, 16), [(3, 3, 16, 16), (1, 3, 24, 24)]),
    "efficientnet_tf": (builder(EfficientNetish), (2, 3, 16, 16), [(3, 3, 16, 16), (1, 3, 19, 19)]),
    "resnext": (builder(TinyResNeXt), (2, 3, 16, 16), [(3, 3, 16, 16), (1, 3, 20, 20)]),
    "regnet_y": (builder(TinyResNeXt, se=True), (2, 3, 16, 16), [(3, 3, 16, 16), (1, 3, 20, 20)]),
    "ghostnet": (builder(TinyGhostNet), (2, 3, 16, 16), [(3, 3, 16, 16), (1, 3, 24, 24)]),
    "dpn": (builder(TinyDPN), (2, 3, 16, 16), [(3, 3, 16, 16), (1, 3, 24, 24)]),
    "mixnet": (builder(TinyMixNet), (2, 3, 16, 16), [(3, 3, 16, 16), (1, 3, 20, 20)]),
    "convformer": (builder(TinyConvFormer), (2, 3, 16, 16), [(3, 3, 16, 16), (1, 3, 20, 24)]),
    "shufflenet_v2": (builder(ShuffleNetish), (2, 3, 16, 16), [(3, 3, 16, 16), (1, 3, 24, 24)]),
    "swin": (builder(TinySwin), (2, 3, 32, 32), [(3, 3, 32, 32), (1, 3, 40, 40)]),
    "swin_windows": (builder(TinySwinWindows), (2, 3, 32, 32), [(3, 3, 32, 32), (1, 3, 40, 40)]),
    "swin_v2_windows": (builder(TinySwinWindows, kind="v2"), (2, 3, 32, 32),
                        [(3, 3, 32, 32), (1, 3, 40, 40)]),
    "swin_timm": (builder(TinySwin, kind="timm"), (2, 3, 32, 32), [(3, 3, 32, 32), (1, 3, 40, 40)]),
    "swin_v2_timm": (builder(TinySwinWindows, kind="timm_v2"), (2, 3, 32, 32),
                     [(3, 3, 32, 32), (1, 3, 40, 40)]),
    "beit": (builder(TinyBeit), (2, 3, 32, 32), [(3, 3, 32, 32), (1, 3, 32, 32)]),
    "beit_shared_bias": (builder(TinyBeit, shared=True), (2, 3, 32, 32), [(3, 3, 32, 32)]),
    "eva": (builder(TinyEva), (2, 3, 32, 32), [(3, 3, 32, 32), (1, 3, 32, 32)]),
    "eva_scale_norm": (builder(TinyEva, scale_norm=True, half=True), (2, 3, 32, 32), [(3, 3, 32, 32)]),
    "eva_glu": (builder(TinyEva, glu=True), (2, 3, 32, 32), [(3, 3, 32, 32)]),
    "glu_conv": (builder(ConvGlu), (2, 3, 8, 8), [(3, 3, 8, 8), (1, 3, 11, 11)]),
    "unet": (builder(TinyUNet), (2, 3, 8, 8), [(3, 3, 8, 8), (1, 3, 16, 16)]),
    "pvt_mix_ffn": (builder(TinyPVT), (2, 3, 16, 16), [(3, 3, 16, 16), (1, 3, 20, 20)]),
    "pvt_attention": (builder(TinyPVT, attn="sr"), (2, 3, 32, 32), [(3, 3, 32, 32), (1, 3, 40, 40)]),
    "pvt_linear_attention": (builder(TinyPVT, attn="linear"), (2, 3, 32, 32), [(3, 3, 32, 32)]),
    "maxvit_attention": (builder(TinyMaxViT), (2, 3, 32, 32), [(3, 3, 32, 32), (1, 3, 48, 48)]),
    "xcit": (builder(TinyXCiT), (2, 3, 32, 32), [(3, 3, 32, 32), (1, 3, 40, 40)]),
    "maxxvit": (builder(TinyMaxxViT), (2, 3, 32, 32), [(3, 3, 32, 32), (1, 3, 32, 32)]),
    "separate_qkv": (builder(TinySeparateQKV), (2, 3, 16, 16), [(3, 3, 16, 16), (1, 3, 24, 24)]),
    "class_attn": (builder(TinyCaiT), (2, 3, 16, 16), [(3, 3, 16, 16), (1, 3, 24, 24)]),
    "tnt_attention": (builder(TinyTNT), (2, 3, 16, 16), [(3, 3, 16, 16), (1, 3, 24, 24)]),
    "efficientformer_attention": (builder(TinyEfficientFormer), (2, 3, 16, 16), [(3, 3, 16, 16)]),
    "cross_attention": (builder(TinyCaiT, cross=True), (2, 3, 16, 16), [(3, 3, 16, 16), (1, 3, 24, 24)]),
    "levit_attention": (builder(TinyLevitAttention), (2, 3, 16, 16), [(3, 3, 16, 16)]),
    "levit_downsample": (builder(TinyLevitDownsample), (2, 3, 16, 16), [(3, 3, 16, 16)]),
    "maxxvit_tf": (builder(TinyMaxxViT, bias="tf"), (2, 3, 32, 32), [(3, 3, 32, 32)]),
    "twins_local": (builder(TinyTwins), (2, 3, 32, 32), [(3, 3, 32, 32), (1, 3, 44, 36)]),
    "vit_mha": (builder(TinyViT), (2, 3, 16, 16), [(3, 3, 16, 16), (1, 3, 24, 24)]),
    "vit_qkv": (builder(TinyViTQKV), (2, 3, 16, 16), [(3, 3, 16, 16), (1, 3, 24, 24)]),
    "vit_timm": (builder(TimmViT), (2, 3, 16, 16), [(3, 3, 16, 16), (1, 3, 24, 24)]),
    "vit_timm_tokens": (builder(TimmViTTokens), (2, 3, 16, 16), [(3, 3, 16, 16), (1, 3, 16, 16)]),
    "vit_timm_no_embed_class": (builder(TimmViTTokens, embed_class=False), (2, 3, 16, 16),
                                [(3, 3, 16, 16)]),
    "vit_timm_avg": (builder(TimmViTTokens, pool="avg"), (2, 3, 16, 16), [(3, 3, 16, 16)]),
    "vit_torchvision": (builder(TorchvisionViT), (2, 3, 16, 16), [(3, 3, 16, 16), (1, 3, 16, 16)]),
    "mlp_mixer": (builder(TinyMixer), (2, 3, 16, 16), [(3, 3, 16, 16), (1, 3, 16, 16)]),
    "convnext": (builder(TinyConvNeXt), (2, 3, 16, 16), [(3, 3, 16, 16), (1, 3, 20, 20)]),
    "convnext_v2": (builder(TinyConvNeXtV2), (2, 3, 16, 16), [(3, 3, 16, 16), (1, 3, 20, 20)]),
    "convnext_v2_conv": (builder(TinyConvNeXtV2, conv=True), (2, 3, 16, 16),
                         [(3, 3, 16, 16), (1, 3, 20, 20)]),
    "weight_norm_1d": (builder(WeightNormNet), (2, 4, 16), [(3, 4, 16), (1, 4, 23)]),
    "audio_1d": (builder(AudioNet), (2, 2, 64), [(3, 2, 64), (1, 2, 81)]),
    "bit": (builder(TinyBiT), (2, 3, 16, 16), [(3, 3, 16, 16), (1, 3, 20, 20)]),
    "poolformer": (builder(TinyPoolFormer), (2, 3, 16, 16), [(3, 3, 16, 16), (1, 3, 20, 20)]),
    "convnext_conv": (builder(TinyConvNeXtConv), (2, 3, 16, 16), [(3, 3, 16, 16), (1, 3, 20, 20)]),
}
