"""Checkpoints: weights plus the metadata every later stage needs (arch, preprocessing, class names).

Loading is always `weights_only=True`: no pickled code runs. Accepted layouts: a plain state_dict,
`{"state_dict": ...}`, `{"model": ...}` (torchvision / timm / DDP style), with an optional `module.` prefix.
"""
from __future__ import annotations

import io
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgeres.errors import CheckpointError
from edgeres.io import atomic_write_bytes, require_regular_file
from edgeres.pretrained import published_arch


@dataclass(frozen=True)
class ModelMeta:
    """What travels with a model from training to the device: enough to rebuild and feed it."""

    arch: str
    num_classes: int
    in_channels: int
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...] = ()
    arch_options: dict[str, Any] = field(default_factory=dict)
    resize_size: int | None = None   # eval: resize shorter side to this, then center-crop input_size
    dataset: str = ""
    recipe_hash: str = ""
    data_dir: str | None = None      # where the training data was (absolute), so `eval` needs no --data-dir

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"], d["class_names"] = list(self.mean), list(self.std), list(self.class_names)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "checkpoint") -> ModelMeta:
        known = check_meta({k: d[k] for k in cls.__dataclass_fields__ if k in d}, source)
        try:
            return cls(**known)
        except TypeError as e:
            raise CheckpointError(f"{source} metadata incomplete: {e}") from None

    def create_model(self):
        from edgeres.models import create_model

        return create_model(self.arch, num_classes=self.num_classes, in_channels=self.in_channels,
                            options=self.arch_options)


# Metadata is read from files a user hands over: every value is type- and range-checked before anything sizes an
# allocation or a model from it (a class count of 1e9 would be a 256 GB classifier, an input size of 50000 a 10 GB
# image). The limits are those of the recipe (data.input_size) and of the models edgeres builds.
META_INT_RANGES = {"num_classes": (1, 100_000), "in_channels": (1, 16), "input_size": (8, 4096),
                   "resize_size": (8, 8192)}
META_STRINGS = ("arch", "dataset", "recipe_hash", "data_dir")


def check_meta(d: dict[str, Any], source: str = "checkpoint") -> dict[str, Any]:
    """Type- and range-check the ModelMeta fields present in `d` (from a checkpoint or ONNX metadata); returns
    them normalised (tuples for mean/std/class_names). CheckpointError naming the field otherwise."""
    import math

    out = dict(d)

    def bad(key: str, why: str) -> CheckpointError:
        return CheckpointError(f"{source}: metadata {key} {why}, got {_short(d[key])}")

    for key, (lo, hi) in META_INT_RANGES.items():
        v = d.get(key)
        if v is None and key == "resize_size":
            continue
        if key in d:
            if isinstance(v, bool) or not isinstance(v, int):
                raise bad(key, "must be an integer")
            if not lo <= v <= hi:
                raise bad(key, f"must lie in [{lo}, {hi}]")
    for key in META_STRINGS:
        if key in d and d[key] is not None and not isinstance(d[key], str):
            raise bad(key, "must be a string")
    for key in ("mean", "std"):
        if key in d:
            v = d[key]
            if not isinstance(v, (list, tuple)) or not v or len(v) > 16 or \
                    not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v):
                raise bad(key, "must be a list of 1 to 16 finite numbers")
            if key == "std" and any(x <= 0 for x in v):
                raise bad(key, "must be > 0")
            channels = d.get("in_channels")
            if isinstance(channels, int) and len(v) not in (1, channels):
                raise bad(key, f"needs 1 or {channels} values (one per input channel)")
            out[key] = tuple(float(x) for x in v)
    if "class_names" in d:
        v = d["class_names"]
        if not isinstance(v, (list, tuple)) or len(v) > META_INT_RANGES["num_classes"][1] or \
                not all(isinstance(x, str) for x in v):
            raise bad("class_names", "must be a list of strings, one per class")
        classes = d.get("num_classes")
        if v and isinstance(classes, int) and len(v) != classes:   # a prediction would print another class's name
            raise bad("class_names", f"must name each of the {classes} classes (num_classes), {len(v)} names")
        out["class_names"] = tuple(v)
    if "arch_options" in d and not isinstance(d["arch_options"], dict):
        raise bad("arch_options", "must be a mapping")
    return out


def _short(value: Any, n: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= n else text[:n] + "..."


def check_checkpoints(pretrained: str | Path | None, init_from: str | Path | None, *, arch: str | None) -> None:
    """Read the checkpoints a build was handed (--pretrained, --init-from) before it writes anything into its run
    folder: a broken file, or one made for another architecture than `arch`, is refused with the run left as it
    was."""
    if pretrained:
        load_model(pretrained, arch=arch)
    if init_from:
        _, meta, _ = read_checkpoint(init_from)
        _check_arch(init_from, meta.arch if meta else published_arch(init_from), arch)


def _check_arch(path: str | Path, made_for: str | None, arch: str | None) -> None:
    """One line when a checkpoint's own architecture (edgeres metadata, or a published file's name) is not `arch`."""
    if arch and made_for and made_for != arch:
        raise CheckpointError(f"checkpoint {path} is a {made_for}; pass --arch {made_for} or another checkpoint")


def save_checkpoint(path: str | Path, model_or_state: Any, meta: ModelMeta | None, **extra: Any) -> Path:
    """Atomically write {"state_dict", "meta", **extra}. `extra` must hold only tensors and plain types."""
    import torch

    state = model_or_state.state_dict() if hasattr(model_or_state, "state_dict") else model_or_state
    # tensors saved from the GPU are saved as CPU tensors: a checkpoint loads on any machine (no-op on the CPU)
    if any(isinstance(v, torch.Tensor) and v.device.type != "cpu" for v in state.values()):
        state = {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
    payload = {"state_dict": state, "meta": meta.to_dict() if meta else None, **extra}
    buf = io.BytesIO()
    torch.save(payload, buf)
    return atomic_write_bytes(path, buf.getvalue())


def _load_failure(e: Exception) -> str:
    """The reason torch gives, without its advice to retry with weights_only=False (the unsafe fix)."""
    text = str(e)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and "weights_only" not in ln]
    return (lines[0] if lines else type(e).__name__)[:160].rstrip(".")


# torchvision-era DenseNet files name layers "denselayer1.norm.1"; the modules (and torchvision today) "norm1"
_OLD_DENSENET_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
                               r"([12]\.(?:weight|bias|running_mean|running_var))$")


def _modern_key(key: str) -> str:
    m = _OLD_DENSENET_KEY.match(key)
    return m.group(1) + m.group(2) if m else key


def read_checkpoint(path: str | Path) -> tuple[dict[str, Any], ModelMeta | None, dict[str, Any]]:
    """Return (state_dict, meta or None, the rest of the payload)."""
    import torch

    path = require_regular_file(path, "checkpoint", CheckpointError)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for junk, truncated or unsafe files
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({_load_failure(e)}); edgeres loads "
                              f"only tensors and plain containers and never runs pickled code") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state_dict (a dict of tensors), found {type(obj).__name__}")
    rest: dict[str, Any] = {}
    meta = None
    for key in ("state_dict", "model"):
        if key in obj and isinstance(obj[key], dict):
            rest = {k: v for k, v in obj.items() if k != key}
            obj = obj[key]
            break
    if isinstance(rest.get("meta"), dict):
        meta = ModelMeta.from_dict(rest.pop("meta"), source=str(path))
    odd = next((k for k in obj if not isinstance(k, str)), None)
    if odd is not None:
        raise CheckpointError(f"{path}: state_dict keys must be names (strings), found {_short(odd)}")
    state = {_modern_key(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}
    if not state or not all(hasattr(v, "shape") for v in state.values()):
        raise CheckpointError(f"{path}: no tensors found where the state_dict should be")
    broken = next((k for k, v in state.items()   # a model with them predicts NaN: refused, never run
                   if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v).all()), None)
    if broken is not None:
        raise CheckpointError(f"{path}: tensor {broken} holds NaN or infinite values; refused")
    return state, meta, rest


def load_weights(model: Any, state: dict[str, Any], source: str = "checkpoint") -> None:
    """Strictly load `state` into `model`, reporting every missing/unexpected key and shape mismatch at once."""
    own = model.state_dict()
    # BatchNorm's step counter (PyTorch >= 0.4.1) is absent from older files; torch's own loader fills it in
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} (expected {tuple(own[k].shape)}, found {tuple(state[k].shape)})"
              for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", shapes)):
        if items:
            shown = ", ".join(items[:6]) + (f", ... ({len(items)} in all)" if len(items) > 6 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise CheckpointError(f"{source} does not fit the model: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)


CLASSIFIER_KEYS = ("fc.weight", "fc.bias", "classifier.weight", "classifier.bias")


def num_outputs(model: Any) -> int:
    """Classes a model predicts: its classifier's output features (ResNets: fc, DenseNets: classifier)."""
    head = getattr(model, "fc", None) or getattr(model, "classifier", None)
    return int(head.out_features)


def _check_backbone_fits(own: dict[str, Any], state: dict[str, Any], path) -> None:
    """One line for the two common misfits of a fine-tuning checkpoint: another input channel count, another
    architecture."""
    stem = next((k for k in ("conv1.weight", "features.conv0.weight") if k in own), None)
    if stem and stem in state and getattr(state[stem], "ndim", 0) == 4 and \
            tuple(state[stem].shape[1:2]) != tuple(own[stem].shape[1:2]):
        have, need = int(state[stem].shape[1]), int(own[stem].shape[1])
        raise CheckpointError(f"--init-from {path}: its first convolution takes {have}-channel images, this model's "
                              f"data has {need} channel(s); use weights made for {need}-channel input (or train from "
                              f"scratch without --init-from)")
    missing = [k for k in own if k not in state]
    if len(missing) > len(own) // 2:
        raise CheckpointError(f"--init-from {path}: {len(missing)} of this model's {len(own)} weights are not in it "
                              f"(e.g. {missing[0]}): weights of another architecture; use ones for this --arch")


def load_backbone(model: Any, path: str | Path) -> list[str]:
    """Fine-tuning: load every weight of `path` into `model` except a classifier whose class count differs, which
    keeps its fresh initialisation. Returns the names of the re-initialised tensors. Anything else that does not
    fit (another architecture, other input channels) is an error listing it."""
    state, _, _ = read_checkpoint(path)
    own = model.state_dict()
    _check_backbone_fits(own, state, path)
    fresh = [k for k in CLASSIFIER_KEYS if k in own and k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    kept = {k: v for k, v in state.items() if k not in fresh}
    load_weights(model, {**kept, **{k: own[k] for k in fresh}}, source=str(path))
    return fresh


def load_model(path: str | Path, *, arch: str | None = None, num_classes: int | None = None,
               in_channels: int | None = None, options: dict[str, Any] | None = None):
    """Build and load a model from a checkpoint. Returns (model in eval mode, meta or None).

    edgeres checkpoints carry their metadata; a foreign state_dict needs `arch` (num_classes and
    in_channels are then read off the fc and first conv weights unless given).
    """
    from edgeres.models import create_model

    state, meta, _ = read_checkpoint(path)
    _check_arch(path, meta.arch if meta else published_arch(path), arch)
    if meta is not None and (arch is None or arch == meta.arch):
        asked = {"num_classes": num_classes, "in_channels": in_channels}
        conflicts = [f"{k}={v} (checkpoint: {getattr(meta, k)})" for k, v in asked.items()
                     if v is not None and v != getattr(meta, k)]
        if options and dict(options) != dict(meta.arch_options):
            conflicts.append(f"options={options} (checkpoint: {meta.arch_options})")
        if conflicts:
            raise CheckpointError(f"{path} was saved with different settings: {', '.join(conflicts)}")
        model = meta.create_model()
    else:
        if arch is None:
            raise CheckpointError(f"{path} carries no edgeres metadata; pass --arch")
        fc = state.get("fc.weight", state.get("classifier.weight"))
        conv = state.get("conv1.weight", state.get("features.conv0.weight"))
        nc = num_classes or (int(fc.shape[0]) if fc is not None else 1000)
        cin = in_channels or (int(conv.shape[1]) if conv is not None else None)
        model = create_model(arch, num_classes=nc, in_channels=cin, options=options)
    load_weights(model, state, source=str(path))
    return model.eval(), meta
