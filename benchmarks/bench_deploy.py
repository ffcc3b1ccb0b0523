"""Deploy of the demo bundle to a fleet of local OpenSSH "devices" (tests/fleet.py: one sshd per device on
127.0.0.1, addressed by ssh_config alias): wall time and bytes sent for a first deploy and an unchanged re-deploy,
plus a status read of the whole fleet. Writes OUT/deploy.json.

    python benchmarks/bench_deploy.py --out bench-results [--devices 8] [--concurrency 4] [--run runs/demo]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench-results")
    ap.add_argument("--quick", action="store_true", help="4 devices instead of 8")
    ap.add_argument("--devices", type=int, default=None)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--run", default=None, help="a finished `edgeres build --int8` run (default: build a small one)")
    args = ap.parse_args()
    from fleet import MISSING, Fleet

    if MISSING:
        print(f"skipped: {MISSING}")
        return 0
    from edgeres.deploy.bundle import make_bundle
    from edgeres.deploy.ssh import deploy, status
    from edgeres.env import environment

    n = args.devices or (4 if args.quick else 8)
    with tempfile.TemporaryDirectory(prefix="edgeres-bench-deploy-") as tmp:
        tmp = Path(tmp)
        if args.run:
            run = Path(args.run)
        else:
            from test_bundle import make_run

            run = make_run(tmp)
        bundle = make_bundle(run, tmp / "bundle" / "demo", probe_size=32)
        bundle_bytes = sum(p.stat().st_size for p in bundle.iterdir())
        fleet = Fleet(tmp / "fleet", n)
        try:
            hosts = [d.alias for d in fleet.devices]
            rows = {}
            for label in ("first deploy", "unchanged re-deploy"):
                t0 = time.perf_counter()
                results = deploy(bundle, hosts, concurrency=args.concurrency, iterations=50, host_timeout=900,
                                 **fleet.ssh())
                wall = time.perf_counter() - t0
                rows[label] = {"wall_s": round(wall, 2), "hosts_ok": sum(r.ok for r in results),
                               "bytes_sent": sum(r.bytes_sent for r in results),
                               "files_sent": sum(len(r.sent) for r in results),
                               "per_host_s_median": sorted(r.duration_s for r in results)[len(results) // 2]}
                print(f"{label}: {rows[label]}", flush=True)
            t0 = time.perf_counter()
            st = status(hosts, concurrency=8, **fleet.ssh())
            rows["status read"] = {"wall_s": round(time.perf_counter() - t0, 2), "hosts_ok": sum(r.ok for r in st)}
            print(f"status read: {rows['status read']}")
        finally:
            fleet.close()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"devices": n, "concurrency": args.concurrency, "bundle_bytes": bundle_bytes, "rows": rows,
              "machine": platform.machine(), "environment": environment()}
    (out / "deploy.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    ok = all(r["hosts_ok"] == n for r in rows.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
