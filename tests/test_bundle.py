"""The deploy bundle and the standalone device runtime, with a real tiny model, real ONNX and ONNX Runtime."""
from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]


_BUILT: dict[str, Path] = {}


def make_run(root: Path, **_unused) -> Path:
    """A run folder made by a real small `edgeres build --int8` on the embedded digits (built once per test
    process, then copied): records, probe, meta and both ONNX files exactly as the pipeline writes them."""
    import atexit
    import os
    import shutil
    import tempfile

    from edgeres.build import BuildOptions, build

    kept = os.environ.get("EDGERES_TINY_RUN")   # a developer's folder: built there once and kept (its records
    if "run" not in _BUILT and kept and (Path(kept) / "tiny").is_dir():   # name their own absolute paths), saving
        _BUILT["run"] = Path(kept) / "tiny"                                # the 2-minute build per test process
    if "run" not in _BUILT:
        home = Path(kept) if kept else Path(tempfile.mkdtemp(prefix="edgeres-tiny-run-"))
        if not kept:
            atexit.register(shutil.rmtree, home, ignore_errors=True)
        result = build(BuildOptions(out=home / "tiny", arch="mnist_resnet", epochs=3, qat_epochs=0, int8=True,
                                    bench_seconds=0.05, max_drop=100.0, quiet=True,
                                    overrides={"quant.calib_size": 128}))
        assert result.ok, result.message
        _BUILT["run"] = home / "tiny"
    run = root / "runs" / "tiny"
    shutil.copytree(_BUILT["run"], run)
    return run


def disagreeing_copy(bundle: Path, dest: Path) -> Path:
    """A copy of `bundle` whose INT8 reference logits disagree with the model (rolled by one class), re-signed in
    its manifest: intact on disk, failing verification on any device."""
    import shutil

    from edgeres.io import sha256_file

    shutil.copytree(bundle, dest)
    with np.load(dest / "probe.npz") as pz:
        arrays = dict(pz)
    arrays["ref_int8"] = np.roll(arrays["ref_int8"], 1, axis=1)
    np.savez(dest / "probe.npz", **arrays)
    m = json.loads((dest / "manifest.json").read_text())
    m["files"]["probe.npz"].update(sha256=sha256_file(dest / "probe.npz"), size=(dest / "probe.npz").stat().st_size)
    (dest / "manifest.json").write_text(json.dumps(m, indent=2, sort_keys=True) + "\n")
    return dest


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def bundle(run_dir, tmp_path_factory) -> Path:
    from edgeres.deploy.bundle import make_bundle

    return make_bundle(run_dir, tmp_path_factory.mktemp("b") / "bundle", probe_size=16)


def run_device(bundle: Path, *args: str, python: str = sys.executable) -> subprocess.CompletedProcess:
    """The runtime as a device runs it: isolated interpreter, cwd outside the repo, edgeres and torch blocked."""
    blocker = ("import sys\nclass B:\n def find_spec(self, name, path=None, target=None):\n"
               "  if name.split('.')[0] in ('edgeres', 'torch'): raise ImportError('blocked: ' + name)\n"
               "sys.meta_path.insert(0, B())\nsys.argv = sys.argv[1:]\nimport runpy\n"
               "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    return subprocess.run([python, "-I", "-c", blocker, str(bundle / "device_runtime.py"), "--bundle", str(bundle),
                           "--iterations", "5", *args], capture_output=True, text=True, cwd=bundle.parent)


def test_bundle_layout_and_manifest(bundle, run_dir):
    from edgeres.io import sha256_file

    m = json.loads((bundle / "manifest.json").read_text())
    for name in ("model_fp32.onnx", "model_int8.onnx", "calib.cache", "probe.npz", "device_runtime.py",
                 "edgeres_stats.py", "edgeres-device"):
        assert (bundle / name).is_file(), name
        assert m["files"][name]["sha256"] == sha256_file(bundle / name)
    assert set(m["files"]) == {p.name for p in bundle.iterdir() if p.name != "manifest.json"}
    assert m["input"] == {"name": "input", "shape": ["N", 1, 32, 32], "dtype": "float32", "layout": "NCHW"}
    assert m["class_names"] == [str(i) for i in range(10)]
    meta = json.loads((run_dir / "meta.json").read_text())
    assert m["preprocessing"]["mean"] == meta["mean"] and len(meta["mean"]) == 1
    # what build's verify stage measured, per stage and backend, in percent
    report = json.loads((run_dir / "report.json").read_text())
    assert m["expected_accuracy"]["run_top1_pct"] == {f"{r['stage']}/{r['backend']}": r["top1"]
                                                      for r in report["rows"] if r.get("top1") is not None}
    assert set(m["expected_accuracy"]["run_top1_pct"]) >= {"train/torch", "ptq/torch", "export_int8/onnxruntime"}
    b = m["build"]
    assert b["ok"] and b["verdict"] == "PASSED" and not b["allow_failed"] and b["not_measurable"] == []
    # the run was built with --max-drop 100: named as loosened, in the manifest and on its verdict line
    assert {x["key"] for x in b["limits_loosened"]} == {"gates.max_drop_ptq", "gates.max_drop_qat"}
    assert b["message"].startswith("PASSED: all gates passed; limits loosened: gates.max_drop_ptq 100 (shipped 3, "
                                   "from --max-drop 100)")
    assert m["tensorrt"]["validated"] == [] and m["tensorrt"]["targets"]
    assert m["calibration_cache"] == "calib.cache" and m["probe"]["count"] == 16
    assert (m["runtime"]["engine_build"] == "engine_build.py") == (REPO / "edgeres/tensorrt/engine_build.py").is_file()
    with np.load(bundle / "probe.npz") as p:
        assert p["x"].shape == (16, 1, 32, 32) and p["ref_fp32"].shape == p["ref_int8"].shape == (16, 10)
        acc = 100.0 * float((p["ref_fp32"].argmax(1) == p["y"]).mean())
        assert m["expected_accuracy"]["probe_pct"]["fp32"] == pytest.approx(acc)   # %, as everywhere
    assert stat.S_IMODE((bundle / "edgeres-device").stat().st_mode) == 0o755
    assert stat.S_IMODE((bundle / "model_int8.onnx").stat().st_mode) == 0o644


def test_device_runtime_passes_with_onnxruntime_and_imports_no_edgeres(bundle, tmp_path):
    out = tmp_path / "result.json"
    p = run_device(bundle, "--out", str(out))
    assert p.returncode == 0, p.stderr + p.stdout
    printed = json.loads(p.stdout.strip().splitlines()[-1])
    saved = json.loads(out.read_text())
    assert printed == saved
    assert saved["status"] == "passed" and saved["backend"] == "onnxruntime" and saved["tensorrt"] is None
    assert "ONNX Runtime" in saved["note"]
    v = saved["verification"]
    assert v["top1_agreement_pct"] == 100.0 and v["max_abs_diff"] < 1e-4
    # the device decides by the host's rule (edgeres_stats.py in the bundle): 16 of 16 images cannot show >= 90 %
    assert v["verdict"] == "not measurable" and v["gates"][0]["outcome"] == "not measurable" and v["passed"]
    assert v["gates"][0]["lo"] < 90.0 < v["gates"][0]["hi"] and v["gates"][0]["resolve_n"] > 16
    assert [x["key"] for x in saved["host_verdict"]["limits_loosened"]] == ["gates.max_drop_ptq", "gates.max_drop_qat"]
    m = json.loads((bundle / "manifest.json").read_text())
    assert v["accuracy_pct"] == pytest.approx(m["expected_accuracy"]["probe_pct"]["int8"])
    assert m["gates"] == {"min_top1_agreement_pct": 90.0, "max_accuracy_drop_pp": 5.0}
    assert saved["benchmark"]["median_ms"] > 0 and saved["benchmark"]["p99_ms"] >= saved["benchmark"]["median_ms"]
    assert "model" in saved["device"] and "clocks_locked" in saved["device"]


def test_device_runtime_refuses_fp16_on_a_cpu_backend(bundle, tmp_path):
    """fp16 needs TensorRT: on ONNX Runtime (and OpenVINO, where installed) one clear line, exit 2, an error result."""
    backends = ["onnxruntime"] + (["openvino"] if _has_openvino() else [])
    for backend in backends:
        out = tmp_path / f"{backend}.json"
        p = run_device(bundle, "--out", str(out), "--precision", "fp16", "--backend", backend)
        assert p.returncode == 2, p.stderr + p.stdout
        where = "OpenVINO on this device's CPU" if backend == "openvino" else "ONNX Runtime on this device"
        assert f"fp16 needs TensorRT; {where} runs int8 or fp32" in p.stderr + p.stdout
        assert "Traceback" not in p.stderr
        assert json.loads(out.read_text())["status"] == "error"


def _has_openvino() -> bool:
    from edgeres.cpu import openvino_status

    return openvino_status()[0]


def test_device_runtime_fp32_and_gate_failure(bundle, tmp_path):

    p = run_device(bundle, "--out", str(tmp_path / "r32.json"), "--precision", "fp32")
    assert p.returncode == 0, p.stderr
    assert json.loads((tmp_path / "r32.json").read_text())["verification"]["max_abs_diff"] < 1e-4
    # a bundle whose reference disagrees with the model: same files, a probe with shuffled references
    bad = disagreeing_copy(bundle, tmp_path / "bad")
    p = run_device(bad, "--out", str(tmp_path / "bad.json"))
    assert p.returncode == 1, p.stderr
    r = json.loads((tmp_path / "bad.json").read_text())
    assert r["status"] == "failed" and not r["verification"]["gates"][0]["passed"]


def test_tampered_file_refused_on_device(bundle, tmp_path):
    import shutil

    bad = tmp_path / "tampered"
    shutil.copytree(bundle, bad)
    data = bytearray((bad / "model_int8.onnx").read_bytes())
    data[-10] ^= 0xFF
    (bad / "model_int8.onnx").write_bytes(bytes(data))
    p = run_device(bad, "--out", str(tmp_path / "t.json"))
    assert p.returncode == 2
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["status"] == "error" and "model_int8.onnx: sha256 mismatch" in r["error"]
    assert "verification" not in r


def test_unsafe_manifest_path_refused(bundle, tmp_path):
    import shutil

    bad = tmp_path / "escape"
    shutil.copytree(bundle, bad)
    m = json.loads((bad / "manifest.json").read_text())
    m["files"]["../outside.txt"] = {"sha256": "0" * 64, "size": 0}
    (bad / "manifest.json").write_text(json.dumps(m))
    p = run_device(bad, "--out", str(tmp_path / "e.json"))
    assert p.returncode == 2 and "unsafe path" in p.stdout


def test_skip_if_current(bundle, tmp_path):
    out = tmp_path / "r.json"
    assert run_device(bundle, "--out", str(out)).returncode == 0
    first = json.loads(out.read_text())
    p = run_device(bundle, "--out", str(out), "--skip-if-current")
    assert p.returncode == 0
    assert "skipped" in json.loads(p.stdout.strip().splitlines()[-1])
    assert json.loads(out.read_text()) == first  # not rewritten
    prev = dict(first, device=dict(first["device"], tensorrt="0.0.0-old"))
    out.write_text(json.dumps(prev))  # the TensorRT version changed since: verify again
    p = run_device(bundle, "--out", str(out), "--skip-if-current")
    assert p.returncode == 0 and "skipped" not in json.loads(out.read_text())


def test_missing_run_files_named(tmp_path, run_dir):
    import shutil

    from edgeres.deploy.bundle import make_bundle
    from edgeres.errors import ArtifactError, ConfigError

    partial = tmp_path / "partial"
    shutil.copytree(run_dir, partial)
    (partial / "export" / "model_int8.onnx").unlink()
    (partial / "probe.npz").unlink()
    with pytest.raises(ConfigError, match=r"probe.npz, which its verdict rests on, is gone"):
        make_bundle(partial, tmp_path / "out")   # the verdict itself rests on probe.npz
    with pytest.raises(ArtifactError, match=r"missing export/model_int8.onnx, probe.npz"):
        make_bundle(partial, tmp_path / "out", allow_failed=True)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_no_calibration_cache_is_optional(tmp_path, run_dir):
    import shutil

    from edgeres.deploy.bundle import make_bundle, verify_bundle

    nocal = tmp_path / "nocal"
    shutil.copytree(run_dir, nocal)
    (nocal / "calibration" / "calib.cache").unlink()
    b = make_bundle(nocal, tmp_path / "b", probe_size=4)
    m = verify_bundle(b)
    assert m["calibration_cache"] is None and "calib.cache" not in m["files"] and m["calibration_note"]


def test_tar_roundtrip_and_overwrite(bundle, run_dir, tmp_path):
    from edgeres.deploy.bundle import extract_bundle, make_bundle, verify_bundle
    from edgeres.errors import ConfigError

    t = make_bundle(run_dir, tmp_path / "b", tar=True, probe_size=4)
    assert t.name == "b.tar.gz"
    with pytest.raises(ConfigError, match="already exists"):
        make_bundle(run_dir, tmp_path / "b", tar=True, probe_size=4)
    d = extract_bundle(t, tmp_path / "x")
    assert verify_bundle(d)["probe"]["count"] == 4
    assert stat.S_IMODE((d / "edgeres-device").stat().st_mode) & 0o111


@pytest.mark.parametrize("member,kind", [("../evil.txt", "file"), ("/tmp/evil.txt", "file"),
                                         ("b/link", "symlink"), ("b/../../evil", "file")])
def test_tar_path_traversal_refused(tmp_path, member, kind):
    from edgeres.deploy.bundle import extract_bundle
    from edgeres.errors import ArtifactError

    t = tmp_path / "evil.tar.gz"
    with tarfile.open(t, "w:gz") as tf:
        ok = tarfile.TarInfo("b/manifest.json")
        ok.size = 2
        tf.addfile(ok, io.BytesIO(b"{}"))
        info = tarfile.TarInfo(member)
        if kind == "symlink":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tf.addfile(info)
        else:
            info.size = 4
            tf.addfile(info, io.BytesIO(b"evil"))
    with pytest.raises(ArtifactError, match="unsafe path|link or special"):
        extract_bundle(t, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()
    assert not (tmp_path / "evil.txt").exists()


def test_a_run_whose_build_failed_is_refused_unless_allowed(run_dir, tmp_path):
    import shutil

    from edgeres.deploy.bundle import make_bundle
    from edgeres.errors import ConfigError

    failed = tmp_path / "failed"
    shutil.copytree(run_dir, failed)
    lines = (failed / "stages.jsonl").read_text().splitlines()
    (failed / "stages.jsonl").write_text("\n".join(lines[:-1]) + "\n")   # verify never finished
    with pytest.raises(ConfigError, match=r"did not pass \(incomplete: stopped after compile; not run: verify\)"):
        make_bundle(failed, tmp_path / "b", probe_size=4)
    assert not (tmp_path / "b").exists()
    b = make_bundle(failed, tmp_path / "b", probe_size=4, allow_failed=True)
    m = json.loads((b / "manifest.json").read_text())
    assert m["build"]["ok"] is False and m["build"]["allow_failed"] is True


def test_cli_bundle(run_dir, tmp_path):
    from edgeres.cli import main

    r = CliRunner().invoke(main, ["bundle", str(run_dir), "--out", str(tmp_path / "cb"), "--probe-size", "4",
                                  "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["probe"]["count"] == 4
    r = CliRunner().invoke(main, ["bundle", str(run_dir), "--out", str(tmp_path / "cb")])
    assert r.exit_code == 1 and r.output.strip().splitlines()[-1].startswith("Error:") and "--force" in r.output
    r = CliRunner().invoke(main, ["bundle", str(tmp_path / "nope"), "--out", str(tmp_path / "x")])
    assert r.exit_code == 1 and "run folder not found" in r.output
    r = CliRunner().invoke(main, ["bundle", str(run_dir)])
    assert r.exit_code != 0 and "--out" in r.output
    for cmd in ("bundle", "deploy"):
        assert CliRunner().invoke(main, [cmd, "--help"]).exit_code == 0


def test_device_runtime_help_without_numpy_installed_paths():
    p = subprocess.run([sys.executable, "-I", str(REPO / "edgeres" / "deploy" / "device_runtime.py"), "--help"],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
    assert p.returncode == 0 and "--precision" in p.stdout


def _has_tensorrt() -> bool:
    try:
        import tensorrt  # noqa: F401
    except Exception:
        return False
    return True


@pytest.mark.skipif(_has_tensorrt(), reason="checks the message given where TensorRT is absent")
def test_forced_tensorrt_backend_without_tensorrt(bundle, tmp_path):
    p = run_device(bundle, "--out", str(tmp_path / "r.json"), "--backend", "tensorrt")
    assert p.returncode == 2 and "TensorRT Python bindings are not importable" in p.stdout


@pytest.mark.tensorrt
@pytest.mark.skipif(not _has_tensorrt(), reason="needs the TensorRT Python bindings and a GPU")
def test_device_runtime_builds_and_verifies_tensorrt_engine(bundle, tmp_path):
    out = tmp_path / "trt.json"
    p = run_device(bundle, "--out", str(out), "--backend", "tensorrt", "--cache-dir", str(tmp_path / "engines"))
    assert p.returncode == 0, p.stdout + p.stderr
    r = json.loads(out.read_text())
    assert r["backend"] == "tensorrt" and r["tensorrt"] and r["engine"]["cached"] is False
    p = run_device(bundle, "--out", str(out), "--backend", "tensorrt", "--cache-dir", str(tmp_path / "engines"))
    assert p.returncode == 0 and json.loads(out.read_text())["engine"]["cached"] is True


def test_device_runtime_keeps_its_exit_codes_for_unexpected_errors(bundle, tmp_path):
    """A probe file that is intact (its sha256 matches) but not an .npz: one JSON result, exit 2, no traceback."""
    import shutil

    from edgeres.io import sha256_file

    bad = tmp_path / "odd"
    shutil.copytree(bundle, bad)
    (bad / "probe.npz").write_bytes(b"not an npz at all")
    m = json.loads((bad / "manifest.json").read_text())
    m["files"]["probe.npz"].update(sha256=sha256_file(bad / "probe.npz"), size=(bad / "probe.npz").stat().st_size)
    (bad / "manifest.json").write_text(json.dumps(m))
    p = run_device(bad, "--out", str(tmp_path / "r.json"))
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["status"] == "error" and r["error"]


def test_device_runtime_on_openvino(bundle, tmp_path):
    """`--backend openvino`: the device's CPU with OpenVINO's INT8 kernels runs the bundle's INT8 ONNX and verifies."""
    pytest.importorskip("openvino", reason="OpenVINO is an optional extra (pip install 'edgeres[openvino]')")
    out = tmp_path / "ov.json"
    p = run_device(bundle, "--out", str(out), "--backend", "openvino", "--iterations", "5")
    assert p.returncode == 0, p.stdout + p.stderr
    r = json.loads(out.read_text())
    assert r["backend"] == "openvino" and r["openvino"] and r["runs_on"] == "cpu" and r["engine"] is None
    assert r["verification"]["top1_agreement_pct"] >= 90.0 and r["benchmark"]["median_ms"] > 0
    p = run_device(bundle, "--out", str(tmp_path / "x.json"), "--backend", "openvino", "--require-backend",
                   "tensorrt")
    assert p.returncode == 2 and "TensorRT is required" in p.stdout


def test_an_altered_probe_is_refused_by_report_and_bundle(tmp_path, run_dir):
    """The verdict rests on probe.npz (what the device checks) and meta.json (class names): both are hashed into the
    verify record, so labels altered after a PASSED build make `report` FAILED and `bundle` refuse."""
    import shutil

    from click.testing import CliRunner

    from edgeres.cli import main
    from edgeres.deploy.bundle import make_bundle
    from edgeres.errors import ConfigError

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    assert CliRunner().invoke(main, ["report", str(run)]).exit_code == 0
    with np.load(run / "probe.npz") as z:
        x, y = z["x"], z["y"]
    with open(run / "probe.npz", "wb") as f:
        np.savez(f, x=x, y=(y + 1) % 10)   # labels changed, images kept
    r = CliRunner().invoke(main, ["report", str(run)])
    assert r.exit_code == 1 and "probe.npz is not the file its verdict rests on" in " ".join(r.output.split())
    with pytest.raises(ConfigError, match="probe.npz is not the file its verdict rests on"):
        make_bundle(run, tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_a_health_check_travels_in_the_manifest(run_dir, tmp_path):
    """bundle --health-check: the devices run it after the switch (releases.py); bad ones refused up front."""
    from edgeres.cli import main
    from edgeres.deploy.bundle import make_bundle
    from edgeres.errors import ConfigError

    b = make_bundle(run_dir, tmp_path / "b", probe_size=4, health_check="systemctl is-active myapp",
                    health_timeout=30)
    assert json.loads((b / "manifest.json").read_text())["health_check"] == \
        {"command": "systemctl is-active myapp", "timeout_s": 30.0}
    plain = make_bundle(run_dir, tmp_path / "plain", probe_size=4)
    assert "health_check" not in json.loads((plain / "manifest.json").read_text())   # release ids as before
    for command, timeout in (("", 30), ("a\nb", 30), ("true", float("inf")), ("true", 0.5)):
        with pytest.raises(ConfigError, match="--health-"):
            make_bundle(run_dir, tmp_path / "bad", probe_size=4, health_check=command, health_timeout=timeout)
        assert not (tmp_path / "bad").exists()
    r = CliRunner().invoke(main, ["bundle", str(run_dir), "--out", str(tmp_path / "cli"), "--health-check", " "])
    assert r.exit_code == 1 and "--health-check must be one non-empty line" in r.output and \
        len(r.output.strip().splitlines()) == 1 and not (tmp_path / "cli").exists()


def test_the_device_readme_says_where_dla_exists_from_the_version_table():
    """Issue 36: the bundle's README names DLA only where NVIDIA ships it, read from the one version table: every
    Jetson DLA row, and none of the versions without DLA (10.8 to 11.3, 11.4.0, 11.5 on)."""
    from edgeres.deploy.bundle import readme_text
    from edgeres.tensorrt.versions import DLA_ROWS

    text = " ".join(readme_text({"probe": {"count": 8}}, ["manifest.json"]).split())
    line = text[text.index("--dla-core 0"):text.index("no other version")]
    for row in DLA_ROWS:
        assert (f"TensorRT {row.label} " in line) == (row.platform == "jetson"), row.label
    assert "11.4.1 (JetPack 7.2.2+): AGX Orin;" in line
