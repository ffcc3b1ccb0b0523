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
    assert text.splitlines()[-1] == "PASSED: all gates passed"   # no train record: nothing said about FP32


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


def test_a_drop_gate_finer_than_its_sampling_noise_is_not_measurable():
    """500 images with 3 % disagreeing with FP32: the drop's noise is up to 100*sqrt(0.03/500) = 0.77 pp, so a
    0.2 pp limit measures luck; with 0.4 % disagreeing (0.28 pp) a 1.0 pp limit is measurable, and with none
    disagreeing there is no noise at all."""
    def rec(agree: float, limit: float) -> StageRecord:
        r = StageRecord(stage="qat", metrics={"n_eval": 500, "top1": 70.0, "top1_agreement_pct": agree})
        r.gates.append({"name": "top1_drop_pp", "value": 0.0, "limit": limit, "op": "<=", "passed": True})
        return r

    noisy = build_report(Path("."), [rec(97.0, 0.2)], ok=True, message="all gates passed")["unmeasurable"]
    assert len(noisy) == 1 and "sampling noise (±0.77 pp: 3.0 % of 500 images disagree" in noisy[0]
    assert build_report(Path("."), [rec(99.6, 1.0)], ok=True, message="all gates passed")["unmeasurable"] == []
    assert build_report(Path("."), [rec(100.0, 0.2)], ok=True, message="all gates passed")["unmeasurable"] == []


def test_the_verdict_states_what_fp32_scored():
    train = StageRecord(stage="train", metrics={"fp32_top1_pct": 40.0, "n_eval": 60, "chance_pct": 33.3333})
    rep = build_report(Path("."), [train], ok=False, message="train: FP32 top-1 40.0 % is not clearly above chance")
    assert rep["fp32"] == {"top1_pct": 40.0, "n": 60, "chance_pct": 33.3333}
    last = format_table(rep).splitlines()[-1]
    assert last.startswith("FAILED: train:") and last.endswith("(FP32 top-1 40.0 % on 60 images, chance 33.3 %)")
