"""The deploy bundle: the portable parts of a run (ONNX, calibration cache, reference results) plus a
standalone device runtime that builds and verifies the TensorRT engine on each device itself.

Engines do not move between devices or TensorRT versions, so the bundle never carries one.
Layout (flat, every file listed in manifest.json with its sha256):

    manifest.json  model_fp32.onnx  model_int8.onnx  calib.cache  probe.npz
    device_runtime.py  engine_build.py  edgeres-device  README.txt

`target` (--target): a bundle for one TensorRT of the run's device plan (a plan key, tensorrt10.3, jetpack6.1...)
carries that target's plan entries and only the files they name (no FP32-weights copy where that TensorRT reads
INT8 weights, no calibration cache where no entry uses one); its manifest says which target it was made for.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shutil
import tarfile
import tempfile
import textwrap
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
from edgeres.suggest import did_you_mean
from edgeres.tensorrt.targets import TARGETS
from edgeres.tensorrt.versions import DLA_ROWS, JETSON_MODULES
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
README = "README.txt"
DEVICE_NEEDS = "python3 + numpy, and TensorRT (JetPack) or onnxruntime"   # what `edgeres bundle` says

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


def _run_plan(run_dir: Path, dest: Path, target: str | None = None) -> dict[str, Any]:
    """The device plan the run's compile stage made (tensorrt/plan.json, vouched for by its record's sha256), with
    the FP32-weights copy of the INT8 ONNX it names for TensorRT 8.5/8.6 copied into the bundle (its sha256 checked
    against the plan). The host decides once; the bundle carries that decision. With `target` (a plan key): that
    target's entries only, and only the files they name."""

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
    if target is not None:
        plan["targets"] = {target: plan["targets"][target]}
        plan["entries"] = [e for e in plan.get("entries", []) if e.get("target") == target]
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
                  build: dict[str, Any], target: dict[str, str] | None = None,
                  health_check: dict[str, Any] | None = None) -> dict[str, Any]:
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

    # made once, by the build's compile stage: the same plan the run folder holds (one target's part with --target)
    plan = _run_plan(run_dir, dest, target["name"] if target else None)
    if target and files["calib.cache"] and not any(e.get("calib_cache") and not e.get("refused")
                                                   for e in plan["entries"]):
        (dest / "calib.cache").unlink()   # no entry of this target reads it
        files["calib.cache"] = None
    probe_acc = None if y is None else {"fp32": 100.0 * float((ref32.argmax(1) == y).mean()),
                                        "int8": 100.0 * float((ref8.argmax(1) == y).mean())}
    calib = "calib.cache" if files["calib.cache"] else None
    no_calib = ("the run has no calibration/calib.cache: the INT8 ONNX carries Q/DQ scales (explicit quantization), "
                "so TensorRT does not need one; implicit-quantization (calibrated) builds are unavailable")
    if target and run_dir.joinpath(RUN_FILES["calib.cache"][0]).is_file():
        no_calib = (f"not carried: no plan entry of {target['label']} uses it (the INT8 ONNX carries Q/DQ scales; "
                    f"only DLA on TensorRT 8.5 to 10.7 builds from the cache)")
    manifest = {
        "format": FORMAT,
        "run": {"name": run_dir.resolve().name},   # no time stamp, no local path: the same run gives the same id
        "arch": meta.get("arch"), "dataset": meta.get("dataset"), "recipe_hash": meta.get("recipe_hash"),
        "models": {"fp32": "model_fp32.onnx", "int8": "model_int8.onnx"},
        "calibration_cache": calib,
        "calibration_note": None if calib else no_calib,
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
        "tensorrt": {"validated": tensorrt_validated(run_dir),
                     "targets": [t["label"] for t in plan["targets"].values()] if target else
                     [v[2] for v in TARGETS.values()],
                     "note": "validated: versions this run's engine was built and checked with on real TensorRT; "
                             "targets: versions the plan covers (checked against a TensorRT emulator built from "
                             "each version's API, not on hardware)"},
        "tensorrt_plan": plan,
        "runtime": {"entry": "device_runtime.py", "launcher": "edgeres-device",
                    "engine_build": "engine_build.py" if sources["engine_build.py"] else None},
        "target": target,   # None: every target of the plan
        "readme": README,
    }
    if health_check is not None:   # run by the device after the switch (releases.py): it commits only on exit 0
        manifest["health_check"] = health_check
    (dest / README).write_text(readme_text(manifest, sorted([*(p.name for p in dest.iterdir() if p.is_file()),
                                                              README, MANIFEST])))
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
                allow_failed: bool = False, sign_key: str | Path | None = None, target: str | None = None,
                health_check: str | None = None, health_timeout: float = 300.0) -> Path:
    """Write the bundle folder `out_dir` (or `out_dir`.tar.gz with tar=True) atomically. Returns its path.
    A run whose build did not pass every planned stage is refused unless `allow_failed` (then recorded).
    `sign_key`: an OpenSSH ed25519 private key that signs the manifest (signature.json, edgeres/deploy/signing.py).
    `target`: a name of one target of the run's device plan (`target_names`): only what it needs is carried.
    `health_check`: a shell command each device runs in the release after switching to it (exit 0 = healthy,
    within `health_timeout` s); the device commits only then, else switches back (releases.py)."""
    health = _health_spec(health_check, health_timeout)
    if probe_size is not None and probe_size < 1:
        raise ConfigError(f"--probe-size must be >= 1, got {probe_size}")
    if not 0.0 <= min_top1_agreement_pct <= 100.0 or not 0.0 <= max_accuracy_drop_pp <= 100.0:
        raise ConfigError("gates are in % (agreement) and percentage points (drop): each must lie in [0, 100]")
    run_dir, out = Path(run_dir), Path(out_dir)
    chosen = resolve_target(run_dir, target) if target is not None else None   # a typo costs nothing
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
        _write_bundle(run_dir, tmp, probe_size=probe_size, gates=gates, build=build, target=chosen,
                      health_check=health)
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


def check_health_command(command: str) -> str:
    """A health-check command (bundle or deploy flag): one non-empty line, run by the device with `sh -c`."""
    if not command.strip() or "\n" in command or "\x00" in command:
        raise ConfigError("--health-check must be one non-empty line (a shell command run on the device)")
    return command


def _health_spec(command: str | None, timeout: float) -> dict[str, Any] | None:
    if command is None:
        return None
    check_health_command(command)
    if not (math.isfinite(timeout) and 1.0 <= timeout <= 86400.0):
        raise ConfigError(f"--health-timeout must be a finite number of seconds in [1, 86400], got {timeout!r}")
    return {"command": command, "timeout_s": float(timeout)}


# ---------------------------------------------------------------------------------------------------- targets

def _plain(name: str) -> str:
    return re.sub(r"[-_. ]", "", name.lower())


def target_names(targets: dict[str, Any]) -> dict[str, str]:
    """name -> plan key for the targets of a device plan (plan.json "targets": key -> {"label", "rules", ...}): the
    key ("10.3"), tensorrt<key>, tensorrt<version whose rules apply> and jetpack<release> for each JetPack release
    its label names ("JetPack 6.1/6.2" -> jetpack6.1, jetpack6.2). A name two targets would share is left out."""
    names: dict[str, set[str]] = {}
    for key, spec in targets.items():
        label, rules = str(spec.get("label", "")), str(spec.get("rules", ""))
        cands = [key, f"tensorrt{key}"] + ([f"tensorrt{rules}"] if rules and rules != key else [])
        for group in re.findall(r"JetPack ([0-9][0-9./x+]*)", label):
            cands += [f"jetpack{v.removesuffix('+').removesuffix('.x')}" for v in group.split("/") if v]
        for c in cands:
            names.setdefault(c, set()).add(key)
    return {n: next(iter(keys)) for n, keys in names.items() if len(keys) == 1}


def resolve_target(run_dir: Path, name: str) -> dict[str, str]:
    """{"name": plan key, "label"} for a --target name (case, '-', '_', '.' and spaces ignored) among the
    targets of the run's device plan; ConfigError with the valid names (and a guess) otherwise."""
    path = Path(run_dir) / "tensorrt" / "plan.json"
    if not path.is_file():
        raise ArtifactError(f"{run_dir} has no device plan from its compile stage (tensorrt/plan.json): re-run "
                            f"`edgeres build` before bundling")
    targets = (_load_json(path) or {}).get("targets") or {}
    names = target_names(targets)
    by_plain = {_plain(n): key for n, key in names.items()}
    key = by_plain.get(_plain(name))
    if key is None:
        def version(n: str) -> tuple[int, ...]:
            return tuple(int(p) for p in re.findall(r"\d+", n))

        shown = sorted(targets, key=version) + sorted((n for n in names if n.startswith("jetpack")), key=version)
        raise ConfigError(f"unknown --target {name!r}: valid names are {', '.join(shown)} (or tensorrt<version>)"
                          f"{did_you_mean(name, names)}")
    return {"name": key, "label": str(targets[key].get("label", key))}   # not the name asked: same bundle, same id


# ---------------------------------------------------------------------------------------------------- what to say

def _dla_where() -> str:
    """Where DLA exists, from the one version table (edgeres.tensorrt.versions.DLA_ROWS)."""
    rows = [f"TensorRT {r.label} (JetPack {r.jetpack}): " + " / ".join(JETSON_MODULES[m] for m in r.modules)
            for r in DLA_ROWS if r.platform == "jetson"]
    return "ships it: " + "; ".join(rows) + "; no other version"


def _runtime_help() -> str:
    """The device runtime's own --help (its real options), at a fixed width: the same README for the same run."""
    from unittest import mock

    buf = io.StringIO()
    with mock.patch.dict(os.environ, {"COLUMNS": "100", "NO_COLOR": "1"}), contextlib.redirect_stdout(buf), \
            contextlib.suppress(SystemExit):
        rt.parse_args(["--help"])
    return buf.getvalue().replace(str(Path(rt.__file__).resolve().parent), "<this folder>").rstrip()


FILE_ROLES = {
    "manifest.json": "every file below with its sha256 and size; the model's input, classes, gates, TensorRT plan",
    "model_fp32.onnx": "the FP32 model (BatchNorm folded): FP32/FP16 engines, DLA INT8 with the calibration cache",
    "model_int8.onnx": "the INT8 model (Q/DQ ONNX, the scales PTQ/QAT chose)",
    "calib.cache": "INT8 calibration cache (DLA on TensorRT 8.5 to 10.7)",
    "probe.npz": "preprocessed evaluation images with the host's reference logits",
    "device_runtime.py": "the device runtime (python3 + numpy; no torch, no edgeres)",
    "edgeres-device": "its launcher (PYTHON=... picks another interpreter)",
    "engine_build.py": "TensorRT engine build, as the host's plan says",
    "releases.py": "release folders for `edgeres deploy` (current / previous)",
    "edgeres_stats.py": "the interval rule the device's gates are decided with",
    "signature.json": "the manifest's ed25519 signature",
    README: "this file",
}


def readme_text(manifest: dict[str, Any], files: list[str]) -> str:
    """README.txt: what is inside, what the device needs, how to run it, what its result and exit codes mean."""
    run, build, gates = manifest.get("run", {}).get("name"), manifest.get("build") or {}, manifest.get("gates", {})
    target = manifest.get("target")
    made_for = f"for {target['label']} only" if target else "for every TensorRT target of the plan: " + \
        "; ".join(manifest.get("tensorrt", {}).get("targets", []))
    probe = manifest.get("probe", {})
    roles = {**FILE_ROLES, **{e["onnx"]: "the INT8 model with FP32 weights behind QuantizeLinear (the form TensorRT "
                                         "8.5/8.6 document)"
                              for e in (manifest.get("tensorrt_plan") or {}).get("entries", [])
                              if e.get("onnx") and e["onnx"] not in FILE_ROLES}}
    width = max(len(f) for f in files) + 2
    lines = [f"edgeres deploy bundle: run {run}, {manifest.get('arch')} on {manifest.get('dataset')}, "
             f"{manifest.get('num_classes')} classes",
             f"Made by `edgeres bundle` {made_for}."]
    lines += textwrap.wrap(f"Host verdict: {build.get('message') or build.get('verdict') or 'unknown'}", width=100,
                           subsequent_indent="  ")
    lines += ["", "WHAT IS INSIDE"]
    lines += [f"  {f.ljust(width)}{roles.get(f, '')}".rstrip() for f in files]
    lines += ["", "WHAT THE DEVICE NEEDS",
              "  python3 (3.8 or newer) with numpy (JetPack: sudo apt-get install python3-numpy), and",
              "  TensorRT: JetPack's Python bindings (python3-libnvinfer) or trtexec (/usr/src/tensorrt/bin);",
              "  without TensorRT it checks the model with onnxruntime on the CPU (pip3 install onnxruntime).",
              "", "HOW TO RUN (in this folder, on the device)",
              "  ./edgeres-device                 check every file, build the engine for this device as planned",
              "                                   (first run: minutes; cached in engines/), verify it on the probe",
              "                                   images, time it",
              "  ./edgeres-device --precision fp16 --iterations 500",
              "  ./edgeres-device --dla-core 0    on DLA core 0 (layers DLA cannot run go to the GPU), where NVIDIA",
              *textwrap.wrap(_dla_where(), 100, initial_indent=" " * 35, subsequent_indent=" " * 35),
              "", "  All options (./edgeres-device --help):"]
    lines += [f"    {ln}".rstrip() for ln in _runtime_help().splitlines()]
    lines += ["", "WHAT THE RESULT MEANS",
              "  One JSON result is printed and written to result.json (--out):",
              "  status        passed, failed (a gate) or error (the bundle or the device cannot be used);",
              f"  verification  top-1 agreement with the host's reference logits on the {probe.get('count')} probe "
              f"images", f"                (gate: at least {gates.get('min_top1_agreement_pct')} %) and the probe "
              f"accuracy (gate: at most {gates.get('max_accuracy_drop_pp')} pp",
              "                below the host's), decided with the interval rule (edgeres_stats.py);",
              "  benchmark     latency (median and tail, ms) and throughput at the planned batch;",
              "  engine        the engine built for this device and TensorRT, and where it is cached.",
              "", "EXIT CODES",
              f"  {rt.EXIT_OK}  passed",
              f"  {rt.EXIT_GATE}  a gate failed: the engine runs here but does not give the host's answers",
              f"  {rt.EXIT_UNUSABLE}  the bundle or the device cannot be used (an altered file, no plan entry for this",
              "     TensorRT, numpy missing...): the error is the last line on stderr", ""]
    return "\n".join(lines)


def bundle_bytes(path: str | Path) -> int:
    """The size of a bundle: a .tar.gz's own, or the sum of a folder's files."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def human_bytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


def next_steps(path: str | Path, *, tar: bool) -> list[str]:
    """The two commands that take a bundle to a device and run it there (USER@DEVICE to fill in)."""
    path = Path(path)
    if tar:
        top = path.name[: -len(".tar.gz")]
        return [f"scp {path} USER@DEVICE:", f"ssh USER@DEVICE 'tar -xzf {path.name} && ./{top}/edgeres-device'"]
    return [f"scp -r {path} USER@DEVICE:", f"ssh USER@DEVICE ./{path.name}/edgeres-device"]


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
