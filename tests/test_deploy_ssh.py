"""`edgeres deploy / status / rollback` against real OpenSSH servers on 127.0.0.1, addressed by ssh_config alias
(tests/fleet.py): releases switched only after verification, rollback, an interrupted copy, canary, a down host."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from fleet import MISSING, Fleet, current_release

sys.path.insert(0, str(Path(__file__).parent))
from test_bundle import disagreeing_copy, make_run  # noqa: E402 - a real small build's run folder

from edgeres.cli import main  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.skipif(MISSING is not None, reason=MISSING or "")]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """v1 and v2 of one run (v2: another probe size, so another manifest), and a v3 whose references disagree
    with the model (a bundle that fails verification on every device)."""
    from edgeres.deploy.bundle import make_bundle

    root = tmp_path_factory.mktemp("bundles")
    run = make_run(root)
    v1 = make_bundle(run, root / "v1" / "demo", probe_size=8)
    v2 = make_bundle(run, root / "v2" / "demo", probe_size=12)
    v3 = disagreeing_copy(v2, root / "v3" / "demo")
    return v1, v2, v3


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    f = Fleet(tmp_path_factory.mktemp("fleet"), 4)
    yield f
    f.close()


def _deploy(bundle, hosts, fleet, **kw):
    from edgeres.deploy.ssh import deploy

    return deploy(bundle, hosts, iterations=3, host_timeout=300, **fleet.ssh(), **kw)


def test_deploy_by_name_then_unchanged_redeploy_sends_nothing(bundles, fleet):
    v1, _, _ = bundles
    d = fleet.devices[0]
    [r] = _deploy(v1, [d.alias], fleet)
    assert r.ok, r.message
    assert r.activated and r.release == current_release(d) and r.release.startswith("tiny-")
    assert r.result["status"] == "passed" and r.result["backend"] == "onnxruntime"
    assert set(r.sent) == {*json.loads((v1 / "manifest.json").read_text())["files"], "manifest.json"}
    result = json.loads((d.state / "result.json").read_text())
    assert result["status"] == "passed" and (d.state / "result.json").stat().st_mode & 0o044   # readable by all
    assert (d.root / "current" / "manifest.json").read_bytes() == (v1 / "manifest.json").read_bytes()
    [again] = _deploy(v1, [d.alias, d.alias], fleet)     # listed twice: deployed once
    assert again.ok and again.sent == [] and again.release == r.release


def test_failed_verification_leaves_the_running_release(bundles, fleet):
    v1, _, v3 = bundles
    d = fleet.devices[1]
    [ok] = _deploy(v1, [d.alias], fleet)
    assert ok.ok, ok.message
    before = (d.state / "result.json").read_bytes()
    [bad] = _deploy(v3, [d.alias], fleet)
    assert not bad.ok and bad.stage == "install" and not bad.activated
    assert "gate failed: top1_agreement" in bad.message and "left as it was" in bad.message
    assert current_release(d) == ok.release and (d.state / "result.json").read_bytes() == before
    assert (d.state / "results" / f"{bad.release}.json").is_file()   # the failed attempt is kept for a look


def test_interrupted_copy_leaves_the_running_release(bundles, fleet):
    v1, v2, _ = bundles
    d = fleet.devices[2]
    [ok] = _deploy(v1, [d.alias], fleet)
    assert ok.ok, ok.message
    before = (d.state / "result.json").read_bytes()
    fleet.restart(d, sftp_file_limit_blocks=1)    # SFTP now dies writing any file over 512 bytes, mid-file
    try:
        [cut] = _deploy(v2, [d.alias], fleet)
    finally:
        fleet.restart(d)
    assert not cut.ok and cut.stage == "copy", cut
    assert current_release(d) == ok.release and (d.state / "result.json").read_bytes() == before
    [done] = _deploy(v2, [d.alias], fleet)        # the next deploy finishes the job
    assert done.ok and current_release(d) == done.release != ok.release


def test_rollback_and_status_for_the_fleet(bundles, fleet):
    v1, v2, _ = bundles
    d = fleet.devices[3]
    [first] = _deploy(v1, [d.alias], fleet)
    [second] = _deploy(v2, [d.alias], fleet)
    assert first.ok and second.ok and current_release(d) == second.release
    hosts = [x.alias for x in fleet.devices]
    r = CliRunner().invoke(main, ["rollback", "--host", d.alias, *fleet.cli_args()])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == f"{d.alias}: now {first.release} (previous {second.release})"
    assert current_release(d) == first.release
    assert json.loads((d.state / "result.json").read_text())["manifest_sha256"] == \
        json.loads((d.state / "results" / f"{first.release}.json").read_text())["manifest_sha256"]
    r = CliRunner().invoke(main, ["status", *sum((["--host", h] for h in hosts), []), *fleet.cli_args(), "--json"])
    assert r.exit_code == 0, r.output
    rows = {row["host"]: row for row in json.loads(r.stdout)}
    assert set(rows) == set(hosts)
    assert rows[d.alias]["result"]["current"] == first.release
    assert rows[d.alias]["result"]["result"]["backend"] == "onnxruntime"
    assert rows[d.alias]["result"]["result_is_current"] is True
    r = CliRunner().invoke(main, ["status", "--host", d.alias, *fleet.cli_args()])
    assert r.exit_code == 0 and first.release in r.stdout and "passed" in r.stdout and "onnxruntime" in r.stdout


def test_canary_stops_the_rollout_and_a_down_host_fails_alone(bundles, fleet, tmp_path):
    from fleet import free_port

    v1, _, _ = bundles
    config = tmp_path / "ssh_config"
    config.write_text(fleet.config.read_text() + f"Host jetson-down\n  HostName localhost\n  Port {free_port()}\n")
    ssh = {**fleet.ssh(), "ssh_config": config}
    from edgeres.deploy.ssh import deploy

    hosts = ["jetson-down", fleet.devices[0].alias, fleet.devices[1].alias]
    out = deploy(v1, hosts, canary=1, iterations=3, host_timeout=120, **ssh)
    assert [r.stage for r in out] == ["connect", "skipped", "skipped"]
    assert "not attempted: a canary host failed" in out[1].message
    out = deploy(v1, hosts, iterations=3, host_timeout=120, **ssh)   # no canary: the down host fails alone
    assert [r.ok for r in out] == [False, True, True] and out[0].stage == "connect"


def test_require_backend_tensorrt_fails_a_host_that_would_fall_back(bundles, fleet):
    v1, _, _ = bundles
    d = fleet.devices[0]
    before = current_release(d)
    [r] = _deploy(v1, [d.alias], fleet, require_backend="tensorrt")
    assert not r.ok and "TensorRT is required" in r.message and current_release(d) == before


def test_host_keys_unknown_and_changed(bundles, fleet, tmp_path):
    from edgeres.deploy.ssh import deploy

    v1, _, _ = bundles
    d = fleet.devices[0]
    empty = tmp_path / "known_hosts"
    ssh = {**fleet.ssh(), "known_hosts": empty}
    [r] = deploy(v1, [d.alias], iterations=3, **ssh)
    assert not r.ok and "not trusted" in r.message and not empty.exists()
    [r] = deploy(v1, [d.alias], iterations=3, accept_new_host_keys=True, **ssh)
    assert r.ok and r.host_key_added and f"[localhost]:{d.port} ssh-ed25519" in empty.read_text()
    other = (fleet.devices[1].folder / "host_key.pub").read_text().split()
    empty.write_text(f"[localhost]:{d.port} {other[0]} {other[1]}\n")   # the device's key "changed"
    [r] = deploy(v1, [d.alias], iterations=3, accept_new_host_keys=True, **ssh)
    assert not r.ok and "man-in-the-middle" in r.message


def test_parse_host():
    from edgeres.deploy.ssh import parse_host, unique_hosts
    from edgeres.errors import ConfigError

    assert parse_host("nv@10.0.0.5:2222").port == 2222 and parse_host("jetson1").user is None
    assert parse_host("nv@[::1]:22").host == "::1"
    assert [h.label for h in unique_hosts(["a", "nv@b:22", "a", "nv@b:22"])] == ["a", "nv@b:22"]
    for bad in ("nv@host:99999", "a b@c", "nv@host;rm -rf /", "", "-oProxyCommand=x", "nv@jétson"):
        with pytest.raises(ConfigError):
            parse_host(bad)


def test_remote_paths():
    from edgeres.deploy.ssh import _remote_path, _under

    assert _remote_path("~/x") == "x" and _under("/home/nv", _remote_path("~/x")) == "/home/nv/x"
    assert _under("/home/nv", "/opt/edgeres") == "/opt/edgeres"


@pytest.mark.skipif(shutil.which("sudo") is None, reason="needs sudo (Debian package sudo; .ci/run installs it)")
def test_sudo_runs_the_device_side_through_sudo_n(bundles, fleet):
    """--sudo puts `sudo -n` (never a password prompt) in front of the device-side command; the release lands and
    verifies as with a root login. (The test login is root here, so sudo -n needs no rule.)"""
    _, v2, _ = bundles
    d = fleet.devices[1]
    [r] = _deploy(v2, [d.alias], fleet, sudo=True)
    assert r.ok, r.message
    assert current_release(d) == r.release
