"""TensorRT versions and what each supports. Variants are data: one capability row per version, each fact with
the NVIDIA source it comes from (`SOURCES`), and one DLA row per (TensorRT versions, platform, Jetson modules)
(`DLA_ROWS`, each with its own source). The planner (targets.py), `edgeres compile` (options.py), the device runtime
(through the plan), the README's table (`readme_table`, checked by tests/test_tensorrt_plan.py) and the CLI help
read these rows.

Supported targets: 8.5 (JetPack 5.1.x ships 8.5.2), 8.6 (JetPack 6.0 ships 8.6.2), 10.3 (JetPack 6.1/6.2 ship
10.3), 10.x desktops, 11.x desktops and 11.4.1 (the last TensorRT for JetPack: 7.2.2+, DLA on Jetson AGX Orin only).
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
    "dla": "DLA_ROWS (one row per version range, platform and module, each with its own NVIDIA page)",
    "dla_layers": "DLA Supported Layers and Restrictions (https://docs.nvidia.com/deeplearning/tensorrt/latest/"
                  "inference-library/dla-layer-restrictions.html): per-layer precision and key limits, see dla.py",
    "dla_explicit_quantization": "NVIDIA TensorRT 8.5 developer guide, Working with DLA: no explicit "
                                 "quantization; TensorRT 8.6 release notes: Q/DQ (explicit quantization) on DLA",
    "int8_weight_forms": "TensorRT 10.x developer guide, Explicit Quantization > Quantized Weights (https://docs."
                         "nvidia.com/deeplearning/tensorrt/latest/inference-library/quantized-types-explicit-"
                         "quantization.html): weights may be high precision (quantized by the IQuantizeLayer) or "
                         "pre-quantized INT8 through an IDequantizeLayer. TensorRT 8.5/8.6 API (IConstantLayer): "
                         "weights other than kINT32 are real values, so 8.x documents only FP32 weights behind "
                         "QuantizeLinear (the form NVIDIA's pytorch-quantization toolkit exports). ASSUMPTION, not "
                         "confirmed on a device: that 8.5/8.6 REJECT INT8-constant weights (the plan avoids the "
                         "question by shipping the documented form; the emulator applies the same assumption, marked "
                         "there too)",
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
    "explicit_batch_trtexec": "trt-api 8.5.2/8.6 trtexec_options.txt: --explicitBatch 'deprecated undocumented' ("
                              "trtexec "
                              "parses ONNX with explicit batch whatever the flag: it has no effect); absent from 10.x",
    "strongly_typed_int8": "Explicit Quantization (https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-"
                           "library/quantized-types-explicit-quantization.html): a Q/DQ network should be built "
                           "strongly typed and precision flags 'should not be specified'; trt-api 10.3 "
                           "trtexec_options.txt: --stronglyTyped (the first 10.x table here with it); trt-api 10.16 "
                           "python_api.json: BuilderFlag.INT8/FP16 'Deprecated in TensorRT 10.12'",
    "precision_flags_deprecated": "trt-api 10.16 python_api.json: BuilderFlag.FP16/INT8 docstring 'Deprecated in "
                                  "TensorRT 10.12'; trt-api 10.16 trtexec_options.txt: --fp16/--int8 'deprecated'",
    "builder_optimization_level": "trt-api 8.6 python_api.json: IBuilderConfig.builder_optimization_level (absent in "
                                  "8.5.2); trt-api 8.6+ trtexec_options.txt: --builderOptimizationLevel; TensorRT "
                                  "developer guide: the default level is 3",
    "dla_capability_report": "trt-api 10.16/11.0 python_api.json: OnnxParserFlag.REPORT_CAPABILITY_DLA, "
                             "OnnxParser.set_builder_config (absent in 10.3); ONNX Parser Flags for DLA (https://docs."
                             "nvidia.com/deeplearning/tensorrt/11.4.1/inference-library/dla-onnx-parser.html): with "
                             "the flag and a builder config set before parse(), is_subgraph_supported() reports DLA "
                             "capability; IBuilderConfig.can_run_on_DLA(layer) in every version (trt-api)",
}

# Named targets a user can plan for without TensorRT installed (`edgeres compile --trt-version`).
KNOWN_TARGETS = {
    "8.5": "8.5.2 (JetPack 5.1.x, Jetson Xavier/Orin; DLA)",
    "8.6": "8.6.2 (JetPack 6.0, Jetson Orin; DLA)",
    "10.3": "10.3.0 (JetPack 6.1/6.2, Jetson Orin; DLA)",
    "10": "10.x (desktop GPUs; DLA only up to 10.7)",
    "11": "11.x (desktop GPUs; strongly typed only; no DLA)",
    "11.4.1": "11.4.1 (JetPack 7.2.2+; strongly typed; DLA on Jetson AGX Orin only)",
}
INT8_CONSTANTS, FP32_QUANTIZE = "int8_constants", "fp32_quantize"   # the two INT8 weight forms of a Q/DQ ONNX

# Jetson modules by the name /proc/device-tree/model carries ("NVIDIA Jetson AGX Orin Developer Kit"); matched as a
# substring, case-insensitively. Orin Nano has no DLA; Thor has none (NVIDIA, Working with DLA 11.4.1).
JETSON_MODULES = {"agx-xavier": "AGX Xavier", "xavier-nx": "Xavier NX", "agx-orin": "AGX Orin", "orin-nx": "Orin NX",
                  "orin-nano": "Orin Nano", "agx-thor": "AGX Thor"}
_DLA_PAGE = "https://docs.nvidia.com/deeplearning/tensorrt/{v}/inference-library/work-with-dla.html"


@dataclass(frozen=True)
class DlaRow:
    """Where NVIDIA ships DLA: TensorRT first..last (inclusive, (major, minor, patch)), on which platform, which
    Jetson modules (JETSON_MODULES keys; empty: none), from which JetPack, and the NVIDIA page that says so."""

    label: str                    # the versions as people say them ("10.0 to 10.7")
    first: tuple[int, int, int]
    last: tuple[int, int, int]
    platform: str                 # "jetson" (JetPack) | "windows-arm" (not an edgeres target) | "none"
    modules: tuple[str, ...]
    jetpack: str | None           # the JetPack release(s), as NVIDIA names them
    jetpack_min: str | None       # the lowest JetPack the row allows (the device refuses a lower one it can read)
    source: str
    module_required: bool = False  # DLA for some of the Jetsons that run this TensorRT only: plan only for a named one

    def covers(self, v: tuple[int, int, int]) -> bool:
        return self.first <= v <= self.last


_END = 99
DLA_ROWS: tuple[DlaRow, ...] = (
    DlaRow("8.5.x", (8, 5, 0), (8, 5, _END), "jetson", ("agx-xavier", "xavier-nx", "agx-orin", "orin-nx"), "5.1.x",
           "5.1",
           "JetPack 5.1 release notes (TensorRT 8.5.2, Jetson Xavier and Orin); NVIDIA TensorRT 8.5 developer guide, "
           "Working with DLA"),
    DlaRow("8.6.x", (8, 6, 0), (8, 6, _END), "jetson", ("agx-orin", "orin-nx"), "6.0", "6.0",
           "JetPack 6.0 release notes (TensorRT 8.6.2, Jetson Orin only); Working with DLA (8.6 developer guide)"),
    DlaRow("10.0 to 10.7", (10, 0, 0), (10, 7, _END), "jetson", ("agx-orin", "orin-nx"), "6.1/6.2", "6.1",
           "JetPack 6.1/6.2 release notes (TensorRT 10.3); " + _DLA_PAGE.format(v="11.4.1") +
           ": 'TensorRT 10.7 was the last 10.x release that supported DLA'"),
    DlaRow("10.8 to 11.3", (10, 8, 0), (11, 3, _END), "none", (), None, None,
           _DLA_PAGE.format(v="11.4.1") + ": 10.7 the last 10.x with DLA; 'DLA was unavailable in TensorRT 11.0 "
           "through 11.3'"),
    DlaRow("11.4.0", (11, 4, 0), (11, 4, 0), "windows-arm", (), None, None,
           _DLA_PAGE.format(v="11.4.0") + ": DLA only on Windows on ARM (beta), not on JetPack or Linux SBSA"),
    DlaRow("11.4.1", (11, 4, 1), (11, 4, 1), "jetson", ("agx-orin",), "7.2.2+", "7.2.2",
           _DLA_PAGE.format(v="11.4.1") + " and TensorRT 11.4.1 release notes: DLA on Jetson AGX Orin with JetPack "
           "7.2.2 or later only (not Orin on JetPack 6.x, not Thor), strongly typed, GPU fallback as in 10.x", True),
    DlaRow("11.5 and later", (11, 5, 0), (_END, _END, _END), "none", (), None, None,
           _DLA_PAGE.format(v="11.5.0") + " and the 11.5.0 Jetson migration page: JetPack is not supported from "
           "11.5.0 ('Do not install the TensorRT 11.5.0 packages on a Jetson board'); 11.4.1 is the last for JetPack"),
)
# TensorRT versions NVIDIA ships for JetPack at all (Jetson); later 11.x are for desktops and servers only
JETPACK_LAST = (11, 4, 1)
JETPACK_SOURCE = ("Migrating TensorRT from 10.x to 11.x on Jetson/JetPack, 11.5.0 (https://docs.nvidia.com/"
                  "deeplearning/tensorrt/11.5.0/api/migration/tensorrt-10x-to-11x-jetson.html): 'NVIDIA JetPack is not "
                  "supported in TensorRT 11.5.0 ... Do not install the TensorRT 11.5.0 packages on a Jetson board'; "
                  "11.0 to 11.4.0 have no JetPack release either (11.3.0 and 11.4.1 migration pages)")


def dla_row(version: str | TrtVersion) -> DlaRow | None:
    """The DLA row covering this TensorRT version (None: older than any row)."""
    v = parse_version(version)
    key = (v.major, v.minor, v.patch)
    return next((r for r in DLA_ROWS if r.covers(key)), None)


def jetson_supported(version: str | TrtVersion) -> bool:
    """May this TensorRT run on a Jetson? 8.x and 10.x (JetPack 5.1 / 6.x), and of 11.x only 11.4.1 (JETPACK_SOURCE:
    no JetPack release for 11.0 to 11.4.0, none from 11.5)."""
    v = parse_version(version)
    return v.major < 11 or (v.major, v.minor, v.patch) == JETPACK_LAST


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
    dla: bool                      # DLA on some Jetson module: 8.5 .. 10.7 and 11.4.1 (DLA_ROWS)
    dla_modules: tuple[str, ...]   # the Jetson modules (JETSON_MODULES keys) that have DLA with this version
    dla_jetpack_min: str | None    # the lowest JetPack with DLA for this version
    dla_module_required: bool      # DLA planned only for a named Jetson module (11.4.1: AGX Orin only)
    jetson: bool                   # NVIDIA ships this TensorRT for JetPack (JETPACK_SOURCE)
    precision_flags_deprecated: bool  # BuilderFlag.FP16/INT8, trtexec --fp16/--int8 deprecated (10.12+)
    builder_optimization_level: bool  # IBuilderConfig.builder_optimization_level / --builderOptimizationLevel (8.6+)
    dla_capability_report: bool    # OnnxParserFlag.REPORT_CAPABILITY_DLA + OnnxParser.set_builder_config (10.16+)
    dla_explicit_quantization: bool  # Q/DQ networks on DLA (8.6+)
    int8_weight_forms: tuple[str, ...]  # INT8 weight forms of a Q/DQ ONNX this builder documents
    version_compatible: bool       # BuilderFlag.VERSION_COMPATIBLE (8.6+)
    hardware_compatibility: bool   # HardwareCompatibilityLevel.AMPERE_PLUS (8.6+; desktop Ampere+ only)
    trtexec_explicit_batch: bool   # --explicitBatch accepted (8.x) but deprecated with no effect: never written
    trtexec_skip_inference: str    # build-only flag: --buildOnly (8.5) / --skipInference (8.6+)
    calib_tag_number: int          # number inside the calibration cache header "TRT-<n>-EntropyCalibration2"


def capabilities(version: str | TrtVersion) -> Capabilities:
    """The capability row for a TensorRT version; ConfigError for versions edgeres does not target."""
    v = parse_version(version)
    if (v.major, v.minor) < MIN_SUPPORTED or v.major > MAX_MAJOR or v.major == 9:
        raise ConfigError(f"TensorRT {v} is not supported; edgeres targets 8.5, 8.6, 10.x and 11.x "
                          f"({', '.join(KNOWN_TARGETS)})")
    row = dla_row(v)
    return Capabilities(
        version=v,
        explicit_batch_flag=v.major < 10,
        weak_typing=v.major < 11,
        implicit_int8=v.major < 11,
        implicit_int8_deprecated=v.at_least(10, 1),
        strongly_typed=v.major >= 10,
        always_strongly_typed=v.major >= 11,
        dla=has_dla(v),
        dla_modules=row.modules if row is not None and row.platform == "jetson" else (),
        dla_jetpack_min=row.jetpack_min if row is not None and row.platform == "jetson" else None,
        dla_module_required=bool(row is not None and row.module_required),
        jetson=jetson_supported(v),
        precision_flags_deprecated=v.at_least(10, 12),
        builder_optimization_level=v.at_least(8, 6),
        dla_capability_report=v.at_least(10, 16),
        dla_explicit_quantization=v.at_least(8, 6),
        int8_weight_forms=(FP32_QUANTIZE, INT8_CONSTANTS) if v.major >= 10 else (FP32_QUANTIZE,),
        version_compatible=v.at_least(8, 6),
        hardware_compatibility=v.at_least(8, 6),
        trtexec_explicit_batch=v.major < 10,
        trtexec_skip_inference="--skipInference" if v.at_least(8, 6) else "--buildOnly",
        calib_tag_number=calib_tag_number(v),
    )


def has_dla(version: str | TrtVersion, module: str | None = None) -> bool:
    """DLA with this TensorRT (on `module`, a JETSON_MODULES key, when given): a DLA_ROWS row for a Jetson that
    names modules. engine_build._has_dla is the bundle's standalone copy of the version window (a test checks)."""
    row = dla_row(version)
    if row is None or row.platform != "jetson" or not row.modules:
        return False
    return module is None or module in row.modules


def dla_rule_text() -> str:
    """The DLA rule in words (README, CLI help and refusals say the same), from DLA_ROWS."""
    parts = [f"{r.label} (JetPack {r.jetpack}: {', '.join(JETSON_MODULES[m] for m in r.modules)})"
             for r in DLA_ROWS if r.platform == "jetson" and r.modules]
    return "DLA needs TensorRT " + "; ".join(parts) + "; none on 10.8 to 11.4.0 or from 11.5 on a Jetson"


def module_key(model: str | None) -> str | None:
    """A JETSON_MODULES key from a device-tree model string ('NVIDIA Jetson AGX Orin Developer Kit' -> 'agx-orin')."""
    text = (model or "").lower()
    return next((k for k, name in JETSON_MODULES.items() if name.lower() in text), None)


def readme_table() -> str:
    """The README's TensorRT table: one line per DLA_ROWS row (and where NVIDIA ships TensorRT for Jetson), generated
    here so the README cannot drift from the rows (tests/test_tensorrt_plan.py compares them)."""
    lines = ["| TensorRT | Jetson (JetPack) | DLA | DLA modules | strongly typed INT8 (Q/DQ ONNX) | source |",
             "|---|---|---|---|---|---|"]
    for r in DLA_ROWS:
        v = TrtVersion(*r.first)
        jetson = f"JetPack {r.jetpack}" if r.jetpack else "no"
        dla = {"jetson": "yes", "windows-arm": "Windows on ARM only (beta; not an edgeres target)",
               "none": "no"}[r.platform]
        modules = ", ".join(f"Jetson {JETSON_MODULES[m]}" for m in r.modules) or "-"
        typed = ("yes, always" if v.major >= 11 else "yes (--stronglyTyped)" if v.major >= 10 else
                 "no (--int8, weakly typed)")
        lines.append(f"| {r.label} | {jetson} | {dla} | {modules} | {typed} | {r.source} |")
    return "\n".join(lines) + "\n"


def calib_tag_number(version: str | TrtVersion) -> int:
    """TensorRT's NV_TENSORRT_VERSION as written in cache headers: 8.6.1 -> 8601, 10.3.0 -> 100300."""
    v = parse_version(version)
    if v.major >= 10:
        return v.major * 10000 + v.minor * 100 + v.patch
    return v.major * 1000 + v.minor * 100 + v.patch


def calib_version_tag(version: str | TrtVersion, algorithm: str = "EntropyCalibration2") -> str:
    """Header line of a calibration cache for this TensorRT version, e.g. 'TRT-8502-EntropyCalibration2'."""
    return f"TRT-{calib_tag_number(version)}-{algorithm}"
