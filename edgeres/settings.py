"""One description per stage setting.

A stage's Settings dataclass (fold.FoldSettings, quantize.PtqSettings, ...) is the stage's contract: `build`
hashes exactly `asdict(settings)` into the stage's inputs hash and passes that object to the stage's `run`. A field
that comes from the recipe is declared with `setting("quant.calib_size", help=...)`: its default is the recipe
section's default (recipe.py holds every default once), `read(cls, recipe)` fills it from a recipe, and the stage's
CLI command gets a `--calib-size` option generated from it (`options(cls)`), whose value becomes a recipe override.
So `edgeres quantize` without flags reads the same recipe the same way as the ptq stage inside `build`.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any

from edgeres.numbers import FiniteFloat
from edgeres.recipe import CHOICES, RANGES, SECTIONS, Recipe

PREFIX = "recipe__"   # the click parameter names of generated options: recipe__quant__calib_size


def _section_field(key: str) -> dataclasses.Field:
    section, _, name = key.partition(".")
    try:
        return SECTIONS[section].__dataclass_fields__[name]
    except KeyError:
        raise KeyError(f"{key!r} is not a recipe key") from None


def recipe_default(key: str) -> Any:
    """The default of a dotted recipe key, from its section dataclass."""
    f = _section_field(key)
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def setting(key: str, *, help: str, flag: str | None = None, default: Any = dataclasses.MISSING) -> Any:
    """A Settings field read from recipe key `key`; `flag`: its CLI option (default --<name>; "" for none);
    `default`: only where the recipe's default is None and the stage resolves it (QAT's batch size)."""
    name = key.partition(".")[2]
    flag = f"--{name.replace('_', '-')}" if flag is None else flag
    default = recipe_default(key) if default is dataclasses.MISSING else default
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: type(default)(default),
                                 metadata={"recipe": key, "help": help, "flag": flag})
    return dataclasses.field(default=default, metadata={"recipe": key, "help": help, "flag": flag})


def origins_field() -> Any:
    """A Settings field holding where each gates.* limit came from (Recipe.origins), for the gate messages. It is
    not hashed: the same limit set in another place computes the same result."""
    return dataclasses.field(default_factory=dict, compare=False, metadata={"unhashed": True})


def level_field(*, hashed: bool = True) -> Any:
    """The confidence level of the stage's gates (gates.confidence): hashed, since it decides outcomes (the train
    stage excepted: another level never retrains a model; its record keeps the level its gate was decided at)."""
    f = setting("gates.confidence", flag="", help="Confidence level of every gate's interval.")
    if not hashed:
        f.metadata = types.MappingProxyType({**f.metadata, "unhashed": True})
    return f


def hashed(settings) -> dict[str, Any]:
    """asdict(settings) without the unhashed fields: what decides whether a finished stage is reused."""
    unhashed = {f.name for f in dataclasses.fields(settings) if f.metadata.get("unhashed")}
    return {k: v for k, v in dataclasses.asdict(settings).items() if k not in unhashed}


def recipe_fields(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if "recipe" in f.metadata]


def read(cls, recipe: Recipe, **given: Any):
    """`cls` with every recipe-backed field read from `recipe`, the others from `given` (or their defaults)."""
    values = {f.name: recipe.value(f.metadata["recipe"]) for f in recipe_fields(cls) if f.name not in given}
    if "origins" in {f.name for f in dataclasses.fields(cls)} and "origins" not in given:
        values["origins"] = dict(recipe.origins)
    return cls(**values, **given)


def _click_type(key: str):
    import click

    hint = typing.get_type_hints(SECTIONS[key.partition(".")[0]])[key.partition(".")[2]]
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
    if key in CHOICES:
        return click.Choice(CHOICES[key])
    lo, hi = RANGES.get(key, (None, None))
    if base is int:
        return click.IntRange(lo, hi)
    if base is float:   # finite, in range: click's FloatRange would let nan and inf through
        return FiniteFloat(lo, hi)
    return {bool: bool, str: str}.get(base, str)


def _option(key: str, flag: str, help: str):
    import click

    dest = PREFIX + key.replace(".", "__")
    shown = recipe_default(key)
    default_text = "the dataset's own" if shown is None and key.startswith("data.") else \
        "the data batch size" if key == "quant.qat_batch_size" else shown
    text = f"{help} [recipe {key}; built-in default: {default_text}]"
    if _click_type(key) is bool:
        return click.option(f"{flag}/--no-{flag[2:]}", dest, default=None, help=text)
    return click.option(flag, dest, type=_click_type(key), default=None, help=text)


def options(*classes, keys: tuple[tuple[str, str, str], ...] = ()) -> Callable:
    """A click decorator: one option per recipe-backed field of `classes` that has a flag (a key shared by two
    classes gets one option), plus `keys` ((recipe key, flag, help) for inputs such as data.holdout). Each option
    defaults to None: not given, the recipe decides. `overrides(kwargs)` collects the given ones."""
    seen: dict[str, tuple[str, str]] = {}
    for cls in classes:
        for f in recipe_fields(cls):
            if f.metadata["flag"] and f.metadata["recipe"] not in seen:
                seen[f.metadata["recipe"]] = (f.metadata["flag"], f.metadata["help"])
    for key, flag, help in keys:
        seen.setdefault(key, (flag, help))

    def decorate(fn):
        for key, (flag, help) in reversed(list(seen.items())):
            fn = _option(key, flag, help)(fn)
        return fn
    return decorate


def overrides(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Pop the generated options out of a command's kwargs -> {recipe key: value} for those given."""
    out = {}
    for name in [k for k in kwargs if k.startswith(PREFIX)]:
        value = kwargs.pop(name)
        if value is not None:
            out[name[len(PREFIX):].replace("__", ".")] = value
    return out
