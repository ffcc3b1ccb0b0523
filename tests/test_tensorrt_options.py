"""Version dispatch and option validation for TensorRT 8.5 / 8.6 / 10.x / 11.x (no TensorRT needed)."""
from pathlib import Path

import pytest

from edgeres.errors import ConfigError
from edgeres.tensorrt.options import CompileOptions, Precision, parse_batch, precision_from_flags, validate_options
from edgeres.tensorrt.versions import calib_version_tag, capabilities, parse_version

JETSON = dict(is_jetson=True, dla_cores=2)
DESKTOP = dict(is_jetson=False, dla_cores=0)


def test_parse_version_forms():
    assert parse_version("8.6.2.3") > parse_version("8.6.2")
    assert str(parse_version("tensorrt 10.3.0.30")) == "10.3.0.30"
    assert parse_version("11").major == 11
    with pytest.raises(ConfigError, match="cannot read a TensorRT version"):
        parse_version("latest")


@pytest.mark.parametrize("version", ["8.4.3", "7.2", "9.2", "12.0"])
def test_unsupported_versions_refused(version):
    with pytest.raises(ConfigError, match="not supported"):
        capabilities(version)


def test_capability_table_per_version():
    c85, c86, c103, c110 = (capabilities(v) for v in ("8.5.2", "8.6.2", "10.3.0", "11.0"))
    assert c85.explicit_batch_flag and c86.explicit_batch_flag and not c103.explicit_batch_flag
    assert not c85.version_compatible and c86.version_compatible and c86.hardware_compatibility
    assert c85.trtexec_skip_inference == "--buildOnly" and c86.trtexec_skip_inference == "--skipInference"
    assert not c86.strongly_typed and c103.strongly_typed and not c103.always_strongly_typed
    assert c110.always_strongly_typed and not c110.weak_typing and not c110.implicit_int8 and not c110.dla
    assert c103.dla and c103.implicit_int8 and c103.implicit_int8_deprecated
    assert not capabilities("10.0").implicit_int8_deprecated


def test_calib_version_tags_match_tensorrt_headers():
    # real cache headers seen in the wild: TRT-8502, TRT-8601 (8.x: M*1000+m*100+p), TRT-100300 (10.3.0)
    assert calib_version_tag("8.5.2") == "TRT-8502-EntropyCalibration2"
    assert calib_version_tag("8.6.1.6") == "TRT-8601-EntropyCalibration2"
    assert calib_version_tag("10.3.0.30") == "TRT-100300-EntropyCalibration2"


def test_batch_parsing():
    assert parse_batch("1,8,32") == (1, 8, 32)
    assert parse_batch("4") == (4, 4, 4)
    with pytest.raises(ConfigError, match="min <= opt <= max"):
        parse_batch("8,4,16")
    with pytest.raises(ConfigError, match="three integers"):
        parse_batch("1,2")
    assert precision_from_flags(fp16=True, int8=True) is Precision.BEST


def test_dla_refused_on_trt11_and_desktop():
    opts = CompileOptions(precision=Precision.FP16, dla_core=0)
    with pytest.raises(ConfigError, match="no DLA support"):
        validate_options(opts, "11.0", **JETSON)
    with pytest.raises(ConfigError, match="needs a Jetson with DLA cores"):
        validate_options(opts, "10.3", **DESKTOP)
    assert validate_options(opts, "8.5.2", **JETSON) == []


def test_dla_only_where_nvidia_ships_it():
    """Issue 36: DLA rows per (version, platform, module): none 10.8 .. 11.4.0 or from 11.5; 11.4.1 on AGX Orin only
    (the module must be named); nothing from 11.5 on a Jetson at all."""
    fp16 = CompileOptions(precision=Precision.FP16, dla_core=0, batch=(1, 1, 1))
    for v in ("10.8", "10.16", "11.0", "11.3.1", "11.4.0", "11.5", "11.6.2"):
        with pytest.raises(ConfigError, match="no DLA support"):
            validate_options(fp16, v, **JETSON, jetson_module="agx-orin")
    int8 = CompileOptions(precision=Precision.INT8, dla_core=0, batch=(1, 1, 1))
    assert validate_options(int8, "11.4.1", **JETSON, jetson_module="agx-orin", onnx_has_qdq=True)
    with pytest.raises(ConfigError, match="AGX Orin only.*not on Jetson Orin NX"):
        validate_options(int8, "11.4.1", **JETSON, jetson_module="orin-nx", onnx_has_qdq=True)
    with pytest.raises(ConfigError, match="name the module: --jetson-module agx-orin"):
        validate_options(int8, "11.4.1", **JETSON, onnx_has_qdq=True)
    assert validate_options(fp16, "10.3", **JETSON, jetson_module="orin-nx") == []
    with pytest.raises(ConfigError, match="is not for Jetson"):
        validate_options(CompileOptions(), "11.5", **JETSON)
    validate_options(CompileOptions(), "11.5", **DESKTOP)


def test_dla_rules():
    with pytest.raises(ConfigError, match="FP16 or INT8 only"):
        validate_options(CompileOptions(dla_core=0), "8.6", **JETSON)
    with pytest.raises(ConfigError, match="DLA cores 0..1"):
        validate_options(CompileOptions(precision=Precision.FP16, dla_core=2), "8.6", **JETSON)
    with pytest.raises(ConfigError, match="fixed batch"):
        validate_options(CompileOptions(precision=Precision.FP16, dla_core=0, batch=(1, 4, 8)), "8.6", **JETSON)
    with pytest.raises(ConfigError, match="fixed batch"):   # GPU fallback would run every layer on the GPU
        validate_options(CompileOptions(precision=Precision.FP16, dla_core=0, batch=(1, 4, 8), gpu_fallback=True),
                         "8.6", **JETSON)
    validate_options(CompileOptions(precision=Precision.FP16, dla_core=0, batch=(4, 4, 4), gpu_fallback=True),
                     "8.6", **JETSON)
    with pytest.raises(ConfigError, match="only applies with --dla-core"):
        validate_options(CompileOptions(gpu_fallback=True), "10.3", **DESKTOP)


def test_fp16_on_trt11_explains_strong_typing():
    with pytest.raises(ConfigError) as e:
        validate_options(CompileOptions(precision=Precision.FP16), "11.0", **DESKTOP)
    msg = str(e.value)
    assert "strongly typed" in msg and "autocast" in msg and "without --fp16" in msg
    validate_options(CompileOptions(precision=Precision.FP16), "10.3", **DESKTOP)


def test_int8_paths_per_version(tmp_path):
    cache = tmp_path / "c.cache"
    cache.write_text("TRT-8502-EntropyCalibration2\n")
    int8 = CompileOptions(precision=Precision.INT8)
    with pytest.raises(ConfigError, match="Q/DQ INT8 ONNX"):
        validate_options(int8, "11.0", **DESKTOP, onnx_has_qdq=False)
    assert "Q/DQ nodes" in validate_options(int8, "11.0", **DESKTOP, onnx_has_qdq=True)[0]
    with pytest.raises(ConfigError, match="--calib-cache FILE"):
        validate_options(int8, "8.5.2", **DESKTOP, onnx_has_qdq=False)
    cached = CompileOptions(precision=Precision.INT8, calib_cache=cache)
    assert validate_options(cached, "8.5.2", **DESKTOP, onnx_has_qdq=False) == []
    warn = validate_options(cached, "10.3", **DESKTOP, onnx_has_qdq=False)
    assert len(warn) == 1 and "deprecated since 10.1" in warn[0]
    with pytest.raises(ConfigError, match="removed implicit INT8 calibration caches"):
        validate_options(cached, "11.0", **DESKTOP, onnx_has_qdq=True)
    with pytest.raises(ConfigError, match="explicit quantization ignores"):
        validate_options(cached, "10.3", **DESKTOP, onnx_has_qdq=True)
    with pytest.raises(ConfigError, match="add --int8"):
        validate_options(CompileOptions(calib_cache=cache), "8.6", **DESKTOP, onnx_has_qdq=False)
    with pytest.raises(ConfigError, match="does not exist"):
        validate_options(CompileOptions(precision=Precision.INT8, calib_cache=Path(tmp_path / "nope")), "8.6",
                         **DESKTOP, onnx_has_qdq=False)


def test_strongly_typed_rules():
    with pytest.raises(ConfigError, match="needs TensorRT 10"):
        validate_options(CompileOptions(strongly_typed=True), "8.6", **DESKTOP)
    with pytest.raises(ConfigError, match="drop\n?.*--fp16"):
        validate_options(CompileOptions(strongly_typed=True, precision=Precision.FP16), "10.3", **DESKTOP)
    with pytest.raises(ConfigError, match="compile the Q/DQ INT8 ONNX"):
        validate_options(CompileOptions(strongly_typed=True, precision=Precision.INT8), "10.3", **DESKTOP,
                         onnx_has_qdq=False)
    warn = validate_options(CompileOptions(precision=Precision.INT8), "10.3", **DESKTOP, onnx_has_qdq=True)
    assert warn and "strongly typed" in warn[0]
    with pytest.raises(ConfigError, match="always strongly typed"):
        validate_options(CompileOptions(strongly_typed=False), "11.0", **DESKTOP)
    assert validate_options(CompileOptions(strongly_typed=True), "10.3", **DESKTOP) == []


def test_portability_options():
    with pytest.raises(ConfigError, match="needs TensorRT 8.6"):
        validate_options(CompileOptions(version_compatible=True), "8.5.2", **DESKTOP)
    with pytest.raises(ConfigError, match="needs TensorRT 8.6"):
        validate_options(CompileOptions(hardware_compatibility="ampere+"), "8.5.2", **DESKTOP)
    with pytest.raises(ConfigError, match="desktop Ampere"):
        validate_options(CompileOptions(hardware_compatibility="ampere+"), "10.3", **JETSON)
    with pytest.raises(ConfigError, match="compute capability >= 8.0"):
        validate_options(CompileOptions(hardware_compatibility="ampere+"), "10.3", **DESKTOP, compute_capability="7.5")
    assert validate_options(CompileOptions(hardware_compatibility="ampere+", version_compatible=True), "10.3",
                            **DESKTOP, compute_capability="9.0") == []
    warn = validate_options(CompileOptions(sparsity=True), "8.6", **DESKTOP, compute_capability="7.5")
    assert "sparse tensor cores" in warn[0]
    with pytest.raises(ConfigError, match="cannot be combined with --dla-core"):
        validate_options(CompileOptions(precision=Precision.INT8, dla_core=0, version_compatible=True), "8.6",
                         **JETSON, onnx_has_qdq=True)
