"""CIFAR-style residual networks: ResNet-20/32/56 (He et al. 2016, 6n+2 layers, widths
16-32-64), WRN-32-2 (ResNet-32 at twice the width) and ResNet-18 (3x3 stem, no max-pool).
Shortcuts that change shape are 1x1 conv + BN projections, as in OpenLTH's CIFAR ResNets."""
from __future__ import annotations

from torch import nn
from torch.nn import functional as F

from . import init_weights, register, scaled


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, stages: list[tuple[int, int, int]], stem: int, in_channels: int,
                 num_classes: int):
        """stages: (width, blocks, stride) per stage."""
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        layers, c = [], stem
        for width, blocks, stride in stages:
            for i in range(blocks):
                layers.append(BasicBlock(c, width, stride if i == 0 else 1))
                c = width
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(c, num_classes)
        init_weights(self)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


def _cifar_resnet(depth: int, width_factor: int):
    def build(in_channels, num_classes, image_size, width):
        n = (depth - 2) // 6
        w = [scaled(c * width_factor, width) for c in (16, 32, 64)]
        return ResNet([(w[0], n, 1), (w[1], n, 2), (w[2], n, 2)], w[0], in_channels, num_classes)
    return build


for _d in (20, 32, 56):
    register(f"resnet{_d}")(_cifar_resnet(_d, 1))
register("wrn32-2")(_cifar_resnet(32, 2))


@register("resnet18")
def resnet18(in_channels, num_classes, image_size, width):
    w = [scaled(c, width) for c in (64, 128, 256, 512)]
    return ResNet([(w[0], 2, 1), (w[1], 2, 2), (w[2], 2, 2), (w[3], 2, 2)], w[0],
                  in_channels, num_classes)
