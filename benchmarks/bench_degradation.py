"""Degradation benchmark: a short CPU run of plain vs residual CIFAR-style nets on real data.

    .venv/bin/python benchmarks/bench_degradation.py --out DIR [--quick]  ->  DIR/degradation.json,
    DIR/degradation/{curves.json, curves.csv, degradation.png/.svg, gradients.png/.svg}

The paper's question in miniature: does the deeper PLAIN net already have the higher training error after a
few hundred iterations, and does the residual twin of the same depth not? Default data: the embedded
digits (real 8x8 handwritten digits, 1,437 train / 360 test) at 16x16, small enough for a 2-core CPU;
`--dataset mnist` uses the real MNIST in ../shared/data/mnist (at 28x28, much slower). Torch runs on one
thread by default: on a shared 2-core machine oversubscribed OpenMP threads were ~15x slower.
Every figure is computed from the run; the orderings are stated as held / not held.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data"

from edgeres.env import environment  # noqa: E402
from edgeres.experiment import DegradationConfig, format_result, run_degradation  # noqa: E402
from edgeres.io import atomic_write_json  # noqa: E402

# (depths, iterations, eval_every, batch, lr steps). "showcase": the README's example, where both of the paper's
# findings hold on the embedded digits in ~4-5 minutes on 2 cores (measured in benchmarks/RESULTS.md); "full":
# deeper nets, where the short run shows (a) but is too short for ResNet-56 to overtake ResNet-20; "quick": smoke.
SETTINGS = {"showcase": ((8, 20), 600, 50, 64, (0.5, 0.75)), "full": ((20, 56), 300, 15, 32, (0.75,)),
            "quick": ((8, 32), 150, 10, 32, (0.75,))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="shallower nets, fewer iterations (~1-2 min)")
    ap.add_argument("--dataset", choices=("digits", "mnist"), default="digits")
    ap.add_argument("--iterations", type=int, default=None, help="override the setting's iteration count")
    ap.add_argument("--setting", choices=sorted(SETTINGS), default="showcase")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    out = Path(args.out).resolve()
    depths, iterations, eval_every, batch, milestones = SETTINGS["quick" if args.quick else args.setting]
    iterations = args.iterations or iterations
    data_dir = None
    if args.dataset == "mnist":
        data_dir = SHARED / "mnist"
        if not data_dir.is_dir():
            print(f"real MNIST not found at {data_dir}", file=sys.stderr)
            return 2
    cfg = DegradationConfig(depths=depths, dataset=args.dataset, data_dir=str(data_dir) if data_dir else None,
                            input_size=16 if args.dataset == "digits" else None, iterations=iterations,
                            eval_every=min(eval_every, iterations), batch_size=batch, milestones=milestones,
                            test_images=None if args.dataset == "digits" else 2000)
    t0 = time.perf_counter()
    result = run_degradation(cfg, out=out / "degradation", force=True, device="cpu", threads=args.threads,
                             log=lambda line: print(line, flush=True))
    wall = time.perf_counter() - t0
    print(format_result(result))
    o = result["orderings"]
    summary = {
        "benchmark": "degradation",
        "mode": "quick" if args.quick else "full",
        "wall_s": round(wall, 1),
        "config": result["config"],
        "dataset": result["dataset"],
        "test_images": result["test_images"],
        "threads": result["threads"],
        "final": [{"arch": r["arch"], "variant": r["variant"], "depth": r["depth"], "params": r["params"],
                   "train_error": r["final"]["train_error"], "test_error": r["final"]["test_error"],
                   "seconds": r["seconds"], "diverged": r["diverged"]} for r in result["runs"]],
        "gradient_first_to_last_ratio": {g["arch"]: g["first_to_last_ratio"] for g in result["gradient_norms"]},
        "plain_gap_direction_held": o["plain_deeper_higher_train_error"]["held"],
        "residual_deeper_lower_test_error_held": o["residual_deeper_lower_test_error"]["held"],
        "orderings": o,
        "files": {k: str(Path("degradation") / v) for k, v in result["files"].items()},
        "environment": environment(),
    }
    atomic_write_json(out / "degradation.json", summary)
    print(f"plain gap direction (deeper plain has higher training error): "
          f"{'HELD' if summary['plain_gap_direction_held'] else 'NOT held'}; wrote {out / 'degradation.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
