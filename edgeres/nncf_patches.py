"""Two exact speed-ups of NNCF 3.4's PyTorch post-training quantization, applied only while edgeres calibrates.

Measured on resnet18 at 224 (benchmarks/RESULTS.md): NNCF's torch PTQ spent most of its time outside the model:
1. **Percentile statistics.** `MEAN_QUANTILE` asks, per activation and per batch, for the 0.01 % and 99.99 %
   quantiles over the whole batch tensor (up to 25.7 M values). NNCF's torch backend hands anything over 16 M
   values or with several axes to `np.quantile` in float64 (a float64 copy, then a partition). Those tail quantiles
   need only the k = n * 1e-4 largest (smallest) values: `tail_quantile` keeps the values beyond a threshold set
   from a strided sample (one pass; if fewer than k survive, row chunks instead), takes the k with `torch.topk` and
   interpolates exactly like NumPy's "linear" method, in float64. Same numbers to the bit, several times faster.
2. **Fast bias correction** feeds each layer a blob shaped like a whole statistics batch, every sample the same
   per-channel mean, filled channel by channel. One sample gives the same per-channel output mean (float rounding
   aside): the blob is built with batch 1, in one broadcast.
Both are installed by `fast_calibration()` (a context manager) and removed on exit; with another NNCF version whose
internals differ, nothing is patched and NNCF runs as it is. tests/test_quantize.py checks both against NNCF's own.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

MAX_TAIL_FRACTION = 1 / 16   # beyond this share of values a partition (NNCF's own path) is cheaper
MAX_CHUNKS = 256             # one long row is split into up to this many equal rows for topk (run in parallel)
SAMPLE = 1 << 16             # values sampled (strided) to place a threshold below the tail


def _chunks(n: int, k: int) -> int:
    """How many equal rows to split n values into: a power of two dividing n, each row >= 4k values."""
    r = 1
    while r < MAX_CHUNKS and n % (2 * r) == 0 and n // (2 * r) >= 4 * k:
        r *= 2
    return r


def _single_row_top(rows, k: int, largest: bool):
    """The k largest (smallest) of one long row, sorted: a threshold from a strided sample keeps a few times k
    candidates (one pass), topk runs on those; exact, since every value beyond the threshold is kept. When the
    sample misjudges the tail (fewer than k kept), the row is split into equal chunks for a parallel topk."""
    import torch

    flat = rows.reshape(-1)
    n = flat.numel()
    stride = max(1, n // SAMPLE)
    sample = flat[::stride]
    m = sample.numel()
    want = min(m, max(8, math.ceil(4 * k * m / n)))      # 4x the tail's share of the sample
    thr = torch.topk(sample, want, largest=largest).values[-1]
    beyond = flat > thr if largest else flat < thr
    cand = flat[beyond]
    if cand.numel() >= k:
        return torch.topk(cand, k, largest=largest, sorted=True).values.reshape(1, -1)
    if cand.numel() + int(torch.count_nonzero(flat == thr)) >= k:   # the rest: ties at the threshold (ReLU 0s)
        head = torch.sort(cand, descending=largest).values
        return torch.cat([head, thr.expand(k - cand.numel())]).reshape(1, -1)
    r = _chunks(n, k)
    if r == 1:
        return None
    cand = torch.topk(rows.reshape(r, n // r), k, dim=1, largest=largest).values.reshape(1, -1)
    return torch.topk(cand, k, dim=1, largest=largest, sorted=True).values


def _lerp(lo, hi, t: float):
    """NumPy's linear interpolation (numpy.lib._function_base_impl._lerp), in float64."""
    diff = hi - lo
    return hi - diff * (1.0 - t) if t >= 0.5 else lo + diff * t


def _tail_position(v: float, n: int) -> tuple[bool, int, int, float, int]:
    """Quantile v of n sorted values, NumPy's linear method: (from the top?, lower index, upper index, weight,
    how many values topk must return to reach both indices)."""
    pos = v * (n - 1)
    lo_i = math.floor(pos)
    hi_i = min(lo_i + 1, n - 1)
    largest = v >= 0.5
    return largest, lo_i, hi_i, pos - lo_i, (n - lo_i if largest else hi_i + 1)


def tail_quantile(a, q, axis=None, keepdims: bool = False):
    """`np.quantile(a.astype(float64), q, axis, keepdims=keepdims)` for a torch tensor, computed with topk; None
    when the quantiles are not in the tails (then the caller falls back)."""
    import torch

    qs = [float(v) for v in (q if isinstance(q, (list, tuple)) else [q])]
    nd = a.ndim
    axes = tuple(range(nd)) if axis is None else \
        tuple(sorted({int(x) % nd for x in ((axis,) if isinstance(axis, int) else axis)}))
    keep = [d for d in range(nd) if d not in axes]
    n = math.prod(a.shape[d] for d in axes) if axes else 1
    if n == 0 or any(not 0.0 <= v <= 1.0 for v in qs):
        return None
    positions = [_tail_position(v, n) for v in qs]
    if max(p[-1] for p in positions) > max(2, n * MAX_TAIL_FRACTION):
        return None
    x = a.detach()
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    if not keep:   # one row of every value: their order does not matter, so take them in memory order (no copy)
        nhwc = x.ndim == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        rows = (x.permute(0, 2, 3, 1) if nhwc else x).reshape(1, n)
    else:
        rows = x.permute(*keep, *axes).reshape(-1, n)            # [M, n]
    outs = []
    for largest, lo_i, hi_i, t, k in positions:
        top = _single_row_top(rows, k, largest) if rows.shape[0] == 1 else None
        if top is None:
            top = torch.topk(rows, k, dim=1, largest=largest, sorted=True).values
        if largest:               # top[:, j] is the value at sorted position n - 1 - j
            lo, hi = top[:, n - 1 - lo_i], top[:, n - 1 - hi_i]
        else:
            lo, hi = top[:, lo_i], top[:, hi_i]
        r = _lerp(lo.double(), hi.double(), t)
        shape = [1 if d in axes else a.shape[d] for d in range(nd)] if keepdims else [a.shape[d] for d in keep]
        outs.append(r.reshape(shape))
    res = torch.stack(outs).to(a.device)
    return res if isinstance(q, (list, tuple)) else res[0]


def _batch_one_input(shape, data, input_name, channel_axis):
    """FBC's input blob: every sample the per-channel mean, so one sample (batch 1) in one broadcast."""
    import torch

    axis = range(len(shape))[channel_axis]
    shape = list(shape)
    if axis != 0:
        shape[0] = 1
    values = torch.stack([d.data.reshape(()) for d in data])
    view = [1] * len(shape)
    view[axis] = -1
    return values.reshape(view).expand(shape).contiguous()


@contextlib.contextmanager
def fast_calibration() -> Iterator[bool]:
    """Install both speed-ups for the duration (yields whether they are installed)."""
    import torch

    try:
        from nncf.quantization.algorithms.fast_bias_correction.torch_backend import PTFastBiasCorrectionAlgoBackend
        from nncf.tensor.functions import numeric
        registry: dict[Any, Any] = numeric.quantile.registry
        original = registry[torch.Tensor]
        original_fbc = PTFastBiasCorrectionAlgoBackend.__dict__["create_input_data"]
    except (ImportError, AttributeError, KeyError):   # another NNCF: run it as it is
        yield False
        return

    def quantile(a: torch.Tensor, q, axis=None, keepdims: bool = False) -> torch.Tensor:
        fast = tail_quantile(a, q, axis, keepdims)
        return fast if fast is not None else original(a, q, axis, keepdims)

    registry[torch.Tensor] = quantile
    PTFastBiasCorrectionAlgoBackend.create_input_data = staticmethod(_batch_one_input)
    try:
        yield True
    finally:
        registry[torch.Tensor] = original
        PTFastBiasCorrectionAlgoBackend.create_input_data = original_fbc
