"""`edgeres build` end to end on the embedded default (digits): records, reuse, failing gates, the report."""
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeres.cli import main
from edgeres.records import read_records

pytestmark = pytest.mark.slow

# 3 epochs: after 1 the model scores ~19 % (BN statistics unsettled) and INT8-vs-fake-quant agreement on a model
# that guesses is noise; after 3 it scores ~98 % and the INT8 gates mean something
FAST = ["--arch", "mnist_resnet", "--epochs", "3", "--qat-epochs", "1", "--bench-seconds", "0.2", "--quiet"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("build") / "run"
    result = CliRunner().invoke(main, ["build", "--int8", "--out", str(out), *FAST])
    return out, result


def test_build_runs_every_stage_and_writes_records(built):
    out, result = built
    assert result.exit_code == 0, result.output
    recs = read_records(out)
    stages = [r.stage for r in recs]
    assert stages == ["train", "fold", "ptq", "qat", "export_fp32", "export_int8", "export_cpu", "calib_cache",
                      "compile", "verify"]
    by = {r.stage: r for r in recs}
    for name in ("train", "fold", "ptq", "qat", "export_fp32", "export_int8", "export_cpu", "calib_cache"):
        assert by[name].status == "passed", by[name].message
        assert Path(by[name].artifact).is_file() and len(by[name].sha256) == 64
    # each stage points at its parent's artifact
    assert by["fold"].parent_sha256 == by["train"].sha256
    assert by["ptq"].parent_sha256 == by["fold"].sha256
    assert by["export_int8"].parent_sha256 == by["qat"].sha256
    # the compile stage is never reported as passed without TensorRT
    assert by["compile"].status == "skipped" and "ready to be built on the target" in by["compile"].message
    for name in ("fold", "export_fp32", "export_int8", "verify"):
        assert by[name].gates and all(g["passed"] for g in by[name].gates)
    assert {"packages", "python"} <= set(by["train"].environment)


def test_int8_agreement_gate_covers_the_whole_evaluation_split(built):
    """The 99 % INT8-vs-fake-quant gate is measured on every evaluation image, not only the 64-image probe, and on
    training images (eval transform) up to gates.int8_agreement_images, so a few near ties cannot decide it."""
    import numpy as np
    import onnxruntime as ort

    from edgeres.data import get_data_for
    from edgeres.evaluate import evaluate
    from edgeres.quantize import load_quantized
    from edgeres.recipe import load_recipe

    out, _ = built
    by = {r.stage: r for r in read_records(out)}
    m = by["export_int8"].metrics
    data = get_data_for(load_recipe(out / "recipe.yaml"))
    more = min(2000 - len(data.test), len(data.calib))
    assert m["n_eval_split"] == len(data.test) == by["verify"].metrics["n_eval"] > m["probe"]["n_probe"]
    assert m["n_training_images"] == more > 0 and m["n_compared"] == len(data.test) + more
    assert "n_probe" not in m
    history = by["qat"].metrics["history"]
    keys = [(h["holdout_agreement_pct"], -h["holdout_kl"]) for h in history]
    # kept: the epoch that agrees best with FP32 on the holdout (never selected on the test split)
    assert by["qat"].metrics["best_epoch"] == max(range(len(keys)), key=keys.__getitem__)
    assert by["qat"].metrics["holdout_size"] == len(data.holdout) > 0
    images = [data.test[i] for i in range(len(data.test))] + [data.calib[i] for i in range(more)]
    fq = evaluate(load_quantized(by["qat"].artifact)[0], images).logits
    x = np.stack([np.asarray(im, dtype=np.float32) for im, _ in images])
    # gated: the graph as written (optimizations off), on all of them; recorded: ONNX Runtime's own INT8 kernels
    # (its default), on the evaluation split
    as_written = ort.SessionOptions()
    as_written.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    for options, key, n in ((as_written, "top1_agreement_pct", len(x)),
                            (None, "optimized_top1_agreement_pct", len(data.test))):
        session = ort.InferenceSession(by["export_int8"].artifact, options, providers=["CPUExecutionProvider"])
        onnx = session.run(None, {"input": x[:n]})[0]
        assert m[key] == pytest.approx(100.0 * float(np.mean(fq[:n].argmax(1) == onnx.argmax(1))), abs=0.2)
    assert m["onnxruntime_optimizations"] is False
    gate = next(g for g in by["export_int8"].gates if g["name"] == "onnx_int8_decisive_agreement_pct")
    assert gate["value"] == m["decisive_agreement_pct"] >= m["top1_agreement_pct"] and gate["limit"] == 99.0
    assert gate["n"] == m["n_compared"] and m["flips"] == m["near_tie_flips"] + m["decisive_flips"]


def test_report_files_and_table(built):
    out, result = built
    rep = json.loads((out / "report.json").read_text())
    assert rep["ok"] is True
    backends = {(r["stage"], r["backend"]) for r in rep["rows"]}
    assert ("export_int8", "onnxruntime") in backends and ("train", "torch") in backends
    int8 = next(r for r in rep["rows"] if r["stage"] == "export_int8")
    assert 0 <= int8["agree_pct"] <= 100 and int8["p50_ms"] > 0 and int8["p99_ms"] >= int8["p50_ms"]
    # the CPU artifact is a row of its own, on OpenVINO's INT8 kernels; ONNX Runtime's INT8 row says what it fused
    cpu = next(r for r in rep["rows"] if r["stage"] == "export_cpu")
    assert cpu["backend"] == "openvino" and cpu["precision"] == "int8" and cpu["p50_ms"] > 0
    from edgeres.runners import OpenVinoRunner

    with OpenVinoRunner(out / "export" / "model_int8_cpu.xml") as ir:   # the IR carries the model's preprocessing
        assert ir.meta["input_size"] == json.loads((out / "meta.json").read_text())["input_size"]
        assert ir.precision == "int8"
    done, total = map(int, cpu["int8_kernels"].split("/"))
    assert done == total > 0
    assert int8["int8_kernels"] and int(int8["int8_kernels"].split("/")[0]) < total
    fp32_size = next(r for r in rep["rows"] if r["stage"] == "export_fp32")["size_mb"]
    assert int8["size_mb"] < 0.35 * fp32_size   # INT8 weights on disk (a small model: scales weigh in)
    assert "INT8 kernels" in (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "Per-class accuracy" in html
    assert "| stage | backend | precision | top-1 |" in (out / "report.md").read_text()
    assert "agree %" in result.output and "TensorRT engine not built" in result.output


def test_unchanged_rerun_reuses_every_stage(built):
    out, _ = built
    before = len(read_records(out))
    result = CliRunner().invoke(main, ["build", "--int8", "--out", str(out), *FAST[:-1]])
    assert result.exit_code == 0, result.output
    reused = [line for line in result.output.splitlines() if "unchanged, reused" in line]
    assert len(reused) == 9, result.output   # all but compile (skipped: re-checked each time) and verify inputs same
    new = read_records(out)[before:]
    assert [r.stage for r in new] == ["compile"]


def test_changed_qat_setting_resumes_from_qat(built, tmp_path):
    out, _ = built
    before = len(read_records(out))
    args = [a if a != "1" or i != FAST.index("--qat-epochs") + 1 else "2" for i, a in enumerate(FAST)]
    result = CliRunner().invoke(main, ["build", "--int8", "--out", str(out), *args])
    assert result.exit_code == 0, result.output
    rerun = [r.stage for r in read_records(out)[before:]]
    assert rerun[0] == "qat" and "train" not in rerun and "fold" not in rerun and "ptq" not in rerun


def test_failing_gate_stops_build_with_one_line_and_report(tmp_path):
    recipe = tmp_path / "strict.yaml"
    recipe.write_text("gates:\n  fold_rel_tol: 0.0\n")
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["build", "--recipe", str(recipe), "--int8", "--out", str(out), *FAST])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("FAILED: fold: folded vs unfolded max|logit"))
    verdict = " ".join(line.strip() for line in lines[first:])   # the verdict, wrapped, is the last thing printed
    assert "above the limit of 0 (gates.fold_rel_tol from recipe file" in verdict
    assert "change it with --gate fold_rel_tol=VALUE" in verdict
    assert sum("folded vs unfolded max|logit" in line for line in lines) == 1, "a failure is said once"
    stages = [r.stage for r in read_records(out)]
    assert stages[-1] == "fold" and "ptq" not in stages
    rep = json.loads((out / "report.json").read_text())
    assert rep["ok"] is False and rep["message"].startswith("fold:")


def test_a_build_stopped_late_still_reports_what_it_measured(tmp_path):
    recipe = tmp_path / "strict.yaml"
    # export_fp32 fails, after PTQ and QAT ran (the agreement gate off: a 3-epoch model is not what is tested here)
    recipe.write_text("gates:\n  export_rel_tol: 0.0\n  min_agreement_pct: 0\n")
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["build", "--recipe", str(recipe), "--int8", "--out", str(out), *FAST])
    assert result.exit_code == 1 and "FAILED: export_fp32:" in result.output
    rep = json.loads((out / "report.json").read_text())
    by = {r.stage: r for r in read_records(out)}
    assert [r["stage"] for r in rep["rows"]] == ["train", "ptq", "qat"]
    qat = by["qat"].metrics
    assert rep["rows"][2]["top1"] == qat["top1"] and rep["rows"][0]["top1"] == qat["fp32_top1"]
    assert "int8 fakeq" in result.output   # the terminal table shows them too (in short)


def test_bad_options_are_one_line_errors(tmp_path):
    r = CliRunner().invoke(main, ["build", "--arch", "nope", "--out", str(tmp_path / "x")])
    assert r.exit_code == 1 and "unknown architecture 'nope'" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["build", "--pretrained", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "y")])
    assert r.exit_code == 1 and "--pretrained checkpoint not found" in r.output


@pytest.mark.parametrize("arch", ["preact_resnet20", "densenet121", "densenet_bc_100"])
def test_every_family_goes_through_the_same_gates(tmp_path, arch):
    """Pre-activation and DenseNet (BN before conv): fold exactly, quantize, export, pass `edgeres check`."""
    import torch

    from edgeres.models import create_model

    torch.manual_seed(0)
    model = create_model(arch, num_classes=10, in_channels=1)
    with torch.no_grad():   # non-trivial BN statistics, so kept scale-and-shifts are really exercised
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    ckpt = tmp_path / f"{arch}.pt"
    torch.save(model.state_dict(), ckpt)
    out = tmp_path / "run"
    recipe = tmp_path / "r.yaml"
    # Untrained weights give near-tied logits, where one INT8 rounding step can flip a top-1: the agreement gate is
    # loosened for this structural test and the logit error is checked directly below.
    # (untrained weights score at chance: the FP32 sanity and INT8-vs-FP32 agreement gates are off for this test)
    # (the INT8 ONNX is compared with its fake-quant model on the evaluation split only, not 1,294 training images
    # more: three passes of a 100-layer DenseNet over 1,653 images took 71 of the test's 150 s)
    recipe.write_text("quant: {calib_size: 64, qat_epochs: 0}\ngates: {probe_size: 32, min_int8_agreement: 90, "
                      "fp32_over_chance_sigma: 0, min_agreement_pct: 0, int8_agreement_images: 1}\n")
    result = CliRunner().invoke(main, ["build", "--recipe", str(recipe), "--arch", arch, "--pretrained", str(ckpt),
                                       "--int8", "--max-drop", "100", "--out", str(out), "--bench-seconds", "0",
                                       "--quiet"])
    assert result.exit_code == 0, result.output
    by = {r.stage: r for r in read_records(out)}
    assert by["fold"].passed and by["fold"].metrics["top1_agreement_pct"] == 100.0
    assert by["fold"].metrics["kept_affine"], "BNs with no conv before them are kept as scale-and-shift"
    int8 = by["export_int8"]
    assert int8.passed and int8.metrics["violations"] == [] and int8.metrics["rel_diff"] < 0.05, int8.metrics
    assert int8.metrics["n_compared"] == int8.metrics["n_eval_split"] == 359
    assert by["export_fp32"].passed


def test_calib_method_flag_overrides_the_recipe(tmp_path):
    from edgeres.build import BuildOptions, _resolve_recipe

    assert _resolve_recipe(BuildOptions(out=tmp_path, calib_method="histogram")).quant.calib_method == "histogram"
    assert _resolve_recipe(BuildOptions(out=tmp_path)).quant.calib_method == "percentile"   # the default
    r = CliRunner().invoke(main, ["build", "--int8", "--calib-method", "entropy", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "entropy" in r.output and not (tmp_path / "x").exists()


def test_export_command_verifies_int8_on_real_images(built, tmp_path):
    """`edgeres export --int8 --dataset`: the stage command gates INT8 agreement on evaluation images, like build."""
    out, _ = built
    dest = tmp_path / "int8.onnx"
    r = CliRunner().invoke(main, ["export", "--weights", str(out / "quant" / "qat.pt"), "--int8", "--out", str(dest),
                                  "--dataset", "digits", "--json"])
    assert r.exit_code == 0, r.output
    obj = json.loads(r.output)
    assert obj["verify"]["inputs"] == "digits test split + 1294 training" and obj["verify"]["n_compared"] == 1653
    assert len(obj["gates"]) == 3 and obj["gates"][0].startswith("TensorRT Q/DQ rule violations 0: within the limit")
    assert obj["gates"][2].startswith("INT8 ONNX vs fake-quant top-1 agreement beyond near ties")
    assert "1,653 images" in obj["gates"][2] and "at least 99.00 %" in obj["gates"][2]
    assert dest.is_file() and not list(tmp_path.glob(".*unverified*"))


def test_the_recipes_drop_limits_are_the_gate_unless_max_drop_is_given(tmp_path):
    """One rule (Recipe.max_drop): the final INT8 model's limit is gates.max_drop_qat with QAT, gates.max_drop_ptq
    without; --max-drop is a recipe override of both, so recipe.yaml records the limit the build ran with."""
    from edgeres.build import BuildOptions, _resolve_recipe

    strict = tmp_path / "strict.yaml"
    strict.write_text("gates:\n  max_drop_ptq: 0.4\n  max_drop_qat: 0.1\n")
    with_qat = _resolve_recipe(BuildOptions(out=tmp_path, recipe=str(strict)))
    ptq_only = _resolve_recipe(BuildOptions(out=tmp_path, recipe=str(strict), qat_epochs=0))
    assert with_qat.max_drop() == (0.1, "gates.max_drop_qat")
    assert ptq_only.max_drop() == (0.4, "gates.max_drop_ptq")
    given = _resolve_recipe(BuildOptions(out=tmp_path, recipe=str(strict), max_drop=2.0))
    assert given.max_drop() == (2.0, "gates.max_drop_qat") and given.gates.max_drop_ptq == 2.0
