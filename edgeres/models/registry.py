"""Architecture variants as data: a name maps to a spec, a spec builds a model."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from edgeres.errors import ConfigError
from edgeres.suggest import unknown_name


@dataclass(frozen=True)
class ArchSpec:
    name: str
    family: str                 # imagenet | cifar | mnist | densenet
    input_size: int             # the family's native input side
    in_channels: int
    builder: str                # key into BUILDERS
    args: dict[str, Any] = field(default_factory=dict)
    options: dict[str, tuple] = field(default_factory=dict)  # user-selectable option -> allowed values

    def describe(self) -> dict[str, Any]:
        return asdict(self)


IMAGENET = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)), 50: ("bottleneck", (3, 4, 6, 3)),
            101: ("bottleneck", (3, 4, 23, 3)), 152: ("bottleneck", (3, 8, 36, 3))}
CIFAR_DEPTHS = (20, 32, 44, 56, 110, 1202)
VARIANT_PREFIX = {"residual": "", "plain": "plain_", "preact": "preact_"}


def _registry() -> dict[str, ArchSpec]:
    specs: dict[str, ArchSpec] = {}
    for variant, prefix in VARIANT_PREFIX.items():
        for depth, (block, layers) in IMAGENET.items():
            opts = {"stride_in_1x1": (False, True)} if block == "bottleneck" else {}
            specs[f"{prefix}resnet{depth}"] = ArchSpec(
                f"{prefix}resnet{depth}", "imagenet", 224, 3, "resnet",
                dict(block=block, layers=layers, widths=(64, 128, 256, 512), stem="imagenet",
                     variant=variant, shortcut="B"), opts)
        for depth in CIFAR_DEPTHS:
            n = (depth - 2) // 6
            specs[f"{prefix}resnet{depth}"] = ArchSpec(
                f"{prefix}resnet{depth}", "cifar", 32, 3, "resnet",
                dict(block="basic", layers=(n, n, n), widths=(16, 32, 64), stem="cifar", variant=variant,
                     shortcut="A"), {"shortcut": ("A", "B")})
        specs[f"{prefix}mnist_resnet"] = ArchSpec(
            f"{prefix}mnist_resnet", "mnist", 28, 1, "resnet",
            dict(block="basic", layers=(2, 2, 2), widths=(16, 32, 64), stem="cifar", variant=variant,
                 shortcut="B3"))
    return specs


BUILDERS: dict[str, Callable[..., Any]] = {}


def register_builder(name: str, fn: Callable[..., Any]) -> None:
    BUILDERS[name] = fn


ARCHS: dict[str, ArchSpec] = _registry()


def register_arch(spec: ArchSpec) -> None:
    ARCHS[spec.name] = spec


def list_archs() -> list[str]:
    return sorted(ARCHS)


def get_spec(name: str) -> ArchSpec:
    try:
        return ARCHS[name]
    except KeyError:
        # the registry's own order (resnet18, resnet34, ...) for the few names shown when no name is close
        raise ConfigError(unknown_name("architecture", name, ARCHS, list_all="`edgeres archs` lists them")) from None


def resolve_options(spec: ArchSpec, options: dict[str, Any] | None) -> dict[str, Any]:
    """Check user options against the spec's allowed values; return the builder arguments."""
    args = dict(spec.args)
    for key, value in (options or {}).items():
        if key not in spec.options:
            valid = ", ".join(spec.options) or "none"
            raise ConfigError(f"{spec.name} has no option {key!r} (options: {valid})")
        if value not in spec.options[key]:
            raise ConfigError(f"{spec.name}: option {key}={value!r} not in {list(spec.options[key])}")
        args[key] = value
    return args


def create_model(name: str, *, num_classes: int = 1000, in_channels: int | None = None,
                 options: dict[str, Any] | None = None):
    """Build an architecture by registry name. `options` are the spec's selectable variants."""
    spec = get_spec(name)
    if num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
    args = resolve_options(spec, options)
    cin = spec.in_channels if in_channels is None else in_channels
    if cin < 1:
        raise ConfigError(f"in_channels must be >= 1, got {cin}")
    return BUILDERS[spec.builder](num_classes=num_classes, in_channels=cin, **args)


__all__ = ["ArchSpec", "ARCHS", "create_model", "get_spec", "list_archs", "register_arch",
           "register_builder"]
