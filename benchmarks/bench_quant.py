"""Benchmark of fold -> PTQ -> (QAT) -> export, accuracy measured on the exported ONNX in ONNX Runtime.

    .venv/bin/python benchmarks/bench_quant.py --out DIR [--quick] [--imagenette-weights best.pt]

Cases: the embedded default (sklearn digits, resnet18 at 32 px, 1 channel), the MNIST ResNet on real
MNIST and resnet18 on imagenette-mini (both from ../shared/data; skipped with a reason if absent).
Each FP32 model is trained here with a short plain loop (the benchmark is about quantization, not
training), except imagenette with --imagenette-weights: a checkpoint from
`edgeres train --recipe imagenette_resnet18 ...` (30 epochs, about 30 min on 2 cores) goes through
`edgeres build --pretrained` itself, PTQ-only first, then with the recipe's QAT. Targets: PTQ INT8 top-1
within 0.5 pp of FP32, QAT within 0.2 pp, both on the INT8 ONNX run by ONNX Runtime. Also: wall time of
fold + PTQ + export for resnet18 at 224 px with 2 threads (percentile and minmax calibration).
Writes DIR/quant.json and prints a summary.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NNCF_CI", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data"
PTQ_TARGET_PP, QAT_TARGET_PP = 0.5, 0.2


def train_fp32(model, data, *, epochs: int, lr: float, batch_size: int = 64, max_images: int | None = None,
               seed: int = 0):
    import torch

    from edgeres.data import make_loader

    torch.manual_seed(seed)
    train = data.train
    if max_images and len(train) > max_images:
        train = torch.utils.data.Subset(train, list(range(0, len(train), len(train) // max_images))[:max_images])
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = epochs * -(-len(train) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.2)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.05)
    for epoch in range(epochs):
        model.train()
        for x, y in make_loader(train, batch_size=batch_size, shuffle=True, seed=seed, epoch=epoch):
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()
            sched.step()
    return model.eval()


def ort_top1(path, dataset, threads: int = 2) -> float:
    import numpy as np

    from edgeres.data import make_loader
    from edgeres.verify import ort_logits, ort_session

    sess = ort_session(path, threads=threads)
    correct = n = 0
    for x, y in make_loader(dataset, batch_size=128, shuffle=False):
        pred = ort_logits(sess, x.numpy()).argmax(1)
        correct += int((pred == np.asarray(y)).sum())
        n += len(y)
    return 100.0 * correct / max(n, 1)


def run_case(name, arch, data, *, epochs, lr, qat_epochs, qat_lr, calib, max_train=None, qat_max=None, work):
    import torch

    from edgeres.checkpoint import ModelMeta
    from edgeres.export import ExportInputs, ExportSettings, export_onnx
    from edgeres.export import run as export_stage
    from edgeres.fold import fold_batchnorm, fold_gate
    from edgeres.models import create_model
    from edgeres.quantize import load_quantized, quantize_ptq, quantize_qat, save_quantized

    info = data.info
    meta = ModelMeta(arch=arch, num_classes=info.num_classes, in_channels=info.in_channels,
                     input_size=info.input_size, mean=info.mean, std=info.std, class_names=info.class_names,
                     resize_size=info.resize_size, dataset=info.name)
    t = time.perf_counter()
    model = train_fp32(create_model(arch, num_classes=info.num_classes, in_channels=info.in_channels), data,
                       epochs=epochs, lr=lr, max_images=max_train)
    row = {"case": name, "arch": arch, "dataset": info.name, "input_size": info.input_size,
           "train_images": min(len(data.train), max_train or len(data.train)), "test_images": len(data.test),
           "fp32_epochs": epochs, "train_s": round(time.perf_counter() - t, 1)}
    probe = torch.stack([data.test[i][0] for i in range(min(64, len(data.test)))])
    t = time.perf_counter()
    fold = fold_batchnorm(model)
    row["fold_metrics"], gates = fold_gate(model, fold.model, probe)
    row["fold_gates_passed"] = all(g.passed for g in gates)
    fp32_path = export_onnx(fold.model, work / f"{name}_fp32.onnx", meta=meta, int8=False)
    ptq = quantize_ptq(fold.model, data.calib, subset_size=min(calib, len(data.calib)), seed=0,
                       dataset_fingerprint=info.fingerprint)
    save_quantized(work / f"{name}_ptq.pt", ptq.model, meta)  # QAT starts from a reloaded copy
    ptq_export = export_stage(ExportInputs(ptq.model, meta, [(p, 0) for p in probe], work / f"{name}_ptq.onnx"),
                              ExportSettings(int8=True))
    ptq_path = ptq_export.output.path   # the rejected graph when the check failed (ptq_verify_passed says)
    row["fold_ptq_export_s"] = round(time.perf_counter() - t, 1)
    row["fp32_onnx_top1"] = ort_top1(fp32_path, data.test)
    row["ptq_int8_onnx_top1"] = ort_top1(ptq_path, data.test)
    row["ptq_verify"] = ptq_export.record.metrics
    row["ptq_verify_passed"] = ptq_export.record.passed
    row["ptq_drop_pp"] = round(row["fp32_onnx_top1"] - row["ptq_int8_onnx_top1"], 3)
    row["ptq_within_target"] = row["ptq_drop_pp"] <= PTQ_TARGET_PP
    if qat_epochs:
        t = time.perf_counter()
        qmodel, _, _ = load_quantized(work / f"{name}_ptq.pt")
        train = data.train
        if qat_max and len(train) > qat_max:
            train = torch.utils.data.Subset(train, list(range(0, len(train), len(train) // qat_max))[:qat_max])
        # distils the folded FP32 model, selects on held-out training images (the test split is only reported)
        qat = quantize_qat(qmodel, train, data.holdout, teacher=fold.model, epochs=qat_epochs, lr=qat_lr,
                           batch_size=64, quiet=True)
        qat_path = export_onnx(qat.model, work / f"{name}_qat.onnx", meta=meta, int8=True)
        row["qat_s"] = round(time.perf_counter() - t, 1)
        row["qat_history"] = qat.history
        row["qat_int8_onnx_top1"] = ort_top1(qat_path, data.test)
        row["qat_drop_pp"] = round(row["fp32_onnx_top1"] - row["qat_int8_onnx_top1"], 3)
        row["qat_within_target"] = row["qat_drop_pp"] <= QAT_TARGET_PP
    return row


def _int8_check(records: dict) -> dict:
    """export_int8's INT8-vs-fake-quant figures: gated agreement, ONNX Runtime's fused kernels', max|diff|."""
    keys = ("top1_agreement_pct", "optimized_top1_agreement_pct", "n_compared", "max_abs_diff")
    return {k: records["export_int8"].metrics[k] for k in keys}


def build_case(name, *, recipe, dataset, data_dir, weights, calib_method, qat_epochs, work):
    """The product itself on a trained checkpoint: `edgeres build --pretrained W --int8` twice in one run folder,
    first PTQ only (--qat-epochs 0), then with QAT (train, fold and PTQ reused). Accuracy of each exported ONNX is
    measured here on ONNX Runtime whatever the build's gates said; the gates are recorded."""
    from edgeres.build import BuildOptions, build
    from edgeres.data import get_data_for
    from edgeres.recipe import load_recipe
    from edgeres.records import read_records

    run = work / name
    common = dict(out=run, recipe=recipe, dataset=dataset, data_dir=data_dir, pretrained=Path(weights), int8=True,
                  calib_method=calib_method, quiet=True, bench_seconds=0, max_drop=100.0)
    row = {"case": name, "recipe": recipe, "pretrained": str(weights)}
    t = time.perf_counter()
    first = build(BuildOptions(**common, qat_epochs=0))
    row["fold_ptq_export_s"] = round(time.perf_counter() - t, 1)
    used = load_recipe(run / "recipe.yaml")
    data = get_data_for(used)
    by = {r.stage: r for r in read_records(run)}
    row.update(calib_method=used.quant.calib_method, calib_size=used.quant.calib_size, qat_lr=used.quant.qat_lr,
               fp32_epochs=used.train.epochs)
    row.update(input_size=data.info.input_size, test_images=len(data.test), dataset=data.info.name,
               fp32_onnx_top1=ort_top1(by["export_fp32"].artifact, data.test),
               ptq_int8_onnx_top1=ort_top1(by["export_int8"].artifact, data.test),
               ptq_fake_quant_top1=by["ptq"].metrics["top1"], ptq_build_ok=first.ok, ptq_build_message=first.message,
               ptq_verify=_int8_check(by))
    row["ptq_drop_pp"] = round(row["fp32_onnx_top1"] - row["ptq_int8_onnx_top1"], 3)
    row["ptq_within_target"] = row["ptq_drop_pp"] <= PTQ_TARGET_PP
    if qat_epochs != 0:
        t = time.perf_counter()
        second = build(BuildOptions(**common, qat_epochs=qat_epochs))
        row["qat_s"] = round(time.perf_counter() - t, 1)
        by = {r.stage: r for r in read_records(run)}
        row.update(qat_history=by["qat"].metrics["history"], qat_fake_quant_top1=by["qat"].metrics["top1"],
                   qat_epochs=by["qat"].metrics["epochs"], qat_best_epoch=by["qat"].metrics["best_epoch"],
                   qat_int8_onnx_top1=ort_top1(by["export_int8"].artifact, data.test), qat_build_ok=second.ok,
                   qat_build_message=second.message,
                   qat_verify=_int8_check(by))
        row["qat_drop_pp"] = round(row["fp32_onnx_top1"] - row["qat_int8_onnx_top1"], 3)
        row["qat_within_target"] = row["qat_drop_pp"] <= QAT_TARGET_PP
    return row


def time_resnet18_pipeline(work, *, calib: int, threads: int = 2, method: str | None = None) -> dict:
    """Wall time of fold + PTQ (calib images at 224 px) + INT8 export for resnet18 with `threads` threads."""
    import torch
    from torch.utils.data import TensorDataset

    from edgeres.checkpoint import ModelMeta
    from edgeres.export import export_onnx
    from edgeres.fold import fold_batchnorm
    from edgeres.models import create_model
    from edgeres.quantize import DEFAULT_CALIB_METHOD, quantize_ptq

    torch.set_num_threads(threads)
    model = create_model("resnet18", num_classes=1000).eval()
    x = torch.randn(calib, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    ds = TensorDataset(x, torch.zeros(calib, dtype=torch.long))
    meta = ModelMeta(arch="resnet18", num_classes=1000, in_channels=3, input_size=224,
                     mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    times = {}
    t0 = time.perf_counter()
    fold = fold_batchnorm(model)
    times["fold_s"] = time.perf_counter() - t0
    t = time.perf_counter()
    method = method or DEFAULT_CALIB_METHOD.value
    ptq = quantize_ptq(fold.model, ds, subset_size=calib, method=method, quiet=True)
    times["ptq_s"] = time.perf_counter() - t
    t = time.perf_counter()
    export_onnx(ptq.model, work / "r18_int8.onnx", meta=meta, int8=True)
    times["export_s"] = time.perf_counter() - t
    times["total_s"] = time.perf_counter() - t0
    return {"threads": threads, "calib_images": calib, "input_size": 224, "calib_method": method,
            **{k: round(v, 2) for k, v in times.items()}}


def _timing(results, work, quick) -> None:
    """The default calibration (percentile) and minmax: quantiles cost more than a running min / max."""
    for key, method in (("resnet18_fold_ptq_export", None), ("resnet18_fold_ptq_export_minmax", "minmax")):
        r = results[key] = time_resnet18_pipeline(work, calib=128 if quick else 512, method=method)
        print(f"resnet18 224px fold+PTQ({r['calib_images']} images, {r['calib_method']})+export on {r['threads']} "
              f"threads: {r['total_s']:.1f}s (fold {r['fold_s']:.1f}, ptq {r['ptq_s']:.1f}, export "
              f"{r['export_s']:.1f})", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="smaller training, calibration and QAT")
    ap.add_argument("--cases", default="digits,mnist,timing,imagenette",
                    help="comma-separated subset of: digits, mnist, timing, imagenette")
    ap.add_argument("--imagenette-weights", default=None,
                    help="a resnet18 trained with `edgeres train --recipe imagenette_resnet18`: the imagenette "
                         "case then runs `edgeres build --pretrained` on it instead of a short from-scratch training")
    ap.add_argument("--calib-method", default=None, help="--imagenette-weights case: range estimator (the recipe's)")
    ap.add_argument("--qat-epochs", type=int, default=None, help="--imagenette-weights case: QAT epochs (the recipe's)")
    args = ap.parse_args(argv)
    import torch

    from edgeres.data import get_data, split_holdout
    from edgeres.env import environment
    from edgeres.io import atomic_write_json

    torch.set_num_threads(2)
    quick = args.quick
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    wanted = {c.strip() for c in args.cases.split(",") if c.strip()}
    results = {"quick": quick, "targets_pp": {"ptq": PTQ_TARGET_PP, "qat": QAT_TARGET_PP}, "cases": [],
               "skipped": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cases = []
        if "digits" in wanted:
            cases.append(("digits_resnet18", "resnet18",
                          lambda: split_holdout(get_data(dataset="digits", input_size=32, in_channels=1), 0.1, seed=0),
                          dict(epochs=8 if quick else 15, lr=0.05, qat_epochs=1 if quick else 3, qat_lr=1e-3,
                               calib=512)))
        if "mnist" not in wanted:
            pass
        elif (SHARED / "mnist").is_dir():
            cases.append(("mnist_mnist_resnet", "mnist_resnet",
                          lambda: split_holdout(get_data(dataset="mnist", data_dir=str(SHARED / "mnist"),
                                                         download=False), 0.1, seed=0),
                          dict(epochs=1 if quick else 2, lr=0.05, qat_epochs=1, qat_lr=1e-4, calib=512,
                               max_train=10000 if quick else None, qat_max=2000 if quick else 20000)))
        else:
            results["skipped"]["mnist_mnist_resnet"] = f"{SHARED / 'mnist'} not found"
        if "imagenette" not in wanted:
            pass
        elif not (SHARED / "imagenette-mini").is_dir():
            results["skipped"]["imagenette_resnet18"] = f"{SHARED / 'imagenette-mini'} not found"
        elif args.imagenette_weights:
            cases.append(("imagenette_resnet18_build", None, None,
                          dict(recipe="imagenette_resnet18", dataset="imagefolder",
                               data_dir=str(SHARED / "imagenette-mini"), weights=args.imagenette_weights,
                               calib_method=args.calib_method, qat_epochs=args.qat_epochs)))
        else:
            side = 112 if quick else 160
            cases.append(("imagenette_resnet18", "resnet18",
                          lambda: get_data(dataset="imagefolder", data_dir=str(SHARED / "imagenette-mini"),
                                           input_size=side, resize_size=side * 8 // 7, cache=True),
                          dict(epochs=3 if quick else 10, lr=0.1, qat_epochs=1, qat_lr=1e-4, calib=512,
                               qat_max=300 if quick else 2000)))
        for name, arch, load, kw in cases:
            t = time.perf_counter()
            row = build_case(name, work=work, **kw) if arch is None else run_case(name, arch, load(), work=work, **kw)
            row["case_s"] = round(time.perf_counter() - t, 1)
            results["cases"].append(row)
            print(f"{name}: fp32 {row['fp32_onnx_top1']:.2f}%  ptq int8 {row['ptq_int8_onnx_top1']:.2f}% "
                  f"(drop {row['ptq_drop_pp']:+.2f} pp)" + (
                      f"  qat int8 {row['qat_int8_onnx_top1']:.2f}% (drop {row['qat_drop_pp']:+.2f} pp)"
                      if "qat_drop_pp" in row else "") + f"  [{row['case_s']:.0f}s]", flush=True)
            atomic_write_json(out / "quant.json", {**results, "environment": environment()})  # partial results
            if name.startswith("mnist") and "timing" in wanted:
                _timing(results, work, quick)
                atomic_write_json(out / "quant.json", {**results, "environment": environment()})
        if "timing" in wanted and "resnet18_fold_ptq_export" not in results:
            _timing(results, work, quick)
    results["environment"] = environment()
    atomic_write_json(out / "quant.json", results)
    print(f"wrote {out / 'quant.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
