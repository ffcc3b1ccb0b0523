"""`edgeres predict`: top-k classes for images, with any artifact (.pt, .onnx, .plan) and the model's own
preprocessing (from its checkpoint metadata or the ONNX's edgeres.meta), so a prediction here matches what the
pipeline measured."""
from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeres.data.infer import IMAGE_EXTS, archive_hint
from edgeres.errors import ConfigError, DataError

# the models of a run folder (edgeres build), in the order `predict RUNDIR` suggests them (INT8 ONNX runs on a CPU)
RUN_MODELS = ("export/model_int8.onnx", "export/model_fp32.onnx", "quant/qat.pt", "train/best.pt", "engine/model.plan")
MODEL_SUFFIXES = (".onnx", ".pt", ".pth", ".plan", ".engine", ".xml")


@dataclass(frozen=True)
class Prediction:
    file: str
    top: list[dict[str, Any]]     # [{"rank", "index", "class", "score"}], score = softmax probability

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "top": self.top}


def find_images(inputs: list[str]) -> list[str]:
    """Files as given, folders searched recursively, glob patterns expanded; sorted, de-duplicated. An archive is
    refused ("unpack it first"): its images are not files yet."""
    found: list[str] = []
    for item in inputs:
        paths = [Path(p) for p in sorted(glob.glob(item, recursive=True))] if glob.has_magic(item) else [Path(item)]
        if not paths:
            raise DataError(f"no file matches {item!r}")
        for p in paths:
            if p.is_dir():
                found += sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTS)
            elif p.is_file() and archive_hint(p):
                raise DataError(archive_hint(p))
            elif p.is_file():
                found.append(str(p))
            else:
                raise DataError(f"image not found: {p}")
    found = list(dict.fromkeys(found))
    if not found:
        raise DataError(f"no images ({'/'.join(IMAGE_EXTS)}) in {', '.join(inputs)}")
    return found


def model_file(artifact: str | Path) -> Path:
    """The model file `artifact` names. A folder is refused with the file to give instead (a run folder's INT8 ONNX,
    or the models found in it), an archive with "unpack it first"."""
    p = Path(artifact)
    if p.is_dir():
        found = [p / rel for rel in RUN_MODELS if (p / rel).is_file()]
        found = found or sorted(f for f in p.rglob("*") if f.suffix.lower() in MODEL_SUFFIXES and f.is_file())
        if not found:
            raise ConfigError(f"{artifact} is a folder with no model in it; give a model file "
                              f"({', '.join(MODEL_SUFFIXES)})")
        also = f" (or {', '.join(str(f) for f in found[1:3])})" if len(found) > 1 else ""
        raise ConfigError(f"{artifact} is a folder; give one model file: edgeres predict {found[0]} IMAGES...{also}")
    hint = archive_hint(p)
    if hint:
        raise ConfigError(hint)
    return p


def preprocessing(meta: dict[str, Any], artifact: str | Path) -> dict[str, Any]:
    missing = [k for k in ("input_size", "in_channels", "mean", "std") if not meta.get(k)]
    if missing:
        raise ConfigError(f"{artifact} does not record its preprocessing ({', '.join(missing)} missing); predict "
                          f"needs an edgeres checkpoint or ONNX")
    return meta


def predict(artifact: str | Path, inputs: list[str], *, top_k: int = 5, batch_size: int = 16,
            threads: int | None = None, skip_bad_images: bool = False, progress: bool = False) -> list[Prediction]:
    """Top-k softmax scores for every image; unreadable images are an error unless skipped (then left out)."""
    import numpy as np
    import torch

    from edgeres.data.datasets import ImageDataset, Source, TransformSpec
    from edgeres.runners import open_runner

    if top_k < 1:
        raise ConfigError(f"--top-k must be >= 1, got {top_k}")
    artifact = model_file(artifact)
    files = find_images(inputs)
    runner = open_runner(artifact, threads=threads)
    try:
        meta = getattr(runner, "meta", None)
        meta = preprocessing(meta.to_dict() if hasattr(meta, "to_dict") else dict(meta or {}), artifact)
        spec = TransformSpec(size=int(meta["input_size"]), channels=int(meta["in_channels"]),
                             mean=tuple(meta["mean"]), std=tuple(meta["std"]), resize_size=meta.get("resize_size"))
        data = ImageDataset(Source(labels=np.zeros(len(files), np.int64), files=tuple(files)), spec)
        names = list(meta.get("class_names") or [])
        out: list[Prediction] = []
        bar = _bar(len(files), progress)
        for start in range(0, len(files), batch_size):
            xs, kept = [], []
            for i in range(start, min(start + batch_size, len(files))):
                try:
                    xs.append(np.asarray(data[i][0], dtype=np.float32))
                    kept.append(files[i])
                except DataError:
                    if not skip_bad_images:
                        raise
            if xs:
                logits = torch.from_numpy(np.asarray(runner.infer(np.stack(xs)), dtype=np.float32))
                probs = torch.softmax(logits, dim=1)
                k = min(top_k, probs.shape[1])
                scores, idx = probs.topk(k, dim=1)
                for f, sc, ix in zip(kept, scores.tolist(), idx.tolist()):
                    out.append(Prediction(f, [{"rank": r + 1, "index": int(j),
                                               "class": names[j] if j < len(names) else str(j),
                                               "score": round(float(s), 6)} for r, (s, j) in enumerate(zip(sc, ix))]))
            bar.update(min(batch_size, len(files) - start))
        bar.close()
        return out
    finally:
        runner.close()


def _bar(total: int, show: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="predict", unit="img", disable=not show or total < 2, leave=False)


def format_predictions(preds: list[Prediction]) -> str:
    return "\n".join(f"{p.file}: " + ", ".join(f"{t['class']} {100 * t['score']:.1f}%" for t in p.top)
                     for p in preds)


def predictions_csv(preds: list[Prediction]) -> str:
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["file", "rank", "index", "class", "score"])
    for p in preds:
        for t in p.top:
            w.writerow([p.file, t["rank"], t["index"], t["class"], t["score"]])
    return buf.getvalue()
