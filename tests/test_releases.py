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


def _objects_from(bundle: Path, folder: Path) -> str:
    """Stage a bundle as `edgeres deploy` does (files named by sha256); returns the manifest's sha256."""
    import shutil

    from edgeres.io import sha256_file

    folder.mkdir(parents=True, exist_ok=True)
    for p in bundle.iterdir():
        shutil.copyfile(p, folder / sha256_file(p))
    return sha256_file(bundle / "manifest.json")


def test_a_trial_whose_activation_died_is_undone_by_the_next_transaction(bundles, tmp_path):
    """kill -9 of the device-side activate while it checks the switched release (a power cut, the OOM killer): the
    next transaction on the device finds the uncommitted trial and switches back, recording why."""
    import signal

    v1, v2 = bundles[:2]
    d = Device(tmp_path / "dev")
    _, one = d.run("install", "--from", str(v1), "--attempt", "a1")
    assert d.run("activate", one["release"], "--attempt", "a1")[0] == 0
    _, two = d.run("install", "--from", str(v2), "--attempt", "a2")
    pidfile = tmp_path / "health.pid"
    p = subprocess.Popen([sys.executable, str(RELEASES), "activate", two["release"], "--attempt", "a2", "--root",
                          str(d.root), "--state", str(d.state), "--health-check", f"echo $$ > {pidfile}; exec sleep 60",
                          "--", "--iterations", "3", "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not pidfile.exists() or not pidfile.read_text().strip():
        assert time.monotonic() < deadline and p.poll() is None
        time.sleep(0.05)
    assert d.current() == two["release"]   # switched, not committed
    p.kill()
    p.wait()
    os.kill(int(pidfile.read_text()), signal.SIGKILL)
    code, st = d.run("status")
    assert st["trial"]["release"] == two["release"] and st["pending"]   # status reads, never repairs
    code, out = d.run("prune", "--keep", "3")
    assert code == 0 and out["undone"]["outcome"] == "fell back"
    assert "ended before the commit" in out["undone"]["reason"]
    assert d.current() == one["release"] and not (d.state / "trial.json").exists()
    assert json.loads((d.state / "result.json").read_text())["manifest_sha256"] == one["result"]["manifest_sha256"]
    assert two["release"] not in json.loads((d.state / "history.json").read_text())


def test_a_failed_check_switches_back_and_says_why(bundles, tmp_path):
    v1, v2 = bundles[:2]
    d = Device(tmp_path / "dev")
    _, one = d.run("install", "--from", str(v1), "--attempt", "a1")
    assert d.run("activate", one["release"], "--attempt", "a1")[1]["switched"] is True
    _, same = d.run("install", "--from", str(v1), "--attempt", "a1b")   # the release already running
    code, out = d.run("activate", one["release"], "--attempt", "a1b")
    assert code == 0 and out["activated"] and out["switched"] is False and d.current() == one["release"]
    _, two = d.run("install", "--from", str(v2), "--attempt", "a2")
    code, out = d.run("activate", two["release"], "--attempt", "a2", "--health-check", "echo no camera >&2; exit 5")
    assert code == 1 and not out["activated"] and not out["switched"] and out["outcome"] == "fell back", out
    assert out["reason"] == "health check failed: exit 5: no camera" and out["current"] == one["release"]
    assert d.current() == one["release"] and d.run("status")[1]["install_pending"] is None
    code, again = d.run("activate", two["release"], "--attempt", "a2")   # used once: install again to retry
    assert code == 2 and "not the install that last passed" in again["error"]
    code, late = d.run("activate", two["release"], "--attempt", "a2", "--deadline-in", "0")
    assert code == 2 and json.loads((d.state / "activations" / "a2.json").read_text())["outcome"] == "refused"


def test_rollback_to_a_kept_release(bundles, tmp_path):
    d = Device(tmp_path / "dev")
    ids = []
    for i, b in enumerate(bundles):
        _, out = d.run("install", "--from", str(b), "--attempt", f"a{i}")
        assert d.run("activate", out["release"], "--attempt", f"a{i}")[0] == 0
        ids.append(out["release"])
    code, out = d.run("rollback", "--to", ids[0])
    assert code == 0 and out == {**out, "current": ids[0], "previous": ids[2]} and d.current() == ids[0]
    assert json.loads((d.state / "result.json").read_text())["manifest_sha256"] == \
        json.loads((d.state / "results" / f"{ids[0]}.json").read_text())["manifest_sha256"]
    for bad, says in ((ids[0], "already the current release"), ("tiny-000000000000", "not a kept release"),
                      ("../current", "not a release id")):
        code, out = d.run("rollback", "--to", bad)
        assert code == 2 and says in out["error"] and d.current() == ids[0], out


def test_the_cache_repairs_itself(bundles, tmp_path):
    """prepare deletes a staged object whose content is not its name; a refused install leaves no objects; prune
    removes stale objects and releases never committed."""
    v1, v2 = bundles[:2]
    d = Device(tmp_path / "dev")
    objects = tmp_path / "objects"
    manifest_sha = _objects_from(v1, objects)
    junk = "0" * 64
    (objects / junk).write_bytes(b"not what the name says")
    code, prep = d.run("prepare", "--objects", str(objects))
    assert code == 0 and prep["repaired"] == [junk] and junk not in prep["have"] and not (objects / junk).exists()
    assert manifest_sha in prep["have"] and prep["free"]["objects"] > 0
    keys = tmp_path / "allowed_signers"   # signatures required: the unsigned staging is refused, and dropped
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")], check=True)
    keys.write_text("release " + (tmp_path / "k.pub").read_text())
    code, out = d.run("install", "--objects", str(objects), "--manifest", manifest_sha, "--trusted-keys", str(keys))
    assert code == 2 and "unsigned bundle refused" in out["error"] and list(objects.iterdir()) == []
    _objects_from(v2, objects)
    old = time.time() - 3600
    for p in objects.iterdir():
        os.utime(p, (old, old))
    _, two = d.run("install", "--from", str(bundles[2]), "--attempt", "a2",
                   runtime=("--iterations", "3", "--quiet", "--require-backend", "tensorrt"))   # fails: no TensorRT
    assert not two["verified"] and (d.root / "releases" / two["release"]).is_dir()
    _, one = d.run("install", "--from", str(v1), "--attempt", "a3")
    code, act = d.run("activate", one["release"], "--attempt", "a3", "--keep", "3", "--objects", str(objects))
    assert code == 0 and act["pruned"] == [two["release"]] and list(objects.iterdir()) == []
