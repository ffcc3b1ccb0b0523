"""Real TensorRT builds and inference. Skipped unless TensorRT and a CUDA GPU are present."""
import numpy as np
import pytest
from test_tensorrt_trtexec import tiny_onnx  # tests/ is on sys.path (pytest rootdir insertion)

from edgeres.tensorrt.compile import compile_engine
from edgeres.tensorrt.options import CompileOptions, Precision
from edgeres.tensorrt.sidecar import check_sidecar
from edgeres.tensorrt.status import tensorrt_status

STATUS = tensorrt_status()
pytestmark = [pytest.mark.tensorrt, pytest.mark.gpu,
              pytest.mark.skipif(not STATUS.available, reason=f"needs TensorRT and a GPU: {STATUS.reason}")]


def test_fp32_engine_matches_onnxruntime(tmp_path):
    import onnxruntime as ort

    from edgeres.tensorrt.runner import TrtRunner

    onnx_path = tiny_onnx(tmp_path / "m.onnx")
    info = compile_engine(onnx_path, tmp_path / "m.plan", CompileOptions(batch=(1, 4, 8)))
    assert info["trt_version"] == STATUS.version and (tmp_path / "m.plan.json").is_file()
    check_sidecar(tmp_path / "m.plan")
    x = np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32)
    ref = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    for graph in (False, True):
        with TrtRunner(tmp_path / "m.plan", cuda_graph=graph) as runner:
            out, times = runner.infer_timed(x)
            assert np.abs(out - ref).max() < 1e-3
            assert set(times) == {"h2d_ms", "compute_ms", "d2h_ms"}


def test_fp16_engine_where_supported(tmp_path):
    if STATUS.version and STATUS.version.startswith("11"):
        pytest.skip("TensorRT 11 has no --fp16")
    info = compile_engine(tiny_onnx(tmp_path / "m.onnx"), tmp_path / "h.plan",
                          CompileOptions(precision=Precision.FP16))
    assert info["builder_flags"] == ["FP16"]
