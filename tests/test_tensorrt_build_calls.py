"""engine_build.build_engine per TensorRT version on the TensorRT EMULATOR (tests/trt_emulator), in process.

The emulated module has each version's real names (generated from NVIDIA's binding tables) and refuses what
TensorRT refuses; its engines are ONNX + a record, never TensorRT engines. Nothing here counts as an engine
built with TensorRT: real builds are in test_tensorrt_device.py (marked `tensorrt`).
"""
import json

import pytest
from test_tensorrt_trtexec import tiny_onnx  # tests/ is on sys.path (pytest rootdir insertion)
from trt_emulator.emulator import MAGIC, build_module

from edgeres.tensorrt import engine_build

DEVICE = {"device": "edgeres emulated GPU (TensorRT emulator)", "compute_capability": "8.6"}
pytestmark = pytest.mark.trt_emulator


def build(tmp_path, folder, onnx_path, **kw):
    """build_engine on the emulated TensorRT of one version; returns (engine record, info)."""
    trt = build_module(folder)
    info = engine_build.build_engine(onnx_path, tmp_path / "out.plan", trt=trt, device=DEVICE, **kw)
    data = (tmp_path / "out.plan").read_bytes()
    assert data.startswith(MAGIC)
    return json.loads(data[len(MAGIC):].split(b"\n", 1)[0]), info


def test_trt85_fp16_dla(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGERES_EMULATED_JETSON", "orin")   # the emulator has DLA only on a Jetson that has it
    monkeypatch.setenv("EDGERES_TRT_EMULATOR_DLA_CORES", "2")
    head, info = build(tmp_path, "8.5.2", tiny_onnx(tmp_path / "m.onnx"), precision="fp16", dla_core=0,
                       gpu_fallback=True, batch=(2, 2, 2), workspace_mb=64)
    # NVIDIA's DLA table: Conv and ReLU run on DLA; the average Reduce (GlobalAveragePool), the 2D Shuffle (Flatten)
    # and the MatrixMultiply (Gemm) fall back to the GPU — the emulator's reading and edgeres's (dla.py) agree
    assert head["device_type"] == "DLA" and head["dla_core"] == 0 and head["layers_on_dla"] == 2
    from edgeres.check import load_onnx
    from edgeres.tensorrt.dla import gpu_layers

    planned = [g["op"] for g in gpu_layers(load_onnx(tmp_path / "m.onnx"))]
    assert planned == ["GlobalAveragePool", "Flatten", "Gemm"] and len(head["gpu_layers"]) == len(planned)
    assert all(op in name for op, name in zip(planned, head["gpu_layers"]))
    assert info["builder_flags"] == ["FP16", "GPU_FALLBACK"] and set(head["flags"]) == {"FP16", "GPU_FALLBACK"}
    assert head["input"]["profile"] == [[2, 3, 16, 16]] * 3
    assert info["trt_version"] == "8.5.2.2" and info["device"] == DEVICE["device"]
    assert info["profile"]["max"] == [2, 3, 16, 16] and not info["onnx_has_qdq"]
    monkeypatch.delenv("EDGERES_EMULATED_JETSON")   # a desktop GPU: TensorRT refuses, we say why
    with pytest.raises(engine_build.BuildError, match="failed to build"):
        build(tmp_path, "8.5.2", tiny_onnx(tmp_path / "m.onnx"), precision="fp16", dla_core=0, batch=(2, 2, 2))


def test_trt86_int8_from_calibration_cache(tmp_path):
    cache = tmp_path / "calib.cache"
    cache.write_text("TRT-8602-EntropyCalibration2\ninput: 3c010a14\nc: 3c010a14\nr: 3c010a14\ng: 3c010a14\n"
                     "f: 3c010a14\nlogits: 3c010a14\n")
    head, info = build(tmp_path, "8.6", tiny_onnx(tmp_path / "m.onnx"), precision="int8", calib_cache=cache,
                       version_compatible=True, hardware_compatibility="ampere+", timing_cache=tmp_path / "t.cache")
    assert head["calibration"] == "calibration cache" and head["calibration_scales"] == 6
    assert info["builder_flags"] == ["INT8", "VERSION_COMPATIBLE"] and head["version_compatible"]
    assert (tmp_path / "t.cache").read_bytes().startswith(b"EDGERES-EMULATED-TIMING-CACHE")
    # a cache tagged for another TensorRT is handed over with this TensorRT's header; the file is untouched
    head, info = build(tmp_path, "8.5.2", tiny_onnx(tmp_path / "m.onnx"), precision="int8", calib_cache=cache)
    assert head["calibration"] == "calibration cache"
    assert info["calib_cache_header"] == "TRT-8602-EntropyCalibration2"
    assert cache.read_text().startswith("TRT-8602-")
    with pytest.raises(AttributeError):   # 8.5.2 has no hardware compatibility level
        build(tmp_path, "8.5.2", tiny_onnx(tmp_path / "m.onnx"), hardware_compatibility="ampere+")
    cache.write_text("TRT-8602-MinMaxCalibration\ninput: 3c010a14\n")
    with pytest.raises(engine_build.BuildError, match="not an EntropyCalibration2 header"):
        build(tmp_path, "8.6", tiny_onnx(tmp_path / "m.onnx"), precision="int8", calib_cache=cache)


def test_trt10_strongly_typed_and_qdq(tmp_path):
    qdq = tiny_onnx(tmp_path / "q.onnx", qdq=True)
    head, info = build(tmp_path, "10.3", qdq, strongly_typed=True)
    assert head["strongly_typed"] and info["builder_flags"] == [] and head["explicit_quantization"]
    head, info = build(tmp_path, "10.3", qdq, precision="int8")
    assert not head["strongly_typed"] and info["builder_flags"] == ["INT8"] and info["onnx_has_qdq"]
    with pytest.raises(engine_build.BuildError, match="failed to build"):   # Q/DQ without INT8: TensorRT refuses
        build(tmp_path, "10.3", qdq, precision="fp16")


def test_trt11_no_precision_flags(tmp_path):
    qdq = tiny_onnx(tmp_path / "q.onnx", qdq=True)
    head, info = build(tmp_path, "11.0", qdq, precision="int8", sparsity=True)
    assert head["strongly_typed"] and info["builder_flags"] == ["SPARSE_WEIGHTS"]
    assert info["strongly_typed"] is True
    with pytest.raises(engine_build.BuildError, match="no FP16 builder flag"):
        build(tmp_path, "11.0", qdq, precision="fp16")
    with pytest.raises(engine_build.BuildError, match="no DLA"):
        build(tmp_path, "11.0", qdq, dla_core=0)
    trt = build_module("11.0")
    for absent in ("IInt8EntropyCalibrator2", "nonexistent"):
        assert not hasattr(trt, absent)
    assert not hasattr(trt.BuilderFlag, "INT8") and hasattr(trt.BuilderFlag, "SPARSE_WEIGHTS")


def test_written_file_and_info_are_json(tmp_path):
    head, info = build(tmp_path, "10.16", tiny_onnx(tmp_path / "m.onnx"))
    assert head["trt_version"] == info["trt_version"] == "10.16.0.72"
    assert json.loads(json.dumps(info))["profile"]["opt"] == [8, 3, 16, 16]


def test_emulator_surface_follows_each_version():
    """Names a version lacks raise AttributeError, as the real bindings: 8.5.2 has build_engine and
    execute_async_v2, 10.x does not; enum values are NVIDIA's."""
    t85, t103 = build_module("8.5.2"), build_module("10.3")
    assert int(t85.BuilderFlag.INT8) == 1 and int(t85.NetworkDefinitionCreationFlag.EXPLICIT_BATCH) == 0
    assert int(t103.NetworkDefinitionCreationFlag.STRONGLY_TYPED) == 1
    b85, b103 = t85.Builder(t85.Logger(t85.Logger.ERROR)), t103.Builder(t103.Logger(t103.Logger.ERROR))
    assert hasattr(b85, "build_engine") and not hasattr(b103, "build_engine")
    with pytest.raises(AttributeError):
        t85.HardwareCompatibilityLevel  # noqa: B018 - 8.6 added it
    with pytest.raises(NotImplementedError):
        b85.build_engine(None, None)    # present in 8.5.2, not emulated: says so instead of pretending


def test_engine_build_is_self_contained():
    import ast
    from pathlib import Path

    tree = ast.parse(Path(engine_build.__file__).read_text())
    mods = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    mods |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert "edgeres" not in mods and mods <= {"__future__", "ctypes", "hashlib", "os", "platform", "re", "tempfile",
                                              "time", "pathlib", "typing", "tensorrt", "numpy"}
