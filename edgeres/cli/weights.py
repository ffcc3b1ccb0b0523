"""`edgeres weights`: the published ImageNet weights edgeres knows (list), downloaded (fetch) or copied (import) into
the cache, each checked against the sha256 prefix in its published name."""
from __future__ import annotations

import click

from edgeres import pretrained
from edgeres.cli._common import emit, json_option, quiet_option
from edgeres.cli.types import FiniteFloat


@click.group()
def weights() -> None:
    """Published ImageNet weights (torchvision's files) for --init-from torchvision:ARCH: list them, fetch one into
    the cache, or import a file you downloaded elsewhere."""


@weights.command("list")
@json_option
def list_weights(as_json: bool) -> None:
    """The published files edgeres knows, their sha256 prefixes, and which are in the cache ($EDGERES_WEIGHTS)."""
    rows = pretrained.listing()
    emit({"cache": str(pretrained.cache_dir()), "weights": rows}, as_json, lambda: "\n".join(
        [f"cache: {pretrained.cache_dir()}"]
        + [f"{r['arch']:<13}{r['file']:<28}sha256 {r['sha256_prefix']}  "
           + (f"cached: {r['cached']}" if r["cached"] else "not cached") for r in rows]))


@weights.command("fetch")
@click.argument("arch")
@click.option("--url", default=None, help="A mirror folder holding the published files under their names, or the "
              "file's own URL (default: $EDGERES_WEIGHTS_URL, else download.pytorch.org/models/).")
@click.option("--timeout", type=FiniteFloat(1, 3600), default=60.0, show_default=True,
              help="Seconds to wait for the server.")
@quiet_option
@json_option
def fetch(arch: str, url: str | None, timeout: float, quiet: bool, as_json: bool) -> None:
    """Download ARCH's published weights into the cache, checked against their published sha256 prefix; a file that
    fails the check is not kept."""
    say = None if quiet or as_json else (lambda m: click.echo(m, err=True))
    path = pretrained.fetch(arch, url=url, timeout_s=timeout, say=say)
    emit({"arch": arch, "path": str(path)}, as_json, f"{arch}: {path} (sha256 checked)")


@weights.command("import")
@click.option("--from", "src", type=click.Path(), required=True, help="The weights file to copy into the cache.")
@click.option("--arch", default=None, help="The architecture it should be (default: whichever published file its "
              "sha256 matches).")
@json_option
def import_weights(src: str, arch: str | None, as_json: bool) -> None:
    """Copy a weights file downloaded elsewhere into the cache under its published name, after checking its sha256;
    a file that matches no published file is not copied."""
    path = pretrained.import_file(src, arch=arch)
    emit({"from": src, "path": str(path)}, as_json, f"{src} -> {path} (sha256 checked)")


COMMANDS = [weights]
