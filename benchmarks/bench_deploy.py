"""Deploy of a bundle to fleets of local OpenSSH "devices" (tests/fleet.py: one sshd per device on 127.0.0.1,
addressed by ssh_config alias, verifying on the CPU fallback backend, ONNX Runtime), by `edgeres deploy` (SSH, one
connection per device, --concurrency N) and by the `edgeres fleet ansible` project run with the real
`ansible-playbook` (one batch of N, forks N): wall time of a first deploy to 1, 10 and 30 devices, and of an
unchanged re-deploy (SSH: bytes sent; Ansible: hosts reported changed, which must be 0), a status read of the fleet.
Writes OUT/deploy.json.

Every device runs on this machine, so N devices' verifications (the install's and the check after the switch) share
its CPUs: with fewer cores than devices the N-vs-1 ratio measures this machine, not the controller. --device-delay S
makes every device take S seconds longer to verify (no CPU: an engine build on a Jetson is minutes of the device's
own time), which isolates what the controller adds when N devices work at once. Each size starts from devices with
nothing installed (their install root, state and units removed).

    python benchmarks/bench_deploy.py --out bench-results [--sizes 1,10,30] [--engines ssh,ansible]
                                      [--iterations 20] [--device-delay 0] [--run RUN]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
ENGINES = ("ssh", "ansible")


def _wipe(devices) -> None:
    """Devices with nothing installed: no release, no state, no units (the folder itself stays, as on a device)."""
    for d in devices:
        shutil.rmtree(d.home / "opt", ignore_errors=True)
        shutil.rmtree(d.home / "var", ignore_errors=True)
        for p in d.units.iterdir():
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()


def _ssh_rows(bundle: Path, fleet, devices, *, python: str, iterations: int) -> dict:
    from edgeres.deploy.ssh import deploy, status

    hosts, ssh = [d.alias for d in devices], fleet.deploy_kwargs(remote_python=python)
    rows = {}
    for label in ("first deploy", "unchanged re-deploy"):
        t0 = time.perf_counter()
        results = deploy(bundle, hosts, concurrency=len(hosts), iterations=iterations, host_timeout=900, **ssh)
        rows[label] = {"wall_s": round(time.perf_counter() - t0, 2), "hosts_ok": sum(r.ok for r in results),
                       "bytes_sent": sum(r.bytes_sent for r in results),
                       "per_host_s_median": sorted(r.duration_s for r in results)[len(results) // 2]}
    t0 = time.perf_counter()
    st = status(hosts, concurrency=len(hosts), **fleet.ssh())
    rows["status read"] = {"wall_s": round(time.perf_counter() - t0, 2), "hosts_ok": sum(r.ok for r in st)}
    return rows


def _recap(stdout: str) -> dict[str, dict[str, int]]:
    rows = {}
    for ln in stdout[stdout.rfind("PLAY RECAP"):].splitlines()[1:]:
        m = re.match(r"(\S+)\s+:\s+(.*)", ln)
        if m:
            rows[m.group(1)] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(2))}
    return rows


def _ansible_rows(bundle: Path, fleet, devices, *, python: str, iterations: int, out: Path, control: Path) -> dict:
    from fleet import current_release

    from edgeres.deploy.ansible_playbook import write_project

    done = write_project(bundle, out, [d.alias for d in devices], ssh_config=fleet.config,
                         known_hosts=fleet.known_hosts, serial=("100%",), remote_root="~/opt/edgeres",
                         state_dir="~/var/lib/edgeres", remote_python=python,
                         trusted_keys="~/etc/edgeres/allowed_signers", units_dir="~/etc/systemd/system",
                         iterations=iterations, host_timeout=900, force=True)
    venv = Path(sys.executable).parent
    env = {**os.environ, "ANSIBLE_CONFIG": str(out / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1",
           "ANSIBLE_SSH_CONTROL_PATH_DIR": str(control), "PATH": f"{venv}{os.pathsep}{os.environ['PATH']}"}
    rows = {}
    for label in ("first deploy", "unchanged re-deploy"):
        t0 = time.perf_counter()
        p = subprocess.run([shutil.which("ansible-playbook", path=env["PATH"]), "deploy.yml"], cwd=out, env=env,
                           capture_output=True, text=True, timeout=1800)
        wall = time.perf_counter() - t0
        recap = _recap(p.stdout)
        live = sum(current_release(d) == done["release"] for d in devices)
        rows[label] = {"wall_s": round(wall, 2), "exit": p.returncode, "hosts_ok": live if p.returncode == 0 else 0,
                       "hosts_changed": sum(r.get("changed", 0) > 0 for r in recap.values())}
        if p.returncode != 0:
            print(p.stdout[-3000:], p.stderr[-2000:], file=sys.stderr)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench-results")
    ap.add_argument("--sizes", default="1,10,30", help="fleet sizes, comma-separated")
    ap.add_argument("--engines", default=",".join(ENGINES), help="ssh, ansible or both")
    ap.add_argument("--iterations", type=int, default=20, help="timed iterations on each device")
    ap.add_argument("--device-delay", type=float, default=0.0, help="seconds each device's verification is delayed")
    ap.add_argument("--run", default=None, help="a finished `edgeres build --int8` run (default: build a small one)")
    args = ap.parse_args()
    from fleet import MISSING, Fleet, slow_python

    if MISSING:
        print(f"skipped: {MISSING}")
        return 0
    sizes = [int(s) for s in args.sizes.split(",")]
    engines = args.engines.split(",")
    if unknown := [e for e in engines if e not in ENGINES]:
        ap.error(f"--engines {','.join(unknown)}: choose from {', '.join(ENGINES)}")
    if "ansible" in engines and not shutil.which("ansible-playbook",
                                                 path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"):
        ap.error("--engines ansible needs ansible-playbook (pip install ansible-core)")
    from edgeres.deploy.bundle import make_bundle
    from edgeres.env import environment
    from edgeres.io import atomic_write_json

    load_before = os.getloadavg()
    results: dict[str, dict[str, dict]] = {e: {} for e in engines}
    with tempfile.TemporaryDirectory(prefix="edgeres-bench-deploy-") as tmp:
        tmp = Path(tmp)
        if args.run:
            run = Path(args.run)
        else:
            from test_bundle import make_run

            run = make_run(tmp)
        bundle = make_bundle(run, tmp / "bundle" / "demo", probe_size=32)
        bundle_bytes = sum(p.stat().st_size for p in bundle.iterdir())
        control = Path(tempfile.mkdtemp(prefix="edgeres-cp-"))   # Ansible's ssh masters: this run's own, closed after
        fleet = Fleet(tmp / "fleet", max(sizes))
        try:
            python = str(slow_python(tmp, args.device_delay)) if args.device_delay else sys.executable
            for engine in engines:
                for n in sizes:
                    devices = fleet.devices[:n]
                    _wipe(devices)
                    if engine == "ssh":
                        rows = _ssh_rows(bundle, fleet, devices, python=python, iterations=args.iterations)
                    else:
                        rows = _ansible_rows(bundle, fleet, devices, python=python, iterations=args.iterations,
                                             out=tmp / f"ansible-{n}", control=control)
                    results[engine][str(n)] = rows
                    print(f"{engine} {n} device(s): {json.dumps(rows)}", flush=True)
        finally:
            for sock in control.iterdir():
                subprocess.run(["ssh", "-o", f"ControlPath={sock}", "-O", "exit", "bench"], capture_output=True,
                               timeout=30)
            shutil.rmtree(control, ignore_errors=True)
            fleet.close()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"sizes": sizes, "engines": engines, "device_delay_s": args.device_delay, "iterations": args.iterations,
              "bundle_bytes": bundle_bytes, "results": results, "cpus": os.cpu_count(),
              "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "machine": platform.machine(), "environment": environment()}
    atomic_write_json(out / "deploy.json", result)
    for engine in engines:
        print(f"{engine}: " + ", ".join(f"{n} -> {rows['first deploy']['wall_s']} s (re-deploy "
                                         f"{rows['unchanged re-deploy']['wall_s']} s)"
                                         for n, rows in results[engine].items()))
    ok = all(rows[k]["hosts_ok"] == int(n) for e in engines for n, rows in results[e].items()
             for k in ("first deploy", "unchanged re-deploy"))
    unchanged = all(rows["unchanged re-deploy"].get("hosts_changed", 0) == 0 and
                    rows["unchanged re-deploy"].get("bytes_sent", 0) == 0
                    for e in engines for rows in results[e].values())
    return 0 if ok and unchanged else 1


if __name__ == "__main__":
    sys.exit(main())
