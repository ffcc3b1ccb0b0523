"""`make bench`: run every benchmarks/bench_*.py as `python bench_X.py --out DIR [--quick]`, collect the results.

Each benchmark writes DIR/<name>.json; this script writes DIR/summary.json and DIR/summary.md with the exit code
and wall time of each, so a failed benchmark is visible instead of silently missing.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="bench-results")
    ap.add_argument("--quick", action="store_true", help="shorter runs (fewer epochs / iterations)")
    ap.add_argument("--only", default=None, help="comma-separated benchmark names (e.g. build,quant)")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    scripts = sorted(HERE.glob("bench_*.py"))
    if args.only:
        wanted = set(args.only.split(","))
        scripts = [s for s in scripts if s.stem.removeprefix("bench_") in wanted]
    summary = {}
    failed = 0
    for script in scripts:
        name = script.stem.removeprefix("bench_")
        cmd = [sys.executable, str(script), "--out", str(out)] + (["--quick"] if args.quick else [])
        print(f"== {name}: {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(cmd)
        summary[name] = {"rc": rc, "wall_s": round(time.perf_counter() - t0, 1),
                         "result": f"{name}.json" if (out / f"{name}.json").exists() else None}
        failed += rc != 0
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = ["| benchmark | exit | wall s | result |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['rc']} | {v['wall_s']} | {v['result']} |" for k, v in summary.items()]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
