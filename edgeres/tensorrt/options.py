"""Compile options and their validation against a TensorRT version and a device.

`validate_options` refuses impossible combinations with a message that says what to do instead, and
returns the warnings (deprecated but working paths, flags that will have no effect).

Each rule reads a capability row (versions.capabilities; NVIDIA sources in versions.SOURCES). DLA-only rules cite
"Working with DLA" / "DLA Supported Layers and Restrictions" (docs.nvidia.com/deeplearning/tensorrt/latest/
inference-library/dla-layer-restrictions.html): DLA runs FP16 or INT8 ("DLA support is currently limited to networks
running in FP16 or INT8 mode"), no dynamic dimensions ("the profile's min, max, and opt values must be equal"), and
layers it cannot run fall back to the GPU only with GPU fallback (dla.py lists them for a plan).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

from edgeres.errors import ConfigError
from edgeres.tensorrt.versions import JETSON_MODULES, TrtVersion, capabilities, dla_rule_text, parse_version

DEFAULT_BATCH = (1, 8, 32)
DLA_DEFAULT_BATCH = (1, 1, 1)   # DLA runs static shapes only
HARDWARE_LEVELS = ("ampere+",)


class Precision(str, enum.Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"
    BEST = "best"   # INT8 and FP16 kernels both allowed (trtexec --int8 --fp16)

    @property
    def uses_fp16(self) -> bool:
        return self in (Precision.FP16, Precision.BEST)

    @property
    def uses_int8(self) -> bool:
        return self in (Precision.INT8, Precision.BEST)


@dataclass(frozen=True)
class CompileOptions:
    precision: Precision = Precision.FP32
    dla_core: int | None = None
    gpu_fallback: bool = False
    workspace_mb: int | None = None
    batch: tuple[int, int, int] | None = None   # (min, opt, max) of the batch axis; None: DEFAULT_BATCH or static
    timing_cache: Path | None = None
    version_compatible: bool = False
    hardware_compatibility: str | None = None   # "ampere+"
    sparsity: bool = False
    calib_cache: Path | None = None
    strongly_typed: bool | None = None         # None: where TensorRT requires it (11.x) or INT8 comes from Q/DQ (10.x)
    builder_optimization_level: int | None = None   # 0..5 (8.6+); None: TensorRT's default

    def describe(self) -> dict:
        return {"precision": self.precision.value, "dla_core": self.dla_core, "gpu_fallback": self.gpu_fallback,
                "workspace_mb": self.workspace_mb, "batch": list(self.batch) if self.batch else None,
                "timing_cache": str(self.timing_cache) if self.timing_cache else None,
                "version_compatible": self.version_compatible,
                "hardware_compatibility": self.hardware_compatibility, "sparsity": self.sparsity,
                "calib_cache": str(self.calib_cache) if self.calib_cache else None,
                "strongly_typed": self.strongly_typed,
                "builder_optimization_level": self.builder_optimization_level}


def precision_from_flags(*, fp16: bool, int8: bool) -> Precision:
    if fp16 and int8:
        return Precision.BEST
    return Precision.FP16 if fp16 else Precision.INT8 if int8 else Precision.FP32


def parse_batch(text: str) -> tuple[int, int, int]:
    """'1,8,32' -> (1, 8, 32); a single '8' -> (8, 8, 8)."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"--batch expects min,opt,max integers, got {text!r}") from None
    if len(values) == 1:
        values = values * 3
    if len(values) != 3:
        raise ConfigError(f"--batch expects min,opt,max (three integers), got {text!r}")
    check_batch(values)
    return values  # type: ignore[return-value]


def check_batch(batch: tuple[int, ...]) -> None:
    lo, opt, hi = batch
    if not 1 <= lo <= opt <= hi:
        raise ConfigError(f"--batch needs 1 <= min <= opt <= max, got {lo},{opt},{hi}")


def resolved_strongly_typed(opts: CompileOptions, version: str | TrtVersion, *,
                            onnx_has_qdq: bool | None = None) -> bool:
    """Strongly typed: always on 11.x; on 10.x when asked, and for INT8 from a Q/DQ ONNX (NVIDIA's explicit
    quantization: strong typing, no precision flags; versions.SOURCES["strongly_typed_int8"]) unless the calibration
    cache path (implicit INT8, weakly typed) or FP16 is asked for."""
    caps = capabilities(version)
    if caps.always_strongly_typed:
        return True
    if opts.strongly_typed is not None:
        return bool(opts.strongly_typed)
    return bool(caps.strongly_typed and onnx_has_qdq and opts.precision is Precision.INT8 and opts.calib_cache is None)


def resolve(opts: CompileOptions, version: str | TrtVersion, *, onnx_has_qdq: bool | None) -> CompileOptions:
    """The options as built: strongly_typed decided (resolved_strongly_typed), once, for both build paths."""
    import dataclasses

    return dataclasses.replace(opts, strongly_typed=resolved_strongly_typed(opts, version, onnx_has_qdq=onnx_has_qdq))


def validate_options(opts: CompileOptions, trt_version: str | TrtVersion, *, is_jetson: bool, dla_cores: int,
                     compute_capability: str | None = None, onnx_has_qdq: bool | None = None,
                     onnx_weight_form: str | None = None, jetson_module: str | None = None) -> list[str]:
    """Raise ConfigError for a combination this TensorRT/device cannot build; return warnings.
    `onnx_weight_form`: check.int8_weight_form of the ONNX (None: no quantized weights, or not known).
    `jetson_module`: a versions.JETSON_MODULES key (None: not known)."""
    v = parse_version(trt_version)
    caps = capabilities(v)
    warnings: list[str] = []
    if onnx_weight_form is not None and onnx_weight_form not in caps.int8_weight_forms:
        raise ConfigError(f"this Q/DQ ONNX stores its weights as {onnx_weight_form}, which TensorRT {v} does not "
                          f"document (it documents {' / '.join(caps.int8_weight_forms)}); compile the copy with FP32 "
                          "weights behind QuantizeLinear that edgeres writes beside the plan "
                          "(RUN/tensorrt/model_int8.fp32w.onnx)")
    if opts.batch is not None:
        check_batch(opts.batch)
    if opts.workspace_mb is not None and opts.workspace_mb < 1:
        raise ConfigError(f"--workspace must be >= 1 MiB, got {opts.workspace_mb}")
    if opts.builder_optimization_level is not None:
        if not caps.builder_optimization_level:
            raise ConfigError(f"--builder-optimization-level needs TensorRT 8.6 or newer; this is TensorRT {v}")
        if not 0 <= opts.builder_optimization_level <= 5:
            raise ConfigError(f"--builder-optimization-level is 0..5, got {opts.builder_optimization_level}")
    _check_dla(opts, v, caps, is_jetson=is_jetson, dla_cores=dla_cores, onnx_has_qdq=onnx_has_qdq,
               module=jetson_module)
    if is_jetson and not caps.jetson:
        raise ConfigError(f"TensorRT {v} is not for Jetson: NVIDIA ships no JetPack release of it (11.4.1 is the "
                          "last TensorRT for JetPack 7.2.2+; JetPack 5.1/6.x keep their own 8.5/8.6/10.3)")
    _check_precision(opts, v, caps, onnx_has_qdq=onnx_has_qdq, warnings=warnings)
    _check_portability(opts, v, caps, is_jetson=is_jetson, compute_capability=compute_capability,
                       warnings=warnings)
    return warnings


def _check_dla(opts: CompileOptions, v: TrtVersion, caps, *, is_jetson: bool, dla_cores: int,
               onnx_has_qdq: bool | None, module: str | None) -> None:
    """DLA: a Jetson module that has DLA with this TensorRT (versions.DLA_ROWS), FP16/INT8, a fixed batch."""
    p = opts.precision
    if opts.dla_core is not None:
        if not caps.dla:
            raise ConfigError(f"--dla-core: TensorRT {v} has no DLA support; {dla_rule_text()}")
        if not is_jetson or dla_cores < 1:
            raise ConfigError("--dla-core needs a Jetson with DLA cores (Xavier, Orin); this device has none. "
                              "Drop --dla-core to build for the GPU")
        where = " or ".join(f"Jetson {JETSON_MODULES[m]}" for m in caps.dla_modules)
        if module is not None and module not in caps.dla_modules:
            raise ConfigError(f"--dla-core: TensorRT {v} has DLA on {where} only (JetPack {caps.dla_jetpack_min}+), "
                              f"not on Jetson {JETSON_MODULES.get(module, module)}; drop --dla-core to build for "
                              "the GPU")
        if module is None and caps.dla_module_required:
            raise ConfigError(f"--dla-core: TensorRT {v} has DLA on {where} only (JetPack {caps.dla_jetpack_min}+); "
                              f"name the module: --jetson-module {caps.dla_modules[0]}")
        if not 0 <= opts.dla_core < dla_cores:
            raise ConfigError(f"--dla-core {opts.dla_core} does not exist; this Jetson has DLA cores "
                              f"0..{dla_cores - 1}")
        if p is Precision.FP32:
            raise ConfigError("DLA runs FP16 or INT8 only: add --fp16 or --int8 to --dla-core")
        if opts.batch is not None and opts.batch[0] != opts.batch[2]:
            raise ConfigError("DLA needs a fixed batch: use --batch N (min = opt = max); with a dynamic batch every "
                              "layer would fall back to the GPU and the engine would not run on DLA at all")
        if onnx_has_qdq and not caps.dla_explicit_quantization:
            raise ConfigError(f"--dla-core with the Q/DQ INT8 ONNX: TensorRT {v} does not support explicit "
                              "quantization on DLA; compile the FP32 ONNX with --int8 --calib-cache "
                              "calibration/calib.cache")
        if opts.version_compatible:
            raise ConfigError("--version-compatible cannot be combined with --dla-core (not supported on DLA)")
    elif opts.gpu_fallback:
        raise ConfigError("--gpu-fallback only applies with --dla-core (layers DLA cannot run go to the GPU)")


def _check_precision(opts: CompileOptions, v: TrtVersion, caps, *, onnx_has_qdq: bool | None,
                     warnings: list[str]) -> None:
    """Strong vs weak typing, FP16/INT8 flags and implicit-INT8 calibration caches, per TensorRT version."""
    p = opts.precision
    if caps.always_strongly_typed:
        if opts.strongly_typed is False:
            raise ConfigError(f"TensorRT {v} networks are always strongly typed; drop --no-strongly-typed")
        if p.uses_fp16:
            raise ConfigError(
                f"--fp16: TensorRT {v} removed the weak-typing precision flags; precision now comes from the "
                "ONNX itself (strongly typed). Cast the FP32 ONNX to FP16 (e.g. `python -m modelopt.onnx.autocast "
                "--onnx_path model_fp32.onnx`) and compile that without --fp16, or compile the INT8 Q/DQ ONNX")
        if p.uses_int8 and onnx_has_qdq is False:
            raise ConfigError(
                f"--int8 with an FP32 ONNX: TensorRT {v} removed implicit INT8 calibration; compile the Q/DQ "
                "INT8 ONNX (export/model_int8.onnx) instead, whose Q/DQ nodes carry the precision")
        if opts.calib_cache is not None:
            raise ConfigError(f"--calib-cache: TensorRT {v} removed implicit INT8 calibration caches; compile the "
                              "Q/DQ INT8 ONNX (export/model_int8.onnx) instead")
        if p.uses_int8:
            warnings.append(f"TensorRT {v}: INT8 comes from the ONNX's Q/DQ nodes; no precision flag is set")
    else:
        typed = resolved_strongly_typed(opts, v, onnx_has_qdq=onnx_has_qdq)
        if opts.strongly_typed and not caps.strongly_typed:
            raise ConfigError(f"--strongly-typed needs TensorRT 10 or newer; TensorRT {v} is weakly typed")
        if typed and p.uses_fp16:
            raise ConfigError("--strongly-typed takes precision from the ONNX (casts, Q/DQ nodes); drop "
                              "--fp16, or drop --strongly-typed")
        if typed and p.uses_int8 and not onnx_has_qdq:
            raise ConfigError("--strongly-typed takes precision from the ONNX (casts, Q/DQ nodes); drop "
                              "--int8, or compile the Q/DQ INT8 ONNX")
        if typed and p.uses_int8:
            warnings.append(f"TensorRT {v}: strongly typed; INT8 comes from the ONNX's Q/DQ nodes, no precision "
                            "flag is set")
        if opts.strongly_typed is False and p.uses_int8 and onnx_has_qdq and caps.strongly_typed:
            raise ConfigError(f"--no-strongly-typed with the Q/DQ ONNX: TensorRT {v} builds explicit quantization "
                              "strongly typed (the weakly typed INT8 flag is deprecated; NVIDIA: precision flags "
                              "should not be specified); drop --no-strongly-typed")
        if caps.precision_flags_deprecated and not typed and p is not Precision.FP32:
            warnings.append(f"TensorRT {v}: the --fp16/--int8 precision flags are deprecated since 10.12 (weak "
                            "typing); they still work here and are gone in 11")
        if p.uses_int8 and onnx_has_qdq is False and opts.calib_cache is None:
            raise ConfigError(
                "--int8 with an FP32 ONNX needs per-tensor ranges: pass --calib-cache FILE (see `edgeres "
                "calib-cache`) or compile the Q/DQ INT8 ONNX (export/model_int8.onnx)")
    if opts.calib_cache is not None:
        if not p.uses_int8:
            raise ConfigError("--calib-cache only applies to INT8 builds: add --int8")
        if onnx_has_qdq:
            raise ConfigError("--calib-cache with a Q/DQ ONNX: explicit quantization ignores calibration caches; "
                              "use the FP32 ONNX with the cache, or the Q/DQ ONNX alone")
        if not Path(opts.calib_cache).is_file():
            raise ConfigError(f"--calib-cache {opts.calib_cache} does not exist")
        if caps.implicit_int8_deprecated:
            warnings.append(f"TensorRT {v}: implicit INT8 calibration caches are deprecated since 10.1 and "
                            "removed in 11; prefer the Q/DQ INT8 ONNX")


def _check_portability(opts: CompileOptions, v: TrtVersion, caps, *, is_jetson: bool,
                       compute_capability: str | None, warnings: list[str]) -> None:
    """Version/hardware compatibility, sparsity, the timing cache path."""
    cc_major = int(compute_capability.split(".")[0]) if compute_capability else None
    if opts.version_compatible and not caps.version_compatible:
        raise ConfigError(f"--version-compatible needs TensorRT 8.6 or newer; this is TensorRT {v}")
    # hardware compatibility: AMPERE_PLUS engines are built on Ampere-or-newer desktop GPUs (versions.SOURCES)
    if opts.hardware_compatibility is not None:
        if opts.hardware_compatibility not in HARDWARE_LEVELS:
            raise ConfigError(f"--hardware-compatibility {opts.hardware_compatibility!r} is unknown; "
                              f"choose one of {', '.join(HARDWARE_LEVELS)}")
        if not caps.hardware_compatibility:
            raise ConfigError(f"--hardware-compatibility needs TensorRT 8.6 or newer; this is TensorRT {v}")
        if is_jetson or opts.dla_core is not None:
            raise ConfigError("--hardware-compatibility is for desktop Ampere-or-newer GPUs; Jetson and DLA "
                              "engines are built for their own device")
        if cc_major is not None and cc_major < 8:
            raise ConfigError(f"--hardware-compatibility ampere+ needs an Ampere or newer GPU (compute capability "
                              f">= 8.0); this GPU is {compute_capability}")
    if opts.sparsity and cc_major is not None and cc_major < 8:
        warnings.append(f"--sparsity: compute capability {compute_capability} has no sparse tensor cores; "
                        "TensorRT will ignore structured sparsity")
    if opts.timing_cache is not None and Path(opts.timing_cache).is_dir():
        raise ConfigError(f"--timing-cache {opts.timing_cache} is a folder; give a file path")
