"""PTQ wall time, side by side in one run: resnet18 at 224 px, 512 calibration images, 2 threads.

    .venv/bin/python benchmarks/bench_ptq.py --out DIR [--images 512] [--rounds 2] [--weights CKPT]

- edgeres `quantize_ptq` with its default calibration method (percentile), fast=True (the default: NHWC statistics
  passes and edgeres.nncf_patches);
- the same with fast=False: NNCF's PyTorch PTQ exactly as it ships (what edgeres ran before);
- NNCF's OpenVINO PTQ of the same BN-folded model's FP32 ONNX on the same images (the issue's reference).
Rounds are interleaved (each path once per round); the median per path is reported, with the ratio to NNCF-OpenVINO,
and how far the fast path's quantizer ranges and biases are from NNCF's own (max relative difference). Images:
imagenette-mini train (../shared/data) when present, else Gaussian noise (said in the result).
Writes DIR/ptq.json and DIR/ptq.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NNCF_CI", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
THREADS = 2


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "bench-results")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--weights", type=Path, default=None, help="A trained resnet18 checkpoint (else random init).")
    args = ap.parse_args()
    try:
        import openvino as ov
    except ImportError:
        print("bench_ptq: OpenVINO is not installed (pip install 'edgeres[openvino]'); nothing measured")
        return 0
    import nncf
    import torch
    from bench_cpu_int8 import calibration_images

    from edgeres.checkpoint import ModelMeta, load_model
    from edgeres.export import export_onnx
    from edgeres.fold import fold_batchnorm
    from edgeres.models import create_model
    from edgeres.quantize import quantize_ptq

    torch.set_num_threads(THREADS)
    model = load_model(args.weights)[0] if args.weights else create_model("resnet18", num_classes=10, in_channels=3)
    folded = fold_batchnorm(model.eval()).model
    meta = ModelMeta(arch="resnet18", num_classes=10, in_channels=3, input_size=224, mean=(0.485, 0.456, 0.406),
                     std=(0.229, 0.224, 0.225), class_names=tuple(str(i) for i in range(10)))
    x, source, _ = calibration_images(args.images)
    print(f"calibration: {len(x)} images from {source}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="edgeres-ptq-"))
    fp32_onnx = export_onnx(folded, tmp / "model_fp32.onnx", meta=meta, int8=False)
    dataset = torch.utils.data.TensorDataset(torch.from_numpy(x), torch.zeros(len(x), dtype=torch.long))
    core = ov.Core()
    times: dict[str, list[float]] = {"edgeres (default)": [], "edgeres fast=False (NNCF torch as shipped)": [],
                                     "NNCF OpenVINO": []}
    models = {}
    for r in range(args.rounds):
        for name in times:
            t0 = time.perf_counter()
            if name == "NNCF OpenVINO":
                nncf.quantize(core.read_model(str(fp32_onnx)), nncf.Dataset([x[i:i + 1] for i in range(len(x))]),
                              subset_size=len(x))
            else:
                models[name] = quantize_ptq(folded, dataset, subset_size=len(x), quiet=True,
                                            fast=name == "edgeres (default)").model
            times[name].append(round(time.perf_counter() - t0, 2))
            print(f"round {r + 1}: {name} {times[name][-1]} s", flush=True)
    a, b = (m.state_dict() for m in models.values())
    rel = {k: float((a[k].double() - b[k].double()).abs().max() / (b[k].double().abs().max() + 1e-12))
           for k in a if a[k].is_floating_point()}
    ref = statistics.median(times["NNCF OpenVINO"])
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": THREADS,
                    "python": platform.python_version(), "torch": torch.__version__, "nncf": nncf.__version__,
                    "openvino": ov.get_version()},
        "images": len(x), "source": source, "rounds": args.rounds, "weights": str(args.weights or "random init"),
        "seconds": times, "median_s": {k: statistics.median(v) for k, v in times.items()},
        "vs_nncf_openvino": {k: round(statistics.median(v) / ref, 3) for k, v in times.items()},
        "fast_vs_nncf_torch_max_rel_diff": {"ranges": max((v for k, v in rel.items() if "bias" not in k), default=0),
                                            "biases": max((v for k, v in rel.items() if "bias" in k), default=0)},
        "target": "edgeres default <= 1.5x NNCF OpenVINO",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ptq.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["| PTQ path | median s | vs NNCF OpenVINO |", "|---|---|---|"]
    lines += [f"| {k} | {result['median_s'][k]:.1f} | {result['vs_nncf_openvino'][k]:.2f}x |" for k in times]
    (args.out / "ptq.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps(result["fast_vs_nncf_torch_max_rel_diff"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
