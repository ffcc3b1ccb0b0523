"""Datasets for training and evaluation: `get_data(...) -> DataBundle(train, test, calib, info)`.

`train` applies the recipe's augmentation; `test` (the evaluation split, infer.SPLITS) the eval transform; `calib`
is the TRAIN images with the EVAL transform (INT8 calibration must not see test images nor augmentation). Every
sample is (float32 C x H x W normalized tensor, int label).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace
from typing import Any

from edgeres.data import gpu
from edgeres.data.infer import SPLITS
from edgeres.errors import ConfigError, DataError
from edgeres.suggest import unknown_name

DATASET_NAMES = ("digits", "mnist", "cifar10", "imagefolder")
CACHE_MAX_SIDE = 256   # the uint8 cache is for small inputs: refuse it above this side


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    in_channels: int
    class_names: tuple[str, ...]
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize_size: int | None
    fingerprint: str            # sha256 identifying the exact data (and split)
    train_size: int
    test_size: int
    skipped_images: int = 0     # unreadable files skipped with skip_bad_images
    holdout_size: int = 0       # training images held out for model selection (data.holdout)
    holdout_fraction: float = 0.0
    root: str | None = None     # imagefolder: the folder the photos were read from (--data-dir or its sub-folder)
    layout: str = ""            # imagefolder: what infer.find_layout found ("train/val", "class folders")
    val_split: float | None = None   # class folders alone: the share of each class in the evaluation split

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["class_names"], d["mean"], d["std"] = list(self.class_names), list(self.mean), list(self.std)
        return d


@dataclass(frozen=True)
class DataBundle:
    train: Any
    test: Any
    calib: Any
    info: DatasetInfo
    holdout: Any = None         # held-out training images (eval transform): what selects best.pt and QAT's epoch


def split_holdout(bundle: DataBundle, fraction: float, *, seed: int) -> DataBundle:
    """Hold out `fraction` of the training split (drawn with `seed`; the eval transform) for model selection, so
    that no selection ever reads the test split the report scores. train and calib keep the other images."""
    import random

    import torch

    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"data.holdout must be in [0, 1), got {fraction}")
    n = len(bundle.train)
    k = int(round(n * fraction))
    if k == 0:
        return bundle
    if n - k < 1:
        raise DataError(f"data.holdout {fraction}: the training split has only {n} images")
    held = sorted(random.Random(f"holdout-{seed}").sample(range(n), k))
    taken = set(held)
    keep = [i for i in range(n) if i not in taken]
    sub = torch.utils.data.Subset
    info = replace(bundle.info, train_size=len(keep), holdout_size=k, holdout_fraction=fraction)
    return DataBundle(train=sub(bundle.train, keep), test=bundle.test, calib=sub(bundle.calib, keep), info=info,
                      holdout=sub(bundle.calib, held))


def _channels_tuple(values, channels: int, name: str) -> tuple[float, ...]:
    import math

    values = tuple(float(v) for v in values)
    if not all(math.isfinite(v) for v in values):
        raise ConfigError(f"--{name} must be finite numbers, got {list(values)}")
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    if channels == 1 and len(values) == 3:
        raise ConfigError(f"--{name} has 3 values but the images have 1 channel; give one value")
    raise ConfigError(f"--{name} needs {channels} value(s) (one per channel), got {len(values)}")


def get_data(*, dataset: str, data_dir: str | None = None, input_size: int | None = None, mean=None, std=None,
             resize_size: int | None = None, augment=(), pad: int = 4, cache: bool = False,
             skip_bad_images: bool = False, in_channels: int | None = None, download: bool = True,
             workers: int = 2, seed: int = 0, val_split: float = 0.2, **_ignored: Any) -> DataBundle:
    """Load a dataset's train/test splits and wrap them in transforms. Extra DataCfg keywords are accepted.
    `val_split`: photos given as class folders alone are split here (infer.split_class_files), with a fixed draw
    (not `seed`: every run and `edgeres eval` evaluate the same images)."""
    from edgeres.data import datasets as D

    if dataset not in DATASET_NAMES:
        raise ConfigError(unknown_name("dataset", dataset, DATASET_NAMES))
    defaults = D.DEFAULTS[dataset]
    size = input_size or defaults["size"]
    channels = in_channels or defaults["channels"]
    if channels not in (1, 3):
        raise ConfigError(f"in_channels must be 1 or 3 for image data, got {channels}")
    if not 8 <= size <= 4096:
        raise ConfigError(f"input size must lie in [8, 4096] pixels, got {size}")
    mean_t = _channels_tuple(mean if mean is not None else defaults["mean"], channels, "mean")   # before any load
    std_t = _channels_tuple(std if std is not None else defaults["std"], channels, "std")
    if any(s <= 0 for s in std_t):
        raise ConfigError(f"std values must be > 0, got {list(std_t)}")
    skipped, layout = 0, None
    if dataset == "digits":
        train_src, test_src, classes, fp = D.load_digits(size)
    elif dataset == "mnist":
        train_src, test_src, classes, fp = D.load_mnist(data_dir, download=download)
    elif dataset == "cifar10":
        train_src, test_src, classes, fp = D.load_cifar10(data_dir, download=download)
    else:
        train_src, test_src, classes, fp, skipped, layout = D.load_imagefolder(
            data_dir, channels=channels, skip_bad_images=skip_bad_images, workers=workers, val_split=val_split)
    if dataset == "imagefolder":
        resize_size = resize_size or int(round(size / 0.875))
        if resize_size < size:
            raise ConfigError(f"resize_size {resize_size} is smaller than input_size {size}")
    train_cache = test_cache = None
    if cache and dataset == "imagefolder":
        if resize_size > CACHE_MAX_SIDE:
            raise ConfigError(f"the decoded-image cache is for small inputs (resize_size <= {CACHE_MAX_SIDE}); "
                              f"got {resize_size}: turn data.cache off")
        train_cache = D.build_cache(train_src.files, channels=channels, side=resize_size, size=size, workers=workers)
        test_cache = D.build_cache(test_src.files, channels=channels, side=resize_size, size=size, workers=workers)
    common = dict(size=size, channels=channels, mean=mean_t, std=std_t, pad=pad, resize_size=resize_size, seed=seed)
    train = D.ImageDataset(train_src, D.TransformSpec(train=True, augment=tuple(augment), **common), cache=train_cache)
    test = D.ImageDataset(test_src, D.TransformSpec(**common), cache=test_cache)
    calib = D.ImageDataset(train_src, D.TransformSpec(**common), cache=train_cache)
    if len(train) == 0 or len(test) == 0:
        raise DataError(f"{dataset}: empty split (train {len(train)}, test {len(test)} images)")
    info = DatasetInfo(name=dataset, num_classes=len(classes), in_channels=channels, class_names=tuple(classes),
                       input_size=size, mean=mean_t, std=std_t, resize_size=resize_size, fingerprint=fp,
                       train_size=len(train), test_size=len(test), skipped_images=skipped,
                       root=str(layout.root) if layout else None, layout=layout.kind.value if layout else "",
                       val_split=val_split if layout and layout.kind is D.Layout.CLASSES else None)
    return DataBundle(train=train, test=test, calib=calib, info=info)


def split_files(bundle: DataBundle) -> dict[str, list[str]] | None:
    """{"train": [...], "holdout": [...], "evaluation": [...]}: each split's files relative to the photos' folder
    (info.root; "/" separators), for the run folder; None for a dataset that is no folder of files."""
    out = {}
    for name, split in zip(SPLITS, (bundle.train, bundle.holdout, bundle.test)):
        if split is None:
            out[name] = []
            continue
        base, idx = gpu.base_of(split)
        files = getattr(base.source, "files", ())
        if not files or bundle.info.root is None:
            return None
        chosen = files if idx is None else [files[i] for i in idx]
        out[name] = [os.path.relpath(f, bundle.info.root).replace(os.sep, "/") for f in chosen]
    return out


def get_data_for(recipe, *, in_channels: int | None = None, **overrides) -> DataBundle:
    """get_data from a Recipe's data section (in_channels defaults to the dataset's own); `overrides` replace
    recipe.data fields (e.g. a model's own preprocessing)."""
    from dataclasses import asdict as _asdict

    d = _asdict(recipe.data)
    d.pop("batch_size", None)
    holdout = d.pop("holdout", 0.0)
    d.update(overrides)
    return split_holdout(get_data(**d, in_channels=in_channels, seed=recipe.train.seed), holdout,
                         seed=recipe.train.seed)


def make_loader(dataset, *, batch_size: int, shuffle: bool, workers: int = 0, seed: int = 0, drop_last: bool = False,
                sampler=None, epoch: int = 0, pin_memory: bool = False, device=None):
    """A DataLoader whose order depends only on (seed, epoch): the same after --resume, in every process.
    On a CUDA `device`, image datasets decode and transform on the GPU (edgeres.data.gpu: same order, same
    per-sample draws); everywhere else the CPU pipeline, with pinned memory for a GPU."""
    import torch

    if sampler is None and shuffle:
        sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=seed,
                                                      drop_last=drop_last)
        sampler.set_epoch(epoch)
    _set_epoch(dataset, epoch)
    if device is not None and str(device).startswith("cuda"):
        reason = gpu.why_not(dataset, device)
        if reason is None:
            gpu.say_once("on", f"data: decoding and augmenting on {device} (CPU workers only read files)")
            order = list(sampler) if sampler is not None else list(range(len(dataset)))
            return gpu.DeviceLoader(dataset, order, batch_size=batch_size, device=device, workers=workers,
                                    epoch=epoch, drop_last=drop_last)
        gpu.say_once("off", f"data: the CPU pipeline feeds {device} ({reason})")
        pin_memory = True
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, sampler=sampler, num_workers=workers,
        drop_last=drop_last, pin_memory=pin_memory, persistent_workers=False,
        multiprocessing_context="fork" if workers and _fork_ok() else None)


def _set_epoch(dataset, epoch: int) -> None:
    """Tell the dataset (through Subset / ConcatDataset wrappers) which epoch's augmentation to draw."""
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    for inner in ([dataset.dataset] if hasattr(dataset, "dataset") else []) + list(getattr(dataset, "datasets", [])):
        _set_epoch(inner, epoch)


def _fork_ok() -> bool:
    import multiprocessing
    import sys

    return sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()


__all__ = ["DataBundle", "DatasetInfo", "DATASET_NAMES", "SPLITS", "get_data", "get_data_for", "make_loader",
           "split_files", "split_holdout"]
