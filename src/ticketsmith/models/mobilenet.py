"""MobileNet-v1 (Howard et al. 2017), CIFAR variant: stride-1 stem, depthwise separable blocks."""
from __future__ import annotations

from torch import nn
from torch.nn import functional as F

from . import init_weights, register, scaled

CFG = [64, (128, 2), 128, (256, 2), 256, (512, 2), 512, 512, 512, 512, 512, (1024, 2), 1024]


class DepthwiseSeparable(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False)
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv2 = nn.Conv2d(c_in, c_out, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(x)))


class MobileNetV1(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, width: float):
        super().__init__()
        c = scaled(32, width)
        self.conv1 = nn.Conv2d(in_channels, c, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        blocks = []
        for v in CFG:
            out, stride = (v if isinstance(v, tuple) else (v, 1))
            out = scaled(out, width)
            blocks.append(DepthwiseSeparable(c, out, stride))
            c = out
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(c, num_classes)
        init_weights(self)

    def forward(self, x):
        x = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


register("mobilenet-v1")(lambda in_channels, num_classes, image_size, width:
                         MobileNetV1(in_channels, num_classes, width))
