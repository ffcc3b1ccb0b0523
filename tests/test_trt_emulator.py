"""The Jetson path on the TensorRT EMULATOR (tests/trt_emulator): `edgeres build` -> `edgeres bundle` -> the device
runtime, for every emulated TensorRT version x {Python bindings, trtexec} x {int8, fp16, fp32} x {GPU, DLA}.

Nothing here ran on TensorRT: the emulator's surface is NVIDIA's binding tables per version and its engines run
the ONNX with ONNX Runtime, so the probe agreement below is computed from real outputs of the planned ONNX.
Real hardware: tests/test_tensorrt_device.py. Run this file alone with `python -m pytest -m trt_emulator`.
"""
from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_bundle import make_run  # tests/ is on sys.path (pytest rootdir insertion)
from trt_emulator import VERSIONS, EmulatedDevice

from edgeres.tensorrt.targets import TARGETS
from edgeres.tensorrt.versions import capabilities

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.trt_emulator
JETSON = {"8.5.2", "8.6", "10.3", "11.4.1"}   # JetPack's TensorRT versions: a Jetson AGX Orin (2 DLA cores)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """The bundle: it carries the FP32-weights INT8 copy for 8.5/8.6 (bundle.py calls
    targets.with_fp32_weights_copy before it plans)."""
    from edgeres.deploy.bundle import make_bundle

    run = make_run(tmp_path_factory.mktemp("run"))
    made = make_bundle(run, tmp_path_factory.mktemp("b") / "bundle", probe_size=16)
    assert (Path(made) / "model_int8.fp32w.onnx").is_file()
    RUN_OF[Path(made)] = run
    return made


RUN_OF: dict[Path, Path] = {}   # bundle -> the run folder it was made from (the manifest names no local path)


def device(root: Path, version: str, **kw) -> EmulatedDevice:
    """JetPack's versions run on an emulated Jetson AGX Orin (sm 8.7, 2 DLA cores, aarch64) unless told otherwise."""
    if version in JETSON and "dla_cores" not in kw:
        kw.setdefault("jetson", "orin")
    kw.setdefault("dla_cores", 0)
    return EmulatedDevice(root / f"dev-{version}", version=version, **kw)


def run_device(dev: EmulatedDevice, bundle: Path, out: Path, *args: str) -> tuple[int, dict, str]:
    p = subprocess.run([sys.executable, str(bundle / "device_runtime.py"), "--bundle", str(bundle), "--out",
                        str(out), "--iterations", "3", "--quiet", *args], env=dev.env(), capture_output=True,
                       text=True, cwd=str(out.parent))
    lines = p.stdout.strip().splitlines()
    return p.returncode, (json.loads(lines[-1]) if lines else {}), p.stderr


def expected_refusal(version: str, backend: str, precision: str, unit: str) -> str | None:
    """What must be refused (a fragment of the one line), from the published facts: no DLA after 10.7 until 11.4.1
    (so none on 10.16 and 11.0); DLA runs FP16/INT8 only; 11.x is strongly typed."""
    if unit == "dla":
        if version in ("10.16", "11.0"):   # DLA: 8.5 .. 10.7 and 11.4.1 (NVIDIA, Working with DLA 11.4.1 / 11.5.0)
            return "no DLA support"
        if precision == "fp32":
            return "DLA runs FP16 or INT8 only"
    if version in ("11.0", "11.4.1") and precision == "fp16":
        return "strongly typed"
    return None


MATRIX = [(v, b, p, u) for v in VERSIONS for b in ("tensorrt", "trtexec") for p in ("int8", "fp16", "fp32")
          for u in ("gpu", "dla")]


@pytest.mark.parametrize("version,backend,precision,unit", MATRIX,
                         ids=[f"{v}-{b}-{p}-{u}" for v, b, p, u in MATRIX])
def test_bundle_on_emulated_device(bundle, tmp_path, version, backend, precision, unit):
    dev = device(tmp_path, version, python_bindings=backend == "tensorrt", trtexec=backend == "trtexec")
    args = ["--precision", precision, "--backend", backend, "--cache-dir", str(tmp_path / "engines")]
    args += ["--dla-core", "1"] if unit == "dla" else []
    code, result, stderr = run_device(dev, bundle, tmp_path / "result.json", *args)
    assert "Traceback" not in stderr, stderr
    refusal = expected_refusal(version, backend, precision, unit)
    if refusal:
        assert code == 2 and result["status"] == "error", result
        assert refusal in result["error"] and "\n" not in result["error"], result["error"]
        assert not list((tmp_path / "engines").rglob("*.plan")), "a refused combination must not build"
        return
    assert code == 0, (result.get("error"), stderr[-2000:])
    assert result["backend"] == backend and result["tensorrt"].startswith(version.split(".")[0])
    assert dev_version(version).startswith(result["device"]["tensorrt"])   # trtexec's banner has 3 parts
    plan = result["plan"]
    assert plan["precision"] == precision and plan["device"] == unit and result["runs_on"] == unit
    # the host's choices, executed: Q/DQ ONNX for INT8 on the GPU; FP32 ONNX + cache for INT8 on DLA
    if precision == "int8":   # 8.5/8.6 document only FP32 weights behind QuantizeLinear: the .fp32w copy
        gpu_onnx = "model_int8.fp32w.onnx" if version in ("8.5.2", "8.6") else "model_int8.onnx"
        implicit = unit == "dla" and version != "11.4.1"   # 11.4.1 DLA: strongly typed, the Q/DQ ONNX, no cache
        assert plan["onnx"] == ("model_fp32.onnx" if implicit else gpu_onnx)
        assert (plan["calib_cache"] is not None) == implicit
    if unit == "dla":
        assert plan["profile"]["min"] == plan["profile"]["max"], "DLA must be static"
    engine = Path(result["engine"]["path"])
    head = json.loads(engine.read_bytes().split(b"\n", 2)[1])   # the emulated engine's own record
    assert head["device_type"] == unit.upper()
    if unit == "dla":   # what the plan said falls back is what the emulator's DLA table put on the GPU
        assert head["layers_on_dla"] > 0 and head["dla_core"] == 1
        assert head["gpu_layers"] == [g["node"] for g in plan["gpu_fallback_layers"]], (head, plan)
        if precision == "int8" and version != "11.4.1":
            assert head["calibration"] == "calibration cache" and head["calibration_scales"] > 0
    v = result["verification"]
    assert v["passed"] and v["top1_agreement_pct"] >= 90.0 and np.isfinite(v["max_abs_diff"])
    assert result["benchmark"]["median_ms"] > 0


def dev_version(folder: str) -> str:
    from trt_emulator.emulator import API, SURFACE

    if folder in SURFACE:   # emulated under its own version number
        return folder
    about = json.loads((API / folder / "python_api.json").read_text())["_about"]
    return about["tensorrt_version_from_NvInferVersion_h"]


# ---------------------------------------------------------------------------------------------- the symptoms
def test_int8_default_path_does_not_pass_the_cache_with_the_qdq_onnx(bundle, tmp_path):
    """Symptom 1: the default device run (int8, Python bindings) used to hand calib.cache to build_engine together
    with the Q/DQ ONNX, which refuses the pair (exit 2 on every Jetson)."""
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["calibration_cache"] == "calib.cache"   # the bundle does carry one (for DLA)
    code, result, _ = run_device(device(tmp_path, "8.5.2"), bundle, tmp_path / "r.json")
    assert code == 0 and result["backend"] == "tensorrt" and result["plan"]["calib_cache"] is None


def test_trtexec_85_accepts_only_its_own_options(tmp_path):
    """Symptom 2: trtexec 8.5.2 knows --buildOnly, not --skipInference; the stand-in fails on an unknown option
    exactly as trtexec does, and our argv for each version uses only that version's options."""
    from test_tensorrt_trtexec import tiny_onnx
    from trt_emulator.trtexec import accepted_options, deprecated_options

    from edgeres.tensorrt.targets import PlanInputs, device_plan

    dev = device(tmp_path, "8.5.2", python_bindings=False)
    onnx = tiny_onnx(tmp_path / "m.onnx")
    p = subprocess.run(["trtexec", f"--onnx={onnx}", "--skipInference"], env=dev.env(), capture_output=True,
                       text=True)
    assert p.returncode != 0 and "Unknown option: --skipInference" in p.stdout
    plan = device_plan(PlanInputs("m.onnx", "m.onnx", onnx, onnx), batch=4)
    for v, target in (("8.5.2", "8.5"), ("8.6", "8.6"), ("10.3", "10.3"), ("10.16", "10"), ("11.0", "11"),
                      ("11.4.1", "11.4.1")):
        known = accepted_options(v)
        for entry in plan["entries"]:
            if entry["target"] == target and not entry["refused"]:
                flags = {a.split("=")[0] for a in entry["trtexec"][1:]}
                assert flags <= known, (v, flags - known)
                # issue 36: no deprecated flag, except --fp16 on 10.12+ (weak typing's only FP16 path for an FP32
                # ONNX), which the entry's warnings (and its script) name
                used = deprecated_options(v) & flags
                assert used <= {"--fp16"}, (v, used)
                if used:
                    assert any("deprecated since 10.12" in w for w in entry["warnings"]), entry["warnings"]


def test_int8_is_the_same_build_on_both_paths(bundle):
    """Symptom 2b: trtexec built int8 as --int8 --fp16 and the Python path as plain int8; one plan now. Issue 36: the
    Q/DQ ONNX is strongly typed with no precision flag wherever TensorRT has strong typing (10.x, 11.x)."""
    m = json.loads((bundle / "manifest.json").read_text())
    for e in m["tensorrt_plan"]["entries"]:
        caps = capabilities(TARGETS[e["target"]][0])
        if e["precision"] == "int8" and not e["refused"] and e["device"] == "gpu":
            assert "--int8" not in e["trtexec"] or not caps.strongly_typed, e["target"]
            assert ("--stronglyTyped" in e["trtexec"]) == (caps.strongly_typed and not caps.always_strongly_typed)
            assert ("--int8" in e["trtexec"]) == (not caps.strongly_typed)
            assert "--fp16" not in e["trtexec"] and "--best" not in e["trtexec"]
            assert e["engine_build"]["precision"] == "int8"
            assert e["engine_build"]["strongly_typed"] is caps.strongly_typed


def test_dla_int8_allows_fp16_for_tensors_the_parser_names(bundle, tmp_path):
    """Symptom 7b: the ONNX parser names the tensor inside a Gemm itself, so a cache made from the ONNX's names has no
    scale for it; DLA has no FP32, so an INT8-only DLA build that keeps that layer on DLA fails. Second reading: the
    MatrixMultiply is not a DLA layer at all (NVIDIA's DLA table), nor is GlobalAveragePool's average Reduce, so
    without GPU fallback every DLA build of this ResNet fails; the plan lets exactly those layers fall back (and still
    allows FP16 for implicit INT8)."""
    m = json.loads((bundle / "manifest.json").read_text())
    dla = [e for e in m["tensorrt_plan"]["entries"] if e["device"] == "dla" and e["precision"] == "int8"
           and not e["refused"]]
    implicit = [e for e in dla if e["calib_cache"]]   # 8.5 .. 10.7; 11.4.1+ takes the Q/DQ ONNX (strongly typed)
    assert implicit and all(e["engine_build"]["precision"] == "best" and "--fp16" in e["trtexec"] for e in implicit)
    assert all(e["engine_build"]["gpu_fallback"] and {g["op"] for g in e["gpu_fallback_layers"]} ==
               {"GlobalAveragePool", "Flatten", "Gemm"} for e in dla)
    assert [e["target"] for e in dla if not e["calib_cache"]] == ["11.4.1"]
    code = f"""
import sys
sys.path[:0] = [{str(REPO / "tests")!r}, {str(REPO / "edgeres" / "tensorrt")!r}]
import engine_build
from trt_emulator.emulator import build_module
trt = build_module("8.5.2")
for fallback in (False, True):
    for precision in ("int8", "best"):
        try:
            engine_build.build_engine({str(bundle / "model_fp32.onnx")!r}, {str(tmp_path / "e.plan")!r}, trt=trt,
                                      precision=precision, dla_core=0, batch=(4, 4, 4), gpu_fallback=fallback,
                                      calib_cache={str(bundle / "calib.cache")!r}, device={{"device": "emu"}})
            print(precision, "built")
        except engine_build.BuildError as e:
            print(precision, "refused")
"""
    p = subprocess.run([sys.executable, "-c", code], env=device(tmp_path, "8.5.2").env(), capture_output=True,
                       text=True)
    assert p.stdout.split() == ["int8", "refused", "best", "refused", "int8", "built", "best", "built"], \
        p.stdout + p.stderr[-1500:]
    assert "Matrix Multiply]_output has no INT8 scale" in p.stderr
    assert "GlobalAveragePool cannot run on DLA (DLA Reduce supports MAX only)" in p.stderr


def test_dla_is_static_and_never_falls_back(tmp_path):
    """Symptom 3: DLA builds used a dynamic profile with GPU fallback (every layer silently on the GPU)."""
    from test_tensorrt_trtexec import tiny_onnx

    from edgeres.errors import ConfigError
    from edgeres.onnx_info import inspect_onnx
    from edgeres.tensorrt.compile import _batch_for
    from edgeres.tensorrt.options import CompileOptions, Precision, validate_options

    info = inspect_onnx(tiny_onnx(tmp_path / "m.onnx"))
    dla = CompileOptions(precision=Precision.FP16, dla_core=0)
    assert _batch_for(info, dla) == (1, 1, 1)
    for fallback in (False, True):
        with pytest.raises(ConfigError, match="fixed batch"):
            validate_options(CompileOptions(precision=Precision.FP16, dla_core=0, batch=(1, 8, 8),
                                            gpu_fallback=fallback), "8.6", is_jetson=True, dla_cores=2)
    with pytest.raises(ConfigError, match="explicit quantization on DLA"):
        validate_options(CompileOptions(precision=Precision.INT8, dla_core=0, batch=(4, 4, 4)), "8.5.2",
                         is_jetson=True, dla_cores=2, onnx_has_qdq=True)
    # the emulator refuses what TensorRT refuses: a dynamic profile on DLA without fallback
    from trt_emulator import emulator

    dev = device(tmp_path, "8.6")
    env = dev.env()
    code = f"""
import sys
sys.path.insert(0, {str(REPO / "tests")!r})
from trt_emulator.emulator import build_module
trt = build_module("8.6")
lg = trt.Logger(trt.Logger.ERROR)
b = trt.Builder(lg)
n = b.create_network(1)
assert trt.OnnxParser(n, lg).parse_from_file({str(tmp_path / "m.onnx")!r})
c = b.create_builder_config()
c.set_flag(trt.BuilderFlag.FP16)
c.default_device_type = trt.DeviceType.DLA
c.DLA_core = 0
pr = b.create_optimization_profile()
pr.set_shape("input", (1, 3, 16, 16), (8, 3, 16, 16), (8, 3, 16, 16))
c.add_optimization_profile(pr)
print(b.build_serialized_network(n, c) is None)
"""
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert p.stdout.strip() == "True" and "dynamic shapes" in p.stderr, p.stderr
    assert emulator.VERSIONS == VERSIONS


def test_runner_dtypes_do_not_use_nptype_or_devicearray_dtype(tmp_path):
    """Symptom 4: TrtRunner used trt.nptype (raises on 8.5.2 with NumPy 1.24-1.26) and DeviceArray.dtype."""
    from test_tensorrt_trtexec import tiny_onnx

    onnx = tiny_onnx(tmp_path / "m.onnx")
    dev = device(tmp_path, "8.5.2", numpy="1.24", dla_cores=0)
    code = f"""
import sys, warnings, numpy as np, onnxruntime as ort
warnings.simplefilter("error")
import tensorrt as trt
try:
    trt.nptype(trt.float32)
    print("nptype ok")
except AttributeError:
    print("nptype raises")
from edgeres.tensorrt.compile import compile_engine
from edgeres.tensorrt.options import CompileOptions
from edgeres.tensorrt.runner import TrtRunner
compile_engine({str(onnx)!r}, {str(tmp_path / 'm.plan')!r}, CompileOptions(batch=(1, 4, 8)))
x = np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32)
ref = ort.InferenceSession({str(onnx)!r}, providers=["CPUExecutionProvider"]).run(None, {{"input": x}})[0]
for graph in (False, True):
    with TrtRunner({str(tmp_path / 'm.plan')!r}, cuda_graph=graph) as r:
        print("diff", float(np.abs(r.infer(x) - ref).max()), float(np.abs(r.infer(x[:2]) - ref[:2]).max()))
"""
    p = subprocess.run([sys.executable, "-c", code], env=dev.env(), capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = p.stdout.splitlines()
    assert lines[0] == "nptype raises"   # the emulated JetPack 5.1 + NumPy 1.24 really breaks nptype
    diffs = [float(v) for line in lines[1:] for v in line.split()[1:]]
    assert len(diffs) == 4 and max(diffs) < 1e-5
    assert "from_dtype" not in p.stderr   # Polygraphy's DeviceArray.dtype deprecation never triggered


def test_device_runtime_syntax_and_version_floor(bundle, tmp_path):
    """Symptom 5: the bundle claimed TensorRT 8.2 (JetPack 4.6); the runtime needs Python >= 3.8, TensorRT >= 8.5."""
    for name in ("device_runtime.py", "engine_build.py", "releases.py"):
        ast.parse((bundle / name).read_text(), feature_version=(3, 8))
    m = json.loads((bundle / "manifest.json").read_text())
    assert not any("8.2" in t for t in m["tensorrt"]["targets"])
    from edgeres.deploy import device_runtime as rt

    with pytest.raises(rt.BundleError, match="TensorRT 8.2.1.8 is not a target"):
        rt.plan_entry(m, "8.2.1.8", "int8", "gpu")
    old = {k: v for k, v in m.items() if k != "tensorrt_plan"}   # a bundle from before the plan
    with pytest.raises(rt.BundleError, match="no TensorRT plan this runtime reads"):
        rt.plan_entry(old, "10.3.0", "int8", "gpu")
    assert rt.plan_entry(m, "10.16.0.72", "int8", "gpu")["target"] == "10"
    assert rt.plan_entry(m, "10.3.0.30", "int8", "gpu")["target"] == "10.3"


def test_version_rules_for_11_4_dla_and_four_part_versions():
    """Symptom 6: 11.4.1 brings DLA back; a version-compatible 8.6.1.6 engine must load on 8.6.1."""
    from edgeres.tensorrt.engine_build import sidecar_mismatch
    from edgeres.tensorrt.versions import capabilities

    assert not capabilities("11.0").dla and not capabilities("11.4.0").dla and capabilities("11.4.1").dla
    side = {"trt_version": "8.6.1.6", "version_compatible": True}
    assert sidecar_mismatch(side, {"trt_version": "8.6.1"}) is None
    assert sidecar_mismatch({"trt_version": "8.6.1.6"}, {"trt_version": "8.6.1"}) is None
    assert sidecar_mismatch({"trt_version": "8.6.1.6"}, {"trt_version": "8.6.2"}) is not None


def test_calibration_cache_is_retagged_for_the_device_tensorrt(bundle, tmp_path):
    """Symptom 7: a cache whose header names another TensorRT is ignored, and trtexec then calibrates on random
    data without an error. The bundle's cache names the host's tag; the device re-tags it to its own."""
    head = (bundle / "calib.cache").read_text().splitlines()[0]
    assert head == "TRT-8601-EntropyCalibration2"          # not 8.5.2's 8502
    dev = device(tmp_path, "8.5.2", python_bindings=False)
    code, result, _ = run_device(dev, bundle, tmp_path / "r.json", "--precision", "int8", "--backend", "trtexec",
                                 "--dla-core", "0", "--cache-dir", str(tmp_path / "e"))
    assert code == 0, result
    engine = Path(result["engine"]["path"])
    assert (engine.parent / "calib.cache").read_text().startswith("TRT-8502-EntropyCalibration2\n")
    assert json.loads(engine.read_bytes().split(b"\n", 2)[1])["calibration"] == "calibration cache"


def test_run_folder_keeps_the_plan_and_trtexec_scripts_without_tensorrt(bundle, tmp_path):
    """The run folder has the plan and a stock trtexec script per target even where this machine has no TensorRT;
    a script runs as written against that version's trtexec and builds a loadable engine."""
    import shutil

    run = RUN_OF[Path(bundle)]
    plan = json.loads((run / "tensorrt" / "plan.json").read_text())
    scripts = sorted(p.name for p in (run / "tensorrt").glob("trtexec-*.sh"))
    assert len(scripts) == sum(1 for e in plan["entries"] if not e["refused"]) >= 20
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    # every DLA script of the plan whose TensorRT is emulated builds under the emulator's DLA rules, on an Orin
    emulated = {"8.5": "8.5.2", "8.6": "8.6", "10.3": "10.3"}
    dla = [(n, emulated[n.split("-")[1]]) for n in scripts if n.endswith("-dla.sh") and n.split("-")[1] in emulated]
    assert len(dla) == 6
    for name, version in dla + [("trtexec-11-int8-gpu.sh", "11.0"), ("trtexec-8.6-int8-gpu.sh", "8.6")]:
        dev = device(tmp_path, version, python_bindings=False)
        p = subprocess.run(["sh", str(copy / "tensorrt" / name)], env=dev.env(), capture_output=True, text=True)
        assert p.returncode == 0, name + p.stdout[-1500:] + p.stderr[-1500:]
        assert "&&&& PASSED" in p.stdout and "random data" not in p.stdout, name


def test_cudart_versioned_name_only(tmp_path):
    """Symptom 8: with only libcudart.so.13 (CUDA 13 runtime, no dev symlink) both copies of the lookup find it."""
    from edgeres.deploy import device_runtime as rt
    from edgeres.tensorrt import engine_build

    assert rt.CUDART_NAMES == engine_build.CUDART_NAMES and "libcudart.so.13" in rt.CUDART_NAMES
    dev = device(tmp_path, "10.16")
    assert sorted(p.name for p in (dev.root / "lib").iterdir()) == ["libcudart.so.13"]
    code = f"""
import sys
sys.path[:0] = [{str(REPO / "edgeres" / "deploy")!r}, {str(REPO / "edgeres" / "tensorrt")!r}]
import device_runtime as rt
import engine_build
print(engine_build.cuda_device()["device"])
rt.CudaRT()
"""
    p = subprocess.run([sys.executable, "-c", code], env=dev.env(), capture_output=True, text=True)
    assert p.returncode == 0 and "emulated GPU" in p.stdout, p.stderr


def test_shared_constants_are_equal():
    """Host and device agree on formats, gates and names (the device runtime is standalone by design)."""
    from edgeres.deploy import bundle as b
    from edgeres.deploy import device_runtime as rt
    from edgeres.tensorrt import engine_build, targets

    assert b.FORMAT == rt.FORMAT and b.MANIFEST == rt.MANIFEST
    assert targets.PLAN_FORMAT == rt.PLAN_FORMAT and tuple(targets.PRECISIONS) == tuple(rt.PRECISIONS)
    assert rt.parse_args([]).precision == "int8"
    gates = rt.check_outputs(np.eye(3), np.eye(3), None, {**b.DEFAULT_GATES}, None)["gates"]
    assert gates[0]["limit"] == b.DEFAULT_GATES["min_top1_agreement_pct"] == 90.0
    for v in ("8.5.2", "8.6.1", "10.3.0", "11.0.0"):
        from edgeres.tensorrt.versions import calib_tag_number

        assert rt.calib_tag(v) == calib_tag_number(v) == engine_build._calib_tag_number(v)


# ---------------------------------------------------------------------------------------------- compile / bench
def test_compile_bench_verify_through_the_emulator(bundle, tmp_path):
    """`edgeres compile`, `edgeres bench --engine` and `edgeres compare` (verification against the ONNX) with the
    .plan, as a user runs them."""
    dev = device(tmp_path, "10.3")
    run = RUN_OF[Path(bundle)]
    plan = tmp_path / "model.plan"
    edgeres = [sys.executable, "-m", "edgeres"]
    p = subprocess.run(edgeres + ["compile", "--onnx", str(run / "export" / "model_int8.onnx"), "--int8", "--out",
                                  str(plan), "--batch", "1,8,16"], env=dev.env(), capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    side = json.loads(Path(f"{plan}.json").read_text())
    assert side["device"] == "edgeres emulated GPU (libcudart stand-in)" and side["trt_version"] == "10.3.0.26"
    assert Path(f"{plan}.trtexec.sh").is_file()
    p = subprocess.run(edgeres + ["bench", "--engine", str(plan), "--batch", "8", "--json"], env=dev.env(),
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "tensorrt" in p.stdout
    p = subprocess.run(edgeres + ["compare", str(run / "export" / "model_int8.onnx"), str(plan), "--probe",
                                  str(run / "probe.npz"), "--batch-size", "8", "--json"], env=dev.env(),
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    got = json.loads(p.stdout)
    assert got["b"]["backend"] == "tensorrt" and got["b"]["device"].startswith("edgeres emulated GPU")
    assert got["top1_agreement_pct"] == 100.0 and got["max_abs_diff"] < 1e-4 and got["samples"] > 0, got


COMPILE_STAGE = r"""
import dataclasses, json, sys
from pathlib import Path
from edgeres.build import PLAN, BuildContext, BuildOptions, StageFailed, run_stage
from edgeres.data import get_data_for
from edgeres.recipe import load_recipe
from edgeres.records import read_records

run = Path(sys.argv[1])
recipe = load_recipe(run / "recipe.yaml")
ctx = BuildContext(opts=BuildOptions(out=run, int8=True, quiet=True, bench_seconds=0), recipe=recipe, run_dir=run,
                   device="cpu", _data=get_data_for(recipe))
ctx.records = {r.stage: r for r in read_records(run)}
step = next(s for s in PLAN if s.name == "compile")
if sys.argv[2] == "fail":   # an impossible limit: the engine's gate must fail
    forced = dataclasses.replace(step.settings(ctx), max_drop=-100.0)
    step = dataclasses.replace(step, settings=lambda c: forced)
try:
    run_stage(ctx, step)
except StageFailed as e:
    print("FAILED", e, file=sys.stderr)
print(json.dumps(ctx.records["compile"].to_dict()))
"""


def test_compile_stage_gates_the_engine_it_built(bundle, tmp_path):
    """Where TensorRT is present (here: the emulator), the compile stage builds the engine beside its output, runs
    it on the evaluation split and gates it against FP32 like the final INT8 model; a failed gate leaves no
    engine/model.plan, keeps model.rejected.plan with its sidecar, and a failed record."""
    dev = device(tmp_path, "10.3")
    run = tmp_path / "run"
    shutil.copytree(RUN_OF[Path(bundle)], run)
    engine = run / "engine" / "model.plan"

    def stage(mode: str) -> dict:
        p = subprocess.run([sys.executable, "-c", COMPILE_STAGE, str(run), mode], env=dev.env(),
                           capture_output=True, text=True)
        assert p.returncode == 0, p.stderr[-3000:]
        return json.loads(p.stdout.strip().splitlines()[-1])

    rec = stage("pass")
    assert rec["status"] == "passed" and rec["artifact"] == str(engine) and engine.is_file(), rec
    names = {g["name"] for g in rec["gates"]}
    assert names == {"top1_drop_pp", "fp32_top1_agreement_pct"} and rec["metrics"]["fp32_top1_agreement_pct"] > 90
    side = json.loads(Path(f"{engine}.json").read_text())
    assert side["engine"] == "model.plan" and all(".unverified" not in a for a in side["trtexec"])
    assert ".unverified" not in Path(f"{engine}.trtexec.sh").read_text()

    for p in (engine, Path(f"{engine}.json"), Path(f"{engine}.trtexec.sh")):
        p.unlink()
    rec = stage("fail")
    assert rec["status"] == "failed" and rec["artifact"] is None and not engine.exists(), rec
    rejected = run / "engine" / "model.rejected.plan"
    assert rejected.is_file() and Path(f"{rejected}.json").is_file()
    assert rec["extra_artifacts"]["rejected"] == str(rejected)
    assert "top-1 drop vs FP32" in rec["message"] and "above the limit of" in rec["message"]
    assert not list((run / "engine").glob(".unverified*"))


# ---------------------------------------------------------------------------------------------- issue 36
def _head(engine: Path) -> dict:
    return json.loads(engine.read_bytes().split(b"\n", 2)[1])


def test_emulator_and_edgeres_never_import_each_other():
    """The emulator is an adversary: its DLA table, placement and platform rules are its own reading of NVIDIA's pages.
    A test fails if tests/trt_emulator imports edgeres or edgeres/tensorrt imports the emulator."""
    for folder, banned in ((REPO / "tests" / "trt_emulator", "edgeres"), (REPO / "edgeres", "trt_emulator")):
        for path in folder.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                assert not any(n == banned or n.startswith(banned + ".") for n in names), (path, names)
    from trt_emulator import emulator

    text = (REPO / "tests" / "trt_emulator" / "emulator.py").read_text()
    assert "ASSUMPTION" in text and "ASSUMPTION" in (REPO / "edgeres" / "tensorrt" / "versions.py").read_text()
    assert emulator._DLA_TABLE and "11.4.1" in emulator.VERSIONS


@pytest.mark.parametrize("version,jetson,ok", [("10.3", "orin", True), ("10.16", "orin", False),
                                               ("11.0", "orin", False), ("11.4.1", "orin", True),
                                               ("11.4.1", "orin-nx", False), ("10.3", "orin-nano", False),
                                               ("8.5.2", "xavier", True), ("8.6", "xavier", False)])
def test_emulator_has_dla_only_where_its_own_table_says(tmp_path, version, jetson, ok):
    """The emulator's builder refuses DLA where NVIDIA ships none (10.8 .. 11.4.0, 11.4.1 off AGX Orin, Orin Nano,
    Xavier on JetPack 6) even when asked directly: edgeres's plan must refuse first, never lean on it."""
    from test_tensorrt_trtexec import tiny_onnx

    onnx = tiny_onnx(tmp_path / "m.onnx", batch=2)
    code = f"""
import sys
sys.path[:0] = [{str(REPO / "tests")!r}, {str(REPO / "edgeres" / "tensorrt")!r}]
import engine_build, tensorrt
try:
    engine_build.build_engine({str(onnx)!r}, {str(tmp_path / "e.plan")!r}, precision="fp32" if
                              engine_build._version_tuple(tensorrt.__version__)[0] >= 11 else "fp16", dla_core=0,
                              gpu_fallback=True, device={{"device": "emu"}})
    print("built")
except engine_build.BuildError as e:
    print("refused")
"""
    dev = EmulatedDevice(tmp_path / "dev", version=version, jetson=jetson)
    p = subprocess.run([sys.executable, "-c", code], env=dev.env(), capture_output=True, text=True)
    assert p.stdout.split()[-1:] == (["built"] if ok else ["refused"]), p.stdout + p.stderr[-800:]


def test_device_refuses_dla_off_agx_orin_and_later_11x_on_jetson(bundle, tmp_path):
    """Done when: DLA refused on 10.8 .. 11.4.0 and 11.5+ (plan lookup) and on a non-AGX Orin with 11.4.1 (the
    device's own model, emulated OS), one line, exit 2, nothing built; 11.4.1 DLA INT8 on an AGX Orin builds."""
    from edgeres.deploy import device_runtime as rt

    m = json.loads((bundle / "manifest.json").read_text())
    for version in ("10.8.0", "10.16.0", "11.0.0", "11.4.0", "11.5.0", "11.6.2"):
        with pytest.raises(rt.BundleError, match="no DLA support"):
            rt.plan_entry(m, version, "int8", "dla")
    assert rt.plan_entry(m, "11.5.0", "fp32", "gpu")["platforms"] == ["desktop"]
    nx = EmulatedDevice(tmp_path / "nx", version="11.4.1", jetson="orin-nx", trtexec=False)
    code, result, stderr = run_device(nx, bundle, tmp_path / "r.json", "--dla-core", "0", "--cache-dir",
                                      str(tmp_path / "e1"))
    assert code == 2 and "Jetson AGX Orin only" in result["error"] and "Orin NX" in result["error"], result
    assert "\n" not in result["error"] and "Traceback" not in stderr
    assert not list((tmp_path / "e1").rglob("*.plan"))
    old = EmulatedDevice(tmp_path / "jp6", version="11.4.1", jetson="orin", trtexec=False,
                         l4t="# R36 (release), REVISION: 4.0, GCID: 0, BOARD: generic, EABI: aarch64")
    code, result, _ = run_device(old, bundle, tmp_path / "r.json", "--dla-core", "0", "--cache-dir",
                                 str(tmp_path / "e2"))
    assert code == 2 and "needs JetPack 7.2.2 or later" in result["error"], result
    agx = EmulatedDevice(tmp_path / "agx", version="11.4.1", jetson="orin", trtexec=False)
    code, result, stderr = run_device(agx, bundle, tmp_path / "r.json", "--dla-core", "0", "--cache-dir",
                                      str(tmp_path / "e3"))
    assert code == 0 and result["runs_on"] == "dla" and result["plan"]["onnx"] == "model_int8.onnx", \
        (result.get("error"), stderr[-1500:])
    build = result["engine"]["build"]
    assert build["strongly_typed"] and build["builder_flags"] == ["GPU_FALLBACK"]
    assert build["dla_capability"]["method"].startswith("parser capability report")
    assert sorted(build["dla_capability"]["gpu_layers"]) == sorted(g["node"] for g in
                                                                   result["plan"]["gpu_fallback_layers"])


def test_strongly_typed_10x_int8_script(bundle, tmp_path):
    """Done when: the 10.x INT8 script is strongly typed (--stronglyTyped, no --int8/--fp16) and builds under 10.3's
    trtexec into an engine with no precision flag; 8.6's keeps the weakly typed --int8 (no strong typing there)."""
    run = RUN_OF[Path(bundle)]
    text = (run / "tensorrt" / "trtexec-10.3-int8-gpu.sh").read_text()
    assert "--stronglyTyped" in text and "--int8" not in text and "--fp16" not in text
    assert "--explicitBatch" not in (run / "tensorrt" / "trtexec-8.6-int8-gpu.sh").read_text()
    assert "--int8" in (run / "tensorrt" / "trtexec-8.6-int8-gpu.sh").read_text()
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    dev = device(tmp_path, "10.3", python_bindings=False)
    p = subprocess.run(["sh", str(copy / "tensorrt" / "trtexec-10.3-int8-gpu.sh")], env=dev.env(),
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-1500:]
    head = _head(copy / "tensorrt" / "model-int8-gpu.plan")
    assert head["strongly_typed"] and head["explicit_quantization"] and "INT8" not in head["flags"]
    assert head["config"]["builder_optimization_level"] == 3 and head["config"]["workspace"] == 1024 << 20


@pytest.mark.parametrize("version,precision,unit", [("8.6", "int8", "gpu"), ("10.3", "int8", "dla"),
                                                    ("10.3", "int8", "gpu"), ("11.4.1", "int8", "dla")])
def test_both_device_paths_build_identical_configurations(bundle, tmp_path, version, precision, unit):
    """Done when: the Python and trtexec paths of the device runtime build the same plan entry with the same builder
    configuration (flags, workspace, typing, optimization level, timing cache, profile, device, DLA core), compared
    on the configuration the emulated builder recorded in each engine, not on the argv."""
    configs = []
    for backend in ("tensorrt", "trtexec"):
        dev = device(tmp_path / backend, version, python_bindings=backend == "tensorrt",
                     trtexec=backend == "trtexec")
        args = ["--precision", precision, "--backend", backend, "--cache-dir", str(tmp_path / backend / "e")]
        code, result, stderr = run_device(dev, bundle, tmp_path / f"{backend}.json", *args,
                                          *(["--dla-core", "1"] if unit == "dla" else []))
        assert code == 0, (result.get("error"), stderr[-1500:])
        configs.append(_head(Path(result["engine"]["path"]))["config"])
        assert (Path(result["engine"]["path"]).parent / "timing.cache").is_file()
    assert configs[0] == configs[1]
    assert configs[0]["workspace"] == 1024 << 20 and configs[0]["timing_cache"] == "new"


def test_jetson_sidecar_end_to_end(bundle, tmp_path):
    """Done when: a build on an emulated Jetson AGX Orin records a Jetson sidecar (aarch64, Jetson, its module) from the
    emulated device, not the machine running the test; edgeres refuses that engine on a desktop as the emulated
    TensorRT does, accepts it on the Orin, and the device runtime rebuilds a cached engine whose sidecar is foreign."""
    from edgeres.tensorrt.engine_build import sidecar_mismatch

    orin = device(tmp_path, "10.3", trtexec=False)
    code, result, stderr = run_device(orin, bundle, tmp_path / "r.json", "--precision", "fp16", "--cache-dir",
                                      str(tmp_path / "e"))
    assert code == 0, (result.get("error"), stderr[-1500:])
    engine = Path(result["engine"]["path"])
    side = json.loads(Path(f"{engine}.json").read_text())
    assert side["is_jetson"] and side["machine"] == "aarch64" and "AGX Orin" in side["model"]
    assert side["compute_capability"] == "8.7"
    desktop = {"trt_version": side["trt_version"], "machine": "x86_64", "system": "Linux", "is_jetson": False,
               "compute_capability": "8.7"}
    assert "not portable across platforms" in sidecar_mismatch(side, desktop)
    here = {"trt_version": side["trt_version"], "machine": "aarch64", "system": side["system"], "is_jetson": True,
            "compute_capability": "8.7"}
    assert sidecar_mismatch(side, here) is None
    code = f"""
import sys
sys.path.insert(0, {str(REPO / "tests")!r})
from trt_emulator.emulator import build_module
trt = build_module("10.3")
print(trt.Runtime(trt.Logger(trt.Logger.ERROR)).deserialize_cuda_engine(open({str(engine)!r}, "rb").read()) is None)
"""
    desk = EmulatedDevice(tmp_path / "desk", version="10.3", compute_capability="8.7")
    p = subprocess.run([sys.executable, "-c", code], env=desk.env(), capture_output=True, text=True)
    assert p.stdout.strip() == "True", p.stderr[-800:]   # the emulated TensorRT refuses it on a desktop too
    side["machine"] = "x86_64"   # a cache folder copied from elsewhere: rebuilt, not loaded
    Path(f"{engine}.json").write_text(json.dumps(side))
    code, result, stderr = run_device(orin, bundle, tmp_path / "r2.json", "--precision", "fp16", "--cache-dir",
                                      str(tmp_path / "e"))
    assert code == 0 and result["engine"]["cached"] is False, (result, stderr[-800:])


def test_workspace_limits_and_timing_caches_are_not_ignored(tmp_path, monkeypatch):
    """The emulator fails a build whose workspace is too small (both paths alike), and a timing cache from another
    TensorRT version is refused by its builder: engine_build starts from an empty one and says so."""
    from test_tensorrt_trtexec import tiny_onnx
    from trt_emulator.emulator import build_module

    from edgeres.tensorrt import engine_build

    onnx = tiny_onnx(tmp_path / "m.onnx")
    with pytest.raises(engine_build.BuildError, match="failed to build"):
        engine_build.build_engine(onnx, tmp_path / "a.plan", trt=build_module("10.3"), batch=(1, 64, 512),
                                  workspace_mb=1, device={"device": "emu"})
    dev = EmulatedDevice(tmp_path / "dev", version="10.3", python_bindings=False)
    p = subprocess.run(["trtexec", f"--onnx={onnx}", "--minShapes=input:1x3x16x16", "--optShapes=input:64x3x16x16",
                        "--maxShapes=input:512x3x16x16", "--memPoolSize=workspace:1", "--skipInference"],
                       env=dev.env(), capture_output=True, text=True)
    assert p.returncode != 0 and "insufficient workspace" in p.stdout + p.stderr
    cache = tmp_path / "t.cache"
    info = engine_build.build_engine(onnx, tmp_path / "b.plan", trt=build_module("8.6"), timing_cache=cache,
                                     device={"device": "emu"})
    assert info["timing_cache_state"] == "new" and cache.is_file()
    info = engine_build.build_engine(onnx, tmp_path / "c.plan", trt=build_module("8.6"), timing_cache=cache,
                                     device={"device": "emu"})
    assert info["timing_cache_state"] == "loaded"
    info = engine_build.build_engine(onnx, tmp_path / "d.plan", trt=build_module("10.3"), timing_cache=cache,
                                     device={"device": "emu"})
    assert info["timing_cache_state"].startswith("replaced")
    monkeypatch.setenv("EDGERES_EMULATED_CC", "8.9")   # same TensorRT, another GPU: refused too
    info = engine_build.build_engine(onnx, tmp_path / "e.plan", trt=build_module("10.3"), timing_cache=cache,
                                     device={"device": "emu"})
    assert info["timing_cache_state"].startswith("replaced")
