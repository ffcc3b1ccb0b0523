"""The device side of a release (edgeres/deploy/releases.py), run as a device runs it: a subprocess with the real
device runtime on ONNX Runtime. install stages and verifies and never switches; only activate switches; time
limit, lock, stdin EOF, supersession, kept results, pruning, malformed manifests, content-addressed ids."""
from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fleet import slow_python  # noqa: E402
from test_bundle import make_run  # noqa: E402 - a real small build's run folder

RELEASES = Path(__file__).resolve().parents[1] / "edgeres" / "deploy" / "releases.py"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """Three bundles of one run (probe sizes 8, 6, 4: three manifests, three releases)."""
    from edgeres.deploy.bundle import make_bundle

    root = tmp_path_factory.mktemp("bundles")
    run = make_run(root)
    return [make_bundle(run, root / f"v{i}" / "tiny", probe_size=n) for i, n in enumerate((8, 6, 4), 1)]


class Device:
    def __init__(self, base: Path):
        self.root, self.state, self.units = base / "opt", base / "state", base / "units"
        self.units.mkdir(parents=True)

    def run(self, *args: str, python: str = sys.executable, runtime=("--iterations", "3", "--quiet"),
            **kw) -> tuple[int, dict]:
        cmd = [sys.executable, str(RELEASES), *args, "--root", str(self.root), "--state", str(self.state),
               "--python", python, "--lock-wait", "1"]
        if args[0] in ("install", "verify-current"):
            cmd += ["--", *runtime]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)
        lines = p.stdout.strip().splitlines()
        assert len(lines) == 1, p.stdout + p.stderr   # one JSON object, always
        return p.returncode, json.loads(lines[0])

    def current(self) -> str | None:
        link = self.root / "current"
        return Path(os.readlink(link)).name if link.is_symlink() else None


def test_install_never_switches_only_activate_does(bundles, tmp_path):
    v1 = bundles[0]
    d = Device(tmp_path)
    code, out = d.run("install", "--from", str(v1), "--attempt", "a1")
    assert code == 0 and out["verified"] and not out["activated"], out
    assert d.current() is None and not (d.state / "result.json").exists()   # verified, nothing switched
    assert d.run("status")[1]["install_pending"] == out["release"]
    code, bad = d.run("activate", out["release"], "--attempt", "another")
    assert code == 2 and "not the install that last passed" in bad["error"] and d.current() is None
    legacy = d.units / "multi-user.target.wants" / "edgeres-verify.service"   # enabled by an earlier edgeres
    legacy.parent.mkdir()
    legacy.symlink_to("/etc/systemd/system/edgeres-verify.service")
    code, done = d.run("activate", out["release"], "--attempt", "a1", "--units-dir", str(d.units))
    assert not legacy.is_symlink()   # the unit no longer runs inside the boot transaction
    assert code == 0 and d.current() == out["release"] and done["units"]["installed"]
    assert json.loads((d.state / "result.json").read_text())["status"] == "passed"
    assert os.readlink(d.units / "timers.target.wants" / "edgeres-verify.timer") == str(d.units /
                                                                                        "edgeres-verify.timer")
    assert f"--root {d.root}" in (d.units / "edgeres-verify.service").read_text()
    code, again = d.run("activate", out["release"], "--attempt", "a1")   # an activate is used once
    assert code == 2 and "not the install that last passed" in again["error"]


def test_a_newer_install_supersedes_a_verified_one(bundles, tmp_path):
    v1, v2 = bundles[:2]
    d = Device(tmp_path)
    _, one = d.run("install", "--from", str(v1), "--attempt", "a1")
    _, two = d.run("install", "--from", str(v2), "--attempt", "a2")
    assert one["verified"] and two["verified"] and one["release"] != two["release"]
    code, out = d.run("activate", one["release"], "--attempt", "a1")
    assert code == 2 and "superseded" in out["error"] and d.current() is None
    assert d.run("activate", two["release"], "--attempt", "a2")[0] == 0 and d.current() == two["release"]


def test_a_failed_recheck_keeps_the_passed_result(bundles, tmp_path):
    """The issue's case: re-checking the running release with --require-backend tensorrt fails on a CPU device; the
    release keeps running, and its passed result stays what status reports."""
    v1 = bundles[0]
    d = Device(tmp_path)
    _, out = d.run("install", "--from", str(v1))
    d.run("activate", out["release"])
    rid = out["release"]
    passed, current = (d.state / "results" / f"{rid}.json").read_bytes(), (d.state / "result.json").read_bytes()
    code, again = d.run("install", "--from", str(v1), runtime=("--iterations", "3", "--quiet", "--require-backend",
                                                               "tensorrt"))
    assert code == 2 and not again["verified"] and "TensorRT is required" in again["result"]["error"]
    assert (d.state / "results" / f"{rid}.json").read_bytes() == passed
    assert (d.state / "result.json").read_bytes() == current and d.current() == rid
    st = d.run("status")[1]
    assert st["result"]["status"] == "passed" and not st["pending"] and st["install_pending"] is None
    attempts = {p.name: json.loads(p.read_text())["status"] for p in (d.state / "attempts" / rid).iterdir()}
    assert sorted(attempts.values()) == ["error", "passed", "passed"]   # install, the check after the switch, recheck
    assert [name for name in attempts if name.endswith("-check.json")] != []


def test_time_limit_kills_the_verification_and_switches_nothing(bundles, tmp_path):
    v1 = bundles[0]
    d = Device(tmp_path)
    slow = slow_python(tmp_path, 60)
    t0 = time.monotonic()
    code, out = d.run("install", "--from", str(v1), "--time-limit", "2", python=str(slow))
    assert time.monotonic() - t0 < 20
    assert code == 2 and not out["verified"] and "time limit" in out["result"]["error"]
    assert d.current() is None and not (d.state / "pending.json").exists()
    pid = int((tmp_path / "slow.pid").read_text())
    with pytest.raises(ProcessLookupError):   # the whole process group went with it
        os.kill(pid, 0)


def test_stdin_eof_aborts_the_install(bundles, tmp_path):
    """--abort-on-stdin-eof: what the SSH controller relies on when it times out, is killed or interrupted."""
    v1 = bundles[0]
    d = Device(tmp_path)
    slow = slow_python(tmp_path, 60)
    p = subprocess.Popen([sys.executable, str(RELEASES), "install", "--from", str(v1), "--root", str(d.root),
                          "--state", str(d.state), "--python", str(slow), "--abort-on-stdin-eof", "--", "--quiet"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not (tmp_path / "slow.pid").exists():
        assert time.monotonic() < deadline and p.poll() is None
        time.sleep(0.05)
    p.stdin.close()   # the controller is gone
    p.wait(timeout=20)
    out = json.loads(p.stdout.read())
    assert p.returncode == 2 and not out["verified"] and out["result"]["error"].startswith("aborted")
    assert d.current() is None and not (d.state / "pending.json").exists()


def test_one_transaction_at_a_time(bundles, tmp_path):
    v1 = bundles[0]
    d = Device(tmp_path)
    d.state.mkdir(parents=True)
    with open(d.state / "lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        code, out = d.run("install", "--from", str(v1))
    assert code == 2 and out["error"].startswith("busy: another edgeres transaction holds")
    assert not (d.root / "releases").exists()


def test_keep_prunes_after_activation_and_staging_is_cleaned(bundles, tmp_path):
    d = Device(tmp_path)
    ids = []
    for b in bundles:
        _, out = d.run("install", "--from", str(b))
        code, act = d.run("activate", out["release"], "--keep", "2")
        assert code == 0, act
        ids.append(out["release"])
    assert sorted(p.name for p in (d.root / "releases").iterdir()) == sorted(ids[1:])
    assert act["pruned"] == [ids[0]] and not (d.state / "attempts" / ids[0]).exists()
    assert not (d.state / "results" / f"{ids[0]}.json").exists()
    assert d.current() == ids[2] and os.readlink(d.root / "previous") == f"releases/{ids[1]}"
    dead = d.root / "releases" / f".{ids[0]}.x.partial"   # what a killed install leaves
    dead.mkdir()
    _, out = d.run("install", "--from", str(bundles[0]))
    assert out["cleaned"] == [dead.name] and not dead.exists()


def test_malformed_manifest_is_exit_2_in_one_line(bundles, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(bundles[0], bad)
    (bad / "manifest.json").write_text(json.dumps({"format": "edgeres-bundle/1", "files": ["model.onnx"]}))
    d = Device(tmp_path / "dev")
    code, out = d.run("install", "--from", str(bad))
    assert code == 2 and "malformed bundle manifest" in out["error"] and "\n" not in out["error"]
    code, out = d.run("activate")
    assert code == 2 and "needs the RELEASE id" in out["error"]


def test_the_same_run_gives_the_same_release_id(bundles, tmp_path):
    """Content-addressed: bundling the same run with the same settings again gives the same bytes, hence the same
    release id on every path (no created_at, no local path, a probe.npz with fixed time stamps)."""
    from edgeres.deploy.bundle import make_bundle
    from edgeres.deploy.releases import folder_release_id

    v1 = bundles[0]
    again = make_bundle(make_run(tmp_path), tmp_path / "again" / "tiny", probe_size=8)
    assert (again / "manifest.json").read_bytes() == (v1 / "manifest.json").read_bytes()
    assert folder_release_id(again) == folder_release_id(v1)
    manifest = json.loads((v1 / "manifest.json").read_text())
    assert "created_at" not in manifest and "path" not in manifest["run"]
    assert folder_release_id(bundles[1]) != folder_release_id(v1)
