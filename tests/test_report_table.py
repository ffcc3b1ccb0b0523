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
    text = format_table(rep)
    assert max(len(line) for line in text.splitlines()) <= 120
    assert text.count("latency varied") == 1 and "train/torch 27.2 %" in text and "export_cpu/openvino 98.5 %" in text
    header = text.splitlines()[0]
    assert "×FP32" in header and "agree %" in header
    cpu = next(line for line in text.splitlines() if line.startswith("export_cpu"))
    assert "1.50x" in cpu, "the CPU artifact's speed-up is over ONNX Runtime FP32 (0.3 / 0.2 ms)"
    assert "4,361" in cpu and "0.20" in cpu
    assert text.splitlines()[-1] == "PASSED: all gates passed"


def test_a_gate_finer_than_one_image_is_not_measurable():
    fine = StageRecord(stage="qat", metrics={"n_eval": 60, "top1": 90.0})
    fine.gates.append({"name": "top1_drop_pp", "value": 0.0, "limit": 0.2, "op": "<=", "passed": True})
    rep = build_report(Path("."), [fine], ok=True, message="all gates passed")
    assert rep["unmeasurable"] == ["qat top1_drop_pp <= 0.2 pp is finer than one image of 60 (1.67 pp)"]
    text = format_table(rep)
    assert text.splitlines()[-1].startswith("NOT MEASURABLE: every gate passed, but 1 of them cannot be measured")
    coarse = StageRecord(stage="qat", metrics={"n_eval": 359, "top1": 90.0})
    coarse.gates.append({"name": "top1_drop_pp", "value": 0.0, "limit": 1.0, "op": "<=", "passed": True})
    assert build_report(Path("."), [coarse], ok=True, message="all gates passed")["unmeasurable"] == []
