"""Install a bundle into a Jetson root filesystem tree (e.g. Linux_for_Tegra/rootfs) before flashing.

Layout written under ROOTFS:

    opt/edgeres/bundle/...                               the verified bundle (scripts 0755, files 0644)
    opt/edgeres/README.txt                               where the result lands and how to re-run
    etc/systemd/system/edgeres-verify.service            oneshot unit (from edgeres-device.service)
    etc/systemd/system/multi-user.target.wants/edgeres-verify.service -> the unit (enabled)
    var/lib/edgeres/                                     engines/ cache and result.json, written on the device

At every boot the unit runs the device runtime with --skip-if-current: it builds and verifies the engine
at first boot and again whenever the TensorRT version (or the bundle) changes, otherwise returns at once.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from edgeres.errors import ConfigError
from edgeres.io import atomic_write_text

INSTALL_DIR = "/opt/edgeres"
BUNDLE_DIR = f"{INSTALL_DIR}/bundle"
STATE_DIR = "/var/lib/edgeres"
RESULT_PATH = f"{STATE_DIR}/result.json"
UNIT_NAME = "edgeres-verify.service"
UNIT_DIR = "/etc/systemd/system"
DEVICE_PYTHON = "/usr/bin/python3"
EXECUTABLE = ("device_runtime.py", "edgeres-device")
README = f"""edgeres on this device
======================
{BUNDLE_DIR}/            the bundle: ONNX models, calibration cache, probe set, device runtime
{UNIT_DIR}/{UNIT_NAME}   builds and verifies the TensorRT engine at boot (only when needed)
{RESULT_PATH}  the JSON result: status, device, TensorRT version, engine path, accuracy, latency
{STATE_DIR}/engines/     engines, cached by device + TensorRT version + ONNX sha256

Re-run by hand:  sudo {BUNDLE_DIR}/edgeres-device --out {RESULT_PATH} --cache-dir {STATE_DIR}/engines
Status:          systemctl status {UNIT_NAME}; journalctl -u {UNIT_NAME}
"""


def unit_text(*, python: str = DEVICE_PYTHON) -> str:
    template = (Path(__file__).resolve().parent / "edgeres-device.service").read_text()
    return (template.replace("@BUNDLE_DIR@", BUNDLE_DIR).replace("@STATE_DIR@", STATE_DIR)
            .replace("@RESULT@", RESULT_PATH).replace("@PYTHON@", python))


def _mkdirs(root: Path, rel: str) -> Path:
    """Create root/rel one component at a time with mode 0755 (umask-independent); refuse symlinked parts."""
    path = root
    for part in Path(rel.strip("/")).parts:
        path = path / part
        if path.is_symlink():
            raise ConfigError(f"{path} is a symlink; refusing to install through it")
        if not path.exists():
            path.mkdir()
            path.chmod(0o755)
    return path


def install_rootfs(bundle_dir: str | Path, rootfs: str | Path, *, force: bool = False) -> Path:
    """Install a verified bundle under ROOTFS/opt/edgeres and enable the verify unit. Returns the bundle folder."""
    from edgeres.deploy.bundle import MANIFEST, verify_bundle

    bundle_dir, rootfs = Path(bundle_dir), Path(rootfs)
    manifest = verify_bundle(bundle_dir)
    if not rootfs.is_dir():
        raise ConfigError(f"rootfs not found: {rootfs}")
    if rootfs.resolve() == Path("/"):
        raise ConfigError("refusing to install into / (this machine's own root); give the Jetson rootfs tree")
    if not (rootfs / "etc").is_dir() and not force:
        raise ConfigError(f"{rootfs} does not look like a root filesystem (no etc/); pass --force to install anyway")
    opt = _mkdirs(rootfs, INSTALL_DIR)
    dest = opt / "bundle"
    if dest.exists() and not force:
        raise ConfigError(f"{dest} already exists; pass --force to replace it")
    tmp = Path(tempfile.mkdtemp(prefix=".bundle.", dir=opt))
    try:
        for name in [MANIFEST, *manifest["files"]]:
            shutil.copyfile(bundle_dir / name, tmp / name)
            (tmp / name).chmod(0o755 if name in EXECUTABLE else 0o644)
        tmp.chmod(0o755)
        if dest.exists():
            old = opt / f".bundle.old-{os.getpid()}"
            os.replace(dest, old)
            shutil.rmtree(old)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    atomic_write_text(opt / "README.txt", README)
    (opt / "README.txt").chmod(0o644)

    units = _mkdirs(rootfs, UNIT_DIR)
    atomic_write_text(units / UNIT_NAME, unit_text())
    (units / UNIT_NAME).chmod(0o644)
    wants = _mkdirs(rootfs, f"{UNIT_DIR}/multi-user.target.wants")
    link = wants / UNIT_NAME
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(f"{UNIT_DIR}/{UNIT_NAME}")  # absolute inside the image, as `systemctl enable` writes it
    _mkdirs(rootfs, STATE_DIR)
    return dest
