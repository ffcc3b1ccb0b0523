"""Residual, plain and pre-activation blocks. Names follow torchvision (conv1, bn1, downsample.0/1)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class ShortcutA(nn.Module):
    """The paper's option A: identity, subsampled by `stride`, extra channels zero-padded. No parameters."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride, self.extra = stride, cout - cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        lo = self.extra // 2
        return F.pad(x, (0, 0, 0, 0, lo, self.extra - lo))


def make_shortcut(kind: str, cin: int, cout: int, stride: int, preact: bool = False) -> nn.Module | None:
    """kind: 'A' (pad), 'B' (1x1 conv + BN), 'B3' (3x3 conv + BN, the MNIST tutorial's), 'none' (plain)."""
    if kind == "none" or (stride == 1 and cin == cout):
        return None
    if kind == "A":
        return ShortcutA(cin, cout, stride)
    conv = conv3x3(cin, cout, stride) if kind == "B3" else conv1x1(cin, cout, stride)
    if preact:  # projection of the pre-activated input, no BN (He et al. 2016)
        return nn.Sequential(conv)
    return nn.Sequential(conv, nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, shortcut: str = "B", residual: bool = True, **_):
        super().__init__()
        self.conv1 = conv3x3(cin, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.residual = residual
        self.downsample = make_shortcut(shortcut if residual else "none", cin, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.residual:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, shortcut: str = "B", residual: bool = True,
                 stride_in_1x1: bool = False):
        super().__init__()
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)  # v1 vs v1.5
        self.conv1 = conv1x1(cin, planes, s1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, s3)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * 4)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.residual = residual
        self.downsample = make_shortcut(shortcut if residual else "none", cin, planes * 4, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.residual:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out)


class PreActBasicBlock(nn.Module):
    """BN-ReLU-conv twice, identity mapping (He et al., 'Identity Mappings in Deep Residual Networks')."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, shortcut: str = "B", residual: bool = True, **_):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = conv3x3(cin, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.relu = nn.ReLU(inplace=False)
        self.downsample = make_shortcut(shortcut, cin, planes, stride, preact=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu(self.bn1(x))
        out = self.conv2(self.relu(self.bn2(self.conv1(pre))))
        if self.downsample is None:
            return out + x
        return out + self.downsample(x if isinstance(self.downsample, ShortcutA) else pre)


class PreActBottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, shortcut: str = "B", residual: bool = True,
                 stride_in_1x1: bool = False):
        super().__init__()
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = conv1x1(cin, planes, s1)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, s3)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * 4)
        self.relu = nn.ReLU(inplace=False)
        self.downsample = make_shortcut(shortcut, cin, planes * 4, stride, preact=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu(self.bn1(x))
        out = self.relu(self.bn2(self.conv1(pre)))
        out = self.conv3(self.relu(self.bn3(self.conv2(out))))
        if self.downsample is None:
            return out + x
        return out + self.downsample(x if isinstance(self.downsample, ShortcutA) else pre)


BLOCKS = {
    ("basic", "residual"): BasicBlock,
    ("basic", "plain"): BasicBlock,
    ("basic", "preact"): PreActBasicBlock,
    ("bottleneck", "residual"): Bottleneck,
    ("bottleneck", "plain"): Bottleneck,
    ("bottleneck", "preact"): PreActBottleneck,
}
