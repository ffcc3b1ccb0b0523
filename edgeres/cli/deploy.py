"""Deploy commands: `edgeres bundle` (a self-verifying bundle, optionally into a Jetson rootfs) and
`edgeres deploy` (push a bundle to a fleet over SSH and verify it on every device)."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from edgeres.cli._common import emit, json_option


@click.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Bundle folder to write (with --tar: OUT.tar.gz). Optional with --rootfs.")
@click.option("--tar", is_flag=True, help="Write a .tar.gz instead of a folder.")
@click.option("--probe-size", type=click.IntRange(1), default=32, show_default=True,
              help="Preprocessed validation images carried with their reference logits.")
@click.option("--min-agreement", type=click.FloatRange(0, 1), default=0.9, show_default=True,
              help="Device gate: top-1 agreement with the host's reference logits.")
@click.option("--max-accuracy-drop", type=click.FloatRange(0, 1), default=0.05, show_default=True,
              help="Device gate: probe accuracy may fall this much below the host's.")
@click.option("--rootfs", type=click.Path(path_type=Path), default=None,
              help="Also install under ROOTFS/opt/edgeres with a first-boot unit (e.g. Linux_for_Tegra/rootfs).")
@click.option("--force", is_flag=True, help="Replace an existing bundle / install; accept a rootfs without etc/.")
@click.option("--allow-failed", is_flag=True,
              help="Bundle a run whose build did not pass (recorded in the manifest).")
@json_option
def bundle(run_dir, out, tar, probe_size, min_agreement, max_accuracy_drop, rootfs, force, allow_failed,
           as_json) -> None:
    """Bundle a run for devices: ONNX, calibration cache, probe set with reference logits, device runtime."""
    import tempfile

    from edgeres.deploy.bundle import make_bundle, opened_bundle, verify_bundle
    from edgeres.deploy.rootfs import install_rootfs

    if out is None and rootfs is None:
        raise click.UsageError("give --out DIR, --rootfs PATH, or both")
    opts = dict(probe_size=probe_size, min_top1_agreement=min_agreement, max_accuracy_drop=max_accuracy_drop,
                allow_failed=allow_failed)
    with tempfile.TemporaryDirectory(prefix="edgeres-bundle-") as tmp:
        path = make_bundle(run_dir, out if out is not None else Path(tmp) / "bundle", tar=tar and out is not None,
                           force=force, **opts)
        with opened_bundle(path) as folder:
            manifest = verify_bundle(folder)
            installed = install_rootfs(folder, rootfs, force=force) if rootfs is not None else None
    result = {"bundle": str(path) if out is not None else None, "rootfs_install": str(installed) if installed else None,
              "files": len(manifest["files"]) + 1, "probe": manifest["probe"],
              "expected_accuracy": manifest["expected_accuracy"], "calibration_cache": manifest["calibration_cache"]}
    lines = []
    if out is not None:
        lines.append(f"bundle: {path} ({result['files']} files, probe {manifest['probe']['count']} images)")
    if installed:
        lines.append(f"rootfs: installed at {installed}; unit edgeres-verify.service enabled "
                     f"(result: /var/lib/edgeres/result.json after first boot)")
    emit(result, as_json, "\n".join(lines))


def _read_hosts(hosts: tuple[str, ...], hosts_file: Path | None) -> list[str]:
    from edgeres.errors import ConfigError

    out = list(hosts)
    if hosts_file is not None:
        try:
            text = hosts_file.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{hosts_file} is not UTF-8 text (byte {e.start}); one USER@HOST[:PORT] per line"
                              ) from None
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                out.append(line)
    return out


@click.command()
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option("--host", "hosts", multiple=True, metavar="USER@HOST[:PORT]", help="A device; repeat for a fleet.")
@click.option("--hosts-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="One USER@HOST[:PORT] per line; # comments.")
@click.option("--identity", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="SSH private key.")
@click.option("--known-hosts", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="known_hosts file [default: ~/.ssh/known_hosts].")
@click.option("--accept-new-host-keys", is_flag=True,
              help="Trust and record keys of hosts not yet in known_hosts (a changed key is still refused).")
@click.option("--concurrency", type=click.IntRange(1, 256), default=4, show_default=True)
@click.option("--remote-dir", default=None, help="Bundle folder on the device, relative to the login's home "
              "[default: edgeres/<bundle name>].")
@click.option("--remote-python", default="python3", show_default=True, help="Python on the device.")
@click.option("--precision", type=click.Choice(["int8", "fp16", "fp32"]), default="int8", show_default=True)
@click.option("--iterations", type=click.IntRange(1), default=200, show_default=True, help="Timed iterations.")
@click.option("--timeout", type=click.FloatRange(1), default=30.0, show_default=True, help="SSH connect timeout (s).")
@json_option
def deploy(bundle_dir, hosts, hosts_file, identity, known_hosts, accept_new_host_keys, concurrency, remote_dir,
           remote_python, precision, iterations, timeout, as_json) -> None:
    """Copy a bundle to devices over SSH, build and verify the engine on each, print a table per host."""
    from edgeres.deploy.ssh import deploy as run_deploy
    from edgeres.deploy.ssh import format_table

    targets = _read_hosts(hosts, hosts_file)
    if not targets:
        raise click.UsageError("give at least one --host or a --hosts-file")
    results = run_deploy(bundle_dir, targets, concurrency=concurrency, accept_new_host_keys=accept_new_host_keys,
                         known_hosts=known_hosts, identity=identity, remote_dir=remote_dir,
                         remote_python=remote_python, precision=precision, iterations=iterations,
                         connect_timeout=timeout)
    emit([r.to_dict() for r in results], as_json, lambda: format_table(results))
    failed = [r for r in results if not r.ok]
    if failed:
        click.echo(f"Error: {len(failed)} of {len(results)} hosts failed: "
                   + ", ".join(r.host for r in failed), err=True)
        sys.exit(1)


COMMANDS = [bundle, deploy]
