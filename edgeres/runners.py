"""One runner per backend, all with the same `infer(x) -> logits` (Polygraphy's loaders-and-runners shape).

x is float32 NCHW numpy, the result float32 [N, classes] numpy, so every `infer` is synchronous: when it
returns, the device has finished. GPU runners also have `infer_timed(x) -> (logits, {"h2d_ms", "compute_ms",
"d2h_ms"})`. torch, onnx, onnxruntime and tensorrt are imported inside the functions that need them.
"""
from __future__ import annotations

import json
import re
import time
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from edgeres.checkpoint import check_meta, load_model, read_checkpoint
from edgeres.errors import ArtifactError, BackendUnavailable, ConfigError
from edgeres.fold import load_folded
from edgeres.io import require_regular_file
from edgeres.onnx_info import read_metadata
from edgeres.quantize import is_quantized_checkpoint, is_quantized_model, load_quantized  # NNCF: only to load one
from edgeres.runner_base import Runner

MAX_THREADS = 512   # a thread pool larger than any machine edgeres targets is a typo; 100000 threads hang the process


class Backend(str, Enum):
    TORCH = "torch"
    ONNXRUNTIME = "onnxruntime"
    TENSORRT = "tensorrt"
    OPENVINO = "openvino"


SUFFIX_BACKEND = {".onnx": Backend.ONNXRUNTIME, ".pt": Backend.TORCH, ".pth": Backend.TORCH,
                  ".plan": Backend.TENSORRT, ".engine": Backend.TENSORRT, ".xml": Backend.OPENVINO}
# artifacts another backend reads too: an ONNX model runs on OpenVINO (`--backend openvino`)
ALSO_RUNS_ON = {Backend.ONNXRUNTIME: {Backend.OPENVINO}}


class Provider(str, Enum):
    """ONNX Runtime execution providers a user may ask for, by short name."""

    CPU = "cpu"
    CUDA = "cuda"
    TENSORRT = "tensorrt"


ORT_PROVIDER = {Provider.CPU: "CPUExecutionProvider", Provider.CUDA: "CUDAExecutionProvider",
                Provider.TENSORRT: "TensorrtExecutionProvider"}


class TorchRunner(Runner):
    """A torch.nn.Module in eval mode. `threads` sets torch's intra-op threads (process-wide in torch)."""

    name = Backend.TORCH.value

    def __init__(self, model: Any, *, device: str = "cpu", threads: int | None = None, meta: Any = None,
                 path: str | None = None) -> None:
        import torch

        if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
            raise ConfigError(f"unknown device {device!r}; use cpu, cuda or cuda:N")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendUnavailable(f"device {device} asked for, but torch sees no CUDA GPU")
        if threads is not None:
            torch.set_num_threads(int(threads))
        self._torch = torch
        self.model = model.eval().to(device)
        self.device = device
        self.threads = torch.get_num_threads()
        self.meta = meta
        self.path = path
        dtypes = {p.dtype for p in self.model.parameters()}
        self.precision = "fp16" if torch.float16 in dtypes else ("int8" if torch.qint8 in dtypes else "fp32")
        if self.precision == "fp32":
            if is_quantized_model(self.model):
                self.precision = "int8 (fake-quant)"
        self.input_shape = ((meta.in_channels, meta.input_size, meta.input_size) if meta is not None else None)
        self._dtype = torch.float16 if self.precision == "fp16" else torch.float32

    def infer_impl(self, x: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            out = self.model(torch.from_numpy(x).to(self.device, self._dtype))
            return out.float().cpu().numpy()

    def infer_timed(self, x: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
        """CUDA only: H2D, compute and D2H timed separately with CUDA events."""
        torch = self._torch
        if not self.device.startswith("cuda"):
            raise BackendUnavailable("infer_timed needs a CUDA device; this runner is on the CPU")
        x = self.check(x)
        events = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        with torch.inference_mode():
            host = torch.from_numpy(x)
            events[0].record()
            dev = host.to(self.device, self._dtype)
            events[1].record()
            out = self.model(dev)
            events[2].record()
            logits = out.float().cpu()
            events[3].record()
            torch.cuda.synchronize()
        return logits.numpy(), {"h2d_ms": events[0].elapsed_time(events[1]),
                                "compute_ms": events[1].elapsed_time(events[2]),
                                "d2h_ms": events[2].elapsed_time(events[3])}

    def synchronize(self) -> None:
        if self.device.startswith("cuda"):
            self._torch.cuda.synchronize()

    def close(self) -> None:
        self.model = None



def _onnx_precision(path: Path) -> str:
    """int8 when the graph has Q/DQ nodes, fp16 when it holds half-precision weights, else fp32."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    ops = {n.op_type for n in model.graph.node}
    if ops & {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger"}:
        return "int8"
    if any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer):
        return "fp16"
    return "fp32"


def parse_meta(props: dict[str, str], source: str = "ONNX model") -> dict[str, Any]:
    """Preprocessing from ONNX metadata_props: a whole ModelMeta as JSON, or loose mean/std/input_size keys; every
    value type- and range-checked (checkpoint.check_meta) before anything sizes an image or a model from it."""
    return check_meta(_raw_meta(props), source)


def _raw_meta(props: dict[str, str]) -> dict[str, Any]:
    for key in ("edgeres.meta", "edgeres_meta", "meta", "model_meta"):
        if key in props:
            try:
                obj = json.loads(props[key])
            except ValueError:
                continue
            if isinstance(obj, dict):
                return obj
    out: dict[str, Any] = {}
    for key in ("mean", "std", "input_size", "num_classes", "in_channels", "arch", "class_names", "resize_size"):
        raw = props.get(key, props.get(f"edgeres.{key}"))
        if raw is None:
            continue
        try:
            out[key] = json.loads(raw)
        except ValueError:
            try:
                out[key] = [float(v) for v in raw.split(",")] if key in ("mean", "std") else raw
            except ValueError:
                out[key] = raw   # check_meta says what is wrong with it
    return out


class OrtRunner(Runner):
    """An ONNX file on ONNX Runtime. providers: short names (cpu, cuda, tensorrt); CPU when not given.

    `optimize=False` turns ONNX Runtime's graph optimizations off: the graph runs as written. For a Q/DQ model that
    means QuantizeLinear, DequantizeLinear and a float Conv as separate nodes (the semantics of the exported graph);
    with optimizations on, ONNX Runtime fuses DQ -> Conv -> Q into its own INT8 kernels (QLinearConv)."""

    name = Backend.ONNXRUNTIME.value

    def __init__(self, path: str | Path, *, providers: tuple[str, ...] | list[str] | None = None,
                 threads: int | None = None, optimize: bool = True) -> None:
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"ONNX model not found: {path}")
        wanted = _ort_providers(providers, ort.get_available_providers())
        opts = ort.SessionOptions()
        opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                         else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        opts.log_severity_level = 3
        if threads is not None:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=wanted)
            self.precision = _onnx_precision(path)
        except Exception as e:  # ORT and onnx raise several pybind types for junk or unsupported files
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ArtifactError(f"{path} is not a loadable ONNX model ({first[:200]})") from None
        self.path = str(path)
        self.threads = threads
        self.providers = tuple(self.session.get_providers())
        gpu = self.providers[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider")
        self.device = "cuda:0" if gpu else "cpu"
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1:
            raise ArtifactError(f"{path} has {len(inputs)} inputs ({', '.join(i.name for i in inputs[:4])}); edgeres "
                                f"runs image classifiers with one NCHW input")
        inp = inputs[0]
        outs = [o.name for o in outputs]
        self.input_name = inp.name
        self.output_name = "logits" if "logits" in outs else outs[0]
        logits = outputs[outs.index(self.output_name)]
        if logits.type not in ("tensor(float)", "tensor(float16)", "tensor(double)") or len(logits.shape) != 2:
            raise ArtifactError(f"{path}: output {logits.name} is {logits.type} {logits.shape}; edgeres needs float "
                                f"logits [N, classes] (not class indices or probabilities of another shape)")
        dims = [d if isinstance(d, int) and d > 0 else None for d in inp.shape]
        if len(dims) != 4:
            raise ArtifactError(f"{path}: expected one NCHW input, found {inp.name} with shape {inp.shape}")
        self.batch_dim: int | None = dims[0]
        self.input_shape = tuple(dims[1:]) if all(d is not None for d in dims[1:]) else None
        self.meta = parse_meta(dict(self.session.get_modelmeta().custom_metadata_map), str(path))

    def infer_impl(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.run([self.output_name], {self.input_name: x})[0], dtype=np.float32)

    def infer_timed(self, x: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
        """CUDA/TensorRT EP only: copies and compute timed apart through IO binding (host clock, synchronised)."""
        import onnxruntime as ort

        if self.device == "cpu":
            raise BackendUnavailable("infer_timed needs the CUDA or TensorRT execution provider")
        x = self.check(x)
        t0 = time.perf_counter_ns()
        x_dev = ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0)
        t1 = time.perf_counter_ns()
        binding = self.session.io_binding()
        binding.bind_ortvalue_input(self.input_name, x_dev)
        binding.bind_output(self.output_name, "cuda", 0)
        binding.synchronize_inputs()
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        t2 = time.perf_counter_ns()
        logits = binding.copy_outputs_to_cpu()[0]
        t3 = time.perf_counter_ns()
        return np.asarray(logits, dtype=np.float32), {"h2d_ms": (t1 - t0) / 1e6, "compute_ms": (t2 - t1) / 1e6,
                                                      "d2h_ms": (t3 - t2) / 1e6}

    def close(self) -> None:
        self.session = None


def ort_int8_kernels(path: str | Path, threads: int | None = None) -> dict[str, int]:
    """How ONNX Runtime's optimized CPU graph runs an INT8 Q/DQ model: fused INT8 kernels (QLinearConv, QLinearAdd,
    QGemm, ConvInteger...) versus convolutions left in float (with DequantizeLinear run every inference)."""
    import tempfile

    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = int(threads)
    with tempfile.TemporaryDirectory() as tmp:
        opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        ops = [n.op_type for n in onnx.load(opts.optimized_model_filepath, load_external_data=False).graph.node]
    int8 = sum(1 for o in ops if o.startswith("QLinear") or o in ("QGemm", "ConvInteger", "MatMulInteger"))
    float_convs = sum(1 for o in ops if o in ("Conv", "FusedConv", "NhwcFusedConv"))
    return {"int8_kernels": int8, "float_convs": float_convs, "dequantize_nodes": ops.count("DequantizeLinear")}


class OpenVinoRunner(Runner):
    """OpenVINO on the CPU (optional: `pip install 'edgeres[openvino]'`): an IR (.xml/.bin) or an ONNX model. It
    runs INT8 Q/DQ models with its INT8 kernels (its low-precision transformations fuse the Q/DQ pairs)."""

    name = Backend.OPENVINO.value

    def __init__(self, path: str | Path, *, threads: int | None = None) -> None:
        try:
            import openvino as ov
        except ImportError:
            raise BackendUnavailable("OpenVINO is not installed (pip install 'edgeres[openvino]')") from None
        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"model not found: {path}")
        if path.suffix.lower() == ".xml":   # OpenVINO would try every frontend on anything else, noisily
            with open(path, "rb") as f:
                head = f.read(4096)
            if b"<net" not in head:
                raise ArtifactError(f"{path} is not an OpenVINO IR (no <net> element): expected the .xml that "
                                    "`edgeres build` writes beside its .bin")
            if not path.with_suffix(".bin").is_file():
                raise ArtifactError(f"{path}: its weights {path.with_suffix('.bin').name} are missing")
        core = ov.Core()
        # f32: on CPUs with AVX-512 BF16 / AMX OpenVINO would otherwise run float layers in bf16 by default
        # (logits off by ~1e-2): FP32 stays FP32, and INT8 layers still run OpenVINO's INT8 kernels
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
        if threads is not None:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            model = core.read_model(str(path))
            self.compiled = core.compile_model(model, "CPU", config)
        except Exception as e:  # OpenVINO raises RuntimeError subclasses with multi-line text
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ArtifactError(f"{path} cannot be loaded by OpenVINO ({first[:200]})") from None
        self.request = self.compiled.create_infer_request()
        self.path, self.threads, self.device = str(path), threads, "cpu"
        self.version = ov.get_version()
        inp = model.inputs[0]
        dims = [d.get_length() if d.is_static else None for d in inp.get_partial_shape()]
        if len(dims) != 4:
            raise ArtifactError(f"{path}: expected one NCHW input, found shape {inp.get_partial_shape()}")
        self.batch_dim: int | None = dims[0]
        self.input_shape = tuple(dims[1:]) if all(d is not None for d in dims[1:]) else None
        self.precision = "int8" if self.kernel_report()["int8_kernels"] else "fp32"
        self.meta = {}
        if path.suffix.lower() == ".onnx":
            self.meta = parse_meta(read_metadata(path), str(path))
        elif model.has_rt_info("edgeres_meta"):
            self.meta = parse_meta(json.loads(model.get_rt_info("edgeres_meta").astype(str)), str(path))   # ONNX props

    def kernel_report(self) -> dict[str, int]:
        """Convolution / fully connected layers of the compiled model that run in INT8/UINT8 (the execution
        graph's runtime precision), and the others."""
        int8 = other = 0
        for op in self.compiled.get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            kind = info["layerType"].astype(str) if "layerType" in info else ""
            if kind not in ("Convolution", "FullyConnected", "MatMul", "GroupConvolution"):
                continue
            prec = info["runtimePrecision"].astype(str) if "runtimePrecision" in info else ""
            if prec.lower() in ("i8", "u8"):
                int8 += 1
            else:
                other += 1
        return {"int8_kernels": int8, "float_convs": other}

    def infer_impl(self, x: np.ndarray) -> np.ndarray:
        out = self.request.infer({0: x})
        return np.asarray(out[self.compiled.outputs[0]], dtype=np.float32)

    def close(self) -> None:
        self.request = self.compiled = None


def _ort_providers(providers, available: list[str]) -> list[str]:
    names = [Provider.CPU.value] if not providers else [str(p).lower() for p in providers]
    out = []
    for name in names:
        try:
            ep = ORT_PROVIDER[Provider(name)]
        except ValueError:
            raise ConfigError(f"unknown ONNX Runtime provider {name!r}; choose from "
                              f"{', '.join(p.value for p in Provider)}") from None
        if ep not in available:
            raise BackendUnavailable(f"ONNX Runtime provider {name} ({ep}) is not available here; installed: "
                                     f"{', '.join(available)}")
        out.append(ep)
    if "CPUExecutionProvider" not in out:
        out.append("CPUExecutionProvider")
    return out


def _load_torch(path: Path):
    """(model, meta): an INT8 checkpoint as its fake-quant model, a BN-folded one through fold's own loader,
    anything else through load_model."""
    _, _, rest = read_checkpoint(path)
    if is_quantized_checkpoint(rest):   # an INT8 (NNCF fake-quant) checkpoint from edgeres.quantize
        model, meta, _ = load_quantized(path)
        return model, meta
    if isinstance(rest.get("fold"), dict):   # written by edgeres.fold.save_folded
        loaded = load_folded(path)
        return loaded if isinstance(loaded, tuple) else (loaded, None)
    return load_model(path)


def open_runner(path: str | Path, *, backend: str | Backend | None = None, threads: int | None = None,
                providers: tuple[str, ...] | list[str] | None = None, device: str = "cpu"):
    """Open the runner that fits the artifact's suffix: .onnx, .pt/.pth, .plan/.engine."""
    path = Path(path)
    suffix = path.suffix.lower()
    if threads is not None and not 1 <= int(threads) <= MAX_THREADS:
        raise ConfigError(f"--threads must lie in [1, {MAX_THREADS}], got {threads}")
    if suffix not in SUFFIX_BACKEND:
        raise ArtifactError(f"{path}: unknown artifact type {suffix or '(no suffix)'!r}; expected one of "
                            f"{', '.join(SUFFIX_BACKEND)}")
    kind = SUFFIX_BACKEND[suffix]
    if backend is not None:
        try:
            asked = Backend(backend)
        except ValueError:
            raise ConfigError(f"unknown backend {backend!r}; choose from "
                              f"{', '.join(b.value for b in Backend)}") from None
        if asked in ALSO_RUNS_ON.get(kind, ()):
            kind = asked
        if asked is not kind:
            raise ConfigError(f"{path.name} runs on {kind.value}, not {asked.value}"
                              + (" (ONNX Runtime's TensorRT EP: --provider tensorrt)"
                                 if kind is Backend.ONNXRUNTIME and asked is Backend.TENSORRT else ""))
    require_regular_file(path, "artifact", ArtifactError)
    if device != "cpu" and kind is not Backend.TORCH:
        raise ConfigError(f"a device applies to .pt/.pth checkpoints only; for {path.name} use "
                          + ("--provider cuda" if kind is Backend.ONNXRUNTIME else "the engine's own GPU"))
    if providers and kind is not Backend.ONNXRUNTIME:
        raise ConfigError(f"providers apply to ONNX models only, not to {path.name}")
    if kind is Backend.ONNXRUNTIME:
        return OrtRunner(path, providers=providers, threads=threads)
    if kind is Backend.OPENVINO:
        return OpenVinoRunner(path, threads=threads)
    if kind is Backend.TORCH:
        model, meta = _load_torch(path)
        return TorchRunner(model, device=device, threads=threads, meta=meta, path=str(path))
    try:
        from edgeres.tensorrt.runner import TrtRunner
    except ImportError as e:
        raise BackendUnavailable(f"cannot run {path.name}: TensorRT is not available here ({e}); "
                                 "engines run only where TensorRT and an NVIDIA GPU are present") from None
    try:
        return TrtRunner(path)
    except ImportError as e:
        raise BackendUnavailable(f"cannot run {path.name}: TensorRT is not installed ({e})") from None


def input_shape(runner: Any) -> tuple[int, int, int]:
    """(C, H, W) the runner's model expects: from the ONNX input, ModelMeta or ONNX metadata."""
    shape = getattr(runner, "input_shape", None)
    if shape is not None and all(isinstance(s, int) for s in shape):
        return tuple(int(s) for s in shape)
    meta = getattr(runner, "meta", None)
    if isinstance(meta, dict) and meta.get("input_size") and meta.get("in_channels"):
        size = int(meta["input_size"])
        return (int(meta["in_channels"]), size, size)
    raise ArtifactError(f"cannot tell the input shape of {getattr(runner, 'path', None) or runner.name}; "
                        "give it explicitly (--input-shape C,H,W)")
