"""Shared CLI pieces: output helpers and option decorators. Commands stay thin: parse, call, print."""
from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import click


def emit(obj: Any, as_json: bool, text: str | Callable[[], str] | None = None) -> None:
    """Print `obj` as one JSON object (--json) or as human text."""
    if as_json:
        click.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))
    else:
        click.echo(text() if callable(text) else (text if text is not None else json.dumps(obj, indent=2,
                                                                                          default=str)))


def json_option(fn):
    return click.option("--json", "as_json", is_flag=True, help="Print one JSON object for scripts.")(fn)


def quiet_option(fn):
    return click.option("--quiet", "-q", is_flag=True, help="No progress bars or chatter.")(fn)


def floats(value: str | None, name: str) -> tuple[float, ...] | None:
    """Parse '0.485,0.456,0.406' into a tuple; a clear error otherwise."""
    if value is None:
        return None
    try:
        return tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {value!r}", param_hint=name) from None


def ints(value: str | None, name: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}", param_hint=name) from None
