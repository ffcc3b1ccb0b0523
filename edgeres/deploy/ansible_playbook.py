"""`edgeres fleet ansible`: an Ansible project that deploys a bundle the way `edgeres deploy` does, for fleets that
Ansible already runs (inventory groups, `serial` batches, `max_fail_percentage`, `--limit`, retry files, `become`,
`async` for the long verification).

    OUT/ansible.cfg        inventory, retry files in OUT/retry, host key checking on, pipelining
    OUT/inventory.ini      group [edgeres]: one line per device, as given (an ssh_config alias works)
    OUT/deploy.yml         the play: prepare -> copy the missing files -> install (async) -> activate
    OUT/bundle/            a copy of the bundle (the playbook ships from here)
    OUT/releases.py        the device side: this edgeres's copy, the one `edgeres deploy` sends
    OUT/.edgeres           the marker: the files above with their sha256; `--force` replaces or deletes only those
                           (unchanged since), never a file the user or Ansible added (group_vars/, retry/...)

The device side is releases.py, so the transaction is the same: install stages and verifies under the device's lock
and time limit and never switches; the play's `activate` task, which runs only after the host's install passed,
switches. The release id is the bundle's (the same from SSH, Mender and rootfs), and `edgeres status` reads the state.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from edgeres.deploy.bundle import opened_bundle, verify_bundle
from edgeres.deploy.releases import MANIFEST, ROOT, SIGNATURE, STATE, TRUSTED_KEYS, UNITS_DIR, folder_release_id
from edgeres.deploy.ssh import unique_hosts
from edgeres.errors import ConfigError
from edgeres.io import check_own_files, check_owned_dir, claim_dir, record_files, recorded_files, sha256_file

DEFAULT_SERIAL = ("1", "25%", "100%")   # one canary, then a quarter, then the rest
PROJECT_FILES = ("ansible.cfg", "inventory.ini", "deploy.yml", "releases.py")   # and bundle/<each bundle file>


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


def playbook(bundle: Path, *, release: str, serial: list[Any], max_fail_percentage: int, become: bool,
             remote_root: str, state_dir: str, remote_python: str, trusted_keys: str, units_dir: str, keep: int,
             host_timeout: int, runtime_args: list[str]) -> list[dict]:
    manifest_sha = sha256_file(bundle / MANIFEST)
    files = [{"name": p.name, "sha256": sha256_file(p)} for p in sorted(bundle.iterdir()) if p.is_file()]
    signature = sha256_file(bundle / SIGNATURE) if (bundle / SIGNATURE).is_file() else None
    dev = "{{ edgeres_python }} {{ edgeres_state }}/releases.py"
    common = "--root {{ edgeres_root }} --state {{ edgeres_state }}"
    install = (f"{dev} install {common} --objects {{{{ edgeres_state }}}}/objects --manifest {manifest_sha}"
               + (f" --signature {signature}" if signature else "")
               + " --attempt {{ edgeres_attempt }} --time-limit {{ edgeres_host_timeout }}"
               " --trusted-keys {{ edgeres_trusted_keys }} --python {{ edgeres_python }} -- --expect-manifest-sha256 "
               + manifest_sha + " " + " ".join(runtime_args))
    return [{
        "name": f"edgeres: deploy {release}",
        "hosts": "edgeres",
        "gather_facts": False,
        "become": become,
        "serial": serial,
        "max_fail_percentage": max_fail_percentage,
        "vars": {"edgeres_release": release, "edgeres_root": remote_root, "edgeres_state": state_dir,
                 "edgeres_python": remote_python, "edgeres_trusted_keys": trusted_keys,
                 "edgeres_units_dir": units_dir, "edgeres_keep": keep, "edgeres_host_timeout": host_timeout,
                 "edgeres_files": files},
        "tasks": [
            {"name": "attempt id (one per host and run)",
             "ansible.builtin.set_fact": {"edgeres_attempt": "ansible-{{ now(utc=true, fmt='%Y%m%dT%H%M%S') }}-"
                                                             "{{ 1000000 | random }}"}},
            {"name": "device side (releases.py)",
             "ansible.builtin.file": {"path": "{{ edgeres_state }}/objects", "state": "directory", "mode": "0755"}},
            {"ansible.builtin.copy": {"src": "{{ playbook_dir }}/releases.py",
                                      "dest": "{{ edgeres_state }}/releases.py", "mode": "0755"}},
            {"name": "prepare: identity, permissions, files the device has",
             "ansible.builtin.command": f"{dev} prepare {common} --objects {{{{ edgeres_state }}}}/objects",
             "register": "edgeres_prepare", "changed_when": False},
            {"name": "copy the files the device does not have (content-addressed)",
             "ansible.builtin.copy": {"src": "{{ playbook_dir }}/bundle/{{ item.name }}",
                                      "dest": "{{ edgeres_state }}/objects/{{ item.sha256 }}", "mode": "0644"},
             "loop": "{{ edgeres_files }}", "loop_control": {"label": "{{ item.name }}"},
             "when": "item.sha256 not in (edgeres_prepare.stdout | from_json).have"},
            {"name": "install: stage and verify (never switches)",
             "ansible.builtin.command": install, "register": "edgeres_install",
             "async": host_timeout + 60, "poll": 5, "changed_when": False,
             "failed_when": "edgeres_install.rc != 0 or not (edgeres_install.stdout | from_json).verified"},
            {"name": "activate the verified release",
             "ansible.builtin.command": f"{dev} activate {{{{ edgeres_release }}}} {common} --attempt "
                                        "{{ edgeres_attempt }} --keep {{ edgeres_keep }} --units-dir "
                                        "{{ edgeres_units_dir }}",
             "register": "edgeres_activate"},
        ],
    }]


def write_project(bundle_dir: str | Path, out: str | Path, hosts: list[str], *, ssh_config: Path | None = None,
                  known_hosts: Path | None = None, serial: tuple[str, ...] = DEFAULT_SERIAL,
                  max_fail_percentage: int = 0, become: bool = False, remote_root: str = ROOT,
                  state_dir: str = STATE, remote_python: str = "python3", trusted_keys: str = TRUSTED_KEYS,
                  units_dir: str = UNITS_DIR, keep: int = 3, host_timeout: int = 3600, iterations: int = 200,
                  precision: str = "int8", force: bool = False) -> dict:
    """Write the Ansible project for `bundle_dir` into `out`. Returns {release, playbook, inventory, hosts}."""
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
        (out / "bundle").mkdir(exist_ok=True)
        for name in shipped:
            shutil.copyfile(bundle / name, out / "bundle" / name)
        shutil.copyfile(Path(__file__).resolve().parent / "releases.py", out / "releases.py")   # as `deploy` sends
        runtime_args = ["--precision", precision, "--iterations", str(iterations), "--quiet"]
        play = playbook(out / "bundle", release=release, serial=batches, max_fail_percentage=max_fail_percentage,
                        become=become, remote_root=remote_root, state_dir=state_dir, remote_python=remote_python,
                        trusted_keys=trusted_keys, units_dir=units_dir, keep=keep, host_timeout=host_timeout,
                        runtime_args=runtime_args)
    (out / "deploy.yml").write_text(f"# edgeres fleet ansible: release {release}\n"
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
    (out / "inventory.ini").write_text("\n".join(lines) + "\n")
    (out / "ansible.cfg").write_text("[defaults]\ninventory = inventory.ini\nhost_key_checking = True\n"
                                     "retry_files_enabled = True\nretry_files_save_path = retry\n"
                                     "interpreter_python = auto_silent\n\n[ssh_connection]\npipelining = True\n")
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
    sub = out / "bundle"
    if sub.is_symlink() or (sub.exists() and not sub.is_dir()):
        raise ConfigError(f"{sub} is not the bundle folder edgeres wrote; edgeres will not write through it")
    # a project an older edgeres wrote records no files: those it always wrote are its own
    legacy = (*PROJECT_FILES, *(f"bundle/{p.name}" for p in sorted((out / "bundle").glob("*")) if p.is_file()))
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
