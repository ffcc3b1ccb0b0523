"""The `edgeres` command: a thin click layer over the library.

Each module in COMMAND_MODULES owns the commands of one area and lists them in its `COMMANDS`.
Those modules import only click at the top, so `edgeres --help` works without torch, onnx or tensorrt.
"""
from __future__ import annotations

import importlib
import os
import select
import sys

import click

from edgeres import __version__
from edgeres.cli.examples import attach
from edgeres.errors import EdgeresError

COMMAND_MODULES = ("zoo", "train", "quant", "pipeline", "bench", "predict", "trt", "deploy", "experiment", "weights")


class EdgeresGroup(click.Group):
    """Turns the library's own errors into one clear line and exit code 1; anything else is a bug."""

    def invoke(self, ctx: click.Context):
        if sys.stdout is None:   # started with stdout closed (`>&-`): a result printed there would be lost
            raise click.ClickException("standard output is closed: nowhere to print the result (redirect it to a "
                                       "file, or to /dev/null to discard it)")
        try:
            try:
                return super().invoke(ctx)
            finally:
                sys.stdout.flush()   # a reader that went away (`| head`) shows here, not as a traceback at exit
        except BrokenPipeError as e:
            if _stdout_reader_gone():
                _exit_like_sigpipe()
            raise click.ClickException(f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}") from None
        except EdgeresError as e:
            raise click.ClickException(str(e)) from None
        except OSError as e:   # the file system said no (read-only, full, not a folder) where no check foresaw it
            where = f"{e.filename}: " if getattr(e, "filename", None) else ""
            raise click.ClickException(f"{where}{e.strerror or e}") from None
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it (poll reports an error on its write end)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):   # not a file descriptor (a test runner's buffer)
        return False


def _exit_like_sigpipe() -> None:
    """Quietly, as Unix tools end under `| head`: exit 141 (128 + SIGPIPE), stdout pointed at /dev/null so that
    Python's flush at exit has nowhere to fail (the Python docs' advice for SIGPIPE)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    sys.exit(141)


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
