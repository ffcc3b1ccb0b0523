"""`edgeres fleet ansible`: an Ansible project that deploys a bundle the way `edgeres deploy` does, for fleets that
Ansible already runs (inventory groups, `serial` batches, `max_fail_percentage`, `--limit`, retry files, `become`,
`async` for the long verification, `--check`).

    OUT/ansible.cfg        inventory, host key checking on, pipelining, forks = a whole batch (up to MAX_FORKS),
                           the edgeres_retry callback instead of Ansible's own retry file
    OUT/inventory.ini      group [edgeres]: one line per device, as given (an ssh_config alias works)
    OUT/deploy.yml         the play: reach -> status -> prepare -> copy the missing files -> install -> activate
                           (install and activate run in the background on the device, polled)
    OUT/bundle/            a copy of the bundle (the playbook ships from here)
    OUT/releases.py        the device side: this edgeres's copy, the one `edgeres deploy` sends
    OUT/callback_plugins/edgeres_retry.py   ansible_retry.py: retry/deploy.retry lists every host not done
    OUT/.edgeres           the marker: the files above with their sha256; `--force` replaces or deletes only those
                           (unchanged since), never a file the user or Ansible added (group_vars/, retry/...)

The device side is releases.py, so the transaction is the same: install stages and verifies under the device's lock
and time limit and never switches; `activate`, started only after the host's install passed (and the batch is within
max_fail_percentage), switches, checks the release as it runs (engine verification, health check) and commits, or
switches back by itself (the host fails with the device's reason). The release id is the bundle's (the same from SSH,
Mender and rootfs), and `edgeres status` reads the state.

What operators expect of a play, and how this one does it:
- an unreachable host counts against max_fail_percentage (Ansible only drops it): a reachability assertion fails it
  before anything is installed, and an assertion before and after `activate` counts the hosts the batch lost;
  max_fail_percentage 0 also sets any_errors_fatal;
- `--check` runs: a read-only `status` (releases.py sent on stdin) reports per host whether the release would switch;
- `changed` means the release switched on that host (committed): a host already running the release, committed,
  skips copy, install and activate, so a second run reports 0 changed and verifies nothing again;
- Ctrl-C (or kill -9, or a lost network) aborts what the device is doing: the background step's stdin is held by a
  watcher that closes it when the controller's polls stop (HEARTBEAT_S), and releases.py --abort-on-stdin-eof
  kills the verification and leaves nothing pending (install), or closes the activation's window: no switch, or
  the device switches back (activate, which also has a deadline, --deadline-in). The watcher is armed by the first
  poll, so a batch larger than forks (MAX_FORKS) leaves the hosts waiting for a fork unbound until then;
- retry/deploy.retry lists every host not done: failed, unreachable and never attempted (later batches).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from edgeres.deploy.bundle import check_health_command, opened_bundle, verify_bundle
from edgeres.deploy.releases import MANIFEST, ROOT, SIGNATURE, STATE, TRUSTED_KEYS, UNITS_DIR, folder_release_id
from edgeres.deploy.ssh import unique_hosts
from edgeres.errors import ConfigError
from edgeres.io import (
    atomic_write_bytes,
    atomic_write_text,
    check_own_files,
    check_owned_dir,
    claim_dir,
    record_files,
    recorded_files,
    sha256_file,
)

DEFAULT_SERIAL = ("1", "25%", "100%")   # one canary, then a quarter, then the rest
CALLBACK = "callback_plugins/edgeres_retry.py"   # ansible_retry.py: the retry file of every host not done
LEGACY_FILES = ("ansible.cfg", "inventory.ini", "deploy.yml", "releases.py")   # what an older edgeres wrote
PROJECT_FILES = (*LEGACY_FILES, CALLBACK)   # and bundle/<each bundle file>
PLAY_HOSTS_FACT, DONE_REGISTER = "edgeres_play_hosts", "edgeres_done"   # what ansible_retry.py reads
POLL_S, HEARTBEAT_S = 5, 30   # play vars (-e edgeres_poll_s=... overrides): the background steps' poll, and how
                              # long without a poll before the device aborts the step (the controller is gone)
MAX_FORKS = 50                # ansible.cfg forks: every host of a batch polled at once, up to this many

# The watcher of a background step (python3 -c WATCH JOB HEARTBEAT_S COMMAND...): runs releases.py install or
# activate with a pipe as its stdin and closes the pipe once JOB.alive, touched by each poll, is older than
# HEARTBEAT_S (armed by the first poll: a host waiting for a free fork is not aborted); the step's output goes to
# JOB.json (renamed when complete). Files of attempts older than a day are removed.
WATCH = """import os, subprocess, sys, time
job, beat = sys.argv[1], float(sys.argv[2])
folder = os.path.dirname(job)
os.makedirs(folder, mode=0o755, exist_ok=True)
for name in os.listdir(folder):
    try:
        if time.time() - os.lstat(os.path.join(folder, name)).st_mtime > 86400:
            os.unlink(os.path.join(folder, name))
    except OSError:
        pass
with open(job + ".part", "wb") as out:
    proc = subprocess.Popen(sys.argv[3:], stdin=subprocess.PIPE, stdout=out)
    armed = False
    while proc.poll() is None:
        try:
            stale = time.time() - os.stat(job + ".alive").st_mtime > beat
            armed = True
        except FileNotFoundError:
            stale = armed
        if stale and not proc.stdin.closed:
            proc.stdin.close()
        time.sleep(0.5)
os.replace(job + ".part", job + ".json")
sys.exit(proc.returncode)
"""
# One poll (python3 -c POLL JOB): touch the heartbeat, print the step's output once there is one.
POLL = """import os, sys
job = sys.argv[1]
with open(job + ".alive", "a"):
    os.utime(job + ".alive")
if os.path.exists(job + ".json"):
    sys.stdout.write(open(job + ".json").read())
"""


def _serial(items: tuple[str, ...]) -> list[Any]:
    out: list[Any] = []
    for s in items:
        s = s.strip()
        if s.endswith("%") and s[:-1].isdigit() and 0 < int(s[:-1]) <= 100:
            out.append(s)
        elif s.isdigit() and int(s) > 0:
            out.append(int(s))
        else:
            raise ConfigError(f"--serial {s!r}: a batch is a host count (5) or a percentage (25%)")
    return out


def _background(step: str, what: str, argv: list[str], *, register: str, ok: str, fail_msg: str,
                answer: dict | None = None, **extra) -> list[dict]:
    """A long device-side step (install, activate) as three tasks: started in the background (async; Ansible's
    connection may come and go), polled until it prints its JSON, and the device's answer: failed with one line
    unless `ok` (`answer`: more keys for that task). Each poll touches the heartbeat; WATCH holds the step's stdin and
    closes it when the polls stop (releases.py --abort-on-stdin-eof: no install, no switch)."""
    job = f"{{{{ edgeres_state }}}}/ansible/{{{{ edgeres_attempt }}}}-{step}"
    py = "{{ edgeres_python }}"
    return [
        {"name": f"{step}: {what}, in the background",
         "ansible.builtin.command": {"argv": [py, "-c", WATCH, job, "{{ edgeres_heartbeat_s }}", *argv]},
         "async": "{{ edgeres_host_timeout | int + 60 }}", "poll": 0, "changed_when": False},
        {"name": f"{step}: wait for the device (each poll is the heartbeat it needs to go on)",
         "ansible.builtin.command": {"argv": [py, "-c", POLL, job]}, "register": register,
         "until": f"{register}.stdout | length > 0", "delay": "{{ edgeres_poll_s | int }}",
         "retries": "{{ ((edgeres_host_timeout | int + 60) / (edgeres_poll_s | int)) | round(0, 'ceil') | int }}",
         "failed_when": False, "changed_when": False, **extra},
        {"name": f"{step}: the device's answer",
         "ansible.builtin.assert": {"that": ok, "fail_msg": fail_msg, "quiet": True}, **(answer or {})},
    ]


def playbook(bundle: Path, *, release: str, serial: list[Any], max_fail_percentage: int, any_errors_fatal: bool,
             become: bool, remote_root: str, state_dir: str, remote_python: str, trusted_keys: str, units_dir: str,
             keep: int, host_timeout: int, runtime_args: list[str], health_args: list[str]) -> list[dict]:
    manifest_sha = sha256_file(bundle / MANIFEST)
    files = [{"name": p.name, "sha256": sha256_file(p)} for p in sorted(bundle.iterdir()) if p.is_file()]
    signature = sha256_file(bundle / SIGNATURE) if (bundle / SIGNATURE).is_file() else None
    py = "{{ edgeres_python }}"
    where = ["--root", "{{ edgeres_root }}", "--state", "{{ edgeres_state }}"]
    objects = ["--objects", "{{ edgeres_state }}/objects"]
    dev = [py, "{{ edgeres_state }}/releases.py"]
    install = [*dev, "install", *where, *objects, "--manifest", manifest_sha,
               *(["--signature", signature] if signature else []), "--attempt", "{{ edgeres_attempt }}",
               "--time-limit", "{{ edgeres_host_timeout }}", "--trusted-keys", "{{ edgeres_trusted_keys }}",
               "--python", py, "--abort-on-stdin-eof", "--", "--expect-manifest-sha256", manifest_sha, *runtime_args]
    # the activation's window: its deadline, and the polls (the device switches, checks and commits only inside it)
    activate = [*dev, "activate", "{{ edgeres_release }}", *where, "--attempt", "{{ edgeres_attempt }}",
                "--deadline-in", "{{ edgeres_host_timeout }}", "--abort-on-stdin-eof", "--keep", "{{ edgeres_keep }}",
                *objects, "--units-dir", "{{ edgeres_units_dir }}", "--python", py, *health_args, "--", *runtime_args]
    status = "(edgeres_status.stdout | from_json)"
    installed, activated = "(edgeres_install.stdout | from_json)", "(edgeres_activate.stdout | from_json)"
    lost = "(edgeres_batch | difference(ansible_play_batch))"
    batch_check = {
        "ansible.builtin.assert": {
            "that": f"{lost} | length * 100 <= edgeres_max_fail_percentage * (edgeres_batch | length)",
            "fail_msg": f"stopped: {{{{ {lost} | length }}}} of {{{{ edgeres_batch | length }}}} hosts of this batch "
                        f"failed or were unreachable ({{{{ {lost} | join(', ') }}}}), more than max_fail_percentage "
                        "{{ edgeres_max_fail_percentage }}", "quiet": True}}
    return [{
        "name": f"edgeres: deploy {release}",
        "hosts": "edgeres",
        "gather_facts": False,
        "become": become,
        "serial": serial,
        "max_fail_percentage": max_fail_percentage,
        "any_errors_fatal": any_errors_fatal,
        "vars": {"edgeres_release": release, "edgeres_root": remote_root, "edgeres_state": state_dir,
                 "edgeres_python": remote_python, "edgeres_trusted_keys": trusted_keys,
                 "edgeres_units_dir": units_dir, "edgeres_keep": keep, "edgeres_host_timeout": host_timeout,
                 "edgeres_max_fail_percentage": max_fail_percentage, "edgeres_poll_s": POLL_S,
                 "edgeres_heartbeat_s": HEARTBEAT_S, "edgeres_files": files},
        "tasks": [
            {"name": "attempt id (one per host and run); this batch and the play's hosts (for the retry file)",
             "ansible.builtin.set_fact": {
                 "edgeres_attempt": "ansible-{{ now(utc=true, fmt='%Y%m%dT%H%M%S') }}-{{ 1000000 | random }}",
                 "edgeres_batch": "{{ ansible_play_batch }}", PLAY_HOSTS_FACT: "{{ ansible_play_hosts_all }}"}},
            # Ansible drops an unreachable host from the play without counting it against max_fail_percentage;
            # failing it here makes it count (and stops the batch before anything is installed)
            {"name": "reach the device", "ansible.builtin.ping": None, "register": "edgeres_reach",
             "ignore_unreachable": True, "any_errors_fatal": False},   # the next task fails it, said so
            {"name": "an unreachable device counts as failed (max_fail_percentage)",
             "ansible.builtin.assert": {"that": "edgeres_reach is not unreachable", "quiet": True,
                                        "fail_msg": "unreachable: {{ edgeres_reach.msg | default('') }}"}},
            # read-only, in check mode too: this project's releases.py sent on stdin (nothing is copied)
            {"name": "what the device runs",
             "ansible.builtin.command": {"argv": [py, "-", "status", *where],
                                         "stdin": "{{ lookup('ansible.builtin.file', playbook_dir ~ "
                                                  "'/releases.py') }}"},
             "check_mode": False, "register": "edgeres_status",
             "changed_when": f"ansible_check_mode and {status}.current != edgeres_release"},
            {"name": "check mode: what would change",
             "ansible.builtin.debug": {"msg": f"would switch {{{{ {status}.current or '(nothing installed)' }}}} -> "
                                              "{{ edgeres_release }}"},
             "when": "ansible_check_mode and edgeres_status is changed"},
            {"name": "deploy", "block": [
                # `changed` only when the release switched: staging files, the device side and the install are
                # the means, not the change
                {"name": "device side (releases.py)",
                 "ansible.builtin.file": {"path": "{{ edgeres_state }}/objects", "state": "directory",
                                          "mode": "0755"}, "changed_when": False},
                {"ansible.builtin.copy": {"src": "{{ playbook_dir }}/releases.py",
                                          "dest": "{{ edgeres_state }}/releases.py", "mode": "0755"},
                 "changed_when": False},
                {"name": "prepare: identity, permissions, space, the files the device has",
                 "ansible.builtin.command": {"argv": [*dev, "prepare", *where, *objects]},
                 "register": "edgeres_prepare", "changed_when": False},
                {"name": "copy the files the device does not have (content-addressed)",
                 "ansible.builtin.copy": {"src": "{{ playbook_dir }}/bundle/{{ item.name }}",
                                          "dest": "{{ edgeres_state }}/objects/{{ item.sha256 }}", "mode": "0644"},
                 "loop": "{{ edgeres_files }}", "loop_control": {"label": "{{ item.name }}"}, "changed_when": False,
                 "when": "item.sha256 not in (edgeres_prepare.stdout | from_json).have"},
                *_background("install", "stage and verify (never switches)", install, register="edgeres_install",
                             ok=f"{installed}.get('verified')",
                             fail_msg=f"install: {{{{ {installed}.get('error') or ({installed}.get('result') or "
                                      f"{{}}).get('error') or 'the release failed verification' }}}}; "
                                      "nothing switched"),
                {"name": "the batch is within max_fail_percentage (unreachable hosts count)", **batch_check},
                # the device switches, checks the release as it runs (engine verification, health check) and
                # commits, or switches back by itself and says why (failed: 'fell back')
                *_background("activate", "switch, check, commit or fall back", activate, register="edgeres_activate",
                             ok=f"{activated}.get('activated')",
                             fail_msg=f"{{{{ {activated}.get('outcome') or 'refused' }}}}: {{{{ {activated}.get("
                                      f"'reason') or {activated}.get('error') }}}}; the device runs "
                                      f"{{{{ {activated}.get('current') or 'no release' }}}}",
                             changed_when=f"edgeres_activate.stdout | length > 0 and {activated}.get('switched')",
                             # done (the retry file) in the very task that fails another host of the batch
                             answer={"register": DONE_REGISTER}),
            ],
             # already running and committed: nothing to do (a second run changes nothing and verifies nothing)
             "when": f"not ansible_check_mode and not ({status}.current == edgeres_release and not "
                     f"{status}.pending and not {status}.trial)"},
            {"name": "already done", "ansible.builtin.debug": {"msg": "{{ edgeres_release }} runs, committed"},
             "register": DONE_REGISTER, "when": f"not ansible_check_mode and {DONE_REGISTER} is skipped"},
            {"name": "the batch stayed within max_fail_percentage", **batch_check},
        ],
    }]


def write_project(bundle_dir: str | Path, out: str | Path, hosts: list[str], *, ssh_config: Path | None = None,
                  known_hosts: Path | None = None, serial: tuple[str, ...] = DEFAULT_SERIAL,
                  max_fail_percentage: int = 0, become: bool = False, remote_root: str = ROOT,
                  state_dir: str = STATE, remote_python: str = "python3", trusted_keys: str = TRUSTED_KEYS,
                  units_dir: str = UNITS_DIR, keep: int = 3, host_timeout: int = 3600, iterations: int = 200,
                  precision: str = "int8", any_errors_fatal: bool = False, health_check: str | None = None,
                  health_timeout: float | None = None, force: bool = False) -> dict:
    """Write the Ansible project for `bundle_dir` into `out`. Returns {release, playbook, inventory, hosts}.
    `any_errors_fatal` (always on with max_fail_percentage 0, which means the same): any failed or unreachable
    host stops the play. `health_check`/`health_timeout`: the device's check after the switch (default: the
    bundle's)."""
    import yaml

    out = Path(out)
    # the ownership rule (io.py): only a project folder edgeres wrote (its marker) is ever replaced; a user's
    # folder is refused with or without --force
    if check_owned_dir(out, what="--out") and not force:
        raise ConfigError(f"{out} holds an Ansible project edgeres wrote; pass --force to replace it")
    if not hosts:
        raise ConfigError("no hosts given")
    if not 0 <= max_fail_percentage <= 100:
        raise ConfigError("--max-fail-percentage must lie in [0, 100]")
    specs, _ = unique_hosts(hosts, ssh_config)   # the names `edgeres deploy` accepts; one device once
    batches = _serial(serial)
    with opened_bundle(bundle_dir) as bundle:
        verify_bundle(bundle)
        release = folder_release_id(bundle)
        shipped = [p.name for p in sorted(bundle.iterdir()) if p.is_file()]
        planned = [*PROJECT_FILES, *(f"bundle/{name}" for name in shipped)]
        stale = _clear_own_files(out, planned)   # before any write: a user's file in the way is refused
        claim_dir(out, what="--out", kind="ansible")
        for name in shipped:
            atomic_write_bytes(out / "bundle" / name, (bundle / name).read_bytes())
        here = Path(__file__).resolve().parent
        atomic_write_bytes(out / "releases.py", (here / "releases.py").read_bytes())   # as `deploy` sends it
        atomic_write_bytes(out / CALLBACK, (here / "ansible_retry.py").read_bytes())
        runtime_args = ["--precision", precision, "--iterations", str(iterations), "--quiet"]
        health_args = ([*(["--health-check", check_health_command(health_check)] if health_check else []),
                        *(["--health-timeout", f"{health_timeout:g}"] if health_timeout else [])])
        play = playbook(out / "bundle", release=release, serial=batches, max_fail_percentage=max_fail_percentage,
                        any_errors_fatal=any_errors_fatal or max_fail_percentage == 0, become=become,
                        remote_root=remote_root, state_dir=state_dir, remote_python=remote_python,
                        trusted_keys=trusted_keys, units_dir=units_dir, keep=keep, host_timeout=host_timeout,
                        runtime_args=runtime_args, health_args=health_args)
    atomic_write_text(out / "deploy.yml", f"# edgeres fleet ansible: release {release}\n"
                      + yaml.safe_dump(play, sort_keys=False, width=120))
    lines = ["[edgeres]"]
    for s in specs:
        extra = [f"ansible_user={s.user}"] if s.user else []
        extra += [f"ansible_port={s.port}"] if s.port else []
        lines.append(" ".join([s.host if ":" not in s.host else f"[{s.host}]", *extra]))
    lines += ["", "[edgeres:vars]", f"ansible_python_interpreter={remote_python}"]
    ssh_args = [f"-F {ssh_config}"] if ssh_config else []
    ssh_args += [f"-o UserKnownHostsFile={known_hosts}"] if known_hosts else []
    if ssh_args:
        lines.append(f"ansible_ssh_common_args='{' '.join(ssh_args)}'")
    atomic_write_text(out / "inventory.ini", "\n".join(lines) + "\n")
    # Ansible's own retry file lists failed hosts only: the edgeres_retry callback writes retry/deploy.retry with
    # every host not done (never attempted ones included); forks: a whole batch at once (each install is polled)
    atomic_write_text(out / "ansible.cfg", "[defaults]\ninventory = inventory.ini\nhost_key_checking = True\n"
                      f"forks = {min(max(len(specs), 5), MAX_FORKS)}\n"
                      "retry_files_enabled = False\ncallback_plugins = callback_plugins\n"
                      "callbacks_enabled = edgeres_retry\ninterpreter_python = auto_silent\n\n"
                      "[ssh_connection]\npipelining = True\n")
    record_files(out, planned, kind="ansible", forget=tuple(stale))
    return {"release": release, "playbook": str(out / "deploy.yml"), "inventory": str(out / "inventory.ini"),
            "hosts": [s.label for s in specs], "serial": batches}


def _clear_own_files(out: Path, planned: list[str]) -> list[str]:
    """Make way for a project in `out` (absent, empty, or edgeres's own project): every file to be written must be
    absent or one edgeres wrote there and nobody changed since (io.check_own_files), else refused before anything is
    written. The files an earlier project recorded that this one does not write are deleted when unchanged, left
    (the user's now) when edited. Anything else in the folder stays. Returns the files deleted."""
    if not out.is_dir():
        return []
    for sub in (out / "bundle", out / Path(CALLBACK).parent):
        if sub.is_symlink() or (sub.exists() and not sub.is_dir()):
            raise ConfigError(f"{sub} is not a folder edgeres wrote; edgeres will not write through it")
    # a project an older edgeres wrote records no files: those it always wrote are its own
    legacy = (*LEGACY_FILES, *(f"bundle/{p.name}" for p in sorted((out / "bundle").glob("*")) if p.is_file()))
    check_own_files(out, planned, force=True, fallback=legacy)
    stale = [name for name in (recorded_files(out) or dict.fromkeys(legacy)) if name not in planned]
    deleted = []
    for name in stale:
        try:
            check_own_files(out, [name], force=True, fallback=legacy)
        except ConfigError:
            continue   # changed since edgeres wrote it: the user's now
        (out / name).unlink(missing_ok=True)
        deleted.append(name)
    return deleted
