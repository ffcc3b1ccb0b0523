"""Installing a bundle into a Jetson rootfs tree: layout, permissions, the systemd unit."""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_bundle import make_run  # noqa: E402 - the shared run-folder fixture builder

UNIT = "etc/systemd/system/edgeres-verify.service"
TIMER = "etc/systemd/system/edgeres-verify.timer"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("run"), n_probe=8)


@pytest.fixture(scope="module")
def bundle(run_dir, tmp_path_factory) -> Path:
    from edgeres.deploy.bundle import make_bundle

    return make_bundle(run_dir, tmp_path_factory.mktemp("b") / "bundle", probe_size=8)


def fake_rootfs(tmp_path: Path) -> Path:
    root = tmp_path / "Linux_for_Tegra" / "rootfs"
    for d in ("etc", "usr/bin", "var/lib"):
        (root / d).mkdir(parents=True)
    return root


def mode(p: Path) -> int:
    return stat.S_IMODE(p.lstat().st_mode)


def test_layout_and_permissions(bundle, tmp_path):
    from edgeres.deploy.rootfs import install_rootfs

    old = os.umask(0o077)  # a strict umask must not leak into the image
    try:
        dest, warnings = install_rootfs(bundle, fake_rootfs(tmp_path))
    finally:
        os.umask(old)
    root = tmp_path / "Linux_for_Tegra" / "rootfs"
    # the layout an SSH deploy writes: releases/<id>, current -> it
    assert dest.parent == root / "opt" / "edgeres" / "releases"
    assert os.readlink(root / "opt/edgeres/current") == f"releases/{dest.name}"
    manifest = json.loads((dest / "manifest.json").read_text())
    assert sorted(p.name for p in dest.iterdir()) == sorted(["manifest.json", *manifest["files"]])
    for d in (root / "opt", root / "opt/edgeres", dest, root / "var/lib/edgeres", root / "etc/systemd/system"):
        assert mode(d) == 0o755, d
    for p in dest.iterdir():
        assert mode(p) == (0o755 if p.name in ("device_runtime.py", "edgeres-device", "releases.py") else 0o644), \
            p.name
    assert mode(root / UNIT) == 0o644 and mode(root / TIMER) == 0o644
    if os.geteuid() == 0:   # files root runs at boot are root's in the image
        assert warnings == [] and dest.stat().st_uid == 0 and (root / UNIT).stat().st_uid == 0
    else:
        assert "installed as uid" in warnings[0]
    # enabled through the timer, never through multi-user.target: the check is outside the boot transaction, so
    # `systemctl is-system-running` reaches "running" without waiting for an engine build
    link = root / "etc/systemd/system/timers.target.wants/edgeres-verify.timer"
    assert link.is_symlink() and os.readlink(link) == "/etc/systemd/system/edgeres-verify.timer"
    assert not (root / "etc/systemd/system/multi-user.target.wants").exists()
    unit, timer = (root / UNIT).read_text(), (root / TIMER).read_text()
    directives = "\n".join(ln for ln in unit.splitlines() if not ln.startswith("#"))
    assert "[Install]" not in directives and "multi-user.target" not in directives and "Type=oneshot" in unit
    assert "OnBootSec=30s" in timer and "WantedBy=timers.target" in timer
    assert "After=nvpmodel.service" in unit   # the power mode is set before the benchmark
    assert "ExecStart=/usr/bin/python3 /opt/edgeres/current/releases.py verify-current --root /opt/edgeres " \
           "--state /var/lib/edgeres" in unit
    assert "@" not in unit.replace("file://", "")  # every placeholder filled
    assert "/var/lib/edgeres/result.json" in (root / "opt/edgeres/README.txt").read_text()


def test_a_flashed_release_is_pending_until_the_boot_check_passes(bundle, tmp_path):
    """Run the unit's ExecStart, mapped into the tree, twice: status says pending before, passed after; the second
    run finds the current result and does not verify again (same device, same TensorRT)."""
    from edgeres.deploy import releases
    from edgeres.deploy.rootfs import install_rootfs

    root = fake_rootfs(tmp_path)
    install_rootfs(bundle, root)
    opt, state = root / "opt/edgeres", root / "var/lib/edgeres"
    before = releases.status(opt, state)
    assert before["installed"] and before["pending"] and before["result"] is None
    assert before["trial"]["kind"] == "first-boot"
    first = boot(root)
    assert first.returncode == 0, first.stderr + first.stdout
    assert json.loads(first.stdout.splitlines()[-1])["outcome"] == "committed"
    after = releases.status(opt, state)
    assert not after["pending"] and after["result"]["status"] == "passed" and after["result_is_current"]
    assert after["trial"] is None
    second = boot(root)
    assert second.returncode == 0 and "skipped" in json.loads(second.stdout.splitlines()[-1])["result"]
    assert len(list((state / "attempts").glob("*/*.json"))) == 2


def boot(root: Path) -> subprocess.CompletedProcess:
    """What the device runs at boot: the unit's ExecStart, with the image's paths mapped into the tree."""
    line = next(ln for ln in (root / UNIT).read_text().splitlines() if ln.startswith("ExecStart="))
    argv = line[len("ExecStart="):].split()
    argv = [sys.executable] + [str(root) + a if a.startswith(("/opt/", "/var/")) else a for a in argv[1:]]
    return subprocess.run(argv + ["--", "--quiet", "--iterations", "3"], capture_output=True, text=True)


def test_a_first_boot_check_that_fails_falls_back_on_the_device(bundle, run_dir, tmp_path):
    """An image whose new release fails its health check at first boot: the device switches back to the release
    the image held before (none: nothing runs) and records why."""
    from edgeres.deploy import releases
    from edgeres.deploy.bundle import make_bundle
    from edgeres.deploy.rootfs import install_rootfs

    sick = make_bundle(run_dir, tmp_path / "sick", probe_size=4, health_check="echo no camera; exit 4")
    root = fake_rootfs(tmp_path / "a")
    old, _ = install_rootfs(bundle, root)
    assert boot(root).returncode == 0   # the image's earlier release, committed at an earlier boot
    new, _ = install_rootfs(sick, root)
    p = boot(root)
    out = json.loads(p.stdout.splitlines()[-1])
    assert p.returncode == 1 and out["outcome"] == "fell back" and out["reason"] == \
        "health check failed: exit 4: no camera" and out["current"] == old.name
    opt, state = root / "opt/edgeres", root / "var/lib/edgeres"
    st = releases.status(opt, state)
    assert st["current"] == old.name and not st["pending"] and st["trial"] is None
    assert json.loads((state / "activations" / "first-boot.json").read_text())["release"] == new.name
    fresh = fake_rootfs(tmp_path / "b")   # nothing before it: after the fall back nothing runs
    install_rootfs(sick, fresh)
    assert boot(fresh).returncode == 1 and not (fresh / "opt/edgeres/current").is_symlink()
    assert not releases.status(fresh / "opt/edgeres", fresh / "var/lib/edgeres")["installed"]


def test_a_filled_machine_id_is_refused_unless_told(bundle, tmp_path):
    from edgeres.cli import main

    root = fake_rootfs(tmp_path)
    mid = root / "etc/machine-id"
    mid.write_text("3d1219c7c4c5404aaa1f6d2a48adfda4\n")
    mid.chmod(0o444)
    (root / "var/lib/dbus").mkdir(parents=True)
    (root / "var/lib/dbus/machine-id").write_text("3d1219c7c4c5404aaa1f6d2a48adfda4\n")
    r = CliRunner().invoke(main, ["rootfs", "--bundle", str(bundle), "--rootfs", str(root)])
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, r.output
    assert "etc/machine-id holds a machine id" in r.output and "--machine-id clear" in r.output
    assert not (root / "opt").exists() and mid.read_text().startswith("3d1219")   # nothing written
    r = CliRunner().invoke(main, ["rootfs", "--bundle", str(bundle), "--rootfs", str(root), "--machine-id", "keep"])
    assert r.exit_code == 0 and "etc/machine-id kept" in r.output and mid.read_text().startswith("3d1219")
    r = CliRunner().invoke(main, ["rootfs", "--bundle", str(bundle), "--rootfs", str(root), "--machine-id", "clear"])
    assert r.exit_code == 0, r.output
    assert mid.read_text() == "" and mode(mid) == 0o444   # systemd's first-boot convention
    assert os.readlink(root / "var/lib/dbus/machine-id") == "/etc/machine-id"
    r = CliRunner().invoke(main, ["rootfs", "--bundle", str(bundle), "--rootfs", str(root)])   # empty: no question
    assert r.exit_code == 0, r.output


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_unit_passes_systemd_analyze_verify(bundle, tmp_path):
    from edgeres.deploy.rootfs import install_rootfs

    root = fake_rootfs(tmp_path)
    install_rootfs(bundle, root)
    unit = root / UNIT
    if not Path("/usr/bin/python3").exists():
        pytest.skip("systemd-analyze checks ExecStart's /usr/bin/python3, absent on this machine")
    timer = root / TIMER
    p = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit), str(timer)], capture_output=True,
                       text=True)
    assert p.returncode == 0 and "edgeres-verify" not in p.stderr, p.stderr
    broken = tmp_path / "broken.service"  # the check has teeth: the same unit with one bad line fails
    broken.write_text(unit.read_text().replace("Type=oneshot", "Type=oneshot-typo"))
    p = subprocess.run(["systemd-analyze", "verify", "--man=no", str(broken)], capture_output=True, text=True)
    assert "oneshot-typo" in p.stderr


def test_refuses_non_rootfs_and_keeps_the_previous_release(bundle, run_dir, tmp_path):
    from edgeres.deploy.bundle import make_bundle
    from edgeres.deploy.rootfs import install_rootfs
    from edgeres.errors import ArtifactError, ConfigError

    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(ConfigError, match="does not look like a root filesystem"):
        install_rootfs(bundle, plain)
    assert not (plain / "opt").exists()
    first, _ = install_rootfs(bundle, plain, allow_non_rootfs=True)
    assert install_rootfs(bundle, plain, allow_non_rootfs=True)[0] == first   # the same bundle: the same release
    other = make_bundle(run_dir, tmp_path / "other", probe_size=4)
    second, _ = install_rootfs(other, plain, allow_non_rootfs=True)
    assert second != first and os.readlink(plain / "opt/edgeres/current") == f"releases/{second.name}"
    assert os.readlink(plain / "opt/edgeres/previous") == f"releases/{first.name}" and first.is_dir()
    with pytest.raises(ConfigError, match="refusing to install into /"):
        install_rootfs(bundle, "/", allow_non_rootfs=True)
    tampered = tmp_path / "tampered"
    shutil.copytree(bundle, tampered)
    (tampered / "calib.cache").write_text("changed\n")
    root = fake_rootfs(tmp_path / "t")
    with pytest.raises(ArtifactError, match="calib.cache: sha256 mismatch"):
        install_rootfs(tampered, root)
    assert not (root / "opt").exists()


def test_cli_bundle_rootfs(run_dir, tmp_path):
    from edgeres.cli import main

    root = fake_rootfs(tmp_path)
    r = CliRunner().invoke(main, ["bundle", str(run_dir), "--rootfs", str(root), "--probe-size", "4"])
    assert r.exit_code == 0, r.output
    assert "edgeres-verify.timer" in r.output and (root / UNIT).is_file()
    assert json.loads((root / "opt/edgeres/current/manifest.json").read_text())["probe"]["count"] == 4
    r = CliRunner().invoke(main, ["bundle", str(run_dir), "--rootfs", str(tmp_path / "nothing")])
    assert r.exit_code == 1 and "rootfs not found" in r.output


def test_rootfs_command_installs_an_existing_bundle(bundle, tmp_path):
    """`edgeres rootfs --bundle B`: an existing bundle (folder or .tar.gz) into an image, the release id an SSH
    deploy gives it; with --trusted-keys only a bundle those keys signed, and the keys go into the image."""
    from edgeres.cli import main
    from edgeres.deploy.releases import folder_release_id
    from edgeres.deploy.signing import sign_bundle

    root = fake_rootfs(tmp_path)
    r = CliRunner().invoke(main, ["rootfs", "--bundle", str(bundle), "--rootfs", str(root), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["release"] == folder_release_id(bundle)
    key = tmp_path / "key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    trusted = tmp_path / "allowed_signers"
    trusted.write_text("release " + key.with_suffix(".pub").read_text())
    other = fake_rootfs(tmp_path / "2")
    r = CliRunner().invoke(main, ["rootfs", "--bundle", str(bundle), "--rootfs", str(other), "--trusted-keys",
                                  str(trusted)])
    assert r.exit_code == 1 and "unsigned bundle refused" in r.output and not (other / "opt").exists()
    signed = tmp_path / "signed"
    shutil.copytree(bundle, signed)
    sign_bundle(signed, key)
    r = CliRunner().invoke(main, ["rootfs", "--bundle", str(signed), "--rootfs", str(other), "--trusted-keys",
                                  str(trusted)])
    assert r.exit_code == 0, r.output
    assert (other / "etc/edgeres/allowed_signers").read_text() == trusted.read_text()
    assert (other / "opt/edgeres/current/signature.json").is_file()
    r = CliRunner().invoke(main, ["rootfs", "--bundle", str(tmp_path / "nothing"), "--rootfs", str(other)])
    assert r.exit_code == 1 and "bundle not found" in r.output
