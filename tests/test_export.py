"""ONNX export (FP32 + INT8 Q/DQ), TensorRT rules on real NNCF exports, verification on ONNX Runtime."""
from __future__ import annotations

import json
import os
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from torch.utils.data import TensorDataset

os.environ.setdefault("NNCF_CI", "1")

from edgeres.check import check_onnx, count_qdq  # noqa: E402
from edgeres.checkpoint import ModelMeta, save_checkpoint  # noqa: E402
from edgeres.cli import main  # noqa: E402
from edgeres.errors import BackendUnavailable, ConfigError  # noqa: E402
from edgeres.export import ExportInputs, ExportSettings, export_onnx  # noqa: E402
from edgeres.export import run as export_stage  # noqa: E402
from edgeres.fold import fold_batchnorm, save_folded  # noqa: E402
from edgeres.models import create_model, list_archs  # noqa: E402
from edgeres.onnx_info import read_metadata  # noqa: E402
from edgeres.verify import ort_logits, ort_session  # noqa: E402


def _meta(arch, cin=1, side=28):
    return ModelMeta(arch=arch, num_classes=10, in_channels=cin, input_size=side, mean=(0.5,) * cin,
                     std=(0.25,) * cin, class_names=tuple(f"c{i}" for i in range(10)), recipe_hash="abc123")


def _folded(arch, seed=0, **kw):
    torch.manual_seed(seed)
    model = create_model(arch, num_classes=10, **kw).eval()
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return fold_batchnorm(model)


def _export(model, out, meta, x, *, int8=False, reference=None):
    """The export stage on the images `x` (labels unused): writes `out` only when its checks pass."""
    images = [(x[i], 0) for i in range(len(x))]
    return export_stage(ExportInputs(model, meta, images, out, reference), ExportSettings(int8=int8))


def _ptq(folded_model, cin, side, n=32):
    pytest.importorskip("nncf", reason="NNCF (edgeres[quant]) is not installed")
    from edgeres.quantize import quantize_ptq

    x = torch.randn(n, cin, side, side, generator=torch.Generator().manual_seed(1))
    return quantize_ptq(folded_model, TensorDataset(x, torch.zeros(n, dtype=torch.long)), subset_size=n,
                        batch_size=n).model, x


def test_fp32_export(tmp_path):
    res = _folded("mnist_resnet")
    path = export_onnx(res.model, tmp_path / "m.onnx", meta=_meta("mnist_resnet"), int8=False)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input] == ["input"] and [o.name for o in proto.graph.output] == ["logits"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    assert not any(n.op_type == "BatchNormalization" for n in proto.graph.node)
    md = read_metadata(path)
    assert json.loads(md["mean"]) == [0.5] and json.loads(md["class_names"])[3] == "c3"
    assert md["input_size"] == "28" and md["recipe_hash"] == "abc123" and md["arch"] == "mnist_resnet"
    assert md["precision"] == "fp32" and json.loads(md["edgeres.meta"])["num_classes"] == 10
    sess = ort_session(path)
    for n in (1, 5):
        assert ort_logits(sess, np.zeros((n, 1, 28, 28), np.float32)).shape == (n, 10)
    staged = _export(res.model, tmp_path / "staged.onnx", _meta("mnist_resnet"), torch.randn(16, 1, 28, 28))
    metrics = staged.record.metrics
    assert staged.record.passed and metrics["rel_diff"] < 1e-4 and metrics["onnxruntime_optimizations"]
    assert [g["name"] for g in staged.record.gates] == ["onnx_fp32_max_abs_diff_rel", "onnx_fp32_decisive_flips"]
    assert staged.output.path == tmp_path / "staged.onnx" and staged.output.path.exists()
    assert check_onnx(path) == []


def test_fp32_verify_can_fail(tmp_path):
    from edgeres.evaluate import evaluate

    res = _folded("mnist_resnet")
    x = torch.randn(8, 1, 28, 28)
    other = _folded("mnist_resnet")
    with torch.no_grad():
        other.model.fc.bias.add_(1.0)   # a reference the exported graph does not match
    reference = evaluate(other.model, [(x[i], 0) for i in range(len(x))])
    (tmp_path / "m.onnx").write_bytes(b"what the user had")
    result = _export(res.model, tmp_path / "m.onnx", _meta("mnist_resnet"), x, reference=reference)
    assert not result.record.passed
    assert [g["name"] for g in result.record.gates if not g["passed"]] == ["onnx_fp32_max_abs_diff_rel"]
    assert (tmp_path / "m.onnx").read_bytes() == b"what the user had"   # checks, then writes
    assert (tmp_path / "m.rejected.onnx").exists() and "m.rejected.onnx" in result.record.message


@pytest.mark.parametrize("arch,cin,side", [("mnist_resnet", 1, 28), ("resnet20", 3, 32),
                                           ("preact_mnist_resnet", 1, 28)])
def test_int8_export_meets_tensorrt_rules(tmp_path, arch, cin, side):
    res = _folded(arch)
    qmodel, x = _ptq(res.model, cin, side)
    result = _export(qmodel, tmp_path / "q.onnx", _meta(arch, cin, side), x, int8=True)
    path = result.output.path
    assert result.record.passed and check_onnx(path) == []
    counts = count_qdq(path)
    proto = onnx.load(str(path))
    int8_weights = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) > 1]
    # activations: Q/DQ pairs; weights: INT8 constants straight into their DequantizeLinear
    assert counts["QuantizeLinear"] > 5 and len(int8_weights) > 5
    assert counts["DequantizeLinear"] == counts["QuantizeLinear"] + len(int8_weights)
    assert read_metadata(path)["precision"] == "int8"
    adds = [n for n in proto.graph.node if n.op_type == "Add" and "Add" in n.name and "layer" in n.name]
    assert adds, "residual adds are in the graph"
    metrics = result.record.metrics
    assert [g["name"] for g in result.record.gates] == ["tensorrt_rule_violations", "onnx_int8_noise_rel",
                                                        "onnx_int8_decisive_agreement_pct"]
    assert all(g["outcome"] == "passed" for g in result.record.gates)
    assert metrics["flips"] >= metrics["decisive_flips"] and metrics["noise_rel"] < 0.05
    assert metrics["onnxruntime_optimizations"] is False and metrics["n_compared"] == len(x)
    assert metrics["rel_diff"] < 0.1 and metrics["top1_agreement_pct"] >= 90.0
    # the INT8 check runs the graph as written: no fused QLinearConv
    level = ort_session(path, optimize=False).session.get_session_options().graph_optimization_level
    assert level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    assert ort_logits(ort_session(path), x[:3].numpy()).shape == (3, 10)


def test_plain_nncf_export_breaks_the_rules(tmp_path):
    """Without our fixes (signed, residual placement) NNCF's own output is rejected: the fixes are needed."""
    nncf = pytest.importorskip("nncf", reason="NNCF is not installed")
    from nncf.torch.quantization.layers import QuantizerExportMode

    from edgeres.quantize import quantizer_hooks

    res = _folded("mnist_resnet")
    x = torch.randn(8, 1, 28, 28)
    q = nncf.quantize(res.model, nncf.Dataset([x]), subset_size=1, preset=nncf.QuantizationPreset.PERFORMANCE)
    for _, h in quantizer_hooks(q):
        h.set_export_mode(QuantizerExportMode.ONNX_QUANTIZE_DEQUANTIZE_PAIRS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(q, (x[:1],), str(tmp_path / "raw.onnx"), input_names=["input"], output_names=["logits"],
                          opset_version=17, dynamo=False)
    rules = {v.rule for v in check_onnx(tmp_path / "raw.onnx")}
    assert {"int8", "residual_add"} <= rules


def test_export_rejects_mismatched_precision(tmp_path):
    res = _folded("mnist_resnet")
    with pytest.raises(ConfigError, match="needs a quantized model"):
        export_onnx(res.model, tmp_path / "x.onnx", meta=_meta("mnist_resnet"), int8=True)
    with pytest.raises(ConfigError, match="opset"):
        export_onnx(res.model, tmp_path / "x.onnx", meta=_meta("mnist_resnet"), int8=False, opset=11)
    assert not (tmp_path / "x.onnx").exists()


def test_simplify_needs_onnxslim(tmp_path):
    try:
        import onnxslim  # noqa: F401
    except ImportError:
        res = _folded("mnist_resnet")
        with pytest.raises(BackendUnavailable, match="onnxslim"):
            export_onnx(res.model, tmp_path / "s.onnx", meta=_meta("mnist_resnet"), int8=False, simplify=True)
        assert not (tmp_path / "s.onnx").exists()
    else:
        pytest.skip("onnxslim is installed; the missing-package path cannot be exercised")


@pytest.mark.skipif("densenet_bc_100" not in list_archs(), reason="DenseNet not in the registry yet")
def test_densenet_fp32_export(tmp_path):
    res = _folded("densenet_bc_100")
    assert res.kept_affine
    result = _export(res.model, tmp_path / "d.onnx", _meta("densenet_bc_100", 3, 32), torch.randn(4, 3, 32, 32))
    assert result.record.passed
    ops = {n.op_type for n in onnx.load(str(result.output.path)).graph.node}
    assert "BatchNormalization" not in ops and {"Mul", "Concat"} <= ops


def test_cli_export_and_check(tmp_path):
    torch.manual_seed(0)
    model = create_model("preact_mnist_resnet", num_classes=10)
    save_checkpoint(tmp_path / "w.pt", model, _meta("preact_mnist_resnet"))
    runner = CliRunner()
    out = tmp_path / "m.onnx"
    r = runner.invoke(main, ["export", "--weights", str(tmp_path / "w.pt"), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "gate: FP32 ONNX vs torch max|logit diff| / logit scale" in r.output and "within the limit" in r.output
    assert out.is_file()
    r = runner.invoke(main, ["export", "--weights", str(tmp_path / "w.pt"), "--out", str(out)])
    assert r.exit_code == 1 and "already exists" in r.output
    r = runner.invoke(main, ["export", "--weights", str(tmp_path / "w.pt"), "--int8", "--out",
                             str(tmp_path / "q.onnx")])
    assert r.exit_code == 1 and "needs an INT8 checkpoint" in r.output and not (tmp_path / "q.onnx").exists()
    save_folded(tmp_path / "f.pt", fold_batchnorm(model.eval()), _meta("preact_mnist_resnet"))
    r = runner.invoke(main, ["export", "--weights", str(tmp_path / "f.pt"), "--out", str(tmp_path / "f.onnx"),
                             "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["QuantizeLinear"] == 0
    r = runner.invoke(main, ["check", str(tmp_path / "f.onnx")])
    assert r.exit_code == 0


def test_cli_export_failing_check_keeps_the_old_file(tmp_path, monkeypatch):
    """--force with a failing verification: the file already at --out stays as it was; the rejected graph is kept
    beside it under its own name (for `edgeres compare --layers`), nothing else is left."""
    import edgeres.fold

    torch.manual_seed(0)
    save_checkpoint(tmp_path / "w.pt", create_model("mnist_resnet", num_classes=10), _meta("mnist_resnet"))
    out = tmp_path / "m.onnx"
    out.write_bytes(b"the user's previous model")
    real = edgeres.export.compare_logits
    monkeypatch.setattr(edgeres.export, "compare_logits",
                        lambda a, b, **kw: {**real(a, b, **kw), "decisive_flips": 3, "flips": 3})
    r = CliRunner().invoke(main, ["export", "--weights", str(tmp_path / "w.pt"), "--out", str(out), "--force"])
    assert r.exit_code == 1 and "not written" in r.output
    assert "top-1 flips FP32 ONNX vs torch beyond near ties (3 flips in all) 3" in r.output
    assert "above the limit of 0" in r.output
    assert out.read_bytes() == b"the user's previous model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.rejected.onnx", "w.pt"]


def test_int8_weights_on_disk_are_bit_identical_and_smaller(tmp_path):
    """INT8 weights stored as INT8 (not FP32 behind a QuantizeLinear): the same outputs to the bit, a file well
    under 0.3x the FP32 ONNX (resnet20 here), and still within TensorRT's Q/DQ rules."""
    res = _folded("resnet20")
    qmodel, x = _ptq(res.model, 3, 32)
    meta = _meta("resnet20", 3, 32)
    small = export_onnx(qmodel, tmp_path / "q8.onnx", meta=meta, int8=True)
    wide = export_onnx(qmodel, tmp_path / "q32.onnx", meta=meta, int8=True, int8_weights=False)
    fp32 = export_onnx(res.model, tmp_path / "fp32.onnx", meta=meta, int8=False)
    assert check_onnx(small) == [] and check_onnx(wide) == []
    a = ort_session(small, optimize=False).session.run(None, {"input": x.numpy()})[0]
    b = ort_session(wide, optimize=False).session.run(None, {"input": x.numpy()})[0]
    assert np.array_equal(a, b)
    assert small.stat().st_size < 0.3 * fp32.stat().st_size < wide.stat().st_size
