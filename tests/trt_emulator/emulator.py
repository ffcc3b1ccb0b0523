"""A TensorRT EMULATOR for tests: an importable `tensorrt` module per TensorRT version, no GPU.

Its surface is generated from NVIDIA's own binding tables (tests/trt_emulator/api/<version>/python_api.json,
copied from ../shared/trt-api): a class, method, property, enum member or module function that version does
not have raises AttributeError, as the real bindings do; a name the version has but the emulator does not
implement is present (hasattr is True) and raises NotImplementedError when called. Behaviour is emulated where
edgeres relies on it, with the rules the real builder applies:

- ONNX parsing: 8.x networks need NetworkDefinitionCreationFlag.EXPLICIT_BATCH ("Network must have explicit
  batch dimensions"); ops outside the emulated importer list fail ("No importer registered for op");
  Q/DQ must be signed INT8 with zero-point 0 (TensorRT's QuantizeLinear/DequantizeLinear importers).
  Errors are reported through the parser's own API (parse returns False, num_errors / get_error).
- build_serialized_network returns None (and logs an error) on failure:
  * a Q/DQ network on weakly typed 8.x/10.x without BuilderFlag.INT8;
  * a calibrator with a Q/DQ network: the calibrator is ignored with a warning (explicit precision);
  * implicit INT8 (INT8 flag, no Q/DQ) without a calibrator; tensors missing from the calibration cache are
    warned about ("Missing scale and zero-point ... fall back to non-int8");
  * DLA: default_device_type DLA needs num_DLA_cores > 0 (0 on desktop GPUs) and a DLA_core that exists,
    FP16 or INT8, static shapes (profile min = opt = max) unless GPU_FALLBACK (then the layers run on the
    GPU and the engine records 0 DLA layers), no explicit (Q/DQ) quantization on DLA before 8.6;
  * a dynamic input without an optimization profile; strongly typed networks with FP16/INT8 flags.
- The engine really runs: its bytes carry the ONNX, and execute_async_v3/_v2 run it with ONNX Runtime on
  the buffers bound with set_tensor_address (host memory, through the libcudart stand-in, cudart.c),
  enqueued with cudaLaunchHostFunc so CUDA-graph capture works. FP16 and implicit-INT8 engines compute in
  FP32 (the Q/DQ ONNX computes its INT8 semantics through ONNX Runtime) — numbers are real, precision is not
  emulated bit for bit.
- deserialize_cuda_engine returns None with an error for an engine from another TensorRT version (unless
  version-compatible and engine_host_code_allowed), another compute capability, or a DLA engine on a device
  without DLA.
- nptype is the version's own pure-Python function; on 8.5.2 it builds its mapping with `np.bool`, which
  NumPy 1.24-1.26 do not have: with the JetPack 5.1 profile (numpy="1.24") every call raises AttributeError.

Configuration (environment, so subprocesses see the same device): EDGERES_TRT_EMULATOR_VERSION (api folder:
8.5.2, 8.6, 10.3, 10.16, 11.0), EDGERES_TRT_EMULATOR_DLA_CORES (default 0), EDGERES_EMULATED_CC (default
8.6), EDGERES_TRT_EMULATOR_NUMPY (emulate that NumPy's attribute set in nptype), EDGERES_EMULATED_CUDART
(path of the compiled stand-in), EDGERES_EMULATED_JETSON (orin | xavier: a Jetson), EDGERES_EMULATED_MACHINE
(CPU architecture; default this machine's).

Platform and portability (each from NVIDIA's Support Matrix, Engine Portability, and the DLA pages): engines
record OS, CPU architecture and Jetson-or-not and are refused elsewhere; AMPERE_PLUS engines load on any compute
capability >= 8.0 off Jetson (and are refused to build on a Jetson); version-compatible engines load on newer
runtimes per its own table (same major; 8 -> 10; 10 -> 11); INT8 constants into DequantizeLinear fail to build
before 10.0; DLA placement follows the DLA layer table (average Reduce, MatrixMultiply and 2D Shuffles fall back
with GPU_FALLBACK and fail without it), recording the GPU layers in the engine.
"""
from __future__ import annotations

import ctypes
import json
import os
import sys
import types
from pathlib import Path

API = Path(__file__).resolve().parent / "api"
VERSIONS = ("8.5.2", "8.6", "10.3", "10.16", "11.0", "11.4.1")
# emulated version -> the binding table it uses: NVIDIA publishes no 11.4.1 table in ../shared/trt-api, so 11.4.1 is
# emulated with 11.0's surface (names) under its own version number and 11.4.1's DLA rules (_DLA_TABLE). ASSUMPTION:
# the Python names 11.4.1 uses here (DLA, timing cache, parser report) are those 11.0 already has.
SURFACE = {"11.4.1": "11.0"}
MAGIC = b"EDGERES-EMULATED-TENSORRT-ENGINE\n"
EMULATOR_NAME = "edgeres TensorRT emulator (tests)"
_CNN_OPS = {"Conv", "Relu", "Add", "MaxPool", "AveragePool", "GlobalAveragePool", "Gemm", "MatMul",
            "Flatten", "Reshape", "BatchNormalization", "QuantizeLinear", "DequantizeLinear", "Constant"}
_IMPORTERS = _CNN_OPS | {"Sigmoid", "Mul", "Sub", "Div", "Concat", "Transpose", "Softmax", "Identity", "Pad",
                         "ReduceMean", "Clip", "Shape", "Gather", "Unsqueeze", "Squeeze", "Cast", "LeakyRelu"}
_LAYER_TYPES = {"Conv": "CONVOLUTION", "Relu": "ACTIVATION", "Clip": "ACTIVATION", "Sigmoid": "ACTIVATION",
                "LeakyRelu": "ACTIVATION", "Add": "ELEMENTWISE", "Mul": "ELEMENTWISE", "Sub": "ELEMENTWISE",
                "Div": "ELEMENTWISE", "MaxPool": "POOLING", "AveragePool": "POOLING", "GlobalAveragePool": "REDUCE",
                "ReduceMean": "REDUCE", "Gemm": "MATRIX_MULTIPLY", "MatMul": "MATRIX_MULTIPLY",
                "Flatten": "SHUFFLE", "Reshape": "SHUFFLE", "Transpose": "SHUFFLE", "Squeeze": "SHUFFLE",
                "Unsqueeze": "SHUFFLE", "BatchNormalization": "SCALE", "QuantizeLinear": "QUANTIZE",
                "DequantizeLinear": "DEQUANTIZE", "Constant": "CONSTANT", "Concat": "CONCATENATION",
                "Softmax": "SOFTMAX", "Identity": "IDENTITY", "Pad": "PADDING", "Shape": "SHAPE",
                "Gather": "GATHER", "Cast": "CAST"}


def _vt(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in str(text).split(".") if p.isdigit())


class NotEmulated(NotImplementedError):
    pass


# ------------------------------------------------------------------------------------------- surface machinery
class _SurfaceMeta(type):
    """Class-level attribute access (trt.Logger.ERROR, trt.IInt8EntropyCalibrator2.__init__) is checked too."""

    def __getattribute__(cls, name):
        if not name.startswith("_"):
            allowed = type.__getattribute__(cls, "_allowed")()
            if name not in allowed:
                raise AttributeError(f"type object '{type.__getattribute__(cls, '__name__')}' has no attribute "
                                     f"'{name}'")
        return type.__getattribute__(cls, name)


class _Surface(metaclass=_SurfaceMeta):
    _emulated = True
    _names: frozenset = frozenset()
    _cache: dict = {}

    @classmethod
    def _allowed(cls) -> frozenset:
        key = cls
        got = _Surface._cache.get(key)
        if got is None:
            names = set(cls._names)
            for klass in cls.__mro__:   # a user's subclass (a calibrator) adds its own names
                if not klass.__dict__.get("_emulated") and klass is not object:
                    names.update(n for n in klass.__dict__ if not n.startswith("_"))
            got = _Surface._cache[key] = frozenset(names)
        return got

    def __getattribute__(self, name):
        if not name.startswith("_"):
            if name not in type(self)._allowed() and name not in object.__getattribute__(self, "__dict__"):
                raise AttributeError(f"'tensorrt.{type(self).__name__}' object has no attribute '{name}'")
            try:
                return object.__getattribute__(self, name)
            except AttributeError:   # the version has it (hasattr is True, as on the real bindings); using it says
                return _not_emulated_fn(f"{type(self).__name__}.{name}", "this version")   # it is not emulated
        return object.__getattribute__(self, name)

    def __setattr__(self, name, value):
        if not name.startswith("_") and name not in type(self)._allowed():
            raise AttributeError(f"'tensorrt.{type(self).__name__}' object has no attribute '{name}'")
        object.__setattr__(self, name, value)


class _EnumValue:
    __slots__ = ("enum", "name", "value")

    def __init__(self, enum: str, name: str, value: int):
        self.enum, self.name, self.value = enum, name, value

    def __int__(self):
        return self.value

    __index__ = __int__

    def __eq__(self, other):
        return isinstance(other, _EnumValue) and (other.enum, other.value) == (self.enum, self.value)

    def __hash__(self):
        return hash((self.enum, self.value))

    def __repr__(self):
        return f"<{self.enum}.{self.name}: {self.value}>"

    __str__ = lambda self: f"{self.enum}.{self.name}"  # noqa: E731


def _make_enum(name: str, members: list[str], values: dict) -> type:
    used = {v for v in values.values() if v is not None}
    ns: dict = {"_names": frozenset(members), "__members__": {}}
    nxt = -1
    for m in members:
        v = values.get(m)
        if v is None:
            while nxt in used:
                nxt -= 1
            v, nxt = nxt, nxt - 1
        ns[m] = ns["__members__"][m] = _EnumValue(name, m, int(v))
    return _SurfaceMeta(name, (_Surface,), ns)


# ------------------------------------------------------------------------------------------- the emulator
def build_module(version: str | None = None) -> types.ModuleType:
    """A fresh `tensorrt` module for one api folder (default: $EDGERES_TRT_EMULATOR_VERSION)."""
    version = version or os.environ.get("EDGERES_TRT_EMULATOR_VERSION", "10.3")
    table = json.loads((API / SURFACE.get(version, version) / "python_api.json").read_text())
    full = version if version in SURFACE else table["_about"]["tensorrt_version_from_NvInferVersion_h"]
    major = _vt(full)[0]
    mod = types.ModuleType("tensorrt", f"{EMULATOR_NAME}: TensorRT {full} surface")
    state = {"version": full, "major": major, "table": table}
    enums = {n: _make_enum(n, m, table["enum_values"].get(n) or {}) for n, m in table["enums"].items()}

    def E(enum: str, member: str):  # noqa: N802 - an enum member this version must have
        return getattr(enums[enum], member)

    # ---------------------------------------------------------------- logger
    class ILogger(_Surface):
        def __init__(self, min_severity=None):
            self._min_severity = min_severity
            self._messages = []

        def log(self, severity, msg):
            severity = getattr(severity, "name", severity)
            self._messages.append((severity, msg))
            if severity in ("ERROR", "INTERNAL_ERROR", "WARNING") or os.environ.get("EDGERES_TRT_EMULATOR_VERBOSE"):
                print(f"[TRT] [{severity[0]}] {msg}", file=sys.stderr)

    sev = enums["ILogger.Severity"]
    for m in ("INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE"):
        setattr(ILogger, m, getattr(sev, m))
    ILogger.Severity = sev

    class Logger(ILogger):
        pass

    # ---------------------------------------------------------------- network
    class Dims(tuple):
        pass

    class ITensor(_Surface):
        def __init__(self, name, shape, dtype, is_input):
            self.name, self.shape, self.dtype = name, Dims(shape), dtype
            self._input = is_input

        @property
        def is_network_input(self):
            return self._input

        @property
        def is_network_output(self):
            return not self._input

    class ILayer(_Surface):
        def __init__(self, name, type_, op):
            self.name, self.type = name, type_
            self._op = op
            self._inputs, self._outputs, self._index = [], [], -1

    class INetworkDefinition(_Surface):
        def __init__(self, flags):
            self._flags, self._inputs, self._outputs, self._layers = flags, [], [], []
            self._onnx = None
            self._names_all = []
            self._int8_weights = []     # DequantizeLinear nodes fed by INT8 constant weights
            self._dummy_ranges = False  # trtexec --int8 without --calib: per-tensor placeholder ranges

        num_layers = property(lambda self: len(self._layers))
        num_inputs = property(lambda self: len(self._inputs))
        num_outputs = property(lambda self: len(self._outputs))

        def get_layer(self, i):
            return self._layers[i]

        def get_input(self, i):
            return self._inputs[i]

        def get_output(self, i):
            return self._outputs[i]

        def _strongly_typed(self):
            if major >= 11:
                return True
            if "STRONGLY_TYPED" in enums["NetworkDefinitionCreationFlag"]._names:
                return bool(self._flags & (1 << int(E("NetworkDefinitionCreationFlag", "STRONGLY_TYPED"))))
            return False

        def _explicit_batch(self):
            if major >= 10:
                return True
            return bool(self._flags & (1 << int(E("NetworkDefinitionCreationFlag", "EXPLICIT_BATCH"))))

    class ParserError(_Surface):
        def __init__(self, desc, node=-1, code=1):
            self._desc, self._node, self._code = desc, node, code

        def desc(self):
            return self._desc

        def node(self):
            return self._node

        def code(self):
            return self._code

        def __str__(self):
            return f"In node {self._node} (parse): {self._desc}"

    class OnnxParser(_Surface):
        def __init__(self, network, logger):
            self._network, self._logger, self._errors = network, logger, []
            self._pflags, self._config, self._subgraphs = set(), None, []

        def set_flag(self, flag):
            self._pflags.add(flag.name)

        def get_flag(self, flag):
            return flag.name in self._pflags

        def set_builder_config(self, config):
            self._config = config
            return True

        def supports_model_v2(self, model, path=None):
            """The capability report: ONNX nodes grouped into runs that the target can / cannot run. With
            REPORT_CAPABILITY_DLA and a DLA builder config (NVIDIA: set before parsing), 'can' is DLA's own table
            as this emulator reads it (_dla_runs, strongly typed FP32 rule included)."""
            net = INetworkDefinition(1 << int(E("NetworkDefinitionCreationFlag", "STRONGLY_TYPED")) if major < 11
                                     else 0)
            sub = OnnxParser(net, self._logger)
            if not sub.parse(model):
                self._subgraphs = []
                return False
            dla = "REPORT_CAPABILITY_DLA" in self._pflags and self._config is not None and \
                self._config._device_type == E("DeviceType", "DLA")
            runs = []
            for lay in net._layers:
                ok = not dla or _dla_layer_problem(lay, net, self._network._strongly_typed() or major >= 11) is None
                if runs and runs[-1][0] == ok:
                    runs[-1][1].append(lay._index)
                else:
                    runs.append((ok, [lay._index]))
            self._subgraphs = runs
            return all(ok for ok, _ in runs)

        num_subgraphs = property(lambda self: len(self._subgraphs))

        def is_subgraph_supported(self, index):
            return self._subgraphs[index][0]

        def get_subgraph_nodes(self, index):
            return list(self._subgraphs[index][1])

        @property
        def num_errors(self):
            return len(self._errors)

        def get_error(self, i):
            return self._errors[i]

        def clear_errors(self):
            self._errors = []

        def parse_from_file(self, path):
            try:
                data = Path(path).read_bytes()
            except OSError as e:
                self._errors.append(ParserError(f"Failed to open file {path}: {e}"))
                return False
            return self.parse(data)

        def parse(self, model, path=None):
            import onnx
            from onnx import numpy_helper

            net = self._network
            if not net._explicit_batch():
                self._errors.append(ParserError("Network must have explicit batch dimensions (create the network "
                                                "with NetworkDefinitionCreationFlag.EXPLICIT_BATCH)"))
                return False
            try:
                proto = onnx.load_from_string(bytes(model))
            except Exception as e:  # noqa: BLE001
                self._errors.append(ParserError(f"Failed to parse ONNX model: {e}"))
                return False
            g = proto.graph
            inits = {i.name: i for i in g.initializer}
            consts = {n.output[0]: a.t for n in g.node if n.op_type == "Constant" for a in n.attribute
                      if a.name == "value"}
            for idx, node in enumerate(g.node):
                if node.op_type not in _IMPORTERS:
                    self._errors.append(ParserError(f"No importer registered for op: {node.op_type}", idx))
                    return False
                if node.op_type in ("QuantizeLinear", "DequantizeLinear") and major < 10 and \
                        (len(node.input) < 3 or not node.input[2]):
                    self._errors.append(ParserError(f"This version of TensorRT requires 3 inputs for the "
                                                    f"{node.op_type} operator.", idx))
                    return False
                if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2:
                    zp = inits.get(node.input[2], consts.get(node.input[2]))
                    if zp is not None:
                        arr = numpy_helper.to_array(zp)
                        if arr.dtype.name != "int8":
                            self._errors.append(ParserError(f"{node.op_type}: zero-point must be INT8, got "
                                                            f"{arr.dtype.name} (only signed INT8 Q/DQ is supported)",
                                                            idx))
                            return False
                        if (arr != 0).any():
                            self._errors.append(ParserError(f"{node.op_type}: non-zero zero-point is not supported",
                                                            idx))
                            return False
                net._layers.append(ILayer(node.name or f"(Unnamed Layer* {idx}) [{node.op_type}]",
                                          E("LayerType", _LAYER_TYPES.get(node.op_type, "IDENTITY")
                                            if _LAYER_TYPES.get(node.op_type, "IDENTITY") in enums["LayerType"]._names
                                            else "IDENTITY"), node.op_type))
                net._layers[-1]._attrs = {a.name: list(a.ints) for a in node.attribute if a.ints}
                net._layers[-1]._inputs = [x for x in node.input if x and x not in inits]
                net._layers[-1]._outputs = list(node.output)
                net._layers[-1]._index = idx
                w = inits.get(node.input[0]) if node.input else None
                if node.op_type == "DequantizeLinear" and w is not None and w.data_type == onnx.TensorProto.INT8 \
                        and len(w.dims) > 1:
                    net._int8_weights.append(node.name or node.input[0])
                if node.op_type == "Gemm":   # the parser builds MatrixMultiply + bias ElementWise: a tensor of its own
                    net._names_all.append(f"(Unnamed Layer* {len(net._layers) - 1}) [Matrix Multiply]_output")
                net._names_all += [o for o in node.output if o]
            for vi in g.input:
                if vi.name in inits:
                    continue
                dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1
                             for d in vi.type.tensor_type.shape.dim)
                net._inputs.append(ITensor(vi.name, dims, E("DataType", "FLOAT"), True))
            for vi in g.output:
                dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1
                             for d in vi.type.tensor_type.shape.dim)
                net._outputs.append(ITensor(vi.name, dims, E("DataType", "FLOAT"), False))
            net._onnx = bytes(model)
            return True

    # ---------------------------------------------------------------- builder config and profiles
    class IOptimizationProfile(_Surface):
        def __init__(self):
            self._shapes = {}

        def set_shape(self, name, min, opt, max):  # noqa: A002 - TensorRT's own argument names
            self._shapes[name] = (tuple(min), tuple(opt), tuple(max))

        def get_shape(self, name):
            return [Dims(s) for s in self._shapes.get(name, ((), (), ()))]

        def __bool__(self):
            return all(all(a <= b <= c for a, b, c in zip(*s)) for s in self._shapes.values())

    class IHostMemory(bytes):
        _emulated = True

        @property
        def nbytes(self):
            return len(self)

    class ITimingCache(_Surface):
        """Tied to the TensorRT version, compute capability and platform that made it (NVIDIA: a timing cache from
        another device or version is refused unless ignore_mismatch); this emulator's reading."""

        def __init__(self, data=b""):
            self._data = bytes(data)
            head, _, body = self._data.partition(b"\n")
            self._origin = json.loads(body) if head == b"EDGERES-EMULATED-TIMING-CACHE" and body else None
            self._state = "loaded" if self._origin else "new"

        def _mismatch(self):
            here = _timing_origin(state["version"])
            return self._origin is not None and self._origin != here

        def serialize(self):
            return IHostMemory(b"EDGERES-EMULATED-TIMING-CACHE\n" + json.dumps(_timing_origin(state["version"]),
                                                                                sort_keys=True).encode())

        def combine(self, other, ignore_mismatch):
            return True

        def reset(self):
            return True

    class IBuilderConfig(_Surface):
        def __init__(self):
            self._flags, self._profiles, self._pools = set(), [], {}
            object.__setattr__(self, "_calibrator", None)
            self._device_type = E("DeviceType", "GPU")
            self._dla_core = -1
            self._timing = None
            self._hw = None
            self._opt_level = 3   # TensorRT's default builder optimization level

        def set_flag(self, flag):
            self._flags.add(flag.name)

        def clear_flag(self, flag):
            self._flags.discard(flag.name)

        def get_flag(self, flag):
            return flag.name in self._flags

        def set_memory_pool_limit(self, pool, size):
            self._pools[pool.name] = int(size)

        def get_memory_pool_limit(self, pool):
            return self._pools.get(pool.name, 0)

        def add_optimization_profile(self, profile):
            if not profile:
                return -1
            self._profiles.append(profile)
            return len(self._profiles) - 1

        num_optimization_profiles = property(lambda self: len(self._profiles))

        def set_calibration_profile(self, profile):
            return bool(profile)

        int8_calibrator = property(lambda self: self._calibrator,
                                   lambda self, c: object.__setattr__(self, "_calibrator", c))
        default_device_type = property(lambda self: self._device_type,
                                       lambda self, d: object.__setattr__(self, "_device_type", d))
        DLA_core = property(lambda self: self._dla_core, lambda self, c: object.__setattr__(self, "_dla_core", c))
        hardware_compatibility_level = property(lambda self: self._hw,
                                                lambda self, v: object.__setattr__(self, "_hw", v))

        def create_timing_cache(self, data):
            return ITimingCache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            if cache._mismatch() and not ignore_mismatch:
                print(f"[TRT] [E] timing cache from {cache._origin} does not match this TensorRT/device "
                      f"({_timing_origin(state['version'])}) and ignore_mismatch is False", file=sys.stderr)
                return False
            self._timing = cache
            return True

        builder_optimization_level = property(lambda self: self._opt_level,
                                              lambda self, v: object.__setattr__(self, "_opt_level", int(v)))

        def get_timing_cache(self):
            return self._timing

        def can_run_on_DLA(self, layer):  # noqa: N802 - TensorRT's name
            return _dla_runs(layer) is None and self._device_type == E("DeviceType", "DLA")

    class IInt8Calibrator(_Surface):
        def __init__(self):
            pass

    calibrators = {n: type(n, (IInt8Calibrator,), {}) for n in
                   ("IInt8LegacyCalibrator", "IInt8EntropyCalibrator", "IInt8EntropyCalibrator2",
                    "IInt8MinMaxCalibrator")}

    # ---------------------------------------------------------------- builder
    class Builder(_Surface):
        def __init__(self, logger):
            self._logger = logger

        @property
        def num_DLA_cores(self):  # noqa: N802
            return _dla_cores(state["version"])

        platform_has_fast_fp16 = property(lambda self: True)
        platform_has_fast_int8 = property(lambda self: True)

        def create_network(self, flags=0):
            return INetworkDefinition(int(flags))

        def create_builder_config(self):
            return IBuilderConfig()

        def create_optimization_profile(self):
            return IOptimizationProfile()

        def _fail(self, msg):
            self._logger.log("ERROR", msg)
            return None

        def build_serialized_network(self, network, config):
            lg = self._logger
            flags = config._flags
            typed = network._strongly_typed()
            layers = network._layers
            qdq = any(lay._op in ("QuantizeLinear", "DequantizeLinear") for lay in layers)
            if network._onnx is None:
                return self._fail("Network has no layers (parse an ONNX first)")
            if typed and ({"FP16", "INT8", "BF16", "FP8"} & flags):
                return self._fail("BuilderFlag FP16/INT8 cannot be used with a strongly typed network")
            if qdq and not typed and "INT8" not in flags:
                return self._fail("Int8 precision has been set for a layer or layer output, but int8 is not "
                                  "configured in the builder (Q/DQ network without BuilderFlag.INT8)")
            if network._int8_weights and major < 10:
                # ASSUMPTION (unconfirmed on a device; edgeres's versions.SOURCES["int8_weight_forms"] says the same):
                # TensorRT < 10: IConstantLayer makes weights other than kINT32 real-valued tensors, and an
                # IDequantizeLayer's input must be INT8 (8.5/8.6 API docs); pre-quantized INT8 weights into DQ are
                # documented from 10.0 (developer guide, Explicit Quantization > Quantized Weights)
                return self._fail(f"DequantizeLinear {network._int8_weights[0]}: its input is an INT8 constant, "
                                  "which TensorRT < 10 imports as real-valued weights; a Dequantize input must be INT8 "
                                  "(emulator ASSUMPTION, not confirmed on TensorRT 8.x)")
            hw = config._hw
            if hw is not None and hw.name == "AMPERE_PLUS":
                if _jetson():
                    return self._fail("Hardware compatibility (AMPERE_PLUS) is not supported on this platform "
                                      "(Jetson/JetPack)")
                if _vt(_cc())[0] < 8:
                    return self._fail("Hardware compatibility (AMPERE_PLUS) needs an Ampere or newer GPU to build on")
            calib = config._calibrator
            if calib is not None and qdq:
                lg.log("WARNING", "Calibrator won't be used in explicit precision mode. Use quantization aware "
                                  "training to generate network with Quantize/Dequantize nodes.")
            scales, calibration = {}, None
            if "INT8" in flags and not qdq and calib is None and network._dummy_ranges:
                calibration = "placeholder dynamic ranges (no calibrator)"
            elif "INT8" in flags and not qdq:
                if calib is None:
                    return self._fail("Calibration failure occurred with no scaling factors detected. This could be "
                                      "due to no int8 calibrator or insufficient custom scales for network layers.")
                cache = calib.read_calibration_cache()
                want = f"TRT-{_tag(state['version'])}-"
                header, _, body = bytes(cache or b"").partition(b"\n")
                usable = bool(cache) and header.decode(errors="replace").startswith(want)
                if cache and not usable:
                    lg.log("WARNING", f"Calibration cache header {header.decode(errors='replace')!r} does not match "
                                      f"this TensorRT ({want}...): the cache is ignored")
                if not usable:
                    if calib.get_batch([network._inputs[0].name]) is None:
                        return self._fail("Calibration failure occurred with no scaling factors detected. This could "
                                          "be due to no int8 calibrator or insufficient custom scales for network "
                                          "layers.")
                    calibration = "calibrated on the calibrator's batches"
                else:
                    calibration = "calibration cache"
                    for line in body.decode(errors="replace").splitlines():
                        if ":" in line:
                            name, _, hexval = line.rpartition(":")
                            scales[name.strip()] = hexval.strip()
                    missing = [t for t in network._names_all + [i.name for i in network._inputs] if t not in scales]
                    for t in missing:
                        lg.log("WARNING", f"Missing scale and zero-point for tensor {t}, expect fall back to "
                                          "non-int8 implementation for any layer consuming or producing given tensor")
                    if missing and config._device_type == E("DeviceType", "DLA") and "FP16" not in flags \
                            and "GPU_FALLBACK" not in flags:
                        return self._fail(f"DLA: tensor {missing[0]} has no INT8 scale and FP16 is not enabled; DLA "
                                          "runs INT8 or FP16 only")
            # shapes and profiles
            inp = network._inputs[0]
            dynamic = any(d < 0 for d in inp.shape)
            if dynamic and not config._profiles:
                return self._fail(f"Network has dynamic or shape inputs, but no optimization profile has been "
                                  f"defined (input {inp.name})")
            if config._profiles:
                mn, opt, mx = config._profiles[0]._shapes.get(inp.name, (inp.shape,) * 3)
            else:
                mn = opt = mx = tuple(inp.shape)
            # workspace: this emulator's tactics need scratch of 8 input activations at the largest batch; a smaller
            # WORKSPACE limit leaves a layer without an implementation and the build fails (as TensorRT's does when
            # no tactic fits)
            limit = config._pools.get("WORKSPACE")
            need = 8 * 4 * max(1, int(mx[0]) if mx else 1) * _volume(inp.shape[1:])
            if limit is not None and limit < need:
                return self._fail(f"10: Could not find any implementation for node {layers[0].name} due to "
                                  f"insufficient workspace ({limit} bytes; this network needs {need})")
            # DLA
            device_type, on_dla, on_gpu, gpu_names = "GPU", 0, len(layers), None
            if config._device_type == E("DeviceType", "DLA"):
                cores = self.num_DLA_cores
                if cores < 1:
                    return self._fail("DLA is not available on this device (num_DLA_cores = 0); "
                                      "default_device_type DLA cannot be used")
                if not 0 <= config._dla_core < cores:
                    return self._fail(f"DLA core {config._dla_core} does not exist (this device has {cores})")
                if not ({"FP16", "INT8"} & flags) and not typed:
                    return self._fail("DLA supports only FP16 and INT8 precision: set BuilderFlag.FP16 or INT8")
                if qdq and _vt(state["version"])[:2] < (8, 6):
                    return self._fail(f"TensorRT {state['version']}: explicit quantization (Q/DQ) networks are not "
                                      "supported on DLA")
                static = mn == opt == mx
                fallback = "GPU_FALLBACK" in flags
                if not static and not fallback:
                    return self._fail("DLA does not support dynamic shapes: the optimization profile must have "
                                      "min = opt = max (or set BuilderFlag.GPU_FALLBACK)")
                if not _dla_cores(state["version"]):
                    return self._fail(f"DLA is not supported by TensorRT {state['version']} on this platform")
                why = {lay.name: _dla_layer_problem(lay, network, typed) for lay in layers}
                dla_layers = [lay for lay in layers if why[lay.name] is None] if static else []
                if len(dla_layers) < len(layers) and not fallback:
                    bad = next(lay for lay in layers if why[lay.name] is not None)
                    return self._fail(f"Layer {bad.name} cannot run on DLA ({why[bad.name]}) and GPU_FALLBACK is "
                                      "not set")
                if not dla_layers:
                    lg.log("WARNING", "No layer runs on DLA (dynamic shapes): every layer falls back to the GPU")
                device_type, on_dla, on_gpu = "DLA", len(dla_layers), len(layers) - len(dla_layers)
                gpu_names = [lay.name for lay in layers if lay not in dla_layers]
            header = {"trt_version": state["version"], "compute_capability": _cc(), "platform": _platform(),
                      "hardware_compatibility": hw.name if hw is not None else None, "gpu_layers": gpu_names,
                      "version_compatible": "VERSION_COMPATIBLE" in flags, "flags": sorted(flags),
                      "strongly_typed": typed, "explicit_quantization": qdq, "calibration_scales": len(scales),
                      "calibration": calibration,
                      "device_type": device_type, "dla_core": config._dla_core if device_type == "DLA" else None,
                      "layers_on_dla": on_dla, "layers_on_gpu": on_gpu,
                      # the builder configuration this engine was built with (both device paths must agree)
                      "config": {"flags": sorted(flags), "workspace": limit, "strongly_typed": typed,
                                 "builder_optimization_level": config._opt_level,
                                 "timing_cache": None if config._timing is None else config._timing._state,
                                 "profile": [list(mn), list(opt), list(mx)], "device_type": device_type,
                                 "dla_core": config._dla_core if device_type == "DLA" else None},
                      "input": {"name": inp.name, "shape": list(inp.shape), "profile": [list(mn), list(opt),
                                                                                        list(mx)]},
                      "output": {"name": network._outputs[0].name, "shape": list(network._outputs[0].shape)}}
            return IHostMemory(MAGIC + json.dumps(header).encode() + b"\n" + network._onnx)

    # ---------------------------------------------------------------- runtime, engine, context
    class Runtime(_Surface):
        def __init__(self, logger):
            self._logger = logger
            object.__setattr__(self, "_host_code", False)
            object.__setattr__(self, "_dla_core", None)

        DLA_core = property(lambda self: self._dla_core, lambda self, c: object.__setattr__(self, "_dla_core", int(c)))

        engine_host_code_allowed = property(lambda self: self._host_code,
                                            lambda self, v: object.__setattr__(self, "_host_code", bool(v)))

        def deserialize_cuda_engine(self, data):
            data = bytes(data)
            if not data.startswith(MAGIC):
                self._logger.log("ERROR", "1: [stdArchiveReader.cpp] Magic tag does not match: not a serialized "
                                          "engine")
                return None
            head, _, onnx_bytes = data[len(MAGIC):].partition(b"\n")
            info = json.loads(head)
            if info.get("platform") != _platform():
                self._logger.log("ERROR", f"1: [stdArchiveReader.cpp] The engine plan file was serialized on "
                                          f"{info.get('platform')}; this is {_platform()} (engines are not portable "
                                          "across platforms)")
                return None
            built, here = _vt(info["trt_version"]), _vt(state["version"])
            if built != here:
                # Support Matrix 11.4.1, Engine Portability: version-compatible engines run on newer runtimes of the
                # same major; across majors only TensorRT 8 -> 10 and 10 -> 11; Version Compatibility page: built
                # with 8.6 or later, and the runtime must allow engine host code (setEngineHostCodeAllowed)
                ok = info["version_compatible"] and self._host_code and here > built and built[:2] >= (8, 6) and \
                    here[0] in _VC_RUNTIME_MAJORS.get(built[0], ())
                if not ok:
                    self._logger.log("ERROR", "1: [stdArchiveReader.cpp] The engine plan file is not compatible "
                                              f"with this version of TensorRT, expecting library version "
                                              f"{state['version']} got {info['trt_version']}, please rebuild.")
                    return None
            cc_here = _cc()
            portable = info.get("hardware_compatibility") == "AMPERE_PLUS" and _vt(cc_here)[0] >= 8 and not _jetson()
            if info["compute_capability"] != cc_here and not portable:
                self._logger.log("ERROR", "6: The engine plan file is generated on an incompatible device, "
                                          f"expecting compute {cc_here} got compute {info['compute_capability']}, "
                                          "please rebuild.")
                return None
            if info["device_type"] == "DLA" and int(os.environ.get("EDGERES_TRT_EMULATOR_DLA_CORES", "0")) < 1:
                self._logger.log("ERROR", "the engine runs on DLA but this device has no DLA")
                return None
            engine = ICudaEngine(info, onnx_bytes)
            engine._runtime_dla_core = self._dla_core if info["device_type"] == "DLA" else None
            return engine

    class ICudaEngine(_Surface):
        def __init__(self, info, onnx_bytes):
            self._info, self._onnx = info, onnx_bytes
            self._runtime_dla_core = None   # the Runtime's DLA_core at deserialization (the core a DLA engine uses)
            self._io = [info["input"]["name"], info["output"]["name"]]

        num_io_tensors = property(lambda self: 2)
        num_bindings = property(lambda self: 2)
        num_optimization_profiles = property(lambda self: 1)
        num_layers = property(lambda self: self._info["layers_on_dla"] + self._info["layers_on_gpu"])

        def get_tensor_name(self, i):
            return self._io[i]

        def get_tensor_mode(self, name):
            return E("TensorIOMode", "INPUT" if name == self._io[0] else "OUTPUT")

        def get_tensor_dtype(self, name):
            return E("DataType", "FLOAT")

        def get_tensor_shape(self, name):
            return Dims(self._info["input" if name == self._io[0] else "output"]["shape"])

        def get_tensor_profile_shape(self, name, profile_index):
            return [Dims(s) for s in self._info["input"]["profile"]]

        def get_profile_shape(self, profile_index, binding):
            return [Dims(s) for s in self._info["input"]["profile"]]

        def get_binding_name(self, i):
            return self._io[i]

        def get_binding_index(self, name):
            return self._io.index(name)

        def binding_is_input(self, i):
            return i == 0

        def get_binding_dtype(self, i):
            return E("DataType", "FLOAT")

        def create_execution_context(self):
            return IExecutionContext(self)

        def serialize(self):
            return IHostMemory(MAGIC + json.dumps(self._info).encode() + b"\n" + self._onnx)

    class IExecutionContext(_Surface):
        _keep: list = []

        def __init__(self, engine):
            import onnxruntime as ort

            self._engine = engine
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            self._session = ort.InferenceSession(engine._onnx, opts, providers=["CPUExecutionProvider"])
            self._shape = None
            self._addr = {}
            self._cuda = _cudart()

        def set_input_shape(self, name, shape):
            mn, _, mx = self._engine._info["input"]["profile"]
            shape = tuple(int(d) for d in shape)
            if name != self._engine._io[0] or len(shape) != len(mn) or \
                    not all(a <= s <= b for a, s, b in zip(mn, shape, mx)):
                print(f"[TRT] [E] 3: [executionContext.cpp::setInputShape] IExecutionContext::setInputShape: "
                      f"Error Code 3: API Usage Error (Given invalid tensor shape {shape} for {name}; profile "
                      f"{mn}..{mx})", file=sys.stderr)
                return False
            self._shape = shape
            return True

        def set_binding_shape(self, index, shape):
            return self.set_input_shape(self._engine._io[index], shape)

        def get_tensor_shape(self, name):
            if name == self._engine._io[0]:
                return Dims(self._shape or self._engine._info["input"]["shape"])
            out = list(self._engine._info["output"]["shape"])
            if self._shape is not None:
                out[0] = self._shape[0]
            return Dims(out)

        def get_binding_shape(self, index):
            return self.get_tensor_shape(self._engine._io[index])

        def set_tensor_address(self, name, ptr):
            if name not in self._engine._io:
                return False
            self._addr[name] = int(ptr)
            return True

        def get_tensor_address(self, name):
            return self._addr.get(name, 0)

        def _run(self):
            import numpy as np

            shape = self._shape
            n_in = int(np.prod(shape))
            x = np.ctypeslib.as_array((ctypes.c_float * n_in).from_address(self._addr[self._engine._io[0]]))
            x = x.reshape(shape).copy()
            y = self._session.run(None, {self._engine._io[0]: x})[0].astype(np.float32)
            out = np.ctypeslib.as_array((ctypes.c_float * y.size).from_address(self._addr[self._engine._io[1]]))
            out[:] = y.reshape(-1)

        def execute_async_v3(self, stream_handle):
            if self._shape is None or any(n not in self._addr for n in self._engine._io):
                print("[TRT] [E] 3: IExecutionContext::enqueueV3: Error Code 3: API Usage Error (input shape or "
                      "tensor address not set)", file=sys.stderr)
                return False
            cb = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(lambda _data: self._run())
            IExecutionContext._keep.append(cb)   # a captured graph may call it later
            rc = self._cuda.cudaLaunchHostFunc(ctypes.c_void_p(stream_handle), cb, None)
            return rc == 0

        def execute_async_v2(self, bindings, stream_handle):
            for name, ptr in zip(self._engine._io, bindings):
                self._addr[name] = int(ptr)
            return self.execute_async_v3(stream_handle)

        def execute_v2(self, bindings):
            return self.execute_async_v2(bindings, 0)

    # ---------------------------------------------------------------- module-level pure-python additions
    dtypes = {"float32": "FLOAT", "float16": "HALF", "int8": "INT8", "int32": "INT32", "bool": "BOOL",
              "uint8": "UINT8", "int64": "INT64", "bfloat16": "BF16"}

    def nptype(trt_type):
        import numpy as np

        emulated_numpy = os.environ.get("EDGERES_TRT_EMULATOR_NUMPY")

        def npattr(name):
            if name == "bool" and emulated_numpy and (1, 24) <= _vt(emulated_numpy)[:2] < (2, 0):
                raise AttributeError("module 'numpy' has no attribute 'bool'.\n`np.bool` was a deprecated alias "
                                     "for the builtin `bool`.")
            return getattr(np, name)

        spec = table["python_package_additions"].get("nptype_mapping") or {}
        mapping = {getattr(mod, k): npattr(v.split(".", 1)[1]) for k, v in spec.items() if hasattr(mod, k)}
        if trt_type in mapping:
            return mapping[trt_type]
        raise TypeError("Could not resolve TensorRT datatype to an equivalent numpy datatype.")

    def volume(iterable):
        v = 1
        for e in iterable:
            v *= e
        return v

    impls = {"ILogger": ILogger, "Logger": Logger, "Builder": Builder, "IBuilderConfig": IBuilderConfig,
             "INetworkDefinition": INetworkDefinition, "ITensor": ITensor, "ILayer": ILayer,
             "OnnxParser": OnnxParser, "ParserError": ParserError, "IOptimizationProfile": IOptimizationProfile,
             "ITimingCache": ITimingCache, "Runtime": Runtime, "ICudaEngine": ICudaEngine,
             "IExecutionContext": IExecutionContext, "IInt8Calibrator": IInt8Calibrator, "Dims": Dims,
             **calibrators}
    classes = table["classes"]
    for name in classes:
        impl = impls.get(name)
        allowed = frozenset(_names(table, name))
        if name == "IHostMemory":
            cls = type("IHostMemory", (IHostMemory,), {})
        elif name == "Dims":
            cls = Dims
        elif impl is not None:
            impl._names = allowed
            impl.__name__ = impl.__qualname__ = name
            cls = impl
        else:
            def _absent(self, *a, _n=name, **k):
                raise NotEmulated(f"{EMULATOR_NAME}: tensorrt.{_n} exists in TensorRT {full} but is not emulated")
            cls = _SurfaceMeta(name, (_Surface,), {"_names": allowed, "__init__": _absent})
        setattr(mod, name, cls)
    for name, enum in enums.items():
        if "." not in name and not hasattr(mod, name):
            setattr(mod, name, enum)
    for name in table["module_attributes"]:
        if name in dtypes and dtypes[name] in enums["DataType"]._names:
            setattr(mod, name, E("DataType", dtypes[name]))
    extra = table["python_package_additions"]["functions"]
    if "nptype" in extra:
        mod.nptype = nptype
    if "volume" in extra:
        mod.volume = volume
    for fn in table["module_functions"]:
        if not hasattr(mod, fn):
            setattr(mod, fn, _not_emulated_fn(fn, full))
    mod.__version__ = full
    mod.__emulator__ = EMULATOR_NAME
    return mod


# version-compatible engines: built major -> runtime majors that load them (Support Matrix 11.4.1, Engine Portability)
_VC_RUNTIME_MAJORS = {8: (8, 10), 10: (10, 11), 11: (11,)}
# Jetson modules by name (NVIDIA CUDA GPUs table, developer.nvidia.com/cuda-gpus; module data sheets): compute
# capability, DLA cores, /proc/device-tree/model. "orin" is the AGX Orin.
JETSONS = {"orin": ("8.7", 2, "NVIDIA Jetson AGX Orin Developer Kit"),
           "agx-orin": ("8.7", 2, "NVIDIA Jetson AGX Orin Developer Kit"),
           "orin-nx": ("8.7", 2, "NVIDIA Jetson Orin NX Engineering Reference Developer Kit"),
           "orin-nano": ("8.7", 0, "NVIDIA Jetson Orin Nano Developer Kit"),
           "xavier": ("7.2", 2, "Jetson-AGX"),
           "agx-thor": ("11.0", 0, "NVIDIA Jetson AGX Thor Developer Kit")}
# The emulator's OWN DLA table, written from NVIDIA's "Working with DLA" pages (11.4.0, 11.4.1, 11.5.0) and the JetPack
# release notes, independently of edgeres/tensorrt/versions.py (a test fails if either imports the other):
# (first, last TensorRT (major, minor, patch) inclusive, platform, the JETSONS keys that have DLA there)
_DLA_TABLE = (
    ((8, 5, 0), (8, 5, 99), "jetson", {"orin", "agx-orin", "orin-nx", "xavier"}),   # JetPack 5.1: Xavier, Orin
    ((8, 6, 0), (8, 6, 99), "jetson", {"orin", "agx-orin", "orin-nx"}),             # JetPack 6.0: Orin only
    ((10, 0, 0), (10, 7, 99), "jetson", {"orin", "agx-orin", "orin-nx"}),           # "10.7 the last 10.x with DLA"
    ((11, 4, 0), (11, 4, 0), "windows-arm", set()),                                  # Windows on ARM only
    ((11, 4, 1), (11, 4, 1), "jetson", {"orin", "agx-orin"}),                        # AGX Orin, JetPack 7.2.2+
)                                                                                    # nothing from 11.5 on Jetson


def _dla_cores(version: str) -> int:
    """DLA cores TensorRT reports here: the module's, where this TensorRT has DLA on this platform; else 0."""
    module = os.environ.get("EDGERES_EMULATED_JETSON", "")
    v = (_vt(version) + (0, 0, 0))[:3]
    allowed = any(lo <= v <= hi and plat == "jetson" and module in mods for lo, hi, plat, mods in _DLA_TABLE)
    return int(os.environ.get("EDGERES_TRT_EMULATOR_DLA_CORES", JETSONS.get(module, ("", 0))[1])) if allowed else 0


def _timing_origin(version: str) -> dict:
    return {"trt": version, "cc": _cc(), "platform": _platform()}


def _volume(dims) -> int:
    n = 1
    for d in dims:
        n *= max(1, int(d))
    return n


def _dla_layer_problem(layer, network, typed: bool) -> str | None:
    """_dla_runs, and in a strongly typed network (11.4.1 DLA) the precision rule as this emulator reads NVIDIA's
    explicit quantization: a compute layer runs INT8 when it consumes a DEQUANTIZE output, or when it is an
    activation / pooling / elementwise consuming an INT8 layer; any other compute layer stays FP32, which DLA
    cannot run."""
    why = _dla_runs(layer)
    if why or not typed or layer.type.name in ("QUANTIZE", "DEQUANTIZE", "CONSTANT"):
        return why
    made_by = {o: lay for lay in network._layers for o in lay._outputs}
    int8: set = set()
    for lay in network._layers:
        data = lay._inputs[:1] if lay.type.name in ("CONVOLUTION", "MATRIX_MULTIPLY") else lay._inputs   # not weights
        src = [made_by.get(x) for x in data]
        if any(s is not None and s.type.name == "DEQUANTIZE" for s in src) or (
                lay.type.name in ("ACTIVATION", "POOLING", "ELEMENTWISE") and any(s is not None and s.name in int8
                                                                                   for s in src)):
            int8.add(lay.name)
        if lay is layer:
            break
    return None if layer.name in int8 else "FP32 in a strongly typed network (no Q/DQ around it); DLA runs FP16/INT8"


def _cc() -> str:
    return os.environ.get("EDGERES_EMULATED_CC", "8.6")


def _jetson() -> bool:
    return os.environ.get("EDGERES_EMULATED_JETSON", "") in JETSONS


def _platform() -> str:
    """What an engine is tied to: OS, CPU architecture, Jetson or not ('not portable across platforms')."""
    import platform

    machine = os.environ.get("EDGERES_EMULATED_MACHINE") or platform.machine()
    return f"{platform.system()}-{machine}" + ("-jetson" if _jetson() else "")


def _dla_runs(layer) -> str | None:
    """Why DLA cannot run this layer (None: it can), read from NVIDIA's "DLA Supported Layers and Restrictions"
    table (docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/dla-layer-restrictions.html) by the layer
    TensorRT builds, not by the ONNX op: Convolution 2D kernel [1,32] stride [1,8]; Pooling window [1,8]; Activation,
    ElementWise, Scale; Reduce MAX only; Shuffle 4D only; no MatrixMultiply."""
    kind = layer.type.name
    attrs = getattr(layer, "_attrs", {})
    if kind == "CONVOLUTION":
        ok = all(1 <= k <= 32 for k in attrs.get("kernel_shape", [])) and \
            all(1 <= s <= 8 for s in attrs.get("strides", []))
        return None if ok else "convolution kernel/stride beyond DLA limits"
    if kind == "POOLING":
        return None if all(1 <= k <= 8 for k in attrs.get("kernel_shape", [99])) else "pooling window beyond 8"
    if kind in ("ACTIVATION", "ELEMENTWISE", "SCALE", "CONSTANT", "QUANTIZE", "DEQUANTIZE"):
        return None
    if kind == "REDUCE":
        return None if layer._op == "ReduceMax" else "DLA Reduce supports MAX only"
    if kind == "SHUFFLE":
        return "DLA Shuffle takes 4D tensors only" if layer._op in ("Flatten", "Reshape", "Squeeze") else None
    return f"{kind} is not a DLA layer"


def _names(table: dict, cls: str) -> list[str]:
    return table["classes_including_inherited"].get(cls) or table["classes"].get(cls) or []


def _tag(version: str) -> int:
    v = _vt(version) + (0, 0, 0)
    return v[0] * (10000 if v[0] >= 10 else 1000) + v[1] * 100 + v[2]


def _not_emulated_fn(name: str, version: str):
    def fn(*a, **k):
        raise NotEmulated(f"{EMULATOR_NAME}: tensorrt.{name} exists in TensorRT {version} but is not emulated")
    fn.__name__ = name
    return fn


_CUDART = None


def _cudart():
    """The libcudart stand-in (the same library the code under test loads, so pointers and streams match)."""
    global _CUDART
    if _CUDART is None:
        path = os.environ.get("EDGERES_EMULATED_CUDART")
        if not path:
            raise RuntimeError(f"{EMULATOR_NAME}: EDGERES_EMULATED_CUDART is not set (build tests/trt_emulator/"
                               "cudart.c first)")
        _CUDART = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    return _CUDART
