"""Shared CLI pieces: output helpers and option decorators. Commands stay thin: parse, call, print."""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from edgeres.data.infer import not_a_folder
from edgeres.device import DEVICE_HELP
from edgeres.recipe import DATASETS, GATE_LIMITS, GatesCfg, for_dataset, gate_overrides, list_recipes, load_recipe


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

    return click.option("--device", default=None, metavar="DEVICE", help=f"Torch device: {DEVICE_HELP}.")(fn)


def _names(source):
    def complete(ctx, param, incomplete: str):
        return [n for n in source() if n.startswith(incomplete)]
    return complete


def _recipes():

    return list_recipes()


def _archs():
    from edgeres.models.registry import list_archs

    return list_archs()


def _datasets():

    return list(DATASETS)


# shell completion (click's: `eval "$(_EDGERES_COMPLETE=bash_source edgeres)"`) for the names a user types most
complete_recipe, complete_arch, complete_dataset = _names(_recipes), _names(_archs), _names(_datasets)


def _gate_help() -> str:
    names = ", ".join(f"{n} ({GATE_LIMITS[f'gates.{n}'][1]})" if f"gates.{n}" in GATE_LIMITS else n
                      for n in GatesCfg.__dataclass_fields__)
    return (f"Set any gate's limit, e.g. --gate max_drop_qat=0.5 --gate confidence=0.9 (repeatable; a recipe "
            f"gates.NAME override, named in the verdict when looser than the shipped recipe's). NAME: {names}.")


class DataDir(click.ParamType):
    """--data-dir: a folder. A file or an archive given instead is one line saying what to do (a file: `edgeres
    predict` classifies it; an archive: unpack it first); a folder that does not exist yet passes (a download
    target, or the dataset loader says it is missing)."""

    name = "folder"

    def convert(self, value, param, ctx):
        problem = not_a_folder(value)
        if problem and Path(value).expanduser().exists():
            self.fail(problem.removeprefix("--data-dir "), param, ctx)
        return value


DATA_DIR = DataDir()


def gate_option(fn):
    """--gate NAME=VALUE (repeatable): any gates.* key of the recipe, from the command line (recipe.gate_overrides)."""
    return click.option("--gate", "gates", multiple=True, metavar="NAME=VALUE", help=_gate_help())(fn)


def recipe_option(fn):
    """--recipe of a stage command: where its settings' defaults come from (edgeres.settings)."""
    return click.option(
        "--recipe", "recipe_name", default=None, shell_complete=complete_recipe,
        help="Recipe the stage's settings are read from, as `build` reads them (a built-in name or a YAML file) "
             "[default: the recipe.yaml of the run the input comes from, else the built-in demo recipe]. Flags "
             "override its values.")(fn)


def run_of(artifact: str | None):
    """The run folder an artifact was written in (RUN/<stage>/<file> beside RUN/recipe.yaml), else None."""
    from pathlib import Path

    if not artifact:
        return None
    run = Path(artifact).resolve().parent.parent
    return run if (run / "recipe.yaml").is_file() and (run / "stages.jsonl").is_file() else None


def stage_recipe(recipe_name: str | None, artifact: str | None, dataset: str | None, overrides: dict[str, Any],
                 *, say: Callable[[str], None] | None = None, gates: tuple[str, ...] = (),
                 origins: dict[str, str] | None = None):
    """The recipe a stage command runs with -> (recipe, dataset, data_dir or None): --recipe, else the recipe.yaml
    of the run `artifact` comes from (so the command without flags is that stage of the build), else the demo
    recipe; adapted to `dataset` (recipe.for_dataset) and to the flags given (`overrides`). `dataset`: given, else
    the run's own (None when there is no run: the command decides); --data-dir comes in `overrides`
    ("data.data_dir"); `gates`: --gate NAME=VALUE pairs; `origins`: the flag each other gates.* override came from."""

    run = run_of(artifact) if recipe_name is None else None
    source = str(run / "recipe.yaml") if run is not None else (recipe_name or "demo")
    values, origins_ = gate_overrides(gates)
    recipe = for_dataset(load_recipe(source), dataset, {**overrides, **values}, origins={**(origins or {}), **origins_})
    if say is not None and run is not None:
        say(f"settings: {source} (the run {Path(artifact).name} comes from; --recipe to choose another)")
    if dataset is None and run is None:
        return recipe, None, None
    return recipe, recipe.data.dataset, recipe.data.data_dir
