"""TensorRT versions and what each supports. Variants are data: one capability row per version, each fact with
the NVIDIA source it comes from (`SOURCES`). The planner (targets.py), `edgeres compile` (options.py), the device
runtime (through the plan), the README and the CLI help read these rows; tests/test_tensorrt_options.py checks the
README's statements against them.

Supported targets: 8.5 (JetPack 5.1.x ships 8.5.2), 8.6 (JetPack 6.0 ships 8.6.2), 10.3 (JetPack 6.1/6.2 ship
10.3), 10.x desktops, 11.x desktops and 11.4.1+ (Jetson AGX Orin on JetPack 7.2.2+, DLA back, strongly typed).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from edgeres.errors import ConfigError

MIN_SUPPORTED = (8, 5)
MAX_MAJOR = 11

# Where each capability comes from (NVIDIA's own pages; the per-version binding/trtexec tables are ../shared/trt-api,
# read from github.com/NVIDIA/TensorRT at each release tag).
SOURCES = {
    "explicit_batch_flag": "trt-api <ver>/python_api.json: NetworkDefinitionCreationFlag.EXPLICIT_BATCH (8.x needs "
                           "it for ONNX); TensorRT 10.0 release notes: implicit batch removed",
    "weak_typing": "trt-api 11.0/python_api.json: no BuilderFlag.FP16/INT8; TensorRT 11.x migration guide "
                   "(https://docs.nvidia.com/deeplearning/tensorrt/latest/api/migration/)",
    "implicit_int8": "trt-api 11.0: no IInt8*Calibrator; C++ API deprecated list: IInt8EntropyCalibrator2 "
                     "'Deprecated in TensorRT 10.1. Superseded by explicit quantization.' "
                     "(https://docs.nvidia.com/deeplearning/tensorrt/api/c_api/deprecated.html)",
    "strongly_typed": "trt-api 10.3/python_api.json: NetworkDefinitionCreationFlag.STRONGLY_TYPED (absent in 8.x); "
                      "trtexec --stronglyTyped from 10.x (trt-api <ver>/trtexec_options.txt)",
    "dla": "Working with DLA, TensorRT 11.4.1 (https://docs.nvidia.com/deeplearning/tensorrt/11.4.1/inference-library/"
           "work-with-dla.html): 'TensorRT 10.7 was the last 10.x release that supported DLA'; 'DLA was unavailable "
           "in TensorRT 11.0 through 11.3'; '11.4.0 supported DLA only on Windows on ARM'; 11.4.1 release notes: "
           "DLA on Jetson AGX Orin with JetPack 7.2.2 or later, strongly typed networks, GPU fallback as in 10.x",
    "dla_layers": "DLA Supported Layers and Restrictions (https://docs.nvidia.com/deeplearning/tensorrt/latest/"
                  "inference-library/dla-layer-restrictions.html): per-layer precision and key limits, see dla.py",
    "dla_explicit_quantization": "NVIDIA TensorRT 8.5 developer guide, Working with DLA: no explicit "
                                 "quantization; TensorRT 8.6 release notes: Q/DQ (explicit quantization) on DLA",
    "int8_weight_forms": "TensorRT 10.x developer guide, Explicit Quantization > Quantized Weights (https://docs."
                         "nvidia.com/deeplearning/tensorrt/latest/inference-library/quantized-types-explicit-"
                         "quantization.html): weights may be high precision (quantized by the IQuantizeLayer) or "
                         "pre-quantized INT8 through an IDequantizeLayer. TensorRT 8.5/8.6 API (IConstantLayer): "
                         "weights other than kINT32 are real values, so 8.x documents only FP32 weights behind "
                         "QuantizeLinear (the form NVIDIA's pytorch-quantization toolkit exports)",
    "version_compatible": "TensorRT 8.6 release notes: BuilderFlag.VERSION_COMPATIBLE (trt-api 8.6 python_api.json); "
                          "Version Compatibility (https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-"
                          "library/version-compatibility.html): 'supported from version 8.6', runtime must allow "
                          "engine host code; Support Matrix 11.4.1 (https://docs.nvidia.com/deeplearning/tensorrt/"
                          "11.4.1/getting-started/support-matrix.html), Engine Portability: newer runtimes of the "
                          "same major, and across majors only 8 -> 10 and 10 -> 11",
    "hardware_compatibility": "TensorRT 8.6 release notes: HardwareCompatibilityLevel.AMPERE_PLUS (trt-api 8.6); "
                              "NvInfer.h kAMPERE_PLUS: 'only supported for engines built on NVIDIA Ampere and later "
                              "GPUs'; NVIDIA TensorRT 8.6 Developer Guide, section 6.2 Hardware Compatibility: "
                              "Ampere and later only, 'not supported on NVIDIA DRIVE OS or JetPack' (that page is not "
                              "in this project's search corpus; its sentence is quoted by secondary sources)",
    "platform_portability": "Support Matrix (https://docs.nvidia.com/deeplearning/tensorrt/latest/getting-started/"
                            "support-matrix.html), Engine Portability: 'Serialized engines are not portable across "
                            "platforms'",
    "trtexec_flags": "trt-api <ver>/trtexec_options.txt (NVIDIA/TensorRT samples/common/sampleOptions.cpp at each tag)",
}

# Named targets a user can plan for without TensorRT installed (`edgeres compile --trt-version`).
KNOWN_TARGETS = {
    "8.5": "8.5.2 (JetPack 5.1.x, Jetson Xavier/Orin; DLA)",
    "8.6": "8.6.2 (JetPack 6.0, Jetson Orin; DLA)",
    "10.3": "10.3.0 (JetPack 6.1/6.2, Jetson Orin; DLA)",
    "10": "10.x (desktop GPUs; DLA only up to 10.7)",
    "11": "11.x (desktop GPUs; strongly typed only; no DLA before 11.4.1)",
    "11.4.1": "11.4.1+ (JetPack 7.2.2+, Jetson AGX Orin; strongly typed; DLA)",
}
INT8_CONSTANTS, FP32_QUANTIZE = "int8_constants", "fp32_quantize"   # the two INT8 weight forms of a Q/DQ ONNX


@dataclass(frozen=True, order=True)
class TrtVersion:
    major: int
    minor: int = 0
    patch: int = 0
    build: int = 0

    def __str__(self) -> str:
        parts = [self.major, self.minor, self.patch] + ([self.build] if self.build else [])
        return ".".join(str(p) for p in parts)

    @property
    def short(self) -> str:
        return f"{self.major}.{self.minor}"

    def at_least(self, major: int, minor: int = 0) -> bool:
        return (self.major, self.minor) >= (major, minor)


def parse_version(text: str | TrtVersion) -> TrtVersion:
    """'8.6.2.3', '10.3', '11' or 'tensorrt 10.3.0.30' -> TrtVersion; ConfigError otherwise."""
    if isinstance(text, TrtVersion):
        return text
    m = re.search(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?(?:\.(\d+))?", str(text))
    if not m:
        raise ConfigError(f"cannot read a TensorRT version from {text!r}; expected e.g. 8.6.2 or 10.3")
    return TrtVersion(*(int(g) if g else 0 for g in m.groups()))


@dataclass(frozen=True)
class Capabilities:
    version: TrtVersion
    explicit_batch_flag: bool      # create_network needs EXPLICIT_BATCH (8.x)
    weak_typing: bool              # BuilderFlag.FP16/INT8 exist (<= 10.x)
    implicit_int8: bool            # IInt8EntropyCalibrator2 / calibration cache usable (<= 10.x)
    implicit_int8_deprecated: bool  # deprecated since 10.1
    strongly_typed: bool           # STRONGLY_TYPED network flag exists (10.x) or is the only mode (11.x)
    always_strongly_typed: bool    # 11.x
    dla: bool                      # DLA supported: 8.5 .. 10.7 and 11.4.1+ (SOURCES["dla"])
    dla_explicit_quantization: bool  # Q/DQ networks on DLA (8.6+)
    int8_weight_forms: tuple[str, ...]  # INT8 weight forms of a Q/DQ ONNX this builder documents
    version_compatible: bool       # BuilderFlag.VERSION_COMPATIBLE (8.6+)
    hardware_compatibility: bool   # HardwareCompatibilityLevel.AMPERE_PLUS (8.6+; desktop Ampere+ only)
    trtexec_explicit_batch: bool   # --explicitBatch accepted (8.x only)
    trtexec_skip_inference: str    # build-only flag: --buildOnly (8.5) / --skipInference (8.6+)
    calib_tag_number: int          # number inside the calibration cache header "TRT-<n>-EntropyCalibration2"


def capabilities(version: str | TrtVersion) -> Capabilities:
    """The capability row for a TensorRT version; ConfigError for versions edgeres does not target."""
    v = parse_version(version)
    if (v.major, v.minor) < MIN_SUPPORTED or v.major > MAX_MAJOR or v.major == 9:
        raise ConfigError(f"TensorRT {v} is not supported; edgeres targets 8.5, 8.6, 10.x and 11.x "
                          f"({', '.join(KNOWN_TARGETS)})")
    return Capabilities(
        version=v,
        explicit_batch_flag=v.major < 10,
        weak_typing=v.major < 11,
        implicit_int8=v.major < 11,
        implicit_int8_deprecated=v.at_least(10, 1),
        strongly_typed=v.major >= 10,
        always_strongly_typed=v.major >= 11,
        dla=has_dla(v),
        dla_explicit_quantization=v.at_least(8, 6),
        int8_weight_forms=(FP32_QUANTIZE, INT8_CONSTANTS) if v.major >= 10 else (FP32_QUANTIZE,),
        version_compatible=v.at_least(8, 6),
        hardware_compatibility=v.at_least(8, 6),
        trtexec_explicit_batch=v.major < 10,
        trtexec_skip_inference="--skipInference" if v.at_least(8, 6) else "--buildOnly",
        calib_tag_number=calib_tag_number(v),
    )


def has_dla(version: str | TrtVersion) -> bool:
    """DLA windows (SOURCES["dla"]): 8.5 .. 10.7, then none until 11.4.1 (Jetson AGX Orin, JetPack 7.2.2+).
    engine_build._has_dla is the bundle's standalone copy (a test checks they agree)."""
    v = parse_version(version)
    return (v.major, v.minor) <= (10, 7) or (v.major, v.minor, v.patch) >= (11, 4, 1)


def dla_rule_text() -> str:
    """The DLA window in words (README, CLI help and refusals say the same)."""
    return "DLA needs TensorRT 8.5 to 10.7 (JetPack 5.1 / 6.x) or 11.4.1+ (JetPack 7.2.2+ on AGX Orin)"


def calib_tag_number(version: str | TrtVersion) -> int:
    """TensorRT's NV_TENSORRT_VERSION as written in cache headers: 8.6.1 -> 8601, 10.3.0 -> 100300."""
    v = parse_version(version)
    if v.major >= 10:
        return v.major * 10000 + v.minor * 100 + v.patch
    return v.major * 1000 + v.minor * 100 + v.patch


def calib_version_tag(version: str | TrtVersion, algorithm: str = "EntropyCalibration2") -> str:
    """Header line of a calibration cache for this TensorRT version, e.g. 'TRT-8502-EntropyCalibration2'."""
    return f"TRT-{calib_tag_number(version)}-{algorithm}"
