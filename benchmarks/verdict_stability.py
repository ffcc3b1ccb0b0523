"""Issue 32's check that verdicts do not flip from one run, thread count or load to the next: the short build
(`edgeres build --arch resnet20 --int8 --epochs 1`) and the README's degradation quick example, each run N times
alternating 1 and 2 torch threads; prints and writes every run's verdict and the numbers behind it.

    python benchmarks/verdict_stability.py --runs 5 --out bench-results/verdict_stability.json
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EDGERES = [sys.executable, "-m", "edgeres"]
DEGRADATION = ["experiment", "degradation", "--depths", "8,20", "--dataset", "digits", "--input-size", "16",
               "--iterations", "600", "--eval-every", "50", "--batch-size", "64", "--lr-steps", "0.5,0.75"]


def _env(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "NNCF_CI": "1",
            "COLUMNS": "120"}


def short_build(threads: int, root: Path) -> dict:
    out = root / f"build-{threads}-{time.time_ns()}"
    t0 = time.perf_counter()
    p = subprocess.run([*EDGERES, "build", "--arch", "resnet20", "--int8", "--epochs", "1", "--bench-seconds", "0",
                        "--out", str(out), "--quiet"], env=_env(threads), capture_output=True, text=True)
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").is_file() else {}
    gates = [{"stage": r["stage"], "gate": g["name"], "value": g["value"], "lo": g.get("lo"), "hi": g.get("hi"),
              "limit": g["limit"], "outcome": g.get("outcome")} for r in report.get("stages", [])
             for g in r.get("gates", [])]
    return {"threads": threads, "exit": p.returncode, "verdict": report.get("verdict"),
            "message": report.get("message"), "gates": gates, "seconds": round(time.perf_counter() - t0, 1)}


def degradation(threads: int, root: Path) -> dict:
    out = root / f"deg-{threads}-{time.time_ns()}"
    t0 = time.perf_counter()
    p = subprocess.run([*EDGERES, *DEGRADATION, "--threads", str(threads), "--out", str(out), "--json"],
                       env=_env(threads), capture_output=True, text=True)
    result = json.loads(p.stdout) if p.returncode == 0 else {}
    found = {k: {"outcome": o["outcome"], "pairs": [{key: q[key] for key in ("shallow_value", "deep_value", "diff_pp",
                                                                            "interval_pp")} for q in o["pairs"]]}
             for k, o in (result.get("orderings") or {}).items()}
    return {"threads": threads, "exit": p.returncode, "findings": found, "seconds": round(time.perf_counter() - t0, 1),
            "error": None if p.returncode == 0 else p.stderr[-500:]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", default="bench-results/verdict_stability.json")
    ap.add_argument("--only", choices=("build", "degradation"), default=None)
    args = ap.parse_args()
    rows: dict[str, list] = {"build": [], "degradation": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            threads = 1 if i % 2 == 0 else 2
            if args.only in (None, "build"):
                rows["build"].append(r := short_build(threads, Path(tmp)))
                print(f"build  threads {threads}: {r['verdict']} exit {r['exit']} ({r['seconds']} s)", flush=True)
            if args.only in (None, "degradation"):
                rows["degradation"].append(r := degradation(threads, Path(tmp)))
                print(f"degradation threads {threads}: " + ", ".join(f"{k} {v['outcome']}" for k, v in
                                                                     r["findings"].items()) + f" ({r['seconds']} s)",
                      flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))
    verdicts = {r["verdict"] for r in rows["build"]}
    findings = {json.dumps({k: v["outcome"] for k, v in r["findings"].items()}) for r in rows["degradation"]}
    print(f"build verdicts: {sorted(map(str, verdicts))}; degradation findings: {sorted(findings)}")
    print(re.sub(r"\s+", " ", f"same verdict in every run: build {len(verdicts) <= 1}, degradation "
                             f"{len(findings) <= 1}"))


if __name__ == "__main__":
    main()
