"""One rule for every gate (edgeres/stats.py): a value's confidence interval against its limit decides PASSED, FAILED
or NOT MEASURABLE; paired decisions on the same images for drops and agreements; constructed decision vectors at
small and large N."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from edgeres import stats
from edgeres.records import Gate, StageRecord, add_fp32_gates, drop_gate, proportion_gate
from edgeres.report import build_report, format_table, verdict_parts


def decisions(*, a: int, b: int, c: int, d: int, classes: int = 10, seed: int = 0):
    """Labels, FP32 predictions and INT8 predictions with exactly a images both right, b only FP32 right, c only
    INT8 right and d both wrong (both wrong: the same wrong class)."""
    rng = np.random.default_rng(seed)
    n = a + b + c + d
    y = rng.integers(0, classes, n)
    wrong = (y + 1) % classes
    ref = np.concatenate([y[:a], y[a:a + b], wrong[a + b:a + b + c], wrong[a + b + c:]])
    other = np.concatenate([y[:a], wrong[a:a + b], y[a + b:a + b + c], wrong[a + b + c:]])
    return y, ref, other


def logits_of(pred, classes: int = 10):
    out = np.zeros((len(pred), classes), np.float32)
    out[np.arange(len(pred)), pred] = 5.0
    return out


def test_paired_counts_from_decisions():
    y, ref, other = decisions(a=50, b=7, c=3, d=40)
    p = stats.paired(ref.tolist(), other.tolist(), y.tolist())
    assert (p.a, p.b, p.c, p.d, p.n) == (50, 7, 3, 40, 100)
    assert p.drop_pp == pytest.approx(4.0) and p.agree == 90   # both-wrong images predict the same class here


@pytest.mark.parametrize("a, b, c, d, limit, outcome", [
    # a real 2 pp loss on 2,000 images fails a 1 pp limit: the whole interval lies above it
    (1700, 50, 10, 240, 1.0, stats.FAILED),
    # the same share on 200 images straddles it: cannot tell
    (170, 5, 1, 24, 1.0, stats.NOT_MEASURABLE),
    # no decision changed on 2,000 images: within 1 pp (the interval still has the width 2,000 images leave)
    (1800, 0, 0, 200, 1.0, stats.PASSED),
    # ... but a 0.2 pp limit on 82 images can never be shown, even with nothing changed
    (55, 0, 0, 27, 0.2, stats.NOT_MEASURABLE),
    # one image of 82 lost: 1.22 pp, NOT MEASURABLE against 0.2 pp (it failed before this rule)
    (54, 1, 0, 27, 0.2, stats.NOT_MEASURABLE),
    # a 30 pp collapse on 82 images fails even there
    (30, 25, 0, 27, 1.0, stats.FAILED),
])
def test_drop_gate_outcomes(a, b, c, d, limit, outcome):
    p = stats.Paired(a, b, c, d, a + d)
    g = drop_gate(p, limit, level=0.95)
    assert g.outcome == outcome, (g.lo, g.hi)
    assert g.lo <= g.value <= g.hi and g.n == a + b + c + d
    assert g.passed == (outcome != stats.FAILED)
    if outcome == stats.NOT_MEASURABLE:
        assert g.resolve_n and g.resolve_n > g.n or g.resolve_n is None


def test_images_to_resolve_decides_the_gate_at_those_rates():
    p = stats.Paired(170, 5, 1, 24, 194)
    need = stats.drop_gate_numbers(p, 1.0)["resolve_n"]
    assert need is not None and need > 200
    f = need / p.n
    assert stats.decide(*stats.paired_drop_interval(p.scaled(f)), "<=", 1.0) == stats.FAILED
    assert stats.decide(*stats.paired_drop_interval(p.scaled(f * 0.9)), "<=", 1.0) == stats.NOT_MEASURABLE
    on_limit = stats.Paired(90, 1, 0, 9, 99)   # 1.00 pp observed against a 1 pp limit: no N decides it
    assert stats.drop_gate_numbers(on_limit, 1.0)["resolve_n"] is None


@pytest.mark.parametrize("k, n, limit, outcome", [
    (2000, 2000, 99.0, stats.PASSED), (359, 359, 95.0, stats.PASSED), (32, 32, 90.0, stats.NOT_MEASURABLE),
    (64, 64, 90.0, stats.PASSED), (1800, 2000, 95.0, stats.FAILED), (76, 82, 95.0, stats.NOT_MEASURABLE)])
def test_agreement_gate_outcomes(k, n, limit, outcome):
    g = proportion_gate("top1_agreement_pct", k, n, limit, level=0.95)
    assert g.outcome == outcome and g.lo <= g.value <= g.hi


def test_the_level_widens_or_narrows_the_interval():
    p = stats.Paired(170, 5, 1, 24, 194)
    lo95, hi95 = stats.paired_drop_interval(p, 0.95)
    lo50, hi50 = stats.paired_drop_interval(p, 0.5)
    assert lo95 < lo50 < p.drop_pp < hi50 < hi95
    with pytest.raises(ValueError):
        stats.z_value(1.0)


def test_an_exact_gate_is_passed_or_failed_never_not_measurable():
    assert Gate("flips", 0, 0, "<=").outcome == stats.PASSED
    assert Gate("flips", 1, 0, "<=").outcome == stats.FAILED


def test_a_required_gate_that_cannot_be_shown_stops():
    g = proportion_gate("fp32_top1_pct", 22, 82, 20.0, level=0.95, required=True)   # 26.8 % vs chance 20 %
    assert g.outcome == stats.NOT_MEASURABLE and not g.passed


def _settings(**kw):
    base = dict(max_drop=1.0, drop_source="gates.max_drop_qat", min_agreement_pct=95.0, level=0.95,
                origins={"gates.max_drop_qat": "--gate max_drop_qat=1"})
    return SimpleNamespace(**{**base, **kw})


def _record(a, b, c, d, **kw) -> StageRecord:
    y, ref, other = decisions(a=a, b=b, c=c, d=d)
    rec = StageRecord(stage="qat")
    ev = SimpleNamespace(top1=100.0 * float(np.mean(other == y)), logits=logits_of(other), labels=y)
    add_fp32_gates(rec, ev, 100.0 * float(np.mean(ref == y)), logits_of(ref), _settings(**kw))
    return rec


def test_fp32_gates_from_decision_vectors_small_and_large():
    small = _record(70, 1, 0, 11)            # 82 images, one lost: cannot tell against 1 pp
    assert small.passed and [g["outcome"] for g in small.gates] == [stats.NOT_MEASURABLE, stats.NOT_MEASURABLE]
    large = _record(1700, 50, 10, 240)       # 2,000 images, 2 pp lost: fails, and says so in words
    assert not large.passed
    assert large.message.startswith("qat: top-1 drop vs FP32 2.00 pp (95 % interval ")
    assert "2,000 images): the whole interval lies above the limit of 1.00 pp" in large.message
    assert "from --gate max_drop_qat=1; change it with --gate max_drop_qat=VALUE" in large.message
    assert large.metrics["paired"]["only_reference_right"] == 50
    fine = _record(1800, 0, 0, 200)
    assert fine.passed and all(g["outcome"] == stats.PASSED for g in fine.gates)


def test_report_reads_not_measurable_and_names_each_gate_with_the_images_that_would_decide_it():
    rec = _record(70, 1, 0, 11)
    rep = build_report(Path("."), [rec], ok=True, message="all gates passed")
    word, text = verdict_parts(rep)
    assert word == "NOT MEASURABLE" and rep["verdict"] == word
    assert text.startswith("no gate failed, but 2 cannot be decided with these images: qat top-1 drop vs FP32 1.22 pp")
    assert "images would decide it" in text
    lines = format_table(rep).splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("NOT MEASURABLE: no gate failed"))
    assert all(line.startswith("  ") for line in lines[first + 1:])   # the verdict is the last thing printed


def test_a_class_finding_is_never_a_plain_passed_and_loosened_limits_are_named(tmp_path):
    from edgeres.records import write_plan

    verify = StageRecord(stage="verify", metrics={
        "rows": [], "class_findings": [{"class": "tench", "kind": "fp32_never_right", "n": 2,
                                        "text": "class 'tench': FP32 never right (0 of 2 evaluation images)"}]})
    write_plan(tmp_path, ["verify"], limits={"loosened": [{"key": "gates.max_drop_qat", "what": "x", "value": 3.0,
                                                           "shipped": 1.0, "origin": "--gate max_drop_qat=3"}],
                                             "confidence": 0.95})
    rep = build_report(tmp_path, [verify], ok=True, message="all gates passed")
    word, text = verdict_parts(rep)
    assert word == "PASSED WITH WARNINGS" and "class 'tench': FP32 never right" in text
    assert "limits loosened: gates.max_drop_qat 3 (shipped 1, from --gate max_drop_qat=3)" in text
    assert rep["limits_loosened"][0]["key"] == "gates.max_drop_qat"


def test_a_failed_int8_gate_on_a_weak_fp32_model_names_the_next_step():
    train = StageRecord(stage="train", metrics={"fp32_top1_pct": 34.8, "n_eval": 66, "chance_pct": 20.0})
    rep = build_report(Path("."), [train], ok=False, message="qat: top-1 agreement with FP32 71.21 % ...")
    word, text = verdict_parts(rep)
    assert word == "FAILED" and "The FP32 model is weak (34.8 %, chance 20.0 %)" in text
    assert "edgeres weights fetch resnet18" in text
    strong = StageRecord(stage="train", metrics={"fp32_top1_pct": 92.0, "n_eval": 66, "chance_pct": 20.0})
    assert "weak" not in verdict_parts(build_report(Path("."), [strong], ok=False, message="qat: x"))[1]
    assert "weak" not in verdict_parts(build_report(Path("."), [train], ok=False, message="fold: x"))[1]


def test_higher_accuracy_but_failed_is_explained_on_the_verdict_line():
    rec = _record(200, 10, 16, 74, min_agreement_pct=95.0)   # INT8 +2 pp, but 26 of 300 decisions changed
    assert not rec.passed and rec.metrics["drop_pp"] < 0
    word, text = verdict_parts(build_report(Path("."), [rec], ok=False, message=rec.message))
    assert word == "FAILED" and "Its top-1 is 2.00 pp above FP32's, yet it changes" in text
    assert "it trades right answers for others" in text
