"""How two models' outputs are compared, and the tolerances the stages hold them to: one low module that the fold,
export, quantize, CPU and verify stages all import (it imports nothing of edgeres's).

These are numerical-equivalence checks (the same function, computed another way), decided exactly on logits: a
flip of the top-1 where the reference's top-2 margin lies within the numeric tolerance is a near tie and never
decides a gate; the raw flip count is kept in the record.
FP32 ONNX vs the torch FP32 (folded) model: max|diff| <= 1e-4 relative to the logit scale, no decisive flip.
INT8 ONNX vs the fake-quant NNCF torch model: numeric noise (99th percentile of the per-image max|diff|) <= 5 % of the
logit scale (gates.int8_rel_tol), decisive agreement >= 99 % (gates.min_int8_agreement; a flip within twice the 90th
percentile of the per-image max|diff| is a near tie); max|diff| is reported.
"""
from __future__ import annotations

FP32_REL_TOL = 1e-4          # max|diff| / logit scale: fold (folded vs unfolded) and FP32 export (ONNX vs torch)
FP32_MIN_AGREEMENT = 100.0   # % top-1 agreement of an FP32 ONNX with its torch model
INT8_MIN_AGREEMENT = 99.0    # % top-1 agreement of an INT8 Q/DQ ONNX with its fake-quant model


NEAR_TIE_QUANTILE = 90   # INT8: a flip is a near tie when the top-2 margin is within twice this percentile of the
                         # per-image max|diff| (the numeric noise most images show), so a 99 % gate still bites


def compare_logits(ref, other, *, near_tie_rel: float | None = None,
                   near_tie_quantile: float | None = None) -> dict[str, float]:
    """How closely `other` computes what `ref` computes, on the same [N, C] inputs: max|diff|, logit scale (max|ref|),
    their ratio, the numeric noise (99th percentile of the per-image max|diff|, and relative to the scale), top-1
    agreement (%) and the flips (images whose top-1 differs). With a near-tie band - `near_tie_rel` (a fraction of
    the logit scale: a tolerance) or `near_tie_quantile` (a percentile of the per-image max|diff|: the measured
    noise) - a flip where the reference's top-2 margin is within twice the band is a near tie (a numeric
    difference that small can flip it); the others are decisive flips, which `decisive_agreement_pct` counts."""
    import numpy as np

    ref, other = np.asarray(ref, dtype=np.float64), np.asarray(other, dtype=np.float64)
    n = int(ref.shape[0]) if ref.ndim else 0
    if not ref.size:
        return {"max_abs_diff": 0.0, "logit_scale": 0.0, "rel_diff": 0.0, "noise_p99": 0.0, "noise_rel": 0.0,
                "top1_agreement_pct": 100.0, "flips": 0, "near_tie_flips": 0, "decisive_flips": 0,
                "decisive_agreement_pct": 100.0, "n_probe": n}
    per_image = np.abs(ref - other).reshape(n, -1).max(1)
    max_abs, scale = float(per_image.max()), float(np.max(np.abs(ref)))
    noise = float(np.percentile(per_image, 99))
    flipped = ref.argmax(1) != other.argmax(1)
    out = {"max_abs_diff": max_abs, "logit_scale": scale, "rel_diff": max_abs / max(scale, 1e-12),
           "noise_p99": noise, "noise_rel": noise / max(scale, 1e-12),
           "top1_agreement_pct": 100.0 * float(np.mean(~flipped)), "flips": int(flipped.sum()), "n_probe": n}
    if near_tie_rel is not None or near_tie_quantile is not None:
        band = near_tie_rel * scale if near_tie_rel is not None else float(np.percentile(per_image, near_tie_quantile))
        top2 = np.sort(ref, axis=1)[:, -2:] if ref.shape[1] > 1 else np.concatenate([ref, ref], 1)
        margin = top2[:, 1] - top2[:, 0]
        near = flipped & (margin <= 2.0 * band)
        decisive = int((flipped & ~near).sum())
        out.update(near_tie_flips=int(near.sum()), decisive_flips=decisive, near_tie_band=band,
                   decisive_agreement_pct=100.0 * (1.0 - decisive / n))
    return out


def agreement_pct(a, b) -> float:
    """Top-1 agreement (%) of two [N, C] logit arrays."""
    import numpy as np

    a, b = np.asarray(a), np.asarray(b)
    return 100.0 * float(np.mean(a.argmax(1) == b.argmax(1))) if len(a) else 100.0
