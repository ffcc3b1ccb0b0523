"""Gates on the FP32 model itself: a model that did not learn fails its build at train, in words a user reads."""
from __future__ import annotations

import numpy as np
import pytest

from edgeres.evaluate import metrics_from_logits
from edgeres.records import StageRecord
from edgeres.train import fp32_sanity


def _eval(correct: int, n: int, classes: int):
    logits = np.zeros((n, classes), np.float32)
    labels = np.zeros(n, np.int64)
    logits[:correct, 0] = 1.0          # right for the first `correct` images
    logits[correct:, 1] = 1.0
    return metrics_from_logits(logits, labels, classes)


def _settings(**kw):
    from edgeres.train import TrainSettings

    return TrainSettings(**kw)


def test_chance_gate_is_decided_by_the_interval_and_names_the_next_step():
    rec = StageRecord(stage="train")
    fp32_sanity(rec, _eval(24, 60, 3), _settings(), 3, [])        # 40 % with 3 classes on 60 images
    assert not rec.passed and rec.gates[0]["outcome"] == "not measurable" and rec.gates[0]["required"]
    assert rec.message.startswith("train: FP32 top-1 40.0 % on 60 images (95 % interval 28.6 to 52.6 %) cannot be told "
                                  "from chance (33.3 % for 3 classes); about ")
    assert "--epochs" in rec.message and "--init-from torchvision:resnet18" in rec.message
    below = StageRecord(stage="train")
    fp32_sanity(below, _eval(5, 60, 3), _settings(), 3, [])        # 8 %: the whole interval below chance
    assert not below.passed and "is not above chance" in below.message
    ok = StageRecord(stage="train")
    fp32_sanity(ok, _eval(36, 60, 3), _settings(), 3, [])          # 60 %: clearly above
    assert ok.passed and ok.metrics["chance_pct"] == pytest.approx(33.3333, abs=1e-3)
    more = StageRecord(stage="train")
    fp32_sanity(more, _eval(240, 600, 3), _settings(), 3, [])       # the same 40 % on 600 images is shown
    assert more.passed
    off = StageRecord(stage="train")
    fp32_sanity(off, _eval(24, 60, 3), _settings(fp32_over_chance_sigma=0.0), 3, [])
    assert off.passed, "0 turns the gate off"


def test_loss_must_fall():
    rec = StageRecord(stage="train")
    fp32_sanity(rec, _eval(50, 60, 3), _settings(), 3, [{"train_loss": 4865.0}, {"train_loss": 10249.0}])
    assert not rec.passed and "the training loss did not fall (epoch 1: 4865, last: 1.025e+04)" in rec.message
    nan = StageRecord(stage="train")
    fp32_sanity(nan, _eval(50, 60, 3), _settings(), 3, [{"train_loss": 2.0}, {"train_loss": float("nan")}])
    assert not nan.passed
    fine = StageRecord(stage="train")
    fp32_sanity(fine, _eval(50, 60, 3), _settings(), 3, [{"train_loss": 2.0}, {"train_loss": 0.5}])
    assert fine.passed
