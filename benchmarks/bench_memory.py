"""edgeres.memory's estimate (a forward pass on the meta device: parameters + the peak of live activations) against
the peak RSS measured when the model is really built and run, for a few (arch, input size, batch) points.

Each point runs in its own process (a peak RSS is a process's peak): the measured figure is that process's peak RSS
less its RSS after `import torch` and edgeres, before the model is built; one torch thread, inference mode.

    .venv/bin/python benchmarks/bench_memory.py [--json OUT.json] [--point ARCH,SIZE,BATCH ...]
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time

POINTS = (("resnet18", 224, 32), ("resnet50", 224, 8), ("densenet121", 512, 2))
MIB = 1 << 20

CHILD = """
import json, resource, sys, time
import torch
from edgeres.memory import estimate
from edgeres.models import create_model

arch, size, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(1)
t = time.perf_counter()
est = estimate(arch, input_size=size, batch=batch)
est_s = time.perf_counter() - t
with open("/proc/self/status") as f:
    base = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) * 1024
model = create_model(arch, num_classes=1000).eval()
with torch.inference_mode():
    model(torch.randn(batch, 3, size, size))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"arch": arch, "size": size, "batch": batch, "params_bytes": est.params_bytes,
                  "activations_bytes": est.activations_bytes, "estimate_bytes": est.total_bytes,
                  "measured_bytes": peak - base, "estimate_s": round(est_s, 3)}))
"""


def measure(arch: str, size: int, batch: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, arch, str(size), str(batch)], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    head = f"{'arch':<12}{'size':>6}{'batch':>7}{'params MiB':>12}{'act MiB':>10}{'estimate MiB':>14}" \
           f"{'measured MiB':>14}{'est/meas':>10}{'est s':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['arch']:<12}{r['size']:>6}{r['batch']:>7}{r['params_bytes'] / MIB:>12.0f}"
                     f"{r['activations_bytes'] / MIB:>10.0f}{r['estimate_bytes'] / MIB:>14.0f}"
                     f"{r['measured_bytes'] / MIB:>14.0f}{r['estimate_bytes'] / r['measured_bytes']:>10.2f}"
                     f"{r['estimate_s']:>7.2f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--point", action="append", default=None, metavar="ARCH,SIZE,BATCH")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args()
    points = [(a, int(s), int(b)) for a, s, b in (p.split(",") for p in args.point)] if args.point else POINTS
    t = time.perf_counter()
    rows = [measure(*p) for p in points]
    print(f"# {platform.processor() or platform.machine()}, Python {platform.python_version()}, 1 torch thread, "
          f"{time.perf_counter() - t:.0f} s")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
