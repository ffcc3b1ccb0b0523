"""The terminal table people read: within 120 columns, notes wrapped, one latency note for all rows, speed-ups."""
from __future__ import annotations

from pathlib import Path

from edgeres.records import StageRecord
from edgeres.report import build_report, format_table


def _rows():
    warn = "latency CV {} % > 10 %: the numbers are unstable (other load on the machine); run longer or quieter"
    return [
        {"stage": "train", "backend": "torch", "precision": "fp32", "top1": 98.61, "p50_ms": 5.0, "p99_ms": 10.25,
         "img_s": 191.0, "size_mb": 44.779, "latency_warning": warn.format("27.2")},
        {"stage": "ptq", "backend": "torch", "precision": "int8 (fake-quant)", "top1": 98.3, "size_mb": 44.8},
        {"stage": "export_fp32", "backend": "onnxruntime", "precision": "fp32", "top1": 98.61, "p50_ms": 0.3,
         "p99_ms": 0.63, "img_s": 3074.0, "size_mb": 44.693, "latency_warning": warn.format("59.8")},
        {"stage": "export_cpu", "backend": "openvino", "precision": "int8", "top1": 98.89, "p50_ms": 0.2,
         "p99_ms": 0.37, "img_s": 4361.0, "size_mb": 11.358, "int8_kernels": "21/21",
         "latency_warning": warn.format("98.5")},
    ]


def test_table_fits_120_columns_and_merges_the_latency_notes():
    verify = StageRecord(stage="verify", metrics={"rows": _rows(), "bench": None})
    long = "x " * 150
    skipped = StageRecord(stage="compile", status="skipped", message=f"TensorRT engine not built: {long}")
    rep = build_report(Path("."), [skipped, verify], ok=True, message="all gates passed")
    text = format_table(rep, width=120)
    assert max(len(line) for line in text.splitlines()) <= 120 and "left out" not in text
    narrow = format_table(rep, width=80)   # an 80-column terminal: the least needed columns go, said once
    assert max(len(line) for line in narrow.splitlines()) <= 80
    assert "(left out at 80 columns: INT8 ops, p99 ms" in narrow and "top-1 %" in narrow.splitlines()[0]
    assert text.count("latency varied") == 1 and "train/torch 27.2 %" in text and "export_cpu/openvino 98.5 %" in text
    header = text.splitlines()[0]
    assert "×FP32" in header and "agree %" in header
    cpu = next(line for line in text.splitlines() if line.startswith("export_cpu"))
    assert "1.50x" in cpu, "the CPU artifact's speed-up is over ONNX Runtime FP32 (0.3 / 0.2 ms)"
    assert "4,361" in cpu and "0.20" in cpu
    assert text.splitlines()[-1] == "PASSED: all gates passed"   # no train record: nothing said about FP32


def test_the_verdict_states_what_fp32_scored():
    train = StageRecord(stage="train", metrics={"fp32_top1_pct": 40.0, "n_eval": 60, "chance_pct": 33.3333})
    rep = build_report(Path("."), [train], ok=False, message="train: FP32 top-1 40.0 % is not clearly above chance")
    assert rep["fp32"] == {"top1_pct": 40.0, "n": 60, "chance_pct": 33.3333}
    last = format_table(rep, width=120).splitlines()[-1]
    assert last.startswith("FAILED: train:") and last.endswith("(FP32 top-1 40.0 % on 60 images, chance 33.3 %)")
