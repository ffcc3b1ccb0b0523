"""One ResNet class for every family; the differences are data in `edgeres.models.registry`."""
from __future__ import annotations

import torch
from torch import nn

from edgeres.models.blocks import BLOCKS


class ResNet(nn.Module):
    """ImageNet stem (7x7/2 + max-pool) or CIFAR/MNIST stem (3x3/1), residual stages, avg-pool, fc.

    Module names match torchvision's resnet (conv1, bn1, layer1.0.conv1, layer2.0.downsample.0, fc)
    so torchvision checkpoints load unchanged. Pre-activation nets add `bn_final` before the pool.
    """

    def __init__(self, *, block: str, layers: tuple[int, ...], widths: tuple[int, ...], num_classes: int,
                 in_channels: int, stem: str, variant: str = "residual", shortcut: str = "B",
                 stride_in_1x1: bool = False):
        super().__init__()
        block_cls = BLOCKS[(block, variant)]
        preact = variant == "preact"
        self.variant = variant
        stem_out = widths[0]
        if stem == "imagenet":
            stem_out = 64
            self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, stem_out, 3, stride=1, padding=1, bias=False)
        # Pre-activation CIFAR nets go straight from the stem conv into the first block's BN-ReLU.
        self.has_stem_bn = not (preact and stem != "imagenet")
        if self.has_stem_bn:
            self.bn1 = nn.BatchNorm2d(stem_out)
            self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1) if stem == "imagenet" else None
        cin = stem_out
        for i, (n, width) in enumerate(zip(layers, widths)):
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(n):
                blocks.append(block_cls(cin, width, stride if j == 0 else 1, shortcut=shortcut,
                                        residual=variant != "plain", stride_in_1x1=stride_in_1x1))
                cin = width * block_cls.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.num_stages = len(layers)
        self.bn_final = nn.BatchNorm2d(cin) if preact else None
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        if self.has_stem_bn:
            x = self.relu(self.bn1(x))
        if self.maxpool is not None:
            x = self.maxpool(x)
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        if self.bn_final is not None:
            x = torch.relu(self.bn_final(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))
