"""What a `--data-dir` holds: which dataset (`--data-dir` without `--dataset` is never ignored) and, for photos,
which layout. `datasets.load_imagefolder` reads a folder the way `find_layout` describes it, so the note a command
prints is what the loader does.

Photos may come as
- DIR/train/<class>/* with DIR/val/<class>/* (or test/): the folder's own split;
- DIR/<class>/* alone: each class is split here (`split_class_files`): data.val_split of its images, chosen by a hash
  of their file names, are the evaluation split - the same images on every rebuild, whatever order the folder lists;
- a folder holding exactly one of those (DIR/photos/<class>/*, DIR/imagenette/train+val): that one, named in the note.

The splits, named once (SPLITS): `train` (trains), `holdout` (data.holdout of train: selects epochs) and
`evaluation` (what the gates and the report read; DataBundle.test).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from edgeres.errors import ConfigError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff", ".gif")
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".7z", ".rar")
SPLITS = {"train": "the images the model trains on",
          "holdout": "data.holdout of the training images: selects best.pt and QAT's epoch",
          "evaluation": "what the gates and the report read (DataBundle.test)"}
# MNIST's files; the official checksums (md5 of the DECOMPRESSED idx files; the .gz files vary with the compressor)
MNIST_FILES = {
    "train_images": ("train-images-idx3-ubyte", "6bbc9ace898e44ae57da46a324031adb", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
    "train_labels": ("train-labels-idx1-ubyte", "a25bea736e30d166cdddb491f175f624", "d53e105ee54ea40749a09fcbcd1e9432"),
    "test_images": ("t10k-images-idx3-ubyte", "2646ac647ad5339dbf082846283269ea", "9fb629c4189551a2d022fa330f9573f3"),
    "test_labels": ("t10k-labels-idx1-ubyte", "27ae3e4e09519cfbb04c329615203637", "ec29112dd5afa0611ce80d1b7f02629c"),
}
SPLIT_SEED = 0        # the evaluation split's draw: fixed, so runs with any train.seed (and `edgeres eval`) share it
MAX_DEPTH = 3         # sub-folders followed down to the one dataset a folder holds (photos/ in a downloaded archive)
NOT_DATA = ("__MACOSX",)   # what macOS's zip adds beside the folder


class Layout(Enum):
    SPLIT = "train/val"            # DIR/train/<class>/ + DIR/val|test/<class>/
    CLASSES = "class folders"      # DIR/<class>/: split here


@dataclass(frozen=True)
class FolderLayout:
    kind: Layout
    root: Path                     # the dataset's folder: --data-dir itself or the one sub-folder it holds
    eval_name: str | None          # SPLIT: "val" or "test"
    taken: str | None              # the sub-folder of --data-dir that was taken ("photos", "a/b"), None: itself
    classes: int                   # class folders

    def describe(self) -> str:
        """What was found, for the one-line note."""
        if self.kind is Layout.SPLIT:
            what = f"train/ and {self.eval_name}/ with {self.classes} class folders"
        else:
            what = (f"{self.classes} class folders and no train/val split: data.val_split of each class (20 % unless "
                    f"set) is set aside for evaluation, the same images on every run")
        return f"it holds {what}" if self.taken is None else f"its sub-folder {self.taken}/ holds {what}"


def archive_hint(path: str | Path) -> str | None:
    """"unpack it first" for an archive (zip, tar, tar.gz, ...), None for anything else."""
    name = Path(path).name.lower()
    if not name.endswith(ARCHIVE_SUFFIXES):
        return None
    return f"{path} is an archive: unpack it first (e.g. `unzip` or `tar -xf`) and give the folder it holds"


def not_a_folder(data_dir: str | Path, flag: str = "--data-dir") -> str | None:
    """The one line for a --data-dir that is not a folder (missing, an archive, a file), None for a folder."""
    p = Path(data_dir).expanduser()
    if p.is_dir():
        return None
    if not p.exists():
        return f"{flag} {data_dir}: folder not found"
    hint = archive_hint(data_dir)
    if hint:
        return f"{flag} {hint}"
    return (f"{flag} {data_dir} is a file, not a folder: a dataset is a folder of class folders (DIR/<class>/*.jpg); "
            f"to classify this image with a trained model, use `edgeres predict MODEL {data_dir}`")


def find_mnist(root: Path) -> dict[str, Path] | None:
    """MNIST's four idx files ([.gz]) in `root`, root/mnist or root/MNIST/raw; None when one is missing."""
    for d in (root, root / "mnist", root / "MNIST" / "raw"):
        found = {}
        for key, (name, _, _) in MNIST_FILES.items():
            for cand in (d / name, d / f"{name}.gz"):
                if cand.is_file():
                    found[key] = cand
                    break
        if len(found) == len(MNIST_FILES):
            return found
    return None


def _dirs(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in NOT_DATA)


def _has_image(d: Path) -> bool:
    return any(p.suffix.lower() in IMAGE_EXTS and p.is_file() for p in d.rglob("*"))


def _layout_here(d: Path, taken: str | None) -> FolderLayout | None:
    evals = [n for n in ("val", "test") if (d / n).is_dir()]
    if (d / "train").is_dir() and evals:
        classes = _dirs(d / "train")
        return FolderLayout(Layout.SPLIT, d, evals[0], taken, len(classes)) if classes else None
    subs = _dirs(d)
    if sum(_has_image(s) for s in subs) >= 2:
        return FolderLayout(Layout.CLASSES, d, None, taken, len(subs))
    return None


def find_layout(data_dir: str | Path) -> FolderLayout | None:
    """The photo layout of a folder (module docstring): its own, or that of the only sub-folder it holds (down to
    MAX_DEPTH levels, when the folder holds no image itself). None when it holds none of them."""
    d = Path(data_dir).expanduser()
    taken: list[str] = []
    for _ in range(MAX_DEPTH + 1):
        if not d.is_dir():
            return None
        found = _layout_here(d, "/".join(taken) or None)
        if found is not None:
            return found
        subs = _dirs(d)
        if len(subs) != 1 or any(p.suffix.lower() in IMAGE_EXTS for p in d.iterdir() if p.is_file()):
            return None
        d = subs[0]
        taken.append(d.name)
    return None


def split_class_files(by_class: dict[str, list[Path]], root: Path, fraction: float,
                      seed: int = SPLIT_SEED) -> tuple[dict[str, list[Path]], dict[str, list[Path]], list[str]]:
    """(train, evaluation, classes kept whole) of DIR/<class>/ files: each class of n >= 2 images gives
    round(n * fraction) of them (at least 1, at most n - 1) to evaluation, those first in the order of
    sha256(seed, path relative to `root`): the same split from the same file names, however the folder lists them;
    a photo added later moves no other. A class of one image cannot be in both splits: it stays in train (named in
    the third list, for a warning)."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"data.val_split must be in (0, 1), got {fraction}")
    train: dict[str, list[Path]] = {}
    evaluation: dict[str, list[Path]] = {}
    alone = []
    for c, files in by_class.items():
        n = len(files)
        k = min(n - 1, max(1, math.floor(n * fraction + 0.5))) if n >= 2 else 0
        if n < 2:
            alone.append(c)
        ranked = sorted(files, key=lambda p: (_rank(p, root, seed), p))
        evaluation[c], train[c] = sorted(ranked[:k]), sorted(ranked[k:])
    return train, evaluation, alone


def _rank(path: Path, root: Path, seed: int) -> str:
    return hashlib.sha256(f"{seed}\0{path.relative_to(root).as_posix()}".encode()).hexdigest()


def infer_dataset(data_dir: str | Path) -> tuple[str, str]:
    """(dataset name, why) for the folder: MNIST idx files, CIFAR-10 python batches, or photos in one of the layouts
    of `find_layout` (`why` says which, and which sub-folder was taken). A folder that is none of them, or a path
    that is no folder, is a ConfigError saying what was expected."""
    name, why, _ = _infer(data_dir)
    return name, why


def _infer(data_dir: str | Path) -> tuple[str, str, FolderLayout | None]:
    problem = not_a_folder(data_dir)
    if problem:
        raise ConfigError(problem)
    root = Path(data_dir).expanduser()
    if find_mnist(root) is not None:
        return "mnist", "it holds MNIST's idx files", None
    for d in (root, root / "cifar-10-batches-py"):
        if (d / "data_batch_1").is_file() and (d / "test_batch").is_file():
            return "cifar10", "it holds CIFAR-10's python batches", None
    layout = find_layout(root)
    if layout is not None:
        return "imagefolder", layout.describe(), layout
    raise ConfigError(f"--data-dir {data_dir}: cannot tell which dataset it holds (expected class folders "
                      f"<class>/*.jpg, or train/<class>/* with val/<class>/*, MNIST's idx files, or "
                      f"cifar-10-batches-py/); pass --dataset")


def dataset_for(data_dir: str | None, dataset: str | None, recipe_dataset: str) -> tuple[str | None, str | None]:
    """The --dataset to use and a one-line note: a --data-dir given without --dataset decides the dataset (the
    recipe's own when the folder is one of those; refused when it is none and the recipe's needs no folder). Photos
    in another layout than train/ + val/ get a note even when the recipe's dataset is imagefolder already."""
    if not data_dir or dataset:
        return dataset, None
    try:
        name, why, layout = _infer(data_dir)
    except ConfigError:
        if recipe_dataset == "digits":   # the embedded default takes no folder: --data-dir would be ignored
            raise
        return None, None                # the recipe's dataset loader says what is wrong with the folder
    if name == recipe_dataset:
        plain = layout is None or (layout.kind is Layout.SPLIT and layout.taken is None)
        return None, None if plain else f"data: --data-dir {data_dir}: {why}"
    return name, f"data: --data-dir {data_dir} is taken as --dataset {name} ({why})"
