"""The equivalent trtexec command line per TensorRT version (8.5, 8.6, 10.3, 11.0), planned from a real ONNX."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeres.errors import ConfigError
from edgeres.onnx_info import inspect_onnx
from edgeres.tensorrt.compile import plan_compile, write_trtexec_script
from edgeres.tensorrt.options import CompileOptions, Precision


def tiny_onnx(path, *, batch="N", qdq=False):
    """Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm; optionally with a Q/DQ pair on the input."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal((10, 4)).astype(np.float32), "fc_w"),
             numpy_helper.from_array(np.zeros(10, np.float32), "fc_b")]
    nodes, src = [], "input"
    if qdq:
        inits += [numpy_helper.from_array(np.array(0.02, np.float32), "s"),
                  numpy_helper.from_array(np.array(0, np.int8), "z")]
        nodes += [helper.make_node("QuantizeLinear", ["input", "s", "z"], ["q"]),
                  helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"])]
        src = "dq"
    nodes += [helper.make_node("Conv", [src, "w"], ["c"], pads=[1, 1, 1, 1]),
              helper.make_node("Relu", ["c"], ["r"]),
              helper.make_node("GlobalAveragePool", ["r"], ["g"]),
              helper.make_node("Flatten", ["g"], ["f"]),
              helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                            [batch, 3, 16, 16])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture
def fp32(tmp_path):
    return tiny_onnx(tmp_path / "m.onnx")


@pytest.fixture
def qdq(tmp_path):
    return tiny_onnx(tmp_path / "q.onnx", qdq=True)


def plan(onnx_path, version, jetson=False, **kw):
    return plan_compile(onnx_path, onnx_path.with_suffix(".plan"), CompileOptions(**kw), trt_version=version,
                        is_jetson=jetson, dla_cores=2 if jetson else 0)


def test_inspect_onnx(fp32, qdq, tmp_path):
    info = inspect_onnx(fp32)
    assert info.input_name == "input" and info.dynamic_batch and info.chw == (3, 16, 16) and not info.has_qdq
    assert inspect_onnx(qdq).has_qdq
    static = inspect_onnx(tiny_onnx(tmp_path / "s.onnx", batch=4))
    assert static.input_shape == (4, 3, 16, 16) and not static.dynamic_batch


def test_fp16_dla_on_trt85_jetson(fp32):
    argv = plan(fp32, "8.5.2", jetson=True, precision=Precision.FP16, dla_core=1, gpu_fallback=True,
                batch=(2, 2, 2), workspace_mb=256)["trtexec"]
    # no --explicitBatch: trtexec 8.x marks it deprecated (it has no effect: ONNX is always explicit batch)
    assert argv == ["trtexec", f"--onnx={fp32}", f"--saveEngine={fp32.with_suffix('.plan')}",
                    "--minShapes=input:2x3x16x16", "--optShapes=input:2x3x16x16", "--maxShapes=input:2x3x16x16",
                    "--fp16", "--memPoolSize=workspace:256", "--useDLACore=1", "--allowGPUFallback", "--buildOnly"]


def test_int8_calib_on_trt86(fp32, tmp_path):
    cache = tmp_path / "calib.cache"
    cache.write_text("TRT-8602-EntropyCalibration2\n")
    argv = plan(fp32, "8.6.2", precision=Precision.INT8, calib_cache=cache, timing_cache=tmp_path / "t.cache",
                version_compatible=True, hardware_compatibility="ampere+", sparsity=True)["trtexec"]
    assert "--explicitBatch" not in argv and argv[-1] == "--skipInference"
    for flag in ("--int8", f"--calib={cache}", f"--timingCacheFile={tmp_path / 't.cache'}", "--versionCompatible",
                 "--hardwareCompatibilityLevel=ampere+", "--sparsity=enable"):
        assert flag in argv
    assert "--fp16" not in argv and "--workspace" not in " ".join(argv)


def test_trt103_default_profile_and_strong_typing(fp32, qdq):
    p = plan(fp32, "10.3", precision=Precision.FP16)
    argv = p["trtexec"]
    assert "--explicitBatch" not in argv and "--fp16" in argv and "--int8" not in argv
    assert p["batch"] == [1, 8, 32] and "--optShapes=input:8x3x16x16" in argv
    assert argv.count("--fp16") == 1 and argv[-1] == "--skipInference"
    q = plan(qdq, "10.3", strongly_typed=True)["trtexec"]
    assert "--stronglyTyped" in q and "--int8" not in q and "--fp16" not in q
    # issue 36: INT8 from the Q/DQ ONNX on 10.x is strongly typed without asking, with no precision flag
    q = plan(qdq, "10.3", precision=Precision.INT8)
    assert "--stronglyTyped" in q["trtexec"] and "--int8" not in q["trtexec"] and q["options"]["strongly_typed"]
    with pytest.raises(ConfigError, match="drop --no-strongly-typed"):
        plan(qdq, "10.3", precision=Precision.INT8, strongly_typed=False)
    # 8.6 has no strong typing: the weakly typed --int8 stays there
    assert "--int8" in plan(qdq, "8.6", precision=Precision.INT8)["trtexec"]
    # 10.16: --fp16 still works but is deprecated since 10.12, and the plan says so
    p = plan(fp32, "10.16", precision=Precision.FP16)
    assert "--fp16" in p["trtexec"] and any("deprecated since 10.12" in w for w in p["warnings"])


def test_best_precision_needs_ranges_on_fp32_onnx(fp32, qdq):
    with pytest.raises(ConfigError, match="--calib-cache FILE"):
        plan(fp32, "10.3", precision=Precision.BEST)
    argv = plan(qdq, "10.3", precision=Precision.BEST)["trtexec"]
    assert "--fp16" in argv and "--int8" in argv


def test_trt11_has_no_precision_flags(qdq, fp32):
    p = plan(qdq, "11.0", precision=Precision.INT8, version_compatible=True)
    argv = p["trtexec"]
    assert not {"--int8", "--fp16", "--best", "--stronglyTyped", "--explicitBatch"} & set(argv)
    assert "--versionCompatible" in argv and argv[-1] == "--skipInference"
    assert p["warnings"] and "Q/DQ" in p["warnings"][0]
    with pytest.raises(ConfigError, match="strongly typed"):
        plan(fp32, "11.0", precision=Precision.FP16)


def test_static_batch_onnx(tmp_path):
    static = tiny_onnx(tmp_path / "s.onnx", batch=4)
    argv = plan(static, "10.3")["trtexec"]
    assert not any(a.startswith("--minShapes") for a in argv)
    with pytest.raises(ConfigError, match="fixed batch of 4"):
        plan(static, "10.3", batch=(1, 4, 8))


def test_script_is_written_and_not_overwritten(fp32):
    p = plan(fp32, "8.6.2", precision=Precision.FP16)
    script = write_trtexec_script(fp32.with_suffix(".plan"), p)
    text = script.read_text()
    assert text.startswith("#!/bin/sh") and "TensorRT 8.6.2" in text and "--fp16 \\\n" in text
    with pytest.raises(ConfigError, match="already exists"):
        write_trtexec_script(fp32.with_suffix(".plan"), p)
