"""Sidecar checks: an engine is refused, with a plain explanation, on another TensorRT / GPU (no TensorRT needed).

The "engine" files here are a few bytes written by the test: only the sidecar logic is exercised.
"""
import json

import pytest

from edgeres.errors import ArtifactError
from edgeres.io import sha256_bytes
from edgeres.tensorrt.engine_build import sidecar_mismatch
from edgeres.tensorrt.sidecar import check_sidecar, sidecar_path, write_sidecar

ORIN = {"trt_version": "8.5.2.2", "device": "Orin", "compute_capability": "8.7", "is_jetson": True, "dla_cores": 2}


def sidecar(**kw):
    base = {"trt_version": "8.5.2.2", "device": "Orin", "compute_capability": "8.7", "dla_core": None,
            "version_compatible": False, "hardware_compatibility": None, "engine": "model.plan"}
    return {**base, **kw}


def test_match_returns_none():
    assert sidecar_mismatch(sidecar(), ORIN) is None


def test_version_mismatch_explained():
    msg = sidecar_mismatch(sidecar(trt_version="8.6.2.3"), ORIN)
    assert "built with TensorRT 8.6.2.3" in msg and "has TensorRT 8.5.2.2" in msg and "exact TensorRT" in msg
    assert "edgeres compile" in msg
    # same major.minor.patch but another build number is still another TensorRT
    assert sidecar_mismatch(sidecar(trt_version="8.5.2.1"), ORIN) is not None


def test_version_compatible_rules():
    vc = sidecar(trt_version="10.3.0.26", version_compatible=True, compute_capability="8.9")
    here = {"compute_capability": "8.9"}
    assert sidecar_mismatch(vc, {**here, "trt_version": "10.8.0.43"}) is None
    assert sidecar_mismatch(vc, {**here, "trt_version": "11.0.0"}) is None
    assert "same or a later TensorRT" in sidecar_mismatch(vc, {**here, "trt_version": "10.1.0"})
    assert sidecar_mismatch(sidecar(trt_version="8.6.1", version_compatible=True, compute_capability="8.9"),
                            {**here, "trt_version": "11.0.0"}) is not None


def test_device_mismatch_and_hardware_compat():
    desktop = {"trt_version": "8.5.2.2", "device": "NVIDIA GeForce RTX 3090", "compute_capability": "8.6"}
    msg = sidecar_mismatch(sidecar(), desktop)
    assert "built for Orin (compute capability 8.7)" in msg and "RTX 3090" in msg
    hw = sidecar(trt_version="10.3.0", device="A100", compute_capability="8.0", hardware_compatibility="ampere+")
    assert sidecar_mismatch(hw, {"trt_version": "10.3.0", "device": "H100", "compute_capability": "9.0"}) is None
    assert "Ampere and newer" in sidecar_mismatch(hw, {"trt_version": "10.3.0", "device": "T4",
                                                       "compute_capability": "7.5"})


def test_dla_core_missing_on_device():
    msg = sidecar_mismatch(sidecar(dla_core=1), {**ORIN, "dla_cores": 1})
    assert "DLA core 1" in msg


def _engine(tmp_path, payload=b"not-a-real-engine"):
    engine = tmp_path / "model.plan"
    engine.write_bytes(payload)
    return engine


def test_check_sidecar_ok_and_mismatch(tmp_path):
    engine = _engine(tmp_path)
    write_sidecar(engine, sidecar(engine_sha256=sha256_bytes(engine.read_bytes())))
    assert check_sidecar(engine, ORIN)["trt_version"] == "8.5.2.2"
    with pytest.raises(ArtifactError, match="model.plan was built with TensorRT 8.5.2.2 but this machine has "
                                            "TensorRT 10.3.0"):
        check_sidecar(engine, {**ORIN, "trt_version": "10.3.0"})


def test_check_sidecar_missing_or_broken(tmp_path):
    engine = _engine(tmp_path)
    with pytest.raises(ArtifactError, match="has no sidecar model.plan.json"):
        check_sidecar(engine, ORIN)
    sidecar_path(engine).write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        check_sidecar(engine, ORIN)
    sidecar_path(engine).write_text(json.dumps({"device": "Orin"}))
    with pytest.raises(ArtifactError, match="no trt_version"):
        check_sidecar(engine, ORIN)
    with pytest.raises(ArtifactError, match="does not exist"):
        check_sidecar(tmp_path / "absent.plan", ORIN)


def test_check_sidecar_detects_replaced_engine(tmp_path):
    engine = _engine(tmp_path)
    write_sidecar(engine, sidecar(engine_sha256=sha256_bytes(b"the bytes that were built")))
    with pytest.raises(ArtifactError, match="sha256 differs"):
        check_sidecar(engine, ORIN)


def test_engine_from_another_platform_refused_in_one_line():
    """NVIDIA: serialized engines are not portable across platforms. H100 (x86_64) -> GH200 (aarch64), both sm 9.0,
    same TensorRT: refused before deserialize_cuda_engine; likewise a Jetson engine on an SBSA server."""
    h100 = {"trt_version": "10.3.0.26", "device": "H100", "compute_capability": "9.0", "machine": "x86_64",
            "system": "Linux", "is_jetson": False}
    gh200 = {**h100, "device": "GH200", "machine": "aarch64"}
    msg = sidecar_mismatch(sidecar(**h100), gh200)
    assert msg and "\n" not in msg and "not portable" in msg
    assert "Linux x86_64 (desktop" in msg and "Linux aarch64" in msg
    assert sidecar_mismatch(sidecar(**h100), {**h100, "device": "H100 NVL"}) is None
    orin = {**ORIN, "machine": "aarch64", "system": "Linux"}
    assert "Jetson" in sidecar_mismatch(sidecar(**orin), {**orin, "is_jetson": False})
    # a sidecar from before the platform was recorded is checked on what it names
    assert sidecar_mismatch(sidecar(), orin) is None


def test_hardware_compatible_engine_not_on_a_jetson():
    amp = sidecar(compute_capability="8.6", hardware_compatibility="ampere+")
    assert sidecar_mismatch(amp, {"compute_capability": "8.9", "trt_version": "8.5.2.2"}) is None
    assert "ampere+" in sidecar_mismatch(amp, {"compute_capability": "8.7", "trt_version": "8.5.2.2",
                                               "is_jetson": True})
