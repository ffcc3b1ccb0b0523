"""DenseNet (Huang et al. 2017): each layer's output is concatenated to its input instead of added to it.

Module names match torchvision's densenet (features.conv0, features.denseblock1.denselayer1.norm1,
features.transition1.conv, features.norm5, classifier) so torchvision checkpoints load unchanged.
Variants are data (see `DENSENETS` / `edgeres.models.registry`): the ImageNet nets (121/169/201/161) and the
CIFAR DenseNet-BC (3x3 stem conv with 2*growth filters, three dense blocks, compression 0.5).

The forward pass has no data-dependent control flow, so torch.fx traces it and ONNX export sees one
`Concat` per dense layer: a block keeps a running feature map `x` and appends each layer's `growth`
new channels, `x = cat([x, layer(x)])`, which is the same computation as torchvision's
"concatenate all previous outputs" (channel order: input first, then layer 1, 2, ...).
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from edgeres.errors import ConfigError


def bc_block_config(depth: int) -> tuple[int, int, int]:
    """DenseNet-BC for CIFAR: 3 blocks of (depth - 4) / 6 bottleneck layers (each layer is two convs)."""
    if depth < 10 or (depth - 4) % 6:
        raise ConfigError(f"DenseNet-BC depth must be 6n+4 with n >= 1, got {depth}")
    n = (depth - 4) // 6
    return (n, n, n)


# name -> builder args (growth_rate, block_config, num_init_features, stem); bn_size 4, compression 0.5.
DENSENETS: dict[str, dict] = {
    "densenet121": dict(growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64, stem="imagenet"),
    "densenet169": dict(growth_rate=32, block_config=(6, 12, 32, 32), num_init_features=64, stem="imagenet"),
    "densenet201": dict(growth_rate=32, block_config=(6, 12, 48, 32), num_init_features=64, stem="imagenet"),
    "densenet161": dict(growth_rate=48, block_config=(6, 12, 36, 24), num_init_features=96, stem="imagenet"),
    # DenseNet-BC, depth 100, k=12: (100 - 4) / 6 = 16 bottleneck layers per block, 2k stem filters.
    "densenet_bc_100": dict(growth_rate=12, block_config=bc_block_config(100), num_init_features=24,
                            stem="cifar"),
}


class DenseLayer(nn.Module):
    """BN-ReLU-conv1x1 (bottleneck to bn_size*growth) then BN-ReLU-conv3x3 producing `growth_rate` channels."""

    def __init__(self, cin: int, growth_rate: int, bn_size: int):
        super().__init__()
        width = bn_size * growth_rate
        self.norm1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, width, 1, stride=1, bias=False)
        self.norm2 = nn.BatchNorm2d(width)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, growth_rate, 3, stride=1, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.relu1(self.norm1(x)))
        return self.conv2(self.relu2(self.norm2(out)))


class DenseBlock(nn.Module):
    """`num_layers` dense layers named denselayer1..N; the output has cin + num_layers*growth channels."""

    def __init__(self, num_layers: int, cin: int, growth_rate: int, bn_size: int):
        super().__init__()
        for i in range(num_layers):
            self.add_module(f"denselayer{i + 1}", DenseLayer(cin + i * growth_rate, growth_rate, bn_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.children():
            x = torch.cat([x, layer(x)], 1)
        return x


class Transition(nn.Sequential):
    """BN-ReLU-conv1x1 (compression) then 2x2 average pooling."""

    def __init__(self, cin: int, cout: int):
        super().__init__(OrderedDict([
            ("norm", nn.BatchNorm2d(cin)),
            ("relu", nn.ReLU(inplace=True)),
            ("conv", nn.Conv2d(cin, cout, 1, stride=1, bias=False)),
            ("pool", nn.AvgPool2d(2, stride=2)),
        ]))


class DenseNet(nn.Module):
    """features (stem, dense blocks, transitions, norm5) -> ReLU -> global average pool -> classifier.

    stem "imagenet": conv0 7x7/2 (num_init_features), norm0, relu0, pool0 3x3/2 max-pool (torchvision).
    stem "cifar": conv0 3x3/1 only; the first dense layer's norm1/relu1 act on it (Huang et al.'s CIFAR nets).
    """

    def __init__(self, *, growth_rate: int, block_config: tuple[int, ...], num_init_features: int,
                 num_classes: int, in_channels: int, bn_size: int = 4, compression: float = 0.5,
                 stem: str = "imagenet"):
        super().__init__()
        if stem == "imagenet":
            layers = [("conv0", nn.Conv2d(in_channels, num_init_features, 7, stride=2, padding=3, bias=False)),
                      ("norm0", nn.BatchNorm2d(num_init_features)),
                      ("relu0", nn.ReLU(inplace=True)),
                      ("pool0", nn.MaxPool2d(3, stride=2, padding=1))]
        elif stem == "cifar":
            layers = [("conv0", nn.Conv2d(in_channels, num_init_features, 3, stride=1, padding=1, bias=False))]
        else:
            raise ConfigError(f"unknown DenseNet stem {stem!r} (imagenet | cifar)")
        self.features = nn.Sequential(OrderedDict(layers))
        channels = num_init_features
        for i, num_layers in enumerate(block_config):
            self.features.add_module(f"denseblock{i + 1}", DenseBlock(num_layers, channels, growth_rate, bn_size))
            channels += num_layers * growth_rate
            if i != len(block_config) - 1:
                out = int(channels * compression)
                self.features.add_module(f"transition{i + 1}", Transition(channels, out))
                channels = out
        self.features.add_module("norm5", nn.BatchNorm2d(channels))
        self.num_features = channels
        self.classifier = nn.Linear(channels, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.features(x))
        x = F.adaptive_avg_pool2d(x, 1)
        return self.classifier(torch.flatten(x, 1))
