"""`edgeres bench` vs a direct ONNX Runtime timing loop on the same ONNX file, in the same run.

The issue asks: medians agree within 5 %. The two are interleaved in rounds, alternating which goes first,
so that other load on the machine hits both alike; each side's median is over all its pooled samples.

    .venv/bin/python benchmarks/bench_bench.py --out DIR [--quick]   ->  DIR/bench.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from functools import partial
from pathlib import Path

import numpy as np

TOLERANCE = 0.05


def export(arch: str, size: int, path: Path) -> Path:
    import torch

    from edgeres.models import create_model

    torch.manual_seed(0)
    model = create_model(arch, num_classes=10).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, torch.randn(1, 3, size, size), str(path), dynamo=False, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
    return path


def direct_loop(path: Path, batch: int, size: int, *, threads: int, duration_s: float, warmup_s: float) -> list[float]:
    """The reference: a plain ONNX Runtime session and a perf_counter_ns loop, nothing of edgeres."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((batch, 3, size, size), dtype=np.float32)
    feed = {"input": x}
    end = time.perf_counter() + warmup_s
    while time.perf_counter() < end:
        sess.run(["logits"], feed)
    samples = []
    start = time.perf_counter_ns()
    while time.perf_counter_ns() - start < duration_s * 1e9:
        t0 = time.perf_counter_ns()
        sess.run(["logits"], feed)
        samples.append((time.perf_counter_ns() - t0) / 1e6)
    return samples


def edgeres_bench(path: Path, batch: int, *, threads: int, duration_s: float, warmup_s: float) -> list[float]:
    """`edgeres bench --json --samples` exactly as a user runs it (in process, through click)."""
    from click.testing import CliRunner

    from edgeres.cli import main

    res = CliRunner().invoke(main, ["bench", "--engine", str(path), "--batch", str(batch), "--duration",
                                    str(duration_s), "--warmup", str(warmup_s), "--threads", str(threads), "--json",
                                    "--samples"])
    if res.exit_code != 0:
        raise SystemExit(f"edgeres bench failed: {res.output}")
    return json.loads(res.output)["results"][0]["samples_ms"]


def main() -> int:
    from edgeres.env import environment

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--quick", action="store_true", help="one small model, short rounds")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    cases = [("resnet20", 32, 1), ("resnet20", 32, 8)] + ([] if args.quick else [("resnet18", 224, 1)])
    rounds, duration, warmup = (8, 0.5, 0.2) if args.quick else (16, 1.0, 0.2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch, size, batch in cases:
            path = Path(tmp) / f"{arch}_{size}.onnx"
            if not path.exists():
                export(arch, size, path)
            ours: list[float] = []
            ref: list[float] = []
            per_round = []
            for i in range(rounds):   # alternate which goes first, so drift in the machine's load cancels
                run_ours = partial(edgeres_bench, path, batch, threads=args.threads, duration_s=duration,
                                   warmup_s=warmup)
                run_ref = partial(direct_loop, path, batch, size, threads=args.threads, duration_s=duration,
                                  warmup_s=warmup)
                if i % 2 == 0:
                    a, b = run_ours(), run_ref()
                else:
                    b, a = run_ref(), run_ours()
                ours += a
                ref += b
                per_round.append({"edgeres_median_ms": float(np.median(a)), "direct_median_ms": float(np.median(b))})
            m_ours, m_ref = float(np.median(ours)), float(np.median(ref))
            ratio = m_ours / m_ref
            round_ratios = [r["edgeres_median_ms"] / r["direct_median_ms"] for r in per_round]
            rows.append({"median_round_ratio": float(np.median(round_ratios)), "arch": arch, "input": [3, size, size],
                         "batch": batch, "rounds": rounds,
                         "seconds_per_round": duration, "edgeres_median_ms": m_ours, "direct_median_ms": m_ref,
                         "ratio": ratio, "within_5pct": abs(ratio - 1) <= TOLERANCE,
                         "edgeres_samples": len(ours), "direct_samples": len(ref),
                         "edgeres_p99_ms": float(np.percentile(ours, 99)),
                         "direct_p99_ms": float(np.percentile(ref, 99)), "per_round": per_round})
            print(f"{arch} {size}x{size} batch {batch}: edgeres bench median {m_ours:.3f} ms "
                  f"({len(ours)} samples), direct ORT loop {m_ref:.3f} ms ({len(ref)}), ratio {ratio:.3f} "
                  f"{'OK' if abs(ratio - 1) <= TOLERANCE else 'OUTSIDE 5 %'}")
    result = {"benchmark": "bench", "tolerance": TOLERANCE, "threads": args.threads, "quick": args.quick,
              "cases": rows, "all_within_5pct": all(r["within_5pct"] for r in rows), "environment": environment()}
    args.out.mkdir(parents=True, exist_ok=True)
    from edgeres.io import atomic_write_json

    atomic_write_json(args.out / "bench.json", result)
    print(f"wrote {args.out / 'bench.json'}; all within 5 %: {result['all_within_5pct']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
