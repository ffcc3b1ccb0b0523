"""Shared CLI pieces: output helpers and option decorators. Commands stay thin: parse, call, print."""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import click


def emit(obj: Any, as_json: bool, text: str | Callable[[], str] | None = None) -> None:
    """Print `obj` as one JSON object (--json) or as human text. JSON has no NaN or Infinity: such a number is
    printed as null, so what a script reads is always valid JSON."""
    if as_json:
        click.echo(json.dumps(json_safe(obj), indent=2, sort_keys=True, default=str, allow_nan=False))
    else:
        click.echo(text() if callable(text) else (text if text is not None else json.dumps(obj, indent=2,
                                                                                          default=str)))


def json_safe(obj: Any) -> Any:
    """`obj` with every non-finite float replaced by None (dataclass-free JSON-able data: dicts, lists, tuples)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def json_option(fn):
    return click.option("--json", "as_json", is_flag=True, help="Print one JSON object for scripts.")(fn)


def quiet_option(fn):
    return click.option("--quiet", "-q", is_flag=True, help="No progress bars or chatter.")(fn)


def floats(value: str | None, name: str) -> tuple[float, ...] | None:
    """Parse '0.485,0.456,0.406' into a tuple; a clear error otherwise."""
    if value is None:
        return None
    try:
        out = tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {value!r}", param_hint=name) from None
    if not all(math.isfinite(v) for v in out):
        raise click.BadParameter(f"expected finite numbers, got {value!r}", param_hint=name)
    return out


def ints(value: str | None, name: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}", param_hint=name) from None


def device_option(fn):
    """--device: where every torch stage runs (decided once per command, recorded in its records)."""
    from edgeres.device import DEVICE_HELP

    return click.option("--device", default=None, metavar="DEVICE", help=f"Torch device: {DEVICE_HELP}.")(fn)


def _names(source):
    def complete(ctx, param, incomplete: str):
        return [n for n in source() if n.startswith(incomplete)]
    return complete


def _recipes():
    from edgeres.recipe import list_recipes

    return list_recipes()


def _archs():
    from edgeres.models.registry import list_archs

    return list_archs()


def _datasets():
    from edgeres.recipe import DATASETS

    return list(DATASETS)


# shell completion (click's: `eval "$(_EDGERES_COMPLETE=bash_source edgeres)"`) for the names a user types most
complete_recipe, complete_arch, complete_dataset = _names(_recipes), _names(_archs), _names(_datasets)
