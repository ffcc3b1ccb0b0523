"""The CPU INT8 target, side by side in one run: resnet18 at 224 px (or --size), 10 classes, 2 threads, batch 1 and 8.

    .venv/bin/python benchmarks/bench_cpu_int8.py --out DIR [--quick] [--weights CKPT] [--size 128]

Artifacts (all from the same BN-folded FP32 model and the same calibration images):
- ONNX Runtime FP32 (`model_fp32.onnx`);
- ONNX Runtime running edgeres's TensorRT INT8 Q/DQ ONNX (`model_int8.onnx`, INT8 weights on disk);
- ONNX Runtime `quantize_static` INT8 from the FP32 ONNX (QDQ, per-channel, its own placement);
- edgeres's CPU INT8 artifact (recipe export.cpu_int8 = qat, the default): the TensorRT INT8 ONNX with its
  post-ReLU activations unsigned at the same scales (edgeres.cpu.unsigned_after_relu), converted;
- `model_int8_cpu.xml` (recipe export.cpu_int8 = openvino, the default before 2026-12-07): NNCF's
  OpenVINO PTQ of the FP32 ONNX on the same calibration images, through edgeres.cpu.export_openvino;
- the TensorRT INT8 ONNX converted to an OpenVINO IR as it is (export.cpu_int8 = qdq);
- OpenVINO INT8 made by NNCF's native OpenVINO path from the FP32 ONNX (the issue's reference).
Latency: interleaved rounds (every artifact once per round, in turn), the median of the per-round medians. Also:
file sizes, PTQ wall time (edgeres default method vs NNCF-OpenVINO vs ORT quantize_static, same images), the
physical floor (1.82 G MACs at this CPU's measured FP32 and INT8 arithmetic peaks, benchmarks/peak.c), and top-1 on
imagenette-mini val when ../shared/data is present (meaningful only with --weights: a trained checkpoint).
Writes DIR/cpu_int8.json and DIR/cpu_int8.md (cpu_int8_SIZE.* for another --size).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NNCF_CI", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data" / "imagenette-mini"
MACS = 1.8136e9   # resnet18 at 224, 10 classes: conv + fc multiply-accumulates, counted with forward hooks
THREADS = 2


def calibration_images(n: int, seed: int = 0, size: int = 224):
    """n preprocessed images at `size` px (imagenette-mini train when present, else Gaussian noise: said in the
    result)."""
    import numpy as np

    if SHARED.is_dir():
        from edgeres.data import get_data
        from edgeres.quantize import calibration_indices

        data = get_data(dataset="imagefolder", data_dir=str(SHARED), input_size=size, workers=0)
        idx = calibration_indices(len(data.calib), min(n, len(data.calib)), seed=seed)
        x = np.stack([np.asarray(data.calib[i][0], dtype=np.float32) for i in idx])
        val = data.test
        return x, "imagenette-mini train", val
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 3, size, size)).astype(np.float32), "Gaussian noise (no ../shared/data)", None


def measured_peaks(tmp: Path) -> dict:
    """This CPU's arithmetic peak with THREADS threads (benchmarks/peak.c: register-only FMA and AVX2 INT8 loops).

    Returns G MAC/s for fp32, int8 (the exact u8 x s8 sequence: vpmaddubsw + vpmaddwd + vpaddd) and int8_add16 (an
    int16-accumulating upper bound), or {"error": why} when there is no C compiler or the CPU lacks AVX2/FMA.
    """
    import shutil
    import subprocess

    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        return {"error": "no C compiler (gcc) to build benchmarks/peak.c"}
    exe = tmp / "peak"
    try:
        subprocess.run([cc, "-O2", "-mavx2", "-mfma", "-pthread", str(ROOT / "benchmarks" / "peak.c"), "-o", str(exe)],
                       check=True, capture_output=True, text=True)
        out = subprocess.run([str(exe), str(THREADS), "1.0"], check=True, capture_output=True, text=True).stdout
    except (subprocess.CalledProcessError, OSError) as e:
        return {"error": f"peak.c did not build or run: {getattr(e, 'stderr', '') or e}".strip()}
    peaks = json.loads(out)
    return {"fp32": peaks["fp32_gmacs"], "int8": peaks["int8_gmacs"], "int8_add16": peaks["int8_add16_gmacs"]}


def floor_ms(peaks: dict, size: int = 224) -> dict:
    """The model's MACs at each measured peak, in ms: no implementation on this CPU can be faster. The conv MACs
    scale with the output area, (size / 224)^2 at every stage; the classifier's 5,120 do not."""
    if "error" in peaks:
        return {"error": peaks["error"]}
    macs = (MACS - 5120) * (size / 224) ** 2 + 5120
    return {"fp32_ms": round(macs / peaks["fp32"] / 1e6, 2), "int8_ms": round(macs / peaks["int8"] / 1e6, 2),
            "int8_add16_ms": round(macs / peaks["int8_add16"] / 1e6, 2),
            "fp32_peak_gmacs": peaks["fp32"], "int8_peak_gmacs": peaks["int8"],
            "int8_add16_peak_gmacs": peaks["int8_add16"]}


def interleaved(runners: dict, batches=(1, 8), rounds: int = 15, per_round: dict | None = None,
                size: int = 224) -> dict:
    """Every runner once per round, in turn, in a new (seeded) order each round; each turn starts after a 50 ms pause
    and one untimed call. ONNX Runtime's threads spin on after a call: measured in a fixed order, the artifact
    that always came right after the ONNX Runtime runners read 1.2-1.65x slower at batch 1 than it runs alone."""
    import numpy as np

    per_round = per_round or {1: 10, 8: 3}
    x = {b: np.random.default_rng(b).standard_normal((b, 3, size, size)).astype(np.float32) for b in batches}
    for r in runners.values():
        for b in batches:
            r.infer(x[b])
    names = list(runners)
    order = np.random.default_rng(0)
    med: dict = {name: {b: [] for b in batches} for name in runners}
    for _ in range(rounds):
        for b in batches:
            for name in order.permutation(names):
                r = runners[name]
                time.sleep(0.05)
                r.infer(x[b])
                times = []
                for _ in range(per_round[b]):
                    t0 = time.perf_counter()
                    r.infer(x[b])
                    times.append((time.perf_counter() - t0) * 1e3)
                med[name][b].append(float(np.median(times)))
    return {name: {b: round(float(np.median(v)), 3) for b, v in d.items()} for name, d in med.items()}


def top1(runner, val, limit: int | None = None) -> float | None:
    import numpy as np

    if val is None:
        return None
    n = len(val) if limit is None else min(limit, len(val))
    hits = 0
    for i in range(0, n, 25):
        xs = [val[j] for j in range(i, min(n, i + 25))]
        x = np.stack([np.asarray(a, dtype=np.float32) for a, _ in xs])
        y = np.asarray([int(b) for _, b in xs])
        hits += int((runner.infer(x).argmax(1) == y).sum())
    return round(100.0 * hits / n, 2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="bench-results")
    ap.add_argument("--quick", action="store_true", help="64 calibration images, 5 rounds")
    ap.add_argument("--weights", default=None, help="a trained resnet18 checkpoint (10 classes)")
    ap.add_argument("--size", type=int, default=224, help="input side in px (the issue's bar: 128 and 224)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        import openvino as ov
    except ImportError:
        print("bench_cpu_int8: OpenVINO is not installed (pip install 'edgeres[openvino]'); nothing measured")
        return 0
    import nncf
    import onnxruntime as ort
    import torch
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from edgeres.checkpoint import ModelMeta, load_model
    from edgeres.cpu import export_openvino
    from edgeres.export import export_onnx
    from edgeres.fold import fold_batchnorm
    from edgeres.models import create_model
    from edgeres.quantize import quantize_ptq
    from edgeres.runners import OpenVinoRunner, OrtRunner, ort_int8_kernels

    torch.set_num_threads(THREADS)
    n_calib = 64 if args.quick else 512
    rounds = 5 if args.quick else 15
    tmp = Path(tempfile.mkdtemp(prefix="edgeres-cpu-int8-"))
    if args.weights:
        model, _ = load_model(args.weights)
    else:
        model = create_model("resnet18", num_classes=10, in_channels=3)
    model.eval()
    meta = ModelMeta(arch="resnet18", num_classes=10, in_channels=3, input_size=args.size, mean=(0.485, 0.456, 0.406),
                     std=(0.229, 0.224, 0.225), class_names=tuple(str(i) for i in range(10)))
    folded = fold_batchnorm(model).model
    x, source, val = calibration_images(n_calib, size=args.size)
    print(f"calibration: {len(x)} images from {source}", flush=True)
    fp32_onnx = export_onnx(folded, tmp / "model_fp32.onnx", meta=meta, int8=False)

    dataset = torch.utils.data.TensorDataset(torch.from_numpy(x), torch.zeros(len(x), dtype=torch.long))
    t0 = time.perf_counter()
    ptq = quantize_ptq(folded, dataset, subset_size=len(x), quiet=True)
    t_edgeres = time.perf_counter() - t0
    int8_onnx = export_onnx(ptq.model, tmp / "model_int8.onnx", meta=meta, int8=True)
    t0 = time.perf_counter()
    export_openvino(int8_onnx, tmp / "model_int8_qdq.xml")   # recipe export.cpu_int8: qdq
    export_openvino(int8_onnx, tmp / "model_int8_qat.xml", unsigned_activations=True)   # export.cpu_int8: qat
    t_qdq_export = time.perf_counter() - t0
    t0 = time.perf_counter()   # recipe export.cpu_int8: openvino, same calibration images
    export_openvino(fp32_onnx, tmp / "model_int8_cpu.xml", calibration=[x[i:i + 1] for i in range(len(x))])
    t_cpu_export = time.perf_counter() - t0

    core = ov.Core()
    t0 = time.perf_counter()
    ov_q = nncf.quantize(core.read_model(str(fp32_onnx)), nncf.Dataset([x[i:i + 1] for i in range(len(x))]),
                         subset_size=len(x))
    t_nncf_ov = time.perf_counter() - t0
    ov.save_model(ov_q, str(tmp / "nncf_ov.xml"), compress_to_fp16=False)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(x[i:i + 1] for i in range(len(x)))

        def get_next(self):
            nxt = next(self.it, None)
            return None if nxt is None else {"input": nxt}

    t0 = time.perf_counter()
    quantize_static(str(fp32_onnx), str(tmp / "ort_qs.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    t_ort_qs = time.perf_counter() - t0

    runners = {
        "ORT FP32 (model_fp32.onnx)": OrtRunner(fp32_onnx, threads=THREADS),
        "ORT, edgeres TensorRT INT8 ONNX (model_int8.onnx)": OrtRunner(int8_onnx, threads=THREADS),
        "ORT quantize_static INT8": OrtRunner(tmp / "ort_qs.onnx", threads=THREADS),
        "OpenVINO, edgeres CPU INT8 artifact (export.cpu_int8: qat, default)": OpenVinoRunner(
            tmp / "model_int8_qat.xml", threads=THREADS),
        "OpenVINO, edgeres OpenVINO PTQ of FP32 (export.cpu_int8: openvino)": OpenVinoRunner(
            tmp / "model_int8_cpu.xml", threads=THREADS),
        "OpenVINO, edgeres TensorRT Q/DQ ONNX converted (export.cpu_int8: qdq)": OpenVinoRunner(
            tmp / "model_int8_qdq.xml", threads=THREADS),
        "OpenVINO, NNCF-native INT8": OpenVinoRunner(tmp / "nncf_ov.xml", threads=THREADS),
    }
    print("timing ...", flush=True)
    lat = interleaved(runners, rounds=rounds, size=args.size)
    floor = floor_ms(measured_peaks(tmp), args.size)
    ref_ov, ref_ort = lat["OpenVINO, NNCF-native INT8"], lat["ORT FP32 (model_fp32.onnx)"]
    kernels = {}
    for name, r in runners.items():
        if isinstance(r, OpenVinoRunner):
            k = r.kernel_report()
        elif "INT8" in name or "int8" in name:
            k = ort_int8_kernels(r.path, THREADS)
        else:
            k = None
        kernels[name] = None if k is None else f"{k['int8_kernels']}/{k['int8_kernels'] + k['float_convs']}"
    sizes = {"model_fp32.onnx": fp32_onnx.stat().st_size, "model_int8.onnx": int8_onnx.stat().st_size,
             "model_int8_cpu.bin": (tmp / "model_int8_cpu.bin").stat().st_size,
             "model_int8_qdq.bin": (tmp / "model_int8_qdq.bin").stat().st_size,
             "model_int8_qat.bin": (tmp / "model_int8_qat.bin").stat().st_size,
             "nncf_ov.bin": (tmp / "nncf_ov.bin").stat().st_size,
             "ort_qs.onnx": (tmp / "ort_qs.onnx").stat().st_size}
    acc = {}
    if val is not None:
        for name, r in runners.items():
            acc[name] = top1(r, val)
    rows = []
    for name in runners:
        rows.append({"artifact": name, "int8_kernels": kernels[name],
                     **{f"b{b}_ms": lat[name][b] for b in (1, 8)},
                     **{f"b{b}_vs_ort_fp32": round(lat[name][b] / ref_ort[b], 3) for b in (1, 8)},
                     **{f"b{b}_vs_openvino_nncf": round(lat[name][b] / ref_ov[b], 3) for b in (1, 8)},
                     **({} if "error" in floor else {
                         f"b{b}_vs_{kind}_floor": round(lat[name][b] / (floor[f"{kind}_ms"] * b), 2)
                         for kind in ("int8", "fp32") for b in (1, 8)}),
                     "top1": acc.get(name)})
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": THREADS,
                    "python": platform.python_version(), "torch": torch.__version__, "onnxruntime": ort.__version__,
                    "openvino": ov.get_version(), "nncf": nncf.__version__},
        "model": f"resnet18, 10 classes, {args.size} px"
                 + (f", weights {args.weights}" if args.weights else ", random init"),
        "calibration": {"images": len(x), "source": source},
        "ptq_s": {"edgeres (default method) fold->PTQ": round(t_edgeres, 1), "NNCF OpenVINO": round(t_nncf_ov, 1),
                  "ORT quantize_static": round(t_ort_qs, 1),
                  "edgeres CPU artifact (NNCF OpenVINO PTQ + save)": round(t_cpu_export, 1),
                  "edgeres Q/DQ -> IR conversion": round(t_qdq_export, 1),
                  "edgeres / NNCF-OpenVINO": round(t_edgeres / t_nncf_ov, 2)},
        "sizes_bytes": sizes, "int8_onnx_vs_fp32_size": round(sizes["model_int8.onnx"] / sizes["model_fp32.onnx"], 3),
        "floor": floor, "rows": rows, "rounds": rounds,
    }
    stem = "cpu_int8" if args.size == 224 else f"cpu_int8_{args.size}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = ["| artifact / runtime | INT8 kernels | b1 ms | b1 vs ORT FP32 | b1 vs OV-NNCF | b8 ms | b8 vs ORT FP32 | "
          "b8 vs OV-NNCF | b1 / b8 vs INT8 floor | b1 / b8 vs FP32 floor | top-1 |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['artifact']} | {r['int8_kernels'] or '-'} | {r['b1_ms']} | {r['b1_vs_ort_fp32']} | "
                  f"{r['b1_vs_openvino_nncf']} | {r['b8_ms']} | {r['b8_vs_ort_fp32']} | {r['b8_vs_openvino_nncf']} | "
                  f"{r.get('b1_vs_int8_floor', '-')} / {r.get('b8_vs_int8_floor', '-')} | "
                  f"{r.get('b1_vs_fp32_floor', '-')} / {r.get('b8_vs_fp32_floor', '-')} | "
                  f"{r['top1'] if r['top1'] is not None else '-'} |")
    md.append("")
    if "error" in floor:
        md.append(f"floor: not measured ({floor['error']})")
    else:
        md.append(f"floor (batch 1; x8 at batch 8): FP32 {floor['fp32_ms']} ms ({floor['fp32_peak_gmacs']} G MAC/s), "
                  f"INT8 {floor['int8_ms']} ms ({floor['int8_peak_gmacs']} G MAC/s, exact u8 x s8), int16-accumulating "
                  f"bound {floor['int8_add16_ms']} ms ({floor['int8_add16_peak_gmacs']} G MAC/s); "
                  f"INT8 floor / ORT FP32 b1 {round(floor['int8_ms'] / ref_ort[1], 3)}")
    md.append(f"PTQ s: {result['ptq_s']}; INT8 ONNX / FP32 size {result['int8_onnx_vs_fp32_size']}")
    (out / f"{stem}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
