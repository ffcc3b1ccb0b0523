"""YAML recipes -> a frozen, validated `Recipe`.

A recipe has six sections (model, data, train, quant, gates, export); every key has a default, so a
recipe file names only what differs. Loading checks every key: an unknown key, a wrong type or an
out-of-range value is a ConfigError naming the key and the file. CLI flags become overrides
(`recipe.with_overrides({"train.epochs": 3})`), validated the same way.

Units: `train.milestones` count epochs when `train.milestone_unit` is "epoch" (the default) and
iterations (optimizer steps) when it is "iteration" (the CIFAR paper recipe: 32000, 48000).
"""
from __future__ import annotations

import dataclasses
import math
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeres.errors import ConfigError
from edgeres.io import read_small_bytes, require_regular_file, sha256_json
from edgeres.metrics import FP32_REL_TOL, INT8_MIN_AGREEMENT
from edgeres.suggest import did_you_mean, unknown_name

DATASETS = ("digits", "mnist", "cifar10", "imagefolder")
AUGMENTS = ("pad_crop", "flip", "random_resized_crop")
OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("multistep", "cosine", "constant")
MILESTONE_UNITS = ("epoch", "iteration")
CALIB_METHODS = ("minmax", "mean_minmax", "percentile", "histogram")


@dataclass(frozen=True)
class ModelCfg:
    arch: str = "resnet18"
    options: dict[str, Any] = field(default_factory=dict)   # arch options, e.g. {"shortcut": "B"}


@dataclass(frozen=True)
class DataCfg:
    dataset: str = "digits"
    data_dir: str | None = None                 # None: digits needs none; mnist/cifar10 use the download cache
    input_size: int | None = None               # None: digits 32, mnist 28, cifar10 32, imagefolder 224
    mean: tuple[float, ...] | None = None       # None: the dataset's statistics
    std: tuple[float, ...] | None = None
    resize_size: int | None = None              # imagefolder eval: shorter side, then center crop (None: input/0.875)
    batch_size: int = 128                       # the GLOBAL batch (split across torchrun processes)
    workers: int = 2                            # DataLoader worker processes (0: load in the main process)
    augment: tuple[str, ...] = ()               # any of pad_crop, flip, random_resized_crop
    pad: int = 4                                # pad_crop padding (pixels per side)
    cache: bool = False                         # decode images once into a uint8 array (small inputs)
    skip_bad_images: bool = False               # skip and count unreadable images instead of failing
    download: bool = True                       # mnist/cifar10: download (with checksums) when missing
    holdout: float = 0.1                        # fraction of the training split held out (seeded by train.seed)
                                                # to select best.pt and QAT's epoch; the test split is only reported
    val_split: float = 0.2                      # imagefolder given as class folders alone (DIR/<class>/*): the share
                                                # of each class set aside as the evaluation split (fixed by file
                                                # names; a train/ + val/ layout keeps its own split)


@dataclass(frozen=True)
class TrainCfg:
    epochs: int = 10
    max_iterations: int | None = None           # stop after this many optimizer steps (None: epochs decide)
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    wd_exclude_bn_bias: bool = False            # no weight decay on BN parameters and biases
    schedule: str = "multistep"
    milestones: tuple[int, ...] = ()            # in `milestone_unit`s
    milestone_unit: str = "epoch"
    gamma: float = 0.1
    warmup_epochs: float = 0.0                  # linear warm-up from warmup_lr to lr (cosine and multistep)
    warmup_lr: float | None = None              # start of the warm-up; with warmup_until_error: the warm-up lr
    warmup_until_error: float | None = None     # ResNet-110 rule: train at warmup_lr until train error (%) < this
    label_smoothing: float = 0.0
    channels_last: bool = False
    amp: bool = False                           # mixed precision, CUDA only (ignored on CPU with a note)
    seed: int = 0
    tensorboard: bool = False                   # also write TensorBoard scalars (needs the tensorboard package)
    init_from: str | None = None                # fine-tune: start from this checkpoint's weights (classifier
                                                # re-initialised when the class count differs)
    backbone_lr_scale: float = 1.0              # lr multiplier for every layer but the classifier (fine-tuning)


@dataclass(frozen=True)
class QuantCfg:
    calib_size: int = 512
    calib_method: str = "percentile"
    qat_epochs: int = 1
    qat_lr: float = 1e-4
    qat_batch_size: int | None = None
    qat_loss: str = "kd"                        # kd: distil the folded FP32 model's logits (KL at qat_temperature);
                                                # kd+ce: half that, half cross-entropy on the labels; ce: labels only
    qat_temperature: float = 1.0
    qat_amp: bool = False                       # CUDA: bf16 autocast around the fake-quant model (off: see README)


@dataclass(frozen=True)
class GatesCfg:
    fold_rel_tol: float = FP32_REL_TOL          # max|logit diff| / logit scale (edgeres/metrics.py)
    export_rel_tol: float = FP32_REL_TOL
    max_drop_ptq: float = 0.5                   # percentage points of top-1 vs FP32
    max_drop_qat: float = 0.2
    min_int8_agreement: float = INT8_MIN_AGREEMENT   # % of evaluation images where INT8 ONNX and fake-quant agree
    int8_agreement_images: int = 2000           # ...measured on at least this many images: the evaluation split, then
                                                # training images (eval transform), so float rounding's near ties
                                                # (0.1-0.5 % of images) cannot decide a 99 % gate
    min_agreement_pct: float = 95.0             # % of evaluation images where an INT8 model's top-1 = FP32's
    probe_size: int = 64
    fp32_over_chance_sigma: float = 3.0         # 0: the FP32 model is not gated against chance; any other value:
                                                # its top-1 must be above chance (100/classes %) by its confidence
                                                # interval (the name is kept so older recipes load)
    fp32_loss_must_fall: bool = True            # a trained run whose last training loss is not below its first fails
    confidence: float = 0.95                    # the level of every gate's confidence interval (edgeres/stats.py)
    int8_rel_tol: float = 0.05                  # INT8 ONNX vs fake-quant: numeric noise (99th percentile of the
                                                # per-image max|logit diff|) relative to the logit scale (a correct
                                                # export: well under 1 %; a wrong scale: tens of %)
    max_class_drop_pp: float = 10.0             # a class whose INT8 top-1 falls by more (interval beyond it) is
                                                # named in the verdict
    min_class_images: int = 10                  # a class with fewer evaluation images is named: its top-1 moves
                                                # by more than 10 pp per image


@dataclass(frozen=True)
class ExportCfg:
    opset: int = 17
    simplify: bool = False
    # the CPU INT8 artifact (edgeres/cpu.py): "qat" = the final INT8 model (the INT8 ONNX TensorRT builds), its
    # post-ReLU activations re-expressed unsigned with the same scales for the CPU's INT8 kernels; "qdq" = that ONNX
    # converted as it is (signed: slower); "openvino" = NNCF's OpenVINO PTQ of the FP32 ONNX (its own model: it does
    # not carry QAT and makes other decisions than the Jetson's model)
    cpu_int8: str = "qat"
    plan_batch: int = 8                         # the device plan's batch (trtexec opt shape; DLA engines: static)


# every limit a gate holds a value to: the direction in which it is strict (a "<=" limit is looser when larger, a
# ">=" limit when smaller) and what it limits, in words. `--gate NAME=VALUE` sets any gates.* key.
GATE_LIMITS: dict[str, tuple[str, str]] = {
    "gates.fold_rel_tol": ("<=", "folded vs unfolded max|logit diff| (relative)"),
    "gates.export_rel_tol": ("<=", "FP32 ONNX vs torch max|logit diff| (relative)"),
    "gates.max_drop_ptq": ("<=", "PTQ top-1 drop vs FP32 (pp)"),
    "gates.max_drop_qat": ("<=", "final INT8 top-1 drop vs FP32 (pp)"),
    "gates.min_int8_agreement": (">=", "INT8 ONNX vs fake-quant decisions beyond numeric noise (%)"),
    "gates.int8_rel_tol": ("<=", "INT8 ONNX vs fake-quant numeric noise (relative)"),
    "gates.min_agreement_pct": (">=", "INT8 top-1 agreement with FP32 (%)"),
    "gates.fp32_over_chance_sigma": (">=", "FP32 above chance (0 = not gated)"),
    "gates.fp32_loss_must_fall": (">=", "training loss must fall"),
    "gates.confidence": (">=", "confidence level of every interval"),
    "gates.max_class_drop_pp": ("<=", "per-class INT8 top-1 drop (pp)"),
    "gates.min_class_images": (">=", "evaluation images per class"),
}


SECTIONS = {"model": ModelCfg, "data": DataCfg, "train": TrainCfg, "quant": QuantCfg, "gates": GatesCfg,
            "export": ExportCfg}

# key -> (low, high, low inclusive?, high inclusive?); None = unbounded
RANGES: dict[str, tuple[float | None, float | None]] = {
    "data.input_size": (8, 4096), "data.resize_size": (8, 8192), "data.batch_size": (1, 1 << 20),
    "data.workers": (0, 256), "data.pad": (0, 512),
    "train.epochs": (1, 100000), "train.max_iterations": (1, None), "train.lr": (1e-12, 100.0),
    "train.momentum": (0.0, 1.0), "train.weight_decay": (0.0, 1.0), "train.gamma": (1e-9, 1.0),
    "train.warmup_epochs": (0.0, 100000), "train.warmup_lr": (0.0, 100.0), "train.warmup_until_error": (0.0, 100.0),
    "train.label_smoothing": (0.0, 0.99), "train.seed": (0, 2**32 - 1),
    "train.backbone_lr_scale": (0.0, 100.0),
    "quant.calib_size": (1, 1 << 24), "quant.qat_epochs": (0, 1000), "quant.qat_lr": (1e-12, 100.0),
    "quant.qat_batch_size": (1, 1 << 20), "quant.qat_temperature": (0.05, 100.0), "data.holdout": (0.0, 0.9),
    "data.val_split": (0.01, 0.9),
    "gates.min_agreement_pct": (0.0, 100.0), "gates.fp32_over_chance_sigma": (0.0, 100.0),
    "gates.fold_rel_tol": (0.0, 1.0), "gates.export_rel_tol": (0.0, 1.0), "gates.max_drop_ptq": (0.0, 100.0),
    "gates.max_drop_qat": (0.0, 100.0), "gates.min_int8_agreement": (0.0, 100.0), "gates.probe_size": (1, 1 << 20),
    "gates.int8_agreement_images": (1, 1 << 24), "gates.confidence": (0.5, 0.9999),
    "gates.int8_rel_tol": (0.0, 1.0), "gates.max_class_drop_pp": (0.0, 100.0), "gates.min_class_images": (0, 1 << 20),
    "export.opset": (13, 23), "export.plan_batch": (1, 4096),
}
CHOICES: dict[str, tuple[str, ...]] = {
    "data.dataset": DATASETS, "data.augment": AUGMENTS, "train.optimizer": OPTIMIZERS,
    "train.schedule": SCHEDULES, "train.milestone_unit": MILESTONE_UNITS, "quant.calib_method": CALIB_METHODS,
    "export.cpu_int8": ("qat", "openvino", "qdq"), "quant.qat_loss": ("kd", "kd+ce", "ce"),
}


def _to_plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class Recipe:
    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataCfg = field(default_factory=DataCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    quant: QuantCfg = field(default_factory=QuantCfg)
    gates: GatesCfg = field(default_factory=GatesCfg)
    export: ExportCfg = field(default_factory=ExportCfg)
    source: str = field(default="<dict>", compare=False)   # where it was loaded from (not part of the hash)
    # where each gates.* key that is not the built-in default was set: "recipe demo", "recipe file x.yaml",
    # "--gate max_drop_qat=2" (not part of the hash: the same limit from another place is the same recipe)
    origins: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {name: _to_plain(dataclasses.asdict(getattr(self, name))) for name in SECTIONS}

    def hash(self) -> str:

        return sha256_json(self.to_dict())

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    def value(self, key: str) -> Any:
        """The value at a dotted key ("quant.calib_size")."""
        section, _, name = key.partition(".")
        return getattr(getattr(self, section), name)

    @property
    def ptq_is_final(self) -> bool:
        """PTQ is the final INT8 model (no QAT after it): then, and only then, its own gates apply."""
        return self.quant.qat_epochs == 0

    def max_drop(self) -> tuple[float, str]:
        """The allowed top-1 drop (pp) of the final INT8 model and the key it comes from: gates.max_drop_qat when
        QAT runs, gates.max_drop_ptq when PTQ is final. (`--max-drop` sets both.)"""
        key = "gates.max_drop_ptq" if self.ptq_is_final else "gates.max_drop_qat"
        return self.value(key), key

    def final_gates(self, gated: bool = True) -> dict[str, Any]:
        """The gates of a final INT8 model (or an engine), as its Settings fields: max_drop and the key it comes from
        (Recipe.max_drop), min_agreement_pct. `gated=False` (a PTQ model that QAT replaces): recorded, not gated."""
        limit, source = self.max_drop()
        return {"max_drop": limit if gated else None, "drop_source": source,
                "min_agreement_pct": self.gates.min_agreement_pct if gated else None}

    def calib_count(self, available: int | None = None) -> int:
        """How many images calibrate: quant.calib_size, or all of a calibration split that holds fewer."""
        return self.quant.calib_size if available is None else min(self.quant.calib_size, available)

    def with_overrides(self, overrides: dict[str, Any], *, keep_none: tuple[str, ...] = (),
                       origins: dict[str, str] | None = None) -> Recipe:
        """Apply dotted overrides ({"train.epochs": 3}); None values are ignored (an unset CLI flag), except for
        the keys in `keep_none`, which None resets to "the dataset's own". `origins`: where each override came
        from (a flag, for the gate messages); a gates.* key without one is said to come from the command line."""
        d = self.to_dict()
        where = dict(self.origins)
        for key, value in overrides.items():
            if value is None and key not in keep_none:
                continue
            section, _, name = key.partition(".")
            if section not in SECTIONS or not name:
                raise ConfigError(f"override {key!r}: expected <section>.<key> with section in {', '.join(SECTIONS)}")
            d[section][name] = _to_plain(value)
            if key in GATE_LIMITS:
                where[key] = (origins or {}).get(key, "the command line")
        return dataclasses.replace(recipe_from_dict(d, source=f"{self.source} + overrides"), origins=where)

    def origin(self, key: str) -> str:
        """Where the value of a gates.* key came from, in words."""
        return self.origins.get(key, "built-in default")

    def loosened(self, reference: Recipe) -> list[dict[str, Any]]:
        """The limits looser than `reference`'s (the shipped recipe the build started from, or the built-in
        defaults): [{key, value, shipped, origin}], for the verdict line, the report and the bundle manifest."""
        out = []
        for key, (op, what) in GATE_LIMITS.items():
            value, ref = self.value(key), reference.value(key)
            looser = value > ref if op == "<=" else value < ref
            if looser:
                out.append({"key": key, "what": what, "value": value, "shipped": ref, "origin": self.origin(key)})
        return out


def _short(value: Any, n: int = 80) -> str:
    """repr for an error message, cut short (a value can be megabytes of nested lists)."""
    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxdict, r.maxstring, r.maxother = 3, 6, 6, n, n
    text = r.repr(value)
    return text if len(text) <= n else text[:n] + "..."


def _check_value(key: str, value: Any, tp: Any, source: str) -> Any:
    """Coerce/check one value against its annotation; return the stored value."""
    where = f"{source}: {key}"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _check_value(key, value, args[0], source)
    if tp is int and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where} must be an integer, got {_short(value)}")
    if value is None:
        raise ConfigError(f"{where} must not be null")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {_short(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {_short(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {_short(value)}")
        if not math.isfinite(value):   # NaN passes every range check (all comparisons are false): refuse it here
            raise ConfigError(f"{where} must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {_short(value)}")
        return value
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {_short(value)}")
        item = typing.get_args(tp)[0]
        return tuple(_check_value(f"{key}[{i}]", v, item, source) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {_short(value)}")
        return dict(value)
    raise ConfigError(f"{where}: unsupported type {tp}")  # pragma: no cover - a bug in the dataclasses


def _check_range(key: str, value: Any, source: str) -> None:
    if key in RANGES and value is not None:
        lo, hi = RANGES[key]
        for v in (value if isinstance(value, tuple) else (value,)):
            if (lo is not None and v < lo) or (hi is not None and v > hi):
                bounds = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
                raise ConfigError(f"{source}: {key}={_short(v)} is out of range {bounds}")
    if key in CHOICES and value is not None:
        for v in (value if isinstance(value, tuple) else (value,)):
            if v not in CHOICES[key]:
                raise ConfigError(f"{source}: {key}={_short(v)} is not one of {', '.join(CHOICES[key])}"
                                  + did_you_mean(str(v), CHOICES[key]))


def _build_section(name: str, cls: type, raw: Any, source: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: section {name!r} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(raw) - set(hints))
    if unknown:
        raise ConfigError(f"{source}: unknown key {name}.{unknown[0]} (valid keys in {name}: {', '.join(hints)})")
    values = {}
    for key, value in raw.items():
        dotted = f"{name}.{key}"
        values[key] = _check_value(dotted, value, hints[key], source)
        _check_range(dotted, values[key], source)
    return cls(**values)


def _check_combinations(r: Recipe, source: str) -> None:
    d, t = r.data, r.train
    for key in ("mean", "std"):
        v = getattr(d, key)
        if v is not None and len(v) not in (1, 3):
            raise ConfigError(f"{source}: data.{key} needs 1 or 3 values, got {len(v)}")
    if d.std is not None and any(s <= 0 for s in d.std):
        raise ConfigError(f"{source}: data.std values must be > 0, got {list(d.std)}")
    if "pad_crop" in d.augment and "random_resized_crop" in d.augment:
        raise ConfigError(f"{source}: data.augment: pad_crop and random_resized_crop are exclusive")
    if list(t.milestones) != sorted(t.milestones):
        raise ConfigError(f"{source}: train.milestones must be increasing, got {list(t.milestones)}")
    if t.warmup_until_error is not None and t.warmup_lr is None:
        raise ConfigError(f"{source}: train.warmup_until_error needs train.warmup_lr")
    if t.nesterov and (t.optimizer != "sgd" or t.momentum == 0):
        raise ConfigError(f"{source}: train.nesterov needs optimizer sgd with momentum > 0")


def recipe_from_dict(d: dict[str, Any], source: str = "<dict>") -> Recipe:
    """Validate a plain dict (e.g. parsed YAML) into a Recipe. Missing sections/keys take defaults."""
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: a recipe must be a mapping of sections, got {type(d).__name__}")
    unknown = sorted(set(d) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{source}: unknown key {unknown[0]!r} (valid sections: {', '.join(SECTIONS)})")
    sections = {name: _build_section(name, cls, d.get(name), source) for name, cls in SECTIONS.items()}
    recipe = Recipe(**sections, source=source)
    _check_combinations(recipe, source)
    return recipe


MAX_RECIPE_BYTES = 1 << 20    # a recipe is a page of settings
MAX_YAML_NODES = 100_000       # nodes after alias expansion: a billion-laughs file is refused before anything walks it
MAX_YAML_DEPTH = 50


def parse_yaml(text: str, source: str) -> Any:
    """yaml.safe_load with alias expansion bounded: the node graph is composed (linear in the text; aliases are
    shared nodes), its expanded size and depth are counted with memoisation, and only a graph within MAX_YAML_NODES
    and MAX_YAML_DEPTH is constructed into Python objects."""
    import yaml

    loader = yaml.SafeLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:
            raise ConfigError(f"{source}: nested too deeply (more than {MAX_YAML_DEPTH} levels)") from None
        if node is None:
            return None
        _check_yaml_size(node, source)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _check_yaml_size(root: Any, source: str) -> None:
    import yaml

    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        if id(node) in size:
            continue
        if isinstance(node, yaml.ScalarNode):
            size[id(node)], depth[id(node)] = 1, 1
            continue
        children = [c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode) else node.value
        if not done:
            if id(node) in depth:   # on the stack already: a recursive alias
                raise ConfigError(f"{source}: a YAML alias refers to itself; not a recipe")
            depth[id(node)] = -1
            stack.append((node, True))
            stack.extend((c, False) for c in children if id(c) not in size)
            continue
        size[id(node)] = 1 + sum(size[id(c)] for c in children)
        depth[id(node)] = 1 + max((depth[id(c)] for c in children), default=0)
        if size[id(node)] > MAX_YAML_NODES:
            raise ConfigError(f"{source}: expands to more than {MAX_YAML_NODES} YAML nodes (aliases included); "
                              f"a recipe is a page of settings, not this")
        if depth[id(node)] > MAX_YAML_DEPTH:
            raise ConfigError(f"{source}: nested too deeply (more than {MAX_YAML_DEPTH} levels)")


def recipes_dir() -> Path:
    """The built-in recipes: edgeres/recipes/*.yaml, package data, so a wheel carries them."""
    return Path(__file__).resolve().parent / "recipes"


def list_recipes() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


def load_recipe(name_or_path: str | Path) -> Recipe:
    """Load a built-in recipe by name (`edgeres/recipes/<name>.yaml`) or a YAML file path."""
    import yaml

    text = str(name_or_path)
    path = Path(text)
    if not (path.suffix in (".yaml", ".yml") or "/" in text or path.exists()):
        path = recipes_dir() / f"{text}.yaml"
        if not path.is_file():
            raise ConfigError(unknown_name("recipe", text, list_recipes(), shown=20))
    require_regular_file(path, "recipe file")
    try:
        raw = parse_yaml(read_small_bytes(path, "recipe", limit=MAX_RECIPE_BYTES).decode("utf-8"), str(path))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a YAML text file (byte {e.start} is not UTF-8)") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    recipe = recipe_from_dict(raw, source=str(path))
    where = f"recipe {text}" if path.parent == recipes_dir() and path.stem == text else f"recipe file {path}"
    gates = raw.get("gates") if isinstance(raw, dict) else None
    return dataclasses.replace(recipe, origins={f"gates.{k}": where for k in (gates or {})})


def shipped_reference(name_or_path: str | Path) -> Recipe:
    """What a build's limits are compared with to call them loosened: the built-in recipe of that name, or the
    built-in defaults for a recipe file of the user's."""
    text = str(name_or_path)
    if text in list_recipes() and not Path(text).exists():
        return load_recipe(text)
    return Recipe()


def gate_overrides(pairs: tuple[str, ...] | list[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """`--gate NAME=VALUE` pairs -> ({"gates.NAME": value}, {"gates.NAME": "--gate NAME=VALUE"}). VALUE is read as
    a YAML scalar (a number, true/false); its type and range are checked with the recipe's own rules."""
    import yaml

    names = list(GatesCfg.__dataclass_fields__)
    values, origins = {}, {}
    for pair in pairs:
        name, eq, raw = pair.partition("=")
        name = name.strip().removeprefix("gates.")
        if not eq or not name or not raw.strip():
            raise ConfigError(f"--gate {pair!r}: expected NAME=VALUE, e.g. --gate max_drop_qat=0.5")
        if name not in names:
            raise ConfigError(f"--gate {pair!r}: " + unknown_name("gate", name, names, shown=len(names)))
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        key = f"gates.{name}"
        values[key] = value
        origins[key] = f"--gate {name}={raw.strip()}"
    return values, origins


# a dataset given on the command line brings its own input size, statistics and augmentation, unless given too
DATASET_AUGMENT = {"digits": ("pad_crop",), "mnist": ("pad_crop",), "cifar10": ("pad_crop", "flip"),
                   "imagefolder": ("random_resized_crop", "flip")}


DATASET_OWN = ("data.input_size", "data.mean", "data.std", "data.resize_size")   # None: the dataset's own


def for_dataset(recipe, dataset: str | None, overrides: dict[str, Any], origins: dict[str, str] | None = None):
    """`recipe` with `overrides` (None values: not given). A `dataset` other than the recipe's starts the data
    settings from that dataset's own defaults (the recipe's were chosen for its own dataset, e.g. the demo's 32 px
    digits): input size, statistics, padding and augmentation, unless given too. `build` and `train` both use it."""
    if not dataset or dataset == recipe.data.dataset:
        return recipe.with_overrides(overrides, origins=origins)
    reset = {**dict.fromkeys(DATASET_OWN), "data.pad": DataCfg.pad,
             "data.augment": DATASET_AUGMENT.get(dataset, ()), "data.dataset": dataset}
    given = {k: v for k, v in overrides.items() if v is not None}
    return recipe.with_overrides({**reset, **given}, keep_none=DATASET_OWN, origins=origins)


__all__ = ["Recipe", "ModelCfg", "DataCfg", "TrainCfg", "QuantCfg", "GatesCfg", "ExportCfg", "load_recipe",
           "recipe_from_dict", "list_recipes", "recipes_dir"]
