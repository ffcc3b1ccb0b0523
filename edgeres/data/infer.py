"""`--data-dir` without `--dataset`: tell which dataset a folder holds, or refuse in one line - never ignore it."""
from __future__ import annotations

from pathlib import Path

from edgeres.errors import ConfigError


def infer_dataset(data_dir: str | Path) -> tuple[str, str]:
    """(dataset name, why) for the folder: MNIST idx files, CIFAR-10 python batches, or an ImageFolder train/val
    (or train/test) layout. A folder that is none of them is a ConfigError saying what was expected."""
    from edgeres.data.datasets import _find_mnist

    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise ConfigError(f"--data-dir {data_dir}: no such folder")
    if _find_mnist(root) is not None:
        return "mnist", "it holds MNIST's idx files"
    for d in (root, root / "cifar-10-batches-py"):
        if (d / "data_batch_1").is_file() and (d / "test_batch").is_file():
            return "cifar10", "it holds CIFAR-10's python batches"
    evals = [n for n in ("val", "test") if (root / n).is_dir()]
    if (root / "train").is_dir() and evals:
        classes = [p for p in (root / "train").iterdir() if p.is_dir()]
        if classes:
            return "imagefolder", f"it holds train/ and {evals[0]}/ with {len(classes)} class folders"
    raise ConfigError(f"--data-dir {data_dir}: cannot tell which dataset it holds (expected train/<class>/* with "
                      f"val/<class>/* for photos, MNIST's idx files, or cifar-10-batches-py/); pass --dataset")


def dataset_for(data_dir: str | None, dataset: str | None, recipe_dataset: str) -> tuple[str | None, str | None]:
    """The --dataset to use and a one-line note: a --data-dir given without --dataset decides the dataset (the
    recipe's own when the folder is one of those; refused when it is none and the recipe's needs no folder)."""
    if not data_dir or dataset:
        return dataset, None
    try:
        name, why = infer_dataset(data_dir)
    except ConfigError:
        if recipe_dataset == "digits":   # the embedded default takes no folder: --data-dir would be ignored
            raise
        return None, None                # the recipe's dataset loader says what is wrong with the folder
    if name == recipe_dataset:
        return None, None
    return name, f"data: --data-dir {data_dir} is taken as --dataset {name} ({why})"
