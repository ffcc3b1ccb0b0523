"""The device plan against NVIDIA's per-version facts (versions.SOURCES), and edgeres against the emulator.

- DLA only where NVIDIA has it (8.5 .. 10.7, 11.4.1+), with GPU fallback for exactly the layers NVIDIA's DLA table
  excludes, and every DLA script of a plan building under the emulator's own DLA rules (trtexec stand-in);
- INT8 weight forms per version: 8.5/8.6 get FP32 weights behind QuantizeLinear, bit-identical to the INT8 form;
- the trtexec stand-in's shapes, placeholder INT8 ranges and build options;
- edgeres's portability verdicts (sidecar_mismatch) equal to the emulator's deserialization, case by case.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_tensorrt_trtexec import tiny_onnx
from trt_emulator import EmulatedDevice
from trt_emulator.emulator import MAGIC, build_module

from edgeres.check import int8_weight_form, load_onnx
from edgeres.errors import ConfigError
from edgeres.export import restore_fp32_weights, store_int8_weights
from edgeres.tensorrt import engine_build
from edgeres.tensorrt.targets import TARGETS, PlanInputs, device_plan, script_for, with_fp32_weights_copy
from edgeres.tensorrt.versions import DLA_ROWS, FP32_QUANTIZE, INT8_CONSTANTS, SOURCES, capabilities, has_dla

REPO = Path(__file__).resolve().parents[1]


def qdq_onnx(path: Path, *, int8_weights: bool) -> Path:
    """Input Q/DQ, per-channel weight Q/DQ -> Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm (dynamic batch)."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    ws = (np.abs(w).reshape(4, -1).max(1) / 127).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(ws, "ws"),
             numpy_helper.from_array(np.zeros(4, np.int8), "wz"),
             numpy_helper.from_array(np.array(0.03, np.float32), "s"),
             numpy_helper.from_array(np.array(0, np.int8), "z"),
             numpy_helper.from_array(rng.standard_normal((10, 4)).astype(np.float32), "fc_w"),
             numpy_helper.from_array(np.zeros(10, np.float32), "fc_b")]
    nodes = [helper.make_node("QuantizeLinear", ["input", "s", "z"], ["q"], name="in_q"),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"], name="in_dq"),
             helper.make_node("QuantizeLinear", ["w", "ws", "wz"], ["wq"], name="w_q", axis=0),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wdq"], name="w_dq", axis=0),
             helper.make_node("Conv", ["dq", "wdq"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "qdq",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    if int8_weights:
        assert store_int8_weights(model) == 1
    onnx.save(model, str(path))
    return path


def calib_cache(path: Path, tag: int = 8601) -> Path:
    lines = [f"TRT-{tag}-EntropyCalibration2"] + [f"{t}: 3c010a14" for t in ("input", "c", "r", "g", "f", "logits")]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def inputs(tmp_path) -> PlanInputs:
    fp32 = tiny_onnx(tmp_path / "model_fp32.onnx")
    int8 = qdq_onnx(tmp_path / "model_int8.onnx", int8_weights=True)
    plan_in = PlanInputs(fp32_name=fp32.name, int8_name=int8.name, fp32_onnx=fp32, int8_onnx=int8,
                         calib_name="calib.cache", calib_cache=calib_cache(tmp_path / "calib.cache"))
    return with_fp32_weights_copy(plan_in, tmp_path)


def entry(plan: dict, target: str, precision: str, device: str) -> dict:
    return next(e for e in plan["entries"] if (e["target"], e["precision"], e["device"]) == (target, precision, device))


# ------------------------------------------------------------------------------------------- the capability table
def test_every_capability_has_an_nvidia_source_and_dla_windows():
    fields = {"explicit_batch_flag", "weak_typing", "implicit_int8", "strongly_typed", "dla", "int8_weight_forms",
              "version_compatible", "hardware_compatibility", "dla_explicit_quantization"}
    assert fields <= set(SOURCES) and all(len(SOURCES[f]) > 40 for f in fields)
    assert all("nvidia" in SOURCES[f].lower() or "trt-api" in SOURCES[f] for f in fields)
    windows = {"8.5.2": True, "8.6.2": True, "10.3.0": True, "10.7.0": True, "10.8.0": False, "10.16.0": False,
               "11.0.0": False, "11.3.0": False, "11.4.0": False, "11.4.1": True, "11.4.1.8": True,
               "11.5.0": False, "11.6.1": False, "12.0": None}
    for v, dla in windows.items():
        if dla is None:   # beyond what edgeres targets: refused, not guessed
            with pytest.raises(ConfigError, match="not supported"):
                capabilities(v)
            continue
        assert capabilities(v).dla is dla and has_dla(v) is dla
        assert engine_build._has_dla(v) is dla, "the bundle's standalone copy must agree with the table"
    # issue 36: one DLA row per (versions, platform, modules), each with its NVIDIA source; 11.4.1 = AGX Orin only
    assert all(len(r.source) > 40 and ("nvidia" in r.source.lower() or "JetPack" in r.source) for r in DLA_ROWS)
    assert capabilities("11.4.1").dla_modules == ("agx-orin",) and capabilities("11.4.1").dla_jetpack_min == "7.2.2"
    assert has_dla("11.4.1", "agx-orin") and not has_dla("11.4.1", "orin-nx") and has_dla("10.3", "orin-nx")
    assert not has_dla("8.6", "agx-xavier") and has_dla("8.5.2", "agx-xavier")   # JetPack 6 has no Xavier
    assert capabilities("8.6").int8_weight_forms == (FP32_QUANTIZE,)
    assert INT8_CONSTANTS in capabilities("10.0").int8_weight_forms


def test_readme_dla_statements_come_from_the_table():
    """The README's TensorRT table is generated from the rows (`python -m edgeres.tensorrt.targets` rewrites it)."""
    from edgeres.tensorrt.targets import README_BEGIN, README_END, readme_section

    readme = (REPO / "README.md").read_text()
    block = readme[readme.index(README_BEGIN):readme.index(README_END) + len(README_END)]
    assert block == readme_section(), "README's TensorRT table is stale: python -m edgeres.tensorrt.targets"
    section = " ".join(readme[readme.index("## TensorRT engines"):readme.index("## Deploy to Jetson")].split())
    for key, label in ((k, v[2]) for k, v in TARGETS.items()):
        assert label in section, f"README does not name the {key} target as the plan does: {label}"
    assert "10.7" in section and "11.4.1" in section and "DLA and implicit-INT8 calibration caches need" not in section


# ------------------------------------------------------------------------------------------- the plan
def test_plan_dla_windows_fallback_layers_and_weight_forms(inputs):
    plan = device_plan(inputs, batch=4)
    assert "no DLA support" in entry(plan, "10", "fp16", "dla")["refused"]          # 10.16: after 10.7
    assert "no DLA support" in entry(plan, "11", "int8", "dla")["refused"]          # 11.0 .. 11.4.0
    dla = entry(plan, "11.4.1", "int8", "dla")                                      # back, strongly typed: Q/DQ ONNX
    assert dla["refused"] is None and dla["onnx"] == "model_int8.onnx" and dla["calib_cache"] is None
    assert "--int8" not in dla["trtexec"] and "--allowGPUFallback" in dla["trtexec"]
    assert entry(plan, "11.4.1", "fp16", "dla")["refused"]                            # strongly typed: no FP16 flag
    for target in ("8.5", "8.6", "10.3"):
        e = entry(plan, target, "fp16", "dla")
        assert [g["op"] for g in e["gpu_fallback_layers"]] == ["GlobalAveragePool", "Flatten", "Gemm"]
        assert e["engine_build"]["gpu_fallback"] and "--allowGPUFallback" in e["trtexec"] and e["static_batch"]
    for target, onnx_name in (("8.5", "model_int8.fp32w.onnx"), ("8.6", "model_int8.fp32w.onnx"),
                              ("10.3", "model_int8.onnx"), ("10", "model_int8.onnx")):
        e = entry(plan, target, "int8", "gpu")
        assert e["onnx"] == onnx_name and e["int8_weight_form"] in capabilities(TARGETS[target][0]).int8_weight_forms
    assert entry(plan, "8.5", "fp32", "gpu")["gpu_fallback_layers"] is None


def test_plan_without_the_fp32_weights_copy_refuses_8x_int8_gpu_in_one_line(tmp_path):
    fp32 = tiny_onnx(tmp_path / "model_fp32.onnx")
    int8 = qdq_onnx(tmp_path / "model_int8.onnx", int8_weights=True)
    plan = device_plan(PlanInputs("model_fp32.onnx", "model_int8.onnx", fp32, int8), batch=4)
    why = entry(plan, "8.5", "int8", "gpu")["refused"]
    assert why and "\n" not in why and "fp32_quantize" in why and "int8_constants" in why
    assert entry(plan, "10.3", "int8", "gpu")["refused"] is None


def test_compile_refuses_a_weight_form_the_version_does_not_document(tmp_path, inputs):
    from edgeres.tensorrt.compile import plan_compile
    from edgeres.tensorrt.options import CompileOptions, Precision

    opts = CompileOptions(precision=Precision.INT8, batch=(1, 2, 4))
    for version in ("8.5.2", "8.6"):
        with pytest.raises(ConfigError, match="does not document.*model_int8.fp32w.onnx"):
            plan_compile(inputs.int8_onnx, tmp_path / "e.plan", opts, trt_version=version, is_jetson=True,
                         dla_cores=2)
        plan_compile(inputs.int8_fp32w_onnx, tmp_path / "e.plan", opts, trt_version=version, is_jetson=True,
                     dla_cores=2)
    plan_compile(inputs.int8_onnx, tmp_path / "e.plan", opts, trt_version="10.3", is_jetson=True, dla_cores=2)


def test_fp32_weights_copy_is_bit_identical_and_owned(tmp_path, inputs):
    import onnxruntime as ort

    copy = load_onnx(inputs.int8_fp32w_onnx)
    assert int8_weight_form(copy) == FP32_QUANTIZE and int8_weight_form(load_onnx(inputs.int8_onnx)) == INT8_CONSTANTS
    x = np.random.default_rng(2).standard_normal((3, 3, 16, 16)).astype(np.float32)
    outs = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
            for p in (inputs.int8_onnx, inputs.int8_fp32w_onnx,
                      qdq_onnx(tmp_path / "orig.onnx", int8_weights=False))]
    assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[1], outs[2])
    assert restore_fp32_weights(copy) == 0                      # nothing left to restore
    foreign = tmp_path / "other" / "model_int8.fp32w.onnx"      # a file edgeres did not write is never replaced
    foreign.parent.mkdir()
    onnx.save(load_onnx(inputs.fp32_onnx), str(foreign))
    with pytest.raises(ConfigError, match="not written by edgeres"):
        with_fp32_weights_copy(PlanInputs("a.onnx", "model_int8.onnx", inputs.fp32_onnx, inputs.int8_onnx),
                               foreign.parent)


@pytest.mark.parametrize("version,target", [("8.5.2", "8.5"), ("8.6", "8.6"), ("10.3", "10.3")])
def test_every_dla_script_in_the_plan_builds_under_the_emulator_dla_rules(tmp_path, inputs, version, target):
    """Done-when: each planned DLA trtexec script, run by that version's trtexec stand-in on a Jetson (Orin), builds,
    and the emulator puts on the GPU exactly the layers the plan lists."""
    plan = device_plan(inputs, batch=2)
    dev = EmulatedDevice(tmp_path / "dev", version=version, jetson="orin")
    for precision in ("int8", "fp16"):
        e = entry(plan, target, precision, "dla")
        assert e["refused"] is None, e["refused"]
        folder = tmp_path / f"{target}-{precision}"
        folder.mkdir()
        script = folder / "build.sh"
        script.write_text(script_for(e, onnx=str(inputs.fp32_onnx), calib=str(inputs.calib_cache)))
        p = subprocess.run(["sh", str(script)], env=dev.env(), capture_output=True, text=True)
        assert p.returncode == 0, p.stdout[-1500:] + p.stderr[-1500:]
        engine = next(folder.glob("*.plan")).read_bytes()
        head = json.loads(engine[len(MAGIC):].split(b"\n", 1)[0])
        planned = e["gpu_fallback_layers"]   # tiny_onnx's nodes are unnamed: the emulator names them by op
        assert head["device_type"] == "DLA" and len(head["gpu_layers"]) == len(planned) == 3
        assert all(g["node"] == n or f"[{g['op']}]" in n for g, n in zip(planned, head["gpu_layers"]))


def test_emulator_refuses_a_dla_build_without_fallback_and_int8_constants_before_10(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGERES_EMULATED_JETSON", "orin")
    monkeypatch.setenv("EDGERES_TRT_EMULATOR_DLA_CORES", "2")
    fp32 = tiny_onnx(tmp_path / "m.onnx")
    with pytest.raises(engine_build.BuildError, match="failed to build"):
        engine_build.build_engine(fp32, tmp_path / "e.plan", trt=build_module("8.6"), precision="fp16", dla_core=0,
                                  batch=(2, 2, 2), device={"device": "emu"})
    int8 = qdq_onnx(tmp_path / "q.onnx", int8_weights=True)
    for version, ok in (("8.5.2", False), ("8.6", False), ("10.3", True)):
        try:
            engine_build.build_engine(int8, tmp_path / "g.plan", trt=build_module(version), precision="int8",
                                      batch=(1, 2, 4), device={"device": "emu"})
            built = True
        except engine_build.BuildError:
            built = False
        assert built is ok, version


# ------------------------------------------------------------------------------------------- trtexec stand-in
def test_trtexec_shapes_placeholder_ranges_and_options(tmp_path):
    dev = EmulatedDevice(tmp_path / "dev", version="8.6")
    fp32 = tiny_onnx(tmp_path / "m.onnx")

    def trtexec(*args):
        return subprocess.run(["trtexec", *args], env=dev.env(), capture_output=True, text=True)

    p = trtexec(f"--onnx={fp32}", f"--saveEngine={tmp_path / 'a.plan'}", "--int8", "--skipInference",
                f"--timingCacheFile={tmp_path / 't.cache'}", "--memPoolSize=workspace:64", "--versionCompatible")
    assert p.returncode == 0 and "dummy per-tensor dynamic range" in p.stdout, p.stdout
    head = json.loads((tmp_path / "a.plan").read_bytes()[len(MAGIC):].split(b"\n", 1)[0])
    assert head["calibration"].startswith("placeholder") and head["version_compatible"]
    assert (tmp_path / "t.cache").is_file()
    # no shapes: built at 1 (profile 1..1), and run at 1; a later run with a batch-4 --shapes is refused
    assert head["input"]["profile"] == [[1, 3, 16, 16]] * 3
    p = trtexec(f"--loadEngine={tmp_path / 'a.plan'}", "--iterations=1", "--duration=0", "--warmUp=0")
    assert p.returncode == 0 and "overriding shape to: 1x3x16x16" in p.stdout, p.stdout
    p = trtexec(f"--onnx={fp32}", f"--saveEngine={tmp_path / 'b.plan'}", "--minShapes=input:1x3x16x16",
                "--optShapes=input:4x3x16x16", "--maxShapes=input:8x3x16x16", "--hardwareCompatibilityLevel=ampere+",
                "--iterations=1", "--duration=0", "--warmUp=0")
    assert p.returncode == 0 and "overriding" not in p.stdout, p.stdout     # inference at the build's OPT shapes
    head = json.loads((tmp_path / "b.plan").read_bytes()[len(MAGIC):].split(b"\n", 1)[0])
    assert head["hardware_compatibility"] == "AMPERE_PLUS"
    jetson = EmulatedDevice(tmp_path / "orin", version="8.6", jetson="orin")
    p = subprocess.run(["trtexec", f"--onnx={fp32}", "--hardwareCompatibilityLevel=ampere+", "--skipInference"],
                       env=jetson.env(), capture_output=True, text=True)
    assert p.returncode != 0 and "not supported on this platform" in p.stdout + p.stderr


# ------------------------------------------------------------------------------------------- edgeres vs emulator
CASES = [  # (built: version, cc, machine, jetson, vc, hw) -> (runtime: version, cc, machine, jetson)
    (("8.6", "8.6", "x86_64", None, False, None), ("8.6", "8.6", "x86_64", None)),
    (("10.3", "9.0", "x86_64", None, False, None), ("10.3", "9.0", "aarch64", None)),      # H100 -> GH200
    (("10.3", "8.7", "aarch64", "orin", False, None), ("10.3", "8.7", "aarch64", None)),   # Orin -> an SBSA box
    (("10.3", "8.6", "x86_64", None, False, "ampere+"), ("10.3", "8.9", "x86_64", None)),
    (("10.3", "8.6", "x86_64", None, False, None), ("10.3", "8.9", "x86_64", None)),
    (("10.3", "7.5", "x86_64", None, False, None), ("10.3", "8.6", "x86_64", None)),
    (("8.6", "8.6", "x86_64", None, True, None), ("10.3", "8.6", "x86_64", None)),          # 8 -> 10
    (("8.6", "8.6", "x86_64", None, True, None), ("11.0", "8.6", "x86_64", None)),          # 8 -> 11: no
    (("10.3", "8.6", "x86_64", None, True, None), ("10.16", "8.6", "x86_64", None)),
    (("10.3", "8.6", "x86_64", None, True, None), ("11.0", "8.6", "x86_64", None)),
    (("10.16", "8.6", "x86_64", None, True, None), ("10.3", "8.6", "x86_64", None)),        # older runtime: no
    (("8.5.2", "8.7", "aarch64", None, False, None), ("8.6", "8.7", "aarch64", None)),
]


def _env(cc: str, machine: str, jetson: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGERES_EMULATED_")}
    env.update(EDGERES_EMULATED_CC=cc, EDGERES_EMULATED_MACHINE=machine)
    if jetson:
        env["EDGERES_EMULATED_JETSON"] = jetson
    return env


@pytest.mark.parametrize("built,here", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_edgeres_and_the_emulator_agree_on_portability(tmp_path, built, here):
    """edgeres refuses (sidecar_mismatch) exactly the engines the emulator's runtime refuses: the two rule sets are
    written independently (edgeres/tensorrt/engine_build.py vs tests/trt_emulator/emulator.py)."""
    version, cc, machine, jetson, vc, hw = built
    fp32 = tiny_onnx(tmp_path / "m.onnx", batch=2)
    code = f"""
import json, sys
sys.path[:0] = [{str(REPO / 'tests')!r}, {str(REPO / 'edgeres' / 'tensorrt')!r}]
import engine_build
from trt_emulator.emulator import build_module
trt = build_module({version!r})
dev = {{"device": "emu", "compute_capability": {cc!r}}}
info = engine_build.build_engine({str(fp32)!r}, {str(tmp_path / 'e.plan')!r}, trt=trt, version_compatible={vc!r},
                                 hardware_compatibility={hw!r}, device=dev)
info["machine"], info["is_jetson"] = {machine!r}, {bool(jetson)!r}
print(json.dumps(info))
"""
    p = subprocess.run([sys.executable, "-c", code], env=_env(cc, machine, jetson), capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    sidecar = json.loads(p.stdout.splitlines()[-1])
    rv, rcc, rmachine, rjetson = here
    code = f"""
import sys
sys.path.insert(0, {str(REPO / 'tests')!r})
from trt_emulator.emulator import build_module
trt = build_module({rv!r})
rt = trt.Runtime(trt.Logger(trt.Logger.ERROR))
if hasattr(rt, "engine_host_code_allowed"):
    rt.engine_host_code_allowed = True
print(rt.deserialize_cuda_engine(open({str(tmp_path / 'e.plan')!r}, "rb").read()) is not None)
"""
    p = subprocess.run([sys.executable, "-c", code], env=_env(rcc, rmachine, rjetson), capture_output=True, text=True)
    emulator_loads = p.stdout.strip() == "True"
    trt_here = json.loads((REPO / "tests" / "trt_emulator" / "api" / rv / "python_api.json").read_text())
    runtime = {"trt_version": trt_here["_about"]["tensorrt_version_from_NvInferVersion_h"],
               "compute_capability": rcc, "machine": rmachine, "system": sidecar["system"], "is_jetson": bool(rjetson)}
    verdict = engine_build.sidecar_mismatch(sidecar, runtime)
    assert (verdict is None) == emulator_loads, (verdict, p.stderr[-600:])
    assert verdict is None or "\n" not in verdict


# ------------------------------------------------------------------------------------------- device runtime
def test_device_runtime_target_windows_trtexec_version_and_dla_core(tmp_path, inputs):
    from edgeres.deploy import device_runtime as rt

    manifest = {"tensorrt_plan": device_plan(inputs, batch=2)}
    assert rt.plan_entry(manifest, "11.4.1.5", "int8", "dla")["target"] == "11.4.1"   # DLA back
    # issue 36: a later 11.x is never mapped onto the 11.4.1 (DLA) target
    assert rt.plan_entry(manifest, "11.5.0", "int8", "gpu")["target"] == "11"
    for later in ("11.5.0", "11.4.2", "11.4.0"):
        with pytest.raises(rt.BundleError, match="no DLA support"):
            rt.plan_entry(manifest, later, "int8", "dla")
    assert rt.plan_entry(manifest, "11.4.0", "int8", "gpu")["target"] == "11"
    # the trtexec backend: the plan entry follows trtexec's own version, not the Python bindings'
    dev = EmulatedDevice(tmp_path / "dev85", version="8.5.2", jetson="orin")
    info = {"tensorrt": "10.3.0.26", "tensorrt_python": True, "trtexec": str(dev.root / "bin" / "trtexec"),
            "dla_cores": 2, "warnings": []}
    args = rt.parse_args(["--backend", "trtexec", "--precision", "fp16", "--dla-core", "1"])
    env = dict(os.environ)
    os.environ.update(dev.env())
    try:
        backend, device, chosen = rt._choose(info, manifest, args)
    finally:
        os.environ.clear()
        os.environ.update(env)
    assert backend == "trtexec" and chosen["target"] == "8.5" and info["tensorrt"] == "8.5.2"
    assert info["tensorrt_bindings"] == "10.3.0.26"
    # the Python path: the runtime's DLA core is set before deserialization
    code = f"""
import sys
sys.path[:0] = [{str(REPO / 'tests')!r}, {str(REPO / 'edgeres' / 'tensorrt')!r}, {str(REPO / 'edgeres' / 'deploy')!r}]
import engine_build, tensorrt
import device_runtime as rt
engine_build.build_engine({str(inputs.fp32_onnx)!r}, {str(tmp_path / 'd.plan')!r}, precision="fp16", dla_core=1,
                          gpu_fallback=True, batch=(2, 2, 2), device={{"device": "emu"}})
from pathlib import Path
r = rt.TensorRTRunner(Path({str(tmp_path / 'd.plan')!r}), "input", "logits", 2, dla_core=1)
print(r.engine._runtime_dla_core)
"""
    dev86 = EmulatedDevice(tmp_path / "dev86", version="8.6", jetson="orin")
    p = subprocess.run([sys.executable, "-c", code], env=dev86.env(), capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.strip().splitlines()[-1] == "1", p.stdout + p.stderr[-1500:]


def test_compile_stage_builds_the_documented_form_on_8x(tmp_path, inputs):
    """`edgeres build` on a JetPack 6.0 (TensorRT 8.6) device compiles the FP32-weights copy the plan wrote, not the
    INT8-constant ONNX 8.6 does not document; on 10.3 the INT8 ONNX itself."""
    from edgeres.tensorrt.compile import documented_form

    plan_dir = tmp_path / "tensorrt"
    plan_dir.mkdir()
    for version, expect in (("8.6", "model_int8.fp32w.onnx"), ("10.3", "model_int8.onnx")):
        code = f"""
import sys
sys.path.insert(0, {str(REPO / 'tests')!r})
from pathlib import Path
from edgeres.tensorrt.compile import CompileInputs, CompileSettings, run
from edgeres.tensorrt.targets import PlanInputs
fp32, int8 = Path({str(inputs.fp32_onnx)!r}), Path({str(inputs.int8_onnx)!r})
plan = PlanInputs(fp32.name, int8.name, fp32, int8)
res = run(CompileInputs(int8, plan, Path({str(plan_dir)!r}), Path({str(tmp_path / version / 'model.plan')!r}),
                        relative_to=Path({str(tmp_path)!r})), CompileSettings(precision="int8"))
print(res.record.status, Path(res.record.metrics["engine"]["onnx"]).name)
"""
        dev = EmulatedDevice(tmp_path / f"dev{version}", version=version)
        p = subprocess.run([sys.executable, "-c", code], env=dev.env(), capture_output=True, text=True)
        assert p.returncode == 0, p.stderr[-2000:]
        assert p.stdout.split()[-1] == expect, p.stdout
    with pytest.raises(ConfigError, match="is missing"):
        documented_form(inputs.int8_onnx, "8.5.2", tmp_path / "elsewhere")


# ------------------------------------------------------------------------------------------- issue 36
def test_strongly_typed_dla_plan_refuses_a_layer_left_in_fp32(tmp_path, inputs):
    """A Q/DQ model whose Conv has no DequantizeLinear in front of it would run that Conv in FP32 when strongly typed
    (11.4.1 DLA): DLA has no FP32 and the plan does not list it as GPU fallback, so the host refuses the entry."""
    model = load_onnx(inputs.int8_onnx)
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    conv.input[0] = "input"   # bypass the input Q/DQ: the Conv now takes FP32 activations
    bad = tmp_path / "fp32conv.onnx"
    onnx.save(model, str(bad))
    plan = device_plan(PlanInputs("model_fp32.onnx", "fp32conv.onnx", inputs.fp32_onnx, bad), batch=2)
    why = entry(plan, "11.4.1", "int8", "dla")["refused"]
    assert why and "conv" in why and "FP32" in why and "\n" not in why
    assert entry(device_plan(inputs, batch=2), "11.4.1", "int8", "dla")["refused"] is None


def test_device_asks_tensorrt_before_a_dla_build(tmp_path, monkeypatch):
    """engine_build checks each layer's DLA capability before building (can_run_on_DLA on 10.3; the parser's report
    on 10.16+/11.x) and refuses a layer the plan does not let fall back."""
    monkeypatch.setenv("EDGERES_EMULATED_JETSON", "orin")
    fp32 = tiny_onnx(tmp_path / "m.onnx")
    with pytest.raises(engine_build.BuildError, match="does not let fall back"):
        engine_build.build_engine(fp32, tmp_path / "e.plan", trt=build_module("10.3"), precision="fp16", dla_core=0,
                                  gpu_fallback=True, batch=(2, 2, 2), dla_gpu_layers=[], device={"device": "emu"})
    from edgeres.check import load_onnx as load
    from edgeres.tensorrt.dla import gpu_layers

    planned = [{"node": g["node"], "index": g["index"]} for g in gpu_layers(load(fp32))]
    info = engine_build.build_engine(fp32, tmp_path / "e.plan", trt=build_module("10.3"), precision="fp16",
                                     dla_core=0, gpu_fallback=True, batch=(2, 2, 2), dla_gpu_layers=planned,
                                     device={"device": "emu"})
    assert info["dla_capability"]["method"] == "IBuilderConfig.can_run_on_DLA"
    assert len(info["dla_capability"]["gpu_layers"]) == 3


def test_device_refuses_a_desktop_only_target_on_a_jetson(tmp_path, inputs):
    from edgeres.deploy import device_runtime as rt

    manifest = {"tensorrt_plan": device_plan(inputs, batch=2)}
    e = rt.plan_entry(manifest, "11.5.0", "fp32", "gpu")
    jetson = {"tensorrt": "11.5.0", "l4t": "38.4.0", "model": "NVIDIA Jetson AGX Orin Developer Kit"}
    with pytest.raises(rt.BundleError, match="no JetPack release"):
        rt.check_platform(jetson, e, manifest, "gpu")
    rt.check_platform({"tensorrt": "11.5.0", "l4t": None, "model": None}, e, manifest, "gpu")   # a desktop
    rt.check_platform({**jetson, "tensorrt": "11.4.1"}, rt.plan_entry(manifest, "11.4.1", "fp32", "gpu"), manifest,
                      "gpu")
