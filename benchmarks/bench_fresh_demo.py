"""The README's first command from nothing: `git clone` of this repository, then `make demo`, with empty caches.

The uv, pip and edgeres caches point at new empty folders (`UV_CACHE_DIR`, `PIP_NO_CACHE_DIR=1`, `XDG_CACHE_HOME`),
so every wheel is fetched from the package registries this machine is configured with and nothing edgeres built
earlier is reused. Runs `make install` (venv + `tools/install.py`) and then `make demo` (which finds the install done:
the build alone), timed apart and together. Writes OUT/fresh_demo.json.

    python benchmarks/bench_fresh_demo.py --out bench-results
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed (exit {p.returncode}):\n{p.stdout[-3000:]}")
    return round(time.perf_counter() - t0, 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="bench-results")
    ap.add_argument("--quick", action="store_true", help="accepted for `make bench`; the measurement is one build")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgeres-fresh-") as tmp:
        work = Path(tmp)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "EDGERES_", "TORCH_EXT"))}
        env.update(UV_CACHE_DIR=str(work / "uv-cache"), PIP_NO_CACHE_DIR="1", XDG_CACHE_HOME=str(work / "cache"),
                   PATH=os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if ".venv" not in p))
        clone = work / "edgeres"
        steps = {"git clone": timed(["git", "clone", "-q", str(ROOT), str(clone)], work, env)}
        t0 = time.perf_counter()
        steps["make install (venv + install)"] = timed(["make", "install"], clone, env)
        steps["make demo (the build)"] = timed(["make", "demo"], clone, env)
        steps["make demo from the clone, total"] = round(time.perf_counter() - t0, 1)
        record = json.loads((clone / "runs" / "demo" / "report.json").read_text())
    result = {"steps_s": steps, "verdict": record.get("verdict"),
              "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                       text=True).stdout.strip(),
              "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                          "python": platform.python_version()}}
    (out / "fresh_demo.json").write_text(json.dumps(result, indent=2) + "\n")
    for k, v in steps.items():
        print(f"{k:36} {v:7.1f} s")
    print(f"verdict: {result['verdict']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
