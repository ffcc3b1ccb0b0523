"""How two models' outputs are compared, and the tolerances the stages hold them to: one low module that the fold,
export, quantize, CPU and verify stages all import (it imports nothing of edgeres's).

FP32 ONNX vs the torch FP32 (folded) model: max|diff| <= 1e-4 relative to the logit scale, top-1 agreement 100 %.
INT8 ONNX vs the fake-quant NNCF torch model: top-1 agreement >= 99 %; max|diff| is reported.
"""
from __future__ import annotations

FP32_REL_TOL = 1e-4          # max|diff| / logit scale: fold (folded vs unfolded) and FP32 export (ONNX vs torch)
FP32_MIN_AGREEMENT = 100.0   # % top-1 agreement of an FP32 ONNX with its torch model
INT8_MIN_AGREEMENT = 99.0    # % top-1 agreement of an INT8 Q/DQ ONNX with its fake-quant model


def compare_logits(ref, other) -> dict[str, float]:
    """max|diff|, logit scale (max|ref|), their ratio and top-1 agreement (%) of two [N, C] arrays."""
    import numpy as np

    ref, other = np.asarray(ref, dtype=np.float64), np.asarray(other, dtype=np.float64)
    max_abs = float(np.max(np.abs(ref - other))) if ref.size else 0.0
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    agree = 100.0 * float(np.mean(ref.argmax(1) == other.argmax(1))) if ref.size else 100.0
    return {"max_abs_diff": max_abs, "logit_scale": scale, "rel_diff": max_abs / max(scale, 1e-12),
            "top1_agreement_pct": agree, "n_probe": int(ref.shape[0])}


def agreement_pct(a, b) -> float:
    """Top-1 agreement (%) of two [N, C] logit arrays."""
    import numpy as np

    a, b = np.asarray(a), np.asarray(b)
    return 100.0 * float(np.mean(a.argmax(1) == b.argmax(1))) if len(a) else 100.0
