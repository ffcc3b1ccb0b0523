"""TensorRT calibration caches for implicit INT8 (TensorRT 8.x / 10.x, DLA), computed with ONNX Runtime.

The EntropyCalibration2 text format: a header `TRT-<version number>-EntropyCalibration2`, then one line per
tensor `name: <scale>` where <scale> is the float32 bit pattern as 8 big-endian hex digits and
scale = amax / 127. Tensor names are the FP32 ONNX's own, which the TensorRT ONNX parser keeps, so the
FP32 ONNX + this cache builds an INT8 engine on an old JetPack or DLA without calibrating on the device.
"""
from __future__ import annotations

import math
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeres.check import load_onnx
from edgeres.errors import ArtifactError, ConfigError, DataError
from edgeres.io import atomic_write_text, read_small_bytes, refuse_overwrite
from edgeres.records import StageRecord, StageResult
from edgeres.settings import read, setting
from edgeres.tensorrt.versions import calib_version_tag

METHODS = ("minmax",)
DEFAULT_TAG = calib_version_tag("8.6.1")   # the header a build writes; the device runtime re-tags it for its own
_SKIP_OPS = {"Constant", "Shape", "ConstantOfShape", "Size"}


def _expose_all_tensors(model) -> list[str]:
    """Add every float intermediate tensor as a graph output; return the names that will be read."""
    import onnx

    const = {i.name for i in model.graph.initializer}   # weights and anything computed only from them
    have = {o.name for o in model.graph.output}
    names: list[str] = [i.name for i in model.graph.input if i.name not in const]
    for node in model.graph.node:
        if node.op_type in _SKIP_OPS or all(i in const for i in node.input if i):
            const.update(node.output)
            continue
        for out in node.output:
            if out:
                names.append(out)
                if out not in have:
                    model.graph.output.append(onnx.ValueInfoProto(name=out))
                    have.add(out)
    return list(dict.fromkeys(names))


def activation_ranges(fp32_onnx: str | Path, calib_batches: Iterable[Any], *, method: str = "minmax",
                      threads: int | None = 1) -> dict[str, float]:
    """amax (max |x|) of every float tensor of the FP32 ONNX over the calibration batches, via ONNX Runtime."""
    import numpy as np
    import onnxruntime as ort

    if method not in METHODS:
        raise ConfigError(f"unknown calibration method {method!r}; choose one of {', '.join(METHODS)}")

    fp32_onnx = Path(fp32_onnx)
    model = load_onnx(fp32_onnx)
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node):
        raise ConfigError(f"{fp32_onnx} already has Q/DQ nodes; a calibration cache is computed from the FP32 ONNX")
    names = _expose_all_tensors(model)
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor as named
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    fixed_batch = session.get_inputs()[0].shape[0]
    outputs = [o.name for o in session.get_outputs()]
    amax: dict[str, float] = {}
    seen = 0
    for batch in calib_batches:
        x = np.ascontiguousarray(batch, dtype=np.float32)
        chunks = [x[i:i + 1] for i in range(len(x))] if isinstance(fixed_batch, int) and fixed_batch == 1 else [x]
        for chunk in chunks:
            values = session.run(outputs, {input_name: chunk})
            amax[input_name] = max(amax.get(input_name, 0.0), float(np.max(np.abs(chunk))))
            for name, v in zip(outputs, values):
                if name in names and isinstance(v, np.ndarray) and v.dtype.kind == "f" and v.size:
                    amax[name] = max(amax.get(name, 0.0), float(np.max(np.abs(v))))
        seen += len(x)
    if seen == 0:
        raise DataError("no calibration images: the calibration batches were empty")
    return {n: amax[n] for n in names if n in amax}


def scale_hex(scale: float) -> str:
    """float32 bits, big-endian, 8 lowercase hex digits (1.0 -> 3f800000)."""
    return struct.pack(">f", scale).hex()


def scale_of(amax: float) -> float:
    """scale = amax / 127 rounded to float32 (what TensorRT stores)."""
    import numpy as np

    return float(np.float32(amax) / np.float32(127.0))


def write_calibration_cache(ranges: dict[str, float], path: str | Path, *, version_tag: str = DEFAULT_TAG,
                            force: bool = False) -> dict[str, Any]:
    """Write the cache; tensors with amax 0 (never active) are left out (TensorRT keeps them in higher
    precision). Returns {"path", "tag", "tensors", "skipped"}."""
    if not version_tag.startswith("TRT-") or not version_tag.endswith("Calibration2"):
        raise ConfigError(f"calibration cache tag {version_tag!r} should look like TRT-8601-EntropyCalibration2")
    refuse_overwrite(path, force)
    lines = [version_tag]
    skipped = []
    for name, amax in ranges.items():
        if not amax > 0:
            skipped.append(name)
            continue
        if ":" in name or "\n" in name:
            raise ConfigError(f"tensor name {name!r} cannot be written to a calibration cache")
        lines.append(f"{name}: {scale_hex(scale_of(amax))}")
    atomic_write_text(path, "\n".join(lines) + "\n")
    return {"path": str(path), "tag": version_tag, "tensors": len(lines) - 1, "skipped": skipped}


HEADER = re.compile(r"TRT-\d+-EntropyCalibration2")   # what TensorRT's IInt8EntropyCalibrator2 reads back


def read_calibration_cache(path: str | Path) -> tuple[str, dict[str, float]]:
    """(header tag, {tensor name: scale}) of a TensorRT calibration cache: a TRT-<version>-EntropyCalibration2 header,
    then `name: <8 hex digits>` lines of finite positive scales. Anything else (random bytes, another file) is one
    ArtifactError, before TensorRT or trtexec is handed it."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"calibration cache {path} does not exist")
    data = read_small_bytes(path, "calibration cache", error=ArtifactError)
    try:
        lines = data.decode("ascii").splitlines()
    except UnicodeDecodeError:
        lines = []
    if not lines or not HEADER.fullmatch(lines[0].strip()):
        raise ArtifactError(f"{path} is not a TensorRT calibration cache (no TRT-... header: expected "
                            f"TRT-<version>-EntropyCalibration2, then `name: <8 hex digits>` lines)")
    scales: dict[str, float] = {}
    for n, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        name, sep, hexval = line.rpartition(": ")
        if not sep or not name or len(hexval.strip()) != 8:
            raise ArtifactError(f"{path} line {n} is not `name: <8 hex digits>`: {line[:80]!r}")
        try:
            scale = struct.unpack(">f", bytes.fromhex(hexval.strip()))[0]
        except ValueError:
            raise ArtifactError(f"{path} line {n} has a bad hex scale: {line[:80]!r}") from None
        if not (math.isfinite(scale) and scale > 0):
            raise ArtifactError(f"{path} line {n}: the scale of {name} is {scale}, not a finite positive number")
        scales[name] = scale
    return lines[0].strip(), scales


def npz_batches(path: str | Path, *, batch_size: int = 32, limit: int | None = None,
                default_limit: int | None = None):
    """Calibration batches from an .npz with images under key "x" (float32 NCHW, preprocessed): `limit` images
    (more than the file holds is an error), else up to `default_limit`."""
    from edgeres.compare import load_probe

    x, _ = load_probe(path)
    if x.ndim != 4:
        raise DataError(f"{path}: 'x' should be [N, C, H, W], got shape {x.shape}")
    if limit is not None:
        if limit > len(x):
            raise ConfigError(f"asked for {limit} calibration images; {path} holds {len(x)}")
        x = x[:limit]
    elif default_limit is not None:
        x = x[:default_limit]
    return [x[i:i + batch_size] for i in range(0, len(x), batch_size)]


# ---------------------------------------------------------------------------------------------------- the stage

@dataclass(frozen=True)
class CalibCacheInputs:
    fp32_onnx: Path
    batches: Any               # float32 [n, C, H, W] batches: PTQ's calibration images
    out: Path
    indices: list[int] | None = None   # which images of the calibration split, recorded when known


@dataclass(frozen=True)
class CalibCacheSettings:
    version_tag: str = DEFAULT_TAG     # the header names the TensorRT that reads it (re-tagged on the device)
    force: bool = True
    count: int = setting("quant.calib_size", flag="--count",
                         help="Calibration images (all of them when there are fewer), the ones PTQ calibrates on.")
    seed: int = setting("train.seed", help="Seed of the calibration draw (the same images `quantize --ptq` and "
                                           "`build` calibrate on for the same count and seed).")

    @classmethod
    def from_recipe(cls, recipe, *, calib_available: int | None = None, **given) -> CalibCacheSettings:
        return read(cls, recipe, count=recipe.calib_count(calib_available), **given)


@dataclass(frozen=True)
class CalibCacheOutput:
    path: Path
    tensors: int


def run(inputs: CalibCacheInputs, settings: CalibCacheSettings = CalibCacheSettings(), *, quiet: bool = True):
    """The calibration-cache stage (implicit INT8 on TensorRT 8.x / DLA). -> StageResult[CalibCacheOutput]"""

    batches = list(inputs.batches)
    ranges = activation_ranges(inputs.fp32_onnx, batches)
    info = write_calibration_cache(ranges, inputs.out, version_tag=settings.version_tag, force=settings.force)
    rec = StageRecord(stage="calib_cache", metrics={"tensors": len(ranges), "images": sum(len(b) for b in batches),
                                                    "tag": info["tag"], "skipped": info["skipped"]})
    rec.set_artifact(inputs.out)
    return StageResult(rec, CalibCacheOutput(Path(inputs.out), len(ranges)))
