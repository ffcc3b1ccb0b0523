"""`edgeres compile`, `edgeres calib-cache`, `edgeres trt-status` as a user runs them, without TensorRT."""
import json

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import export_tiny_onnx
from test_tensorrt_trtexec import tiny_onnx  # tests/ is on sys.path (pytest rootdir insertion)

from edgeres.cli import main
from edgeres.tensorrt.calib_cache import read_calibration_cache

try:
    import tensorrt  # noqa: F401
    HAVE_TRT = True
except ImportError:
    HAVE_TRT = False

no_trt = pytest.mark.skipif(HAVE_TRT, reason="checks the behaviour when TensorRT is absent")


def run(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_help_lists_commands():
    out = run("--help").output
    assert "compile" in out and "calib-cache" in out and "trt-status" in out
    for cmd in ("compile", "calib-cache", "trt-status"):
        assert run(cmd, "--help").exit_code == 0


@no_trt
def test_compile_without_tensorrt_writes_trtexec_and_fails(tmp_path):
    onnx_path = tiny_onnx(tmp_path / "m.onnx")
    r = run("compile", "--onnx", str(onnx_path), "--out", str(tmp_path / "m.plan"), "--fp16")
    assert r.exit_code == 1
    last = r.output.strip().splitlines()[-1]
    assert last.startswith("Error: TensorRT is not installed") and "trtexec command for TensorRT 10.3" in last
    assert "--fp16" in r.output and not (tmp_path / "m.plan").exists()
    assert "--saveEngine=" in (tmp_path / "m.plan.trtexec.sh").read_text()


@no_trt
def test_trt_status_json():
    r = run("trt-status", "--json")
    data = json.loads(r.output)
    assert r.exit_code == 0 and data["available"] is False and "not installed" in data["reason"]


def test_plan_for_jetson_target(tmp_path):
    onnx_path = tiny_onnx(tmp_path / "m.onnx")
    r = run("compile", "--onnx", str(onnx_path), "--out", str(tmp_path / "m.plan"), "--trt-version", "8.5.2",
            "--jetson", "--int8", "--fp16", "--dla-core", "0", "--gpu-fallback", "--batch", "1",
            "--calib-cache", str(_cache(tmp_path)), "--json")
    assert r.exit_code == 0, r.output
    plan = json.loads(r.output)
    assert plan["trt_version"] == "8.5.2" and "--useDLACore=0" in plan["trtexec"] and "--buildOnly" in plan["trtexec"]
    assert plan["trtexec_script"].endswith("m.plan.trtexec.sh")
    r2 = run("compile", "--onnx", str(onnx_path), "--out", str(tmp_path / "m.plan"), "--trt-version", "8.5.2")
    assert "already exists; pass --force" in r2.output and r2.exit_code == 1   # refused, not "exit 0, not written"


def _cache(tmp_path):
    p = tmp_path / "c.cache"
    p.write_text("TRT-8502-EntropyCalibration2\n")
    return p


@pytest.mark.parametrize("args, message", [
    (["--trt-version", "11.0", "--fp16"], "strongly typed"),
    (["--trt-version", "11.0", "--dla-core", "0", "--fp16", "--jetson"], "no DLA support"),
    (["--trt-version", "10.3", "--dla-core", "0", "--fp16"], "needs a Jetson"),
    (["--trt-version", "8.5", "--version-compatible"], "needs TensorRT 8.6"),
    (["--trt-version", "7.1"], "not supported"),
    (["--trt-version", "10.3", "--batch", "8,1,2"], "min <= opt <= max"),
    # issue 36: no DLA from 11.5 (nor anything on a Jetson), 11.4.1's DLA on AGX Orin only
    (["--trt-version", "11.5", "--jetson", "--dla-core", "0", "--batch", "1"], "no DLA support"),
    (["--trt-version", "11.5", "--jetson"], "is not for Jetson"),
    (["--trt-version", "11.4.1", "--jetson", "--jetson-module", "orin-nx", "--dla-core", "0", "--batch", "1"],
     "DLA on Jetson AGX Orin only"),
    (["--trt-version", "11.4.1", "--jetson", "--dla-core", "0", "--batch", "1"], "--jetson-module agx-orin"),
    (["--trt-version", "10.3", "--jetson-module", "agx-orin"], "needs --jetson"),
])
def test_refusals_are_one_line(tmp_path, args, message):
    onnx_path = tiny_onnx(tmp_path / "m.onnx")
    r = run("compile", "--onnx", str(onnx_path), "--out", str(tmp_path / "m.plan"), *args)
    assert r.exit_code == 1
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0]


def test_help_texts_say_what_each_version_does():
    """Issue 36: the device runtime's --dla-core help matches the plan (GPU fallback for the listed layers); compile's
    --fp16/--int8 help names the strongly typed path and the 10.12 deprecation."""
    import contextlib
    import io

    from edgeres.deploy import device_runtime as rt

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
        rt.parse_args(["--help"])
    text = " ".join(buf.getvalue().split())
    assert "no GPU fallback" not in text and "fall back to the GPU" in text
    assert rt.parse_args([]).workspace_mb is None   # the plan's workspace, on both build paths
    r = run("compile", "--help")
    assert "deprecated since 10.12" in " ".join(r.output.split()) and "strongly typed" in r.output


def test_missing_onnx_is_clear(tmp_path):
    r = run("compile", "--onnx", str(tmp_path / "nope.onnx"), "--out", str(tmp_path / "m.plan"), "--trt-version",
            "10.3")
    assert r.exit_code == 1 and "ONNX file not found" in r.output


def test_calib_cache_command(tmp_path):
    onnx_path = tiny_onnx(tmp_path / "m.onnx")
    x = np.random.default_rng(0).standard_normal((6, 3, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "probe.npz", x=x)
    out = tmp_path / "calibration" / "calib.cache"
    r = run("calib-cache", "--onnx", str(onnx_path), "--images", str(tmp_path / "probe.npz"), "--trt-version",
            "8.6.2", "--out", str(out), "--json")
    assert r.exit_code == 0, r.output
    tag, scales = read_calibration_cache(out)
    assert tag == "TRT-8602-EntropyCalibration2" and set(scales) == {"input", "c", "r", "g", "f", "logits"}
    assert np.float32(scales["input"]) == np.float32(np.abs(x).max()) / np.float32(127)
    again = run("calib-cache", "--onnx", str(onnx_path), "--images", str(tmp_path / "probe.npz"), "--trt-version",
                "8.6.2", "--out", str(out))
    assert again.exit_code == 1 and "--force" in again.output
    r11 = run("calib-cache", "--onnx", str(onnx_path), "--images", str(tmp_path / "probe.npz"), "--trt-version",
              "11.0", "--out", str(tmp_path / "x.cache"))
    assert r11.exit_code == 1 and "no implicit INT8 calibration" in r11.output


def test_calib_cache_from_a_dataset_uses_the_images_ptq_calibrates_on(tmp_path):
    """`edgeres calib-cache --dataset` draws its images as PTQ does (quantize.calibration_indices, same count and
    seed): the TensorRT cache and the PTQ manifest describe one calibration set."""
    import torch

    from edgeres.data import get_data, split_holdout
    from edgeres.quantize import calibration_indices

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(4, 10))
    onnx_path = export_tiny_onnx(net, tmp_path / "digits.onnx", shape=(1, 1, 32, 32))
    r = run("calib-cache", "--onnx", str(onnx_path), "--dataset", "digits", "--count", "40", "--seed", "3",
            "--trt-version", "8.6.2", "--out", str(tmp_path / "c.cache"), "--json")
    assert r.exit_code == 0, r.output
    used = json.loads(r.output)["calibration_indices"]
    n = len(split_holdout(get_data(dataset="digits"), 0.1, seed=3).calib)   # PTQ's split: less the holdout
    assert n == 1438 - 144
    assert used == calibration_indices(n, 40, seed=3) and used != list(range(40))
    assert len(set(used)) == 40
