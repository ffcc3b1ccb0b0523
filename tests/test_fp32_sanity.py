"""Gates on the FP32 model itself: a model that did not learn fails its build at train, in words a user reads."""
from __future__ import annotations

import numpy as np
import pytest

from edgeres.evaluate import metrics_from_logits
from edgeres.recipe import GatesCfg
from edgeres.records import StageRecord
from edgeres.train import fp32_sanity


def _eval(correct: int, n: int, classes: int):
    logits = np.zeros((n, classes), np.float32)
    labels = np.zeros(n, np.int64)
    logits[:correct, 0] = 1.0          # right for the first `correct` images
    logits[correct:, 1] = 1.0
    return metrics_from_logits(logits, labels, classes)


def test_chance_gate_scales_with_classes_and_images():
    rec = StageRecord(stage="train")
    fp32_sanity(rec, _eval(24, 60, 3), GatesCfg(), 3, [])        # 40 % with 3 classes on 60 images
    assert not rec.passed
    assert rec.message.startswith("train: FP32 top-1 40.0 % on 60 images is not clearly above chance (33.3 % for 3 "
                                  "classes; needs >= 51.6 %)")
    ok = StageRecord(stage="train")
    fp32_sanity(ok, _eval(36, 60, 3), GatesCfg(), 3, [])         # 60 %: clearly above
    assert ok.passed and ok.metrics["chance_pct"] == pytest.approx(33.3333, abs=1e-3)
    off = StageRecord(stage="train")
    fp32_sanity(off, _eval(24, 60, 3), GatesCfg(fp32_over_chance_sigma=0.0), 3, [])
    assert off.passed, "0 turns the gate off"


def test_loss_must_fall():
    rec = StageRecord(stage="train")
    fp32_sanity(rec, _eval(50, 60, 3), GatesCfg(), 3, [{"train_loss": 4865.0}, {"train_loss": 10249.0}])
    assert not rec.passed and "the training loss did not fall (epoch 1: 4865, last: 1.025e+04)" in rec.message
    nan = StageRecord(stage="train")
    fp32_sanity(nan, _eval(50, 60, 3), GatesCfg(), 3, [{"train_loss": 2.0}, {"train_loss": float("nan")}])
    assert not nan.passed
    fine = StageRecord(stage="train")
    fp32_sanity(fine, _eval(50, 60, 3), GatesCfg(), 3, [{"train_loss": 2.0}, {"train_loss": 0.5}])
    assert fine.passed
