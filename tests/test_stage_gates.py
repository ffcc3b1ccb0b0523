"""A failed gate, stage by stage: the build's own stage (its plan row: settings, inputs, run) with one gate made
impossible to pass ends in a failed record that names its gates, the output path is not written, the rejected
artifact is kept beside it as <name>.rejected.<ext>, and nothing else the stage writes on success (PTQ's
calibration manifest) appears.

One real small `edgeres build --int8` with QAT is the reference; each case runs in a copy of its folder.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from edgeres.build import PLAN, BuildContext, BuildOptions, StageFailed, build, run_stage
from edgeres.data import get_data_for
from edgeres.recipe import TrainCfg, load_recipe
from edgeres.records import read_records

pytestmark = pytest.mark.slow

# stage -> the settings that no artifact can pass (limits outside what a recipe accepts), and the files the stage
# writes on success (relative to the run folder) that must not appear when it fails
IMPOSSIBLE = {
    # train: a learning rate at which nothing is learnt (its top-1 cannot be shown above chance)
    "train": ({"train": TrainCfg(epochs=2, optimizer="sgd", lr=1e-12)}, ["train/best.pt"]),
    "fold": ({"rel_tol": -1.0}, ["fold/folded.pt"]),
    "ptq": ({"max_drop": -100.0}, ["quant/ptq.pt", "calibration/manifest.json"]),
    "qat": ({"min_agreement_pct": 101.0}, ["quant/qat.pt"]),
    "export_fp32": ({"rel_tol": -1.0}, ["export/model_fp32.onnx"]),
    "export_int8": ({"min_agreement_pct": 101.0}, ["export/model_int8.onnx"]),
    "export_cpu": ({"max_drop": -100.0}, ["export/model_int8_cpu.xml", "export/model_int8_cpu.bin"]),
    "verify": ({"max_drop": -100.0}, []),
}
REJECTED = {"train": "train/best.rejected.pt", "fold": "fold/folded.rejected.pt", "ptq": "quant/ptq.rejected.pt",
            "qat": "quant/qat.rejected.pt", "export_fp32": "export/model_fp32.rejected.onnx",
            "export_int8": "export/model_int8.rejected.onnx", "export_cpu": "export/model_int8_cpu.rejected.xml"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    res = build(BuildOptions(out=out, arch="mnist_resnet", epochs=3, qat_epochs=1, int8=True, bench_seconds=0,
                             max_drop=100.0, quiet=True,
                             overrides={"quant.calib_size": 64, "gates.min_agreement_pct": 0.0}))
    assert res.ok, res.message
    return out


def _context(run: Path) -> BuildContext:
    recipe = load_recipe(run / "recipe.yaml")
    ctx = BuildContext(opts=BuildOptions(out=run, int8=True, quiet=True, bench_seconds=0), recipe=recipe,
                       run_dir=run, device="cpu", _data=get_data_for(recipe))
    ctx.records = {r.stage: r for r in read_records(run)}
    return ctx


def test_every_gated_stage_is_covered():
    gated = {s.name for s in PLAN} - {"calib_cache", "compile"}   # compile: tests/test_trt_emulator.py
    assert gated == set(IMPOSSIBLE)


@pytest.mark.parametrize("stage", list(IMPOSSIBLE))
def test_a_failed_gate_leaves_a_failed_record_and_the_rejected_artifact(reference, tmp_path, stage):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    forced, outputs = IMPOSSIBLE[stage]
    for rel in outputs:   # what a passing stage writes: gone now, and it must stay gone
        (run / rel).unlink()
    ctx = _context(run)
    before = len((run / "stages.jsonl").read_text().splitlines())
    step = next(s for s in PLAN if s.name == stage)
    settings = dataclasses.replace(step.settings(ctx), **forced)
    with pytest.raises(StageFailed):
        run_stage(ctx, dataclasses.replace(step, settings=lambda c: settings))
    lines = (run / "stages.jsonl").read_text().splitlines()
    assert len(lines) == before + 1, "one record appended, the failed one"
    rec = json.loads(lines[-1])
    assert rec["stage"] == stage and rec["status"] == "failed" and rec["artifact"] is None
    assert rec["gates"] and not all(g["passed"] for g in rec["gates"]), rec["gates"]
    assert rec["message"].startswith(stage.split("_")[0]), rec["message"]
    for rel in outputs:
        assert not (run / rel).exists(), f"{stage} wrote {rel} although its gate failed"
    if stage in REJECTED:
        rejected = run / REJECTED[stage]
        assert rejected.is_file() and rec["extra_artifacts"]["rejected"].endswith(REJECTED[stage])
        assert str(rejected.name) in rec["message"]
    leftovers = [p.name for p in run.rglob(".*unverified*")]
    assert not leftovers, leftovers


def test_a_failed_retraining_leaves_the_model_an_earlier_build_made(reference, tmp_path):
    """Training runs in a staging folder and moves in only after its gates pass: a rebuild whose FP32 model fails
    them leaves train/best.pt (and its metrics) as the earlier, passing build wrote them."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    before = {name: (run / "train" / name).read_bytes() for name in ("best.pt", "metrics.jsonl")}
    ctx = _context(run)
    step = next(s for s in PLAN if s.name == "train")
    settings = dataclasses.replace(step.settings(ctx), **IMPOSSIBLE["train"][0])
    with pytest.raises(StageFailed):
        run_stage(ctx, dataclasses.replace(step, settings=lambda c: settings))
    assert {name: (run / "train" / name).read_bytes() for name in before} == before
    assert (run / "train" / "best.rejected.pt").is_file() and not (run / "train").with_name(".train.staging").exists()


def test_export_cpu_records_and_gates_the_two_int8_artifacts_agreement(reference):
    """Issue 38: the CPU model and the INT8 ONNX (the Jetson's) are compared on the evaluation images, decision by
    decision, and that agreement is a gate like agreement with FP32."""
    rec = next(r for r in read_records(reference) if r.stage == "export_cpu")
    assert rec.passed, rec.message
    pct = rec.metrics["int8_artifacts_agreement_pct"]
    gate = next(g for g in rec.gates if g["name"] == "int8_artifacts_agreement_pct")
    assert gate["n"] == rec.metrics["n_eval"] > 0 and gate["counts"]["n"] == gate["n"]
    assert gate["value"] == pytest.approx(pct) == pytest.approx(100.0 * gate["counts"]["k"] / gate["n"])
    assert gate["lo"] <= gate["value"] <= gate["hi"] and gate["key"] == "gates.min_agreement_pct"
    assert "INT8 ONNX" in gate["what"]
    # one number, one name: the agreement with FP32 is fp32_top1_agreement_pct, never a bare top1_agreement_pct
    assert "top1_agreement_pct" not in rec.metrics and "fp32_top1_agreement_pct" in rec.metrics


@pytest.mark.parametrize("agree,limit,outcome", [(97, 90.0, "passed"), (97, 95.0, "not measurable"),
                                                 (97, 99.5, "failed"), (100, 95.0, "passed")])
def test_the_two_int8_artifacts_gate_decides_from_its_interval(agree, limit, outcome):
    import numpy as np

    from edgeres.cpu import CpuSettings, add_artifacts_gate
    from edgeres.records import StageRecord

    rng = np.random.default_rng(0)
    onnx = rng.normal(size=(100, 10))
    cpu = onnx.copy()
    cpu[agree:] = np.roll(cpu[agree:], 1, axis=1)   # the last 100 - agree images decide another class
    assert int((onnx.argmax(1) == cpu.argmax(1)).sum()) == agree
    rec = StageRecord(stage="export_cpu")
    add_artifacts_gate(rec, onnx, cpu, CpuSettings(mode="openvino", calib_size=8, seed=0, min_agreement_pct=limit))
    (gate,) = rec.gates
    assert rec.metrics["int8_artifacts_agreement_pct"] == agree
    assert gate["outcome"] == outcome, (gate["lo"], gate["hi"])
    assert rec.passed == (outcome != "failed")


def test_the_cpu_artifact_is_the_jetson_model_with_unsigned_activations(reference, tmp_path):
    """Issue 38: the default CPU artifact is the INT8 ONNX itself, every activation quantizer whose input cannot be
    negative (after a Relu, and after a pool of one: the stem's MaxPool feeding a residual add, the global average
    pool feeding the classifier) re-expressed as unsigned INT8 at the same scales. Judged by the values: every
    quantizer made unsigned saw no negative input on the probe images and every one left signed saw one, and the
    model computes what the INT8 ONNX computes (ONNX Runtime, both forms)."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    from edgeres.cpu import unsigned_non_negative

    src = reference / "export" / "model_int8.onnx"
    model = onnx.load(str(src))
    x = np.load(reference / "probe.npz")["x"]
    quantizers = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and len(n.input) == 3]
    probed = onnx.load(str(src))   # every quantizer's input as an extra output
    probed.graph.output.extend(onnx.helper.make_empty_tensor_value_info(q.input[0]) for q in quantizers)
    sess = ort.InferenceSession(probed.SerializeToString(), providers=["CPUExecutionProvider"])
    seen = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {sess.get_inputs()[0].name: x})))
    negative = {q.name: bool((seen[q.input[0]] < 0).any()) for q in quantizers}

    changed = unsigned_non_negative(model)
    uint8 = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.UINT8}
    unsigned = {q.name for q in model.graph.node if q.op_type == "QuantizeLinear" and len(q.input) == 3
                and q.input[2] in uint8}
    assert changed == len(unsigned) > 0
    assert not any(negative[q] for q in unsigned)                      # never a quantizer that sees negatives
    missed = [q for q in negative if q not in unsigned and not negative[q]]
    assert not missed, missed                                           # none left signed that could be unsigned
    kinds = {model.graph.node[[n.output[0] for n in model.graph.node].index(q.input[0])].op_type
             for q in model.graph.node if q.name in unsigned}
    assert {"Relu", "GlobalAveragePool"} <= kinds, kinds
    onnx.checker.check_model(model)
    edited = tmp_path / "unsigned.onnx"
    onnx.save(model, str(edited))

    def logits(path):
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return sess.run(None, {sess.get_inputs()[0].name: x})[0]

    a, b = logits(src), logits(edited)
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.98
    assert np.abs(a - b).max() <= 0.05 * np.abs(a).max()   # the same values, but for ones the signed form clipped
    rec = next(r for r in read_records(reference) if r.stage == "export_cpu")
    assert rec.metrics["method"] == "the INT8 ONNX, post-ReLU activations unsigned"
    assert rec.metrics["unsigned_activations"] == changed
