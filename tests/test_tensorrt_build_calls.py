"""Which TensorRT API calls engine_build makes per version, checked with a TEST DOUBLE (FakeTensorRT).

FakeTensorRT records calls; the bytes it "serializes" are a marker, never an engine. Nothing here counts as
an engine built with TensorRT: real builds are in test_tensorrt_device.py (marked `tensorrt`).
"""
import json

import onnx
import pytest
from test_tensorrt_trtexec import tiny_onnx  # tests/ is on sys.path (pytest rootdir insertion)

from edgeres.tensorrt import engine_build

DEVICE = {"device": "FakeTensorRT test double", "compute_capability": "8.7"}


class _NS:
    def __init__(self, **kw):
        self.__dict__.update(kw)


class FakeTensorRT:
    """Records the builder calls of engine_build. Mimics the API surface of one TensorRT major version."""

    def __init__(self, version):
        self.__version__ = version
        self.major = int(version.split(".")[0])
        self.calls = []
        fake = self
        flags = ["FP16", "INT8", "GPU_FALLBACK", "VERSION_COMPATIBLE", "SPARSE_WEIGHTS"]
        if self.major >= 11:
            flags = [f for f in flags if f not in ("FP16", "INT8")]   # removed in 11.x
        self.BuilderFlag = _NS(**{f: f for f in flags})
        net_flags = {"EXPLICIT_BATCH": 0} if self.major < 10 else {"STRONGLY_TYPED": 1}
        self.NetworkDefinitionCreationFlag = _NS(**net_flags)
        self.MemoryPoolType = _NS(WORKSPACE="WORKSPACE")
        self.DeviceType = _NS(DLA="DLA", GPU="GPU")
        self.HardwareCompatibilityLevel = _NS(AMPERE_PLUS="AMPERE_PLUS")
        self.LayerType = _NS(QUANTIZE="QUANTIZE", DEQUANTIZE="DEQUANTIZE", OTHER="OTHER")

        class Logger:
            ERROR, WARNING, INFO, VERBOSE = range(4)

            def __init__(self, level):
                pass

        self.Logger = Logger
        if self.major < 11:
            class IInt8EntropyCalibrator2:
                def __init__(self):
                    pass
            self.IInt8EntropyCalibrator2 = IInt8EntropyCalibrator2

        class Network:
            def __init__(self, flags):
                self.flags, self.inputs, self.layers = flags, [], []

            num_layers = property(lambda self: len(self.layers))

            def get_layer(self, i):
                return self.layers[i]

            def get_input(self, i):
                return self.inputs[i]

        class OnnxParser:
            def __init__(self, network, logger):
                self.network, self.num_errors = network, 0

            def parse_from_file(self, path):
                fake.calls.append(("parse_from_file", path))
                g = onnx.load(path).graph
                dims = g.input[0].type.tensor_type.shape.dim
                shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in dims)
                self.network.inputs.append(_NS(name=g.input[0].name, shape=shape))
                kinds = {"QuantizeLinear": "QUANTIZE", "DequantizeLinear": "DEQUANTIZE"}
                self.network.layers = [_NS(type=kinds.get(n.op_type, "OTHER")) for n in g.node]
                return True

        self.OnnxParser = OnnxParser

        class Config:
            def __init__(self):
                self.__dict__["flags"] = []

            def __setattr__(self, name, value):
                fake.calls.append(("config." + name, value))
                self.__dict__[name] = value

            def set_flag(self, flag):
                self.flags.append(flag)
                fake.calls.append(("set_flag", flag))

            def set_memory_pool_limit(self, pool, size):
                fake.calls.append(("set_memory_pool_limit", pool, size))

            def add_optimization_profile(self, profile):
                fake.calls.append(("add_optimization_profile", profile.shapes))

            def set_calibration_profile(self, profile):
                fake.calls.append(("set_calibration_profile", profile.shapes))

            def create_timing_cache(self, data):
                fake.calls.append(("create_timing_cache", data))
                return _NS(serialize=lambda: b"timing")

            def set_timing_cache(self, cache, ignore_mismatch):
                fake.calls.append(("set_timing_cache", ignore_mismatch))

            def get_timing_cache(self):
                return _NS(serialize=lambda: b"timing-after")

        class Profile:
            def set_shape(self, name, lo, opt, hi):
                self.shapes = (name, lo, opt, hi)

        class Builder:
            num_DLA_cores = 2

            def __init__(self, logger):
                pass

            def create_network(self, flags):
                fake.calls.append(("create_network", flags))
                return Network(flags)

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                fake.calls.append(("build_serialized_network",))
                return b"FakeTensorRT: not an engine"

        self.Builder = Builder

    def names(self):
        return [c[0] for c in self.calls]


def build(tmp_path, version, onnx_path, **kw):
    fake = FakeTensorRT(version)
    info = engine_build.build_engine(onnx_path, tmp_path / "out.plan", trt=fake, device=DEVICE, **kw)
    return fake, info


def test_trt85_fp16_dla(tmp_path):
    fake, info = build(tmp_path, "8.5.2.2", tiny_onnx(tmp_path / "m.onnx"), precision="fp16", dla_core=0,
                       gpu_fallback=True, batch=(2, 2, 2), workspace_mb=64)
    assert ("create_network", 1 << 0) in fake.calls                      # EXPLICIT_BATCH on 8.x
    assert ("set_memory_pool_limit", "WORKSPACE", 64 << 20) in fake.calls
    assert ("config.default_device_type", "DLA") in fake.calls and ("config.DLA_core", 0) in fake.calls
    assert info["builder_flags"] == ["FP16", "GPU_FALLBACK"]
    assert ("add_optimization_profile", ("input", (2, 3, 16, 16), (2, 3, 16, 16), (2, 3, 16, 16))) in fake.calls
    assert info["trt_version"] == "8.5.2.2" and info["device"] == DEVICE["device"]
    assert info["profile"]["max"] == [2, 3, 16, 16] and not info["onnx_has_qdq"]


def test_trt86_int8_from_calibration_cache(tmp_path):
    cache = tmp_path / "calib.cache"
    cache.write_text("TRT-8602-EntropyCalibration2\ninput: 3c010a14\n")
    fake, info = build(tmp_path, "8.6.2.3", tiny_onnx(tmp_path / "m.onnx"), precision="int8", calib_cache=cache,
                       version_compatible=True, hardware_compatibility="ampere+", timing_cache=tmp_path / "t.cache")
    calib = [c for c in fake.calls if c[0] == "config.int8_calibrator"]
    assert len(calib) == 1 and calib[0][1].read_calibration_cache() == cache.read_bytes()
    assert calib[0][1].get_batch(["input"]) is None
    assert "set_calibration_profile" in fake.names()
    assert info["builder_flags"] == ["INT8", "VERSION_COMPATIBLE"]
    assert ("config.hardware_compatibility_level", "AMPERE_PLUS") in fake.calls
    assert (tmp_path / "t.cache").read_bytes() == b"timing-after"
    # a cache tagged for another TensorRT is handed over with this TensorRT's header; the file is untouched
    fake, info = build(tmp_path, "8.5.2", tiny_onnx(tmp_path / "m.onnx"), precision="int8", calib_cache=cache)
    handed = [c for c in fake.calls if c[0] == "config.int8_calibrator"][0][1].read_calibration_cache()
    assert handed == b"TRT-8502-EntropyCalibration2\ninput: 3c010a14\n"
    assert info["calib_cache_header"] == "TRT-8602-EntropyCalibration2"
    assert cache.read_text().startswith("TRT-8602-")
    cache.write_text("TRT-8602-MinMaxCalibration\ninput: 3c010a14\n")
    with pytest.raises(engine_build.BuildError, match="not an EntropyCalibration2 header"):
        build(tmp_path, "8.6.2", tiny_onnx(tmp_path / "m.onnx"), precision="int8", calib_cache=cache)


def test_trt10_strongly_typed_and_qdq(tmp_path):
    qdq = tiny_onnx(tmp_path / "q.onnx", qdq=True)
    fake, info = build(tmp_path, "10.3.0.30", qdq, strongly_typed=True)
    assert ("create_network", 1 << 1) in fake.calls and info["builder_flags"] == []
    fake, info = build(tmp_path, "10.3.0.30", qdq, precision="int8")
    assert ("create_network", 0) in fake.calls and info["builder_flags"] == ["INT8"] and info["onnx_has_qdq"]


def test_trt11_no_precision_flags(tmp_path):
    qdq = tiny_onnx(tmp_path / "q.onnx", qdq=True)
    fake, info = build(tmp_path, "11.0.0", qdq, precision="int8", sparsity=True)
    assert ("create_network", 0) in fake.calls and info["builder_flags"] == ["SPARSE_WEIGHTS"]
    assert info["strongly_typed"] is True
    with pytest.raises(engine_build.BuildError, match="no FP16 builder flag"):
        build(tmp_path, "11.0.0", qdq, precision="fp16")
    with pytest.raises(engine_build.BuildError, match="no DLA"):
        build(tmp_path, "11.0.0", qdq, dla_core=0)


def test_written_file_and_info_are_json(tmp_path):
    fake, info = build(tmp_path, "10.3.0", tiny_onnx(tmp_path / "m.onnx"))
    assert (tmp_path / "out.plan").read_bytes() == b"FakeTensorRT: not an engine"
    assert json.loads(json.dumps(info))["profile"]["opt"] == [8, 3, 16, 16]


def test_engine_build_is_self_contained():
    import ast
    from pathlib import Path

    tree = ast.parse(Path(engine_build.__file__).read_text())
    mods = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    mods |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert "edgeres" not in mods and mods <= {"__future__", "ctypes", "hashlib", "os", "re", "tempfile", "time",
                                              "pathlib", "typing", "tensorrt", "numpy"}
