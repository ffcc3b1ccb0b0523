"""Image transforms in torch (no torchvision). Images are uint8 tensors C x H x W until `normalize`.

Random transforms take a `random.Random`, seeded per sample from (seed, epoch, index) by the datasets,
so augmentation is identical whatever the number of workers or processes and after --resume.
"""
from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F


def pad_random_crop(img: torch.Tensor, size: int, pad: int, rng: random.Random) -> torch.Tensor:
    """Zero-pad `pad` pixels per side, then crop a random size x size window (the CIFAR/MNIST recipe)."""
    if pad:
        img = F.pad(img, (pad, pad, pad, pad))
    _, h, w = img.shape
    if h < size or w < size:
        img = center_fit(img, max(size, h), max(size, w))
        _, h, w = img.shape
    top, left = rng.randint(0, h - size), rng.randint(0, w - size)
    return img[:, top:top + size, left:left + size]


def hflip(img: torch.Tensor, rng: random.Random, p: float = 0.5) -> torch.Tensor:
    return img.flip(-1) if rng.random() < p else img


def resize(img: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear resize with antialiasing (for downscaling) of a uint8 or float C x H x W image."""
    if img.shape[-2:] == (height, width):
        return img
    out = F.interpolate(img[None].float(), size=(height, width), mode="bilinear", align_corners=False,
                        antialias=True)[0]
    return out.round_().clamp_(0, 255).to(torch.uint8) if img.dtype == torch.uint8 else out


def resize_shorter(img: torch.Tensor, side: int) -> torch.Tensor:
    _, h, w = img.shape
    if h <= w:
        return resize(img, side, max(1, round(w * side / h)))
    return resize(img, max(1, round(h * side / w)), side)


def center_fit(img: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Center-crop or zero-pad to exactly height x width."""
    _, h, w = img.shape
    if h > height or w > width:
        top, left = max(0, (h - height) // 2), max(0, (w - width) // 2)
        img = img[:, top:top + min(h, height), left:left + min(w, width)]
        _, h, w = img.shape
    if h < height or w < width:
        pt, pl = (height - h) // 2, (width - w) // 2
        img = F.pad(img, (pl, width - w - pl, pt, height - h - pt))
    return img


def resize_center_crop(img: torch.Tensor, resize_size: int, size: int) -> torch.Tensor:
    """The ImageNet eval transform: shorter side to resize_size, then a centered size x size crop."""
    return center_fit(resize_shorter(img, resize_size), size, size)


def random_resized_crop(img: torch.Tensor, size: int, rng: random.Random, scale=(0.08, 1.0),
                        ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """Inception-style crop: random area fraction and aspect ratio, resized to size x size."""
    _, h, w = img.shape
    area = h * w
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_r))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = rng.randint(0, h - ch), rng.randint(0, w - cw)
            return resize(img[:, top:top + ch, left:left + cw], size, size)
    # fallback: the largest central crop within the ratio bounds
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, round(w / ratio[0])
    elif in_ratio > ratio[1]:
        ch, cw = h, round(h * ratio[1])
    else:
        cw, ch = w, h
    top, left = (h - ch) // 2, (w - cw) // 2
    return resize(img[:, top:top + ch, left:left + cw], size, size)


def match_channels(img: torch.Tensor, channels: int) -> torch.Tensor:
    """Gray -> RGB by repetition; RGB -> gray by ITU-R 601 luma (as Pillow's convert('L'))."""
    c = img.shape[0]
    if c == channels:
        return img
    if c == 1:
        return img.expand(channels, -1, -1).contiguous()
    if channels == 1 and c == 3:
        w = torch.tensor([0.299, 0.587, 0.114], device=img.device).view(3, 1, 1)
        return (img.float() * w).sum(0, keepdim=True).round_().clamp_(0, 255).to(torch.uint8)
    raise ValueError(f"cannot convert {c} channels to {channels}")


def normalize(img: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 [0,255] -> float32 (x/255 - mean) / std; mean and std are C x 1 x 1 tensors."""
    return (img.float().div_(255.0) - mean) / std


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    return random.Random((seed * 1_000_003 + epoch) * 1_000_000_007 + index)
