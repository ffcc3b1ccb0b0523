"""trtexec-style timing of any runner: warm-up, then a synchronous loop timed with perf_counter_ns.

Statistics follow trtexec's performance summary: throughput (inferences/s and images/s), latency
min/mean/median/p90/p95/p99/max in ms, total host wall time, iterations; on a GPU also GPU compute and
H2D/D2H times from the runner's `infer_timed`. Percentiles are nearest-rank (always one of the samples).
"""
from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeres.env import environment
from edgeres.errors import ConfigError
from edgeres.memory import check_artifact, require

DEFAULT_DURATION_S = 3.0        # trtexec --duration default
DEFAULT_MIN_ITERATIONS = 10     # trtexec --iterations default
DEFAULT_WARMUP_S = 0.2          # trtexec --warmUp default (200 ms)
CV_WARN = 0.10                  # coefficient of variation above which numbers are called unstable
# A benchmark that would run for hours is a typo, not a measurement: the bounds say so instead of hanging.
MAX_DURATION_S = 3600.0         # per batch size
MAX_WARMUP_S = 600.0
MAX_ITERATIONS = 10_000_000


@dataclass(frozen=True)
class Stats:
    """Summary of one series of timings, in ms."""

    min: float
    mean: float
    median: float
    p90: float
    p95: float
    p99: float
    max: float
    std: float
    cv: float


@dataclass(frozen=True)
class BatchResult:
    batch: int
    iterations: int
    warmup_iterations: int
    warmup_s: float
    wall_s: float                 # host wall time of the timed loop, first start to last end
    inferences_per_s: float       # batches per second (trtexec's qps)
    images_per_s: float
    latency: Stats                # host latency per inference (H2D + compute + D2H on a GPU)
    gpu_compute: Stats | None = None
    h2d: Stats | None = None
    d2h: Stats | None = None
    warning: str | None = None
    samples_ms: tuple[float, ...] = ()

    def to_dict(self, *, samples: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not samples:
            d.pop("samples_ms")
        else:
            d["samples_ms"] = list(self.samples_ms)
        return d


@dataclass(frozen=True)
class BenchResult:
    artifact: str
    backend: str
    device: str
    precision: str
    threads: int | None
    input_shape: tuple[int, int, int]
    results: tuple[BatchResult, ...]
    environment: dict[str, Any]

    def to_dict(self, *, samples: bool = False) -> dict[str, Any]:
        return {"artifact": self.artifact, "backend": self.backend, "device": self.device,
                "precision": self.precision, "threads": self.threads, "input_shape": list(self.input_shape),
                "results": [r.to_dict(samples=samples) for r in self.results], "environment": self.environment}


def percentile(sorted_ms: np.ndarray, p: float) -> float:
    """Nearest-rank percentile of sorted samples: the smallest sample with at least p % of samples <= it."""
    n = len(sorted_ms)
    return float(sorted_ms[min(n - 1, max(0, math.ceil(p / 100.0 * n) - 1))])


def stats(samples_ms: Sequence[float]) -> Stats:
    a = np.sort(np.asarray(samples_ms, dtype=np.float64))
    if a.size == 0:
        raise ConfigError("no timing samples to summarise")
    mean = float(a.mean())
    std = float(a.std())
    return Stats(min=float(a[0]), mean=mean, median=float(np.median(a)), p90=percentile(a, 90),
                 p95=percentile(a, 95), p99=percentile(a, 99), max=float(a[-1]), std=std,
                 cv=std / mean if mean > 0 else 0.0)


def stability_warning(s: Stats, *, threshold: float = CV_WARN, iterations: int | None = None) -> str | None:
    """A line for the user when the spread of latencies makes the figures unreliable."""
    notes = []
    if s.cv > threshold:
        notes.append(f"latency CV {s.cv * 100:.1f} % > {threshold * 100:.0f} %: the numbers are unstable "
                     "(other load on the machine, throttling or too few iterations); run longer or quieter")
    if iterations is not None and iterations < DEFAULT_MIN_ITERATIONS:
        notes.append(f"only {iterations} iterations: tail percentiles are not meaningful")
    return "; ".join(notes) or None


def _limits(iterations: int | None, duration_s: float | None) -> tuple[int, float]:
    """(minimum iterations, minimum seconds). Only --iterations: exactly N; only --duration: at least S
    seconds; both: at least both (trtexec); neither: trtexec's defaults."""
    if iterations is not None and not 1 <= iterations <= MAX_ITERATIONS:
        raise ConfigError(f"--iterations must lie in [1, {MAX_ITERATIONS}], got {iterations}")
    if duration_s is not None and not (math.isfinite(duration_s) and 0 < duration_s <= MAX_DURATION_S):
        raise ConfigError(f"--duration must be a number of seconds in (0, {MAX_DURATION_S:g}], got {duration_s}")
    if iterations is None and duration_s is None:
        return DEFAULT_MIN_ITERATIONS, DEFAULT_DURATION_S
    return (iterations or 1), (duration_s or 0.0)


def _run_batch(runner: Any, x: np.ndarray, *, min_iters: int, min_s: float, warmup_s: float,
               warmup_iterations: int, timed_gpu: bool, exact: bool) -> BatchResult:
    infer = runner.infer_timed if timed_gpu else runner.infer
    sync = getattr(runner, "synchronize", None)
    # warm-up: at least warmup_iterations calls and warmup_s seconds; none of it is recorded
    n_warm = 0
    start = time.perf_counter_ns()
    while n_warm < warmup_iterations or (time.perf_counter_ns() - start) < warmup_s * 1e9:
        infer(x)
        n_warm += 1
    warm_s = (time.perf_counter_ns() - start) / 1e9
    if sync:
        sync()
    host: list[int] = []
    parts: dict[str, list[float]] = {"compute_ms": [], "h2d_ms": [], "d2h_ms": []}
    min_ns = min_s * 1e9
    t_begin = time.perf_counter_ns()
    t_end = t_begin
    while True:
        t0 = time.perf_counter_ns()
        out = infer(x)
        t_end = time.perf_counter_ns()
        host.append(t_end - t0)
        if timed_gpu:
            for key in parts:
                parts[key].append(float(out[1][key]))
        n = len(host)
        if exact and n >= min_iters:
            break
        if not exact and n >= min_iters and (t_end - t_begin) >= min_ns:
            break
    if sync:
        sync()
    samples = [h / 1e6 for h in host]
    lat = stats(samples)
    wall_s = (t_end - t_begin) / 1e9
    batch = int(x.shape[0])
    gpu = {k: stats(v) for k, v in parts.items()} if timed_gpu else {}
    return BatchResult(batch=batch, iterations=len(host), warmup_iterations=n_warm, warmup_s=warm_s, wall_s=wall_s,
                       inferences_per_s=len(host) / wall_s if wall_s > 0 else float("inf"),
                       images_per_s=len(host) * batch / wall_s if wall_s > 0 else float("inf"),
                       latency=lat, gpu_compute=gpu.get("compute_ms"), h2d=gpu.get("h2d_ms"), d2h=gpu.get("d2h_ms"),
                       warning=stability_warning(lat, iterations=len(host)), samples_ms=tuple(samples))


def _refuse_oversized(batch_sizes: Sequence[int], shape: tuple[int, ...], device: str) -> None:
    """For a model whose architecture edgeres cannot tell (a foreign ONNX, an engine): at least its input batch
    must fit, with the runner's copy of it."""
    b = max(int(b) for b in batch_sizes)
    require(2 * 4 * b * int(np.prod(shape)), f"batch {b} of {list(shape)} float32 inputs", device=device,
            lower="--batch")


def benchmark(runner_or_path: Any, *, batch_sizes: Sequence[int] = (1,), iterations: int | None = None,
              duration_s: float | None = None, warmup_s: float = DEFAULT_WARMUP_S, warmup_iterations: int = 1,
              threads: int | None = None, input_shape: tuple[int, int, int] | None = None,
              backend: str | None = None, providers: Sequence[str] | None = None, device: str = "cpu",
              seed: int = 0) -> BenchResult:
    """Time a runner (or the artifact at a path, opened and closed here) at each batch size.

    Only --iterations: exactly N timed calls; only --duration: at least S seconds; both: at least both
    (trtexec); neither: trtexec's defaults (>= 10 calls and >= 3 s). Warm-up: at least `warmup_iterations`
    calls and `warmup_s` seconds, not recorded. `device` is for .pt checkpoints (torch: cpu, cuda:0).
    """
    from edgeres.runners import input_shape as model_input_shape
    from edgeres.runners import open_runner

    if not batch_sizes or any(int(b) < 1 for b in batch_sizes):
        raise ConfigError(f"batch sizes must be positive integers, got {list(batch_sizes)}")
    if not (math.isfinite(warmup_s) and 0 <= warmup_s <= MAX_WARMUP_S) or not 0 <= warmup_iterations <= MAX_ITERATIONS:
        raise ConfigError(f"--warmup must be a number of seconds in [0, {MAX_WARMUP_S:g}], got {warmup_s}")
    if input_shape is not None and (len(input_shape) != 3 or not all(1 <= int(s) <= 16384 for s in input_shape)):
        raise ConfigError(f"--input-shape must be C,H,W with each in [1, 16384], got {list(input_shape)}")
    min_iters, min_s = _limits(iterations, duration_s)
    exact = iterations is not None and duration_s is None
    owned = isinstance(runner_or_path, (str, Path))
    known = owned and check_artifact(runner_or_path, batch=max(int(b) for b in batch_sizes),   # before it is built
                                     input_size=input_shape[1] if input_shape is not None else None,
                                     device=device, lower="--batch") is not None
    runner = (open_runner(runner_or_path, backend=backend, threads=threads, providers=providers,
                          device=device)
              if owned else runner_or_path)
    try:
        if not owned and threads is not None and getattr(runner, "threads", None) not in (None, threads):
            raise ConfigError(f"the runner was opened with {runner.threads} threads, not {threads}; "
                              "threads are fixed when a runner is opened")
        shape = tuple(input_shape) if input_shape is not None else model_input_shape(runner)
        fixed = getattr(runner, "batch_dim", None)
        if fixed is not None and any(int(b) != fixed for b in batch_sizes):
            raise ConfigError(f"{getattr(runner, 'path', 'the model')} has a fixed batch of {fixed}; "
                              f"cannot time batch sizes {list(batch_sizes)}")
        timed_gpu = str(runner.device) != "cpu" and hasattr(runner, "infer_timed")
        if not known:
            _refuse_oversized(batch_sizes, shape, device)
        rng = np.random.default_rng(seed)
        results = []
        for b in batch_sizes:
            x = rng.standard_normal((int(b), *shape), dtype=np.float32)   # allocated once, outside the timing
            results.append(_run_batch(runner, x, min_iters=min_iters, min_s=min_s, warmup_s=warmup_s,
                                      warmup_iterations=warmup_iterations, timed_gpu=timed_gpu, exact=exact))
        env = environment()
        env["runner"] = {"providers": list(getattr(runner, "providers", ()) or ()),
                         "threads": getattr(runner, "threads", None)}
        return BenchResult(artifact=str(getattr(runner, "path", "") or ""), backend=runner.name,
                           device=str(runner.device), precision=str(getattr(runner, "precision", "unknown")),
                           threads=getattr(runner, "threads", threads), input_shape=tuple(int(s) for s in shape),
                           results=tuple(results), environment=env)
    finally:
        if owned:
            runner.close()


def format_bench(result: BenchResult) -> str:
    """A table a person can read at a glance, one row per batch size, then any warnings."""
    head = (f"{result.artifact}  backend={result.backend}  device={result.device}  precision={result.precision}"
            f"  threads={result.threads if result.threads is not None else 'default'}  "
            f"input={'x'.join(str(s) for s in result.input_shape)}")
    cols = ("batch", "iters", "wall s", "inf/s", "img/s", "min", "mean", "p50", "p90", "p95", "p99", "max", "CV %")
    rows = []
    for r in result.results:
        s = r.latency
        rows.append((str(r.batch), str(r.iterations), f"{r.wall_s:.2f}", f"{r.inferences_per_s:.1f}",
                     f"{r.images_per_s:.1f}", *(f"{v:.3f}" for v in (s.min, s.mean, s.median, s.p90, s.p95,
                                                                      s.p99, s.max)), f"{s.cv * 100:.1f}"))
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))
    out = [head, "latency in ms (host, per inference; warm-up excluded)", line(cols),
           line(["-" * w for w in widths]), *(line(row) for row in rows)]
    for r in result.results:
        if r.gpu_compute is not None:
            out.append(f"batch {r.batch}: GPU compute median {r.gpu_compute.median:.3f} ms "
                       f"(p99 {r.gpu_compute.p99:.3f}), H2D median {r.h2d.median:.3f} ms, "
                       f"D2H median {r.d2h.median:.3f} ms")
    for r in result.results:
        if r.warning:
            out.append(f"warning (batch {r.batch}): {r.warning}")
    return "\n".join(out)
