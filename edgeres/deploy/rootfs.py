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

A flashed release is a first-boot trial (STATE/trial.json): the boot check verifies it on the device and runs the
bundle's health check, then commits it, or switches back to the release the image held before (none: nothing runs)
and records why (STATE/activations/first-boot.json). `status` reports it pending until then.
An image must not carry a machine id (every device flashed from it would be one machine): a filled etc/machine-id
is refused unless --machine-id clear (emptied: systemd's first-boot convention) or --machine-id keep.
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
{STATE_DIR}/trial.json  present until the first boot's check commits this release (or switches back)
{STATE_DIR}/activations/ how each activation and first-boot check ended, and why
{STATE_DIR}/attempts/    every verification attempt, passed or not
{STATE_DIR}/engines/     engines, cached by device + TensorRT version + ONNX sha256

Verify by hand:  sudo python3 {CURRENT_DIR}/releases.py verify-current
Status:          python3 {CURRENT_DIR}/releases.py status; systemctl status {UNIT_NAME}
Roll back:       sudo python3 {CURRENT_DIR}/releases.py rollback [--to RELEASE]   (or `edgeres rollback --host`)
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


MACHINE_ID_CHOICES = ("clear", "keep")


def _filled_machine_id(rootfs: Path) -> str | None:
    """The machine id a rootfs carries in etc/machine-id (a regular file), or None: absent, empty, a link, or
    systemd's "uninitialized" (each device then makes its own at first boot)."""
    path = rootfs / "etc" / "machine-id"
    if path.is_symlink() or not path.is_file():
        return None
    text = path.read_text(errors="replace").strip()
    return text if text and text != "uninitialized" else None


def _clear_machine_id(rootfs: Path) -> list[str]:
    """systemd's first-boot convention: an empty etc/machine-id, filled by each device at its first boot; a copy in
    var/lib/dbus/machine-id (a regular file) becomes the link to it that systemd images carry."""
    path = rootfs / "etc" / "machine-id"
    mode = path.stat().st_mode & 0o777
    atomic_write_text(path, "")
    path.chmod(mode)
    done = ["etc/machine-id emptied: each device makes its own at first boot"]
    dbus = rootfs / "var" / "lib" / "dbus" / "machine-id"
    if dbus.is_file() and not dbus.is_symlink():
        tmp = dbus.with_name(f".machine-id.{os.getpid()}")
        tmp.symlink_to("/etc/machine-id")
        os.replace(tmp, dbus)
        done.append("var/lib/dbus/machine-id now links to /etc/machine-id")
    return done


def check_machine_id(rootfs: Path, machine_id: str | None) -> str | None:
    """Before anything is written: a filled etc/machine-id is refused unless told (clear, keep)."""
    if machine_id is not None and machine_id not in MACHINE_ID_CHOICES:
        raise ConfigError(f"--machine-id must be one of {', '.join(MACHINE_ID_CHOICES)}, got {machine_id!r}")
    filled = _filled_machine_id(rootfs)
    if filled and machine_id is None:
        raise ConfigError(f"{rootfs}/etc/machine-id holds a machine id ({filled[:12]}...): every device flashed from "
                          f"this image would share it (one device to systemd, D-Bus and edgeres); pass --machine-id "
                          f"clear to empty it (each device makes its own at first boot), or --machine-id keep for "
                          f"an image of one device")
    return filled


def install_rootfs(bundle_dir: str | Path, rootfs: str | Path, *, allow_non_rootfs: bool = False,
                   trusted_keys: str | Path | None = None, machine_id: str | None = None) -> tuple[Path, list[str]]:
    """Install a verified bundle as the current release under ROOTFS/opt/edgeres (a first-boot trial: the device
    checks it, then commits it or falls back to what the image held before) and enable the verify-on-boot timer.
    A filled etc/machine-id is refused unless MACHINE_ID says clear (emptied) or keep. Returns (the release folder,
    warnings and what was done)."""
    bundle_dir, rootfs = Path(bundle_dir), Path(rootfs)
    verify_bundle(bundle_dir)
    if not rootfs.is_dir():
        raise ConfigError(f"rootfs not found: {rootfs}")
    if rootfs.resolve() == Path("/"):
        raise ConfigError("refusing to install into / (this machine's own root); give the Jetson rootfs tree")
    if not (rootfs / "etc").is_dir() and not allow_non_rootfs:
        raise ConfigError(f"{rootfs} does not look like a root filesystem (no etc/); pass --allow-non-rootfs to "
                          f"install anyway")
    filled = check_machine_id(rootfs, machine_id)
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
    if filled and machine_id == "clear":
        warnings += _clear_machine_id(rootfs)
    elif filled:
        warnings.append(f"etc/machine-id kept ({filled[:12]}...): every device flashed from this image shares it")
    return dest, warnings
