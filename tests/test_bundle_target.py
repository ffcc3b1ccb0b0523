"""Issue 33: the bundle says what to do next and ships what one device needs - README.txt (what is inside, how to run
it with the runtime's real options, what the result and the exit codes mean), the size and the next two commands
from `edgeres bundle`, and `--target NAME` carrying only one TensorRT's plan entries and files."""
from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_bundle import make_run  # tests/ is on sys.path (pytest rootdir insertion)

from edgeres.deploy import device_runtime as rt
from edgeres.deploy.bundle import bundle_bytes, make_bundle, target_names, verify_bundle
from edgeres.errors import ConfigError


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("run"))


def _files(bundle: Path) -> set[str]:
    return {p.name for p in bundle.iterdir() if p.is_file()}


def test_readme_says_what_is_inside_how_to_run_and_what_the_result_means(run_dir, tmp_path):
    b = make_bundle(run_dir, tmp_path / "b", probe_size=16)
    m = verify_bundle(b)   # README.txt is listed (and hashed) like every file
    assert m["readme"] == "README.txt" and "README.txt" in m["files"]
    text = (b / "README.txt").read_text()
    for name in _files(b):
        assert re.search(rf"^  {re.escape(name)} +\S", text, re.M), f"{name} is not described"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
        rt.parse_args(["--help"])
    for option in set(re.findall(r"--[a-z][a-z0-9-]+", buf.getvalue())):
        assert option in text, f"the runtime's {option} is missing"
    assert "./edgeres-device" in text and "python3" in text and "numpy" in text and "onnxruntime" in text
    assert f"  {rt.EXIT_OK}  passed" in text and f"  {rt.EXIT_GATE}  a gate failed" in text
    assert f"  {rt.EXIT_UNUSABLE}  the bundle or the device cannot be used" in text
    assert "on the 16 probe images" in text and "at least 90.0 %" in text and "at most 5.0 pp" in text
    again = make_bundle(run_dir, tmp_path / "again", probe_size=16)
    assert (again / "README.txt").read_bytes() == text.encode(), "the same run gives the same bundle"


def test_target_names_come_from_the_plan():
    targets = {"8.5": {"label": "TensorRT 8.5.2 (JetPack 5.1.x)", "rules": "8.5.2"},
               "10.3": {"label": "TensorRT 10.3 (JetPack 6.1/6.2)", "rules": "10.3.0"},
               "11.4.1": {"label": "TensorRT 11.4.1+ (JetPack 7.2.2+ on Jetson AGX Orin)", "rules": "11.4.1"}}
    names = target_names(targets)
    assert names["jetpack5.1"] == "8.5" and names["jetpack6.1"] == names["jetpack6.2"] == "10.3"
    assert names["tensorrt8.5.2"] == "8.5" and names["jetpack7.2.2"] == "11.4.1" and names["11.4.1"] == "11.4.1"


def test_a_target_carries_only_its_entries_and_files(run_dir, tmp_path):
    full = make_bundle(run_dir, tmp_path / "full", probe_size=16)
    jp61 = make_bundle(run_dir, tmp_path / "jp61", probe_size=16, target="JetPack-6.1")
    desktop = make_bundle(run_dir, tmp_path / "desktop", probe_size=16, target="10")
    old = make_bundle(run_dir, tmp_path / "old", probe_size=16, target="tensorrt8.5")
    fp32w = "model_int8.fp32w.onnx"
    assert fp32w in _files(full) and "calib.cache" in _files(full)
    for b, key, calib in ((jp61, "10.3", True), (desktop, "10", False), (old, "8.5", True)):
        m = verify_bundle(b)
        assert m["target"]["name"] == key and m["tensorrt"]["targets"] == [m["target"]["label"]]
        plan = m["tensorrt_plan"]
        assert list(plan["targets"]) == [key] and {e["target"] for e in plan["entries"]} == {key}
        assert len(plan["entries"]) == 6, "int8/fp16/fp32 x gpu/dla, refusals included"
        named = {e["onnx"] for e in plan["entries"] if not e["refused"]}
        assert named <= _files(b) and (fp32w in _files(b)) == (fp32w in named)
        assert ("calib.cache" in _files(b)) == calib == (m["calibration_cache"] == "calib.cache")
        assert {"model_fp32.onnx", "model_int8.onnx"} <= _files(b), "the CPU fallback's models stay"
    assert fp32w not in _files(jp61) and fp32w in _files(old), "TensorRT 10 reads INT8 weights; 8.5 does not"
    assert "not carried: no plan entry of TensorRT 10.x" in verify_bundle(desktop)["calibration_note"]
    assert verify_bundle(full)["target"] is None
    sizes = {b.name: bundle_bytes(b) for b in (full, jp61, desktop, old)}
    saved = (run_dir / "tensorrt" / fp32w).stat().st_size
    assert sizes["jp61"] <= sizes["full"] - saved and sizes["desktop"] < sizes["jp61"] < sizes["old"] < sizes["full"]
    assert "for TensorRT 10.3 (JetPack 6.1/6.2) only" in (jp61 / "README.txt").read_text()


def test_an_unknown_target_is_one_line_with_the_valid_names(run_dir, tmp_path):
    with pytest.raises(ConfigError) as e:
        make_bundle(run_dir, tmp_path / "b", target="jetpack6.3")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("unknown --target 'jetpack6.3': valid names are 8.5, 8.6, 10, 10.3, "
                                              "11, 11.4.1, jetpack5.1, jetpack6.0, jetpack6.1, jetpack6.2, "
                                              "jetpack7.2.2 (or tensorrt<version>); did you mean jetpack6.2"), msg
    assert not (tmp_path / "b").exists() and not list(tmp_path.iterdir()), "nothing written"
    from edgeres.cli import main

    res = CliRunner().invoke(main, ["bundle", str(run_dir), "--out", str(tmp_path / "c"), "--target", "trt-9"])
    assert res.exit_code != 0 and "unknown --target 'trt-9'" in res.output and "Traceback" not in res.output


def test_bundle_command_says_size_next_commands_and_device_needs(run_dir, tmp_path):
    from edgeres.cli import main

    out = tmp_path / "dist" / "cam"
    res = CliRunner().invoke(main, ["bundle", str(run_dir), "--out", str(out), "--target", "10.3", "--probe-size",
                                    "16"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    size = bundle_bytes(out)
    assert lines[0].startswith(f"bundle: {out} (") and f"{size / 1e6:.1f} MB" in lines[0]
    assert "for TensorRT 10.3 (JetPack 6.1/6.2)" in lines[1] and "README.txt says how to run it" in lines[1]
    assert lines[2:5] == ["next, copy it to the device and run it there:", f"  scp -r {out} USER@DEVICE:",
                          "  ssh USER@DEVICE ./cam/edgeres-device"]
    assert lines[5] == "the device needs python3 + numpy, and TensorRT (JetPack) or onnxruntime"
    res = CliRunner().invoke(main, ["bundle", str(run_dir), "--out", str(tmp_path / "t"), "--tar", "--json",
                                    "--probe-size", "16"])
    doc = json.loads(res.output)
    assert doc["bytes"] == (tmp_path / "t.tar.gz").stat().st_size and doc["target"] is None
    assert doc["next"] == [f"scp {tmp_path / 't.tar.gz'} USER@DEVICE:",
                           "ssh USER@DEVICE 'tar -xzf t.tar.gz && ./t/edgeres-device'"]


@pytest.mark.trt_emulator
def test_a_targeted_bundle_runs_on_its_tensorrt_and_is_refused_by_another(run_dir, tmp_path):
    """On the TensorRT emulator: an 8.5 bundle builds its INT8 engine from the FP32-weights copy on TensorRT 8.5.2
    and is refused in one line (exit 2) by TensorRT 10.3; a 10.3 bundle builds DLA INT8 from its cache there."""
    import subprocess
    import sys

    from trt_emulator import EmulatedDevice

    def run(bundle: Path, version: str, *args: str):
        dev = EmulatedDevice(tmp_path / f"dev-{version}", version=version, jetson="orin", dla_cores=2,
                             python_bindings=True, trtexec=False)
        p = subprocess.run([sys.executable, str(bundle / "device_runtime.py"), "--bundle", str(bundle), "--out",
                            str(tmp_path / "r.json"), "--iterations", "2", "--quiet", "--cache-dir",
                            str(tmp_path / f"engines-{version}"), *args], env=dev.env(), capture_output=True,
                           text=True, cwd=str(tmp_path))
        return p.returncode, json.loads(p.stdout.strip().splitlines()[-1])

    old = make_bundle(run_dir, tmp_path / "old", probe_size=16, target="8.5")
    code, result = run(old, "8.5.2")
    assert code == 0 and result["plan"]["onnx"] == "model_int8.fp32w.onnx", result
    code, result = run(old, "10.3")
    assert code == 2 and "is not a target of this bundle (targets: TensorRT 8.5.2 (JetPack 5.1.x))" in \
        result["error"], result
    jp61 = make_bundle(run_dir, tmp_path / "jp61", probe_size=16, target="jetpack6.1")
    code, result = run(jp61, "10.3", "--dla-core", "0")
    assert code == 0 and result["plan"]["calib_cache"] == "calib.cache" and result["runs_on"] == "dla", result
