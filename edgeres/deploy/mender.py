"""Mender: `edgeres bundle --mender OUT.mender` writes a module-image artifact (payload type `edgeres`, artifact
name = the release id) with the real `mender-artifact` tool; devices install it with the Mender client through the
edgeres Update Module (edgeres/deploy/mender-module-edgeres), which runs releases.py's install, activate (on
ArtifactCommit) and rollback. The artifact carries the bundle's files as they are, so the device stages the same
release (id and layout) an SSH deploy, the Ansible playbook or a flashed image gives it."""
from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from edgeres.deploy.releases import folder_release_id
from edgeres.errors import ConfigError
from edgeres.io import atomic_path

PAYLOAD_TYPE = "edgeres"
MODULE = Path(__file__).resolve().parent / "mender-module-edgeres"
MODULE_INSTALL_PATH = "/usr/share/mender/modules/v3/edgeres"
FIXED_MTIME = 0   # every time stamp in the artifact (payload files, outer tar): the same bundle, the same bytes


def check_artifact_out(out: str | Path, *, force: bool = False) -> str:
    """The mender-artifact executable, once OUT is known to be a .mender path that may be written."""
    exe = shutil.which("mender-artifact")
    if exe is None:
        raise ConfigError("--mender needs the mender-artifact tool (Debian: apt-get install mender-artifact)")
    out = Path(out)
    if out.suffix != ".mender":
        raise ConfigError(f"--mender {out}: the artifact file must end in .mender")
    if out.exists() and not force:
        raise ConfigError(f"{out} already exists; pass --force to replace it")
    return exe


def write_artifact(bundle: Path, out: str | Path, *, device_types: tuple[str, ...] = ("jetson",),
                   force: bool = False) -> tuple[Path, str]:
    """bundle folder -> OUT (.mender). Returns (its path, the artifact name = release id)."""
    exe = check_artifact_out(out, force=force)
    out = Path(out)
    if not device_types or not all(t and t.replace("-", "").replace("_", "").isalnum() for t in device_types):
        raise ConfigError(f"--device-type {device_types!r}: letters, digits, '-' and '_'")
    release = folder_release_id(bundle)
    with tempfile.TemporaryDirectory(prefix="edgeres-mender-") as staging, atomic_path(out) as tmp:
        files = _stamped_copies(bundle, Path(staging))
        raw = Path(staging) / "raw.mender"
        cmd = [exe, "write", "module-image", "-T", PAYLOAD_TYPE, "-n", release, "-o", str(raw),
               "--software-name", "edgeres", "--software-version", release, "--compression", "gzip",
               *sum((["-t", t] for t in device_types), []), *sum((["-f", str(p)] for p in files), [])]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
        if p.returncode != 0:
            raise ConfigError(f"mender-artifact failed: {(p.stderr or p.stdout).strip()[-300:]}")
        _restamp_outer(raw, Path(tmp))
    return out, release


def _stamped_copies(bundle: Path, staging: Path) -> list[Path]:
    """The bundle's files with one fixed time stamp: the payload tar records each file's mtime, so files written
    at bundle time would make every build of the same bundle a different artifact."""
    folder = staging / "files"
    folder.mkdir()
    copies = []
    for src in sorted(p for p in bundle.iterdir() if p.is_file()):
        dst = folder / src.name
        shutil.copyfile(src, dst)
        dst.chmod(src.stat().st_mode & 0o777)
        os.utime(dst, (FIXED_MTIME, FIXED_MTIME))
        copies.append(dst)
    return copies


def _restamp_outer(raw: Path, out: Path) -> None:
    """mender-artifact stamps the outer tar's header.tar.gz and data/ entries with the time of the build (its own
    version and manifest entries carry 0): rewritten with FIXED_MTIME, members and bytes unchanged, so the same
    bundle gives the same .mender byte for byte."""
    with tarfile.open(raw) as tin, tarfile.open(out, "w", format=tarfile.GNU_FORMAT) as tout:
        for member in tin.getmembers():
            member.mtime = FIXED_MTIME
            tout.addfile(member, tin.extractfile(member) if member.isfile() else None)
