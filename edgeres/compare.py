"""Two artifacts on the same inputs: how far apart are their logits, and do they pick the same class?"""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from edgeres.data import get_data
from edgeres.errors import ArtifactError, ConfigError, DataError
from edgeres.io import require_regular_file
from edgeres.memory import check_artifact

# split name -> DataBundle field: "train" is the train images with the eval transform (no augmentation)
SPLITS = {"test": "test", "train": "calib"}


def _describe(runner: Any) -> dict[str, Any]:
    return {"artifact": str(getattr(runner, "path", "") or ""), "backend": runner.name,
            "device": str(runner.device), "precision": str(getattr(runner, "precision", "unknown"))}


def _logits(runner: Any, inputs: np.ndarray, batch_size: int) -> np.ndarray:
    fixed = getattr(runner, "batch_dim", None)
    step = fixed or batch_size
    outs = []
    for i in range(0, len(inputs), step):
        chunk = inputs[i:i + step]
        if fixed and len(chunk) < fixed:  # a fixed-batch model: pad the last chunk, drop the padding after
            pad = np.zeros((fixed - len(chunk), *chunk.shape[1:]), dtype=chunk.dtype)
            outs.append(runner.infer(np.concatenate([chunk, pad]))[:len(chunk)])
        else:
            outs.append(runner.infer(chunk))
    return np.concatenate(outs).astype(np.float32)


def compare(a: Any, b: Any, inputs: np.ndarray, labels: np.ndarray | None = None, *, batch_size: int = 64,
            threads: int | None = None) -> dict[str, Any]:
    """max/mean |diff|, cosine similarity (mean and min over samples), top-1 agreement and accuracies.

    `a` and `b` are runners or artifact paths (opened and closed here).
    """
    from edgeres.runners import input_shape, open_runner

    inputs = np.ascontiguousarray(inputs, dtype=np.float32)
    if inputs.ndim != 4 or len(inputs) == 0:
        raise DataError(f"inputs must be a non-empty NCHW array, got shape {tuple(inputs.shape)}")
    if labels is not None:
        labels = np.asarray(labels).astype(np.int64).reshape(-1)
        if len(labels) != len(inputs):
            raise DataError(f"{len(labels)} labels for {len(inputs)} inputs")
        _check_labels(labels, None)
    opened = []
    try:
        runners = []
        for item in (a, b):
            if isinstance(item, (str, Path)):
                check_artifact(item, batch=min(batch_size, len(inputs)))   # before the model is built
                item = open_runner(item, threads=threads)
                opened.append(item)
            runners.append(item)
        shapes = []
        for r in runners:
            try:
                shapes.append(input_shape(r))
            except ArtifactError:
                shapes.append(None)
        if shapes[0] and shapes[1] and shapes[0] != shapes[1]:
            raise ArtifactError(f"the artifacts expect different inputs: A {list(shapes[0])}, B {list(shapes[1])}")
        want = shapes[0] or shapes[1]
        if want and tuple(inputs.shape[1:]) != tuple(want):
            raise ArtifactError(f"inputs are {list(inputs.shape[1:])} but the artifacts expect {list(want)}")
        la, lb = (_logits(r, inputs, batch_size) for r in runners)
        if la.shape != lb.shape:
            raise ArtifactError(f"the artifacts give different outputs: A {list(la.shape[1:])} classes, "
                                f"B {list(lb.shape[1:])}")
        if labels is not None:
            _check_labels(labels, la.shape[1])
        diff = np.abs(la.astype(np.float64) - lb.astype(np.float64))
        na, nb = np.linalg.norm(la, axis=1), np.linalg.norm(lb, axis=1)
        cos = np.sum(la.astype(np.float64) * lb, axis=1) / np.maximum(na * nb, 1e-12)
        pa, pb = la.argmax(1), lb.argmax(1)
        result: dict[str, Any] = {
            "a": _describe(runners[0]), "b": _describe(runners[1]), "samples": int(len(inputs)),
            "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
            "top1_agreement_pct": float((pa == pb).mean() * 100.0), "disagreements": int((pa != pb).sum()),
        }
        if labels is not None:
            result["a"]["accuracy_pct"] = float((pa == labels).mean() * 100.0)
            result["b"]["accuracy_pct"] = float((pb == labels).mean() * 100.0)
        return result
    finally:
        for r in opened:
            r.close()


def _check_labels(labels: np.ndarray, classes: int | None) -> None:
    """Labels are class indices in [0, classes): anything else would be scored as a miss, silently."""
    bad = labels[(labels < 0) | (labels >= classes if classes is not None else False)]
    if bad.size:
        span = f"[0, {classes})" if classes is not None else "[0, classes)"
        raise DataError(f"label {int(bad[0])} lies outside {span}: labels are class indices of the models "
                        f"({bad.size} of {labels.size} outside)")


MAX_PROBE_BYTES = 1 << 30   # one probe array once loaded; a small .npz can declare (and inflate to) any size


def _npz_sizes(path: Path) -> dict[str, int]:
    """Bytes each array of an .npz will take once loaded, read from the .npy headers without inflating the data."""
    sizes = {}
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                continue
            with zf.open(info) as f:
                version = np.lib.format.read_magic(f)
                shape, _, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0(f))
            sizes[info.filename[:-4]] = int(np.prod(shape, dtype=object)) * dtype.itemsize
    return sizes


def load_probe(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """A probe .npz: x float32 [N,C,H,W] (finite), optional y int labels (one per image)."""
    path = require_regular_file(path, "probe file", DataError)
    try:
        big = {k: v for k, v in _npz_sizes(path).items() if v > MAX_PROBE_BYTES}
        if big:
            name, size = next(iter(big.items()))
            raise DataError(f"{path}: array {name!r} would take {size / 2**30:.1f} GiB; a probe holds at most "
                            f"{MAX_PROBE_BYTES >> 30} GiB")
        with np.load(path, allow_pickle=False) as z:
            if "x" not in z.files:
                raise DataError(f"{path} has no 'x' array (found: {', '.join(z.files) or 'nothing'})")
            x, y = z["x"], (z["y"] if "y" in z.files else None)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{path} is not a readable .npz probe ({e})") from None
    if x.ndim != 4 or len(x) == 0 or x.dtype.kind not in "fiu":
        raise DataError(f"{path}: 'x' must be a non-empty numeric NCHW array, found {x.dtype} {list(x.shape)}")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise DataError(f"{path}: 'x' holds NaN or infinite values")
    if y is not None and (y.dtype.kind not in "iu" or y.shape != (len(x),)):
        raise DataError(f"{path}: 'y' must be one integer label per image, found {y.dtype} {list(y.shape)}")
    return x, y


def artifact_preprocessing(path: str | Path) -> dict[str, Any]:
    """mean/std/input_size/in_channels the artifact was trained with, as far as it says (ModelMeta or ONNX props)."""
    from edgeres.runners import open_runner

    runner = open_runner(path)
    try:
        meta = getattr(runner, "meta", None)
        if meta is not None and not isinstance(meta, dict):
            meta = meta.to_dict()
        meta = dict(meta or {})
        shape = getattr(runner, "input_shape", None)
        if shape and all(isinstance(s, int) for s in shape):
            meta.setdefault("in_channels", shape[0])
            meta.setdefault("input_size", shape[1])
        return meta
    finally:
        runner.close()


def load_dataset_inputs(artifact: str | Path, *, dataset: str, data_dir: str | Path | None, split: str,
                        limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and labels from a dataset, preprocessed the way the artifact expects."""
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {limit}")
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    pre = artifact_preprocessing(artifact)
    kwargs = {k: pre[k] for k in ("mean", "std", "input_size", "resize_size", "in_channels") if pre.get(k)}
    bundle = get_data(dataset=dataset, data_dir=str(data_dir) if data_dir else None, **kwargs)
    data = getattr(bundle, SPLITS[split])
    xs, ys = [], []
    for i in range(len(data)):
        if limit is not None and i >= limit:
            break
        x, y = data[i]
        xs.append(np.asarray(x, dtype=np.float32))
        ys.append(int(y))
    if not xs:
        raise DataError(f"dataset {dataset} ({split}) has no samples")
    return np.stack(xs), np.asarray(ys, dtype=np.int64)


def find_probe(artifact: str | Path) -> Path | None:
    """The run folder's probe.npz next to an artifact (its folder or its parent), when there is one."""
    here = Path(artifact).resolve().parent
    for folder in (here, here.parent):
        if (folder / "probe.npz").is_file():
            return folder / "probe.npz"
    return None


def format_compare(r: dict[str, Any]) -> str:
    lines = [f"A: {r['a']['artifact']} ({r['a']['backend']}, {r['a']['precision']})",
             f"B: {r['b']['artifact']} ({r['b']['backend']}, {r['b']['precision']})",
             f"samples          {r['samples']}",
             f"max |diff|       {r['max_abs_diff']:.6g}",
             f"mean |diff|      {r['mean_abs_diff']:.6g}",
             f"cosine (mean)    {r['cosine_mean']:.6f}   (min {r['cosine_min']:.6f})",
             f"top-1 agreement  {r['top1_agreement_pct']:.2f} %  ({r['disagreements']} differ)"]
    if "accuracy_pct" in r["a"]:
        lines.append(f"accuracy         A {r['a']['accuracy_pct']:.2f} %   B {r['b']['accuracy_pct']:.2f} %   "
                     f"(B - A {r['b']['accuracy_pct'] - r['a']['accuracy_pct']:+.2f} pp)")
    return "\n".join(lines)
