"""TensorRT runner with the common runner interface (`infer`, `infer_timed`, `close`, name="tensorrt").

No pycuda: device memory and streams come from Polygraphy's CUDA wrapper (polygraphy.cuda, a ctypes binding
of libcudart); CUDA events and CUDA graphs are called through the same libcudart handle. Uses the named-
tensor API (set_input_shape / set_tensor_address / execute_async_v3, present since TensorRT 8.5) and falls
back to bindings + execute_async_v2 only where v3 is missing. The sidecar is checked before loading.
"""
from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

from edgeres.errors import ArtifactError, BackendUnavailable, ConfigError
from edgeres.runner_base import Runner
from edgeres.tensorrt.sidecar import check_sidecar, read_sidecar
from edgeres.tensorrt.status import tensorrt_status

_CAPTURE_MODE_THREAD_LOCAL = 1  # cudaStreamCaptureModeThreadLocal
NP_DTYPES = {"FLOAT": "float32", "HALF": "float16", "INT8": "int8", "INT32": "int32", "INT64": "int64",
             "BOOL": "bool", "UINT8": "uint8"}


class _Cuda:
    """The few libcudart calls Polygraphy's wrapper does not expose: events and graphs."""

    def __init__(self):
        from polygraphy import cuda

        self.cuda = cuda
        self.lib = cuda.wrapper().handle

    def check(self, status: int, what: str) -> None:
        if status != 0:
            raise BackendUnavailable(f"CUDA error {status} in {what}")

    def event(self) -> int:
        ev = ctypes.c_void_p()
        self.check(self.lib.cudaEventCreate(ctypes.byref(ev)), "cudaEventCreate")
        return ev.value

    def record(self, ev: int, stream: int) -> None:
        self.check(self.lib.cudaEventRecord(ctypes.c_void_p(ev), ctypes.c_void_p(stream)), "cudaEventRecord")

    def elapsed_ms(self, start: int, end: int) -> float:
        self.check(self.lib.cudaEventSynchronize(ctypes.c_void_p(end)), "cudaEventSynchronize")
        ms = ctypes.c_float()
        self.check(self.lib.cudaEventElapsedTime(ctypes.byref(ms), ctypes.c_void_p(start), ctypes.c_void_p(end)),
                   "cudaEventElapsedTime")
        return float(ms.value)

    def destroy_event(self, ev: int) -> None:
        self.lib.cudaEventDestroy(ctypes.c_void_p(ev))

    def capture(self, stream: int, enqueue) -> int:
        """Capture `enqueue()` on `stream` into an instantiated CUDA graph; returns the graph exec handle."""
        self.check(self.lib.cudaStreamBeginCapture(ctypes.c_void_p(stream), _CAPTURE_MODE_THREAD_LOCAL),
                   "cudaStreamBeginCapture")
        graph = ctypes.c_void_p()
        try:
            enqueue()
        finally:
            self.check(self.lib.cudaStreamEndCapture(ctypes.c_void_p(stream), ctypes.byref(graph)),
                       "cudaStreamEndCapture")
        exe = ctypes.c_void_p()
        self.check(self.lib.cudaGraphInstantiateWithFlags(ctypes.byref(exe), graph, ctypes.c_ulonglong(0)),
                   "cudaGraphInstantiateWithFlags")
        self.lib.cudaGraphDestroy(graph)
        return exe.value

    def launch(self, exe: int, stream: int) -> None:
        self.check(self.lib.cudaGraphLaunch(ctypes.c_void_p(exe), ctypes.c_void_p(stream)), "cudaGraphLaunch")

    def destroy_graph(self, exe: int) -> None:
        self.lib.cudaGraphExecDestroy(ctypes.c_void_p(exe))


class TrtRunner(Runner):
    """A TensorRT engine on the GPU. It checks its own batch against the engine's profile (with the engine's input
    dtype) in infer_timed, so infer() goes straight there."""

    name = "tensorrt"

    def __init__(self, engine_path: str | Path, *, cuda_graph: bool = False, check: bool = True,
                 runtime: dict[str, Any] | None = None):
        status = tensorrt_status()
        if not status.available:
            raise BackendUnavailable(status.reason)
        self.engine_path = Path(engine_path)
        self.sidecar = check_sidecar(self.engine_path, runtime) if check else read_sidecar(self.engine_path)
        self.device = status.device or "cuda:0"
        self.cuda_graph = cuda_graph
        import numpy as np
        import tensorrt as trt

        self._np, self._trt = np, trt
        self._cu = _Cuda()
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        if self.sidecar.get("version_compatible"):
            self._runtime.engine_host_code_allowed = True
        self._engine = self._runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if self._engine is None:
            raise ArtifactError(f"TensorRT could not load {self.engine_path} (see the TensorRT log above)")
        self._context = self._engine.create_execution_context()
        self._v3 = hasattr(self._context, "execute_async_v3")
        self._stream = self._cu.cuda.Stream()
        self._inputs, self._outputs = self._io_names()
        if len(self._inputs) != 1 or len(self._outputs) != 1:
            raise ArtifactError(f"{self.engine_path} has {len(self._inputs)} inputs and {len(self._outputs)} "
                                "outputs; edgeres engines have one of each")
        profile = self.sidecar.get("profile") or {}
        self.min_batch = int((profile.get("min") or [1])[0])
        self.max_batch = int((profile.get("max") or [1])[0])
        self.input_shape = tuple(int(d) for d in (profile.get("min") or [])[1:]) or None   # C, H, W
        self.path = self.engine_path
        self.precision = str(self.sidecar.get("precision") or "")
        self._bufs: dict[str, Any] = {}
        self._shape: tuple[int, ...] | None = None
        self._graph: int | None = None
        self._events = (self._cu.event(), self._cu.event(), self._cu.event(), self._cu.event())

    # ------------------------------------------------------------ engine I/O

    def _io_names(self) -> tuple[list[str], list[str]]:
        trt, eng = self._trt, self._engine
        if hasattr(eng, "num_io_tensors"):
            names = [eng.get_tensor_name(i) for i in range(eng.num_io_tensors)]
            ins = [n for n in names if eng.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
            return ins, [n for n in names if n not in ins]
        names = [eng.get_binding_name(i) for i in range(eng.num_bindings)]
        ins = [n for i, n in enumerate(names) if eng.binding_is_input(i)]
        return ins, [n for n in names if n not in ins]

    def _dtype(self, name: str):
        """Our own DataType -> NumPy map: tensorrt.nptype on 8.5.2 builds its table with `np.bool`, absent from
        NumPy 1.24-1.26 (what JetPack 5.1's Python 3.8 gets from pip), so every call raises there."""
        eng = self._engine
        dt = eng.get_tensor_dtype(name) if hasattr(eng, "get_tensor_dtype") else \
            eng.get_binding_dtype(eng.get_binding_index(name))
        key = getattr(dt, "name", str(dt).rsplit(".", 1)[-1])
        if key not in NP_DTYPES:
            raise ArtifactError(f"{self.engine_path}: tensor {name} has TensorRT type {key}, which edgeres does not "
                                "read")
        return self._np.dtype(NP_DTYPES[key])

    def _prepare(self, shape: tuple[int, ...]) -> None:
        """(Re)allocate buffers and bind addresses for an input shape; re-capture the CUDA graph."""
        if shape == self._shape:
            return
        cuda, ctx = self._cu.cuda, self._context
        inp, out = self._inputs[0], self._outputs[0]
        if self._v3:
            ctx.set_input_shape(inp, shape)
            out_shape = tuple(ctx.get_tensor_shape(out))
        else:
            ctx.set_binding_shape(self._engine.get_binding_index(inp), shape)
            out_shape = tuple(ctx.get_binding_shape(self._engine.get_binding_index(out)))
        for buf in self._bufs.values():
            buf.free()
        # our dtypes, never DeviceArray.dtype (deprecated in Polygraphy 0.49, another type from 0.50)
        self._io_dtypes = {inp: self._dtype(inp), out: self._dtype(out)}
        self._out_shape = out_shape
        self._bufs = {inp: cuda.DeviceArray(shape=shape, dtype=self._io_dtypes[inp]),
                      out: cuda.DeviceArray(shape=out_shape, dtype=self._io_dtypes[out])}
        if self._v3:
            for name, buf in self._bufs.items():
                ctx.set_tensor_address(name, buf.ptr)
        self._shape = shape
        if self._graph is not None:
            self._cu.destroy_graph(self._graph)
            self._graph = None
        if self.cuda_graph:
            self._enqueue()  # one plain run first: TensorRT may allocate or update state on a new shape
            self._stream.synchronize()
            self._graph = self._cu.capture(self._stream.ptr, self._enqueue)

    def _enqueue(self) -> None:
        ctx, stream = self._context, self._stream.ptr
        if self._v3:
            ok = ctx.execute_async_v3(stream)
        else:
            bindings = [0] * self._engine.num_bindings
            for name, buf in self._bufs.items():
                bindings[self._engine.get_binding_index(name)] = buf.ptr
            ok = ctx.execute_async_v2(bindings, stream)
        if not ok:
            raise ArtifactError(f"TensorRT failed to run {self.engine_path}")

    def _compute(self) -> None:
        if self._graph is not None:
            self._cu.launch(self._graph, self._stream.ptr)
        else:
            self._enqueue()

    # ------------------------------------------------------------ runner interface

    def infer_timed(self, x) -> tuple[Any, dict[str, float]]:
        np = self._np
        x = np.ascontiguousarray(x, dtype=self._dtype(self._inputs[0]))
        if x.ndim != 4:
            raise ConfigError(f"TensorRT runner expects NCHW input, got shape {x.shape}")
        if not self.min_batch <= x.shape[0] <= self.max_batch:
            raise ConfigError(f"batch {x.shape[0]} is outside the engine's profile {self.min_batch}..{self.max_batch}"
                              f"; rebuild with `edgeres compile --batch`")
        self._prepare(tuple(x.shape))
        inp, out = self._bufs[self._inputs[0]], self._bufs[self._outputs[0]]
        host_out = np.empty(self._out_shape, dtype=self._io_dtypes[self._outputs[0]])
        e0, e1, e2, e3 = self._events
        s = self._stream.ptr
        self._cu.record(e0, s)
        inp.copy_from(x, stream=self._stream)
        self._cu.record(e1, s)
        self._compute()
        self._cu.record(e2, s)
        out.copy_to(host_out, stream=self._stream)
        self._cu.record(e3, s)
        self._stream.synchronize()
        times = {"h2d_ms": self._cu.elapsed_ms(e0, e1), "compute_ms": self._cu.elapsed_ms(e1, e2),
                 "d2h_ms": self._cu.elapsed_ms(e2, e3)}
        return host_out.astype(np.float32, copy=False), times

    def infer(self, x):
        return self.infer_timed(x)[0]

    infer_impl = infer

    def close(self) -> None:
        if getattr(self, "_graph", None) is not None:
            self._cu.destroy_graph(self._graph)
            self._graph = None
        for buf in getattr(self, "_bufs", {}).values():
            buf.free()
        self._bufs = {}
        for ev in getattr(self, "_events", ()):
            self._cu.destroy_event(ev)
        self._events = ()
        if getattr(self, "_stream", None) is not None:
            self._stream.free()
            self._stream = None
        self._context = self._engine = self._runtime = None


