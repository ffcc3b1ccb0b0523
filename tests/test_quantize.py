"""NNCF PTQ / QAT configured for TensorRT: calibration manifest, signedness, residual placement, save/load."""
from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner
from torch.utils.data import TensorDataset

os.environ.setdefault("NNCF_CI", "1")
pytest.importorskip("nncf", reason="NNCF (edgeres[quant]) is not installed")

from edgeres.checkpoint import ModelMeta, save_checkpoint  # noqa: E402
from edgeres.cli import main  # noqa: E402
from edgeres.errors import CheckpointError, ConfigError, DataError  # noqa: E402
from edgeres.fold import fold_batchnorm, save_folded  # noqa: E402
from edgeres.models import create_model  # noqa: E402
from edgeres.quantize import (  # noqa: E402
    CalibMethod,
    calibration_indices,
    load_quantized,
    quantize_ptq,
    quantize_qat,
    quantizer_hooks,
    save_quantized,
)


def top1(model, dataset) -> float:
    from edgeres.evaluate import evaluate

    return evaluate(model, dataset).top1

META = ModelMeta(arch="mnist_resnet", num_classes=10, in_channels=1, input_size=28, mean=(0.5,), std=(0.25,))


def _model(arch="mnist_resnet", seed=0):
    torch.manual_seed(seed)
    model = create_model(arch, num_classes=10).eval()
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A folded model, 64 images labelled by the float model itself (it scores 100 %), and its PTQ."""
    tmp = tmp_path_factory.mktemp("ptq")
    folded = fold_batchnorm(_model()).model
    x = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y = folded(x).argmax(1)
    ds = TensorDataset(x, y)
    ptq = quantize_ptq(folded, ds, subset_size=32, batch_size=16, seed=5, manifest_path=tmp / "cal" / "m.json",
                       dataset_fingerprint="fp-123")
    return {"tmp": tmp, "folded": folded, "ds": ds, "ptq": ptq}


def test_calibration_indices():
    a = calibration_indices(100, 10, seed=1)
    assert a == calibration_indices(100, 10, seed=1) and a == sorted(a) and len(set(a)) == 10
    assert a != calibration_indices(100, 10, seed=2)
    with pytest.raises(DataError, match="^calibration set has 5 images, asked 10$"):
        calibration_indices(5, 10, seed=0)


def test_calib_method_names():
    assert CalibMethod.parse("MinMax") is CalibMethod.MINMAX
    assert CalibMethod.parse("mean-minmax") is CalibMethod.MEAN_MINMAX
    with pytest.raises(ConfigError, match="valid: minmax, mean_minmax, percentile, histogram"):
        CalibMethod.parse("entropy")


def test_manifest_records_the_calibration(setup):
    path = setup["tmp"] / "cal" / "m.json"
    man = json.loads(path.read_text())
    assert man == json.loads(json.dumps(setup["ptq"].manifest, default=str))
    assert man["indices"] == calibration_indices(64, 32, seed=5)
    assert man["subset_size"] == 32 and man["method"] == "percentile" and man["seed"] == 5
    assert man["dataset_fingerprint"] == "fp-123" and man["dataset_size"] == 64 and man["nncf_version"]


def test_ptq_is_configured_for_tensorrt(setup):
    ptq = setup["ptq"]
    hooks = quantizer_hooks(ptq.model)
    assert hooks and all(q.signed for _, q in hooks), "TensorRT takes int8 only: every quantizer signed"
    removed = [c for c in ptq.placement_changes if c.startswith("removed")]
    # mnist_resnet has 6 residual adds; their conv-branch quantizers are gone, the rest stay
    assert len(removed) == 6 and all("conv2" in c for c in removed)
    names = [n for n, _ in hooks]
    assert not any("conv2/conv2d/0__0" in n for n in names if n.startswith("post_hooks"))
    assert any("downsample" in n for n in names if n.startswith("post_hooks"))
    from edgeres.quantize import is_quantized_model

    assert is_quantized_model(ptq.model) and not is_quantized_model(setup["folded"]), "caller's model untouched"
    assert top1(ptq.model, setup["ds"]) >= 80.0  # fake-quant agrees with the float model it came from


def test_too_small_calibration_set(setup):
    with pytest.raises(DataError, match="calibration set has 64 images, asked 100"):
        quantize_ptq(setup["folded"], setup["ds"], subset_size=100)


def test_range_estimators_differ(setup):
    hist = quantize_ptq(fold_batchnorm(_model()).model, setup["ds"], subset_size=16, batch_size=16,
                        method="percentile")
    a = {n: float(q.scale.detach().max()) for n, q in quantizer_hooks(setup["ptq"].model) if not q.per_channel}
    b = {n: float(q.scale.detach().max()) for n, q in quantizer_hooks(hist.model) if not q.per_channel}
    assert hist.manifest["method"] == "percentile"
    assert any(abs(a[k] - b[k]) > 1e-6 for k in a.keys() & b.keys())


def test_save_and_load_quantized(setup):
    path = setup["tmp"] / "q.pt"
    save_quantized(path, setup["ptq"].model, META, manifest=setup["ptq"].manifest)
    model, meta, man = load_quantized(path)
    assert meta == META and man["indices"] == setup["ptq"].manifest["indices"]
    x = setup["ds"].tensors[0][:8]
    with torch.no_grad():
        assert torch.allclose(model(x), setup["ptq"].model(x), atol=1e-6)
    save_folded(setup["tmp"] / "f.pt", fold_batchnorm(_model()), META)
    with pytest.raises(CheckpointError, match="not an INT8"):
        load_quantized(setup["tmp"] / "f.pt")


def test_qat_keeps_the_epoch_that_agrees_best_with_fp32_on_the_holdout(setup, tmp_path):
    """QAT distils the folded FP32 model and selects on held-out TRAINING images by agreement with it (then KL):
    the kept epoch is the recorded best, the returned model is that epoch's, and nothing else is read."""
    from edgeres.evaluate import evaluate
    from edgeres.metrics import agreement_pct
    from edgeres.quantize import _kl

    save_quantized(tmp_path / "q.pt", setup["ptq"].model, META)
    model, _, _ = load_quantized(tmp_path / "q.pt")   # a copy: the module fixture stays as it was
    small = TensorDataset(*(t[:32] for t in setup["ds"].tensors))
    holdout = TensorDataset(*(t[32:64] for t in setup["ds"].tensors))
    teacher = setup["folded"]
    res = quantize_qat(model, small, holdout, teacher=teacher, epochs=2, lr=1e-3, batch_size=32, quiet=True)
    assert [h["epoch"] for h in res.history] == [0, 1, 2]
    keys = [(h["holdout_agreement_pct"], -h["holdout_kl"]) for h in res.history]
    assert res.best_epoch == max(range(3), key=lambda i: keys[i])   # the first best: later ties do not replace it
    kept, ref = evaluate(res.model, holdout).logits, evaluate(teacher, holdout).logits
    assert agreement_pct(kept, ref) == pytest.approx(res.history[res.best_epoch]["holdout_agreement_pct"])
    assert _kl(kept, ref) == pytest.approx(res.history[res.best_epoch]["holdout_kl"], rel=1e-4, abs=1e-7)
    ce = quantize_qat(model, small, holdout, teacher=teacher, loss="ce", epochs=1, lr=1e-3, batch_size=32, quiet=True)
    assert "holdout_agreement_pct" in ce.history[1], "labels train it, agreement with FP32 still selects"
    last = quantize_qat(model, small, None, teacher=teacher, epochs=1, lr=1e-3, batch_size=32, quiet=True)
    assert last.best_epoch == 1, "without a holdout nothing is selected: the last epoch is kept"
    with pytest.raises(ConfigError, match="distils the FP32 model"):
        quantize_qat(model, small, holdout, epochs=1, loss="kd")
    with pytest.raises(ConfigError):
        quantize_qat(model, setup["ds"], setup["ds"], epochs=0)


def test_kd_loss_is_zero_when_the_student_is_the_teacher_and_mixes_with_ce():
    from edgeres.quantize import qat_criterion

    torch.manual_seed(0)
    z, y = torch.randn(8, 5), torch.randint(0, 5, (8,))
    for t in (1.0, 4.0):
        assert float(qat_criterion("kd", t)(z, y, z)) == pytest.approx(0.0, abs=1e-6)
        assert float(qat_criterion("kd", t)(z, y, z.flip(0))) > 0.01
    mixed = float(qat_criterion("kd+ce", 1.0)(z, y, z))
    assert mixed == pytest.approx(0.5 * float(torch.nn.functional.cross_entropy(z, y)), rel=1e-5)
    with pytest.raises(ConfigError, match="unknown QAT loss"):
        qat_criterion("mse", 1.0)


def test_cli_quantize_on_digits(tmp_path):
    w = tmp_path / "w.pt"
    meta = ModelMeta(arch="mnist_resnet", num_classes=10, in_channels=1, input_size=28, mean=(0.3052,),
                     std=(0.3236,), dataset="digits")
    save_checkpoint(w, _model(), meta)
    runner = CliRunner()
    out = tmp_path / "q.pt"
    r = runner.invoke(main, ["quantize", "--ptq", "--weights", str(w), "--dataset", "digits",
                             "--calib-size", "5000", "--out", str(out)])
    assert r.exit_code == 1 and "calibration set has 1294 images, asked 5000" in r.output and not out.exists()
    r = runner.invoke(main, ["quantize", "--ptq", "--weights", str(w), "--dataset", "digits", "--calib-size", "64",
                             "--calib-method", "mean_minmax", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["calib_size"] == 64, "--json output is one JSON object (no NNCF progress bars)"
    man = json.loads((tmp_path / "calibration" / "q.manifest.json").read_text())
    assert len(man["indices"]) == 64 and man["method"] == "mean_minmax" and man["dataset_fingerprint"]
    model, _, _ = load_quantized(out)
    assert quantizer_hooks(model)
    r = runner.invoke(main, ["quantize", "--ptq", "--weights", str(out), "--dataset", "digits", "--out",
                             str(tmp_path / "again.pt")])
    assert r.exit_code == 1 and "already INT8" in r.output
    onnx_path = tmp_path / "q.onnx"
    r = runner.invoke(main, ["export", "--weights", str(out), "--int8", "--out", str(onnx_path)])
    assert r.exit_code == 0, r.output
    assert runner.invoke(main, ["check", str(onnx_path)]).exit_code == 0
