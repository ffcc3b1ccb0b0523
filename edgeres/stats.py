"""How a gate decides: the measured value's confidence interval against the limit, one rule for every gate.

Standalone on purpose (Python's standard library only): the deploy bundle ships this file as `edgeres_stats.py`
and the device runtime decides its own gates with it, so host and device cannot drift.

A gate compares a value with a limit (`value <= limit` or `value >= limit`). Measured on N images the value is
uncertain, so it is decided from its confidence interval at a stated level (default 95 %):

- PASSED: the whole interval is within the limit;
- FAILED: the whole interval is beyond the limit;
- NOT MEASURABLE: the interval straddles the limit; `images_to_resolve` says how many images would decide it at
  the observed rates.

An exact check (numerical equivalence: a max|diff|, a count of decisive flips) has no sampling interval: its
interval is the value itself, so it is PASSED or FAILED.

Intervals:
- a proportion (top-1, agreement): Wilson's score interval;
- a paired difference of two proportions measured on the same images (a top-1 drop): Newcombe's hybrid score
  interval for paired data (Newcombe 1998, method 10), from the images only the reference gets right (b), only
  the other model gets right (c), both (a) and neither (d). It needs no normal approximation of the drop itself
  and stays inside [-100, 100] pp; with no discordant image it still has the width that N images leave.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

PASSED, FAILED, NOT_MEASURABLE = "passed", "failed", "not measurable"
OUTCOMES = (PASSED, FAILED, NOT_MEASURABLE)
DEFAULT_LEVEL = 0.95
MAX_IMAGES = 10 ** 9   # images_to_resolve gives up beyond this


def z_value(level: float) -> float:
    """The two-sided normal quantile of a confidence level in (0, 1): 0.95 -> 1.96."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence level must lie in (0, 1), got {level}")
    return NormalDist().inv_cdf(0.5 + level / 2.0)


def wilson(k: float, n: float, level: float = DEFAULT_LEVEL) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n, as fractions in [0, 1]; (0, 1) when n is 0."""
    if n <= 0:
        return 0.0, 1.0
    z = z_value(level)
    p = k / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(max(p * (1 - p) / n + z * z / (4 * n * n), 0.0)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Paired:
    """Decisions of a reference and another model on the same n images (labels known):
    a = both right, b = only the reference right, c = only the other right, d = both wrong;
    `agree` = images where their predictions are the same (both wrong can still differ)."""

    a: int
    b: int
    c: int
    d: int
    agree: int

    @property
    def n(self) -> int:
        return self.a + self.b + self.c + self.d

    @property
    def drop_pp(self) -> float:
        """Reference top-1 minus the other's, in percentage points."""
        return 100.0 * (self.b - self.c) / self.n if self.n else 0.0

    def scaled(self, factor: float) -> Paired:
        """The same rates on `factor` times as many images (for images_to_resolve)."""
        return Paired(*(x * factor for x in (self.a, self.b, self.c, self.d, self.agree)))

    def to_dict(self) -> dict[str, int]:
        return {"both_right": self.a, "only_reference_right": self.b, "only_other_right": self.c,
                "both_wrong": self.d, "same_prediction": self.agree, "n": self.n}


def paired(ref_pred, other_pred, labels) -> Paired:
    """Paired counts from three equal-length sequences of class indices."""
    a = b = c = d = agree = 0
    for r, o, y in zip(ref_pred, other_pred, labels):
        rr, oo = r == y, o == y
        a += rr and oo
        b += rr and not oo
        c += oo and not rr
        d += not rr and not oo
        agree += r == o
    return Paired(int(a), int(b), int(c), int(d), int(agree))


def paired_drop_interval(p: Paired, level: float = DEFAULT_LEVEL) -> tuple[float, float]:
    """Newcombe's method 10 interval of the drop (reference top-1 minus the other's), in pp."""
    n = p.n
    if n <= 0:
        return -100.0, 100.0
    p1, p2 = (p.a + p.b) / n, (p.a + p.c) / n
    l1, u1 = wilson(p.a + p.b, n, level)
    l2, u2 = wilson(p.a + p.c, n, level)
    den = (p.a + p.b) * (p.c + p.d) * (p.a + p.c) * (p.b + p.d)
    phi = (p.a * p.d - p.b * p.c) / math.sqrt(den) if den > 0 else 0.0
    delta = math.sqrt(max((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2, 0.0))
    eps = math.sqrt(max((u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2, 0.0))
    d = p1 - p2
    return 100.0 * max(-1.0, d - delta), 100.0 * min(1.0, d + eps)


def difference_interval(k1: float, n1: float, k2: float, n2: float,
                        level: float = DEFAULT_LEVEL) -> tuple[float, float]:
    """Newcombe's hybrid score interval (method 10, independent samples) of k1/n1 - k2/n2, in pp: for two models
    measured on different images, or where the pairing is not kept."""
    if n1 <= 0 or n2 <= 0:
        return -100.0, 100.0
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson(k1, n1, level)
    l2, u2 = wilson(k2, n2, level)
    d = p1 - p2
    lo = d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    hi = d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return 100.0 * max(-1.0, lo), 100.0 * min(1.0, hi)


def proportion_interval(k: float, n: float, level: float = DEFAULT_LEVEL) -> tuple[float, float]:
    """Wilson interval of k of n, in %."""
    lo, hi = wilson(k, n, level)
    return 100.0 * lo, 100.0 * hi


def decide(lo: float, hi: float, op: str, limit: float) -> str:
    """The one rule: PASSED when [lo, hi] lies within the limit, FAILED when it lies beyond it, else NOT
    MEASURABLE. `op` is "<=" (value must not exceed the limit) or ">=" (value must reach it)."""
    if op == "<=":
        return PASSED if hi <= limit else FAILED if lo > limit else NOT_MEASURABLE
    if op == ">=":
        return PASSED if lo >= limit else FAILED if hi < limit else NOT_MEASURABLE
    raise ValueError(f"gate op must be '<=' or '>=', got {op!r}")


def images_to_resolve(interval_at, n: int, op: str, limit: float) -> int | None:
    """How many images would decide a NOT MEASURABLE gate at the observed rates: `interval_at(factor)` gives the
    interval with every count multiplied by `factor`. None when no number does (the value sits on the limit)."""
    if decide(*interval_at(1.0), op, limit) != NOT_MEASURABLE:
        return n
    hi = 2.0
    while decide(*interval_at(hi), op, limit) == NOT_MEASURABLE:
        hi *= 2.0
        if n * hi > MAX_IMAGES:
            return None
    lo = hi / 2.0
    for _ in range(40):   # bisect the factor to within one image
        mid = (lo + hi) / 2.0
        if decide(*interval_at(mid), op, limit) == NOT_MEASURABLE:
            lo = mid
        else:
            hi = mid
        if n * (hi - lo) < 1.0:
            break
    return int(math.ceil(n * hi))


def drop_gate_numbers(p: Paired, limit: float, level: float = DEFAULT_LEVEL) -> dict:
    """Value, interval, outcome and (when not measurable) images to resolve of a paired top-1 drop gate (pp)."""
    lo, hi = paired_drop_interval(p, level)
    outcome = decide(lo, hi, "<=", limit)
    need = images_to_resolve(lambda f: paired_drop_interval(p.scaled(f), level), p.n, "<=", limit) \
        if outcome == NOT_MEASURABLE else None
    return {"value": round(p.drop_pp, 4), "lo": round(lo, 4), "hi": round(hi, 4), "outcome": outcome,
            "resolve_n": need}


def proportion_gate_numbers(k: int, n: int, op: str, limit: float, level: float = DEFAULT_LEVEL) -> dict:
    """Value, interval, outcome and images to resolve of a proportion gate (%), e.g. agreement >= 95 %."""
    lo, hi = proportion_interval(k, n, level)
    outcome = decide(lo, hi, op, limit)
    need = images_to_resolve(lambda f: proportion_interval(k * f, n * f, level), n, op, limit) \
        if outcome == NOT_MEASURABLE else None
    return {"value": round(100.0 * k / n, 4) if n else 0.0, "lo": round(lo, 4), "hi": round(hi, 4),
            "outcome": outcome, "resolve_n": need}
