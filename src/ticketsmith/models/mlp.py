"""The classic LTH small models: LeNet-5 and the MLP-300-100 (LeNet-300-100)."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from . import init_weights, register, scaled


class LeNet5(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, image_size, width: float):
        super().__init__()
        c1, c2 = scaled(6, width), scaled(16, width)
        small = min(image_size) < 20  # 8x8 digits: pad the second conv too
        self.conv1 = nn.Conv2d(in_channels, c1, 5, padding=2)
        self.conv2 = nn.Conv2d(c1, c2, 5, padding=2 if small else 0)
        with torch.no_grad():
            n = self._features(torch.zeros(1, in_channels, *image_size)).shape[1]
        self.fc1 = nn.Linear(n, scaled(120, width))
        self.fc2 = nn.Linear(scaled(120, width), scaled(84, width))
        self.fc3 = nn.Linear(scaled(84, width), num_classes)
        init_weights(self)

    def _features(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2, ceil_mode=True)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2, ceil_mode=True)
        return x.flatten(1)

    def forward(self, x):
        x = F.relu(self.fc1(self._features(x)))
        return self.fc3(F.relu(self.fc2(x)))


class MLP(nn.Module):
    def __init__(self, in_features: int, hidden: list[int], num_classes: int):
        super().__init__()
        dims = [in_features] + hidden
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:]))
        self.fc = nn.Linear(dims[-1], num_classes)
        init_weights(self)

    def forward(self, x):
        x = x.flatten(1)
        for layer in self.hidden:
            x = F.relu(layer(x))
        return self.fc(x)


register("lenet5")(lambda in_channels, num_classes, image_size, width:
                   LeNet5(in_channels, num_classes, image_size, width))
register("mlp-300-100")(lambda in_channels, num_classes, image_size, width:
                        MLP(in_channels * image_size[0] * image_size[1],
                            [scaled(300, width), scaled(100, width)], num_classes))
