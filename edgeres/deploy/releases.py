#!/usr/bin/env python3
"""Releases on a device: one layout for SSH deploys, Ansible, Mender and flashed images, and one transaction.

Standalone (python3 stdlib only): `edgeres deploy` runs this file's source on the device, the rootfs installer
imports it on the host, the Ansible playbook and the Mender update module run the copy inside a release.

    ROOT/releases/<id>/        one folder per bundle; <id> = <run name>-<manifest sha256[:12]> (content-addressed)
    ROOT/current -> releases/<id>    the release that runs; switched only by `activate` (or a flashed image)
    ROOT/previous -> releases/<id>   the release `current` replaced (what `rollback` returns to)
    STATE/lock                 flock: one install/activate/rollback/verify at a time on this device
    STATE/attempts/<id>/<attempt>.json   every verification attempt, passed or not
    STATE/results/<id>.json    the release's last PASSED verification here (a later failed check never replaces it)
    STATE/result.json          the result of the release `current` points to
    STATE/pending.json         the last install that passed, waiting for `activate` (any newer install supersedes it)
    STATE/history.json         when each release was activated (what --keep keeps)
    STATE/engines/             engines, cached by device + TensorRT version + ONNX sha256

The transaction: `install` stages and verifies under the lock with its own time limit and never switches;
`activate <id>` (sent by the controller only when it still wants that release) switches with one rename. An
install that is aborted (time limit, --abort-on-stdin-eof when the controller's connection drops), fails or is
superseded leaves `current`, `previous` and result.json as they were; its partial folder is removed by the next run.

    python3 releases.py prepare [--objects DIR]            identity, permissions, files this device already has
    python3 releases.py install (--from FOLDER | --objects DIR --manifest SHA256) [--time-limit S] [--attempt A]
                        [--trusted-keys FILE] [--abort-on-stdin-eof] [-- DEVICE RUNTIME ARGS]
    python3 releases.py activate RELEASE [--attempt A] [--keep N] [--units-dir DIR]
    python3 releases.py rollback | status | verify-current | prune --keep N

Common options: --root R (default /opt/edgeres), --state S (default /var/lib/edgeres), --python PY.
Each prints one JSON object. Exit codes: 0 done, 1 the release failed verification (nothing switched), 2 unusable
(bad or malformed bundle, bad signature, busy, time limit, nothing to roll back to, no permission).
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT, STATE = "/opt/edgeres", "/var/lib/edgeres"
TRUSTED_KEYS = "/etc/edgeres/allowed_signers"   # OpenSSH allowed_signers: bundles must be signed by one of these
UNITS_DIR = "/etc/systemd/system"
MANIFEST = "manifest.json"
SIGNATURE = "signature.json"        # beside the manifest, never listed in it (it signs the manifest)
SIGN_NAMESPACE = "edgeres-bundle"
EXECUTABLE = ("device_runtime.py", "edgeres-device", "releases.py")
EXIT_OK, EXIT_GATE, EXIT_UNUSABLE = 0, 1, 2
PART_MAX_AGE_S = 600                # a staged .part file older than this belongs to a dead copy
UNIT_NAME, TIMER_NAME = "edgeres-verify.service", "edgeres-verify.timer"
# Verify-on-boot: a timer starts the check 30 s after boot, outside the boot transaction, so multi-user.target and
# `systemctl is-system-running` reach "running" without waiting for an engine build (up to an hour on a Nano).
UNIT = """# Installed by edgeres (releases.py). Started by edgeres-verify.timer after boot, never as part of the boot
# transaction: the engine build and check (first boot, or after a JetPack/TensorRT upgrade) never delay
# multi-user.target. Otherwise it finds a current result and returns at once.
[Unit]
Description=edgeres: verify the current release on this device (engine build when needed)
Documentation=file://@ROOT@/current/manifest.json
After=nvpmodel.service nvfancontrol.service
ConditionPathExists=@ROOT@/current/manifest.json

[Service]
Type=oneshot
UMask=0022
Nice=10
ExecStart=@PYTHON@ @ROOT@/current/releases.py verify-current --root @ROOT@ --state @STATE@ --time-limit 3600
TimeoutStartSec=3700
StandardOutput=journal
"""
TIMER = """# Installed by edgeres (releases.py): runs edgeres-verify.service once, 30 s after each boot.
[Unit]
Description=edgeres: verify the current release after boot

[Timer]
OnBootSec=30s
AccuracySec=5s

[Install]
WantedBy=timers.target
"""


class ReleaseError(Exception):
    """Nothing was switched (exit 2)."""


def sha256_path(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ReleaseError(f"{path}: not a readable bundle manifest ({e})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(isinstance(v, dict) and isinstance(v.get("sha256"), str)
                                              for v in files.values()):
        raise ReleaseError(f"{path}: malformed bundle manifest (no 'files' table of name -> sha256)")
    for name in files:
        if "/" in name or name.startswith(".") or name in (MANIFEST, SIGNATURE) or "\x00" in name:
            raise ReleaseError(f"{path}: malformed bundle manifest (unsafe file name {name!r})")
    run = manifest.get("run")
    if run is not None and not (isinstance(run, dict) and isinstance(run.get("name", ""), str)):
        raise ReleaseError(f"{path}: malformed bundle manifest ('run' must be an object with a string name)")
    return manifest


def release_id(manifest: dict, manifest_sha256: str) -> str:
    """<run name>-<manifest sha256[:12]>: the same bundle gives the same id on every path (SSH, Ansible, Mender,
    rootfs), and the same run and settings give the same manifest (it holds no time stamp)."""
    name = (manifest.get("run") or {}).get("name") or "bundle"
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in name)[:60]
    return f"{safe}-{manifest_sha256[:12]}"


def folder_release_id(folder: Path) -> str:
    return release_id(_read_manifest(folder / MANIFEST), sha256_path(folder / MANIFEST))


# ------------------------------------------------------------------------------------------------ signatures
def signed_message(manifest_sha256: str, signed_at: int) -> bytes:
    """What `bundle --sign` signs (ssh-keygen -Y sign, namespace edgeres-bundle): the manifest and when."""
    return f"edgeres-bundle/1 manifest_sha256={manifest_sha256} signed_at={int(signed_at)}\n".encode()


def _ssh_keygen(args: list[str], message: bytes) -> subprocess.CompletedProcess:
    exe = shutil.which("ssh-keygen")
    if exe is None:
        raise ReleaseError("ssh-keygen (OpenSSH) is not installed on this device: signed bundles cannot be checked")
    return subprocess.run([exe, *args], input=message, capture_output=True, timeout=60)


def check_signature(sig_path: Path | None, manifest_sha256: str, trusted: Path, state: Path) -> dict | None:
    """With a trusted-keys file: the bundle must carry a signature by one of its keys over this manifest, not older
    than the newest signed bundle installed here (a replayed old bundle is refused). Without one: None."""
    if not trusted.is_file() or not trusted.read_text().strip():
        return None
    if sig_path is None or not sig_path.is_file():
        raise ReleaseError(f"unsigned bundle refused: {trusted} lists trusted keys (sign with `edgeres bundle "
                           f"--sign KEY`)")
    try:
        sig = json.loads(sig_path.read_text())
        signed_at, armored = int(sig["signed_at"]), str(sig["signature"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ReleaseError(f"{SIGNATURE}: malformed ({e})") from None
    if sig.get("manifest_sha256") != manifest_sha256:
        raise ReleaseError(f"{SIGNATURE} signs another manifest: the manifest was altered after signing")
    message = signed_message(manifest_sha256, signed_at)
    with tempfile.TemporaryDirectory(prefix="edgeres-sig-") as tmp:
        sig_file = Path(tmp) / "manifest.sig"
        sig_file.write_text(armored)
        found = _ssh_keygen(["-Y", "find-principals", "-s", str(sig_file), "-f", str(trusted)], message)
        principal = found.stdout.decode().strip().splitlines()[0] if found.returncode == 0 and found.stdout else ""
        if not principal:
            raise ReleaseError(f"bundle signature is not by a key in {trusted}")
        checked = _ssh_keygen(["-Y", "verify", "-f", str(trusted), "-I", principal, "-n", SIGN_NAMESPACE,
                               "-s", str(sig_file)], message)
        if checked.returncode != 0:
            raise ReleaseError(f"bad bundle signature: {checked.stderr.decode().strip()[-200:]}")
    newest = _load_json(state / "signing.json") or {}
    if signed_at < int(newest.get("signed_at", 0)):
        raise ReleaseError(f"replayed bundle refused: signed at {signed_at}, older than the newest signed bundle "
                           f"installed here ({newest.get('signed_at')}, release {newest.get('release')}); "
                           f"`rollback` returns to an installed release")
    return {"signed_at": signed_at, "principal": principal}


# ------------------------------------------------------------------------------------------------ files
def _load_json(path: Path) -> dict | None:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
    os.chmod(tmp, 0o644)   # readable by the default user
    os.replace(tmp, path)


def _releases(root: Path) -> list[str]:
    folder = root / "releases"
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")
                  and (p / MANIFEST).is_file())


def _have(root: Path, objects: Path | None) -> dict[str, Path]:
    """sha256 -> a file on this device with that content: staged objects (named by their sha256) and the files of
    installed releases (checked when staged; checked again when used)."""
    out: dict[str, Path] = {}
    for rid in _releases(root):
        folder = root / "releases" / rid
        manifest = _load_json(folder / MANIFEST) or {}
        for name, entry in (manifest.get("files") or {}).items():
            if isinstance(entry, dict) and (folder / name).is_file():
                out.setdefault(str(entry.get("sha256")), folder / name)
        out.setdefault(sha256_path(folder / MANIFEST), folder / MANIFEST)
        if (folder / SIGNATURE).is_file():
            out.setdefault(sha256_path(folder / SIGNATURE), folder / SIGNATURE)
    if objects is not None and objects.is_dir():
        for p in objects.iterdir():
            if len(p.name) == 64 and p.is_file():
                out[p.name] = p
    return out


class _Source:
    """Where install reads a bundle from: a bundle folder (files by name), or content-addressed objects (files by
    sha256: what `edgeres deploy` sends, plus what installed releases already hold)."""

    def __init__(self, root: Path, folder: Path | None, objects: Path | None, manifest_sha: str | None,
                 signature_sha: str | None):
        self.folder, self.objects = folder, objects
        if folder is not None:
            self.manifest_path = folder / MANIFEST
            self.signature = folder / SIGNATURE if (folder / SIGNATURE).is_file() else None
            self.have: dict[str, Path] = {}
        else:
            self.have = _have(root, objects)
            if manifest_sha not in self.have:
                raise ReleaseError(f"manifest {manifest_sha} was not staged in {objects}")
            self.manifest_path = self.have[manifest_sha]
            self.signature = self.have.get(signature_sha) if signature_sha else None
            if signature_sha and self.signature is None:
                raise ReleaseError(f"signature {signature_sha} was not staged in {objects}")
        self.manifest = _read_manifest(self.manifest_path)
        self.manifest_sha = sha256_path(self.manifest_path)
        if manifest_sha and self.manifest_sha != manifest_sha:
            raise ReleaseError(f"{MANIFEST} sha256 differs from the one the controller sent: altered in transit")

    def path(self, name: str, sha: str) -> Path | None:
        if self.folder is not None:
            p = self.folder / name
        else:
            p = self.have.get(sha)
        return p if p is not None and p.is_file() and not p.is_symlink() else None


def stage(root: Path, source: _Source) -> tuple[str, Path]:
    """Copy a verified bundle into ROOT/releases/<id> (via a .partial folder and a rename); an intact release of the
    same id is reused. Returns (id, path)."""
    rid = release_id(source.manifest, source.manifest_sha)
    releases = root / "releases"
    releases.mkdir(parents=True, exist_ok=True, mode=0o755)
    dest = releases / rid
    if dest.is_dir() and (dest / MANIFEST).is_file() and not _check(dest, _read_manifest(dest / MANIFEST)):
        if source.signature is not None and not (dest / SIGNATURE).is_file():
            shutil.copyfile(source.signature, dest / SIGNATURE)
            os.chmod(dest / SIGNATURE, 0o644)
        return rid, dest
    tmp = Path(tempfile.mkdtemp(prefix=f".{rid}.", suffix=".partial", dir=releases))
    try:
        problems = []
        for name, entry in sorted(source.manifest["files"].items()):
            src = source.path(name, entry["sha256"])
            if src is None:
                problems.append(f"{name}: missing or not a plain file")
                continue
            shutil.copyfile(src, tmp / name)
            if sha256_path(tmp / name) != entry["sha256"]:
                problems.append(f"{name}: sha256 mismatch")
            os.chmod(tmp / name, 0o755 if name in EXECUTABLE else 0o644)
        if problems:
            raise ReleaseError("bundle verification failed, nothing installed: " + "; ".join(problems))
        shutil.copyfile(source.manifest_path, tmp / MANIFEST)
        os.chmod(tmp / MANIFEST, 0o644)
        if source.signature is not None:
            shutil.copyfile(source.signature, tmp / SIGNATURE)
            os.chmod(tmp / SIGNATURE, 0o644)
        os.chmod(tmp, 0o755)
        if dest.exists():   # a damaged copy of the same release: replace it
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rid, dest


def stage_folder(root: Path, folder: Path) -> tuple[str, Path]:
    """Stage a bundle folder (the rootfs installer, by hand)."""
    return stage(root, _Source(root, folder, None, None, None))


def _check(folder: Path, manifest: dict) -> list[str]:
    problems = []
    for name, entry in sorted(manifest.get("files", {}).items()):
        path = folder / name
        if path.is_symlink() or not path.is_file():
            problems.append(f"{name}: missing or not a plain file")
        elif sha256_path(path) != entry.get("sha256"):
            problems.append(f"{name}: sha256 mismatch")
    return problems


def _clean_staging(root: Path, objects: Path | None) -> list[str]:
    """What dead runs left: partial release folders (safe under the lock) and old .part files of copies."""
    removed = []
    releases = root / "releases"
    if releases.is_dir():
        for p in releases.iterdir():
            if p.name.startswith(".") and p.name.endswith(".partial"):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
    if objects is not None and objects.is_dir():
        for p in objects.iterdir():
            if ".part" in p.name and time.time() - p.stat().st_mtime > PART_MAX_AGE_S:
                p.unlink()
                removed.append(p.name)
    return removed


# ------------------------------------------------------------------------------------------------ links
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


class Lock:
    """flock on STATE/lock: one transaction at a time on this device; waits up to `wait` seconds."""

    def __init__(self, state: Path, wait: float):
        self.path, self.wait, self.fd = state / "lock", wait, None

    def __enter__(self) -> Lock:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.wait
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(self.fd, 200, 0).decode(errors="replace").strip()
                    os.close(self.fd)
                    raise ReleaseError(f"busy: another edgeres transaction holds {self.path} ({holder or '?'}); "
                                       f"waited {self.wait:g} s") from None
                time.sleep(0.1)
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"pid {os.getpid()} since {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n".encode(), 0)
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)


# ------------------------------------------------------------------------------------------------ verification
def _verify(root: Path, state: Path, rid: str, python: str, runtime_args: list[str], *, attempt: str,
            time_limit: float, abort: threading.Event | None = None) -> tuple[dict, int]:
    """Run the device runtime on releases/<rid> under a time limit (its whole process group is killed at the limit
    or on abort). The attempt is kept in attempts/<rid>/<attempt>.json; results/<rid>.json only when it passed."""
    dest = root / "releases" / rid
    attempt_path = state / "attempts" / rid / f"{attempt}.json"
    attempt_path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    (state / "engines").mkdir(parents=True, exist_ok=True, mode=0o755)
    passed_path = state / "results" / f"{rid}.json"
    if passed_path.is_file():   # --skip-if-current reads the release's last passed result from --out
        shutil.copyfile(passed_path, attempt_path)
    cmd = [python, str(dest / "device_runtime.py"), "--bundle", str(dest), "--out", str(attempt_path),
           "--cache-dir", str(state / "engines"), "--skip-if-current", *runtime_args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True)
    stopped = None
    killer = threading.Thread(target=_watch, args=(proc, time_limit, abort), daemon=True)
    killer.start()
    stdout, _ = proc.communicate()
    killer.join()
    if abort is not None and abort.is_set():
        stopped = "aborted: the controller went away (its connection closed)"
    elif proc.returncode in (-signal.SIGKILL, -signal.SIGTERM):
        stopped = f"time limit: verification took more than {time_limit:g} s"
    lines = [ln for ln in stdout.strip().splitlines() if ln.startswith("{")]
    try:
        result = json.loads(lines[-1]) if lines else _load_json(attempt_path)
    except ValueError:
        result = None
    if stopped or not isinstance(result, dict):
        result = {"format": "edgeres-result/1", "status": "error",
                  "error": stopped or "the device runtime printed no result"}
    result = {**result, "attempt": attempt, "exit_status": proc.returncode}
    _write_json(attempt_path, result)
    passed = not stopped and proc.returncode == 0 and result.get("status") == "passed"
    if passed and not result.get("skipped"):
        _write_json(passed_path, result)
    code = EXIT_OK if passed else (EXIT_GATE if proc.returncode == 1 and not stopped else EXIT_UNUSABLE)
    return result, code


def _watch(proc: subprocess.Popen, time_limit: float, abort: threading.Event | None) -> None:
    deadline = time.monotonic() + time_limit
    while proc.poll() is None:
        if time.monotonic() >= deadline or (abort is not None and abort.is_set()):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return
        time.sleep(0.05)


def _stdin_watch() -> threading.Event:
    """Set when stdin reaches EOF: the controller that started this install (and holds its stdin) is gone."""
    gone = threading.Event()

    def read() -> None:
        try:
            while os.read(0, 4096):
                pass
        except OSError:
            pass
        gone.set()

    threading.Thread(target=read, daemon=True).start()
    return gone


def install(root: Path, state: Path, source_args: dict, python: str, runtime_args: list[str], *,
            attempt: str, time_limit: float, lock_wait: float, trusted: Path,
            abort: threading.Event | None = None) -> tuple[dict, int]:
    with Lock(state, lock_wait):
        (state / "pending.json").unlink(missing_ok=True)     # a newer install supersedes any verified one
        cleaned = _clean_staging(root, source_args.get("objects"))
        source = _Source(root, **source_args)
        signed = check_signature(source.signature, source.manifest_sha, trusted, state)
        rid, _ = stage(root, source)
        if source.objects is not None:   # the objects are in the release now: the staging is not kept
            for entry in source.manifest["files"].values():
                (source.objects / entry["sha256"]).unlink(missing_ok=True)
            (source.objects / source.manifest_sha).unlink(missing_ok=True)
        result, code = _verify(root, state, rid, python, runtime_args, attempt=attempt, time_limit=time_limit,
                               abort=abort)
        verified = code == EXIT_OK and not (abort is not None and abort.is_set())
        if verified:
            _write_json(state / "pending.json", {"release": rid, "attempt": attempt, "signed": signed,
                                                 "verified_at": time.time()})
    return ({"action": "install", "release": rid, "attempt": attempt, "verified": verified, "activated": False,
             "current": _target(root, "current"), "previous": _target(root, "previous"), "signed": signed,
             "cleaned": cleaned, "result": result}, code if not (abort and abort.is_set()) else EXIT_UNUSABLE)


def _switch(root: Path, state: Path, rid: str) -> None:
    old = _target(root, "current")
    if old != rid:
        if old is not None:
            _link(root, "previous", old)
        _link(root, "current", rid)
    history = _load_json(state / "history.json") or {}
    history[rid] = time.time()
    _write_json(state / "history.json", history)


def activate(root: Path, state: Path, rid: str, *, attempt: str | None, keep: int | None, units_dir: Path | None,
             python: str, lock_wait: float) -> dict:
    """Switch to `rid` if it is the install that last passed here (and, with --attempt, that very attempt)."""
    with Lock(state, lock_wait):
        pending = _load_json(state / "pending.json")
        if not pending or pending.get("release") != rid or (attempt and pending.get("attempt") != attempt):
            raise ReleaseError(f"not activated: {rid}" + (f" attempt {attempt}" if attempt else "") +
                               " is not the install that last passed on this device (superseded, failed or never "
                               "installed); nothing switched")
        passed = _load_json(state / "results" / f"{rid}.json")
        if not passed or passed.get("status") != "passed" or not (root / "releases" / rid / MANIFEST).is_file():
            raise ReleaseError(f"not activated: no passed verification of {rid} on this device")
        _switch(root, state, rid)
        _write_json(state / "result.json", passed)
        if pending.get("signed"):
            _write_json(state / "signing.json", {"signed_at": pending["signed"]["signed_at"], "release": rid})
        (state / "pending.json").unlink()
        units = (install_units(units_dir, root=str(root.resolve()), state=str(state.resolve()), python=python)
                 if units_dir is not None else None)
        pruned = prune(root, state, keep) if keep else []
    return {"action": "activate", "release": rid, "activated": True, "current": rid,
            "previous": _target(root, "previous"), "pruned": pruned, "units": units}


def activate_flashed(root: Path, state: Path, rid: str) -> None:
    """A flashed image: current -> rid with no result yet; status reports it pending until the boot check passes."""
    _switch(root, state, rid)
    (state / "result.json").unlink(missing_ok=True)


def verify_current(root: Path, state: Path, python: str, runtime_args: list[str], *, time_limit: float,
                   lock_wait: float) -> tuple[dict, int]:
    """The boot check: verify the release `current` points to; result.json follows only a passed check."""
    with Lock(state, lock_wait):
        rid = _target(root, "current")
        if rid is None:
            raise ReleaseError(f"nothing installed: {root / 'current'} does not point to a release")
        attempt = time.strftime("%Y%m%dT%H%M%S") + f"-boot-{os.getpid()}"
        result, code = _verify(root, state, rid, python, runtime_args, attempt=attempt, time_limit=time_limit)
        if code == EXIT_OK:
            _write_json(state / "result.json", _load_json(state / "results" / f"{rid}.json") or result)
    return {"action": "verify-current", "release": rid, "attempt": attempt, "result": result}, code


def prune(root: Path, state: Path, keep: int) -> list[str]:
    """Remove releases beyond the `keep` most recently activated ones (current and previous always stay), with
    their results and attempts. Only folders this layout made (releases/<id> with a manifest) are touched."""
    history = _load_json(state / "history.json") or {}
    ids = sorted(_releases(root), key=lambda r: history.get(r, 0.0), reverse=True)
    keep_ids = {_target(root, "current"), _target(root, "previous"), *ids[:max(keep, 1)]}
    pending = (_load_json(state / "pending.json") or {}).get("release")
    removed = []
    for rid in ids:
        if rid in keep_ids or rid == pending:
            continue
        shutil.rmtree(root / "releases" / rid)
        shutil.rmtree(state / "attempts" / rid, ignore_errors=True)
        (state / "results" / f"{rid}.json").unlink(missing_ok=True)
        history.pop(rid, None)
        removed.append(rid)
    if removed:
        _write_json(state / "history.json", history)
    return removed


def install_units(units_dir: Path, *, root: str, state: str, python: str, link_dir: str | None = None) -> dict:
    """The verify-on-boot service and its timer, enabled (timers.target.wants/ -> LINK_DIR/the timer, as `systemctl
    enable` writes it; LINK_DIR defaults to UNITS_DIR). ROOT, STATE and PYTHON are paths as the device sees them.
    Skipped, with the reason, where the folder does not exist (no systemd) or cannot be written."""
    if not units_dir.is_dir():
        return {"installed": False, "reason": f"{units_dir} does not exist (no systemd?)"}
    if not os.access(units_dir, os.W_OK):
        return {"installed": False, "reason": f"{units_dir} is not writable by uid {os.getuid()}"}
    for name, text in unit_files(root=root, state=state, python=python).items():
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=units_dir)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, units_dir / name)
    legacy = units_dir / "multi-user.target.wants" / UNIT_NAME   # how earlier edgeres enabled the unit: in the boot
    if legacy.is_symlink() and os.readlink(legacy).endswith("/" + UNIT_NAME):   # transaction; ours, so removed
        legacy.unlink()
    wants = units_dir / "timers.target.wants"
    if not wants.is_dir():
        wants.mkdir(mode=0o755)
        os.chmod(wants, 0o755)
    link = wants / TIMER_NAME
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(f"{link_dir or units_dir.resolve()}/{TIMER_NAME}")
    if str(units_dir) == UNITS_DIR and shutil.which("systemctl"):   # this device's own systemd: effective now
        subprocess.run(["systemctl", "daemon-reload"], capture_output=True, timeout=60)
        subprocess.run(["systemctl", "start", TIMER_NAME], capture_output=True, timeout=60)
    return {"installed": True, "dir": str(units_dir), "units": [UNIT_NAME, TIMER_NAME]}


def unit_files(*, root: str, state: str, python: str) -> dict[str, str]:
    return {UNIT_NAME: UNIT.replace("@ROOT@", root).replace("@STATE@", state).replace("@PYTHON@", python),
            TIMER_NAME: TIMER}


def rollback(root: Path, state: Path, lock_wait: float) -> dict:
    with Lock(state, lock_wait):
        cur, prev = _target(root, "current"), _target(root, "previous")
        if prev is None or not (root / "releases" / prev).is_dir():
            raise ReleaseError(f"nothing to roll back to: {root / 'previous'} does not point to a release")
        _link(root, "previous", cur)
        _link(root, "current", prev)
        (state / "pending.json").unlink(missing_ok=True)
        passed = _load_json(state / "results" / f"{prev}.json")
        if passed:
            _write_json(state / "result.json", passed)
        else:
            (state / "result.json").unlink(missing_ok=True)
    return {"action": "rollback", "current": prev, "previous": cur}


def machine_id() -> str | None:
    for p in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            text = Path(p).read_text().strip()
        except OSError:
            continue
        if text:
            return text
    return None


def prepare(root: Path, state: Path, objects: Path | None) -> tuple[dict, int]:
    """Before any copy: who this device is (machine id + install root), whether this login may write ROOT and
    STATE, and which files (by sha256) it already has."""
    problems = []
    for path in (root, state):   # a real write, as the install will do it (sudo, read-only mounts, ACLs included)
        try:
            path.mkdir(parents=True, exist_ok=True, mode=0o755)
            fd, tmp = tempfile.mkstemp(prefix=".edgeres-write-check.", dir=path)
            os.close(fd)
            os.unlink(tmp)
        except OSError as e:
            problems.append(f"{path}: cannot write as uid {os.getuid()} ({e.strerror or e})")
    out = {"action": "prepare", "machine_id": machine_id(), "root": os.path.realpath(root), "uid": os.getuid(),
           "problems": problems, "have": [] if problems else sorted(_have(root, objects)),
           "current": None if problems else _target(root, "current")}
    return out, EXIT_UNUSABLE if problems else EXIT_OK


def status(root: Path, state: Path) -> dict:
    cur = _target(root, "current")
    result = _load_json(state / "result.json")
    manifest_sha = None
    if cur and (root / "current" / MANIFEST).is_file():
        manifest_sha = sha256_path(root / "current" / MANIFEST)
    current_ok = bool(result and manifest_sha and result.get("manifest_sha256") == manifest_sha
                      and result.get("status") == "passed")
    return {"action": "status", "installed": cur is not None, "current": cur, "previous": _target(root, "previous"),
            "releases": _releases(root), "manifest_sha256": manifest_sha, "result": result,
            "result_is_current": bool(result and manifest_sha and result.get("manifest_sha256") == manifest_sha),
            "pending": cur is not None and not current_ok,
            "install_pending": (_load_json(state / "pending.json") or {}).get("release"),
            "signed": (root / "current" / SIGNATURE).is_file() if cur else False,
            "checked_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _seconds(text: str) -> float:
    """argparse type of a time limit: a finite number of seconds in [0, 1e7] (nan or inf would wait forever)."""
    value = float(text)   # not a number: argparse's own "invalid _seconds value"
    if not (math.isfinite(value) and 0 <= value <= 1e7):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number of seconds in [0, 1e7]")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="releases.py", description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=("prepare", "install", "activate", "rollback", "status", "verify-current",
                                      "prune"))
    p.add_argument("release", nargs="?", default=None, help="activate: the release id install printed")
    p.add_argument("--root", default=ROOT)
    p.add_argument("--state", default=STATE)
    p.add_argument("--from", dest="source", default=None, help="install: a bundle folder")
    p.add_argument("--objects", default=None, help="install/prepare: content-addressed staging (files by sha256)")
    p.add_argument("--manifest", default=None, help="install --objects: the manifest's sha256")
    p.add_argument("--signature", default=None, help="install --objects: the signature file's sha256")
    p.add_argument("--attempt", default=None, help="install: a name for this attempt; activate: must match it")
    p.add_argument("--python", default=sys.executable, help="the python that runs the device runtime")
    p.add_argument("--time-limit", type=_seconds, default=3600.0, help="install/verify-current: seconds (killed after)")
    p.add_argument("--lock-wait", type=_seconds, default=30.0, help="seconds to wait for another transaction")
    p.add_argument("--trusted-keys", default=TRUSTED_KEYS, help="allowed_signers file; present: signatures required")
    p.add_argument("--abort-on-stdin-eof", action="store_true",
                   help="install: abort (nothing verified, nothing pending) when stdin closes (the controller left)")
    p.add_argument("--keep", type=int, default=None, help="activate/prune: releases to keep")
    p.add_argument("--units-dir", default=None, help="activate: install the verify-on-boot units here")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    runtime_args = argv[argv.index("--") + 1:] if "--" in argv else []   # for device_runtime.py
    args = _parser().parse_intermixed_args(argv[:argv.index("--")] if "--" in argv else argv)
    root, state = Path(args.root).expanduser(), Path(args.state).expanduser()
    objects = Path(args.objects).expanduser() if args.objects else None
    code = EXIT_OK
    try:
        if args.keep is not None and args.keep < 1:
            raise ReleaseError("--keep must be >= 1")
        if args.action == "prepare":
            out, code = prepare(root, state, objects)
        elif args.action == "install":
            if bool(args.source) == bool(objects and args.manifest):
                raise ReleaseError("install needs --from BUNDLE_FOLDER, or --objects DIR with --manifest SHA256")
            src = {"folder": Path(args.source).expanduser() if args.source else None, "objects": objects,
                   "manifest_sha": args.manifest, "signature_sha": args.signature}
            abort = _stdin_watch() if args.abort_on_stdin_eof else None
            out, code = install(root, state, src, args.python, runtime_args,
                                attempt=args.attempt or time.strftime("%Y%m%dT%H%M%S") + f"-{os.getpid()}",
                                time_limit=args.time_limit, lock_wait=args.lock_wait,
                                trusted=Path(args.trusted_keys).expanduser(), abort=abort)
        elif args.action == "activate":
            if not args.release:
                raise ReleaseError("activate needs the RELEASE id that install printed")
            out = activate(root, state, args.release, attempt=args.attempt, keep=args.keep,
                           units_dir=Path(args.units_dir).expanduser() if args.units_dir else None,
                           python=sys.executable, lock_wait=args.lock_wait)
        elif args.action == "rollback":
            out = rollback(root, state, args.lock_wait)
        elif args.action == "verify-current":
            out, code = verify_current(root, state, args.python, runtime_args or ["--quiet"],
                                       time_limit=args.time_limit, lock_wait=args.lock_wait)
        elif args.action == "prune":
            if args.keep is None:
                raise ReleaseError("prune needs --keep N")
            with Lock(state, args.lock_wait):
                out = {"action": "prune", "pruned": prune(root, state, args.keep)}
        else:
            out = status(root, state)
    except (ReleaseError, OSError) as e:
        out, code = {"action": args.action, "error": str(e)}, EXIT_UNUSABLE
    except (KeyError, TypeError, AttributeError, ValueError) as e:   # a manifest or state file of the wrong shape:
        out, code = {"action": args.action, "error": f"malformed bundle or state ({type(e).__name__}: {e})"}, \
            EXIT_UNUSABLE                                              # unusable (2), never "the gate failed" (1)
    print(json.dumps(out, sort_keys=True, default=str), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
