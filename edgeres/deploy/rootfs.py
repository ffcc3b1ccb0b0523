"""Install a bundle into a Jetson root filesystem tree (e.g. Linux_for_Tegra/rootfs) before flashing.

The image gets the layout, the release id and the verify-on-boot units an SSH deploy, the Ansible playbook and the
Mender module write (all through edgeres/deploy/releases.py):

    opt/edgeres/releases/<id>/                          the verified bundle (scripts 0755, files 0644)
    opt/edgeres/current -> releases/<id>                what the boot check verifies and the application runs
    opt/edgeres/README.txt                              where the result lands and how to re-run
    etc/systemd/system/edgeres-verify.service           the check (releases.py verify-current), Type=oneshot
    etc/systemd/system/edgeres-verify.timer             starts it 30 s after boot, outside the boot transaction
    etc/systemd/system/timers.target.wants/edgeres-verify.timer -> the timer (enabled)
    etc/edgeres/allowed_signers                         with --trusted-keys: later bundles must be signed
    var/lib/edgeres/                                    engines/, attempts/, results/ and result.json, on the device

A flashed release counts as pending (`status`) until the boot check's first verification on the device passes.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from edgeres.deploy import releases
from edgeres.deploy.bundle import verify_bundle
from edgeres.errors import ArtifactError, ConfigError
from edgeres.io import atomic_write_text

INSTALL_DIR = releases.ROOT
CURRENT_DIR = f"{INSTALL_DIR}/current"
STATE_DIR = releases.STATE
RESULT_PATH = f"{STATE_DIR}/result.json"
UNIT_NAME, TIMER_NAME = releases.UNIT_NAME, releases.TIMER_NAME
UNIT_DIR = releases.UNITS_DIR
TRUSTED_KEYS = releases.TRUSTED_KEYS
DEVICE_PYTHON = "/usr/bin/python3"
README = f"""edgeres on this device
======================
{CURRENT_DIR}/           the running release: ONNX models, calibration cache, probe set, device runtime
{INSTALL_DIR}/releases/  installed releases; `previous` points at the one before (rollback)
{UNIT_DIR}/{TIMER_NAME}  verifies the current release 30 s after boot (engine build only when needed)
{RESULT_PATH}  the last passed result of the current release (absent: pending, not verified yet)
{STATE_DIR}/attempts/    every verification attempt, passed or not
{STATE_DIR}/engines/     engines, cached by device + TensorRT version + ONNX sha256

Verify by hand:  sudo python3 {CURRENT_DIR}/releases.py verify-current
Status:          python3 {CURRENT_DIR}/releases.py status; systemctl status {UNIT_NAME}
Roll back:       sudo python3 {CURRENT_DIR}/releases.py rollback   (or `edgeres rollback --host` from the host)
"""


def unit_texts(*, python: str = DEVICE_PYTHON) -> dict[str, str]:
    return releases.unit_files(root=INSTALL_DIR, state=STATE_DIR, python=python)


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


def install_rootfs(bundle_dir: str | Path, rootfs: str | Path, *, allow_non_rootfs: bool = False,
                   trusted_keys: str | Path | None = None) -> tuple[Path, list[str]]:
    """Install a verified bundle as the current release under ROOTFS/opt/edgeres (pending until the device checks
    it) and enable the verify-on-boot timer. Returns (the release folder, warnings)."""
    bundle_dir, rootfs = Path(bundle_dir), Path(rootfs)
    verify_bundle(bundle_dir)
    if not rootfs.is_dir():
        raise ConfigError(f"rootfs not found: {rootfs}")
    if rootfs.resolve() == Path("/"):
        raise ConfigError("refusing to install into / (this machine's own root); give the Jetson rootfs tree")
    if not (rootfs / "etc").is_dir() and not allow_non_rootfs:
        raise ConfigError(f"{rootfs} does not look like a root filesystem (no etc/); pass --allow-non-rootfs to "
                          f"install anyway")
    if trusted_keys is not None:   # the same check a device makes before staging
        with tempfile.TemporaryDirectory(prefix="edgeres-rootfs-") as tmp:
            sig = bundle_dir / releases.SIGNATURE
            try:
                releases.check_signature(sig if sig.is_file() else None,
                                         releases.sha256_path(bundle_dir / releases.MANIFEST),
                                         Path(trusted_keys), Path(tmp))
            except releases.ReleaseError as e:
                raise ArtifactError(str(e)) from None
    warnings = []
    if os.geteuid() != 0:
        warnings.append(f"installed as uid {os.geteuid()}: the files root runs at every boot are owned by that user "
                        f"in the image; run `sudo edgeres rootfs ...` for an image to flash")
    root = _mkdirs(rootfs, INSTALL_DIR)
    state = _mkdirs(rootfs, STATE_DIR)
    try:
        rid, dest = releases.stage_folder(root, bundle_dir)
    except releases.ReleaseError as e:
        raise ArtifactError(str(e)) from None
    releases.activate_flashed(root, state, rid)
    atomic_write_text(root / "README.txt", README)
    (root / "README.txt").chmod(0o644)
    units = _mkdirs(rootfs, UNIT_DIR)
    done = releases.install_units(units, root=INSTALL_DIR, state=STATE_DIR, python=DEVICE_PYTHON, link_dir=UNIT_DIR)
    if not done["installed"]:
        raise ConfigError(f"verify-on-boot units: {done['reason']}")
    owned = [root, state, units / UNIT_NAME, units / TIMER_NAME, units / "timers.target.wants" / TIMER_NAME]
    if trusted_keys is not None:
        keys = _mkdirs(rootfs, str(Path(TRUSTED_KEYS).parent)) / Path(TRUSTED_KEYS).name
        shutil.copyfile(trusted_keys, keys)
        keys.chmod(0o644)
        owned.append(keys)
    if os.geteuid() == 0:
        _own_by_root(owned)
    return dest, warnings
