"""Verify an exported ONNX model on ONNX Runtime (CPU) against its torch parent on a probe batch.

FP32 ONNX vs the torch FP32 (folded) model: max|diff| <= 1e-4 relative to the logit scale, top-1 agreement 100 %.
INT8 ONNX vs the fake-quant NNCF torch model: top-1 agreement >= 99 %; max|diff| is reported.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

FP32_REL_TOL = 1e-4
FP32_MIN_AGREEMENT = 1.0
INT8_MIN_AGREEMENT = 0.99


def ort_session(path: str | Path, threads: int | None = None):
    """A CPU ONNX Runtime runner (edgeres.runners.OrtRunner), with a clear error for a missing or non-ONNX file."""
    from edgeres.check import load_onnx
    from edgeres.runners import OrtRunner

    load_onnx(path)
    return OrtRunner(path, threads=threads)


def ort_logits(runner, x, *, batch_size: int = 64):
    """Logits of `runner` for x [N, C, H, W], in batches."""
    import numpy as np

    x = np.asarray(x, dtype=np.float32)
    return np.concatenate([runner.infer(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def is_int8_onnx(path: str | Path) -> bool:
    from edgeres.check import count_qdq

    return sum(count_qdq(path).values()) > 0


def verify_onnx(onnx_path: str | Path, reference, probe_x, *, rel_tol: float | None = None,
                min_agreement: float | None = None, threads: int | None = None) -> tuple[dict[str, Any], list]:
    """Compare ONNX Runtime's logits with the torch reference's. Returns (metrics, [Gate])."""
    from edgeres.fold import _torch_logits, compare_logits
    from edgeres.records import Gate

    int8 = is_int8_onnx(onnx_path)
    session = ort_session(onnx_path, threads=threads)
    metrics = compare_logits(_torch_logits(reference, probe_x), ort_logits(session, probe_x))
    metrics["precision"] = "int8" if int8 else "fp32"
    prefix = "onnx_int8" if int8 else "onnx_fp32"
    if int8:
        gates = [Gate(f"{prefix}_top1_agreement", metrics["top1_agreement"],
                      INT8_MIN_AGREEMENT if min_agreement is None else min_agreement, ">=")]
    else:
        gates = [Gate(f"{prefix}_max_abs_diff_rel", metrics["rel_diff"], FP32_REL_TOL if rel_tol is None else rel_tol),
                 Gate(f"{prefix}_top1_agreement", metrics["top1_agreement"],
                      FP32_MIN_AGREEMENT if min_agreement is None else min_agreement, ">=")]
    return metrics, gates
