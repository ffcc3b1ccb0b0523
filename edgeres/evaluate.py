"""Evaluate a torch model or any runner (`infer(np.ndarray NCHW float32) -> logits`) on a dataset."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgeres.checkpoint import load_model
from edgeres.data import get_data, make_loader
from edgeres.device import resolve
from edgeres.errors import ConfigError
from edgeres.memory import check_artifact


@dataclass
class EvalResult:
    top1: float                     # percent
    top5: float                     # percent (top-k with k = min(5, classes))
    n: int
    loss: float | None
    logits: np.ndarray = field(repr=False)      # float32 [n, classes]
    labels: np.ndarray = field(repr=False)      # int64 [n]
    per_class: list[float] = field(default_factory=list)   # top-1 % per class (nan where a class has no image)

    def to_dict(self) -> dict[str, Any]:
        return {"top1": self.top1, "top5": self.top5, "n": self.n, "loss": self.loss,
                "per_class": [None if np.isnan(v) else v for v in self.per_class]}


def metrics_from_logits(logits: np.ndarray, labels: np.ndarray, num_classes: int | None = None) -> EvalResult:
    """top-1/top-5/loss/per-class from logits; the loss is cross-entropy computed in float64."""
    logits = np.asarray(logits, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    n, c = logits.shape if logits.ndim == 2 else (0, num_classes or 0)
    if n == 0:
        return EvalResult(0.0, 0.0, 0, None, logits.reshape(0, c), labels, [])
    k = min(5, c)
    topk = np.argpartition(-logits, kth=k - 1, axis=1)[:, :k] if k < c else np.tile(np.arange(c), (n, 1))
    pred = logits.argmax(1)
    correct1 = pred == labels
    correct5 = (topk == labels[:, None]).any(1)
    z = logits.astype(np.float64)
    z = z - z.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    valid = (labels >= 0) & (labels < c)
    loss = float(-logp[np.arange(n)[valid], labels[valid]].mean()) if valid.all() else None
    classes = max(c, num_classes or 0)
    per_class = []
    for cls in range(classes):
        m = labels == cls
        per_class.append(float(100.0 * correct1[m].mean()) if m.any() else float("nan"))
    return EvalResult(top1=float(100.0 * correct1.mean()), top5=float(100.0 * correct5.mean()), n=int(n), loss=loss,
                      logits=logits, labels=labels, per_class=per_class)


def _predict_torch(model, loader, progress: bool | str) -> tuple[np.ndarray, np.ndarray]:
    import torch

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    outs, ys = [], []
    try:
        with torch.inference_mode():
            for x, y in _progress(loader, progress):
                outs.append(model(x.to(device)).float().cpu().numpy())
                ys.append(np.asarray(y))
    finally:
        model.train(was_training)
    return outs, ys


def _predict_runner(runner, loader, progress: bool | str):
    outs, ys = [], []
    for x, y in _progress(loader, progress):
        outs.append(np.asarray(runner.infer(np.ascontiguousarray(x.numpy(), dtype=np.float32)), dtype=np.float32))
        ys.append(np.asarray(y))
    return outs, ys


def _progress(it, on: bool | str):
    """A bar on stderr when `on` (a string: its label), else the iterable as it is."""
    if not on:
        return it
    from tqdm import tqdm

    return tqdm(it, desc=on if isinstance(on, str) else "eval", unit="batch", leave=False)


def evaluate(target, dataset, *, batch_size: int = 256, workers: int = 0, progress: bool | str = False,
             num_classes: int | None = None) -> EvalResult:
    """Top-1/top-5/loss of `target` (nn.Module or runner) over every sample of `dataset`, in order.
    `progress`: a bar on stderr (a string labels it)."""
    import torch

    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(target, torch.nn.Module):
        device = next((p.device for p in target.parameters()), torch.device("cpu"))
        loader = make_loader(dataset, batch_size=batch_size, shuffle=False, workers=workers, device=device)
        outs, ys = _predict_torch(target, loader, progress)
    elif hasattr(target, "infer"):
        loader = make_loader(dataset, batch_size=batch_size, shuffle=False, workers=workers)
        outs, ys = _predict_runner(target, loader, progress)
    else:
        raise ConfigError(f"cannot evaluate a {type(target).__name__}: need a torch module or a runner with infer()")
    logits = np.concatenate(outs) if outs else np.zeros((0, num_classes or 0), np.float32)
    labels = np.concatenate(ys) if ys else np.zeros((0,), np.int64)
    return metrics_from_logits(logits, labels, num_classes)


__all__ = ["EvalResult", "evaluate", "evaluate_checkpoint", "metrics_from_logits"]


def evaluate_checkpoint(weights, *, arch: str | None = None, dataset: str | None = None, data_dir: str | None = None,
                        split: str = "test", input_size: int | None = None, mean=None, std=None,
                        batch_size: int = 256, workers: int = 0, progress: bool = False,
                        device: str | None = None) -> dict[str, Any]:
    """`edgeres eval`: load a checkpoint, rebuild its preprocessing (flags override), evaluate one split."""
    dev = resolve(device)
    check_artifact(weights, batch=batch_size, input_size=input_size, device=str(dev),
                   lower="--batch-size or --input-size")   # before the model is built
    model, meta = load_model(weights, arch=arch)
    if dataset is None and data_dir is None and meta is not None:
        data_dir = meta.data_dir   # the checkpoint knows where its data was
    dataset = dataset or (meta.dataset if meta else None)
    if not dataset:
        raise ConfigError(f"{weights} does not say which dataset it was trained on; pass --dataset")
    conv = next((p for p in model.parameters() if p.ndim == 4), None)
    in_channels = meta.in_channels if meta else (int(conv.shape[1]) if conv is not None else None)
    bundle = get_data(dataset=dataset, data_dir=data_dir, in_channels=in_channels,
                      input_size=input_size or (meta.input_size if meta else None),
                      mean=mean if mean is not None else (meta.mean if meta else None),
                      std=std if std is not None else (meta.std if meta else None),
                      resize_size=meta.resize_size if meta else None, workers=workers)
    fc = getattr(model, "fc", None)
    if fc is not None and fc.out_features != bundle.info.num_classes:
        raise ConfigError(f"{weights} predicts {fc.out_features} classes but {dataset} has {bundle.info.num_classes}")
    res = evaluate(model.to(dev), bundle.test if split == "test" else bundle.calib, batch_size=batch_size,
                   workers=workers,
                   progress=progress, num_classes=bundle.info.num_classes)
    return {**res.to_dict(), "dataset": dataset, "split": split, "weights": str(weights),
            "arch": meta.arch if meta else arch, "input_size": bundle.info.input_size,
            "mean": list(bundle.info.mean), "std": list(bundle.info.std), "fingerprint": bundle.info.fingerprint,
            "device": str(dev)}
