#!/usr/bin/env python3
"""Releases on a device: one layout for SSH deploys, Ansible, Mender and flashed images, and one transaction.

Standalone (python3 stdlib only): `edgeres deploy` runs this file's source on the device, the rootfs installer
imports it on the host, the Ansible playbook and the Mender update module run the copy inside a release.

    ROOT/releases/<id>/        one folder per bundle; <id> = <run name>-<manifest sha256[:12]> (content-addressed)
    ROOT/current -> releases/<id>    the release that runs; switched only by `activate` (or a flashed image)
    ROOT/previous -> releases/<id>   the release `current` replaced (what `rollback` returns to)
    STATE/lock                 flock: one install/activate/rollback/verify at a time on this device
    STATE/attempts/<id>/<attempt>.json   every verification attempt, passed or not (<attempt>-check: after a switch)
    STATE/results/<id>.json    the release's last PASSED verification here (a later failed check never replaces it)
    STATE/result.json          the result of the release `current` points to
    STATE/pending.json         the last install that passed, waiting for `activate` (any newer install supersedes it)
    STATE/trial.json           a switched release not yet committed (its check runs); gone once committed or undone
    STATE/activations/<attempt>.json   how each activation ended: committed, fell back (why) or refused (why)
    STATE/history.json         when each release was committed (what --keep keeps)
    STATE/engines/             engines, cached by device + TensorRT version + ONNX sha256

The update's life cycle, the same on every path (SSH, Ansible, Mender, a flashed image):
    install   stage and verify under the lock with its own time limit; never switches (-> pending.json)
    activate  inside the controller's window (--deadline-in S, and with --abort-on-stdin-eof its connection):
              switch `current` (trial.json written first), then check the release as it now runs (the engine
              verification against the probe, then the health-check command: --health-check, else the bundle's
              manifest "health_check"), then commit (result.json, history, trial.json removed) only when the check
              passed and the window is still open; otherwise switch back by itself and record why. Exit 0 committed,
              1 fell back, 2 refused (nothing switched: superseded, busy, deadline passed, connection gone);
              "switched" in its JSON: committed and `current` changed (false for the release already running)
    flashed   `edgeres rootfs` leaves a first-boot trial: the boot unit's verify-current checks it the same way
A trial whose activation died (killed, power cut) is undone by the next transaction on the device.

    python3 releases.py prepare [--objects DIR] [--attempt A]    identity, permissions, space, files it has
    python3 releases.py install (--from FOLDER | --objects DIR --manifest SHA256) [--time-limit S] [--attempt A]
                        [--trusted-keys FILE] [--abort-on-stdin-eof] [-- DEVICE RUNTIME ARGS]
    python3 releases.py activate RELEASE --attempt A [--deadline-in S] [--abort-on-stdin-eof] [--health-check CMD]
                        [--health-timeout S] [--keep N] [--objects DIR] [--units-dir DIR] [-- DEVICE RUNTIME ARGS]
    python3 releases.py discard RELEASE [--attempt A]     drop a verified install that will not be activated
    python3 releases.py rollback [--to RELEASE] | status [--attempt A] | verify-current | prune --keep N

Common options: --root R (default /opt/edgeres), --state S (default /var/lib/edgeres), --python PY.
Each prints one JSON object on stdout (progress lines, `edgeres-progress {...}`, go to stderr). Exit codes: 0 done,
1 the release failed verification or its check (nothing switched, or switched back), 2 unusable (bad or malformed
bundle, bad signature, busy, time limit, window closed, nothing to roll back to, no permission).
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import math
import os
import re
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
PART_MAX_AGE_S = 600                # a staged .part file (or object) older than this belongs to a dead copy
PROGRESS_EVERY_S = 5.0              # a progress line on stderr this often while the device verifies or checks
HEALTH_TIMEOUT_S = 300.0            # the health-check command's time limit unless the bundle or a flag says
ACTIVATIONS_KEPT = 50               # STATE/activations/ records kept (the newest)
TRIAL = "trial.json"
ATTEMPT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")   # an attempt name is a file name on the device
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


def _have(root: Path, objects: Path | None, *, check: bool = False) -> dict[str, Path]:
    """sha256 -> a file on this device with that content: staged objects (named by their sha256) and the files of
    installed releases. With check (prepare, before the controller decides what to send), release files are hashed
    and a damaged one is left out; staged objects are always checked by `repair_objects` first."""
    out: dict[str, Path] = {}
    for rid in _releases(root):
        folder = root / "releases" / rid
        manifest = _load_json(folder / MANIFEST) or {}
        for name, entry in (manifest.get("files") or {}).items():
            path = folder / name
            if isinstance(entry, dict) and path.is_file() and not path.is_symlink() and \
                    (not check or sha256_path(path) == entry.get("sha256")):
                out.setdefault(str(entry.get("sha256")), path)
        out.setdefault(sha256_path(folder / MANIFEST), folder / MANIFEST)
        if (folder / SIGNATURE).is_file():
            out.setdefault(sha256_path(folder / SIGNATURE), folder / SIGNATURE)
    if objects is not None and objects.is_dir():
        for p in objects.iterdir():
            if len(p.name) == 64 and p.is_file():
                out[p.name] = p
    return out


def repair_objects(objects: Path | None) -> list[str]:
    """Delete every staged object whose content is not what its name (sha256) says: junk left by a broken copy or a
    damaged disk would otherwise be trusted by name and fail every later install. Returns their names."""
    removed = []
    if objects is not None and objects.is_dir():
        for p in objects.iterdir():
            if len(p.name) == 64 and p.is_file() and sha256_path(p) != p.name:
                p.unlink()
                removed.append(p.name)
    return removed


class _Source:
    """Where install reads a bundle from: a bundle folder (files by name), or content-addressed objects (files by
    sha256: what `edgeres deploy` sends, plus what installed releases already hold)."""

    def __init__(self, root: Path, folder: Path | None, objects: Path | None, manifest_sha: str | None,
                 signature_sha: str | None):
        self.folder, self.objects, self.signature_sha = folder, objects, signature_sha
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
                if source.objects is not None and src.parent == source.objects:
                    src.unlink()   # a damaged staged object: the next deploy sends it again
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


class Window:
    """An activation's bounds as its controller set them: a deadline (seconds from this command's start) and, with
    --abort-on-stdin-eof, the controller's connection. The switch and the commit happen only while it is open."""

    def __init__(self, seconds: float | None = None, gone: threading.Event | None = None):
        self.end = None if seconds is None else time.monotonic() + seconds
        self.gone = gone

    def left(self) -> float:
        return math.inf if self.end is None else max(0.0, self.end - time.monotonic())

    def closed(self) -> str | None:
        """Why the window is closed, or None while it is open."""
        if self.gone is not None and self.gone.is_set():
            return "the controller's connection closed"
        if self.end is not None and time.monotonic() >= self.end:
            return "the controller's deadline passed"
        return None


class Lock:
    """flock on STATE/lock: one transaction at a time on this device; waits up to `wait` seconds, and no longer
    than `stop` (a Window's closed) returns None."""

    def __init__(self, state: Path, wait: float, stop=None):
        self.path, self.wait, self.fd, self.stop = state / "lock", wait, None, stop

    def __enter__(self) -> Lock:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.wait
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                why = self.stop() if self.stop is not None else None
                if why:
                    os.close(self.fd)
                    raise ReleaseError(f"not switched: {why} while another edgeres transaction held {self.path}"
                                       ) from None
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
            time_limit: float, abort: threading.Event | None = None, folder: Path | None = None,
            skip_if_current: bool = True) -> tuple[dict, int]:
    """Run the device runtime on FOLDER (default releases/<rid>; ROOT/current for the check after a switch) under a
    time limit (its whole process group is killed at the limit or on abort). The attempt is kept in
    attempts/<rid>/<attempt>.json; results/<rid>.json only when it passed."""
    dest = folder or root / "releases" / rid
    attempt_path = state / "attempts" / rid / f"{attempt}.json"
    attempt_path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    (state / "engines").mkdir(parents=True, exist_ok=True, mode=0o755)
    passed_path = state / "results" / f"{rid}.json"
    if skip_if_current and passed_path.is_file():   # --skip-if-current reads the release's last passed result
        shutil.copyfile(passed_path, attempt_path)
    cmd = [python, str(dest / "device_runtime.py"), "--bundle", str(dest), "--out", str(attempt_path),
           "--cache-dir", str(state / "engines"), *(["--skip-if-current"] if skip_if_current else []),
           *runtime_args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True)
    stopped = None
    killer = threading.Thread(target=_watch, args=(proc, time_limit, abort, f"verify {rid}"), daemon=True)
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


def progress(what: str, seconds: float, **extra) -> None:
    """One progress line on stderr (the controller forwards it): `edgeres-progress {"what": ..., "seconds": ...}`."""
    line = json.dumps({"what": what, "seconds": round(seconds, 1), **extra}, sort_keys=True)
    try:
        sys.stderr.write(f"edgeres-progress {line}\n")
        sys.stderr.flush()
    except (OSError, ValueError):   # nobody reads stderr any more: the work goes on
        pass


def _watch(proc: subprocess.Popen, time_limit: float, abort: threading.Event | None, what: str) -> None:
    """Kill PROC's process group at the time limit or on abort; a progress line every PROGRESS_EVERY_S."""
    t0 = time.monotonic()
    deadline, said = t0 + time_limit, t0
    while proc.poll() is None:
        now = time.monotonic()
        if now >= deadline or (abort is not None and abort.is_set()):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return
        if now - said >= PROGRESS_EVERY_S:
            said = now
            progress(what, now - t0)
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
        undone = _undo_dead_trial(root, state)
        (state / "pending.json").unlink(missing_ok=True)     # a newer install supersedes any verified one
        cleaned = _clean_staging(root, source_args.get("objects"))
        source = _Source(root, **source_args)
        try:   # staged into the release, or refused: either way the staging copy is not kept
            signed = check_signature(source.signature, source.manifest_sha, trusted, state)
            rid, _ = stage(root, source)
        finally:
            _drop_objects(source)
        result, code = _verify(root, state, rid, python, runtime_args, attempt=attempt, time_limit=time_limit,
                               abort=abort)
        verified = code == EXIT_OK and not (abort is not None and abort.is_set())
        if verified:
            _write_json(state / "pending.json", {"release": rid, "attempt": attempt, "signed": signed,
                                                 "verified_at": time.time()})
    return ({"action": "install", "release": rid, "attempt": attempt, "verified": verified, "activated": False,
             "current": _target(root, "current"), "previous": _target(root, "previous"), "signed": signed,
             "cleaned": cleaned, "undone": undone, "result": result},
            code if not (abort and abort.is_set()) else EXIT_UNUSABLE)


def _drop_objects(source: _Source) -> None:
    """The staged objects (files by sha256) of this bundle: the files, its manifest and its signature."""
    if source.objects is None:
        return
    for sha in [*(e["sha256"] for e in source.manifest["files"].values()), source.manifest_sha,
                source.signature_sha]:
        if sha and len(sha) == 64:
            (source.objects / sha).unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------ activation
def _point_result(state: Path, rid: str | None) -> None:
    """result.json follows `current`: that release's last passed result here, or none (pending)."""
    passed = _load_json(state / "results" / f"{rid}.json") if rid else None
    if passed:
        _write_json(state / "result.json", passed)
    else:
        (state / "result.json").unlink(missing_ok=True)


def activation_record(state: Path, attempt: str | None) -> dict | None:
    return _load_json(state / "activations" / f"{attempt}.json") if attempt and ATTEMPT.fullmatch(attempt) else None


def _record(state: Path, attempt: str, rid: str, outcome: str, reason: str | None = None, **extra) -> dict:
    """How an activation ended (committed, fell back, refused), kept in STATE/activations/<attempt>.json for the
    controller that could not hear the answer; the newest ACTIVATIONS_KEPT are kept."""
    record = {"attempt": attempt, "release": rid, "outcome": outcome, "reason": reason, "at": time.time(), **extra}
    folder = state / "activations"
    _write_json(folder / f"{attempt}.json", record)
    old = sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)[ACTIVATIONS_KEPT:]
    for p in old:
        p.unlink(missing_ok=True)
    return record


def _begin_trial(root: Path, state: Path, rid: str, attempt: str, kind: str) -> dict:
    """Switch `current` to RID, uncommitted: STATE/trial.json first, so a switch whose activation dies before the
    commit is undone by the next transaction (kind "activate") or checked at boot (kind "first-boot")."""
    trial = {"release": rid, "attempt": attempt, "kind": kind, "current_before": _target(root, "current"),
             "previous_before": _target(root, "previous"), "started_at": time.time()}
    _write_json(state / TRIAL, trial)
    if trial["current_before"] not in (None, rid):
        _link(root, "previous", trial["current_before"])
    _link(root, "current", rid)
    return trial


def _fall_back(root: Path, state: Path, trial: dict, reason: str) -> dict:
    """Undo a trial: `current` and `previous` as they were before it (no `current` when there was none), result.json
    following; why, recorded."""
    before = trial.get("current_before")
    _link(root, "current", before)
    _link(root, "previous", trial.get("previous_before"))
    _point_result(state, before)
    (state / TRIAL).unlink(missing_ok=True)
    return _record(state, str(trial.get("attempt") or "unknown"), str(trial.get("release")), "fell back", reason,
                   now=before)


def _commit(root: Path, state: Path, trial: dict, result: dict, signed: dict | None) -> dict:
    """The trial passed: its result becomes result.json, the release enters history (what --keep keeps), and the
    removal of trial.json is the commit."""
    rid = trial["release"]
    _write_json(state / "result.json", result)
    history = _load_json(state / "history.json") or {}
    history[rid] = time.time()
    _write_json(state / "history.json", history)
    if signed:
        _write_json(state / "signing.json", {"signed_at": signed["signed_at"], "release": rid})
    (state / TRIAL).unlink()
    return _record(state, trial["attempt"], rid, "committed")


def _undo_dead_trial(root: Path, state: Path) -> dict | None:
    """Under the lock: a trial of kind "activate" belongs to an activation that is no longer running (it held the
    lock for its whole life), so it is undone. A first-boot trial waits for the boot check, unless its release is
    no longer current (a later switch replaced it)."""
    trial = _load_json(state / TRIAL)
    if trial is None:
        return None
    if trial.get("kind") == "first-boot":
        if trial.get("release") != _target(root, "current"):
            (state / TRIAL).unlink()
        return None
    return _fall_back(root, state, trial, "its activation ended before the commit (killed, or the device lost power)")


def _health(manifest: dict, command: str | None, timeout: float | None) -> tuple[str | None, float]:
    """The health-check command and its time limit: --health-check, else the manifest's health_check."""
    spec = manifest.get("health_check") or {}
    if not isinstance(spec, dict) or not isinstance(spec.get("command", ""), str):
        raise ReleaseError("malformed bundle manifest (health_check must be {\"command\": str, \"timeout_s\": s})")
    return command or spec.get("command") or None, float(timeout or spec.get("timeout_s") or HEALTH_TIMEOUT_S)


def _run_health(root: Path, state: Path, trial: dict, command: str, time_limit: float,
                abort: threading.Event | None) -> dict:
    """The user's health check, `sh -c COMMAND` in ROOT/current with EDGERES_RELEASE, EDGERES_RELEASE_DIR,
    EDGERES_STATE and EDGERES_RESULT (the check's verification) set; exit 0 is healthy. Output in a log."""
    rid, attempt = trial["release"], trial["attempt"]
    log = state / "attempts" / rid / f"{attempt}-health.log"
    env = {**os.environ, "EDGERES_RELEASE": rid, "EDGERES_RELEASE_DIR": str(root / "current"),
           "EDGERES_STATE": str(state), "EDGERES_RESULT": str(state / "attempts" / rid / f"{attempt}-check.json")}
    with open(log, "wb") as out:
        proc = subprocess.Popen(["/bin/sh", "-c", command], cwd=root / "current", env=env, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        _watch(proc, time_limit, abort, f"health check {rid}")
        proc.wait()
    tail = log.read_text(errors="replace").strip()[-300:]
    killed = proc.returncode == -signal.SIGKILL
    error = None if proc.returncode == 0 else (f"no answer within {time_limit:.0f} s" if killed else
                                               f"exit {proc.returncode}") + (f": {tail}" if tail else "")
    return {"command": command, "exit_status": proc.returncode, "passed": proc.returncode == 0, "log": str(log),
            "error": error}


def _why_failed(result: dict) -> str:
    gates = (result.get("verification") or {}).get("gates") or []
    failed = [str(g.get("name")) for g in gates if isinstance(g, dict) and not g.get("passed")]
    return result.get("error") or ("gates failed: " + ", ".join(failed) if failed else f"status {result.get('status')}")


def _check_release(root: Path, state: Path, trial: dict, python: str, runtime_args: list[str], *,
                   health: tuple[str | None, float], window: Window, time_limit: float) -> tuple[dict, dict | None,
                                                                                                  str | None]:
    """The switched release as it now runs (ROOT/current), within the window: the engine verification against the
    probe, then the health-check command. (the verification, the health check's record, why it failed or None)."""
    result, code = _verify(root, state, trial["release"], python, runtime_args, attempt=f"{trial['attempt']}-check",
                           time_limit=min(time_limit, window.left()), abort=window.gone, folder=root / "current",
                           skip_if_current=False)
    if code != EXIT_OK:
        return result, None, window.closed() or f"engine check failed: {_why_failed(result)}"
    command, limit = health
    if command is None:
        return result, None, window.closed()
    record = _run_health(root, state, trial, command, min(limit, window.left()), window.gone)
    return result, record, window.closed() or (None if record["passed"] else f"health check failed: {record['error']}")


def _pending_install(root: Path, state: Path, rid: str, attempt: str | None) -> dict:
    pending = _load_json(state / "pending.json")
    if not pending or pending.get("release") != rid or (attempt and pending.get("attempt") != attempt):
        raise ReleaseError(f"not activated: {rid}" + (f" attempt {attempt}" if attempt else "") +
                           " is not the install that last passed on this device (superseded, failed or never "
                           "installed); nothing switched")
    passed = _load_json(state / "results" / f"{rid}.json")
    if not passed or passed.get("status") != "passed" or not (root / "releases" / rid / MANIFEST).is_file():
        raise ReleaseError(f"not activated: no passed verification of {rid} on this device")
    return pending


def activate(root: Path, state: Path, rid: str, *, attempt: str | None, python: str, runtime_args: list[str],
             window: Window, health: tuple[str | None, float | None], time_limit: float, lock_wait: float,
             keep: int | None = None, units_dir: Path | None = None, objects: Path | None = None) -> tuple[dict, int]:
    """Switch to `rid` if it is the install that last passed here (that very attempt) while the window is open,
    check it as it runs, and commit (exit 0) or switch back by itself (exit 1). Refused: ReleaseError (exit 2).
    Without ATTEMPT (by hand), the pending install's attempt is the one activated."""
    try:
        with Lock(state, lock_wait, stop=window.closed):
            undone = _undo_dead_trial(root, state)
            pending = _pending_install(root, state, rid, attempt)
            attempt = attempt or pending.get("attempt") or time.strftime("%Y%m%dT%H%M%S") + f"-{os.getpid()}"
            why = window.closed()
            if why:
                raise ReleaseError(f"not activated: {why} before the switch; nothing switched")
            chosen = _health(_read_manifest(root / "releases" / rid / MANIFEST), *health)
            trial = _begin_trial(root, state, rid, attempt, "activate")
            try:
                result, checked, why = _check_release(root, state, trial, python, runtime_args, health=chosen,
                                                      window=window, time_limit=time_limit)
            except BaseException as e:   # the check could not run: the switch is undone, never left standing
                _fall_back(root, state, trial, f"the check could not run ({type(e).__name__}: {e})")
                raise
            (state / "pending.json").unlink(missing_ok=True)
            record = _fall_back(root, state, trial, why) if why else \
                _commit(root, state, trial, result, pending.get("signed"))
            units = (install_units(units_dir, root=str(root.resolve()), state=str(state.resolve()), python=python)
                     if units_dir is not None and not why else None)
            pruned = prune(root, state, keep, objects) if keep and not why else []
    except ReleaseError as e:
        if attempt:
            _try_record(state, attempt, rid, str(e))
        raise
    return ({"action": "activate", "release": rid, "attempt": attempt, "activated": not why, "outcome":
             record["outcome"], "reason": why, "switched": not why and trial["current_before"] != rid,
             "current": _target(root, "current"),
             "previous": _target(root, "previous"), "check": {"verification": result.get("status"),
                                                              "health": checked},
             "result": result, "pruned": pruned, "units": units, "undone": undone}, EXIT_GATE if why else EXIT_OK)


def _try_record(state: Path, attempt: str, rid: str, reason: str) -> None:
    try:
        _record(state, attempt, rid, "refused", reason)
    except OSError:   # a state folder it cannot write: the refusal is still printed
        pass


def activate_flashed(root: Path, state: Path, rid: str) -> None:
    """A flashed image: current -> rid as a first-boot trial with no result yet; the boot unit's verify-current
    checks it (verification, health check) and commits it or falls back to what the image held before."""
    _begin_trial(root, state, rid, "first-boot", "first-boot")
    (state / "result.json").unlink(missing_ok=True)


def verify_current(root: Path, state: Path, python: str, runtime_args: list[str], *, time_limit: float,
                   lock_wait: float, health: tuple[str | None, float | None] = (None, None)) -> tuple[dict, int]:
    """The boot check: verify the release `current` points to; result.json follows only a passed check. A
    first-boot trial (a flashed image) is checked as an activation is, then committed or undone."""
    with Lock(state, lock_wait):
        undone = _undo_dead_trial(root, state)
        rid = _target(root, "current")
        if rid is None:
            raise ReleaseError(f"nothing installed: {root / 'current'} does not point to a release")
        trial = _load_json(state / TRIAL)
        if trial is not None and trial.get("release") == rid:
            chosen = _health(_read_manifest(root / "current" / MANIFEST), *health)
            result, checked, why = _check_release(root, state, trial, python, runtime_args, health=chosen,
                                                  window=Window(), time_limit=time_limit)
            record = _fall_back(root, state, trial, why) if why else _commit(root, state, trial, result, None)
            return ({"action": "verify-current", "release": rid, "attempt": trial["attempt"], "outcome":
                     record["outcome"], "reason": why, "current": _target(root, "current"), "result": result,
                     "check": {"verification": result.get("status"), "health": checked}},
                    EXIT_GATE if why else EXIT_OK)
        attempt = time.strftime("%Y%m%dT%H%M%S") + f"-boot-{os.getpid()}"
        result, code = _verify(root, state, rid, python, runtime_args, attempt=attempt, time_limit=time_limit)
        if code == EXIT_OK:
            _write_json(state / "result.json", _load_json(state / "results" / f"{rid}.json") or result)
    return {"action": "verify-current", "release": rid, "attempt": attempt, "result": result, "undone": undone}, code


def prune(root: Path, state: Path, keep: int, objects: Path | None = None) -> list[str]:
    """Remove releases beyond the `keep` most recently committed ones, with their results and attempts: current,
    previous, the pending install and a trial always stay; a release never committed here (failed, refused,
    superseded) goes. Only folders this layout made (releases/<id> with a manifest) are touched. Staged objects
    older than PART_MAX_AGE_S (left by copies or installs that never finished) go too."""
    history = _load_json(state / "history.json") or {}
    committed = sorted((r for r in _releases(root) if r in history), key=lambda r: history[r], reverse=True)
    keep_ids = {_target(root, "current"), _target(root, "previous"), *committed[:max(keep, 1)],
                (_load_json(state / "pending.json") or {}).get("release"), (_load_json(state / TRIAL) or {}).get(
                    "release")}
    removed = []
    for rid in _releases(root):
        if rid in keep_ids:
            continue
        shutil.rmtree(root / "releases" / rid)
        shutil.rmtree(state / "attempts" / rid, ignore_errors=True)
        (state / "results" / f"{rid}.json").unlink(missing_ok=True)
        history.pop(rid, None)
        removed.append(rid)
    if removed:
        _write_json(state / "history.json", history)
    if objects is not None and objects.is_dir():
        for p in objects.iterdir():
            if len(p.name) == 64 and p.is_file() and time.time() - p.stat().st_mtime > PART_MAX_AGE_S:
                p.unlink()
    return removed


def discard(root: Path, state: Path, rid: str, attempt: str | None, lock_wait: float) -> dict:
    """A verified install that will not be activated (Mender's rollback of an uncommitted deployment): its
    pending.json goes, so nothing is left waiting; the release folder goes at the next prune."""
    with Lock(state, lock_wait):
        undone = _undo_dead_trial(root, state)
        pending = _load_json(state / "pending.json") or {}
        hit = pending.get("release") == rid and (not attempt or pending.get("attempt") == attempt)
        if hit:
            (state / "pending.json").unlink()
    return {"action": "discard", "release": rid, "discarded": hit, "current": _target(root, "current"),
            "undone": undone}


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


def rollback(root: Path, state: Path, lock_wait: float, to: str | None = None) -> dict:
    """Switch back to `previous`, or to any kept release with TO; result.json follows (that release's last passed
    result here, or none: pending)."""
    with Lock(state, lock_wait):
        undone = _undo_dead_trial(root, state)
        if to is not None and not ATTEMPT.fullmatch(to):
            raise ReleaseError(f"--to {to!r} is not a release id (letters, digits, '.', '_', '-')")
        cur, target = _target(root, "current"), to or _target(root, "previous")
        if target is None or not (root / "releases" / target / MANIFEST).is_file():
            kept = ", ".join(r for r in _releases(root) if r != cur) or "none"
            raise ReleaseError(f"nothing to roll back to: {target} is not a kept release here (kept: {kept})" if to
                               else f"nothing to roll back to: {root / 'previous'} does not point to a release "
                                    f"(kept: {kept}; name one with --to)")
        if target == cur:
            raise ReleaseError(f"{target} is already the current release; nothing switched")
        _link(root, "previous", cur)
        _link(root, "current", target)
        (state / "pending.json").unlink(missing_ok=True)
        (state / TRIAL).unlink(missing_ok=True)   # a first-boot trial of the release left behind
        _point_result(state, target)
    return {"action": "rollback", "current": target, "previous": cur, "undone": undone}


def machine_id() -> str | None:
    for p in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            text = Path(p).read_text().strip()
        except OSError:
            continue
        if text:
            return text
    return None


def _free_bytes(path: Path) -> tuple[int | None, int | None]:
    """(bytes free to this login, the file system's device) for PATH or its nearest existing parent; (None, None)
    where this login cannot look (the permission problem is reported on its own)."""
    try:
        while not path.exists() and path != path.parent:
            path = path.parent
        st = os.statvfs(path)
        return st.f_bavail * st.f_frsize, os.stat(path).st_dev
    except OSError:
        return None, None


def prepare(root: Path, state: Path, objects: Path | None, attempt: str | None = None) -> tuple[dict, int]:
    """Before any copy: who this device is (machine id + install root), whether this login may write ROOT and
    STATE, the space free for the copy and the release, which files (by sha256) it already has (content-checked:
    a damaged staged object is deleted and left out, so the controller sends it again), and how the activation
    ATTEMPT ended (a controller that could not hear the answer asks the next time)."""
    problems = []
    for path in (root, state):   # a real write, as the install will do it (sudo, read-only mounts, ACLs included)
        try:
            path.mkdir(parents=True, exist_ok=True, mode=0o755)
            fd, tmp = tempfile.mkstemp(prefix=".edgeres-write-check.", dir=path)
            os.close(fd)
            os.unlink(tmp)
        except OSError as e:
            problems.append(f"{path}: cannot write as uid {os.getuid()} ({e.strerror or e})")
    (obj_free, obj_dev), (root_free, root_dev) = _free_bytes(objects or root), _free_bytes(root)
    out = {"action": "prepare", "machine_id": machine_id(), "root": os.path.realpath(root), "uid": os.getuid(),
           "problems": problems, "repaired": [] if problems else repair_objects(objects),
           "free": {"objects": obj_free, "root": root_free, "same_fs": obj_dev is not None and obj_dev == root_dev},
           "activation": activation_record(state, attempt)}
    out.update(have=[] if problems else sorted(_have(root, objects, check=True)),
               current=None if problems else _target(root, "current"))
    return out, EXIT_UNUSABLE if problems else EXIT_OK


def status(root: Path, state: Path, attempt: str | None = None) -> dict:
    cur = _target(root, "current")
    result = _load_json(state / "result.json")
    manifest_sha = None
    if cur and (root / "current" / MANIFEST).is_file():
        manifest_sha = sha256_path(root / "current" / MANIFEST)
    current_ok = bool(result and manifest_sha and result.get("manifest_sha256") == manifest_sha
                      and result.get("status") == "passed")
    records = sorted((state / "activations").glob("*.json"), key=lambda p: p.stat().st_mtime) \
        if (state / "activations").is_dir() else []
    return {"action": "status", "installed": cur is not None, "current": cur, "previous": _target(root, "previous"),
            "releases": _releases(root), "manifest_sha256": manifest_sha, "result": result,
            "result_is_current": bool(result and manifest_sha and result.get("manifest_sha256") == manifest_sha),
            "pending": cur is not None and not current_ok,
            "install_pending": (_load_json(state / "pending.json") or {}).get("release"),
            "trial": _load_json(state / TRIAL), "activation": activation_record(state, attempt),
            "last_activation": _load_json(records[-1]) if records else None,
            "signed": (root / "current" / SIGNATURE).is_file() if cur else False,
            "checked_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _seconds(text: str) -> float:
    """argparse type of a time limit: a finite number of seconds in [0, 1e7] (nan or inf would wait forever)."""
    value = float(text)   # not a number: argparse's own "invalid _seconds value"
    if not (math.isfinite(value) and 0 <= value <= 1e7):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number of seconds in [0, 1e7]")
    return value


def _attempt(text: str) -> str:
    """argparse type of an attempt name: it names files on the device."""
    if not ATTEMPT.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r}: letters, digits, '.', '_' and '-' (at most 100)")
    return text


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="releases.py", description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=("prepare", "install", "activate", "discard", "rollback", "status",
                                      "verify-current", "prune"))
    p.add_argument("release", nargs="?", default=None, help="activate/discard: the release id install printed")
    p.add_argument("--root", default=ROOT)
    p.add_argument("--state", default=STATE)
    p.add_argument("--from", dest="source", default=None, help="install: a bundle folder")
    p.add_argument("--objects", default=None, help="install/prepare/activate: content-addressed staging (by sha256)")
    p.add_argument("--manifest", default=None, help="install --objects: the manifest's sha256")
    p.add_argument("--signature", default=None, help="install --objects: the signature file's sha256")
    p.add_argument("--attempt", type=_attempt, default=None,
                   help="install: a name for this attempt; activate/discard: must match it; prepare/status: report "
                        "how that activation ended")
    p.add_argument("--python", default=sys.executable, help="the python that runs the device runtime")
    p.add_argument("--time-limit", type=_seconds, default=3600.0,
                   help="install/activate/verify-current: seconds the verification may take (killed after)")
    p.add_argument("--lock-wait", type=_seconds, default=30.0, help="seconds to wait for another transaction")
    p.add_argument("--trusted-keys", default=TRUSTED_KEYS, help="allowed_signers file; present: signatures required")
    p.add_argument("--abort-on-stdin-eof", action="store_true",
                   help="install: abort (nothing verified, nothing pending) when stdin closes (the controller left); "
                        "activate: no switch, and no commit (switched back), once it closes")
    p.add_argument("--deadline-in", type=_seconds, default=None,
                   help="activate: seconds from now after which nothing is switched and nothing committed")
    p.add_argument("--health-check", default=None,
                   help="activate/verify-current: shell command run in the switched release; exit 0 = healthy "
                        "(default: the bundle's manifest health_check)")
    p.add_argument("--health-timeout", type=_seconds, default=None,
                   help=f"seconds the health check may take [default: the bundle's, else {HEALTH_TIMEOUT_S:g}]")
    p.add_argument("--to", default=None, help="rollback: any kept release (default: previous)")
    p.add_argument("--keep", type=int, default=None, help="activate/prune: releases to keep")
    p.add_argument("--units-dir", default=None, help="activate: install the verify-on-boot units here")
    return p


def _run(args: argparse.Namespace, runtime_args: list[str]) -> tuple[dict, int]:
    """One action; (its JSON object, exit code)."""
    root, state = Path(args.root).expanduser(), Path(args.state).expanduser()
    objects = Path(args.objects).expanduser() if args.objects else None
    health = (args.health_check, args.health_timeout)
    if args.keep is not None and args.keep < 1:
        raise ReleaseError("--keep must be >= 1")
    if args.action in ("activate", "discard") and not args.release:
        raise ReleaseError(f"{args.action} needs the RELEASE id that install printed")
    if args.action == "prepare":
        return prepare(root, state, objects, args.attempt)
    if args.action == "install":
        if bool(args.source) == bool(objects and args.manifest):
            raise ReleaseError("install needs --from BUNDLE_FOLDER, or --objects DIR with --manifest SHA256")
        src = {"folder": Path(args.source).expanduser() if args.source else None, "objects": objects,
               "manifest_sha": args.manifest, "signature_sha": args.signature}
        abort = _stdin_watch() if args.abort_on_stdin_eof else None
        return install(root, state, src, args.python, runtime_args,
                       attempt=args.attempt or time.strftime("%Y%m%dT%H%M%S") + f"-{os.getpid()}",
                       time_limit=args.time_limit, lock_wait=args.lock_wait,
                       trusted=Path(args.trusted_keys).expanduser(), abort=abort)
    if args.action == "activate":
        window = Window(args.deadline_in, _stdin_watch() if args.abort_on_stdin_eof else None)
        return activate(root, state, args.release, attempt=args.attempt, python=args.python,
                        runtime_args=runtime_args or ["--quiet"], window=window, health=health,
                        time_limit=args.time_limit, lock_wait=args.lock_wait, keep=args.keep,
                        units_dir=Path(args.units_dir).expanduser() if args.units_dir else None, objects=objects)
    if args.action == "discard":
        return discard(root, state, args.release, args.attempt, args.lock_wait), EXIT_OK
    if args.action == "rollback":
        return rollback(root, state, args.lock_wait, args.to), EXIT_OK
    if args.action == "verify-current":
        return verify_current(root, state, args.python, runtime_args or ["--quiet"], time_limit=args.time_limit,
                              lock_wait=args.lock_wait, health=health)
    if args.action == "prune":
        if args.keep is None:
            raise ReleaseError("prune needs --keep N")
        with Lock(state, args.lock_wait):
            undone = _undo_dead_trial(root, state)
            return {"action": "prune", "pruned": prune(root, state, args.keep, objects), "undone": undone}, EXIT_OK
    return status(root, state, args.attempt), EXIT_OK


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    runtime_args = argv[argv.index("--") + 1:] if "--" in argv else []   # for device_runtime.py
    args = _parser().parse_intermixed_args(argv[:argv.index("--")] if "--" in argv else argv)
    try:
        out, code = _run(args, runtime_args)
    except (ReleaseError, OSError) as e:
        out, code = {"action": args.action, "error": str(e)}, EXIT_UNUSABLE
    except (KeyError, TypeError, AttributeError, ValueError) as e:   # a manifest or state file of the wrong shape:
        out, code = {"action": args.action, "error": f"malformed bundle or state ({type(e).__name__}: {e})"}, \
            EXIT_UNUSABLE                                              # unusable (2), never "the gate failed" (1)
    print(json.dumps(out, sort_keys=True, default=str), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
