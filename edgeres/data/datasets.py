"""Datasets: digits (embedded), MNIST idx files, CIFAR-10 pickle batches, ImageFolder trees.

Every source yields uint8 images (C x H x W) and int labels; `ImageDataset` applies the train or eval
transform and returns (float32 normalized tensor, int label).
"""
from __future__ import annotations

import gzip
import hashlib
import io
import math
import os
import pickle
import struct
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgeres.data import transforms as T
from edgeres.data.infer import IMAGE_EXTS, MNIST_FILES, Layout, find_layout, find_mnist, not_a_folder, split_class_files
from edgeres.errors import DataError
from edgeres.io import require_regular_file

# Dataset defaults: native side, channels, mean, std.
DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": {"size": 32, "channels": 1, "mean": (0.3052,), "std": (0.3236,)},
    "mnist": {"size": 28, "channels": 1, "mean": (0.1307,), "std": (0.3081,)},
    "cifar10": {"size": 32, "channels": 3, "mean": (0.4914, 0.4822, 0.4465), "std": (0.2470, 0.2435, 0.2616)},
    "imagefolder": {"size": 224, "channels": 3, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)},
}

MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
CIFAR_FILES = {"data_batch_1": "c99cafc152244af753f735de768cd75f", "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
               "data_batch_3": "54ebc095f3ab1f0389bbae665268c751", "data_batch_4": "634d18415352ddbe9b4ba4ecd1fe8d22",
               "data_batch_5": "482c414d41f54cd9b3ea30ab6f3ef02f", "test_batch": "40351d587109b95175f43aff81a1287e"}
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_TAR_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
DIGITS_TEST_FRACTION = 0.2   # the last 20% of a permutation with seed 0 is the digits test split


@dataclass(frozen=True)
class Source:
    """Raw data of one split: either an in-memory uint8 array or a list of image files."""

    labels: np.ndarray                      # int64 [N]
    array: torch.Tensor | None = None       # uint8 [N, C, H, W]
    files: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.labels)


def default_root(name: str) -> Path:
    return Path(os.environ.get("EDGERES_DATA", Path.home() / ".cache" / "edgeres" / "data")) / name


# ---------------------------------------------------------------- digits
def load_digits(size: int) -> tuple[Source, Source, tuple[str, ...], str]:
    from sklearn.datasets import load_digits as sk_digits

    raw = sk_digits()
    x = torch.from_numpy(raw.images.astype(np.float32))[:, None] * (255.0 / 16.0)
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.round_().clamp_(0, 255).to(torch.uint8)
    y = raw.target.astype(np.int64)
    perm = np.random.default_rng(0).permutation(len(y))
    n_test = int(round(len(y) * DIGITS_TEST_FRACTION))
    tr, te = np.sort(perm[:-n_test]), np.sort(perm[-n_test:])
    fp = hashlib.sha256(raw.images.astype(np.uint8).tobytes() + y.tobytes() + perm.tobytes()).hexdigest()
    return (Source(y[tr], x[tr]), Source(y[te], x[te]), tuple(str(i) for i in range(10)), fp)


# ---------------------------------------------------------------- download helpers
def _download(url: str, dest: Path, md5: str) -> None:
    import urllib.request

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=30) as r, open(tmp, "wb") as f:
            while block := r.read(1 << 20):
                f.write(block)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise DataError(f"could not download {url} ({e})") from None
    got = hashlib.md5(tmp.read_bytes()).hexdigest()
    if got != md5:
        tmp.unlink(missing_ok=True)
        raise DataError(f"downloaded {url} has md5 {got}, expected {md5}; the download is corrupt, try again")
    os.replace(tmp, dest)


def _offline_hint(name: str, need: str) -> str:
    return f"download {name} yourself and pass --data-dir DIR where DIR holds {need}"


# ---------------------------------------------------------------- MNIST
MAX_IDX_BYTES = 256 << 20   # MNIST's largest file is 47 MB unpacked: more is a gzip bomb, not MNIST


def _read_maybe_gz(path: Path) -> bytes:
    data = require_regular_file(path, "MNIST file", DataError).read_bytes()
    if data[:2] == b"\x1f\x8b":
        try:
            with gzip.GzipFile(fileobj=io.BytesIO(data)) as f:
                data = f.read(MAX_IDX_BYTES + 1)
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: corrupt gzip file ({e})") from None
    if len(data) > MAX_IDX_BYTES:
        raise DataError(f"{path}: more than {MAX_IDX_BYTES >> 20} MB of data; not an MNIST idx file")
    return data


def _parse_idx(data: bytes, path: Path, ndim: int) -> np.ndarray:
    if len(data) < 4 + 4 * ndim or data[:3] != b"\x00\x00\x08" or data[3] != ndim:
        raise DataError(f"{path}: not an idx file with {ndim} dimension(s) of uint8")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != math.prod(dims):
        raise DataError(f"{path}: truncated idx file (header says {dims}, found {body.size} bytes of data)")
    return body.reshape(dims)


def load_mnist(data_dir: str | None, *, download: bool = True) -> tuple[Source, Source, tuple[str, ...], str]:
    root = Path(data_dir).expanduser() if data_dir else default_root("mnist")
    if data_dir and not root.is_dir() and not download:
        raise DataError(f"MNIST data directory not found: {root}")
    files = find_mnist(root)
    if files is None:
        need = ", ".join(f"{n}[.gz]" for n, _, _ in MNIST_FILES.values())
        if not download:
            raise DataError(f"MNIST files not found in {root}; expected {need}")
        try:
            for name, _, gz_md5 in MNIST_FILES.values():
                if not (root / f"{name}.gz").is_file():
                    _download(MNIST_URL + f"{name}.gz", root / f"{name}.gz", gz_md5)
        except DataError as e:
            raise DataError(f"MNIST not found in {root} and {e}; {_offline_hint('MNIST', need)}") from None
        files = find_mnist(root)
        if files is None:
            raise DataError(f"MNIST files still missing in {root} after the download")
    digest = hashlib.sha256()
    arrays = {}
    for key, path in files.items():
        data = _read_maybe_gz(path)
        expected = MNIST_FILES[key][1]
        if hashlib.md5(data).hexdigest() != expected:
            warnings.warn(f"{path}: content md5 differs from the official MNIST file ({expected}); using it anyway",
                          stacklevel=2)
        digest.update(data)
        arrays[key] = _parse_idx(data, path, 3 if key.endswith("images") else 1)
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if len(images) != len(labels):
            raise DataError(f"MNIST {split}: {len(images)} images but {len(labels)} labels in {root}")
        if len(labels) == 0 or labels.max() > 9:
            raise DataError(f"MNIST {split} in {root}: " + ("no images" if len(labels) == 0 else
                            f"label {int(labels.max())} is not a digit 0..9"))
        if images.shape[1:] != (28, 28):
            raise DataError(f"MNIST {split} in {root}: images are {images.shape[1]}x{images.shape[2]}, not 28x28")
    def mk(s: str) -> Source:
        return Source(arrays[f"{s}_labels"].astype(np.int64), torch.from_numpy(arrays[f"{s}_images"].copy())[:, None])

    return mk("train"), mk("test"), tuple(str(i) for i in range(10)), digest.hexdigest()


# ---------------------------------------------------------------- CIFAR-10
class _ArrayUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles: allow only what numpy arrays need, so no arbitrary code runs."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _load_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray, bytes]:
    raw = require_regular_file(path, "CIFAR-10 batch", DataError).read_bytes()
    try:
        d = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
        data = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(d[b"labels"], dtype=np.int64)
    except Exception as e:  # a bad pickle raises many types
        raise DataError(f"{path}: not a CIFAR-10 python batch ({type(e).__name__}: {e})") from None
    if len(data) == 0 or len(data) != len(labels) or labels.min() < 0 or labels.max() > 9:
        raise DataError(f"{path}: {len(data)} images, {len(labels)} labels, labels must be 0..9")
    if hashlib.md5(raw).hexdigest() != CIFAR_FILES[path.name]:
        warnings.warn(f"{path}: md5 differs from the official CIFAR-10 file; using it anyway", stacklevel=3)
    return data, labels, raw


def load_cifar10(data_dir: str | None, *, download: bool = True) -> tuple[Source, Source, tuple[str, ...], str]:
    root = Path(data_dir).expanduser() if data_dir else default_root("cifar10")
    cands = (root, root / "cifar-10-batches-py")
    folder = next((d for d in cands if all((d / n).is_file() for n in CIFAR_FILES)), None)
    if folder is None:
        need = "cifar-10-batches-py/ (data_batch_1..5, test_batch)"
        if not download:
            raise DataError(f"CIFAR-10 batches not found in {root}; expected {need}")
        import tarfile

        tar = root / "cifar-10-python.tar.gz"
        try:
            if not tar.is_file():
                _download(CIFAR_URL, tar, CIFAR_TAR_MD5)
        except DataError as e:
            raise DataError(f"CIFAR-10 not found in {root} and {e}; {_offline_hint('CIFAR-10', need)}") from None
        with tarfile.open(tar) as tf:
            tf.extractall(root, filter="data")
        folder = root / "cifar-10-batches-py"
    digest = hashlib.sha256()
    parts = {}
    for name in CIFAR_FILES:
        x, y, raw = _load_cifar_batch(folder / name)
        digest.update(raw)
        parts[name] = (x, y)
    tx = np.concatenate([parts[f"data_batch_{i}"][0] for i in range(1, 6)])
    ty = np.concatenate([parts[f"data_batch_{i}"][1] for i in range(1, 6)])
    return (Source(ty, torch.from_numpy(tx)), Source(parts["test_batch"][1], torch.from_numpy(parts["test_batch"][0])),
            CIFAR_CLASSES, digest.hexdigest())


# ---------------------------------------------------------------- ImageFolder
def _scan_split(split_dir: Path) -> dict[str, list[Path]]:
    if not split_dir.is_dir():
        raise DataError(f"missing directory {split_dir} (photos go in class folders DIR/<class>/*.jpg, or in "
                        f"train/<class>/ with val/<class>/)")
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{split_dir} has no class folders")
    out = {}
    for c in classes:
        files = sorted(p for p in (split_dir / c).rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
        if not files:
            raise DataError(f"empty class folder {split_dir / c} (no {'/'.join(IMAGE_EXTS)} images)")
        out[c] = files
    return out


MAX_IMAGE_PIXELS = 64 * 1024 * 1024   # one decoded image; larger is a decompression bomb or not a training image


def decode_image(path: str, channels: int = 3, draft: int | None = None) -> torch.Tensor:
    """Decode one file to uint8 C x H x W (RGB or L). Corrupt files, decompression bombs and images past
    MAX_IMAGE_PIXELS raise DataError naming the path (skippable with --skip-bad-images); 16-bit images are scaled
    to 8 bits (not clipped), floating-point images refused."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(require_regular_file(path, "image", DataError)) as im:
                w, h = im.size
                if w * h > MAX_IMAGE_PIXELS:
                    raise DataError(f"image {path} is {w}x{h} pixels, more than the {MAX_IMAGE_PIXELS} edgeres "
                                    f"decodes (a decompression bomb, or not a training image); pass "
                                    f"--skip-bad-images to skip such files")
                if draft and im.format == "JPEG":
                    im.draft("RGB" if channels == 3 else "L", (draft, draft))
                arr = _to_uint8(upright(im), channels, path)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError,
            Image.DecompressionBombWarning, MemoryError) as e:
        raise DataError(f"corrupt or unreadable image {path} ({_first(e)}); "
                        "pass --skip-bad-images to skip such files") from None
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(arr))


EXIF_ORIENTATION = 0x0112   # the TIFF/EXIF tag a camera writes instead of rotating the pixels


def upright(im):
    """The image as the camera meant it: its EXIF orientation (a phone held upright writes 6) applied, as every
    viewer does. The GPU path applies the same transposes to nvJPEG's output (gpu.orient)."""
    from PIL import ImageOps

    return im if exif_orientation(im) == 1 else ImageOps.exif_transpose(im)


def exif_orientation(im) -> int:
    """An opened image's EXIF orientation, 1..8; 1 (as stored) when it has none or an unreadable EXIF block."""
    try:
        value = im.getexif().get(EXIF_ORIENTATION, 1)
    except (struct.error, ValueError, KeyError, IndexError, TypeError, OSError, SyntaxError):
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _first(e: BaseException) -> str:
    return ((str(e).strip().splitlines() or [type(e).__name__])[0])[:200]


def _to_uint8(im, channels: int, path: str) -> np.ndarray:
    """H x W (L) or H x W x 3 (RGB) uint8. 16-bit modes are scaled by 255/65535 (PIL's convert would clip every
    value above 255 to white); 32-bit integer images are taken as 16-bit when their values fit, else refused;
    floating-point images are refused (no scale is implied)."""
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(im)
        if a.dtype.kind not in "ui" or (a.size and (a.min() < 0 or a.max() > 65535)):
            raise DataError(f"image {path}: {mode} pixels outside 0..65535; convert it to 8 or 16 bits")
        gray = np.rint(a.astype(np.float32) * (255.0 / 65535.0)).astype(np.uint8)
        return gray if channels == 1 else np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "F":
        raise DataError(f"image {path} has floating-point pixels (mode F) with no implied range; convert it to an "
                        f"8- or 16-bit image")
    im = im.convert("RGB" if channels == 3 else "L")
    return np.array(im, dtype=np.uint8)   # a writable copy (torch warns on read-only arrays)


def _readable(path: str, channels: int) -> bool:
    try:
        decode_image(path, channels, draft=64)
        return True
    except DataError:
        return False


def load_imagefolder(data_dir: str | None, *, channels: int, skip_bad_images: bool, workers: int,
                     val_split: float = 0.2):
    """(train Source, evaluation Source, class names, fingerprint, images skipped, FolderLayout) of a folder of
    photos in any layout of `infer.find_layout`; class folders alone are split by `infer.split_class_files`."""
    if not data_dir:
        raise DataError("dataset imagefolder needs --data-dir DIR holding class folders (DIR/<class>/*.jpg), or "
                        "train/<class>/* with val/<class>/*")
    problem = not_a_folder(data_dir)
    if problem:
        raise DataError(problem)
    layout = find_layout(data_dir)
    root = layout.root if layout else Path(data_dir).expanduser()
    if layout is None and not (root / "train").is_dir():
        raise DataError(_no_photos(root))
    if layout is None or layout.kind is Layout.SPLIT:   # no layout but train/: its scan says what is missing
        val_name = layout.eval_name if layout else "val"
        train, val = _scan_split(root / "train"), _scan_split(root / val_name)
        if list(train) != list(val):
            only_t, only_v = sorted(set(train) - set(val)), sorted(set(val) - set(train))
            raise DataError(f"class folders differ between {root / 'train'} and {root / val_name}: "
                            f"only in train: {only_t or 'none'}; only in {val_name}: {only_v or 'none'}")
    else:
        train, val = _scan_split(root), {}
    classes = tuple(train)
    if len(classes) < 2:
        where = root / "train" if layout is None or layout.kind is Layout.SPLIT else root
        raise DataError(f"{where} has {len(classes)} class folder ({classes[0]}); a classifier needs at "
                        f"least 2 (one folder per class)")
    skipped = 0
    if skip_bad_images:
        train, n_train = _readable_only(train, channels, workers)
        val, n_val = _readable_only(val, channels, workers)
        skipped = n_train + n_val
    if layout is not None and layout.kind is Layout.CLASSES:
        train, val, alone = split_class_files(train, root, val_split)
        if alone:
            warnings.warn(f"{root}: class folder(s) {', '.join(alone)} hold one image: it is kept for training, so "
                          f"the evaluation split has no image of that class; add photos to evaluate it",
                          stacklevel=3)
    digest = hashlib.sha256()
    sources = []
    for name, split in (("train", train), ("evaluation", val)):
        # a train/ + val/ folder: the file paths name the split (and the fingerprint is that of earlier versions)
        tag = "" if layout is None or layout.kind is Layout.SPLIT else f"{name}\0"
        files = [(str(p), i) for i, c in enumerate(classes) for p in split.get(c, ())]
        for path, label in files:
            digest.update(f"{tag}{os.path.relpath(path, root)}\0{os.path.getsize(path)}\0{label}\n".encode())
        sources.append(Source(np.array([lb for _, lb in files], dtype=np.int64), files=tuple(p for p, _ in files)))
    return sources[0], sources[1], classes, digest.hexdigest(), skipped, layout


def _no_photos(root: Path) -> str:
    with_images = [d.name for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")
                   and any(p.suffix.lower() in IMAGE_EXTS for p in d.rglob("*"))]
    if len(with_images) == 1:
        return (f"{root} has 1 class folder with images ({with_images[0]}); a classifier needs at least 2 (one "
                f"folder per class)")
    return (f"{root} holds no class folders of images ({'/'.join(IMAGE_EXTS)}): expected DIR/<class>/*.jpg, or "
            f"DIR/train/<class>/ with DIR/val/<class>/")


def _readable_only(by_class: dict[str, list[Path]], channels: int, workers: int) -> tuple[dict[str, list[Path]], int]:
    """The files that decode (--skip-bad-images), and how many did not."""
    files = [p for c in by_class for p in by_class[c]]
    with ThreadPoolExecutor(max(1, workers)) as ex:
        ok = dict(zip(files, ex.map(lambda p: _readable(str(p), channels), files)))
    return {c: [p for p in ps if ok[p]] for c, ps in by_class.items()}, list(ok.values()).count(False)


def build_cache(files: tuple[str, ...], *, channels: int, side: int, size: int, workers: int) -> torch.Tensor:
    """Decode every file once to a uint8 [N, C, side, side] array: shorter side resized to `side`, then a
    side x side window placed so that its central size x size crop is exactly the uncached eval crop."""
    def one(path: str) -> torch.Tensor:
        img = T.resize_shorter(decode_image(path, channels, draft=side), side)
        _, h, w = img.shape
        top = (h - size) // 2 - (side - size) // 2
        left = (w - size) // 2 - (side - size) // 2
        return img[:, top:top + side, left:left + side]

    out = torch.empty((len(files), channels, side, side), dtype=torch.uint8)
    with ThreadPoolExecutor(max(1, workers)) as ex:
        for i, img in enumerate(ex.map(one, files)):
            out[i] = img
    return out


# ---------------------------------------------------------------- the torch Dataset
@dataclass(frozen=True)
class TransformSpec:
    size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train: bool = False
    augment: tuple[str, ...] = ()
    pad: int = 4
    resize_size: int | None = None      # files: eval resize of the shorter side
    seed: int = 0


class ImageDataset(torch.utils.data.Dataset):
    """(normalized float32 C x H x W, label) from a Source; augmentation seeded by (seed, epoch, index)."""

    def __init__(self, source: Source, spec: TransformSpec, *, cache: torch.Tensor | None = None):
        self.source, self.spec, self.cache, self.epoch = source, spec, cache, 0
        self._mean = torch.tensor(spec.mean, dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.tensor(spec.std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.source)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def labels(self) -> np.ndarray:
        return self.source.labels

    def raw(self, index: int) -> torch.Tensor:
        if self.cache is not None:
            return self.cache[index]
        if self.source.array is not None:
            return self.source.array[index]
        return decode_image(self.source.files[index], self.spec.channels,
                            draft=self.spec.resize_size or self.spec.size)

    def __getitem__(self, index: int):
        threads = torch.get_num_threads()
        if threads == 1:
            return self._item(index)
        torch.set_num_threads(1)   # per-image ops are tiny: intra-op threads only add overhead (main process)
        try:
            return self._item(index)
        finally:
            torch.set_num_threads(threads)

    def _item(self, index: int):
        return self.transform(self.raw(index), index, self._mean, self._std), int(self.source.labels[index])

    def transform(self, img: torch.Tensor, index: int, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """uint8 C x H x W (as `raw` gives it, on any device) -> the normalized sample `index` at this epoch: the
        one transform of the CPU loaders and the GPU path (edgeres.data.gpu)."""
        s = self.spec
        img = T.match_channels(img, s.channels)
        if s.train and s.augment:
            rng = T.sample_rng(s.seed, self.epoch, index)
            if "random_resized_crop" in s.augment:
                img = T.random_resized_crop(img, s.size, rng)
            else:
                img = self._eval_geometry(img)
                if "pad_crop" in s.augment:
                    img = T.pad_random_crop(img, s.size, s.pad, rng)
            if "flip" in s.augment:
                img = T.hflip(img, rng)
        else:
            img = self._eval_geometry(img)
        return T.normalize(img, mean, std)

    def _eval_geometry(self, img: torch.Tensor) -> torch.Tensor:
        s = self.spec
        if self.source.files:   # decoded files (or their cache, already at resize_size): resize + center crop
            return T.resize_center_crop(img, s.resize_size or s.size, s.size)
        return T.center_fit(img, s.size, s.size)
