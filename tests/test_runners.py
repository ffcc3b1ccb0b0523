"""Runners on real ONNX Runtime and torch: same logits, clear errors, input shapes, precision."""
import importlib.util

import numpy as np
import pytest
from helpers import export_tiny_onnx as export_onnx

from edgeres.errors import ArtifactError, BackendUnavailable, CheckpointError, ConfigError
from edgeres.runners import OrtRunner, TorchRunner, input_shape, open_runner


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    import torch

    from edgeres.checkpoint import ModelMeta, save_checkpoint
    from edgeres.models import create_model

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("runners")
    model = create_model("resnet20", num_classes=10).eval()
    with torch.no_grad():  # non-trivial BN statistics so the outputs are not all alike
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    meta = ModelMeta(arch="resnet20", num_classes=10, in_channels=3, input_size=32, mean=(0.5,) * 3, std=(0.25,) * 3)
    save_checkpoint(d / "model.pt", model, meta)
    return {"model": model, "onnx": export_onnx(model, d / "model.onnx"),
            "static": export_onnx(model, d / "static.onnx", dynamic=False), "pt": d / "model.pt", "dir": d}


def qdq_onnx(path):
    """A real Q/DQ graph: input [N,1,2,2] -> QuantizeLinear -> DequantizeLinear -> Flatten -> logits [N,4]."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("QuantizeLinear", ["input", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"]),
             helper.make_node("Flatten", ["dq"], ["logits"])]
    graph = helper.make_graph(
        nodes, "qdq", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 2, 2])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor("s", TensorProto.FLOAT, [], [0.1]), helper.make_tensor("z", TensorProto.INT8, [], [0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_ort_and_torch_agree(artifacts):
    import torch

    x = np.random.default_rng(1).standard_normal((4, 3, 32, 32), dtype=np.float32)
    with torch.no_grad():
        ref = artifacts["model"](torch.from_numpy(x)).numpy()
    ort = open_runner(artifacts["onnx"], threads=1)
    pt = open_runner(artifacts["pt"], threads=1)
    try:
        assert isinstance(ort, OrtRunner) and isinstance(pt, TorchRunner)
        assert (ort.name, ort.device, ort.precision) == ("onnxruntime", "cpu", "fp32")
        assert (pt.name, pt.device, pt.precision) == ("torch", "cpu", "fp32")
        a, b = ort.infer(x), pt.infer(x)
        assert a.dtype == np.float32 and a.shape == (4, 10)
        assert np.abs(a - ref).max() < 1e-4
        assert np.abs(b - ref).max() < 1e-5
        assert np.abs(ref).max() > 1e-3   # the comparison is not between zeros
        assert input_shape(ort) == input_shape(pt) == (3, 32, 32)
        assert pt.meta.mean == (0.5,) * 3
    finally:
        ort.close()
        pt.close()


def test_folded_checkpoint_opens_through_fold_loader(artifacts, tmp_path):
    import copy

    import torch

    from edgeres.checkpoint import read_checkpoint
    from edgeres.fold import fold_batchnorm, save_folded

    _, meta, _ = read_checkpoint(artifacts["pt"])
    result = fold_batchnorm(copy.deepcopy(artifacts["model"]))
    assert result.folded   # the fold really removed BatchNorms, so load_model alone could not load it
    save_folded(tmp_path / "folded.pt", result, meta)
    runner = open_runner(tmp_path / "folded.pt")
    x = np.random.default_rng(2).standard_normal((2, 3, 32, 32), dtype=np.float32)
    with torch.no_grad():
        ref = artifacts["model"](torch.from_numpy(x)).numpy()
    assert np.abs(runner.infer(x) - ref).max() < 1e-4
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in runner.model.modules())


def test_int8_precision_detected_and_runs(tmp_path):
    runner = OrtRunner(qdq_onnx(tmp_path / "qdq.onnx"))
    x = np.array([[[[0.12, -0.26], [1.0, 20.0]]]], dtype=np.float32)
    out = runner.infer(x)
    assert runner.precision == "int8"
    np.testing.assert_allclose(out, [[0.1, -0.3, 1.0, 12.7]], atol=1e-6)   # rounded and clipped at int8


def test_wrong_input_shape_is_one_clear_error(artifacts):
    runner = OrtRunner(artifacts["onnx"])
    with pytest.raises(ArtifactError, match=r"expects input \[N, 3, 32, 32\]"):
        runner.infer(np.zeros((1, 1, 28, 28), np.float32))
    with pytest.raises(ArtifactError, match="NCHW"):
        runner.infer(np.zeros((3, 32, 32), np.float32))


def test_fixed_batch_model_refuses_other_batches(artifacts):
    runner = OrtRunner(artifacts["static"])
    assert runner.batch_dim == 1
    assert runner.infer(np.zeros((1, 3, 32, 32), np.float32)).shape == (1, 10)
    with pytest.raises(ArtifactError, match="fixed batch of 1"):
        runner.infer(np.zeros((2, 3, 32, 32), np.float32))


def test_open_runner_errors(artifacts, tmp_path):
    with pytest.raises(ArtifactError, match="unknown artifact type '.txt'"):
        open_runner(tmp_path / "model.txt")
    with pytest.raises(ArtifactError, match="not found"):
        open_runner(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"this is not a protobuf" * 10)
    with pytest.raises(ArtifactError, match="not a loadable ONNX model"):
        open_runner(tmp_path / "junk.onnx")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        open_runner(tmp_path / "junk.pt")
    with pytest.raises(ConfigError, match="runs on onnxruntime, not torch"):
        open_runner(artifacts["onnx"], backend="torch")
    with pytest.raises(ConfigError, match="unknown backend"):
        open_runner(artifacts["onnx"], backend="tflite")
    with pytest.raises(ConfigError, match="--provider cuda"):
        open_runner(artifacts["onnx"], device="cuda:0")
    with pytest.raises(ConfigError, match="unknown ONNX Runtime provider"):
        open_runner(artifacts["onnx"], providers=["npu"])


def test_missing_provider_is_backend_unavailable(artifacts):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this ONNX Runtime has the CUDA provider")
    with pytest.raises(BackendUnavailable, match="provider cuda"):
        open_runner(artifacts["onnx"], providers=["cuda"])


def test_engine_without_tensorrt_is_backend_unavailable(tmp_path):
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here")
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"\0" * 64)
    with pytest.raises(BackendUnavailable, match="TensorRT"):
        open_runner(plan)
    with pytest.raises(ArtifactError, match="not found"):
        open_runner(tmp_path / "other.engine")


def test_input_shape_unknown_is_clear(tmp_path):
    class Bare:
        name, device, input_shape, meta, path = "torch", "cpu", None, None, "x.pt"

    with pytest.raises(ArtifactError, match="input shape"):
        input_shape(Bare())


@pytest.mark.gpu
def test_torch_cuda_infer_timed(artifacts):
    runner = TorchRunner(artifacts["model"], device="cuda:0")
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32), dtype=np.float32)
    logits, t = runner.infer_timed(x)
    assert logits.shape == (2, 10) and set(t) == {"h2d_ms", "compute_ms", "d2h_ms"}
    assert all(v >= 0 for v in t.values())


def test_openvino_runner_matches_onnxruntime_and_reports_int8_kernels(tmp_path):
    """An ONNX runs on OpenVINO (`--backend openvino`) with the same FP32 numbers; a Q/DQ model runs its convs in
    INT8 there while ONNX Runtime leaves this TensorRT-style graph in float."""
    pytest.importorskip("openvino", reason="OpenVINO is an optional extra (pip install 'edgeres[openvino]')")
    from test_tensorrt_trtexec import tiny_onnx

    from edgeres.runners import OpenVinoRunner, open_runner, ort_int8_kernels

    fp32, qdq = tiny_onnx(tmp_path / "m.onnx"), _int8_conv_onnx(tmp_path / "q.onnx")
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    with open_runner(fp32, backend="openvino", threads=1) as ov, open_runner(fp32) as ort_runner:
        assert isinstance(ov, OpenVinoRunner) and ov.name == "openvino" and ov.input_shape == (3, 16, 16)
        assert np.abs(ov.infer(x) - ort_runner.infer(x)).max() < 1e-4
    with OpenVinoRunner(qdq) as ov:
        assert ov.kernel_report()["int8_kernels"] >= 1 and ov.precision == "int8"
    assert set(ort_int8_kernels(qdq)) == {"int8_kernels", "float_convs", "dequantize_nodes"}
    with pytest.raises(ConfigError, match="runs on onnxruntime, not tensorrt"):
        open_runner(fp32, backend="tensorrt")


def _int8_conv_onnx(path):
    """Input Q/DQ (int8, zero-point 0) and INT8 per-channel weights into a DequantizeLinear -> Conv, as edgeres
    exports them."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.integers(-127, 128, (8, 3, 3, 3)).astype(np.int8), "w_q"),
             numpy_helper.from_array(np.full(8, 0.01, np.float32), "w_s"),
             numpy_helper.from_array(np.zeros(8, np.int8), "w_z"),
             numpy_helper.from_array(np.array(0.05, np.float32), "a_s"),
             numpy_helper.from_array(np.array(0, np.int8), "a_z")]
    nodes = [helper.make_node("QuantizeLinear", ["input", "a_s", "a_z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "a_s", "a_z"], ["dq"]),
             helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["w"], axis=0),
             helper.make_node("Conv", ["dq", "w"], ["logits"], pads=[1, 1, 1, 1])]
    g = helper.make_graph(nodes, "int8conv", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                            ["N", 3, 16, 16])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 8, 16, 16])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), str(path))
    return path


def test_cpu_stage_is_skipped_with_the_reason_without_openvino(monkeypatch, tmp_path):
    """Where OpenVINO is not installed the CPU artifact stage is skipped (never passed), says why, writes nothing."""
    from pathlib import Path

    import edgeres.cpu as cpu

    monkeypatch.setattr(cpu, "openvino_status", lambda: (False, "OpenVINO is not installed (test)"))
    res = cpu.run(cpu.CpuInputs(Path("missing.onnx"), [], tmp_path / "m.xml"))
    assert res.output is None and res.record.status == "skipped" and not res.record.passed
    assert res.record.message == "CPU INT8 artifact not written: OpenVINO is not installed (test)"
    assert cpu.skipped().record.to_dict()["message"] == res.record.message and not list(tmp_path.iterdir())
