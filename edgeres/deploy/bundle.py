"""The deploy bundle: the portable parts of a run (ONNX, calibration cache, reference results) plus a
standalone device runtime that builds and verifies the TensorRT engine on each device itself.

Engines do not move between devices or TensorRT versions, so the bundle never carries one.
Layout (flat, every file listed in manifest.json with its sha256):

    manifest.json  model_fp32.onnx  model_int8.onnx  calib.cache  probe.npz
    device_runtime.py  engine_build.py  edgeres-device
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from edgeres.deploy import device_runtime as rt
from edgeres.deploy.releases import EXECUTABLE  # one list for bundle, releases and deploy
from edgeres.deploy.signing import check_key, sign_bundle
from edgeres.errors import ArtifactError, ConfigError
from edgeres.io import atomic_path, check_bundle_out, ensure_writable_dir, sha256_file
from edgeres.records import read_plan, read_records, read_records_counted, verdict, verify_copies
from edgeres.report import build_report, verdict_parts, verdict_word
from edgeres.tensorrt.targets import TARGETS
from edgeres.verify import ort_logits, ort_session

FORMAT = "edgeres-bundle/1"
MANIFEST = "manifest.json"
RUN_FILES = {  # bundle name -> (path in the run folder, required)
    "model_fp32.onnx": ("export/model_fp32.onnx", True),
    "model_int8.onnx": ("export/model_int8.onnx", True),
    "calib.cache": ("calibration/calib.cache", False),
}
DEFAULT_GATES = {"min_top1_agreement_pct": 90.0, "max_accuracy_drop_pp": 5.0}   # % and percentage points
DEFAULT_PROBE = 64   # probe images the device checks: 32 could not show 90 % agreement (its interval reaches 89.3 %)

LAUNCHER = """#!/bin/sh
# edgeres device runtime: verifies this bundle, builds and checks the engine for this device, benchmarks.
# Needs python3 + numpy (+ tensorrt, or trtexec, or onnxruntime). Set PYTHON to use another interpreter.
here=$(cd "$(dirname "$0")" && pwd)
exec "${PYTHON:-python3}" "$here/device_runtime.py" --bundle "$here" "$@"
"""


def _runtime_sources() -> dict[str, Path | None]:
    pkg = Path(__file__).resolve().parents[1]
    engine_build = pkg / "tensorrt" / "engine_build.py"
    return {"device_runtime.py": pkg / "deploy" / "device_runtime.py",
            "releases.py": pkg / "deploy" / "releases.py",
            "edgeres_stats.py": pkg / "stats.py",   # the gate rule the device decides with
            "engine_build.py": engine_build if engine_build.is_file() else None}


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path} is not readable JSON ({e})") from None


def expected_accuracy_from_run(run_dir: Path) -> dict[str, float]:
    """Top-1 (%) the build measured on the evaluation split, per "stage/backend" (the verify stage's rows; a build
    stopped earlier: what its quantize stages measured)."""

    records = read_records(run_dir)
    latest = {r.stage: r for r in records}
    rows = build_report(run_dir, list(latest.values()), ok=False, message="")["rows"]
    return {f"{r['stage']}/{r['backend']}": float(r["top1"]) for r in rows if r.get("top1") is not None}


def build_verdict(run_dir: Path) -> tuple[bool, str]:

    records, torn = read_records_counted(run_dir)
    if not records:
        return False, "no stage records (stages.jsonl)"
    return verdict(records, read_plan(run_dir), torn=torn, run_dir=run_dir)


def verdict_summary(run_dir: Path, ok: bool, message: str) -> dict[str, Any]:
    """What the manifest says of the build, as the report says it: the verdict word (PASSED, PASSED WITH WARNINGS,
    NOT MEASURABLE, FAILED), the gates that could not be decided, the classes the verdict names and the limits
    looser than the shipped recipe's."""
    planned = read_plan(run_dir)
    latest = {r.stage: r for r in read_records(run_dir) if planned is None or r.stage in planned}
    rep = build_report(run_dir, list(latest.values()), ok=ok, message=message)
    return {"verdict": verdict_word(rep), "message": ": ".join(verdict_parts(rep)),
            "not_measurable": [n["text"] for n in rep["not_measurable"]],
            "class_findings": [f["text"] for f in rep["class_findings"]],
            "limits_loosened": rep["limits_loosened"], "confidence": rep["confidence"]}


def tensorrt_validated(run_dir: Path) -> list[str]:
    """TensorRT versions this run's engine was really built and checked with (compile stages that passed)."""

    versions = set()
    for rec in read_records(run_dir):
        if rec.passed and any(k in rec.stage for k in ("compile", "tensorrt", "engine")):
            v = (rec.environment.get("packages") or {}).get("tensorrt") or rec.metrics.get("tensorrt_version")
            if v:
                versions.add(str(v))
    return sorted(versions)


def write_npz(path: Path, arrays: dict[str, Any]) -> None:
    """np.savez's format with a fixed time stamp on every member, so the same arrays give the same bytes (and the
    same bundle the same release id)."""
    import zipfile

    import numpy as np

    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in sorted(arrays):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asarray(arrays[name]), allow_pickle=False)


def _ort_logits(onnx_path: Path, x, batch: int = 32):
    """Host reference logits on ONNX Runtime, plus the model's input and output descriptions."""

    runner = ort_session(onnx_path)
    try:
        return ort_logits(runner, x, batch_size=batch), runner.session.get_inputs()[0], \
            runner.session.get_outputs()[0]
    finally:
        runner.close()


def _collect(run_dir: Path) -> dict[str, Path | None]:
    if not run_dir.is_dir():
        raise ArtifactError(f"run folder not found: {run_dir}")
    missing, files = [], {}
    for name, (rel, required) in RUN_FILES.items():
        path = run_dir / rel
        files[name] = path if path.is_file() else None
        if required and files[name] is None:
            missing.append(rel)
    for rel in ("meta.json", "probe.npz"):
        if not (run_dir / rel).is_file():
            missing.append(rel)
    if missing:
        raise ArtifactError(f"{run_dir} is missing {', '.join(missing)}: run the export stage "
                            f"(`edgeres build`) before bundling")
    return files


def _run_plan(run_dir: Path, dest: Path) -> dict[str, Any]:
    """The device plan the run's compile stage made (tensorrt/plan.json, vouched for by its record's sha256), with
    the FP32-weights copy of the INT8 ONNX it names for TensorRT 8.5/8.6 copied into the bundle (its sha256 checked
    against the plan). The host decides once; the bundle carries that decision."""

    comp = next((r for r in reversed(read_records(run_dir)) if r.stage == "compile"), None)
    info = (comp.metrics.get("device_plan") or {}) if comp is not None else {}
    path = run_dir / "tensorrt" / "plan.json"
    if not info.get("sha256") or not path.is_file():
        raise ArtifactError(f"{run_dir} has no device plan from its compile stage (tensorrt/plan.json): re-run "
                            f"`edgeres build` before bundling")
    if sha256_file(path) != info["sha256"]:
        raise ArtifactError(f"{path} is not the plan the compile stage wrote (sha256 differs from its record); "
                            f"re-run `edgeres build`")
    plan = _load_json(path)
    for entry in plan.get("entries", []):
        entry.pop("script", None)   # the run folder's trtexec scripts; the device runtime writes its own command
        name = entry.get("onnx")
        if name and not (dest / name).is_file():
            src = run_dir / "tensorrt" / name
            if not src.is_file() or sha256_file(src) != entry.get("onnx_sha256"):
                raise ArtifactError(f"{src}: missing, or not the file the device plan names (sha256); re-run "
                                    f"`edgeres build`")
            shutil.copyfile(src, dest / name)
    return plan


def _write_bundle(run_dir: Path, dest: Path, *, probe_size: int | None, gates: dict[str, float],
                  build: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    from edgeres.compare import load_probe

    files = _collect(run_dir)
    meta = _load_json(run_dir / "meta.json")
    x, y = load_probe(run_dir / "probe.npz")
    probe_size = min(DEFAULT_PROBE, len(x)) if probe_size is None else probe_size
    if probe_size > len(x):
        raise ConfigError(f"--probe-size {probe_size}: the run's probe.npz holds {len(x)} images")
    x = np.ascontiguousarray(x[:probe_size], dtype=np.float32)
    y = y[:probe_size].astype(np.int64) if y is not None else None
    if x.ndim != 4 or len(x) == 0:
        raise ArtifactError(f"probe.npz 'x' must be a non-empty NCHW array, found shape {x.shape}")
    for name, src in files.items():
        if src is not None:
            shutil.copyfile(src, dest / name)
    verify_copies(run_dir, [(src, dest / name) for name, src in files.items() if src is not None])
    ref32, inp, out = _ort_logits(dest / "model_fp32.onnx", x)
    ref8, _, _ = _ort_logits(dest / "model_int8.onnx", x)
    arrays = {"x": x, "ref_fp32": ref32, "ref_int8": ref8}
    if y is not None:
        arrays["y"] = y
    write_npz(dest / "probe.npz", arrays)
    sources = _runtime_sources()
    for name, src in sources.items():
        if src is not None:
            shutil.copyfile(src, dest / name)
    (dest / "edgeres-device").write_text(LAUNCHER)

    plan = _run_plan(run_dir, dest)   # made once, by the build's compile stage: the same plan the run folder holds
    probe_acc = None if y is None else {"fp32": 100.0 * float((ref32.argmax(1) == y).mean()),
                                        "int8": 100.0 * float((ref8.argmax(1) == y).mean())}
    calib = "calib.cache" if files["calib.cache"] else None
    manifest = {
        "format": FORMAT,
        "run": {"name": run_dir.resolve().name},   # no time stamp, no local path: the same run gives the same id
        "arch": meta.get("arch"), "dataset": meta.get("dataset"), "recipe_hash": meta.get("recipe_hash"),
        "models": {"fp32": "model_fp32.onnx", "int8": "model_int8.onnx"},
        "calibration_cache": calib,
        "calibration_note": None if calib else
        "the run has no calibration/calib.cache: the INT8 ONNX carries Q/DQ scales (explicit quantization), "
        "so TensorRT does not need one; implicit-quantization (calibrated) builds are unavailable",
        "input": {"name": inp.name, "shape": ["N", *map(int, x.shape[1:])], "dtype": "float32", "layout": "NCHW"},
        "output": {"name": out.name, "shape": ["N", int(ref32.shape[1])], "dtype": "float32"},
        "preprocessing": {"input_size": meta.get("input_size"), "resize_size": meta.get("resize_size"),
                          "in_channels": meta.get("in_channels"), "mean": meta.get("mean"), "std": meta.get("std"),
                          "steps": ["decode (RGB, or grayscale for 1 channel)",
                                    "resize shorter side to resize_size (when set), center-crop input_size",
                                    "scale to [0, 1]", "normalize (x - mean) / std", "float32 NCHW"]},
        "class_names": list(meta.get("class_names") or []),
        "num_classes": int(ref32.shape[1]),
        "expected_accuracy": {"run_top1_pct": expected_accuracy_from_run(run_dir), "probe_pct": probe_acc},
        "build": build,
        "gates": gates,
        "probe": {"file": "probe.npz", "count": int(len(x)), "labels": y is not None,
                  "arrays": sorted(arrays), "reference": "ONNX Runtime (CPU) on the bundled ONNX files"},
        "tensorrt": {"validated": tensorrt_validated(run_dir), "targets": [v[2] for v in TARGETS.values()],
                     "note": "validated: versions this run's engine was built and checked with on real TensorRT; "
                             "targets: versions the plan covers (checked against a TensorRT emulator built from "
                             "each version's API, not on hardware)"},
        "tensorrt_plan": plan,
        "runtime": {"entry": "device_runtime.py", "launcher": "edgeres-device",
                    "engine_build": "engine_build.py" if sources["engine_build.py"] else None},
    }
    listed = sorted(p.name for p in dest.iterdir() if p.is_file())
    manifest["files"] = {name: {"sha256": sha256_file(dest / name), "size": (dest / name).stat().st_size}
                         for name in listed}
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    for p in dest.iterdir():
        p.chmod(0o755 if p.name in EXECUTABLE else 0o644)
    dest.chmod(0o755)
    return manifest


def make_bundle(run_dir: str | Path, out_dir: str | Path, *, probe_size: int | None = None, tar: bool = False,
                force: bool = False, min_top1_agreement_pct: float = DEFAULT_GATES["min_top1_agreement_pct"],
                max_accuracy_drop_pp: float = DEFAULT_GATES["max_accuracy_drop_pp"],
                allow_failed: bool = False, sign_key: str | Path | None = None) -> Path:
    """Write the bundle folder `out_dir` (or `out_dir`.tar.gz with tar=True) atomically. Returns its path.
    A run whose build did not pass every planned stage is refused unless `allow_failed` (then recorded).
    `sign_key`: an OpenSSH ed25519 private key that signs the manifest (signature.json, edgeres/deploy/signing.py)."""
    if probe_size is not None and probe_size < 1:
        raise ConfigError(f"--probe-size must be >= 1, got {probe_size}")
    if not 0.0 <= min_top1_agreement_pct <= 100.0 or not 0.0 <= max_accuracy_drop_pp <= 100.0:
        raise ConfigError("gates are in % (agreement) and percentage points (drop): each must lie in [0, 100]")
    run_dir, out = Path(run_dir), Path(out_dir)
    if tar and not out.name.endswith(".tar.gz"):
        out = out.with_name(out.name + ".tar.gz")
    check_bundle_out(out, force)   # only a bundle edgeres made is ever replaced (io.py: the ownership rule)
    if not run_dir.is_dir():
        raise ArtifactError(f"run folder not found: {run_dir}")
    ok, message = build_verdict(run_dir)
    if not ok and not allow_failed:
        raise ConfigError(f"{run_dir}: the build did not pass ({message}); fix it, or pass --allow-failed to "
                          f"bundle it anyway")
    build = {"ok": ok, "allow_failed": allow_failed, **verdict_summary(run_dir, ok, message)}
    if sign_key is not None:
        check_key(sign_key)   # a bad key is refused before the bundle is built
    ensure_writable_dir(out.parent)
    gates = {"min_top1_agreement_pct": min_top1_agreement_pct, "max_accuracy_drop_pp": max_accuracy_drop_pp}
    top = out.name[: -len(".tar.gz")] if tar else out.name
    tmp = Path(tempfile.mkdtemp(prefix=f".{top}.", suffix=".tmp", dir=out.parent))
    try:
        _write_bundle(run_dir, tmp, probe_size=probe_size, gates=gates, build=build)
        if sign_key is not None:
            sign_bundle(tmp, sign_key)
        if tar:
            with atomic_path(out) as tmp_tar, tarfile.open(tmp_tar, "w:gz") as tf:
                for p in sorted(tmp.iterdir()):
                    tf.add(p, arcname=f"{top}/{p.name}", recursive=False)
            return out
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        return out
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def check_member_name(name: str) -> str:
    """Reject what could write outside the bundle: absolute paths, '..', backslashes, drive letters."""
    p = PurePosixPath(name)
    if not name or p.is_absolute() or ".." in p.parts or "\\" in name or "\x00" in name or ":" in p.parts[0]:
        raise ArtifactError(f"unsafe path in bundle: {name!r} (absolute, '..' or odd characters)")
    return str(p)


def extract_bundle(tar_path: str | Path, dest: str | Path) -> Path:
    """Extract a bundle .tar.gz into `dest` and return the bundle folder. Only regular files inside one top
    folder are accepted: absolute paths, '..', symlinks, hard links and devices are refused before any write."""
    tar_path, dest = Path(tar_path), Path(dest)
    try:
        tf = tarfile.open(tar_path, "r:gz")
    except (OSError, tarfile.TarError) as e:
        raise ArtifactError(f"{tar_path} is not a readable .tar.gz ({e})") from None
    with tf:
        members = tf.getmembers()
        tops = set()
        for m in members:
            name = check_member_name(m.name)
            if not (m.isfile() or m.isdir()):
                raise ArtifactError(f"{tar_path}: member {m.name!r} is a link or special file; refused")
            tops.add(PurePosixPath(name).parts[0])
            if m.isfile() and len(PurePosixPath(name).parts) != 2:
                raise ArtifactError(f"{tar_path}: member {m.name!r} is not directly inside the bundle folder")
        if len(tops) != 1:
            raise ArtifactError(f"{tar_path}: expected one top folder, found {sorted(tops) or 'none'}")
        dest.mkdir(parents=True, exist_ok=True)
        tf.extractall(dest, members=[m for m in members if m.isfile()], filter="data")
    return dest / tops.pop()


@contextlib.contextmanager
def opened_bundle(path: str | Path) -> Iterator[Path]:
    """A bundle folder for `path`: the folder itself, or a .tar.gz extracted into a temporary folder."""
    path = Path(path)
    if path.is_dir():
        yield path
    elif path.is_file() and path.name.endswith((".tar.gz", ".tgz")):
        with tempfile.TemporaryDirectory(prefix="edgeres-bundle-") as tmp:
            yield extract_bundle(path, tmp)
    else:
        raise ArtifactError(f"bundle not found: {path} (a folder or .tar.gz made by `edgeres bundle`)")


def verify_bundle(bundle_dir: str | Path) -> dict[str, Any]:
    """The manifest of an intact bundle; ArtifactError naming every missing, altered or unsafe file."""

    bundle_dir = Path(bundle_dir)
    try:
        manifest = rt.load_manifest(bundle_dir)
        problems = rt.verify_files(bundle_dir, manifest)
    except rt.BundleError as e:
        raise ArtifactError(str(e)) from None
    if problems:
        raise ArtifactError(f"{bundle_dir}: bundle verification failed: " + "; ".join(problems))
    for name in manifest["files"]:
        check_member_name(name)
    return manifest
