"""Deploy of a bundle to a fleet of local OpenSSH "devices" (tests/fleet.py: one sshd per device on 127.0.0.1,
addressed by ssh_config alias, verifying on the CPU fallback backend, ONNX Runtime): wall time of one device vs N
devices at --concurrency N, bytes sent by a first deploy vs an unchanged re-deploy, a status read of the fleet.
Writes OUT/deploy.json.

Every device runs on this machine, so N devices' verifications share its CPUs: with fewer cores than devices the
N-vs-1 ratio measures this machine, not the controller. --device-delay S makes every device take S seconds longer
to verify (no CPU: an engine build on a Jetson is minutes of the device's own time), which isolates what the
controller adds when N devices work at once.

    python benchmarks/bench_deploy.py --out bench-results [--devices 20] [--concurrency 20] [--device-delay 0]
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


def _row(results, wall: float) -> dict:
    return {"wall_s": round(wall, 2), "hosts_ok": sum(r.ok for r in results),
            "bytes_sent": sum(r.bytes_sent for r in results), "files_sent": sum(len(r.sent) for r in results),
            "per_host_s_median": sorted(r.duration_s for r in results)[len(results) // 2]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench-results")
    ap.add_argument("--quick", action="store_true", help="4 devices instead of 20")
    ap.add_argument("--devices", type=int, default=None)
    ap.add_argument("--concurrency", type=int, default=None, help="default: one per device")
    ap.add_argument("--iterations", type=int, default=20, help="timed iterations on each device")
    ap.add_argument("--device-delay", type=float, default=0.0, help="seconds each device's verification is delayed")
    ap.add_argument("--run", default=None, help="a finished `edgeres build --int8` run (default: build a small one)")
    args = ap.parse_args()
    from fleet import MISSING, Fleet, slow_python

    if MISSING:
        print(f"skipped: {MISSING}")
        return 0
    from edgeres.deploy.bundle import make_bundle
    from edgeres.deploy.ssh import deploy, status
    from edgeres.env import environment

    n = args.devices or (4 if args.quick else 20)
    concurrency = args.concurrency or n
    with tempfile.TemporaryDirectory(prefix="edgeres-bench-deploy-") as tmp:
        tmp = Path(tmp)
        if args.run:
            run = Path(args.run)
        else:
            from test_bundle import make_run

            run = make_run(tmp)
        bundle = make_bundle(run, tmp / "bundle" / "demo", probe_size=32)
        bundle_bytes = sum(p.stat().st_size for p in bundle.iterdir())
        fleet = Fleet(tmp / "fleet", n + 1)
        try:
            python = str(slow_python(tmp, args.device_delay)) if args.device_delay else sys.executable
            ssh = fleet.deploy_kwargs(remote_python=python)
            one, many = fleet.devices[0].alias, [d.alias for d in fleet.devices[1:]]
            rows = {}
            for label, hosts in (("one device", [one]), (f"{n} devices", many), ("unchanged re-deploy", many)):
                t0 = time.perf_counter()
                results = deploy(bundle, hosts, concurrency=concurrency, iterations=args.iterations,
                                 host_timeout=900, **ssh)
                rows[label] = _row(results, time.perf_counter() - t0)
                print(f"{label}: {rows[label]}", flush=True)
            t0 = time.perf_counter()
            st = status(many, concurrency=concurrency, **fleet.ssh())
            rows["status read"] = {"wall_s": round(time.perf_counter() - t0, 2), "hosts_ok": sum(r.ok for r in st)}
            print(f"status read: {rows['status read']}")
        finally:
            fleet.close()
    ratio = rows[f"{n} devices"]["wall_s"] / rows["one device"]["wall_s"]
    resent = rows["unchanged re-deploy"]["bytes_sent"] / max(rows[f"{n} devices"]["bytes_sent"], 1)
    print(f"{n} devices / one device: {ratio:.2f}x wall time; unchanged re-deploy sent {100 * resent:.2f} % of the "
          f"first deploy's bytes")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"devices": n, "concurrency": concurrency, "device_delay_s": args.device_delay,
              "iterations": args.iterations, "bundle_bytes": bundle_bytes, "rows": rows,
              "n_vs_one_wall_ratio": round(ratio, 3), "redeploy_bytes_fraction": resent,
              "machine": platform.machine(), "environment": environment()}
    (out / "deploy.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    ok = all(r["hosts_ok"] == (1 if k == "one device" else n) for k, r in rows.items())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
