"""The GPU as the build machine (issue 28): how close training, QAT and the build come to what the GPU can do.

    .venv/bin/python benchmarks/bench_gpu.py --out DIR [--quick] [--device cuda]   ->  DIR/gpu.json, DIR/gpu.md

Measured in one run, on one device (the first GPU; the CPU when there is none, or with --device cpu):
- ceiling: resnet18 SGD steps on synthetic tensors already on the device (AMP + channels_last on CUDA): the most
  `train` could reach;
- train: `edgeres.train.train` img/s at 224 px (AMP, channels_last) on imagenette-mini (../shared/data), through
  the product's own data path (on CUDA: nvJPEG decode + GPU augmentation), and its ratio to the ceiling;
- ptq: seconds of `quantize_ptq` (512 images); qat: `quantize_qat` img/s (distillation, the recipe's batch) and its
  ratio to train, with the GPU's busy fraction sampled during QAT (NVML, every 50 ms);
- build: wall time of `edgeres build --recipe imagenette_resnet18 --int8` and the GPU busy fraction during it.
`--quick` shrinks everything (digits at 32 px, a few steps, a 1-epoch build) so the test suite runs it on the CPU and
the script cannot rot; its numbers mean nothing. A part whose data is absent is recorded as skipped with the reason.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data"
IMAGENETTE = SHARED / "imagenette-mini"
QUICK_ARCH = "resnet20"   # --quick: the smallest CIFAR ResNet at 16 px (checks the script, measures nothing)


class BusySampler:
    """The GPU's utilisation (NVML, % of time a kernel ran) sampled every `period_s` in a thread."""

    def __init__(self, device, period_s: float = 0.05):
        self.samples: list[int] = []
        self.reason = None
        self._stop = threading.Event()
        self._handle = None
        if not str(device).startswith("cuda"):
            self.reason = "not a GPU"
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            import torch

            index = torch.device(device).index or 0
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self._nvml = pynvml
        except Exception as e:  # nvidia-ml-py missing or NVML unavailable: say so, measure the rest
            self.reason = f"NVML unavailable ({type(e).__name__}: {e})"
        self.period_s = period_s

    def __enter__(self):
        if self._handle is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.samples.append(int(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu))
            time.sleep(self.period_s)

    def __exit__(self, *exc):
        self._stop.set()
        if self._handle is not None:
            self._thread.join()
        return False

    def result(self) -> dict:
        if not self.samples:
            return {"busy_pct": None, "reason": self.reason or "no samples"}
        return {"busy_pct": round(sum(self.samples) / len(self.samples), 1), "samples": len(self.samples)}


def _sync(device):
    from edgeres.device import synchronize

    synchronize(device)


def ceiling(device, *, arch: str, size: int, batch: int, steps: int) -> dict:
    """SGD steps of resnet18 on synthetic tensors resident on the device (no data pipeline at all)."""
    import torch

    from edgeres.models import create_model

    cuda = str(device).startswith("cuda")
    model = create_model(arch, num_classes=10).to(device)
    model = model.to(memory_format=torch.channels_last) if cuda else model
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    x = torch.randn(batch, 3, size, size, device=device)
    x = x.contiguous(memory_format=torch.channels_last) if cuda else x
    y = torch.randint(0, 10, (batch,), device=device)

    def step():
        with torch.autocast(torch.device(device).type, dtype=torch.float16, enabled=cuda):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    for _ in range(max(2, steps // 5)):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    s = time.perf_counter() - t0
    return {"img_s": round(batch * steps / s, 1), "arch": arch, "size": size, "batch": batch, "steps": steps,
            "amp": cuda,
            "channels_last": cuda}


def _recipe(quick: bool, size: int, batch: int):
    from edgeres.recipe import load_recipe, recipe_from_dict

    if quick:
        return recipe_from_dict({"model": {"arch": QUICK_ARCH},
                                 "data": {"dataset": "digits", "input_size": size, "batch_size": batch, "workers": 0},
                                 "train": {"epochs": 1, "optimizer": "sgd", "lr": 0.01, "max_iterations": 4}})
    return load_recipe("imagenet_resnet18").with_overrides({
        "data.dataset": "imagefolder", "data.data_dir": str(IMAGENETTE), "data.input_size": size,
        "data.resize_size": None, "data.batch_size": batch, "data.workers": 14, "data.cache": False,
        "train.epochs": 2, "train.amp": True, "train.channels_last": True}, keep_none=("data.resize_size",))


def train_and_quantize(device, *, quick: bool, size: int, batch: int) -> dict:
    import torch

    from edgeres.data import get_data_for
    from edgeres.fold import fold_batchnorm
    from edgeres.quantize import quantize_ptq, quantize_qat
    from edgeres.train import train

    if not quick and not IMAGENETTE.is_dir():
        return {"skipped": f"imagenette-mini not found at {IMAGENETTE}"}
    recipe = _recipe(quick, size, batch)
    data = get_data_for(recipe)
    out: dict = {}
    from edgeres.checkpoint import load_model

    with tempfile.TemporaryDirectory() as tmp:
        res = train(recipe, Path(tmp) / "train", quiet=True, data=data, device=device)
        model = fold_batchnorm(load_model(res.best)[0].to(device)).model
    # the first epoch carries cuDNN autotuning and worker start-up: the best epoch is the steady rate
    out["train"] = {"img_s": round(max(r["images_per_s"] for r in res.history), 1), "epochs": len(res.history),
                    "size": size, "batch": batch, "amp": recipe.train.amp}
    n_calib = 32 if quick else 512
    t0 = time.perf_counter()
    ptq = quantize_ptq(model, data.calib, subset_size=min(n_calib, len(data.calib)), quiet=True, device=device)
    _sync(device)
    out["ptq"] = {"seconds": round(time.perf_counter() - t0, 2), "images": min(n_calib, len(data.calib))}
    train_split = torch.utils.data.Subset(data.train, range(min(len(data.train), batch * (2 if quick else 1000))))
    with BusySampler(device) as busy:
        qat = quantize_qat(ptq.model, train_split, None, teacher=model, epochs=1, lr=1e-4, batch_size=batch,
                           quiet=True, device=device)
    out["qat"] = {"img_s": qat.history[-1]["images_per_s"], "batch": batch, "loss": "kd", **busy.result()}
    return out


def build_wall(device, *, quick: bool) -> dict:
    from edgeres.build import BuildOptions, build

    if not quick and not IMAGENETTE.is_dir():
        return {"skipped": f"imagenette-mini not found at {IMAGENETTE}"}
    with tempfile.TemporaryDirectory() as tmp:
        if quick:
            opts = BuildOptions(out=Path(tmp) / "run", arch=QUICK_ARCH, int8=True, quiet=True, bench_seconds=0,
                                epochs=1, qat_epochs=0, max_drop=100.0, device=str(device),
                                overrides={"quant.calib_size": 32, "data.input_size": 16,
                                           "gates.min_agreement_pct": 0.0, "gates.min_int8_agreement": 0.0})
        else:
            opts = BuildOptions(out=Path(tmp) / "run", recipe="imagenette_resnet18", dataset="imagefolder",
                                data_dir=str(IMAGENETTE), int8=True, quiet=True, device=str(device))
        t0 = time.perf_counter()
        with BusySampler(device) as busy:
            result = build(opts)
        wall = time.perf_counter() - t0
        stages = {r.stage: r.duration_s for r in result.records}
    return {"wall_s": round(wall, 1), "ok": result.ok, "message": result.message, "stage_s": stages,
            **busy.result()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench-results")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the script, measures nothing")
    ap.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: the first GPU, else the CPU)")
    args = ap.parse_args()
    import torch

    from edgeres.device import describe, resolve
    from edgeres.env import environment

    device = resolve(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.quick and not str(device).startswith("cuda"):   # `make bench` on a machine without a GPU
        why = f"no CUDA GPU ({device}): the GPU benchmark measures nothing here; --quick checks the script"
        (out / "gpu.json").write_text(json.dumps({"skipped": why, "environment": environment()}, indent=2) + "\n")
        print(why)
        return 0
    arch, size, batch = (QUICK_ARCH, 16, 16) if args.quick else ("resnet18", 224, 256)
    t0 = time.perf_counter()
    res = {"quick": args.quick, "environment": {**environment(), **describe(device)},
           "ceiling": ceiling(device, arch=arch, size=size, batch=batch, steps=4 if args.quick else 60)}
    res.update(train_and_quantize(device, quick=args.quick, size=size, batch=batch))
    if "train" in res:
        res["train"]["vs_ceiling"] = round(res["train"]["img_s"] / res["ceiling"]["img_s"], 3)
        res["qat"]["vs_train"] = round(res["qat"]["img_s"] / res["train"]["img_s"], 3)
    res["build"] = build_wall(device, quick=args.quick)
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    (out / "gpu.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    (out / "gpu.md").write_text(section(res) + "\n")
    print(section(res))
    del torch
    return 0


def section(r: dict) -> str:
    """The RESULTS.md section for this run."""
    env = r["environment"]
    dev = env.get("torch_device_name") or env.get("torch_device")
    lines = [f"### GPU as the build machine ({dev}, torch {env['packages'].get('torch')}"
             f"{', quick: numbers mean nothing' if r['quick'] else ''})", "",
             "| what | measured | target |", "|---|---|---|",
             f"| synthetic training ceiling | {r['ceiling']['img_s']:,} img/s | - |"]
    if "train" in r:
        t, q, p = r["train"], r["qat"], r["ptq"]
        lines += [f"| `train` at {t['size']} px (AMP) | {t['img_s']:,} img/s = {t['vs_ceiling']}x ceiling | >= 0.6x |",
                  f"| QAT (kd) | {q['img_s']:,} img/s = {q['vs_train']}x train | >= 0.5x |",
                  f"| GPU busy during QAT | {q.get('busy_pct')} % | >= 50 % |",
                  f"| PTQ ({p['images']} images) | {p['seconds']} s | - |"]
    else:
        lines.append(f"| train / PTQ / QAT | skipped: {r.get('skipped')} | |")
    b = r["build"]
    if "wall_s" in b:
        lines.append(f"| `build --int8` wall | {b['wall_s']} s ({'passed' if b['ok'] else 'FAILED: ' + b['message']}), "
                     f"GPU busy {b.get('busy_pct')} % | - |")
    else:
        lines.append(f"| `build --int8` | skipped: {b['skipped']} | |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
