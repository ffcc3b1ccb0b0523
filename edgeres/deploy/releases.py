#!/usr/bin/env python3
"""Releases on a device: one layout for SSH deploys (`edgeres deploy`) and flashed images (`bundle --rootfs`).

Standalone (python3 stdlib only): `edgeres deploy` runs this file's source on the device, the rootfs installer
imports it on the host, an operator can run it by hand.

    ROOT/releases/<id>/        one folder per bundle; <id> = <bundle name>-<manifest sha256[:12]>
    ROOT/current -> releases/<id>    the release that runs; switched only after <id> passed verification here
    ROOT/previous -> releases/<id>   the release `current` replaced (what `rollback` returns to)
    STATE/engines/             engines, cached by device + TensorRT version + ONNX sha256
    STATE/results/<id>.json    every verification of every release
    STATE/result.json          the last result of the release `current` points to

ROOT defaults to /opt/edgeres, STATE to /var/lib/edgeres. Every switch is a rename (atomic): an interrupted copy,
a failed verification or a reboot half-way leaves `current`, and STATE/result.json, as they were.

    python3 releases.py install --from STAGING [--root R] [--state S] [--python PY] [-- DEVICE RUNTIME ARGS]
    python3 releases.py rollback [--root R] [--state S]
    python3 releases.py status [--root R] [--state S]

Each prints one JSON object. Exit codes: 0 done, 1 the new release failed verification (nothing switched), 2
unusable (bad bundle, nothing to roll back to, no permission).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT, STATE = "/opt/edgeres", "/var/lib/edgeres"
MANIFEST = "manifest.json"
EXECUTABLE = ("device_runtime.py", "edgeres-device", "releases.py")
EXIT_OK, EXIT_GATE, EXIT_UNUSABLE = 0, 1, 2


class ReleaseError(Exception):
    """Nothing was switched (exit 2)."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _manifest(folder: Path) -> dict:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise ReleaseError(f"{folder / MANIFEST}: not a readable bundle manifest ({e})") from None


def release_id(folder: Path) -> str:
    name = _manifest(folder).get("run", {}).get("name") or "bundle"
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in name)[:60]
    return f"{safe}-{_sha256(folder / MANIFEST)[:12]}"


def _check(folder: Path, manifest: dict) -> list[str]:
    problems = []
    for name, entry in sorted(manifest.get("files", {}).items()):
        path = folder / name
        if "/" in name or name.startswith(".") or path.is_symlink() or not path.is_file():
            problems.append(f"{name}: missing or not a plain file")
        elif _sha256(path) != entry.get("sha256"):
            problems.append(f"{name}: sha256 mismatch")
    return problems


def stage(root: Path, source: Path) -> tuple[str, Path]:
    """Copy a verified bundle folder into ROOT/releases/<id> (via <id>.partial and a rename); an intact release of
    the same id is reused. Returns (id, path)."""
    manifest = _manifest(source)
    problems = _check(source, manifest)
    if problems:
        raise ReleaseError("bundle verification failed, nothing installed: " + "; ".join(problems))
    rid = release_id(source)
    releases = root / "releases"
    releases.mkdir(parents=True, exist_ok=True, mode=0o755)
    dest = releases / rid
    if dest.is_dir() and not _check(dest, _manifest(dest)):
        return rid, dest
    tmp = Path(tempfile.mkdtemp(prefix=f".{rid}.", suffix=".partial", dir=releases))
    try:
        for name in [*manifest["files"], MANIFEST]:
            shutil.copyfile(source / name, tmp / name)
            os.chmod(tmp / name, 0o755 if name in EXECUTABLE else 0o644)
        os.chmod(tmp, 0o755)
        if dest.exists():   # a damaged copy of the same release: replace it
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rid, dest


def _link(root: Path, name: str, rid: str | None) -> None:
    """Point ROOT/<name> at releases/<rid> (or remove it) with one rename."""
    path = root / name
    if rid is None:
        if path.is_symlink():
            path.unlink()
        return
    tmp = root / f".{name}.{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(f"releases/{rid}", tmp)
    os.replace(tmp, path)


def _target(root: Path, name: str) -> str | None:
    path = root / name
    if not path.is_symlink():
        return None
    return Path(os.readlink(path)).name


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
    os.chmod(tmp, 0o644)   # readable by the default user
    os.replace(tmp, path)


def activate(root: Path, state: Path, rid: str) -> None:
    """current -> rid, previous -> what current was; STATE/result.json <- that release's result."""
    old = _target(root, "current")
    if old != rid:
        if old is not None:
            _link(root, "previous", old)
        _link(root, "current", rid)
    result = state / "results" / f"{rid}.json"
    if result.is_file():
        _write_json(state / "result.json", json.loads(result.read_text()))


def install(root: Path, state: Path, source: Path, python: str, runtime_args: list[str]) -> tuple[dict, int]:
    rid, dest = stage(root, source)
    out = state / "results" / f"{rid}.json"
    out.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    (state / "engines").mkdir(parents=True, exist_ok=True, mode=0o755)
    # --skip-if-current: the same bundle already passed on this device and TensorRT version -> not verified again
    cmd = [python, str(dest / "device_runtime.py"), "--bundle", str(dest), "--out", str(out),
           "--cache-dir", str(state / "engines"), "--skip-if-current", *runtime_args]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    try:
        result = json.loads(out.read_text())
    except (OSError, ValueError):
        lines = proc.stdout.strip().splitlines()
        result = json.loads(lines[-1]) if lines else {"status": "error", "error": "the device runtime wrote nothing"}
    passed = proc.returncode == 0 and result.get("status") == "passed"
    if passed:
        activate(root, state, rid)
    return ({"action": "install", "release": rid, "activated": passed, "current": _target(root, "current"),
             "previous": _target(root, "previous"), "result": result},
            EXIT_OK if passed else (EXIT_GATE if proc.returncode == 1 else EXIT_UNUSABLE))


def rollback(root: Path, state: Path) -> dict:
    cur, prev = _target(root, "current"), _target(root, "previous")
    if prev is None or not (root / "releases" / prev).is_dir():
        raise ReleaseError(f"nothing to roll back to: {root / 'previous'} does not point to a release")
    _link(root, "previous", cur)
    _link(root, "current", prev)
    result = state / "results" / f"{prev}.json"
    if result.is_file():
        _write_json(state / "result.json", json.loads(result.read_text()))
    return {"action": "rollback", "current": prev, "previous": cur}


def status(root: Path, state: Path) -> dict:
    cur = _target(root, "current")
    try:
        result = json.loads((state / "result.json").read_text())
    except (OSError, ValueError):
        result = None
    releases = sorted(p.name for p in (root / "releases").iterdir() if p.is_dir() and not p.name.startswith(".")) \
        if (root / "releases").is_dir() else []
    manifest_sha = None
    if cur and (root / "current" / MANIFEST).is_file():
        manifest_sha = _sha256(root / "current" / MANIFEST)
    return {"action": "status", "installed": cur is not None, "current": cur, "previous": _target(root, "previous"),
            "releases": releases, "manifest_sha256": manifest_sha, "result": result,
            "result_is_current": bool(result and manifest_sha and result.get("manifest_sha256") == manifest_sha),
            "checked_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="releases.py", description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=("install", "rollback", "status"))
    p.add_argument("--root", default=ROOT)
    p.add_argument("--state", default=STATE)
    p.add_argument("--from", dest="source", default=None, help="install: the staged bundle folder")
    p.add_argument("--python", default=sys.executable, help="install: the python that runs the device runtime")
    argv = list(sys.argv[1:] if argv is None else argv)
    runtime_args = argv[argv.index("--") + 1:] if "--" in argv else []   # install: for device_runtime.py
    args = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    args.runtime_args = runtime_args
    root, state = Path(args.root).expanduser(), Path(args.state).expanduser()
    try:
        if args.action == "install":
            if not args.source:
                raise ReleaseError("install needs --from STAGED_BUNDLE_FOLDER")
            out, code = install(root, state, Path(args.source).expanduser(), args.python, args.runtime_args)
        elif args.action == "rollback":
            out, code = rollback(root, state), EXIT_OK
        else:
            out, code = status(root, state), EXIT_OK
    except (ReleaseError, OSError) as e:
        out, code = {"action": args.action, "error": str(e)}, EXIT_UNUSABLE
    print(json.dumps(out, sort_keys=True, default=str))
    return code


if __name__ == "__main__":
    sys.exit(main())
