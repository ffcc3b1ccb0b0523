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
from edgeres.tensorrt.versions import TrtVersion, capabilities, dla_rule_text, parse_version

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
    strongly_typed: bool | None = None         # None: only where TensorRT requires it (11.x)

    def describe(self) -> dict:
        return {"precision": self.precision.value, "dla_core": self.dla_core, "gpu_fallback": self.gpu_fallback,
                "workspace_mb": self.workspace_mb, "batch": list(self.batch) if self.batch else None,
                "timing_cache": str(self.timing_cache) if self.timing_cache else None,
                "version_compatible": self.version_compatible,
                "hardware_compatibility": self.hardware_compatibility, "sparsity": self.sparsity,
                "calib_cache": str(self.calib_cache) if self.calib_cache else None,
                "strongly_typed": self.strongly_typed}


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


def resolved_strongly_typed(opts: CompileOptions, version: str | TrtVersion) -> bool:
    caps = capabilities(version)
    return True if caps.always_strongly_typed else bool(opts.strongly_typed)


def validate_options(opts: CompileOptions, trt_version: str | TrtVersion, *, is_jetson: bool, dla_cores: int,
                     compute_capability: str | None = None, onnx_has_qdq: bool | None = None,
                     onnx_weight_form: str | None = None) -> list[str]:
    """Raise ConfigError for a combination this TensorRT/device cannot build; return warnings.
    `onnx_weight_form`: check.int8_weight_form of the ONNX (None: no quantized weights, or not known)."""
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
    _check_dla(opts, v, caps, is_jetson=is_jetson, dla_cores=dla_cores, onnx_has_qdq=onnx_has_qdq)
    _check_precision(opts, v, caps, onnx_has_qdq=onnx_has_qdq, warnings=warnings)
    _check_portability(opts, v, caps, is_jetson=is_jetson, compute_capability=compute_capability,
                       warnings=warnings)
    return warnings


def _check_dla(opts: CompileOptions, v: TrtVersion, caps, *, is_jetson: bool, dla_cores: int,
               onnx_has_qdq: bool | None) -> None:
    """DLA: a Jetson with DLA cores, a TensorRT that has DLA, FP16/INT8, a fixed batch."""
    p = opts.precision
    if opts.dla_core is not None:
        if not caps.dla:
            raise ConfigError(f"--dla-core: TensorRT {v} has no DLA support; {dla_rule_text()}")
        if not is_jetson or dla_cores < 1:
            raise ConfigError("--dla-core needs a Jetson with DLA cores (Xavier, Orin); this device has none. "
                              "Drop --dla-core to build for the GPU")
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
        if opts.strongly_typed:
            if not caps.strongly_typed:
                raise ConfigError(f"--strongly-typed needs TensorRT 10 or newer; TensorRT {v} is weakly typed")
            if p is not Precision.FP32:
                raise ConfigError("--strongly-typed takes precision from the ONNX (casts, Q/DQ nodes); drop "
                                  "--fp16/--int8, or drop --strongly-typed")
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
