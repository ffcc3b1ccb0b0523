"""`edgeres fleet ansible` run by the real `ansible-playbook` (ansible-core) against real OpenSSH servers on
127.0.0.1 (tests/fleet.py), addressed by ssh_config alias: a canary batch that fails stops the rollout (retry file
written, the other devices untouched); a full run installs and activates the same release id the SSH deploy gives
the bundle, and `edgeres status` reads the devices' state."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from fleet import MISSING, Fleet, current_release, free_port

sys.path.insert(0, str(Path(__file__).parent))
from test_bundle import make_run  # noqa: E402

PLAYBOOK = shutil.which("ansible-playbook", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(MISSING is not None, reason=MISSING or ""),
              pytest.mark.skipif(PLAYBOOK is None, reason="needs ansible-playbook (pip install ansible-core, "
                                                          "pinned in constraints.txt)")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from edgeres.deploy.bundle import make_bundle

    root = tmp_path_factory.mktemp("ansible")
    bundle = make_bundle(make_run(root), root / "bundle" / "demo", probe_size=8)
    fleet = Fleet(root / "fleet", 3)
    yield fleet, bundle, root
    fleet.close()


def _project(fleet: Fleet, bundle: Path, out: Path, hosts: list[str], config: Path, serial: str) -> dict:
    from edgeres.cli import main

    r = CliRunner().invoke(main, ["fleet", "ansible", str(bundle), "--out", str(out), *sum((["--host", h]
                                  for h in hosts), []), "--ssh-config", str(config), "--known-hosts",
                                  str(fleet.known_hosts), "--serial", serial, "--max-fail-percentage", "0",
                                  "--remote-root", "~/opt/edgeres", "--state-dir", "~/var/lib/edgeres",
                                  "--remote-python", sys.executable, "--trusted-keys",
                                  "~/etc/edgeres/allowed_signers", "--units-dir", "~/etc/systemd/system",
                                  "--iterations", "3", "--host-timeout", "120", "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def _play(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ANSIBLE_CONFIG": str(out / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run([PLAYBOOK, "deploy.yml", *extra], cwd=out, env=env, capture_output=True, text=True,
                          timeout=600)


def test_a_failed_canary_batch_stops_the_rollout(setup, tmp_path):
    fleet, bundle, _ = setup
    config = tmp_path / "ssh_config"
    config.write_text(fleet.config.read_text() + f"\nHost jetson-down\n  HostName localhost\n  Port {free_port()}\n")
    out = tmp_path / "project"
    _project(fleet, bundle, out, ["jetson-down", *(d.alias for d in fleet.devices)], config, "1,100%")
    assert "serial:\n  - 1\n  - 100%" in (out / "deploy.yml").read_text()
    p = _play(out)
    assert p.returncode != 0 and "jetson-down" in p.stdout
    assert (out / "retry" / "deploy.retry").read_text().split() == ["jetson-down"]
    assert all(current_release(d) is None for d in fleet.devices)   # the rollout stopped after the canary


def test_the_playbook_installs_and_activates_the_same_release(setup, tmp_path):
    from edgeres.cli import main
    from edgeres.deploy.releases import folder_release_id

    fleet, bundle, _ = setup
    out = tmp_path / "project"
    done = _project(fleet, bundle, out, [d.alias for d in fleet.devices], fleet.config, "1,100%")
    assert done["release"] == folder_release_id(bundle)
    p = _play(out)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    for d in fleet.devices:
        assert current_release(d) == done["release"], d.alias
        assert (d.units / "timers.target.wants" / "edgeres-verify.timer").is_symlink()
        assert not [o for o in (d.state / "objects").iterdir() if len(o.name) == 64]   # staging consumed
    r = CliRunner().invoke(main, ["status", *sum((["--host", d.alias] for d in fleet.devices), []),
                                  *fleet.cli_args(), "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)["hosts"]
    assert {row["result"]["current"] for row in rows} == {done["release"]}
    assert all(row["result"]["result"]["status"] == "passed" and not row["result"]["pending"] for row in rows)
    again = _play(out, "--limit", fleet.devices[0].alias)   # unchanged: nothing copied, the same release
    assert again.returncode == 0 and current_release(fleet.devices[0]) == done["release"]
    recap = next(ln for ln in again.stdout.splitlines() if ln.startswith(fleet.devices[0].alias + " "))
    assert "failed=0" in recap and "skipped=1" in recap   # the copy task: every file already on the device


def test_bad_options_are_one_line_errors(setup, tmp_path):
    from edgeres.cli import main

    fleet, bundle, _ = setup
    r = CliRunner().invoke(main, ["fleet", "ansible", str(bundle), "--out", str(tmp_path / "p"), "--host", "a",
                                  "--serial", "1,abc"])
    assert r.exit_code == 1 and "--serial 'abc'" in r.output
    r = CliRunner().invoke(main, ["fleet", "ansible", str(bundle), "--out", str(tmp_path / "p")])
    assert r.exit_code == 2 and "give at least one --host" in r.output
