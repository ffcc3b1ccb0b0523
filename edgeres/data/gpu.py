"""Data at GPU speed: on CUDA, CPU workers only read bytes and the GPU decodes and transforms.

A CPU pipeline (PIL decode + random-resized-crop + flip per image in worker processes) feeds a modern GPU at a
tenth of what it trains at. Here, on a CUDA device:
- workers read each JPEG's bytes (or take the cached / in-memory uint8 image) - nothing else;
- the main process decodes a whole batch of JPEGs at once with nvJPEG (`torchvision.io.decode_jpeg(...,
  device="cuda")`; other formats, and a batch nvJPEG refuses, are decoded on the CPU as before, with the same
  errors); nvJPEG ignores a photo's EXIF orientation, so the worker reads it from the file's header and `orient`
  turns the decoded image upright, as the CPU decoder (datasets.upright) does;
- every image then goes through the dataset's own `transform` (edgeres.data.transforms: the same crop, flip, resize
  and normalization, the same per-sample random draws from (seed, epoch, index)) as tensor ops on the GPU.
So both paths make the same decisions; only the JPEG decoder differs (nvJPEG vs libjpeg), within 1/255.

Chosen automatically by `make_loader(..., device=cuda)` for image datasets when torchvision's nvJPEG binding
imports; elsewhere the CPU pipeline runs unchanged, and `why_not(...)` says why.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgeres.errors import DataError
from edgeres.io import require_regular_file

_said: set[str] = set()


def base_of(dataset) -> tuple[Any, list[int] | None]:
    """The ImageDataset under Subset wrappers and the index map into it (None: the identity)."""
    import torch

    idx: list[int] | None = None
    while isinstance(dataset, torch.utils.data.Subset):
        idx = list(dataset.indices) if idx is None else [int(dataset.indices[j]) for j in idx]
        dataset = dataset.dataset
    return dataset, idx


def _nvjpeg():
    """decode(list of JPEG byte tensors, channels, device) -> uint8 C x H x W images on the device, as stored (no
    EXIF orientation: torchvision's `apply_exif_orientation` defaults to False); None without the binding."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except Exception:  # torchvision absent, or built for another torch: the CPU pipeline stays
        return None

    def decode(datas: list, channels: int, dev) -> list:
        return decode_jpeg(datas, mode=ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY, device=dev)

    return decode


def _jpeg_decoder(dev):
    """The batch JPEG decoder for `dev`: nvJPEG on a GPU, none elsewhere (tests put a stand-in here)."""
    return _nvjpeg() if dev.type == "cuda" else None


def jpeg_orientation(data: bytes) -> int:
    """The EXIF orientation (1..8) in a JPEG's header; 1 (as stored) when it has none or it cannot be read. Reads
    only the header, as `datasets.upright` does."""
    import io

    from PIL import Image

    from edgeres.data.datasets import exif_orientation

    try:
        with Image.open(io.BytesIO(data)) as im:
            return exif_orientation(im)
    except (OSError, ValueError, SyntaxError):   # not a JPEG PIL can open: the decoder reports it, not this
        return 1


def orient(img, orientation: int):
    """A uint8 C x H x W image (any device) turned as EXIF `orientation` says, the transposes of
    PIL.ImageOps.exif_transpose: 2 mirror, 3 turn 180, 4 flip, 5 transpose, 6 turn 90 clockwise, 7 transverse,
    8 turn 90 counter-clockwise."""
    import torch

    if orientation == 2:
        return img.flip(-1)
    if orientation == 3:
        return img.flip(-1).flip(-2)
    if orientation == 4:
        return img.flip(-2)
    if orientation == 5:
        return img.transpose(-1, -2).contiguous()
    if orientation == 6:
        return torch.rot90(img, -1, dims=(-2, -1)).contiguous()
    if orientation == 7:
        return img.transpose(-1, -2).flip(-1).flip(-2).contiguous()
    if orientation == 8:
        return torch.rot90(img, 1, dims=(-2, -1)).contiguous()
    return img


def why_not(dataset, device) -> str | None:
    """None when the GPU path serves `dataset` on `device`, else the reason (one line)."""
    from edgeres.data.datasets import ImageDataset

    if not str(device).startswith("cuda"):
        return f"device {device} is not a GPU"
    base, _ = base_of(dataset)
    if not isinstance(base, ImageDataset):
        return f"{type(base).__name__} is not an edgeres image dataset"
    if base.cache is None and base.source.array is None and _nvjpeg() is None:
        return "torchvision's nvJPEG binding (torchvision.io.decode_jpeg) does not import"
    return None


class _Raw:
    """What a CPU worker does on the GPU path: sample i's bytes (a file) and its EXIF orientation, or its uint8
    image (cache / array: upright already): (data, label, index, path or None, orientation)."""

    def __init__(self, base):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        import torch

        b = self.base
        label = int(b.source.labels[i])
        if b.cache is not None or b.source.array is not None:
            return b.raw(i), label, i, None, 1
        path = b.source.files[i]
        data = Path(require_regular_file(path, "image", DataError)).read_bytes()
        orientation = jpeg_orientation(data) if _is_jpeg(data) else 1
        return torch.frombuffer(bytearray(data), dtype=torch.uint8), label, i, path, orientation


def device_batches(dataset, order: list[int], *, batch_size: int, device, workers: int = 0, epoch: int = 0,
                   drop_last: bool = False) -> Iterator[tuple[Any, Any]]:
    """(x on `device`, y) batches of `dataset` in `order` (positions in `dataset`), transformed on the device."""
    import torch

    base, idx = base_of(dataset)
    base.set_epoch(epoch)
    mapped = [idx[i] for i in order] if idx is not None else list(order)
    loader = torch.utils.data.DataLoader(_Raw(base), batch_size=batch_size, sampler=mapped, num_workers=workers,
                                         drop_last=drop_last, collate_fn=list)
    dev = torch.device(device)
    mean, std = base._mean.to(dev), base._std.to(dev)
    for items in loader:
        images = _decode(base, items, dev)
        x = torch.stack([base.transform(img, item[2], mean, std) for img, item in zip(images, items)])
        yield x, torch.tensor([item[1] for item in items], dtype=torch.long)


def _decode(base, items, dev) -> list:
    """uint8 C x H x W images on `dev`: JPEG bytes through nvJPEG in one call, everything else as before."""
    from edgeres.data.datasets import decode_image

    out: list = [None] * len(items)
    jpeg = [k for k, (data, _, _, path, _) in enumerate(items) if path is not None and _is_jpeg(data)]
    decode = _jpeg_decoder(dev) if jpeg else None
    if decode is not None:
        try:
            for k, img in zip(jpeg, decode([items[k][0] for k in jpeg], base.spec.channels, dev)):
                out[k] = orient(img, items[k][4])
        except RuntimeError:   # a JPEG nvJPEG cannot take (CMYK, progressive in old versions): the CPU decodes
            out = [None] * len(items)
    for k, (data, _, _, path, _) in enumerate(items):
        if out[k] is None:
            img = data if path is None else decode_image(path, base.spec.channels,
                                                         draft=base.spec.resize_size or base.spec.size)
            out[k] = img.to(dev, non_blocking=True)
    return out


def _is_jpeg(data) -> bool:
    return len(data) > 2 and int(data[0]) == 0xFF and int(data[1]) == 0xD8


class DeviceLoader:
    """A loader whose batches arrive on the GPU already transformed (see the module docstring); len() = batches."""

    def __init__(self, dataset, order: list[int], *, batch_size: int, device, workers: int, epoch: int,
                 drop_last: bool):
        self.dataset, self.order, self.batch_size, self.device = dataset, order, batch_size, device
        self.workers, self.epoch, self.drop_last = workers, epoch, drop_last

    def __len__(self) -> int:
        n = len(self.order)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        return device_batches(self.dataset, self.order, batch_size=self.batch_size, device=self.device,
                              workers=self.workers, epoch=self.epoch, drop_last=self.drop_last)


def say_once(key: str, msg: str) -> None:
    if key not in _said:
        _said.add(key)
        import sys

        print(msg, file=sys.stderr, flush=True)
