"""Build a TensorRT engine from an ONNX file, for TensorRT 8.5, 8.6, 10.x and 11.x.

SELF-CONTAINED on purpose: this file imports only the standard library and (inside functions) tensorrt,
so the Jetson bundle can copy it onto a device where edgeres is not installed and call
`build_engine(...)`, `trt_version()`, `runtime_info()` and `sidecar_mismatch(...)`.

API used per version (checked against NVIDIA's documentation; not all run on real TensorRT, see README):
- network: create_network(1 << EXPLICIT_BATCH) on 8.x; create_network(0) on 10.x (STRONGLY_TYPED bit when
  asked) and on 11.x (always strongly typed).
- config.set_memory_pool_limit(MemoryPoolType.WORKSPACE, bytes); BuilderFlag.FP16/INT8 only <= 10.x;
  implicit INT8 through an IInt8EntropyCalibrator2 whose read_calibration_cache returns our cache.
- DLA: config.default_device_type = DeviceType.DLA, config.DLA_core, BuilderFlag.GPU_FALLBACK; before building,
  each layer's DLA capability: the parser's report where it has one (10.16+: OnnxParserFlag.REPORT_CAPABILITY_DLA,
  OnnxParser.set_builder_config, supports_model_v2 / num_subgraphs / is_subgraph_supported / get_subgraph_nodes),
  else config.can_run_on_DLA(layer) (every version); layers outside the plan's fallback list are refused.
- strongly typed INT8 (10.x: the STRONGLY_TYPED bit, no INT8 flag; 11.x: always): precision from the Q/DQ nodes.
- config.builder_optimization_level (8.6+); a timing cache from another TensorRT or GPU is not used (set_timing_cache
  with ignore_mismatch False refuses it): the build starts from an empty one and the sidecar says so.
- BuilderFlag.VERSION_COMPATIBLE, config.hardware_compatibility_level = AMPERE_PLUS (8.6+),
  BuilderFlag.SPARSE_WEIGHTS, config.create_timing_cache / set_timing_cache / get_timing_cache().serialize().
- builder.build_serialized_network(network, config).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import platform
import re
import tempfile
import time
from pathlib import Path
from typing import Any

SIDECAR_FORMAT = 1


class BuildError(RuntimeError):
    """TensorRT could not parse or build; the message says why."""


# ---------------------------------------------------------------- versions and device

def _import_trt():
    import tensorrt  # noqa: PLC0415  (lazy: optional, heavy)

    return tensorrt


def _version_tuple(text: str) -> tuple[int, ...]:
    m = re.match(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?(?:\.(\d+))?", str(text).strip())
    if not m:
        raise ValueError(f"not a TensorRT version: {text!r}")
    return tuple(int(g) if g else 0 for g in m.groups())


def trt_version(trt: Any = None) -> str:
    """The installed TensorRT version string, e.g. '10.3.0.30'."""
    trt = trt or _import_trt()
    return str(trt.__version__)


def _has_dla(version: str) -> bool:
    """DLA windows (NVIDIA, Working with DLA 11.4.1 / 11.5.0): 8.5 .. 10.7, none in 10.8 .. 11.4.0, 11.4.1 (AGX Orin,
    JetPack 7.2.2+), none from 11.5 (no JetPack). Equal to versions.has_dla (a test checks)."""
    v = (_version_tuple(version) + (0, 0, 0))[:3]
    return v[:2] <= (10, 7) or v == (11, 4, 1)


def platform_info() -> dict[str, Any]:
    """The platform an engine is tied to ('Serialized engines are not portable across platforms', NVIDIA Support
    Matrix): CPU architecture, OS, whether this is a Jetson (JetPack) or a desktop/server GPU, and the Jetson's
    device-tree model (which module: DLA differs between them)."""
    model = None
    if is_jetson():
        try:
            model = Path("/proc/device-tree/model").read_text(errors="replace").replace("\x00", "").strip() or None
        except OSError:
            model = None
    return {"machine": platform.machine(), "system": platform.system(), "is_jetson": is_jetson(), "model": model}


def is_jetson() -> bool:
    if Path("/etc/nv_tegra_release").exists():
        return True
    try:
        return b"nvidia,tegra" in Path("/proc/device-tree/compatible").read_bytes()
    except OSError:
        return False


# Where the CUDA runtime is looked for: the unversioned name needs the CUDA dev package; runtime-only installs
# (JetPack, the nvidia-cuda-runtime wheels, containers) have only the versioned one: CUDA 13 (TensorRT 10.16 /
# 11 default), 12 (TensorRT 10.x, JetPack 6) and 11 (JetPack 5). The device runtime keeps an equal copy.
CUDART_NAMES = ("libcudart.so", "libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0",
                "/usr/local/cuda/lib64/libcudart.so", "/usr/local/cuda/lib64/libcudart.so.13",
                "/usr/local/cuda/lib64/libcudart.so.12", "/usr/local/cuda/lib64/libcudart.so.11.0")


def _cudart():
    for name in (ctypes.util.find_library("cudart"), *CUDART_NAMES):
        if not name:
            continue
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise BuildError("the CUDA runtime (libcudart) was not found; install CUDA or JetPack")


def cuda_device(index: int = 0) -> dict[str, str]:
    """Name and compute capability of a CUDA device through libcudart (no pycuda, no torch)."""
    lib = _cudart()
    count = ctypes.c_int(0)
    status = lib.cudaGetDeviceCount(ctypes.byref(count))
    if status != 0 or count.value < 1:
        raise BuildError(f"no CUDA GPU visible (cudaGetDeviceCount returned error {status}, "
                         f"{count.value} devices)")
    major, minor = ctypes.c_int(0), ctypes.c_int(0)
    lib.cudaDeviceGetAttribute(ctypes.byref(major), 75, index)   # cudaDevAttrComputeCapabilityMajor
    lib.cudaDeviceGetAttribute(ctypes.byref(minor), 76, index)   # cudaDevAttrComputeCapabilityMinor
    props = ctypes.create_string_buffer(8192)  # cudaDeviceProp starts with char name[256]
    name = "unknown CUDA device"
    if lib.cudaGetDeviceProperties(props, index) == 0:
        name = props.raw[:256].split(b"\0", 1)[0].decode(errors="replace") or name
    return {"device": name, "compute_capability": f"{major.value}.{minor.value}"}


def runtime_info(trt: Any = None) -> dict[str, Any]:
    """What an engine must match here: TensorRT version, GPU, compute capability, Jetson, DLA cores."""
    trt = trt or _import_trt()
    info: dict[str, Any] = {"trt_version": trt_version(trt), **platform_info()}
    info.update(cuda_device())
    dla = 0
    try:
        builder = trt.Builder(trt.Logger(trt.Logger.ERROR))
        dla = int(getattr(builder, "num_DLA_cores", 0) or 0)
    except Exception:  # noqa: BLE001 - DLA count is informational; a failing builder shows up at build time
        dla = 0
    info["dla_cores"] = dla
    return info


# ---------------------------------------------------------------- sidecar check (standalone)

def _compatible_version(built: str, runtime: str, version_compatible: bool) -> bool:
    """Compared on the parts both name: '8.6.1.6' (tensorrt.__version__) and '8.6.1' (trtexec's banner) are one
    release."""
    b, r = _version_tuple(built), _version_tuple(runtime)
    n = max(3, min(len(str(built).split(".")), len(str(runtime).split("."))))
    b, r = b[:n], r[:n]
    if not version_compatible:
        return b == r
    if r < b:
        return False
    # version-compatible plans run on later releases of the same major, and 8->10, 10->11
    return r[0] == b[0] or (b[0], r[0]) in ((8, 10), (10, 11))


def sidecar_mismatch(sidecar: dict, runtime: dict) -> str | None:
    """A plain explanation of why this engine cannot run here, or None when it can.

    `sidecar` is the engine's JSON sidecar; `runtime` is runtime_info() of this machine (missing keys skip
    their check).
    """
    engine = sidecar.get("engine", "the engine")
    fix = "Rebuild it on this machine with `edgeres compile` (or run the saved .trtexec.sh here)."
    problem = _platform_mismatch(sidecar, runtime)
    if problem:
        return f"{engine} {problem}; serialized engines are not portable across platforms. {fix}"
    built_v, here_v = sidecar.get("trt_version"), runtime.get("trt_version")
    if built_v and here_v and not _compatible_version(built_v, here_v, bool(sidecar.get("version_compatible"))):
        why = ("a version-compatible engine runs only on the same or a later TensorRT of the same major "
               "(or 8 -> 10, 10 -> 11)" if sidecar.get("version_compatible")
               else "a TensorRT engine loads only on the exact TensorRT version that built it")
        return (f"{engine} was built with TensorRT {built_v} but this machine has TensorRT {here_v}; {why}. {fix}")
    built_cc, here_cc = sidecar.get("compute_capability"), runtime.get("compute_capability")
    if built_cc and here_cc:
        level = sidecar.get("hardware_compatibility")
        if level == "ampere+" and runtime.get("is_jetson"):
            return (f"{engine} was built hardware-compatible (ampere+), which is for desktop/server GPUs; this is a "
                    f"Jetson ({runtime.get('device', '?')}). {fix}")
        if level == "ampere+":
            if _version_tuple(here_cc)[0] < 8:
                return (f"{engine} was built hardware-compatible for Ampere and newer GPUs, but this GPU "
                        f"({runtime.get('device', '?')}) has compute capability {here_cc}. {fix}")
        elif built_cc != here_cc:
            return (f"{engine} was built for {sidecar.get('device', '?')} (compute capability {built_cc}) but this "
                    f"GPU is {runtime.get('device', '?')} (compute capability {here_cc}); engines are specific to "
                    f"the GPU architecture they were built on. {fix}")
    dla_core = sidecar.get("dla_core")
    if dla_core is not None and "dla_cores" in runtime and int(dla_core) >= int(runtime["dla_cores"]):
        return (f"{engine} runs on DLA core {dla_core} but this device has {runtime['dla_cores']} DLA cores. {fix}")
    return None


def _platform_mismatch(sidecar: dict, runtime: dict) -> str | None:
    """CPU architecture, OS, Jetson or not: compared where both sides name them (older sidecars lack them)."""
    def where(d: dict) -> str:
        kind = "Jetson" if d.get("is_jetson") else "desktop/server GPU"
        return " ".join(str(d[k]) for k in ("system", "machine") if d.get(k)) + f" ({kind})"

    for key in ("machine", "system", "is_jetson"):
        if key in sidecar and key in runtime and sidecar[key] is not None and runtime[key] is not None \
                and sidecar[key] != runtime[key]:
            return f"was built on {where(sidecar)} but this machine is {where(runtime)}"
    return None


# ---------------------------------------------------------------- build

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _cache_calibrator(trt: Any, cache: bytes):
    """An IInt8EntropyCalibrator2 that never calibrates: it hands TensorRT our precomputed cache."""

    class CacheCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            trt.IInt8EntropyCalibrator2.__init__(self)

        def get_batch_size(self):
            return 1

        def get_batch(self, names):
            return None

        def read_calibration_cache(self):
            return cache

        def write_calibration_cache(self, data):
            return None

    return CacheCalibrator()


def _parse_onnx(trt: Any, network: Any, logger: Any, onnx_path: Path) -> None:
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BuildError(f"TensorRT could not parse {onnx_path}: " + "; ".join(errors or ["unknown error"]))


def _has_qdq(trt: Any, network: Any) -> bool:
    kinds = {trt.LayerType.QUANTIZE, trt.LayerType.DEQUANTIZE}
    return any(network.get_layer(i).type in kinds for i in range(network.num_layers))


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, *, precision: str = "fp32",
                 dla_core: int | None = None, gpu_fallback: bool = False, workspace_mb: int | None = None,
                 batch: tuple[int, int, int] | None = None, timing_cache: str | os.PathLike | None = None,
                 calib_cache: str | os.PathLike | None = None, version_compatible: bool = False,
                 hardware_compatibility: str | None = None, sparsity: bool = False,
                 strongly_typed: bool | None = None, builder_optimization_level: int | None = None,
                 dla_gpu_layers: list[dict] | None = None, log_level: str = "warning", trt: Any = None,
                 device: dict | None = None) -> dict[str, Any]:
    """Parse the ONNX, build, write the engine atomically; return the engine info (the sidecar's content).

    precision: fp32 | fp16 | int8 | best (int8+fp16); with strongly_typed, int8 means "from the Q/DQ nodes" (no
    flag). `batch` is (min, opt, max) for a dynamic batch axis. `dla_gpu_layers`: the ONNX nodes ({"node", "index"})
    the plan lets fall back to the GPU (a DLA build with another layer DLA cannot run is refused before building).
    `trt` and `device` exist so tests can pass a test double; leave them None on a real device.
    """
    trt = trt or _import_trt()
    version = trt_version(trt)
    major = _version_tuple(version)[0]
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    precision = precision.lower()
    typed = True if major >= 11 else bool(strongly_typed)
    use_fp16, use_int8 = _check_request(version, precision, typed, dla_core, calib_cache, onnx_path)

    severity = {"error": trt.Logger.ERROR, "warning": trt.Logger.WARNING, "info": trt.Logger.INFO,
                "verbose": trt.Logger.VERBOSE}[log_level]
    logger = trt.Logger(severity)
    builder = trt.Builder(logger)
    flags = 0
    if major < 10:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    elif major == 10 and typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    _parse_onnx(trt, network, logger, onnx_path)
    has_qdq = _has_qdq(trt, network)
    if calib_cache is not None and has_qdq:
        raise BuildError("a calibration cache cannot be used with a Q/DQ ONNX (explicit quantization)")
    if use_int8 and not has_qdq and calib_cache is None and major < 11:
        raise BuildError("INT8 with an FP32 ONNX needs a calibration cache (or use the Q/DQ ONNX)")
    if typed and use_int8 and not has_qdq:
        raise BuildError(f"TensorRT {version}: strongly typed INT8 needs the Q/DQ ONNX")

    config = builder.create_builder_config()
    builder_flags: list[str] = []

    def set_flag(name: str) -> None:
        config.set_flag(getattr(trt.BuilderFlag, name))
        builder_flags.append(name)

    if workspace_mb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    if major < 11 and not typed:
        if use_fp16:
            set_flag("FP16")
        if use_int8:
            set_flag("INT8")

    profile, profile_info, dynamic = _batch_profile(builder, config, network.get_input(0), batch)
    cache_sha, header_text = None, None
    if calib_cache is not None:
        cache_sha, header_text = _attach_calib_cache(trt, config, profile, Path(calib_cache), version)

    if builder_optimization_level is not None:
        config.builder_optimization_level = int(builder_optimization_level)
    dla_report = None
    if dla_core is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = int(dla_core)
        if gpu_fallback:
            set_flag("GPU_FALLBACK")
        planned = list(dla_gpu_layers or [])
        dla_report = _dla_capability(trt, network, config, logger, onnx_path, planned)
        allowed = {g["node"] for g in planned}
        if dla_gpu_layers is not None:
            extra = [n for n in dla_report["gpu_layers"] if not _planned(n, allowed)]
            if extra:
                raise BuildError(f"TensorRT {version} reports that DLA cannot run {', '.join(extra[:5])} "
                                 f"({dla_report['method']}), which the plan does not let fall back to the GPU "
                                 f"(planned: {', '.join(sorted(allowed)) or 'none'}); "
                                 + ("INT8 layers DLA cannot run stay in FP32 there" if use_int8 or typed else
                                    "rebuild the plan on the host"))
    if version_compatible:
        set_flag("VERSION_COMPATIBLE")
    if hardware_compatibility == "ampere+":
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    elif hardware_compatibility is not None:
        raise BuildError(f"unknown hardware compatibility level {hardware_compatibility!r}; use ampere+")
    if sparsity:
        set_flag("SPARSE_WEIGHTS")

    timing, timing_state = None, None
    if timing_cache is not None:
        tpath = Path(timing_cache)
        timing_state = "loaded" if tpath.is_file() and tpath.stat().st_size else "new"
        timing = config.create_timing_cache(tpath.read_bytes() if timing_state == "loaded" else b"")
        if timing is None or not config.set_timing_cache(timing, False):
            # another TensorRT's or GPU's cache: TensorRT refuses it (ignore_mismatch False); start from an empty one
            timing_state = "replaced: the file was from another TensorRT version or device"
            timing = config.create_timing_cache(b"")
            config.set_timing_cache(timing, False)

    dev = device or cuda_device()
    start = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if plan is None:
        raise BuildError(f"TensorRT {version} failed to build {onnx_path} (see the TensorRT log above)")
    data = bytes(memoryview(plan))
    _atomic_write(engine_path, data)
    if timing_cache is not None:
        _atomic_write(Path(timing_cache), bytes(memoryview(config.get_timing_cache().serialize())))

    return {
        "format": SIDECAR_FORMAT,
        "engine": engine_path.name,
        "engine_sha256": hashlib.sha256(data).hexdigest(),
        "engine_bytes": len(data),
        "onnx": str(onnx_path),
        "onnx_sha256": _sha256(onnx_path),
        "trt_version": version,
        "device": dev.get("device"),
        "compute_capability": dev.get("compute_capability"),
        **platform_info(),
        "precision": precision,
        "builder_flags": builder_flags,
        "strongly_typed": typed,
        "onnx_has_qdq": has_qdq,
        "profile": profile_info,
        "dynamic_batch": dynamic,
        "dla_core": dla_core,
        "gpu_fallback": bool(gpu_fallback),
        "workspace_mb": workspace_mb,
        "version_compatible": bool(version_compatible),
        "hardware_compatibility": hardware_compatibility,
        "sparsity": bool(sparsity),
        "calib_cache_sha256": cache_sha,
        "calib_cache_header": header_text if calib_cache is not None else None,
        "timing_cache": str(timing_cache) if timing_cache is not None else None,
        "timing_cache_state": timing_state,
        "builder_optimization_level": builder_optimization_level,
        "dla_capability": dla_report,
        "build_seconds": round(seconds, 3),
    }


def _check_request(version: str, precision: str, typed: bool, dla_core, calib_cache, onnx_path: Path):
    """What this TensorRT refuses before anything is parsed. -> (use_fp16, use_int8)"""
    major = _version_tuple(version)[0]
    if precision not in ("fp32", "fp16", "int8", "best"):
        raise BuildError(f"unknown precision {precision!r}; choose fp32, fp16, int8 or best")
    use_fp16, use_int8 = precision in ("fp16", "best"), precision in ("int8", "best")
    if major >= 11 and use_fp16:
        raise BuildError(f"TensorRT {version} has no FP16 builder flag; cast the ONNX to FP16 instead")
    if typed and major < 11 and use_fp16:
        raise BuildError("a strongly typed network takes precision from the ONNX (no FP16 flag); use precision "
                         "fp32, or int8 with the Q/DQ ONNX")
    if dla_core is not None and not _has_dla(version):
        raise BuildError(f"TensorRT {version} has no DLA support (DLA: 8.5 to 10.7, and 11.4.1+ on AGX Orin)")
    if calib_cache is not None and major >= 11:
        raise BuildError(f"TensorRT {version} removed implicit INT8 calibration caches")
    if not onnx_path.is_file():
        raise BuildError(f"ONNX file {onnx_path} does not exist")
    return use_fp16, use_int8


def _planned(layer: str, planned: set[str]) -> bool:
    """Is this TensorRT layer one of the ONNX nodes the plan lets fall back? TensorRT names a layer after its node
    (suffixed when one node makes several layers); an unnamed node i of op X is planned as "X_i"."""
    m = re.fullmatch(r"\(Unnamed Layer\* (\d+)\) \[(.+)\]", layer)
    if m:
        layer = f"{m.group(2)}_{m.group(1)}"
    return layer in planned or any(layer.startswith(p + s) for p in planned for s in ("/", "_", " ", ":"))


def _dla_capability(trt: Any, network: Any, config: Any, logger: Any, onnx_path: Path,
                    planned: list[dict]) -> dict[str, Any]:
    """Which layers DLA cannot run, asked of TensorRT before building: the ONNX parser's DLA capability report where
    the parser has one (10.16+: REPORT_CAPABILITY_DLA with the builder config set before parsing; ONNX node indices,
    named from the plan where it lists them), else config.can_run_on_DLA per network layer (layer names).
    -> {"method", "gpu_layers"}"""
    flags = getattr(trt, "OnnxParserFlag", None)
    if flags is not None and "REPORT_CAPABILITY_DLA" in getattr(flags, "__members__", {}):
        probe = trt.Builder(logger).create_network(0)
        parser = trt.OnnxParser(probe, logger)
        if hasattr(parser, "set_builder_config"):
            parser.set_flag(flags.REPORT_CAPABILITY_DLA)
            parser.set_builder_config(config)
            parser.supports_model_v2(onnx_path.read_bytes())
            names = {g.get("index"): g["node"] for g in planned}
            gpu = []
            for i in range(parser.num_subgraphs):
                if not parser.is_subgraph_supported(i):
                    gpu += [names.get(j, f"ONNX node {j}") for j in parser.get_subgraph_nodes(i)]
            return {"method": "parser capability report (REPORT_CAPABILITY_DLA)", "gpu_layers": gpu}
    gpu = [network.get_layer(i).name for i in range(network.num_layers)
           if not config.can_run_on_DLA(network.get_layer(i))]
    return {"method": "IBuilderConfig.can_run_on_DLA", "gpu_layers": gpu}


def _batch_profile(builder, config, inp, batch):
    """The optimization profile of the batch axis (None for a fixed batch). -> (profile, its record, dynamic)"""
    shape = tuple(int(d) for d in inp.shape)
    if any(d < 0 for d in shape[1:]):
        raise BuildError(f"input {inp.name} has dynamic non-batch dimensions {shape}; export a fixed C,H,W")
    if shape[0] < 0:
        lo, opt, hi = batch or (1, 8, 32)
        profile = builder.create_optimization_profile()
        profile.set_shape(inp.name, (lo, *shape[1:]), (opt, *shape[1:]), (hi, *shape[1:]))
        config.add_optimization_profile(profile)
        return profile, {"input": inp.name, "min": [lo, *shape[1:]], "opt": [opt, *shape[1:]],
                         "max": [hi, *shape[1:]]}, True
    if batch is not None and not all(b == shape[0] for b in batch):
        raise BuildError(f"the ONNX input {inp.name} has a fixed batch of {shape[0]}; re-export with a dynamic "
                         f"batch axis to build for batch {batch}")
    return None, {"input": inp.name, "min": list(shape), "opt": list(shape), "max": list(shape)}, False


def _attach_calib_cache(trt, config, profile, path: Path, version: str):
    """Implicit INT8 from a calibration cache. TensorRT rejects a cache whose header names another TensorRT
    version; the scales do not depend on the version, so the header is re-tagged in memory (the file is left as it
    is) and recorded. -> (sha256 of the cache used, the file's header)"""
    data = path.read_bytes()
    header, _, body = data.partition(b"\n")
    header_text = header.decode(errors="replace").strip()
    if not re.fullmatch(r"TRT-\d+-EntropyCalibration2", header_text):
        raise BuildError(f"calibration cache {path} starts with {header_text!r}, not an "
                         "EntropyCalibration2 header (TRT-<version>-EntropyCalibration2)")
    want = f"TRT-{_calib_tag_number(version)}-EntropyCalibration2"
    if header_text != want:
        data = want.encode() + b"\n" + body
    config.int8_calibrator = _cache_calibrator(trt, data)
    if profile is not None:
        config.set_calibration_profile(profile)
    return hashlib.sha256(data).hexdigest(), header_text


def _calib_tag_number(version: str) -> int:
    v = _version_tuple(version)
    return v[0] * (10000 if v[0] >= 10 else 1000) + v[1] * 100 + v[2]
