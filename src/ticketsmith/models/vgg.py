"""VGG-11 / VGG-16 with batch norm, CIFAR style (one linear classifier on 512 features).
Pools use ceil_mode so that 28x28 and 8x8 inputs go through all five stages."""
from __future__ import annotations

from torch import nn

from . import init_weights, register, scaled

CFG = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


class VGG(nn.Module):
    def __init__(self, cfg, in_channels: int, num_classes: int, width: float):
        super().__init__()
        layers, c = [], in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                w = scaled(v, width)
                layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w),
                           nn.ReLU(inplace=True)]
                c = w
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)
        init_weights(self)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


for _name, _cfg in CFG.items():
    register(_name)(lambda in_channels, num_classes, image_size, width, _cfg=_cfg:
                    VGG(_cfg, in_channels, num_classes, width))
