"""Issue 35 against real OpenSSH servers (tests/fleet.py): the activation bound to its controller (a window the
device honours; kill -9 in it; "unknown" read back next time), identity that survives cloned images, the check
after the switch that commits or falls back on the device itself, and a cache that repairs itself."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fleet import MISSING, Fleet, can_unshare, current_release, held_python, private_python, wait_lock_free

sys.path.insert(0, str(Path(__file__).parent))
from test_bundle import make_run  # noqa: E402 - a real small build's run folder

pytestmark = [pytest.mark.slow, pytest.mark.skipif(MISSING is not None, reason=MISSING or "")]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """v1, v2 (another probe size), and v2 carrying a health check that fails (exit 3) and one that passes."""
    from edgeres.deploy.bundle import make_bundle

    root = tmp_path_factory.mktemp("bundles")
    run = make_run(root)
    v1 = make_bundle(run, root / "v1" / "demo", probe_size=8)
    v2 = make_bundle(run, root / "v2" / "demo", probe_size=6)
    sick = make_bundle(run, root / "sick" / "demo", probe_size=4, health_check="echo camera not found; exit 3",
                       health_timeout=20)
    return v1, v2, sick


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    f = Fleet(tmp_path_factory.mktemp("fleet"), 3)
    yield f
    f.close()


def _deploy(bundle, hosts, fleet, **kw):
    return fleet.deploy(bundle, hosts, **kw)


def _records(d) -> dict[str, dict]:
    folder = d.state / "activations"
    return {p.stem: json.loads(p.read_text()) for p in folder.glob("*.json")} if folder.is_dir() else {}


def _history(d) -> dict:
    path = d.state / "history.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _wait_for(predicate, timeout: float = 60.0) -> None:
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.1)


def _base(fleet, d, v1) -> str:
    [ok] = _deploy(v1, [d.alias], fleet)
    assert ok.ok and ok.activation == "committed", ok.message
    return ok.release


# ------------------------------------------------------------------------------------------------ 1. the window
def test_a_held_lock_past_the_window_switches_nothing_then_or_later(bundles, fleet, tmp_path):
    """The issue's reproducer: another transaction holds the device's lock when activate arrives. The device gives
    up when the controller's window closes (not after its own 30 s lock wait) and says so; the controller reports
    what the device said, and once the lock is free the old release still runs."""
    v1, v2, _ = bundles
    d = fleet.devices[0]
    before = _base(fleet, d, v1)
    python = held_python(tmp_path, hold_lock=d.state)
    t0 = time.monotonic()
    [r] = _deploy(v2, [d.alias], fleet, host_timeout=18, remote_python=str(python))
    took = time.monotonic() - t0
    try:
        assert (tmp_path / "waiting").exists(), "the lock was never held: the test did not test"
        assert not r.ok and not r.activated and r.stage == "activate" and took < 18, (r.message, took)
        assert r.activation == "refused" and "deadline passed" in r.message and "nothing switched" in r.message
        assert _records(d)[r.attempt]["outcome"] == "refused"
    finally:
        (tmp_path / "go").touch()   # the other transaction ends
    wait_lock_free(d.state, timeout=20)
    time.sleep(2)
    assert current_release(d) == before and r.release not in _history(d)
    assert not (d.state / "trial.json").exists() and not (d.state / "pending.json").exists() or \
        json.loads((d.state / "pending.json").read_text())["release"] == r.release   # verified, never switched


def test_kill_9_in_the_activate_window_leaves_the_old_release(bundles, fleet, tmp_path):
    """The controller dies while its activate waits for the lock: the device sees the connection close and refuses,
    however long the lock is held after."""
    v1, v2, _ = bundles
    d = fleet.devices[1]
    before = _base(fleet, d, v1)
    python = held_python(tmp_path, hold_lock=d.state)
    cmd = [sys.executable, "-m", "edgeres", "deploy", str(v2), "--host", d.alias, "--iterations", "3",
           *fleet.deploy_cli_args(), "--remote-python", str(python)]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         env={**os.environ, "XDG_STATE_HOME": str(tmp_path / "state-home")})
    try:
        _wait_for(lambda: (tmp_path / "waiting").exists() or p.poll() is not None)
        assert p.poll() is None, "the controller ended before its activate met the held lock"
        time.sleep(0.5)
        os.kill(p.pid, signal.SIGKILL)
        p.wait(10)
        time.sleep(1)
    finally:
        (tmp_path / "go").touch()
    _wait_for(lambda: any(r["outcome"] == "refused" and "connection closed" in (r["reason"] or "")
                          for r in _records(d).values()), timeout=30)
    wait_lock_free(d.state, timeout=20)
    assert current_release(d) == before and len(_history(d)) == 1


def test_no_commit_once_the_controller_is_gone_during_the_check(bundles, fleet, tmp_path):
    """kill -9 while the device runs the health check after the switch: the device switches back by itself."""
    v1, v2, _ = bundles
    d = fleet.devices[2]
    before = _base(fleet, d, v1)
    marker = tmp_path / "checking"
    cmd = [sys.executable, "-m", "edgeres", "deploy", str(v2), "--host", d.alias, "--iterations", "3",
           *fleet.deploy_cli_args(), "--health-check", f"touch {marker}; sleep 60"]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         env={**os.environ, "XDG_STATE_HOME": str(tmp_path / "state-home")})
    _wait_for(lambda: marker.exists() or p.poll() is not None)
    assert p.poll() is None and current_release(d) != before   # switched, being checked
    assert json.loads((d.state / "trial.json").read_text())["current_before"] == before
    os.kill(p.pid, signal.SIGKILL)
    p.wait(10)
    _wait_for(lambda: any(r["outcome"] == "fell back" for r in _records(d).values()), timeout=30)
    [record] = [r for r in _records(d).values() if r["outcome"] == "fell back"]
    assert "connection closed" in record["reason"] and record["now"] == before
    assert current_release(d) == before and not (d.state / "trial.json").exists()
    assert json.loads((d.state / "result.json").read_text())["manifest_sha256"] == \
        json.loads((d.state / "results" / f"{before}.json").read_text())["manifest_sha256"]


def test_no_answer_is_unknown_and_the_next_command_reads_it_back(bundles, fleet, tmp_path):
    """A device that does not answer the activate in time: the controller reports UNKNOWN (never switched, never
    failed), records it, and the next status asks the device how that attempt ended."""
    from edgeres.deploy.ssh import status

    v1, v2, _ = bundles
    d = fleet.devices[0]
    before = _base(fleet, d, v1)
    python = held_python(tmp_path)   # activate starts only after `go`
    try:
        [r] = _deploy(v2, [d.alias], fleet, host_timeout=15, remote_python=str(python))
        assert (tmp_path / "waiting").exists()
        assert not r.ok and r.activation == "unknown" and "UNKNOWN" in r.message, r.message
        from edgeres.deploy.fleet_output import summary

        assert r.outcome == "unknown" and r.counts_as_failure and summary([r]) == "0 ok, 0 failed, 1 unknown"
        journal = json.loads((fleet.base / "activations.json").read_text())
        assert [e["attempt"] for e in journal.values()] == [r.attempt]
    finally:
        (tmp_path / "go").touch()
    _wait_for(lambda: r.attempt in _records(d), timeout=30)   # the late activate meets a closed window
    [st] = status([d.alias], **fleet.ssh())
    assert st.earlier["attempt"] == r.attempt and st.earlier["device"]["outcome"] == "refused"
    assert current_release(d) == before
    assert json.loads((fleet.base / "activations.json").read_text()) == {}   # read back: forgotten
    from edgeres.deploy.fleet_output import format_status

    assert f"the earlier activation of {r.release}" in format_status([st]) and "refused" in format_status([st])


# ------------------------------------------------------------------------------------------------ 2. identity
@pytest.mark.skipif(not can_unshare(), reason="needs unshare --mount (CAP_SYS_ADMIN) to give devices one root path")
def test_two_devices_from_one_image_are_both_updated_with_a_warning(bundles, fleet, tmp_path):
    """Same machine id (this machine's) and the same install root path, different host keys: two devices."""
    from edgeres.deploy.ssh import deploy

    v1, _, _ = bundles
    shared = tmp_path / "image-root"
    shared.mkdir()
    for d in fleet.devices[:2]:
        (d.home / "flashed").mkdir(exist_ok=True)
    python = private_python(tmp_path, {shared: "$HOME/flashed"})
    out = deploy(v1, [d.alias for d in fleet.devices[:2]], iterations=3, host_timeout=120,
                 **fleet.deploy_kwargs(remote_root=str(shared / "opt"), state_dir=str(shared / "state"),
                                       remote_python=str(python)))
    assert [r.outcome for r in out] == ["ok", "ok"], [r.message for r in out]
    assert out[0].machine_id == out[1].machine_id and out[0].host_key != out[1].host_key
    for r, other in zip(out, reversed(out)):
        assert any(w.startswith("cloned image: ") and other.host in w and "regenerate /etc/machine-id" in w
                   for w in r.warnings), r.warnings
    for d in fleet.devices[:2]:
        link = d.home / "flashed" / "opt" / "current"
        assert link.is_symlink() and Path(os.readlink(link)).name == out[0].release


# ------------------------------------------------------------------------------------------------ 3. the check
def test_a_failed_health_check_is_rolled_back_by_the_device(bundles, fleet):
    """The bundle's health check fails after the switch: the device switches back and records why; the controller
    reports it as it happened (fell back), and the next deploy of a healthy release commits."""
    v1, v2, sick = bundles
    d = fleet.devices[1]
    before = _base(fleet, d, v1)
    [r] = _deploy(sick, [d.alias], fleet)
    assert not r.ok and r.activation == "fell back" and r.stage == "activate"
    assert "health check failed: exit 3: camera not found" in r.message and before in r.message
    assert current_release(d) == before and r.release not in _history(d)
    record = _records(d)[r.attempt]
    assert record["outcome"] == "fell back" and record["now"] == before and "exit 3" in record["reason"]
    assert "camera not found" in (d.state / "attempts" / r.release / f"{r.attempt}-health.log").read_text()
    [ok] = _deploy(v2, [d.alias], fleet, health_check='test "$EDGERES_RELEASE" = "$(basename "$(pwd -P)")"')
    assert ok.ok and ok.activation == "committed" and current_release(d) == ok.release, ok.message
    assert not (d.root / "releases" / r.release).exists()   # never committed: pruned by the next commit


def test_rollback_to_names_any_kept_release(bundles, fleet):
    from click.testing import CliRunner

    from edgeres.cli import main

    v1, v2, _ = bundles
    d = fleet.devices[2]
    first = _base(fleet, d, v1)
    [second] = _deploy(v2, [d.alias], fleet)
    assert second.ok
    r = CliRunner().invoke(main, ["rollback", "--host", d.alias, "--to", "no-such-release", *fleet.cli_args()])
    assert r.exit_code == 1 and "not a kept release" in r.output and current_release(d) == second.release
    r = CliRunner().invoke(main, ["rollback", "--host", d.alias, "--to", first, *fleet.cli_args()])
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines()[0] == f"{d.alias}: now {first} (previous {second.release})"
    assert current_release(d) == first


# ------------------------------------------------------------------------------------------------ 4. the cache
def test_a_corrupt_cached_object_is_replaced(bundles, fleet):
    """Junk under the name of an object the next deploy needs: the device's prepare deletes it (content-checked),
    the controller sends it again, the deploy goes through."""
    from edgeres.io import sha256_file

    v1, v2, _ = bundles
    d = fleet.devices[0]
    _base(fleet, d, v1)
    sha = sha256_file(v2 / "probe.npz")
    objects = d.home / ".cache/edgeres/objects"
    objects.mkdir(parents=True, exist_ok=True)
    (objects / sha).write_bytes(b"junk from a broken copy")
    [r] = _deploy(v2, [d.alias], fleet)
    assert r.ok, r.message
    assert sha in r.sent and any("damaged cached object" in w for w in r.warnings)
    assert not (objects / sha).exists()   # in the release now, as every staged object


# ------------------------------------------------------------------------------------------------ 6. progress
def test_progress_lines_while_the_device_verifies(bundles, fleet, tmp_path):
    """A device that takes a while (an engine build): a line every few seconds, in text and as --jsonl events."""
    import re

    from click.testing import CliRunner
    from fleet import slow_python

    from edgeres.cli import main

    _, v2, _ = bundles
    d = fleet.devices[1]
    args = ["deploy", str(v2), "--host", d.alias, "--iterations", "3", *fleet.deploy_cli_args(), "--remote-python",
            str(slow_python(tmp_path, 6))]
    r = CliRunner().invoke(main, [*args, "--jsonl"], env={"XDG_STATE_HOME": str(tmp_path)})
    assert r.exit_code == 0, r.output
    events = [json.loads(line) for line in r.stdout.splitlines()]
    ticks = [e for e in events if e["event"] == "progress"]
    assert ticks and all(e["host"] == d.alias and e["seconds"] >= 4.9 for e in ticks)
    assert {e["what"].split()[0] for e in ticks} >= {"verify"}
    r = CliRunner().invoke(main, [*args, "--require-backend", "tensorrt"], env={"XDG_STATE_HOME": str(tmp_path)})
    assert re.search(rf"^{d.alias}: verify \S+ on the device \(\d+ s; an engine build takes minutes\)$", r.stdout,
                     re.M), r.stdout


@pytest.mark.skipif(not can_unshare(), reason="needs unshare --mount (CAP_SYS_ADMIN) for a read-only disk")
def test_a_read_only_disk_is_said_as_such(bundles, fleet, tmp_path):
    """A root login on a read-only install root: the error says so, without the "pass --sudo" hint."""
    v1, _, _ = bundles
    d = fleet.devices[2]
    (d.home / "opt").mkdir(exist_ok=True)
    python = private_python(tmp_path, {}, read_only=("$HOME/opt",))
    [r] = _deploy(v1, [d.alias], fleet, remote_python=str(python))
    assert not r.ok and r.stage == "prepare" and r.sent == [], r.message
    assert "Read-only file system" in r.message and "--sudo" not in r.message, r.message
