"""Mender: `edgeres bundle --mender OUT.mender` writes a module-image artifact (payload type `edgeres`, artifact
name = the release id) with the real `mender-artifact` tool; devices install it with the Mender client through the
edgeres Update Module (edgeres/deploy/mender-module-edgeres), which runs releases.py's install, activate (on
ArtifactCommit) and rollback. The artifact carries the bundle's files as they are, so the device stages the same
release (id and layout) an SSH deploy, the Ansible playbook or a flashed image gives it."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from edgeres.deploy.releases import folder_release_id
from edgeres.errors import ConfigError
from edgeres.io import atomic_path

PAYLOAD_TYPE = "edgeres"
MODULE = Path(__file__).resolve().parent / "mender-module-edgeres"
MODULE_INSTALL_PATH = "/usr/share/mender/modules/v3/edgeres"


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
    files = sorted(p for p in bundle.iterdir() if p.is_file())
    with atomic_path(out) as tmp:
        cmd = [exe, "write", "module-image", "-T", PAYLOAD_TYPE, "-n", release, "-o", str(tmp),
               "--software-name", "edgeres", "--software-version", release, "--compression", "gzip",
               *sum((["-t", t] for t in device_types), []), *sum((["-f", str(p)] for p in files), [])]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
        if p.returncode != 0:
            raise ConfigError(f"mender-artifact failed: {(p.stderr or p.stdout).strip()[-300:]}")
    return out, release
