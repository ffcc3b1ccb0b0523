"""Mender: `edgeres bundle --mender` writes an artifact with the real mender-artifact tool; the real Mender client
(Debian mender-client, standalone `install` / `commit` / `rollback`) installs it through the edgeres Update Module
into a test root. install stages and verifies and switches nothing; commit activates the release id every other
path gives the bundle; rollback of an uncommitted update leaves the running release; a bundle that fails
verification fails the Mender install with the device untouched.

The client reads Update Modules only from /usr/share/mender/modules/v3 and needs /etc/mender/artifact_info; the
fixture puts the module and a factory artifact_info there only when absent, and removes only what it put."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from test_bundle import disagreeing_copy, make_run  # noqa: E402

MODULE_DIR, ARTIFACT_INFO = Path("/usr/share/mender/modules/v3"), Path("/etc/mender/artifact_info")
MISSING = None if shutil.which("mender") and shutil.which("mender-artifact") else \
    "needs the Mender client and mender-artifact (Debian: mender-client, mender-artifact; .ci/run installs them)"
pytestmark = [pytest.mark.slow, pytest.mark.skipif(MISSING is not None, reason=MISSING or "")]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    """A Mender client whose data, config and edgeres root live in a test folder."""
    from edgeres.deploy.mender import MODULE

    if not os.access(MODULE_DIR, os.W_OK) or not os.access(ARTIFACT_INFO.parent, os.W_OK):
        pytest.skip(f"needs write access to {MODULE_DIR} and {ARTIFACT_INFO.parent} (run as root)")
    module = MODULE_DIR / "edgeres"
    if module.exists() and module.read_bytes() != MODULE.read_bytes():
        pytest.skip(f"{module} exists and is another edgeres module; not replacing it")
    made = [p for p in (module, ARTIFACT_INFO) if not p.exists()]
    if module in made:
        shutil.copyfile(MODULE, module)
        module.chmod(0o755)
    if ARTIFACT_INFO in made:
        ARTIFACT_INFO.write_text("artifact_name=factory\n")
    base = tmp_path_factory.mktemp("mender")
    (base / "data").mkdir()
    (base / "data" / "device_type").write_text("device_type=jetson\n")
    (base / "units").mkdir()
    (base / "mender.conf").write_text(json.dumps({"DeviceTypeFile": str(base / "data" / "device_type")}))
    env = {**os.environ, "EDGERES_ROOT": str(base / "opt"), "EDGERES_STATE": str(base / "state"),
           "EDGERES_PYTHON": sys.executable, "EDGERES_UNITS_DIR": str(base / "units"),
           "EDGERES_TRUSTED_KEYS": str(base / "allowed_signers"), "EDGERES_RUNTIME_ARGS": "--quiet --iterations 3"}

    def mender(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["mender", "--config", str(base / "mender.conf"), "--fallback-config",
                               str(base / "none.conf"), "--data", str(base / "data"), "--no-syslog", "-l", "error",
                               *args], env=env, capture_output=True, text=True, timeout=300)
    yield mender, base
    for p in made:
        p.unlink()


def _current(base: Path) -> str | None:
    link = base / "opt" / "current"
    return Path(os.readlink(link)).name if link.is_symlink() else None


def test_mender_install_commit_rollback(client, tmp_path):
    from edgeres.cli import main
    from edgeres.deploy.mender import write_artifact
    from edgeres.deploy.releases import folder_release_id

    mender, base = client
    run = make_run(tmp_path)
    r = CliRunner().invoke(main, ["bundle", str(run), "--out", str(tmp_path / "v1"), "--probe-size", "8",
                                  "--mender", str(tmp_path / "v1.mender"), "--json"])
    assert r.exit_code == 0, r.output
    v1_id = json.loads(r.stdout)["release"]
    assert v1_id == folder_release_id(tmp_path / "v1")
    import time

    time.sleep(1.1)   # another second: the time stamps mender-artifact writes would differ
    again = write_artifact(tmp_path / "v1", tmp_path / "v1-again.mender")[0]
    assert again.read_bytes() == (tmp_path / "v1.mender").read_bytes()   # the same bundle, the same artifact
    info = subprocess.run(["mender-artifact", "read", str(tmp_path / "v1.mender")], capture_output=True, text=True)
    assert f"Name: {v1_id}" in info.stdout and "Type:   edgeres" in info.stdout

    p = mender("install", str(tmp_path / "v1.mender"))
    assert p.returncode == 0, p.stdout + p.stderr
    assert _current(base) is None and (base / "opt" / "releases" / v1_id).is_dir()   # installed, not switched
    p = mender("commit")
    assert p.returncode == 0, p.stdout + p.stderr
    assert _current(base) == v1_id and mender("show-artifact").stdout.strip().startswith(v1_id)
    assert (base / "units" / "timers.target.wants" / "edgeres-verify.timer").is_symlink()

    from edgeres.deploy.bundle import make_bundle

    v2 = make_bundle(run, tmp_path / "v2", probe_size=6)
    write_artifact(v2, tmp_path / "v2.mender")
    assert mender("install", str(tmp_path / "v2.mender")).returncode == 0
    assert (base / "state" / "pending.json").is_file()   # verified, waiting for the commit
    p = mender("rollback")
    assert p.returncode == 0, p.stdout + p.stderr
    assert _current(base) == v1_id   # never switched, so nothing to undo
    assert not (base / "state" / "pending.json").exists()   # and nothing left waiting

    sick = make_bundle(run, tmp_path / "sick", probe_size=4, health_check="echo no camera; exit 6")
    sick_id = write_artifact(sick, tmp_path / "sick.mender")[1]
    assert mender("install", str(tmp_path / "sick.mender")).returncode == 0
    p = mender("commit")   # the switch, the check, and the device's own way back
    assert p.returncode != 0 and _current(base) == v1_id, p.stdout + p.stderr
    [record] = [json.loads(f.read_text()) for f in (base / "state" / "activations").glob("*.json")
                if json.loads(f.read_text())["release"] == sick_id]
    assert record["outcome"] == "fell back" and "exit 6: no camera" in record["reason"]
    assert not (base / "state" / "pending.json").exists() and not (base / "state" / "trial.json").exists()
    assert mender("show-artifact").stdout.strip().startswith(v1_id)

    bad = disagreeing_copy(v2, tmp_path / "v3")
    write_artifact(bad, tmp_path / "v3.mender")
    p = mender("install", str(tmp_path / "v3.mender"))
    assert p.returncode != 0 and _current(base) == v1_id
    state = json.loads((base / "state" / "result.json").read_text())
    assert state["status"] == "passed" and state["manifest_sha256"] == \
        json.loads((base / "state" / "results" / f"{v1_id}.json").read_text())["manifest_sha256"]


def test_mender_option_errors(tmp_path):
    from edgeres.deploy.mender import check_artifact_out
    from edgeres.errors import ConfigError

    with pytest.raises(ConfigError, match="must end in .mender"):
        check_artifact_out(tmp_path / "x.tar")
    (tmp_path / "x.mender").write_text("mine")
    with pytest.raises(ConfigError, match="already exists"):
        check_artifact_out(tmp_path / "x.mender")
    assert (tmp_path / "x.mender").read_text() == "mine"
