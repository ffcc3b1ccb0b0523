"""The `edgeres` command: a thin click layer over the library.

Each module in COMMAND_MODULES owns the commands of one area and lists them in its `COMMANDS`.
Those modules import only click at the top, so `edgeres --help` works without torch, onnx or tensorrt.
"""
from __future__ import annotations

import importlib
import sys

import click

from edgeres import __version__
from edgeres.cli.examples import attach
from edgeres.errors import EdgeresError

COMMAND_MODULES = ("zoo", "train", "quant", "pipeline", "bench", "predict", "trt", "deploy", "experiment", "weights")


class EdgeresGroup(click.Group):
    """Turns the library's own errors into one clear line and exit code 1; anything else is a bug."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except EdgeresError as e:
            raise click.ClickException(str(e)) from None
        except OSError as e:   # the file system said no (read-only, full, not a folder) where no check foresaw it
            where = f"{e.filename}: " if getattr(e, "filename", None) else ""
            raise click.ClickException(f"{where}{e.strerror or e}") from None
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=EdgeresGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgeres")
def main() -> None:
    """edgeres: train, fold, quantize, export, compile, verify and deploy INT8 ResNets for Jetson and GPUs."""


def _with_examples(cmd) -> None:
    attach(cmd, cmd.name)
    for sub in getattr(cmd, "commands", {}).values():
        _with_examples(sub)


for _name in COMMAND_MODULES:
    _mod = importlib.import_module(f"edgeres.cli.{_name}")
    for _cmd in getattr(_mod, "COMMANDS", ()):
        _with_examples(_cmd)
        main.add_command(_cmd)
