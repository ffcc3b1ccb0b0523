"""Model zoo commands: `edgeres archs`, `edgeres summary`."""
from __future__ import annotations

import click

from edgeres.cli._common import emit, json_option
from edgeres.summary import format_summary
from edgeres.summary import summary as run_summary


@click.command()
@json_option
def archs(as_json: bool) -> None:
    """List the architectures in the registry."""
    from edgeres.models import ARCHS

    rows = [{"arch": s.name, "family": s.family, "input_size": s.input_size, "in_channels": s.in_channels,
             "options": {k: list(v) for k, v in s.options.items()}} for s in ARCHS.values()]
    rows.sort(key=lambda r: (r["family"], r["arch"]))
    emit(rows, as_json, lambda: "\n".join(
        f"{r['arch']:<24}{r['family']:<10}{r['in_channels']}x{r['input_size']}"
        + (f"  options: {r['options']}" if r["options"] else "") for r in rows))


@click.command()
@click.option("--arch", required=True, help="Architecture name (see `edgeres archs`).")
@click.option("--input-size", type=click.IntRange(8, 4096), default=None, help="Input side (default: the family's).")
@click.option("--num-classes", type=click.IntRange(1, 100_000), default=1000, show_default=True)   # the limits of
@click.option("--in-channels", type=click.IntRange(1, 16), default=None,                   # checkpoint metadata
              help="Input channels (default: the family's).")
@click.option("--v1", "stride_in_1x1", is_flag=True, help="Bottleneck nets: the paper's v1 (stride on the first 1x1).")
@click.option("--shortcut", type=click.Choice(["A", "B"]), default=None, help="CIFAR nets: shortcut option.")
@json_option
def summary(arch, input_size, num_classes, in_channels, stride_in_1x1, shortcut, as_json) -> None:
    """Per-stage output shape, parameters and multiply-accumulates, and the totals."""
    options = {}
    if stride_in_1x1:
        options["stride_in_1x1"] = True
    if shortcut:
        options["shortcut"] = shortcut
    result = run_summary(arch, input_size=input_size, num_classes=num_classes, in_channels=in_channels,
                         options=options)
    emit(result, as_json, lambda: format_summary(result))


COMMANDS = [archs, summary]
