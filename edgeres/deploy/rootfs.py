"""Install a bundle into a Jetson root filesystem tree (e.g. Linux_for_Tegra/rootfs) before flashing.

The image gets the same layout an SSH deploy writes (edgeres/deploy/releases.py), so the boot unit and `deploy`
verify the same thing the same way:

    opt/edgeres/releases/<id>/                           the verified bundle (scripts 0755, files 0644)
    opt/edgeres/current -> releases/<id>                 what the unit verifies and runs
    opt/edgeres/README.txt                               where the result lands and how to re-run
    etc/systemd/system/edgeres-verify.service            the unit (from edgeres-device.service)
    etc/systemd/system/multi-user.target.wants/edgeres-verify.service -> the unit (enabled)
    var/lib/edgeres/                                     engines/, results/ and result.json, written on the device

At every boot the unit runs the device runtime with --skip-if-current: it builds and verifies the engine at first
boot and again whenever the TensorRT version (or the bundle) changes, otherwise returns at once.
"""
from __future__ import annotations

import os
from pathlib import Path

from edgeres.deploy import releases
from edgeres.errors import ArtifactError, ConfigError
from edgeres.io import atomic_write_text

INSTALL_DIR = releases.ROOT
CURRENT_DIR = f"{INSTALL_DIR}/current"
STATE_DIR = releases.STATE
RESULT_PATH = f"{STATE_DIR}/result.json"
UNIT_NAME = "edgeres-verify.service"
UNIT_DIR = "/etc/systemd/system"
DEVICE_PYTHON = "/usr/bin/python3"
README = f"""edgeres on this device
======================
{CURRENT_DIR}/           the running release: ONNX models, calibration cache, probe set, device runtime
{INSTALL_DIR}/releases/  every installed release; `previous` points at the one before (rollback)
{UNIT_DIR}/{UNIT_NAME}   builds and verifies the TensorRT engine after boot (only when needed)
{RESULT_PATH}  the JSON result: status, device, TensorRT version, engine path, accuracy, latency
{STATE_DIR}/engines/     engines, cached by device + TensorRT version + ONNX sha256

Re-run by hand:  sudo {CURRENT_DIR}/edgeres-device --out {RESULT_PATH} --cache-dir {STATE_DIR}/engines
Status:          python3 {CURRENT_DIR}/releases.py status; systemctl status {UNIT_NAME}
Roll back:       sudo python3 {CURRENT_DIR}/releases.py rollback   (or `edgeres rollback --host` from the host)
"""


def unit_text(*, python: str = DEVICE_PYTHON) -> str:
    template = (Path(__file__).resolve().parent / "edgeres-device.service").read_text()
    return (template.replace("@CURRENT_DIR@", CURRENT_DIR).replace("@STATE_DIR@", STATE_DIR)
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


def _own_by_root(paths: list[Path]) -> None:
    for top in paths:
        for p in [top, *(top.rglob("*") if top.is_dir() and not top.is_symlink() else [])]:
            os.lchown(p, 0, 0)


def install_rootfs(bundle_dir: str | Path, rootfs: str | Path, *,
                   allow_non_rootfs: bool = False) -> tuple[Path, list[str]]:
    """Install a verified bundle as a release under ROOTFS/opt/edgeres, make it current, enable the unit.
    Returns (the release folder, warnings)."""
    from edgeres.deploy.bundle import verify_bundle

    bundle_dir, rootfs = Path(bundle_dir), Path(rootfs)
    verify_bundle(bundle_dir)
    if not rootfs.is_dir():
        raise ConfigError(f"rootfs not found: {rootfs}")
    if rootfs.resolve() == Path("/"):
        raise ConfigError("refusing to install into / (this machine's own root); give the Jetson rootfs tree")
    if not (rootfs / "etc").is_dir() and not allow_non_rootfs:
        raise ConfigError(f"{rootfs} does not look like a root filesystem (no etc/); pass --allow-non-rootfs to "
                          f"install anyway")
    warnings = []
    if os.geteuid() != 0:
        warnings.append(f"installed as uid {os.geteuid()}: the files root runs at every boot are owned by that user "
                        f"in the image; run `sudo edgeres bundle ... --rootfs` for an image to flash")
    root = _mkdirs(rootfs, INSTALL_DIR)
    state = _mkdirs(rootfs, STATE_DIR)
    try:
        rid, dest = releases.stage(root, bundle_dir)
    except releases.ReleaseError as e:
        raise ArtifactError(str(e)) from None
    releases.activate(root, state, rid)   # an image has nothing to verify against yet: the unit does that at boot
    atomic_write_text(root / "README.txt", README)
    (root / "README.txt").chmod(0o644)
    units = _mkdirs(rootfs, UNIT_DIR)
    atomic_write_text(units / UNIT_NAME, unit_text())
    (units / UNIT_NAME).chmod(0o644)
    wants = _mkdirs(rootfs, f"{UNIT_DIR}/multi-user.target.wants")
    link = wants / UNIT_NAME
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(f"{UNIT_DIR}/{UNIT_NAME}")  # absolute inside the image, as `systemctl enable` writes it
    if os.geteuid() == 0:
        _own_by_root([root, state, units / UNIT_NAME, link])
    return dest, warnings
