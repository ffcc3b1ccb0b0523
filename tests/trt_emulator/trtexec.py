"""A `trtexec` STAND-IN for tests: accepts exactly one TensorRT version's options (api/<ver>/trtexec_options.txt)
and fails on any other with "Unknown option", as the real one does (AllOptions::parse leaves it in the
Arguments map, main() reports it and returns EXIT_FAILURE). Builds and runs through the emulated `tensorrt`
module of the same version, so the builder rules are the emulator's. Output lines follow trtexec's:
`&&&& RUNNING TensorRT.trtexec [TensorRT v8502]`, `Latency: min = ... median = ... percentile(99%) = ...`,
`Throughput: ... qps`, `&&&& PASSED` / `&&&& FAILED`.

Like the real trtexec (samples/common/sampleEngines.cpp, sampleOptions.cpp, sampleInference.cpp at each tag):
- `--int8` without `--calib` on a network without Q/DQ sets placeholder per-tensor dynamic ranges
  (setDummyInt8DynamicRanges: "Int8 calibrator not provided. Generating dummy per-tensor dynamic range");
  with `--calib` whose cache is from another TensorRT version it calibrates with random data (a warning);
- a dynamic input without shapes is built and run at 1 ("Automatically overriding shape to: 1x..."); inference
  shapes are `--shapes`, else the build's OPT shapes (AllOptions::parse), else 1;
- `--versionCompatible`, `--hardwareCompatibilityLevel`, `--memPoolSize`, `--timingCacheFile` are applied to the
  builder config; `--useDLACore` with `--loadEngine` sets the runtime's DLA core.
"""
from __future__ import annotations

import ctypes
import json
import time
from pathlib import Path

from trt_emulator.emulator import API, SURFACE, _cudart, _tag, _vt, build_module


def accepted_options(version: str) -> set[str]:
    names = set()
    for line in (API / SURFACE.get(version, version) / "trtexec_options.txt").read_text().splitlines():
        if line.startswith("-") and not line.startswith("# "):
            names.add(line.split("\t")[0].strip())
    return names


def deprecated_options(version: str) -> set[str]:
    """Options the version's table marks deprecated (trtexec --help / parser warnings)."""
    names = set()
    for line in (API / SURFACE.get(version, version) / "trtexec_options.txt").read_text().splitlines():
        if line.startswith("-") and "deprecated" in line.split("\t", 1)[-1]:
            names.add(line.split("\t")[0].strip())
    return names


def _shape(text: str) -> tuple[str, tuple[int, ...]]:
    name, _, dims = text.rpartition(":")
    return name, tuple(int(d) for d in dims.split("x"))


def _calibrator(trt, cache: bytes | None):
    """trtexec's own calibrator: the --calib cache, else random input batches."""

    class TrtexecCalibrator(trt.IInt8EntropyCalibrator2):
        def get_batch_size(self):
            return 1

        def get_batch(self, names):
            return [0]   # a device pointer to random data, in the real trtexec

        def read_calibration_cache(self):
            return cache

        def write_calibration_cache(self, data):
            return None

    return TrtexecCalibrator()


def main(argv: list[str], version: str) -> int:
    import os

    os.environ["EDGERES_TRT_EMULATOR_VERSION"] = version
    trt = build_module(version)
    tag = _tag(trt.__version__)
    print(f"&&&& RUNNING TensorRT.trtexec [TensorRT v{tag}] # trtexec {' '.join(argv)}")
    known = accepted_options(version)
    opts: dict[str, str] = {}
    for arg in argv:
        name, eq, value = arg.partition("=")
        if name not in known:
            print(f"[E] Unknown option: {name} {value}".rstrip())
            print(f"&&&& FAILED TensorRT.trtexec [TensorRT v{tag}] # trtexec {' '.join(argv)}")
            return 1
        opts[name] = value if eq else ""
    if "--help" in opts or "-h" in opts:
        print("\n".join(sorted(known)))
        print(f"&&&& PASSED TensorRT.trtexec [TensorRT v{tag}] # trtexec {' '.join(argv)}")
        return 0
    try:
        engine_bytes = _build(trt, opts) if "--onnx" in opts else None
        if engine_bytes is None and "--loadEngine" not in opts:
            raise SystemExit("[E] Model missing or format not recognized")
        if engine_bytes is not None and "--saveEngine" in opts:
            Path(opts["--saveEngine"]).write_bytes(engine_bytes)
            print(f"[I] Engine built in emulator; saved to {opts['--saveEngine']}")
        skip = "--buildOnly" in opts or "--skipInference" in opts
        if not skip:
            data = engine_bytes if engine_bytes is not None else Path(opts["--loadEngine"]).read_bytes()
            _infer(trt, data, opts)
    except SystemExit as e:
        print(str(e))
        print(f"&&&& FAILED TensorRT.trtexec [TensorRT v{tag}] # trtexec {' '.join(argv)}")
        return 1
    print(f"&&&& PASSED TensorRT.trtexec [TensorRT v{tag}] # trtexec {' '.join(argv)}")
    return 0


def _build(trt, opts: dict[str, str]) -> bytes:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = _vt(trt.__version__)[0]
    flags = 0
    if major < 10:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)   # trtexec parses ONNX explicit-batch
    if "--stronglyTyped" in opts and major == 10:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(opts["--onnx"]):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise SystemExit(f"[E] Failed to parse onnx file: {errors}")
    config = builder.create_builder_config()
    precision = {k for k in ("--fp16", "--int8", "--best") if k in opts}
    if "--best" in precision:
        precision |= {"--fp16", "--int8"}
    if "--fp16" in precision:
        config.set_flag(trt.BuilderFlag.FP16)
    if "--int8" in precision:
        config.set_flag(trt.BuilderFlag.INT8)
    inp = network.get_input(0)
    dyn = any(d < 0 for d in inp.shape)
    if dyn:
        shapes = {}
        for key in ("--minShapes", "--optShapes", "--maxShapes"):
            if key in opts:
                shapes[key] = _shape(opts[key])[1]
        if not shapes and "--shapes" in opts:   # --shapes alone builds a static profile at that shape
            one = _shape(opts["--shapes"])[1]
            shapes = {"--minShapes": one, "--optShapes": one, "--maxShapes": one}
        if not shapes:
            print(f"[W] Dynamic dimensions required for input: {inp.name}, but no shapes were provided. "
                  "Automatically overriding shape to: 1x...")
            one = (1, *inp.shape[1:])
            shapes = {"--minShapes": one, "--optShapes": one, "--maxShapes": one}
        profile = builder.create_optimization_profile()
        profile.set_shape(inp.name, shapes.get("--minShapes", shapes.get("--optShapes")),
                          shapes.get("--optShapes"), shapes.get("--maxShapes", shapes.get("--optShapes")))
        config.add_optimization_profile(profile)
    if "--useDLACore" in opts:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = int(opts["--useDLACore"])
        if "--allowGPUFallback" in opts:
            config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    if "--int8" in precision:
        has_qdq = any(network.get_layer(i).type in (trt.LayerType.QUANTIZE, trt.LayerType.DEQUANTIZE)
                      for i in range(network.num_layers))
        if not has_qdq and not opts.get("--calib"):
            print("[W] Int8 calibrator not provided. Generating dummy per-tensor dynamic range. Int8 accuracy is not "
                  "guaranteed.")
            network._dummy_ranges = True
        elif not has_qdq:
            cache = Path(opts["--calib"]).read_bytes() if Path(opts["--calib"]).is_file() else None
            want = f"TRT-{_tag(trt.__version__)}-"
            if cache is None or not cache.startswith(want.encode()):
                print("[W] [TRT] Calibration cache missing or from another TensorRT version: calibrating with "
                      "random data (accuracy will be meaningless)")
                cache = None
            config.int8_calibrator = _calibrator(trt, cache)
    if "--versionCompatible" in opts or "--vc" in opts:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if "--hardwareCompatibilityLevel" in opts:
        level = opts["--hardwareCompatibilityLevel"].lower()
        names = {"none": "NONE", "ampere+": "AMPERE_PLUS"}
        if level not in names:
            raise SystemExit(f"[E] Invalid hardware compatibility level: {level}")
        config.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel, names[level])
    for pool in filter(None, opts.get("--memPoolSize", "").split(",")):
        name, _, size = pool.partition(":")
        if name.strip() != "workspace":
            continue
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(float(size) * (1 << 20)))
    if "--builderOptimizationLevel" in opts:
        config.builder_optimization_level = int(opts["--builderOptimizationLevel"])
    timing = None
    if opts.get("--timingCacheFile"):
        tpath = Path(opts["--timingCacheFile"])
        timing = config.create_timing_cache(tpath.read_bytes() if tpath.is_file() else b"")
        if not config.set_timing_cache(timing, False):   # sampleEngines: a refused cache is not used
            print("[W] The timing cache does not match this TensorRT/device: building without it")
            timing = config.create_timing_cache(b"")
            config.set_timing_cache(timing, False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise SystemExit("[E] Engine could not be created from network")
    if timing is not None:
        Path(opts["--timingCacheFile"]).write_bytes(bytes(config.get_timing_cache().serialize()))
    return bytes(plan)


def _infer(trt, data: bytes, opts: dict[str, str]) -> None:
    import numpy as np

    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    if "--useDLACore" in opts:
        runtime.DLA_core = int(opts["--useDLACore"])
    engine = runtime.deserialize_cuda_engine(data)
    if engine is None:
        raise SystemExit("[E] Engine deserialization failed")
    ctx = engine.create_execution_context()
    name_in, name_out = engine.get_tensor_name(0), engine.get_tensor_name(1)
    shape = tuple(engine.get_tensor_shape(name_in))
    if "--shapes" in opts:
        shape = _shape(opts["--shapes"])[1]
    elif "--optShapes" in opts:          # AllOptions::parse: the build's OPT shapes become the inference shapes
        shape = _shape(opts["--optShapes"])[1]
    elif any(d < 0 for d in shape):      # sampleInference: no shapes given -> every dynamic dimension is 1
        shape = tuple(d if d >= 0 else 1 for d in shape)
        print(f"[W] Dynamic dimensions required for input: {name_in}, but no shapes were provided. Automatically "
              f"overriding shape to: {'x'.join(map(str, shape))}")
    if not ctx.set_input_shape(name_in, shape):
        raise SystemExit(f"[E] Inference set up failed (shape {shape})")
    out_shape = tuple(ctx.get_tensor_shape(name_out))
    if "--loadInputs" in opts:
        x = np.fromfile(opts["--loadInputs"].rpartition(":")[2], dtype=np.float32).reshape(shape)
    else:
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    out = np.empty(out_shape, np.float32)
    cuda = _cudart()
    d_in, d_out = ctypes.c_void_p(), ctypes.c_void_p()
    cuda.cudaMalloc(ctypes.byref(d_in), ctypes.c_size_t(x.nbytes))
    cuda.cudaMalloc(ctypes.byref(d_out), ctypes.c_size_t(out.nbytes))
    ctx.set_tensor_address(name_in, d_in.value)
    ctx.set_tensor_address(name_out, d_out.value)

    def once():
        cuda.cudaMemcpy(d_in, ctypes.c_void_p(x.ctypes.data), ctypes.c_size_t(x.nbytes), 1)
        if not ctx.execute_async_v3(0):
            raise SystemExit("[E] Error in execution")
        cuda.cudaMemcpy(ctypes.c_void_p(out.ctypes.data), d_out, ctypes.c_size_t(out.nbytes), 2)

    once()
    if "--exportOutput" in opts:
        Path(opts["--exportOutput"]).write_text(json.dumps([{
            "name": name_out, "dimensions": "x".join(map(str, out.shape)), "values": out.reshape(-1).tolist()}]))
    iterations = int(opts.get("--iterations") or 10)
    warm_ms = float(opts.get("--warmUp") or 200)
    t_end = time.perf_counter() + warm_ms / 1e3
    while time.perf_counter() < t_end:
        once()
    times = []
    duration = float(opts.get("--duration") or 3)
    deadline = time.perf_counter() + duration
    while len(times) < iterations or time.perf_counter() < deadline:
        t0 = time.perf_counter()
        once()
        times.append((time.perf_counter() - t0) * 1e3)
    t = np.asarray(times)
    pct = [float(p) for p in (opts.get("--percentile") or "90,95,99").split(",")]
    pcts = ", ".join(f"percentile({p:g}%) = {np.percentile(t, p):.5f} ms" for p in pct)
    print(f"[I] Throughput: {1e3 / t.mean():.4f} qps")
    print(f"[I] Latency: min = {t.min():.5f} ms, max = {t.max():.5f} ms, mean = {t.mean():.5f} ms, "
          f"median = {np.median(t):.5f} ms, {pcts}")
    cuda.cudaFree(d_in)
    cuda.cudaFree(d_out)
