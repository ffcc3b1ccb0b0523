#!/usr/bin/env python3
"""edgeres device runtime: verify a bundle, build the engine for THIS device, check it, benchmark it.

Standalone on purpose: python3 + numpy + (tensorrt | trtexec | onnxruntime). No torch, no edgeres.

    python3 device_runtime.py [--bundle DIR] [--out result.json] [--precision int8|fp16|fp32] [--iterations N]

Steps: 1. every file's sha256 against manifest.json (a tampered bundle is refused); 2. describe the device
(Jetson model, L4T/JetPack, TensorRT, DLA cores, power mode, clock locking); 3. look up the host's plan for this
TensorRT version, precision and GPU/DLA (manifest "tensorrt_plan": which ONNX, calibration cache or not, profile
shapes, build arguments, trtexec argv) and build the engine exactly as planned, cached by device + TensorRT
version + plan entry; a combination the host refused is refused here with its one-line reason; 4. run the probe
set and compare with the host's reference logits (top-1 agreement and accuracy gates from the manifest);
5. benchmark. One JSON result is written and printed. Nothing is re-decided here. Needs Python >= 3.8.
Exit codes: 0 passed, 1 a gate failed, 2 the bundle or the device cannot be used.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path, PurePosixPath

FORMAT = "edgeres-bundle/1"
PLAN_FORMAT = "edgeres-trt-plan/1"
# equal to engine_build.CUDART_NAMES (a test checks): runtime-only CUDA installs have only versioned names
CUDART_NAMES = ("libcudart.so", "libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0",
                "/usr/local/cuda/lib64/libcudart.so", "/usr/local/cuda/lib64/libcudart.so.13",
                "/usr/local/cuda/lib64/libcudart.so.12", "/usr/local/cuda/lib64/libcudart.so.11.0")
MANIFEST = "manifest.json"
EXIT_OK, EXIT_GATE, EXIT_UNUSABLE = 0, 1, 2
PRECISIONS = ("int8", "fp16", "fp32")
# L4T major.minor -> JetPack release (NVIDIA's published table; unknown releases are reported as None)
JETPACK = {"32.4": "4.4", "32.5": "4.5", "32.6": "4.6", "32.7": "4.6.x", "34.1": "5.0", "35.1": "5.0.2",
           "35.2": "5.1", "35.3": "5.1.1", "35.4": "5.1.2", "35.5": "5.1.3", "35.6": "5.1.4",
           "36.2": "6.0 DP", "36.3": "6.0", "36.4": "6.1/6.2"}


class BundleError(Exception):
    """The bundle or the device cannot be used (exit 2)."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def safe_relpath(name: str) -> str:
    """A manifest path must stay inside the bundle: relative, no '..', no backslashes or NULs."""
    p = PurePosixPath(name)
    if not name or "\\" in name or "\x00" in name or p.is_absolute() or ".." in p.parts or name.startswith("~"):
        raise BundleError(f"unsafe path in manifest: {name!r}")
    return str(p)


def load_manifest(bundle: Path, expect_sha256: str | None = None) -> dict:
    path = bundle / MANIFEST
    if not path.is_file():
        raise BundleError(f"{path} not found: not an edgeres bundle")
    if expect_sha256 and sha256_file(path) != expect_sha256:
        raise BundleError(f"{MANIFEST} sha256 differs from the one the host sent: bundle altered in transit")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BundleError(f"{path} is not valid JSON ({e})") from None
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{path}: format {manifest.get('format')!r}, this runtime reads {FORMAT!r}")
    return manifest


def verify_files(bundle: Path, manifest: dict) -> list[str]:
    """Problems found (empty when every listed file is present, a regular file, and has its sha256)."""
    problems = []
    root = bundle.resolve()
    for name, entry in sorted(manifest.get("files", {}).items()):
        rel = safe_relpath(name)
        path = bundle / rel
        if path.is_symlink():
            problems.append(f"{rel}: is a symlink")
        elif not path.is_file():
            problems.append(f"{rel}: missing")
        elif root not in path.resolve().parents:
            problems.append(f"{rel}: outside the bundle")
        elif sha256_file(path) != entry.get("sha256"):
            problems.append(f"{rel}: sha256 mismatch (tampered or corrupt)")
    return problems


# ---------------------------------------------------------------------------------------------- device
def _read(path: str) -> str | None:
    try:
        return Path(path).read_text(errors="replace").replace("\x00", "").strip()
    except OSError:
        return None


def _run(cmd: list[str], timeout: float = 20) -> tuple[int, str] | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return p.returncode, (p.stdout + p.stderr)


def parse_l4t(text: str | None) -> dict:
    """'# R35 (release), REVISION: 4.1, GCID: ...' -> {"l4t": "35.4.1", "jetpack": "5.1.2"}."""
    if not text:
        return {"l4t": None, "jetpack": None}
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text)
    if not m:
        return {"l4t": None, "jetpack": None, "raw": text.splitlines()[0][:120]}
    major, rev = m.group(1), m.group(2)
    l4t = f"{major}.{rev}"
    return {"l4t": l4t, "jetpack": JETPACK.get(f"{major}.{rev.split('.')[0]}")}


def _trt_module():
    try:
        import tensorrt  # noqa: F401 - optional, JetPack ships it
        return tensorrt
    except Exception:  # a broken install (missing libnvinfer) raises OSError/ImportError alike
        return None


def trtexec_path() -> str | None:
    for cand in (shutil.which("trtexec"), "/usr/src/tensorrt/bin/trtexec"):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


def trtexec_version(exe: str) -> str | None:
    out = _run([exe, "--help"])
    m = re.search(r"TensorRT v(\d+)", out[1]) if out else None
    if not m:
        return None
    n = int(m.group(1))  # TensorRT 8: 8502 -> 8.5.2; TensorRT 10: 100300 -> 10.3.0
    major, minor = (n // 10000, n // 100 % 100) if n >= 100000 else (n // 1000, n // 100 % 10)
    return f"{major}.{minor}.{n % 100}"


def clocks_locked() -> bool | None:
    """True when every CPU (and the Jetson GPU) runs at a fixed clock (what `jetson_clocks` sets)."""
    pairs = []
    for cpu in sorted(Path("/sys/devices/system/cpu").glob("cpu[0-9]*/cpufreq")):
        pairs.append((_read(str(cpu / "scaling_min_freq")), _read(str(cpu / "scaling_max_freq"))))
    for gpu in Path("/sys/devices").glob("*gpu*/devfreq/*"):
        pairs.append((_read(str(gpu / "min_freq")), _read(str(gpu / "max_freq"))))
    pairs = [p for p in pairs if p[0] and p[1]]
    if not pairs:
        return None
    return all(lo == hi for lo, hi in pairs)


def describe_device() -> dict:
    trt = _trt_module()
    exe = trtexec_path()
    info = {"hostname": platform.node(), "machine": platform.machine(), "python": platform.python_version(),
            "model": _read("/proc/device-tree/model"), **parse_l4t(_read("/etc/nv_tegra_release")),
            "tensorrt": getattr(trt, "__version__", None) if trt else (trtexec_version(exe) if exe else None),
            "tensorrt_python": bool(trt), "trtexec": exe, "dla_cores": None, "power_mode": None,
            "clocks_locked": clocks_locked(), "warnings": []}
    if trt is not None:
        try:
            info["dla_cores"] = int(trt.Builder(trt.Logger(trt.Logger.ERROR)).num_DLA_cores)
        except Exception as e:  # no GPU visible: the builder cannot be created
            info["warnings"].append(f"TensorRT builder unavailable: {str(e)[:160]}")
    out = _run(["nvpmodel", "-q"])
    if out and out[0] == 0:
        m = re.search(r"NV Power Mode:\s*(.+)", out[1])
        info["power_mode"] = m.group(1).strip() if m else out[1].strip().splitlines()[0][:80]
    if info["clocks_locked"] is False:
        info["warnings"].append("clocks are not locked (run `sudo jetson_clocks`): latency figures will vary")
    return info


def choose_backend(info: dict, forced: str | None) -> str:
    if forced:
        return forced
    if info["tensorrt_python"] and not any("builder unavailable" in w for w in info["warnings"]):
        return "tensorrt"
    if info["trtexec"]:
        return "trtexec"
    return "onnxruntime"


# ---------------------------------------------------------------------------------------------- backends
def engine_key(info: dict, entry: dict, dla_core) -> str:
    ident = json.dumps([info.get("model") or info.get("machine"), info.get("tensorrt"), entry, dla_core],
                       sort_keys=True)
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def _version_parts(text: str) -> list:
    return [p for p in str(text).split(".") if p]


def _version_key(text: str) -> tuple:
    return tuple(int(p) for p in re.findall(r"\d+", str(text))[:4])


def calib_tag(version: str) -> int:
    """NV_TENSORRT_VERSION of a TensorRT version: 8.5.2 -> 8502, 10.3.0 -> 100300."""
    v = [int(p) for p in re.findall(r"\d+", str(version))[:3]] + [0, 0, 0]
    return v[0] * (10000 if v[0] >= 10 else 1000) + v[1] * 100 + v[2]


def plan_entry(manifest: dict, trt_version: str, precision: str, device: str) -> dict:
    """The host's decision for this TensorRT version, precision and gpu|dla; BundleError when there is none."""
    plan = manifest.get("tensorrt_plan") or {}
    if plan.get("format") != PLAN_FORMAT:
        raise BundleError(f"the bundle has no TensorRT plan this runtime reads ({PLAN_FORMAT}); make it again with "
                          "`edgeres bundle`")
    parts = _version_parts(trt_version)
    target, best = None, None
    for key, spec in plan["targets"].items():   # the most specific prefix wins: 10.3.x -> "10.3", 10.16 -> "10";
        low = spec.get("from")                   # then the highest lower bound reached: 11.4.1+ -> "11.4.1"
        if low and _version_key(trt_version) < _version_key(low):
            continue
        for m in spec["match"]:
            n = len(_version_parts(m))
            rank = (n, _version_key(low) if low else ())
            if parts[:n] == _version_parts(m) and (best is None or rank > best):
                target, best = key, rank
    if target is None:
        labels = ", ".join(spec["label"] for spec in plan["targets"].values())
        raise BundleError(f"TensorRT {trt_version} is not a target of this bundle (targets: {labels}); "
                          "edgeres needs TensorRT 8.5 or newer")
    for entry in plan["entries"]:
        if (entry["target"], entry["precision"], entry["device"]) == (target, precision, device):
            if entry.get("refused"):
                raise BundleError(f"{precision} on the {device.upper()} with TensorRT {trt_version}: "
                                  f"{entry['refused']}")
            return entry
    raise BundleError(f"the bundle's plan has no entry for {precision} on the {device.upper()} with TensorRT "
                      f"{trt_version}")


def on_jetson(info: dict) -> bool:
    return bool(info.get("l4t")) or "jetson" in str(info.get("model") or "").lower()


def check_platform(info: dict, entry: dict, manifest: dict, device: str) -> None:
    """Where the host's plan says the entry may run (versions.DLA_ROWS, written into the plan): a desktop-only target
    on a Jetson, a DLA entry on a Jetson module the row does not name, or a JetPack older than its minimum (when this
    device's L4T release is in JETPACK) is refused. Nothing is decided here that the plan does not say."""
    target = (manifest.get("tensorrt_plan") or {}).get("targets", {}).get(entry["target"], {})
    if on_jetson(info) and "jetson" not in entry.get("platforms", ["jetson"]):
        raise BundleError(f"TensorRT {info.get('tensorrt')} on a Jetson: the bundle's plan serves it as "
                          f"{target.get('label', entry['target'])}; NVIDIA ships no JetPack release of it (11.4.1 is "
                          "the last TensorRT for JetPack)")
    if device != "dla":
        return
    modules = entry.get("dla_modules") or []
    model = str(info.get("model") or "")
    if modules and model and not any(m.lower() in model.lower() for m in modules):
        raise BundleError(f"DLA with TensorRT {info.get('tensorrt')} is for Jetson {' or '.join(modules)} only "
                          f"(the bundle's plan); this device is {model}: run on the GPU (drop --dla-core)")
    low, here = entry.get("jetpack_min"), info.get("jetpack")
    if low and here and _version_key(here) < _version_key(low):
        raise BundleError(f"DLA with TensorRT {info.get('tensorrt')} needs JetPack {low} or later (the bundle's "
                          f"plan); this device runs JetPack {here}")


def local_calib_cache(bundle: Path, entry: dict, trt_version: str, dest: Path):
    """The planned calibration cache with its header naming THIS TensorRT (TensorRT ignores a cache from another
    version, and trtexec then calibrates on random data without an error)."""
    if not entry.get("calib_cache"):
        return None
    data = (bundle / safe_relpath(entry["calib_cache"])).read_bytes()
    header, _, body = data.partition(b"\n")
    if not re.fullmatch(rb"TRT-\d+-EntropyCalibration2", header.strip()):
        raise BundleError(f"{entry['calib_cache']} does not start with a TRT-<version>-EntropyCalibration2 header")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(f"TRT-{calib_tag(trt_version)}-EntropyCalibration2".encode() + b"\n" + body)
    return dest


def build_with_python(bundle: Path, onnx: Path, engine: Path, entry: dict, *, calib, workspace_mb, dla_core) -> dict:
    """engine_build.build_engine with the plan entry's own arguments (workspace, optimization level, profile, typing,
    DLA fallback list), this device's paths and timing cache (build_paths), and --workspace-mb where given."""
    if not (bundle / "engine_build.py").is_file():
        raise BundleError("TensorRT Python bindings found but the bundle has no engine_build.py")
    sys.path.insert(0, str(bundle))
    import engine_build  # shipped in the bundle, stdlib + tensorrt + numpy only

    kwargs = dict(entry["engine_build"])
    kwargs["batch"] = tuple(kwargs["batch"])
    if kwargs.get("dla_core") is not None:
        kwargs["dla_core"] = dla_core
    if workspace_mb is not None or "workspace_mb" not in kwargs:   # plans from before build_config: 1 GiB
        kwargs["workspace_mb"] = workspace_mb or 1024
    info = engine_build.build_engine(str(onnx), str(engine), timing_cache=str(build_paths(engine)["timing"]),
                                     calib_cache=str(calib) if calib else None, **kwargs)
    write_json(Path(f"{engine}.json"), info)   # the sidecar: checked before a cached engine is used again
    return info


def sidecar_problem(bundle: Path, engine: Path, info: dict) -> str | None:
    """engine_build.sidecar_mismatch of a cached engine's sidecar (written by build_with_python) against this device:
    platform (CPU architecture, OS, Jetson or not), TensorRT version; None without a sidecar or engine_build.py."""
    side = Path(f"{engine}.json")
    if not side.is_file() or not (bundle / "engine_build.py").is_file():
        return None
    sys.path.insert(0, str(bundle))
    import engine_build

    try:
        sidecar = json.loads(side.read_text())
    except (OSError, ValueError):
        return "its sidecar is unreadable"
    here = {"trt_version": info.get("tensorrt"), "machine": info.get("machine"), "system": platform.system(),
            "is_jetson": on_jetson(info)}
    return engine_build.sidecar_mismatch(sidecar, here)


def build_paths(engine: Path) -> dict:
    """This device's files for one build, the same for both paths: the timing cache beside the cached engine."""
    return {"timing": engine.parent / "timing.cache"}


def build_with_python_checked(bundle: Path, onnx: Path, engine: Path, entry: dict, **kw) -> dict:
    try:
        return build_with_python(bundle, onnx, engine, entry, **kw)
    except BundleError:
        raise
    except Exception as e:  # engine_build and TensorRT raise their own types; the result names the cause
        raise BundleError(f"TensorRT engine build failed: {type(e).__name__}: {str(e)[:400]}") from None


class CudaRT:
    """The few libcudart calls a TensorRT run needs, via ctypes (JetPack has no pycuda by default)."""

    def __init__(self) -> None:
        import ctypes
        import ctypes.util

        for name in filter(None, (ctypes.util.find_library("cudart"), *CUDART_NAMES)):
            try:
                self.lib = ctypes.CDLL(name)
                break
            except OSError:
                continue
        else:
            raise BundleError("libcudart not found: cannot run a TensorRT engine from Python")
        self.c = ctypes

    def check(self, rc: int, what: str) -> None:
        if rc != 0:
            raise BundleError(f"CUDA {what} failed with error {rc}")

    def malloc(self, nbytes: int) -> int:
        ptr = self.c.c_void_p()
        self.check(self.lib.cudaMalloc(self.c.byref(ptr), self.c.c_size_t(nbytes)), "cudaMalloc")
        return ptr.value

    def copy(self, dst: int, src: int, nbytes: int, kind: int) -> None:  # kind 1 = H2D, 2 = D2H
        self.check(self.lib.cudaMemcpy(self.c.c_void_p(dst), self.c.c_void_p(src), self.c.c_size_t(nbytes), kind),
                   "cudaMemcpy")

    def sync(self) -> None:
        self.check(self.lib.cudaDeviceSynchronize(), "cudaDeviceSynchronize")

    def free(self, ptr: int) -> None:
        self.lib.cudaFree(self.c.c_void_p(ptr))


class TensorRTRunner:
    def __init__(self, engine_path: Path, input_name: str, output_name: str, max_batch: int, dla_core=None) -> None:
        import tensorrt as trt

        self.trt, self.cuda = trt, CudaRT()
        self.logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self.logger)
        if dla_core is not None:   # IRuntime::setDLACore: the core a DLA engine runs on is chosen at deserialization
            runtime.DLA_core = int(dla_core)
        self.engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise BundleError(f"{engine_path}: TensorRT could not deserialize the engine")
        self.ctx = self.engine.create_execution_context()
        self.input_name, self.output_name, self.max_batch = input_name, output_name, max_batch
        self.bufs: dict[str, tuple[int, int]] = {}

    def _buf(self, name: str, nbytes: int) -> int:
        if name not in self.bufs or self.bufs[name][1] < nbytes:
            if name in self.bufs:
                self.cuda.free(self.bufs[name][0])
            self.bufs[name] = (self.cuda.malloc(nbytes), nbytes)
        return self.bufs[name][0]

    def infer(self, x):
        import numpy as np

        x = np.ascontiguousarray(x, dtype=np.float32)
        self.ctx.set_input_shape(self.input_name, tuple(x.shape))
        out = np.empty(tuple(self.ctx.get_tensor_shape(self.output_name)), dtype=np.float32)
        d_in, d_out = self._buf(self.input_name, x.nbytes), self._buf(self.output_name, out.nbytes)
        self.cuda.copy(d_in, x.ctypes.data, x.nbytes, 1)
        self.ctx.set_tensor_address(self.input_name, d_in)
        self.ctx.set_tensor_address(self.output_name, d_out)
        if not self.ctx.execute_async_v3(0):
            raise BundleError("TensorRT execution failed")
        self.cuda.sync()
        self.cuda.copy(out.ctypes.data, d_out, out.nbytes, 2)
        return out


class OnnxRuntimeRunner:
    def __init__(self, onnx_path: Path, input_name: str) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise BundleError("neither TensorRT, trtexec nor onnxruntime is available on this device") from None
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        self.input_name = input_name
        self.version = ort.__version__

    def infer(self, x):
        return self.session.run(None, {self.input_name: x})[0]


class OpenVinoRunner:
    """OpenVINO on this device's CPU (x86 or ARM): its INT8 kernels run the Q/DQ ONNX (--backend openvino)."""

    def __init__(self, onnx_path: Path) -> None:
        try:
            import openvino as ov
        except ImportError:
            raise BundleError("--backend openvino: OpenVINO is not installed for this python3 (pip install openvino)"
                              ) from None
        core = ov.Core()
        # f32: OpenVINO runs float layers in bf16 by default on CPUs that have it (AVX-512 BF16, AMX)
        self.compiled = core.compile_model(core.read_model(str(onnx_path)), "CPU",
                                           {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"})
        self.request = self.compiled.create_infer_request()
        self.version = ov.get_version()

    def infer(self, x):
        return self.request.infer({0: x})[self.compiled.outputs[0]]


def trtexec_shapes(name: str, shape: tuple[int, ...]) -> str:
    return f"{name}:" + "x".join(str(d) for d in shape)


def trtexec_error(text: str) -> str:
    """One line from trtexec's output: its error lines ([E]), else its last line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "[E]" in ln]
    return (" | ".join(errors) if errors else (lines[-1] if lines else "no output"))[-400:]


def trtexec_build(exe: str, entry: dict, *, onnx: Path, engine: Path, calib, dla_core, workspace_mb=None) -> dict:
    """The host's trtexec argv for this entry, with this device's paths (engine, calibration cache, timing cache), its
    DLA core index and --workspace-mb where given filled in: the build configuration of build_with_python."""
    timing = str(build_paths(engine)["timing"])
    cmd = [exe] + [a.replace("{onnx}", str(onnx)).replace("{engine}", str(engine)).replace("{timing}", timing)
                   .replace("{calib}", str(calib) if calib else "{calib}") for a in entry["trtexec"][1:]]
    if dla_core is not None:
        cmd = [f"--useDLACore={dla_core}" if a.startswith("--useDLACore=") else a for a in cmd]
    if workspace_mb is not None or not any(a.startswith("--memPoolSize=") for a in cmd):
        cmd = [a for a in cmd if not a.startswith("--memPoolSize=")]
        cmd.append(f"--memPoolSize=workspace:{workspace_mb or 1024}")
    if not any(a.startswith("--timingCacheFile=") for a in cmd):   # plans from before build_config
        cmd.append(f"--timingCacheFile={timing}")
    if any("{calib}" in a for a in cmd):
        raise BundleError("the plan's trtexec command needs a calibration cache the bundle does not have")
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0 or not engine.is_file():
        raise BundleError(f"trtexec failed to build the engine: {trtexec_error(p.stdout + p.stderr)}")
    return {"builder": "trtexec", "command": cmd}


def _run_args(entry: dict, input_name: str, shape, dla_core) -> list:
    """--shapes whenever the ONNX input is dynamic, even with a static profile (DLA): trtexec runs a dynamic input
    given no shapes at 1 (sampleInference.cpp, "Automatically overriding shape to: 1x..."); the DLA core for a DLA
    engine. Plans from before `dynamic_input` was recorded came from edgeres's dynamic-batch ONNX."""
    args = [f"--shapes={trtexec_shapes(input_name, shape)}"] if entry.get("dynamic_input", True) else []
    return args + ([f"--useDLACore={dla_core}"] if dla_core is not None else [])


def trtexec_infer(exe: str, engine: Path, x, input_name: str, output_name: str, run_args: list):
    """Run a batch through trtexec (--loadInputs / --exportOutput) and return the logits."""
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        inp, out = Path(tmp) / "input.bin", Path(tmp) / "output.json"
        np.ascontiguousarray(x, dtype=np.float32).tofile(inp)
        cmd = [exe, f"--loadEngine={engine}", *run_args,
               f"--loadInputs={input_name}:{inp}", f"--exportOutput={out}", "--iterations=1", "--warmUp=0",
               "--duration=0"]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0 or not out.is_file():
            raise BundleError(f"trtexec inference failed: {trtexec_error(p.stdout + p.stderr)}")
        for entry in json.loads(out.read_text()):
            if entry.get("name") == output_name:
                return np.asarray(entry["values"], dtype=np.float32).reshape(x.shape[0], -1)
    raise BundleError(f"trtexec output has no tensor named {output_name!r}")


def trtexec_bench(exe: str, engine: Path, run_args: list, shape: tuple, iterations: int) -> dict:
    cmd = [exe, f"--loadEngine={engine}", *run_args,
           f"--iterations={iterations}", "--duration=0", "--warmUp=500", "--percentile=99"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    text = p.stdout + p.stderr
    lat = re.search(r"Latency: .*?median = ([\d.]+) ms.*?percentile\(99%\) = ([\d.]+) ms", text)
    thr = re.search(r"Throughput: ([\d.]+) qps", text)
    if p.returncode != 0 or not lat:
        raise BundleError(f"trtexec benchmark failed: {trtexec_error(text)}")
    return {"median_ms": float(lat.group(1)), "p99_ms": float(lat.group(2)),
            "throughput_qps": float(thr.group(1)) * shape[0] if thr else None, "source": "trtexec"}


def benchmark(infer, x, iterations: int, warmup: int = 10) -> dict:
    import numpy as np

    for _ in range(warmup):
        infer(x)
    times = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        infer(x)  # every backend here returns host memory: the device is synchronized on both sides
        times.append((time.perf_counter() - t0) * 1e3)
    t = np.asarray(times)
    median = float(np.median(t))
    return {"median_ms": round(median, 4), "p99_ms": round(float(np.percentile(t, 99)), 4),
            "mean_ms": round(float(t.mean()), 4), "throughput_ips": round(x.shape[0] * 1e3 / median, 2),
            "batch": int(x.shape[0]), "iterations": iterations, "warmup": warmup, "source": "wall-clock"}


# ---------------------------------------------------------------------------------------------- verify
def gate_rule():
    """The gate rule (edgeres/stats.py), shipped beside this file as edgeres_stats.py so the device decides its gates
    exactly as the host does (run from the edgeres package: the package's own file). Loaded by path: this script
    imports nothing of edgeres."""
    import importlib.util

    if "edgeres_stats" not in sys.modules:
        here = Path(__file__).resolve().parent
        copy = next((p for p in (here / "edgeres_stats.py", here.parent / "stats.py") if p.is_file()), None)
        if copy is None:
            raise BundleError("the bundle has no edgeres_stats.py (the gate rule); make it again with edgeres bundle")
        spec = importlib.util.spec_from_file_location("edgeres_stats", copy)
        module = importlib.util.module_from_spec(spec)
        sys.modules["edgeres_stats"] = module   # dataclasses look their module up while it executes
        saved, sys.dont_write_bytecode = sys.dont_write_bytecode, True   # no __pycache__ in a verified release
        try:
            spec.loader.exec_module(module)
        finally:
            sys.dont_write_bytecode = saved
    return sys.modules["edgeres_stats"]


def check_outputs(logits, ref, y, gates: dict, expected_accuracy: float | None, *, level: float = 0.95) -> dict:
    """The device's gates, decided by the same interval rule as the host's: its top-1 agreement with the host's
    reference logits (Wilson interval) and, with labels, its top-1 drop vs the host's on the same probe images
    (paired interval). A gate fails only when its whole interval is beyond the limit; an interval that straddles
    it is "not measurable" (named in the result; the engine is still installed)."""
    import numpy as np

    stats = gate_rule()
    pred, ref_pred = logits.argmax(1), ref.argmax(1)
    n = int(len(pred))
    agree_k = int((pred == ref_pred).sum())
    agreement = 100.0 * agree_k / n if n else 100.0                  # %, like every edgeres figure
    accuracy = 100.0 * float((pred == y).mean()) if y is not None else None
    a = stats.proportion_gate_numbers(agree_k, n, ">=", gates["min_top1_agreement_pct"], level)
    checks = [{"name": "top1_agreement_pct", "value": agreement, "limit": gates["min_top1_agreement_pct"],
               "op": ">=", "lo": a["lo"], "hi": a["hi"], "n": n, "level": level, "outcome": a["outcome"],
               "resolve_n": a["resolve_n"]}]
    if y is not None:
        p = stats.paired(ref_pred.tolist(), pred.tolist(), y.tolist())
        d = stats.drop_gate_numbers(p, gates["max_accuracy_drop_pp"], level)
        checks.append({"name": "top1_drop_pp", "value": d["value"], "limit": gates["max_accuracy_drop_pp"], "op": "<=",
                       "lo": d["lo"], "hi": d["hi"], "n": n, "level": level, "outcome": d["outcome"],
                       "resolve_n": d["resolve_n"], "counts": p.to_dict()})
    for c in checks:
        c["passed"] = c["outcome"] != stats.FAILED
    verdict = (stats.FAILED if any(c["outcome"] == stats.FAILED for c in checks) else
               stats.NOT_MEASURABLE if any(c["outcome"] == stats.NOT_MEASURABLE for c in checks) else stats.PASSED)
    return {"top1_agreement_pct": agreement, "accuracy_pct": accuracy, "expected_accuracy_pct": expected_accuracy,
            "max_abs_diff": float(np.abs(logits - ref).max()), "gates": checks, "verdict": verdict,
            "passed": verdict != stats.FAILED}


def previous_result_current(out: Path, manifest_sha: str, info: dict, precision: str,
                            dla_core=None) -> dict | None:
    """The earlier result when it passed for this same bundle, device, TensorRT version and precision."""
    try:
        prev = json.loads(out.read_text())
    except (OSError, ValueError):
        return None
    same = (prev.get("status") == "passed" and prev.get("manifest_sha256") == manifest_sha
            and prev.get("precision") == precision and prev.get("dla_core") == dla_core
            and (prev.get("device") or {}).get("tensorrt") == info.get("tensorrt")
            and (prev.get("device") or {}).get("model") == info.get("model"))
    return prev if same else None


def say(args: argparse.Namespace, msg: str) -> None:
    """Progress on stderr (stdout carries the one JSON result); off with --quiet."""
    if not getattr(args, "quiet", False):
        print(f"edgeres-device: {msg}", file=sys.stderr, flush=True)


TICK_S = 5.0   # never silent longer than this while building or timing


@contextlib.contextmanager
def ticking(args: argparse.Namespace, label: str):
    """While the body runs (an engine build, a trtexec run, the timing loop): "<label>: 12 s" every TICK_S."""
    stop = threading.Event()
    start = time.monotonic()

    def tick() -> None:
        while not stop.wait(TICK_S):
            say(args, f"{label}: {time.monotonic() - start:.0f} s")

    thread = threading.Thread(target=tick, daemon=True)
    if not getattr(args, "quiet", False):
        thread.start()
    try:
        yield
    finally:
        stop.set()
        if thread.is_alive():
            thread.join()


def _choose(info: dict, manifest: dict, args: argparse.Namespace):
    """The backend this device runs (refusing what --backend / --require-backend / --dla-core rule out), GPU or
    DLA, and the host's plan entry for this TensorRT, precision and device (None on a CPU backend)."""
    backend = choose_backend(info, args.backend)
    if args.require_backend == "tensorrt" and backend in ("onnxruntime", "openvino"):
        raise BundleError("TensorRT is required (--require-backend tensorrt) but this device has neither working "
                          "TensorRT Python bindings nor trtexec: " + ("; ".join(info.get("warnings") or [])
                                                                      or "not installed"))
    if backend == "tensorrt" and not info["tensorrt_python"]:
        raise BundleError("--backend tensorrt: the TensorRT Python bindings are not importable here")
    if backend == "trtexec" and not info["trtexec"]:
        raise BundleError("--backend trtexec: no trtexec on PATH or in /usr/src/tensorrt/bin")
    if backend == "trtexec":   # the binary that builds decides the plan entry, argv and cache tag, not the bindings
        version = trtexec_version(info["trtexec"])
        if version is None:
            raise BundleError(f"cannot read the TensorRT version from `{info['trtexec']} --help`")
        info["tensorrt_bindings"], info["tensorrt"] = info["tensorrt"] if info["tensorrt_python"] else None, version
    device = "dla" if args.dla_core is not None else "gpu"
    if device == "dla" and backend in ("onnxruntime", "openvino"):
        raise BundleError(f"--dla-core needs TensorRT (Python bindings or trtexec), not {backend}")
    entry = None
    if backend in ("tensorrt", "trtexec"):   # the host's decision for this TensorRT, precision and device
        entry = plan_entry(manifest, str(info["tensorrt"]), args.precision, device)
        check_platform(info, entry, manifest, device)
        cores = info.get("dla_cores")
        if device == "dla" and cores is not None and not 0 <= args.dla_core < cores:
            raise BundleError(f"--dla-core {args.dla_core}: this device has {cores} DLA cores"
                              + (" (desktop GPUs have none; Jetson Xavier and Orin have 2)" if cores == 0 else ""))
    return backend, device, entry


def _cpu_runner(backend: str, onnx: Path, name_in: str, precision: str, result: dict):
    """OpenVINO or ONNX Runtime on this device's CPU: no engine is built. Returns infer(batch) -> logits."""
    if precision == "fp16":
        where = "OpenVINO on this device's CPU" if backend == "openvino" else "ONNX Runtime on this device"
        raise BundleError(f"fp16 needs TensorRT; {where} runs int8 or fp32")
    if backend == "openvino":
        runner = OpenVinoRunner(onnx)
        result["openvino"] = runner.version
        result["note"] = "run on this device's CPU with OpenVINO (its INT8 kernels for int8); no engine was built"
    else:
        runner = OnnxRuntimeRunner(onnx, name_in)
        result["onnxruntime"] = runner.version
        result["note"] = ("TensorRT not available here (no Python bindings, no trtexec): verified and timed "
                          "with ONNX Runtime on the CPU instead; no engine was built")
    result["engine"] = None
    return runner.infer


def _engine_runner(backend: str, bundle: Path, onnx: Path, entry: dict, info: dict, device: str, batch: int,
                   name_in: str, name_out: str, args: argparse.Namespace, result: dict):
    """The TensorRT engine for this device (built as planned on first run, then cached under its key), run with
    the Python bindings or trtexec. Returns infer(batch) -> logits."""
    cache = Path(args.cache_dir) if args.cache_dir else bundle / "engines"
    key = engine_key(info, entry, args.dla_core)
    engine = cache / key / "model.plan"
    cached = engine.is_file()
    stale = cached and sidecar_problem(bundle, engine, info)
    if stale:   # an engine cache copied from another machine: its sidecar says where it was built
        say(args, f"the cached engine cannot run here ({stale}); building it again")
        engine.unlink()
        cached = False
    build = None
    if not cached:
        say(args, f"building the {args.precision} engine for the {device.upper()} with {backend} as planned "
                  f"({entry['onnx']}{', ' + entry['calib_cache'] if entry['calib_cache'] else ''}; first run "
                  "on this device and TensorRT version; this can take minutes)")
        engine.parent.mkdir(parents=True, exist_ok=True)
        calib = local_calib_cache(bundle, entry, str(info["tensorrt"]), engine.parent / "calib.cache")
        with ticking(args, "building the engine"):
            if backend == "tensorrt":
                build = build_with_python_checked(bundle, onnx, engine, entry, calib=calib,
                                                  workspace_mb=args.workspace_mb, dla_core=args.dla_core)
            else:
                build = trtexec_build(info["trtexec"], entry, onnx=onnx, engine=engine, calib=calib,
                                      dla_core=args.dla_core, workspace_mb=args.workspace_mb)
    result["engine"] = {"path": str(engine), "key": key, "cached": cached, "build": build}
    if backend == "tensorrt":
        return TensorRTRunner(engine, name_in, name_out, batch, dla_core=args.dla_core).infer
    return lambda b: trtexec_infer(info["trtexec"], engine, b, name_in, name_out,
                                   _run_args(entry, name_in, b.shape, args.dla_core))


def run(args: argparse.Namespace) -> tuple[dict, int]:
    if sys.version_info < (3, 8):  # noqa: UP036 - runs under the device's python3, not ours
        raise BundleError(f"Python {platform.python_version()}: the device runtime needs Python 3.8 or newer "
                          "(JetPack 5.1 ships 3.8)")
    try:
        import numpy as np
    except ImportError:
        raise BundleError("numpy is not installed for this python3 (JetPack: sudo apt-get install python3-numpy)"
                          ) from None

    bundle = Path(args.bundle).resolve()
    say(args, f"checking the bundle in {bundle}")
    manifest = load_manifest(bundle, args.expect_manifest_sha256)
    problems = verify_files(bundle, manifest)
    if problems:
        raise BundleError("bundle verification failed, refusing to run: " + "; ".join(problems))
    manifest_sha = sha256_file(bundle / MANIFEST)
    info = describe_device()
    out = Path(args.out) if args.out else bundle / "result.json"
    if args.skip_if_current:
        prev = previous_result_current(out, manifest_sha, info, args.precision, args.dla_core)
        if prev is not None and args.require_backend == "tensorrt" and \
                prev.get("backend") in ("onnxruntime", "openvino"):
            prev = None   # that result came from ONNX Runtime: with TensorRT required it does not count
        if prev is not None:
            prev["skipped"] = "result is current for this bundle, device and TensorRT version"
            return prev, EXIT_OK
    backend, device, entry = _choose(info, manifest, args)
    models, spec = manifest["models"], manifest["input"]
    onnx = bundle / safe_relpath(entry["onnx"] if entry else models["int8" if args.precision == "int8" else "fp32"])
    probe = np.load(bundle / safe_relpath(manifest["probe"]["file"]))
    x = probe["x"].astype(np.float32)
    y = probe["y"].astype(np.int64) if "y" in probe.files else None
    ref = probe["ref_int8" if args.precision == "int8" else "ref_fp32"]
    batch = int(entry["profile"]["opt"]) if entry else int(manifest.get("tensorrt_plan", {}).get("batch") or len(x))
    gates = {**{"min_top1_agreement_pct": 90.0, "max_accuracy_drop_pp": 5.0}, **manifest.get("gates", {})}
    expected = ((manifest.get("expected_accuracy") or {}).get("probe_pct") or {}).get(args.precision if args.precision
                                                                                != "fp16" else "fp32")
    result = {"format": "edgeres-result/1", "bundle": str(bundle), "manifest_sha256": manifest_sha,
              "run": manifest.get("run", {}).get("name"), "precision": args.precision, "backend": backend,
              "device": info, "tensorrt": info["tensorrt"] if entry else None, "note": None,
              "plan": None if entry is None else {k: entry.get(k) for k in ("target", "precision", "device", "onnx",
                                                                           "calib_cache", "profile",
                                                                           "gpu_fallback_layers")},
              "runs_on": "dla" if device == "dla" else ("gpu" if entry else "cpu"),
              "dla_core": args.dla_core}
    name_in, name_out = spec["name"], manifest.get("output", {}).get("name", "logits")
    t0 = time.perf_counter()
    if backend in ("openvino", "onnxruntime"):
        infer = _cpu_runner(backend, onnx, name_in, args.precision, result)
    else:
        infer = _engine_runner(backend, bundle, onnx, entry, info, device, batch, name_in, name_out, args, result)
    result["prepare_s"] = round(time.perf_counter() - t0, 3)
    say(args, f"verifying on {len(x)} probe images ({backend})")
    static = bool(entry and entry.get("static_batch"))
    logits = np.concatenate([infer_padded(infer, x[i:i + batch], batch if static else None)
                             for i in range(0, len(x), batch)])
    build = manifest.get("build") or {}
    result["verification"] = check_outputs(logits, ref, y, gates, expected,
                                           level=float(build.get("confidence") or 0.95))
    # what the host's verdict said of its own limits travels with the device's result
    result["host_verdict"] = {k: build.get(k) for k in ("verdict", "limits_loosened", "not_measurable")}
    xb = x[:batch] if len(x) >= batch or not static else np.concatenate([x] * (batch // len(x) + 1))[:batch]
    say(args, f"timing {args.iterations} iterations at batch {len(xb)}")
    with ticking(args, f"timing {args.iterations} iterations"):
        if backend == "trtexec":
            result["benchmark"] = trtexec_bench(info["trtexec"], result["engine"]["path"],
                                                _run_args(entry, name_in, xb.shape, args.dla_core), xb.shape,
                                                args.iterations)
        else:
            result["benchmark"] = benchmark(infer, xb, args.iterations)
    result["status"] = "passed" if result["verification"]["passed"] else "failed"
    result["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return result, EXIT_OK if result["status"] == "passed" else EXIT_GATE


def infer_padded(infer, xb, static_batch):
    """A static-batch engine (DLA) takes exactly its batch: the last chunk is padded and the padding dropped."""
    import numpy as np

    n = len(xb)
    if static_batch is None or n == static_batch:
        return infer(xb)
    pad = np.concatenate([xb, np.repeat(xb[-1:], static_batch - n, axis=0)])
    return infer(pad)[:n]


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
    os.chmod(tmp, 0o644)   # the default user reads the result (mkstemp makes 0600)
    os.replace(tmp, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    here = Path(__file__).resolve().parent
    p = argparse.ArgumentParser(prog="edgeres-device", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", default=str(here), help="bundle folder (default: this file's folder)")
    p.add_argument("--out", default=None, help="result JSON (default: BUNDLE/result.json)")
    p.add_argument("--precision", choices=PRECISIONS, default="int8")
    p.add_argument("--iterations", type=int, default=200, help="timed iterations")
    p.add_argument("--backend", choices=("tensorrt", "trtexec", "onnxruntime", "openvino"), default=None,
                   help="force a backend (default: tensorrt, else trtexec, else onnxruntime; openvino: the CPU with "
                        "OpenVINO's INT8 kernels, when installed)")
    p.add_argument("--cache-dir", default=None, help="engine cache (default: BUNDLE/engines)")
    p.add_argument("--workspace-mb", type=int, default=None,
                   help="builder workspace in MiB for both build paths (default: the plan's, 1024)")
    p.add_argument("--dla-core", type=int, default=None,
                   help="run on this DLA core (the host's DLA plan: static batch; the layers NVIDIA's DLA table "
                        "excludes, listed in the plan, fall back to the GPU, every other layer runs on DLA)")
    p.add_argument("--skip-if-current", action="store_true",
                   help="do nothing when --out already holds a passed result for this bundle and TensorRT version")
    p.add_argument("--expect-manifest-sha256", default=None, help="refuse unless manifest.json has this sha256")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--require-backend", choices=("tensorrt",), default=None,
                   help="fail (exit 2) instead of falling back to ONNX Runtime when TensorRT cannot be used")
    args = p.parse_args(argv)
    if args.iterations < 1:
        p.error("--iterations must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result, code = run(args)
    except BundleError as e:
        result, code = {"format": "edgeres-result/1", "status": "error", "error": str(e)}, EXIT_UNUSABLE
    except Exception as e:  # noqa: BLE001 - the exit-code contract holds for what we did not foresee too
        first = (str(e).strip().splitlines() or [""])[0][:300]
        result = {"format": "edgeres-result/1", "status": "error", "error": f"{type(e).__name__}: {first}"}
        code = EXIT_UNUSABLE
    out = Path(args.out) if args.out else Path(args.bundle) / "result.json"
    if not result.get("skipped"):
        try:
            write_json(out, result)
        except OSError as e:
            print(f"edgeres-device: cannot write {out}: {e}", file=sys.stderr)
    print(json.dumps(result, sort_keys=True, default=str))
    if code == EXIT_UNUSABLE:
        print(f"edgeres-device: {result['error']}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
