"""TensorRT versions and what each supports. Variants are data: one capability row per version.

Supported targets: 8.5 (JetPack 5.1.x ships 8.5.2), 8.6 (JetPack 6.0 ships 8.6.2), 10.x (JetPack 6.1/6.2
ship 10.3; desktops) and 11.x (desktops only: no JetPack, no DLA). Facts encoded here, by version:
- 8.x needs NetworkDefinitionCreationFlag.EXPLICIT_BATCH for ONNX; 10.0 made explicit batch the only mode.
- 8.6 added BuilderFlag.VERSION_COMPATIBLE and HardwareCompatibilityLevel.AMPERE_PLUS.
- 10.0 added NetworkDefinitionCreationFlag.STRONGLY_TYPED (trtexec --stronglyTyped).
- 10.1 deprecated the implicit INT8 calibrators; 11.0 removed them and every weak-typing precision flag
  (BuilderFlag.FP16/INT8, trtexec --fp16/--int8/--best/--calib): 11.x networks are always strongly typed.
- DLA is gone in 11.0-11.4.0 and back in 11.4.1 (AGX Orin, strongly typed networks only).
- trtexec --workspace was replaced by --memPoolSize=workspace:<MiB> (8.4+), removed in 10.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from edgeres.errors import ConfigError

MIN_SUPPORTED = (8, 5)
MAX_MAJOR = 11

# Named targets a user can plan for without TensorRT installed (`edgeres compile --trt-version`).
KNOWN_TARGETS = {
    "8.5": "8.5.2 (JetPack 5.1.x, Jetson Xavier/Orin)",
    "8.6": "8.6.2 (JetPack 6.0, Jetson Orin)",
    "10.3": "10.3.0 (JetPack 6.1/6.2, Jetson Orin)",
    "10": "10.x (desktop GPUs)",
    "11": "11.x (desktop GPUs; strongly typed only; DLA from 11.4.1)",
}


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
    dla: bool                      # DLA supported by this TensorRT (< 11, and 11.4.1+)
    version_compatible: bool       # BuilderFlag.VERSION_COMPATIBLE (8.6+)
    hardware_compatibility: bool   # HardwareCompatibilityLevel.AMPERE_PLUS (8.6+)
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
        dla=v.major < 11 or v >= TrtVersion(11, 4, 1),
        version_compatible=v.at_least(8, 6),
        hardware_compatibility=v.at_least(8, 6),
        trtexec_explicit_batch=v.major < 10,
        trtexec_skip_inference="--skipInference" if v.at_least(8, 6) else "--buildOnly",
        calib_tag_number=calib_tag_number(v),
    )


def calib_tag_number(version: str | TrtVersion) -> int:
    """TensorRT's NV_TENSORRT_VERSION as written in cache headers: 8.6.1 -> 8601, 10.3.0 -> 100300."""
    v = parse_version(version)
    if v.major >= 10:
        return v.major * 10000 + v.minor * 100 + v.patch
    return v.major * 1000 + v.minor * 100 + v.patch


def calib_version_tag(version: str | TrtVersion, algorithm: str = "EntropyCalibration2") -> str:
    """Header line of a calibration cache for this TensorRT version, e.g. 'TRT-8502-EntropyCalibration2'."""
    return f"TRT-{calib_tag_number(version)}-{algorithm}"
