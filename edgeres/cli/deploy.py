"""Deploy commands: `edgeres bundle` (a self-verifying bundle, optionally into a Jetson rootfs) and
`edgeres deploy` (push a bundle to a fleet over SSH and verify it on every device)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from edgeres.cli._common import emit, json_option
from edgeres.cli.types import FiniteFloat
from edgeres.deploy.ansible_playbook import write_project
from edgeres.deploy.bundle import (
    DEVICE_NEEDS,
    bundle_bytes,
    human_bytes,
    make_bundle,
    next_steps,
    opened_bundle,
    verify_bundle,
)
from edgeres.deploy.fleet_output import OUTCOMES, format_status, format_table, host_line, progress_line, summary
from edgeres.deploy.mender import check_artifact_out, write_artifact
from edgeres.deploy.releases import folder_release_id
from edgeres.deploy.rootfs import MACHINE_ID_CHOICES, check_machine_id, install_rootfs
from edgeres.deploy.ssh import MAX_CONNECT_TIMEOUT_S, MAX_HOST_TIMEOUT_S
from edgeres.deploy.ssh import deploy as run_deploy
from edgeres.deploy.ssh import rollback as run_rollback
from edgeres.deploy.ssh import status as run_status
from edgeres.errors import ConfigError
from edgeres.io import read_small_bytes


def machine_id_option(fn):
    """--machine-id: what to do with a rootfs whose etc/machine-id is filled (refused without it)."""
    return click.option("--machine-id", "machine_id", type=click.Choice(MACHINE_ID_CHOICES), default=None,
                        help="With a rootfs whose etc/machine-id holds an id (refused otherwise): clear empties it "
                             "(each device makes its own at first boot), keep leaves it (an image of one device)."
                        )(fn)


def health_options(f):
    """--health-check / --health-timeout, the same on `deploy` and `fleet ansible` (the device's check after the
    switch; default: the bundle's)."""
    f = click.option("--health-timeout", type=FiniteFloat(1, MAX_HOST_TIMEOUT_S), default=None,
                     help="Seconds the health check may take [default: the bundle's, else 300].")(f)
    return click.option("--health-check", default=None, metavar="COMMAND",
                        help="Shell command the device runs in the new release after the switch (exit 0 = healthy); "
                             "it commits only then, else switches back by itself [default: the bundle's health "
                             "check, if any].")(f)


@click.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Bundle folder to write (with --tar: OUT.tar.gz). Optional with --rootfs.")
@click.option("--tar", is_flag=True, help="Write a .tar.gz instead of a folder.")
@click.option("--probe-size", type=click.IntRange(1), default=None,
              help="Preprocessed evaluation images carried with their reference logits [default: 64, or all the "
                   "run's probe.npz holds when fewer].")
@click.option("--min-agreement", type=FiniteFloat(0, 100), default=90.0, show_default=True,
              help="Device gate: top-1 agreement (%) with the host's reference logits.")
@click.option("--max-accuracy-drop", type=FiniteFloat(0, 100), default=5.0, show_default=True,
              help="Device gate: probe accuracy may fall this many percentage points below the host's.")
@click.option("--rootfs", type=click.Path(path_type=Path), default=None,
              help="Also install under ROOTFS/opt/edgeres with a first-boot unit (e.g. Linux_for_Tegra/rootfs).")
@click.option("--force", is_flag=True, help="Replace an existing bundle at --out.")
@click.option("--allow-non-rootfs", is_flag=True, help="With --rootfs: install into a folder without etc/.")
@click.option("--allow-failed", is_flag=True,
              help="Bundle a run whose build did not pass (recorded in the manifest).")
@click.option("--sign", "sign_key", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="OpenSSH ed25519 private key: sign the manifest (signature.json); devices whose "
                   "/etc/edgeres/allowed_signers lists keys install only bundles signed by one of them.")
@click.option("--mender", "mender_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write a Mender artifact (OUT.mender, payload type edgeres, named by the release id) with "
                   "mender-artifact, for devices with the edgeres Update Module.")
@click.option("--health-check", default=None, metavar="COMMAND",
              help="Shell command each device runs in this release after switching to it (exit 0 = healthy): it "
                   "commits only then, else switches back by itself (also at a flashed image's first boot).")
@click.option("--health-timeout", type=FiniteFloat(1, 86400), default=300.0, show_default=True,
              help="Seconds the health check may take on the device.")
@click.option("--device-type", "device_types", multiple=True, default=("jetson",), show_default=True,
              help="With --mender: Mender device type(s) the artifact is compatible with.")
@click.option("--target", default=None, metavar="NAME",
              help="Only what one TensorRT of the run's device plan needs: a plan key (8.5, 8.6, 10.3, 10, 11, "
                   "11.4.1), tensorrt<version> or jetpack<release> (jetpack6.1) [default: every target].")
@machine_id_option
@json_option
def bundle(run_dir, out, tar, probe_size, min_agreement, max_accuracy_drop, rootfs, force, allow_non_rootfs,
           allow_failed, sign_key, mender_out, health_check, health_timeout, device_types, target, machine_id,
           as_json) -> None:
    """Bundle a run for devices: ONNX, calibration cache, probe set with reference logits, device runtime."""
    import tempfile

    if out is None and rootfs is None and mender_out is None:
        raise click.UsageError("give --out DIR, --rootfs PATH, --mender OUT.mender, or several")
    if mender_out is not None:
        check_artifact_out(mender_out, force=force)   # before the bundle is built
    if rootfs is not None and rootfs.is_dir():
        check_machine_id(rootfs, machine_id)          # likewise
    opts = dict(probe_size=probe_size, min_top1_agreement_pct=min_agreement, max_accuracy_drop_pp=max_accuracy_drop,
                allow_failed=allow_failed, sign_key=sign_key, target=target, health_check=health_check,
                health_timeout=health_timeout)
    with tempfile.TemporaryDirectory(prefix="edgeres-bundle-") as tmp:
        path = make_bundle(run_dir, out if out is not None else Path(tmp) / "bundle", tar=tar and out is not None,
                           force=force, **opts)
        with opened_bundle(path) as folder:
            manifest = verify_bundle(folder)
            release = folder_release_id(folder)
            installed, warnings = (install_rootfs(folder, rootfs, allow_non_rootfs=allow_non_rootfs,
                                                  machine_id=machine_id)
                                   if rootfs is not None else (None, []))
            artifact = (write_artifact(folder, mender_out, device_types=device_types, force=force)
                        if mender_out is not None else None)
        size = bundle_bytes(path)
    steps = next_steps(path, tar=tar) if out is not None else []
    result = {"bundle": str(path) if out is not None else None, "rootfs_install": str(installed) if installed else None,
              "files": len(manifest["files"]) + 1, "probe": manifest["probe"],
              "expected_accuracy": manifest["expected_accuracy"], "calibration_cache": manifest["calibration_cache"],
              "warnings": warnings, "mender": str(artifact[0]) if artifact else None,
              "release": release, "bytes": size, "target": manifest.get("target"), "next": steps,
              "device_needs": DEVICE_NEEDS}
    lines = [f"warning: {w}" for w in warnings]
    if artifact:
        lines.append(f"mender: {artifact[0]} (artifact {artifact[1]}, payload type edgeres)")
    if out is not None:
        made_for = f"for {manifest['target']['label']}" if manifest.get("target") else "for every TensorRT target"
        lines += [f"bundle: {path} ({result['files']} files, {human_bytes(size)}, release {release})",
                  f"  {made_for}; probe {manifest['probe']['count']} images; {manifest['readme']} says how to run it",
                  "next, copy it to the device and run it there:", *(f"  {c}" for c in steps),
                  f"the device needs {DEVICE_NEEDS}"]
    if installed:
        lines.append(f"rootfs: release {installed.name} installed and current, pending until verified on the device; "
                     f"edgeres-verify.timer enabled (result: /var/lib/edgeres/result.json after the first boot)")
    emit(result, as_json, "\n".join(lines))


def _read_hosts(hosts: tuple[str, ...], hosts_file: Path | None) -> list[str]:
    out = list(hosts)
    if hosts_file is not None:
        try:   # a regular file of bounded size: a FIFO or a device would block or never end
            text = read_small_bytes(hosts_file, "--hosts-file").decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{hosts_file} is not UTF-8 text (byte {e.start}); one USER@HOST[:PORT] per line"
                              ) from None
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                out.append(line)
    return out


def ssh_options(fn):
    """The options every fleet command shares: which hosts, how to reach them, where edgeres lives on them."""
    opts = [
        click.option("--host", "hosts", multiple=True, metavar="[USER@]HOST[:PORT]",
                     help="A device (an ~/.ssh/config alias works); repeat for a fleet."),
        click.option("--hosts-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="One [USER@]HOST[:PORT] per line; # comments."),
        click.option("--identity", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="SSH private key (default: ssh config / agent / ~/.ssh/id_*)."),
        click.option("--known-hosts", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="known_hosts file [default: ~/.ssh/known_hosts]."),
        click.option("--ssh-config", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="ssh_config for aliases, ports, users, ProxyJump [default: ~/.ssh/config]."),
        click.option("--accept-new-host-keys", is_flag=True,
                     help="Trust and record keys of hosts not yet in known_hosts (a changed key is still refused)."),
        click.option("--remote-root", default="/opt/edgeres", show_default=True,
                     help="Releases folder on the device ('~/x': x in the login's home)."),
        click.option("--state-dir", default="/var/lib/edgeres", show_default=True,
                     help="Results and engine cache on the device."),
        click.option("--sudo", is_flag=True, help="Run the device side with `sudo -n` (a non-root login)."),
        click.option("--remote-python", default="python3", show_default=True,
                     help="Python on the device (may hold arguments: '/usr/bin/python3 -X utf8')."),
        click.option("--timeout", "connect_timeout", type=FiniteFloat(1, MAX_CONNECT_TIMEOUT_S), default=30.0,
                     show_default=True, help="SSH connect timeout (s)."),
        click.option("--retries", type=click.IntRange(0, 10), default=2, show_default=True,
                     help="Retries after a connection error (not after a failed verification)."),
        click.option("--concurrency", type=click.IntRange(1, 256), default=16, show_default=True),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _ssh_kwargs(kw: dict) -> dict:
    keys = ("identity", "known_hosts", "ssh_config", "accept_new_host_keys", "remote_root", "state_dir", "sudo",
            "remote_python", "connect_timeout", "retries")
    return {k: kw[k] for k in keys}


def _targets(kw: dict) -> list[str]:
    targets = _read_hosts(kw["hosts"], kw["hosts_file"])
    if not targets:
        raise click.UsageError("give at least one --host or a --hosts-file")
    return targets


def jsonl_option(fn):
    """--jsonl: the streaming form of --json (which prints one document at the end)."""
    return click.option("--jsonl", "as_jsonl", is_flag=True,
                        help="Stream: one JSON line per host as it finishes, then a summary line.")(fn)


def _form(as_json: bool, as_jsonl: bool) -> str:
    if as_json and as_jsonl:
        raise click.UsageError("choose one of --json (one document) and --jsonl (a line per host)")
    return "json" if as_json else "jsonl" if as_jsonl else "text"


def _printer(form: str, line=None):
    """Print each host's line the moment it finishes (a JSON line with --jsonl; nothing with --json, whose one
    document comes at the end)."""
    def on_done(res) -> None:
        if form != "json":
            click.echo(host_line(res, as_json=True) if form == "jsonl" else (line or host_line)(res))
    return on_done


def _progress_printer(form: str):
    """Progress lines while hosts work (copy, verification, the check after the switch): text and --jsonl only."""
    def on_progress(res, event: dict) -> None:
        if form != "json":
            click.echo(progress_line(res, event, as_json=form == "jsonl"))
    return on_progress


def _finish(results, form: str, text) -> None:
    counts = {o: sum(r.outcome == o for r in results) for o in OUTCOMES}
    if form == "json":
        emit({"hosts": [r.to_dict() for r in results], "summary": counts}, True)
    elif form == "jsonl":
        click.echo(json.dumps({"event": "summary", **counts}, sort_keys=True))
    else:
        click.echo(text(results))
    bad = [r for r in results if r.outcome in ("failed", "unknown", "skipped")]
    if bad:
        unknown = f", {counts['unknown']} unknown" if counts["unknown"] else ""
        click.echo(f"Error: {counts['failed']} of {len(results)} hosts failed{unknown}, {counts['skipped']} skipped: "
                   + ", ".join(f"{r.host} ({r.outcome})" for r in bad), err=True)
        sys.exit(1)


@click.command()
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@ssh_options
@click.option("--precision", type=click.Choice(["int8", "fp16", "fp32"]), default="int8", show_default=True)
@click.option("--iterations", type=click.IntRange(1), default=200, show_default=True, help="Timed iterations.")
@click.option("--require-backend", type=click.Choice(["tensorrt"]), default=None,
              help="Fail a host that would fall back to ONNX Runtime instead of TensorRT.")
@click.option("--canary", type=click.IntRange(0), default=0, show_default=True,
              help="Deploy to the first N hosts first; stop if any of them fails.")
@click.option("--max-failures", type=click.IntRange(0), default=None,
              help="Start no new host once more than K hosts failed.")
@click.option("--host-timeout", type=FiniteFloat(10, MAX_HOST_TIMEOUT_S), default=3600.0, show_default=True,
              help="Seconds one host may take (copy, engine build, verification); the device aborts its install "
                   "at the same limit and nothing is switched.")
@click.option("--keep", type=click.IntRange(1), default=3, show_default=True,
              help="Releases kept on each device after a successful activation (current and previous always).")
@click.option("--trusted-keys", default="/etc/edgeres/allowed_signers", show_default=True,
              help="Device's allowed_signers file: when it lists keys, only bundles they signed are installed.")
@click.option("--units-dir", default="/etc/systemd/system", show_default=True,
              help="Where the device gets the verify-on-boot units (skipped, and said, where it does not exist).")
@health_options
@json_option
@jsonl_option
def deploy(bundle_dir, precision, iterations, require_backend, canary, max_failures, host_timeout, keep,
           trusted_keys, units_dir, health_check, health_timeout, as_json, as_jsonl, **kw) -> None:
    """Copy a bundle to devices over SSH; each stages and verifies it; then each switches, checks the release as it
    runs and commits it, or switches back by itself.

    A host that fails, times out, or whose controller is killed or interrupted keeps its running release; a host
    that did not answer the activation in time is reported UNKNOWN, and the next deploy or status reads it back."""
    form = _form(as_json, as_jsonl)
    results = run_deploy(bundle_dir, _targets(kw), concurrency=kw["concurrency"], canary=canary,
                         max_failures=max_failures, host_timeout=host_timeout, precision=precision,
                         iterations=iterations, require_backend=require_backend, keep=keep,
                         health_check=health_check, health_timeout=health_timeout,
                         trusted_keys=trusted_keys, units_dir=units_dir, on_done=_printer(form),
                         on_progress=_progress_printer(form), **_ssh_kwargs(kw))
    _finish(results, form, format_table)


@click.command()
@ssh_options
@json_option
@jsonl_option
def status(as_json, as_jsonl, **kw) -> None:
    """What each device runs: release, bundle sha, TensorRT, backend, engine, verdict, latency, when (reads only)."""
    form = _form(as_json, as_jsonl)
    results = run_status(_targets(kw), concurrency=kw["concurrency"],
                         on_done=_printer(form) if form == "jsonl" else None,
                         **_ssh_kwargs(kw))
    _finish(results, form, format_status)


def _rollback_line(r) -> str:
    if r.ok:
        return f"{r.host}: now {r.result['current']} (previous {r.result['previous']})"
    return f"{r.host}: {r.outcome.upper()}({r.stage}) {r.message}"


@click.command()
@ssh_options
@click.option("--to", "to", default=None, metavar="RELEASE",
              help="Any release kept on the devices (`edgeres status --json` lists them) [default: the previous].")
@json_option
@jsonl_option
def rollback(to, as_json, as_jsonl, **kw) -> None:
    """Switch each device back to its previous release, or to a kept one (and that release's last passed result)."""
    form = _form(as_json, as_jsonl)
    results = run_rollback(_targets(kw), to=to, concurrency=kw["concurrency"],
                           on_done=_printer(form, _rollback_line), **_ssh_kwargs(kw))
    _finish(results, form, summary)


@click.command()
@click.option("--bundle", "bundle_path", required=True, type=click.Path(path_type=Path),
              help="A bundle folder or .tar.gz made by `edgeres bundle`.")
@click.option("--rootfs", required=True, type=click.Path(path_type=Path),
              help="The Jetson root filesystem tree (e.g. Linux_for_Tegra/rootfs).")
@click.option("--allow-non-rootfs", is_flag=True, help="Install into a folder without etc/.")
@click.option("--trusted-keys", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="allowed_signers file: refuse the bundle unless one of its keys signed it; also installed as "
                   "the image's /etc/edgeres/allowed_signers.")
@machine_id_option
@json_option
def rootfs(bundle_path, rootfs, allow_non_rootfs, trusted_keys, machine_id, as_json) -> None:
    """Install an existing bundle into a Jetson rootfs: the same release (id and layout) an SSH deploy writes, a
    first-boot trial the verify-on-boot timer checks on the device (committed, or switched back)."""
    with opened_bundle(bundle_path) as folder:
        installed, warnings = install_rootfs(folder, rootfs, allow_non_rootfs=allow_non_rootfs,
                                             trusted_keys=trusted_keys, machine_id=machine_id)
    emit({"release": installed.name, "path": str(installed), "warnings": warnings}, as_json,
         "\n".join([f"warning: {w}" for w in warnings] +
                   [f"rootfs: release {installed.name} installed and current (pending until verified on the "
                    f"device); edgeres-verify.timer enabled"]))


@click.group()
def fleet() -> None:
    """Fleet engines operators already run: an Ansible project for the same transaction."""


@fleet.command("ansible")
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for ansible.cfg, inventory.ini, deploy.yml, the bundle and releases.py.")
@click.option("--host", "hosts", multiple=True, metavar="[USER@]HOST[:PORT]", help="A device; repeat for a fleet.")
@click.option("--hosts-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="One [USER@]HOST[:PORT] per line; # comments.")
@click.option("--ssh-config", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="ssh_config the inventory's hosts are resolved with (passed to Ansible's ssh as -F).")
@click.option("--known-hosts", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="known_hosts file for Ansible's ssh (UserKnownHostsFile).")
@click.option("--serial", default="1,25%,100%", show_default=True,
              help="Batches: host counts or percentages, comma-separated (the first is the canary).")
@click.option("--max-fail-percentage", type=click.IntRange(0, 100), default=0, show_default=True,
              help="Stop the rollout when more than this share of a batch failed or was unreachable.")
@click.option("--any-errors-fatal", is_flag=True,
              help="Stop the whole play at the first failed or unreachable host (always so with "
                   "--max-fail-percentage 0).")
@click.option("--become", is_flag=True, help="Run the device side with Ansible's become (sudo).")
@click.option("--remote-root", default="/opt/edgeres", show_default=True)
@click.option("--state-dir", default="/var/lib/edgeres", show_default=True)
@click.option("--remote-python", default="/usr/bin/python3", show_default=True)
@click.option("--trusted-keys", default="/etc/edgeres/allowed_signers", show_default=True)
@click.option("--units-dir", default="/etc/systemd/system", show_default=True)
@click.option("--keep", type=click.IntRange(1), default=3, show_default=True)
@click.option("--host-timeout", type=click.IntRange(10), default=3600, show_default=True,
              help="Seconds the device's install may take (its time limit; async for Ansible).")
@click.option("--iterations", type=click.IntRange(1), default=200, show_default=True)
@click.option("--precision", type=click.Choice(["int8", "fp16", "fp32"]), default="int8", show_default=True)
@health_options
@click.option("--force", is_flag=True, help="Replace an existing project folder at --out.")
@json_option
def fleet_ansible(bundle_dir, out, hosts, hosts_file, serial, as_json, **kw) -> None:
    """Write an Ansible project deploying BUNDLE_DIR: inventory, playbook (prepare, copy, install, activate)."""
    targets = _read_hosts(hosts, hosts_file)
    if not targets:
        raise click.UsageError("give at least one --host or a --hosts-file")
    done = write_project(bundle_dir, out, targets, serial=tuple(serial.split(",")), **kw)
    emit(done, as_json, f"release {done['release']} for {len(done['hosts'])} host(s), batches {done['serial']}\n"
                        f"run: cd {out} && ansible-playbook deploy.yml")


COMMANDS = [bundle, rootfs, deploy, status, rollback, fleet]
