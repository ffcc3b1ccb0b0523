"""`edgeres fleet ansible` run by the real `ansible-playbook` (ansible-core) against real OpenSSH servers on
127.0.0.1 (tests/fleet.py), addressed by ssh_config alias: a canary batch that fails stops the rollout; an unreachable
device counts against max_fail_percentage (0 and 40 %) and stops the play before anything is installed; the retry
file lists every host not done (failed and never attempted); `--check` reports what would change and changes nothing;
a full run installs and activates the same release id the SSH deploy gives the bundle (`edgeres status` reads it);
a second run reports 0 changed; Ctrl-C during the device's install aborts it on the device (nothing pending, the
verification killed)."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from fleet import MISSING, Fleet, current_release, free_port, wait_lock_free

sys.path.insert(0, str(Path(__file__).parent))
from test_bundle import make_run  # noqa: E402

PLAYBOOK = shutil.which("ansible-playbook", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(MISSING is not None, reason=MISSING or ""),
              pytest.mark.skipif(PLAYBOOK is None, reason="needs ansible-playbook (pip install ansible-core, "
                                                          "pinned in constraints.txt)")]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from edgeres.deploy.bundle import make_bundle

    root = tmp_path_factory.mktemp("ansible")
    return make_bundle(make_run(root), root / "bundle" / "demo", probe_size=8)


@pytest.fixture
def fleet(tmp_path, monkeypatch):
    """3 devices, and Ansible's ssh masters (ControlPersist) of this test only: a master left from an earlier
    test would otherwise serve a new device that got the same port (another HOME: another device)."""
    control = Path(tempfile.mkdtemp(prefix="edgeres-cp-"))   # short: a socket path has 108 bytes
    monkeypatch.setenv("ANSIBLE_SSH_CONTROL_PATH_DIR", str(control))
    fleet = Fleet(tmp_path / "fleet", 3)
    yield fleet
    for sock in control.iterdir():
        subprocess.run(["ssh", "-o", f"ControlPath={sock}", "-O", "exit", "edgeres-test"], capture_output=True,
                       timeout=30)
    shutil.rmtree(control, ignore_errors=True)
    fleet.close()


def _project(fleet: Fleet, bundle: Path, out: Path, hosts: list[str], config: Path, serial: str, *,
             max_fail: int = 0, python: str = sys.executable) -> dict:
    from edgeres.cli import main

    r = CliRunner().invoke(main, ["fleet", "ansible", str(bundle), "--out", str(out), *sum((["--host", h]
                                  for h in hosts), []), "--ssh-config", str(config), "--known-hosts",
                                  str(fleet.known_hosts), "--serial", serial, "--max-fail-percentage", str(max_fail),
                                  "--remote-root", "~/opt/edgeres", "--state-dir", "~/var/lib/edgeres",
                                  "--remote-python", python, "--trusted-keys",
                                  "~/etc/edgeres/allowed_signers", "--units-dir", "~/etc/systemd/system",
                                  "--iterations", "3", "--host-timeout", "120", "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def _env(out: Path) -> dict:
    return {**os.environ, "ANSIBLE_CONFIG": str(out / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def _play(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([PLAYBOOK, "deploy.yml", *extra], cwd=out, env=_env(out), capture_output=True, text=True,
                          timeout=600)


def _recap(stdout: str) -> dict[str, dict[str, int]]:
    """PLAY RECAP: host -> {ok, changed, unreachable, failed, skipped, ...}."""
    rows = {}
    for ln in stdout[stdout.rindex("PLAY RECAP"):].splitlines()[1:]:
        m = re.match(r"(\S+)\s+:\s+(.*)", ln)
        if m:
            rows[m.group(1)] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(2))}
    return rows


def _retry(out: Path) -> list[str] | None:
    path = out / "retry" / "deploy.retry"
    return path.read_text().split() if path.exists() else None


def _down_config(fleet: Fleet, tmp_path: Path) -> Path:
    config = tmp_path / "ssh_config"
    config.write_text(fleet.config.read_text() + f"\nHost jetson-down\n  HostName localhost\n  Port {free_port()}\n")
    return config


def test_a_failed_canary_batch_stops_the_rollout(fleet, bundle, tmp_path):
    out = tmp_path / "project"
    _project(fleet, bundle, out, ["jetson-down", *(d.alias for d in fleet.devices)], _down_config(fleet, tmp_path),
             "1,100%")
    assert "serial:\n  - 1\n  - 100%" in (out / "deploy.yml").read_text()
    p = _play(out)
    assert p.returncode != 0 and "jetson-down" in p.stdout
    assert all(current_release(d) is None for d in fleet.devices)   # the rollout stopped after the canary
    # everything not done: the canary and the batch never attempted (Ansible's own file named the canary only)
    assert _retry(out) == ["jetson-down", *(d.alias for d in fleet.devices)]


@pytest.mark.parametrize("max_fail", [0, 40])
def test_an_unreachable_device_counts_against_max_fail_percentage(fleet, bundle, tmp_path, max_fail):
    """jetson-down shares the first batch with jetson1: 1 of 2 hosts (50 %) is more than 0 or 40 %, so the play
    stops before either is installed (plain Ansible drops the unreachable host and deploys all the others)."""
    out = tmp_path / "project"
    hosts = [fleet.devices[0].alias, "jetson-down", *(d.alias for d in fleet.devices[1:])]
    _project(fleet, bundle, out, hosts, _down_config(fleet, tmp_path), "2,100%", max_fail=max_fail)
    p = _play(out)
    assert p.returncode != 0, p.stdout[-3000:]
    assert "unreachable: " in p.stdout
    recap = _recap(p.stdout)
    assert recap["jetson-down"]["failed"] == 1, recap
    assert not any(name in recap for name in ("jetson2", "jetson3")), recap   # the next batch never started
    for d in fleet.devices:
        assert current_release(d) is None and not d.state.exists(), d.alias   # nothing installed anywhere
    assert _retry(out) == hosts


def test_check_mode_then_deploy_then_nothing_changed(fleet, bundle, tmp_path):
    from edgeres.cli import main
    from edgeres.deploy.releases import folder_release_id

    out = tmp_path / "project"
    done = _project(fleet, bundle, out, [d.alias for d in fleet.devices], fleet.config, "1,100%")
    assert done["release"] == folder_release_id(bundle)
    aliases = {d.alias for d in fleet.devices}

    check = _play(out, "--check")   # no from_json error; each host would switch; nothing is written anywhere
    assert check.returncode == 0, check.stdout[-3000:] + check.stderr[-2000:]
    recap = _recap(check.stdout)
    assert {h: (r["changed"], r["failed"]) for h, r in recap.items()} == {h: (1, 0) for h in aliases}
    assert check.stdout.count(f"would switch (nothing installed) -> {done['release']}") == 3
    for d in fleet.devices:
        assert current_release(d) is None and not d.state.exists() and not d.root.exists(), d.alias
    assert _retry(out) is None

    p = _play(out)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    assert {h: r["changed"] for h, r in _recap(p.stdout).items()} == dict.fromkeys(aliases, 1)
    for d in fleet.devices:
        assert current_release(d) == done["release"], d.alias
        assert (d.units / "timers.target.wants" / "edgeres-verify.timer").is_symlink()
        assert not [o for o in (d.state / "objects").iterdir() if len(o.name) == 64]   # staging consumed
    assert _retry(out) is None   # every host done
    r = CliRunner().invoke(main, ["status", *sum((["--host", d.alias] for d in fleet.devices), []),
                                  *fleet.cli_args(), "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)["hosts"]
    assert {row["result"]["current"] for row in rows} == {done["release"]}
    assert all(row["result"]["result"]["status"] == "passed" and not row["result"]["pending"] for row in rows)

    attempts = {d.alias: sorted((d.state / "attempts").rglob("*.json")) for d in fleet.devices}
    again = _play(out)   # running and committed: nothing copied, nothing verified again, 0 changed
    assert again.returncode == 0, again.stdout[-3000:]
    recap = _recap(again.stdout)
    assert {h: (r["changed"], r["failed"]) for h, r in recap.items()} == {h: (0, 0) for h in aliases}
    assert all(current_release(d) == done["release"] for d in fleet.devices)
    assert {d.alias: sorted((d.state / "attempts").rglob("*.json")) for d in fleet.devices} == attempts
    assert "changed: [" not in again.stdout and _retry(out) is None
    check = _play(out, "--check")
    assert check.returncode == 0 and "would switch" not in check.stdout
    assert {h: r["changed"] for h, r in _recap(check.stdout).items()} == dict.fromkeys(aliases, 0)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")   # a zombie nobody reaped has stopped


def _slow_step(folder: Path, pattern: str, seconds: float) -> Path:
    """A python3 for the device side whose device runtime takes `seconds` longer when its --out matches the shell
    `pattern` (the install's verification, or the check activate runs after the switch); pid in folder/slow.pid."""
    script = folder / "python-slow-step"
    script.write_text(f"""#!/bin/sh
for a in "$@"; do
  case "$a" in {pattern}) echo $$ > "{folder}/slow.pid"; sleep {seconds};; esac
done
exec {sys.executable} "$@"
""")
    script.chmod(0o755)
    return script


@pytest.mark.parametrize("step", ["install", "activate"])
def test_interrupting_the_play_aborts_the_device_side(fleet, bundle, tmp_path, step):
    """Ctrl-C while the device verifies (install) or checks the switched release (activate): within the heartbeat
    the device kills the verification and, for activate, switches back by itself; nothing pending, nothing live."""
    d = fleet.devices[0]
    pattern = "*/attempts/*/ansible-*[0-9].json" if step == "install" else "*/attempts/*/ansible-*-check.json"
    python = _slow_step(tmp_path, pattern, 300)   # that step would take 5 minutes
    out = tmp_path / "project"
    release = _project(fleet, bundle, out, [d.alias], fleet.config, "1", python=str(python))["release"]
    play = subprocess.Popen([PLAYBOOK, "deploy.yml", "-e", "edgeres_poll_s=1", "-e", "edgeres_heartbeat_s=5"],
                            cwd=out, env=_env(out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not ((tmp_path / "slow.pid").exists() and list((d.state / "ansible").glob(f"*-{step}.alive"))):
            assert play.poll() is None and time.monotonic() < deadline, play.stdout.read()[-3000:]
            time.sleep(0.2)
        runtime = int((tmp_path / "slow.pid").read_text())
        assert _alive(runtime)
        if step == "activate":
            assert current_release(d) == release   # switched, on trial: the check runs
        os.killpg(play.pid, signal.SIGINT)   # Ctrl-C in the terminal: the whole foreground process group
        play.wait(60)
    finally:
        if play.poll() is None:
            os.killpg(play.pid, signal.SIGKILL)
            play.wait()
    assert play.returncode != 0
    t0 = time.monotonic()
    while not list((d.state / "ansible").glob(f"*-{step}.json")) and time.monotonic() - t0 < 60:
        time.sleep(0.1)   # the device side ends within the heartbeat (5 s), not after its 5 minutes
    wait_lock_free(d.state, timeout=10)
    assert not _alive(runtime), "the device's verification still runs after the controller was interrupted"
    answer = json.loads(next((d.state / "ansible").glob(f"*-{step}.json")).read_text())
    if step == "install":
        assert answer["verified"] is False and "aborted" in answer["result"]["error"], answer
    else:
        assert answer["activated"] is False and answer["outcome"] == "fell back", answer
        assert answer["reason"] == "the controller's connection closed", answer
    assert not (d.state / "pending.json").exists() and not (d.state / "trial.json").exists()
    assert current_release(d) is None   # nothing went live
    assert _retry(out) == [d.alias]


def test_a_release_whose_health_check_fails_is_rolled_back_by_the_device(fleet, bundle, tmp_path):
    """The Ansible path of the update's life cycle: each device switches, runs the bundle's health check, and
    commits, or switches back by itself when the check fails (here on the device with $HOME/unwell): that host is
    failed with the device's reason on one line, the other one committed in the same batch is done (not in the
    retry file)."""
    from edgeres.deploy.bundle import make_bundle

    sick_one, well_one = fleet.devices[:2]
    hosts = [sick_one.alias, well_one.alias]
    good = _project(fleet, bundle, tmp_path / "good", hosts, fleet.config, "100%")
    p = _play(tmp_path / "good")
    assert p.returncode == 0 and {current_release(d) for d in (sick_one, well_one)} == {good["release"]}, \
        p.stdout[-3000:]
    (sick_one.home / "unwell").touch()
    sick_bundle = make_bundle(bundle.parent.parent / "runs" / "tiny", tmp_path / "sick-bundle", probe_size=8,
                              health_check="if [ -e \"$HOME/unwell\" ]; then echo 'camera not found' >&2; exit 3; fi")
    sick = _project(fleet, sick_bundle, tmp_path / "sick", hosts, fleet.config, "100%")
    assert sick["release"] != good["release"]
    p = _play(tmp_path / "sick")
    assert p.returncode != 0
    said = f"fell back: health check failed: exit 3: camera not found; the device runs {good['release']}"
    assert said in p.stdout, p.stdout[-3000:]   # one line, the device's reason
    assert current_release(sick_one) == good["release"]   # switched back by the device itself
    record = json.loads(max((sick_one.state / "activations").glob("*.json"),
                            key=lambda f: f.stat().st_mtime).read_text())
    assert record["release"] == sick["release"] and record["outcome"] == "fell back", record
    assert current_release(well_one) == sick["release"]   # its check passed: committed
    recap = _recap(p.stdout)
    assert (recap[sick_one.alias]["changed"], recap[well_one.alias]["changed"]) == (0, 1), recap
    assert _retry(tmp_path / "sick") == [sick_one.alias]


def test_bad_options_are_one_line_errors(bundle, tmp_path):
    from edgeres.cli import main

    r = CliRunner().invoke(main, ["fleet", "ansible", str(bundle), "--out", str(tmp_path / "p"), "--host", "a",
                                  "--serial", "1,abc"])
    assert r.exit_code == 1 and "--serial 'abc'" in r.output
    r = CliRunner().invoke(main, ["fleet", "ansible", str(bundle), "--out", str(tmp_path / "p")])
    assert r.exit_code == 2 and "give at least one --host" in r.output


def test_the_retry_callback_reads_what_the_playbook_writes():
    """Constants shared by the two programs (the playbook generator and the callback plugin it ships)."""
    from edgeres.deploy import ansible_playbook, ansible_retry

    assert ansible_retry.PLAY_HOSTS_FACT == ansible_playbook.PLAY_HOSTS_FACT
    assert ansible_retry.DONE_REGISTER == ansible_playbook.DONE_REGISTER
    assert ansible_playbook.CALLBACK == f"callback_plugins/{ansible_retry.CallbackModule.CALLBACK_NAME}.py"


def test_fleet_ansible_passes_health_check_and_any_errors_fatal(bundle, tmp_path):
    """The CLI's --health-check / --health-timeout reach the device's activate step, and --any-errors-fatal the
    play, at a max_fail_percentage that would not set it; without the flag (and above 0 %) it stays off."""
    import yaml

    from edgeres.cli import main

    def project(name: str, *flags: str) -> tuple[list, str]:
        out = tmp_path / name
        r = CliRunner().invoke(main, ["fleet", "ansible", str(bundle), "--out", str(out), "--host", "jetson-a",
                                      "--max-fail-percentage", "20", *flags])
        assert r.exit_code == 0, r.output
        text = (out / "deploy.yml").read_text()
        return yaml.safe_load(text), text

    plays, text = project("with", "--any-errors-fatal", "--health-check", "systemctl is-active camera",
                          "--health-timeout", "45")
    assert all(p.get("any_errors_fatal") is True for p in plays if "hosts" in p)
    argv = _argv_with(plays, "--health-check")
    assert argv is not None and argv[argv.index("--health-check") + 1] == "systemctl is-active camera"
    assert argv[argv.index("--health-timeout") + 1] == "45" and "activate" in argv, argv
    plays, text = project("without")
    assert not any(p.get("any_errors_fatal") for p in plays if "hosts" in p)
    assert _argv_with(plays, "--health-check") is None and "--health-check" not in text


def _argv_with(node, flag: str) -> list | None:
    """The first list of strings anywhere in a parsed playbook that holds `flag` (a task's argv)."""
    if isinstance(node, list):
        if flag in node and all(isinstance(a, str) for a in node):
            return node
        return next((a for a in (_argv_with(n, flag) for n in node) if a is not None), None)
    if isinstance(node, dict):
        return next((a for a in (_argv_with(n, flag) for n in node.values()) if a is not None), None)
    return None
