"""`edgeres deploy / status / rollback` against real OpenSSH servers on 127.0.0.1, addressed by ssh_config alias
(tests/fleet.py): releases switched only after verification, rollback, an interrupted copy, canary, a down host."""
from __future__ import annotations

import json
import shutil
import subprocess
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
    return fleet.deploy(bundle, hosts, **kw)


def _objects(bundle: Path) -> set[str]:
    from edgeres.io import sha256_file

    m = json.loads((bundle / "manifest.json").read_text())
    return {*(e["sha256"] for e in m["files"].values()), sha256_file(bundle / "manifest.json")}


def test_deploy_by_name_then_unchanged_redeploy_sends_nothing(bundles, fleet):
    v1, _, _ = bundles
    d = fleet.devices[0]
    [r] = _deploy(v1, [d.alias], fleet)
    assert r.ok, r.message
    assert r.activated and r.release == current_release(d) and r.release.startswith("tiny-")
    assert r.result["status"] == "passed" and r.result["backend"] == "onnxruntime"
    assert set(r.sent) == _objects(v1) and r.bytes_sent > 0
    result = json.loads((d.state / "result.json").read_text())
    assert result["status"] == "passed" and (d.state / "result.json").stat().st_mode & 0o044   # readable by all
    assert (d.root / "current" / "manifest.json").read_bytes() == (v1 / "manifest.json").read_bytes()
    [again] = _deploy(v1, [d.alias, d.alias], fleet)     # listed twice: deployed once
    assert again.ok and again.sent == [] and again.bytes_sent == 0 and again.release == r.release
    assert not list((d.home / ".cache/edgeres/objects").iterdir())   # staged objects went into the release
    units = d.units / "timers.target.wants" / "edgeres-verify.timer"
    assert units.is_symlink() and "verify-current" in (d.units / "edgeres-verify.service").read_text()


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
    [attempt] = (d.state / "attempts" / bad.release).iterdir()      # the failed attempt is kept for a look
    assert json.loads(attempt.read_text())["status"] == "failed"
    assert not (d.state / "results" / f"{bad.release}.json").exists()   # only passed results live there


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
    assert r.stdout.splitlines() == [f"{d.alias}: now {first.release} (previous {second.release})", "1 ok, 0 failed"]
    assert current_release(d) == first.release
    assert json.loads((d.state / "result.json").read_text())["manifest_sha256"] == \
        json.loads((d.state / "results" / f"{first.release}.json").read_text())["manifest_sha256"]
    r = CliRunner().invoke(main, ["status", *sum((["--host", h] for h in hosts), []), *fleet.cli_args(), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)   # one document: every host, then the counts
    assert doc["summary"] == {"ok": len(hosts), "failed": 0, "unknown": 0, "skipped": 0, "duplicate": 0}
    rows = {row["host"]: row for row in doc["hosts"]}
    assert set(rows) == set(hosts)
    assert rows[d.alias]["result"]["current"] == first.release
    assert rows[d.alias]["result"]["result"]["backend"] == "onnxruntime"
    assert rows[d.alias]["result"]["result_is_current"] is True
    r = CliRunner().invoke(main, ["status", *sum((["--host", h] for h in hosts), []), *fleet.cli_args()])
    assert r.exit_code == 0 and first.release in r.stdout and "passed" in r.stdout and "onnxruntime" in r.stdout
    assert r.stdout.splitlines()[-1] == f"{len(hosts)} ok, 0 failed"   # every host counted, not only the failed
    p = subprocess.run([sys.executable, "-m", "edgeres", "status", "--host", d.alias, *fleet.cli_args()],
                       capture_output=True, text=True)
    assert p.returncode == 0 and "Warning" not in p.stderr and "DSA" not in p.stderr, p.stderr


def test_canary_stops_the_rollout_and_a_down_host_fails_alone(bundles, fleet, tmp_path):
    from fleet import free_port

    v1, _, _ = bundles
    config = tmp_path / "ssh_config"
    config.write_text(fleet.config.read_text() + f"Host jetson-down\n  HostName localhost\n  Port {free_port()}\n")
    ssh = {**fleet.deploy_kwargs(), "ssh_config": config}
    from edgeres.deploy.ssh import deploy

    hosts = ["jetson-down", fleet.devices[0].alias, fleet.devices[1].alias]
    out = deploy(v1, hosts, canary=1, iterations=3, host_timeout=120, **ssh)
    assert [r.stage for r in out] == ["connect", "skipped", "skipped"]
    assert [r.outcome for r in out] == ["failed", "skipped", "skipped"]
    assert "not attempted: a canary host failed" in out[1].message
    out = deploy(v1, hosts, iterations=3, host_timeout=120, **ssh)   # no canary: the down host fails alone
    assert [r.ok for r in out] == [False, True, True] and out[0].stage == "connect"


def test_require_backend_tensorrt_fails_a_host_that_would_fall_back(bundles, fleet):
    """The re-check of the running release fails: it keeps running, and status still reports its passed result."""
    v1, _, _ = bundles
    d = fleet.devices[0]
    [ok] = _deploy(v1, [d.alias], fleet)
    before, result = current_release(d), (d.state / "result.json").read_bytes()
    [r] = _deploy(v1, [d.alias], fleet, require_backend="tensorrt")
    assert not r.ok and "TensorRT is required" in r.message and current_release(d) == before == ok.release
    assert (d.state / "result.json").read_bytes() == result
    from edgeres.deploy.ssh import status

    [st] = status([d.alias], **fleet.ssh())
    assert st.result["result"]["status"] == "passed" and not st.result["pending"]


def test_host_keys_unknown_and_changed(bundles, fleet, tmp_path):
    from edgeres.deploy.ssh import deploy

    v1, _, _ = bundles
    d = fleet.devices[0]
    empty = tmp_path / "known_hosts"
    ssh = {**fleet.deploy_kwargs(), "known_hosts": empty}
    [r] = deploy(v1, [d.alias], iterations=3, **ssh)
    assert not r.ok and "is unknown" in r.message and "has no entry" in r.message and not empty.exists()
    assert "CHANGED" not in r.message and "jump host" not in r.message
    [r] = deploy(v1, [d.alias], iterations=3, accept_new_host_keys=True, **ssh)
    assert r.ok and r.host_key_added and f"[localhost]:{d.port} ssh-ed25519" in empty.read_text()
    other = (fleet.devices[1].folder / "host_key.pub").read_text().split()
    empty.write_text(f"[localhost]:{d.port} {other[0]} {other[1]}\n")   # the device's key "changed"
    [r] = deploy(v1, [d.alias], iterations=3, accept_new_host_keys=True, **ssh)
    assert not r.ok and f"host key of {d.alias} CHANGED" in r.message and "man-in-the-middle" in r.message


def test_parse_host(tmp_path):
    from edgeres.deploy.ssh import parse_host, unique_hosts
    from edgeres.errors import ConfigError

    assert parse_host("nv@10.0.0.5:2222").port == 2222 and parse_host("jetson1").user is None
    assert parse_host("nv@[::1]:22").host == "::1"
    config = tmp_path / "ssh_config"
    config.write_text("Host a\n  HostName b\n  User nv\n  Port 22\n")
    specs, merged = unique_hosts(["a", "nv@b:22", "a", "nv@b", "c"], config)   # ssh -G: a is nv@b:22
    assert [h.label for h in specs] == ["a", "c"] and merged == {"nv@b:22": "a", "nv@b": "a"}
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


def test_one_device_under_several_names_is_deployed_once(bundles, fleet, tmp_path):
    """ssh -G merges spellings before anything starts; a name that reaches the same machine id and install root by
    another address is merged after connecting. Exactly one of them installs and activates."""
    import getpass

    from edgeres.deploy.ssh import deploy

    v1, _, _ = bundles
    d = fleet.devices[2]
    config = tmp_path / "ssh_config"
    config.write_text(fleet.config.read_text() + f"\nHost {d.alias}-ip\n  HostName 127.0.0.1\n  Port {d.port}\n"
                      f"  User {getpass.getuser()}\n  IdentityFile {fleet.key}\n")
    known = tmp_path / "known_hosts"
    key = (d.folder / "host_key.pub").read_text().split()
    known.write_text(fleet.known_hosts.read_text() + f"[127.0.0.1]:{d.port} {key[0]} {key[1]}\n")
    hosts = [d.alias, f"{getpass.getuser()}@{d.alias}", f"localhost:{d.port}", f"{d.alias}-ip"]
    out = deploy(v1, hosts, iterations=3, host_timeout=120,
                 **fleet.deploy_kwargs(ssh_config=config, known_hosts=known))
    by = {r.host: r for r in out}
    assert by[f"{getpass.getuser()}@{d.alias}"].outcome == "duplicate"
    assert by[f"localhost:{d.port}"].outcome == "duplicate" and f"same device as {d.alias}" in \
        by[f"localhost:{d.port}"].message
    assert sorted(r.outcome for r in (by[d.alias], by[f"{d.alias}-ip"])) == ["duplicate", "ok"]
    assert "machine id" in next(r.message for r in (by[d.alias], by[f"{d.alias}-ip"]) if r.outcome == "duplicate")
    assert sum(len(list((d.state / "attempts").glob(f"*/{r.attempt}.json"))) for r in out if r.attempt) == 1


@pytest.fixture
def fresh_fleet(tmp_path):
    """One device that has nothing installed yet."""
    f = Fleet(tmp_path / "fresh", 1)
    yield f
    f.close()


def test_unchanged_files_are_not_sent_again(bundles, fresh_fleet):
    """Content-addressed staging: a re-deploy of the same bundle sends nothing; a re-bundled model whose ONNX files
    did not change sends only what did (probe set and manifest)."""
    v1, v2, _ = bundles
    fleet = fresh_fleet
    d = fleet.devices[0]
    [first] = _deploy(v1, [d.alias], fleet)
    [again] = _deploy(v1, [d.alias], fleet)
    assert first.ok and again.ok and again.bytes_sent == 0 and first.bytes_sent > 100_000
    [other] = _deploy(v2, [d.alias], fleet)
    m1, m2 = (json.loads((b / "manifest.json").read_text())["files"] for b in (v1, v2))
    changed = {e["sha256"] for n, e in m2.items() if m1.get(n, {}).get("sha256") != e["sha256"]}
    from edgeres.io import sha256_file

    assert other.ok and set(other.sent) == changed | {sha256_file(v2 / "manifest.json")}   # no more than that
    assert m1["model_int8.onnx"] == m2["model_int8.onnx"] and m2["model_int8.onnx"]["sha256"] not in other.sent


def test_permission_is_checked_before_any_copy(bundles, fleet):
    """A device side that cannot write ROOT (here: run as uid 65534 through setpriv, as a non-root login would)
    is refused at prepare, with nothing copied."""
    if shutil.which("setpriv") is None:
        pytest.skip("needs util-linux's setpriv to run the device side as another user")
    v1, _, _ = bundles
    d = fleet.devices[1]
    before = current_release(d)
    python = f"setpriv --reuid=65534 --regid=65534 --clear-groups {sys.executable}"
    [r] = _deploy(v1, [d.alias], fleet, remote_python=python)
    assert not r.ok and r.stage == "prepare" and r.bytes_sent == 0 and r.sent == []
    assert r.message.startswith("permission: ") and "cannot write as uid 65534" in r.message, r.message
    assert "--sudo" in r.message and "nothing copied" in r.message and current_release(d) == before


def test_the_flashed_layout_is_the_deployed_layout(bundles, fleet, tmp_path):
    """edgeres rootfs --bundle writes the tree an SSH deploy writes: the same release id, files, bytes and modes,
    and the same verify-on-boot units (paths aside)."""
    from edgeres.cli import main

    v1, _, _ = bundles
    d = fleet.devices[0]
    [r] = _deploy(v1, [d.alias], fleet)
    assert r.ok, r.message
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    out = CliRunner().invoke(main, ["rootfs", "--bundle", str(v1), "--rootfs", str(rootfs), "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["release"] == r.release

    def tree(folder: Path) -> dict:
        return {p.name: (p.read_bytes(), p.stat().st_mode & 0o777) for p in folder.iterdir()}

    assert tree(rootfs / "opt/edgeres/releases" / r.release) == tree(d.root / "releases" / r.release)
    for name in ("edgeres-verify.service", "edgeres-verify.timer"):
        flashed = (rootfs / "etc/systemd/system" / name).read_text()
        deployed = (d.units / name).read_text().replace(str(d.root.resolve()), "/opt/edgeres") \
            .replace(str(d.state.resolve()), "/var/lib/edgeres").replace(sys.executable, "/usr/bin/python3")
        assert flashed == deployed, name
    assert (rootfs / "etc/systemd/system/timers.target.wants/edgeres-verify.timer").is_symlink()


def test_signed_bundles_over_ssh(bundles, fleet, tmp_path):
    """A device with trusted keys installs only what they signed: an unsigned and a forged bundle are refused
    before staging, with nothing switched; the signed one goes live."""
    from edgeres.deploy.signing import sign_bundle

    v1, v2, _ = bundles
    d = fleet.devices[2]
    key = tmp_path / "release_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "release", "-f", str(key)], check=True)
    signed = tmp_path / "signed" / "demo"
    shutil.copytree(v2, signed)
    sign_bundle(signed, key)
    forged = tmp_path / "forged" / "demo"
    shutil.copytree(signed, forged)
    m = json.loads((forged / "manifest.json").read_text())
    m["gates"]["min_top1_agreement_pct"] = 0.0   # a hand-edited manifest, the signature kept
    (forged / "manifest.json").write_text(json.dumps(m, indent=2, sort_keys=True) + "\n")
    [base] = _deploy(v1, [d.alias], fleet)
    d.trusted_keys.parent.mkdir(parents=True, exist_ok=True)
    d.trusted_keys.write_text("release " + key.with_suffix(".pub").read_text())
    try:
        [unsigned] = _deploy(v2, [d.alias], fleet)
        assert not unsigned.ok and "unsigned bundle refused" in unsigned.message
        [bad] = _deploy(forged, [d.alias], fleet)
        assert not bad.ok and "signs another manifest" in bad.message
        assert current_release(d) == base.release
        [good] = _deploy(signed, [d.alias], fleet)
        assert good.ok and current_release(d) == good.release and (d.root / "current" / "signature.json").is_file()
    finally:
        d.trusted_keys.unlink()


def test_operator_output_a_line_per_host_then_a_table(bundles, fleet, tmp_path):
    from fleet import free_port

    from edgeres.cli import main

    v1, _, _ = bundles
    config = tmp_path / "ssh_config"
    config.write_text(fleet.config.read_text() + f"Host jetson-down\n  HostName localhost\n  Port {free_port()}\n")
    args = ["deploy", str(v1), "--host", "jetson-down", "--host", fleet.devices[0].alias, "--canary", "1",
            "--iterations", "3", *fleet.deploy_cli_args(), "--ssh-config", str(config)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1
    lines = r.stdout.splitlines()
    assert lines[0].startswith("jetson-down: FAILED(connect)")
    assert lines[1] == f"{fleet.devices[0].alias}: SKIPPED(skipped) not attempted: a canary host failed"
    assert lines[2].startswith("host ") and lines[-1] == "0 ok, 1 failed, 1 skipped"
    assert "1 of 2 hosts failed, 1 skipped" in r.stderr
    r = CliRunner().invoke(main, [*args, "--jsonl"])   # the streaming form: a line per host, then the counts
    events = [json.loads(line) for line in r.stdout.splitlines()]
    assert [e.get("outcome") for e in events[:2]] == ["failed", "skipped"]
    assert events[-1] == {"event": "summary", "ok": 0, "failed": 1, "unknown": 0, "skipped": 1, "duplicate": 0}
    r = CliRunner().invoke(main, [*args, "--json"])   # one document
    doc = json.loads(r.stdout)
    assert r.exit_code == 1 and [h["outcome"] for h in doc["hosts"]] == ["failed", "skipped"]
    assert doc["summary"] == {"ok": 0, "failed": 1, "unknown": 0, "skipped": 1, "duplicate": 0}


def test_no_space_is_said_before_the_copy():
    """A device whose disk cannot hold the copy and the release: refused before a byte is sent, with the numbers
    (a full disk was only SFTP's "copy: Failure")."""
    from edgeres.deploy.ssh import DeployJob, _check_space, _Failure

    objects = {"a" * 64: Path(__file__), "b" * 64: Path(__file__).with_name("fleet.py")}
    job = DeployJob(Path("."), objects, "a" * 64, None, (), 3)
    size = sum(p.stat().st_size for p in objects.values())
    _check_space(job, {"free": {"objects": 10 * size, "root": 10 * size, "same_fs": True}}, ["b" * 64])
    with pytest.raises(_Failure, match=rf"no space on the device: 100 bytes free for .cache/edgeres/objects, this "
                                       rf"bundle needs {size + objects['b' * 64].stat().st_size} "):
        _check_space(job, {"free": {"objects": 100, "root": 100, "same_fs": True}}, ["b" * 64])
    with pytest.raises(_Failure, match=rf"bytes free for the install root, this bundle needs {size} "):
        _check_space(job, {"free": {"objects": 10 * size, "root": size - 1, "same_fs": False}}, [])


def test_host_key_message_names_the_jump_host(tmp_path):
    """asyncssh names the host whose key failed; when that is the ProxyJump host, the error says so (the device
    itself was not reached), and unknown vs changed comes from known_hosts."""
    from edgeres.deploy.ssh import HostResult, HostSpec, SSHOptions, _host_key_message

    known = tmp_path / "known_hosts"
    key = subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")], check=True)
    assert key.returncode == 0
    known.write_text("bastion.example " + (tmp_path / "k.pub").read_text())
    opts = SSHOptions(known_hosts=known)
    spec, res = HostSpec("jetson7"), HostResult("jetson7", resolved="nv@10.0.0.7:22")
    changed = _host_key_message(spec, opts, res, "Host key is not trusted for host bastion.example")
    assert changed.startswith("host key of the jump host bastion.example (on the way to jetson7") and \
        "CHANGED" in changed
    unknown = _host_key_message(spec, opts, res, "Host key is not trusted for host 10.0.0.7")
    assert unknown.startswith("host key of jetson7 is unknown") and "jump host" not in unknown


def test_dropped_connection_noise_is_filtered(caplog):
    """asyncio's "socket.send() raised exception." (once per write to a lost connection: 19 lines for one dropped
    device) is left out while a fleet command runs; its other warnings are not."""
    import logging

    from edgeres.deploy.ssh import _run_quietly

    async def noisy() -> None:
        for _ in range(19):
            logging.getLogger("asyncio").warning("socket.send() raised exception.")
        logging.getLogger("asyncio").warning("something else")

    with caplog.at_level(logging.WARNING, logger="asyncio"):
        _run_quietly(noisy())
        logging.getLogger("asyncio").warning("socket.send() raised exception.")   # outside a fleet command: kept
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == \
        ["something else", "socket.send() raised exception."]
