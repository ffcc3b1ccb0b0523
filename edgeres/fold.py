"""BatchNorm folding, found on the traced graph (torch.fx), not by module names.

A BatchNorm whose input is the output of a Conv2d used by nothing else is folded into that conv:
the conv's weight is scaled per output channel and it gains a bias; the BatchNorm becomes an Identity.
Every other BatchNorm (pre-activation ResNets: BN before a conv or after a residual add; DenseNet: BN
after a concatenation) cannot be folded into a preceding conv, so it becomes a `ChannelAffine`
(x * scale + shift per channel), which ONNX exports as Mul + Add and TensorRT fuses into its neighbours.

The folded model keeps the original class and module names (so NNCF, ONNX export and checkpoints see
the same structure); `load_folded` rebuilds it from ModelMeta by running the same fold on a fresh model.
"""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeres.checkpoint import load_weights, read_checkpoint, save_checkpoint
from edgeres.device import exact_math
from edgeres.errors import CheckpointError, EdgeresError
from edgeres.io import rejected_path
from edgeres.metrics import FP32_REL_TOL, compare_logits
from edgeres.records import Gate, StageRecord, StageResult
from edgeres.settings import origins_field, read, setting

FOLDED_FORMAT = "edgeres-folded-1"


@dataclass(frozen=True)
class FoldResult:
    model: Any                                  # the folded nn.Module (eval mode)
    folded: list[str] = field(default_factory=list)        # BN names folded into the conv before them
    kept_affine: list[str] = field(default_factory=list)   # BN names kept as per-channel scale-and-shift
    reasons: dict[str, str] = field(default_factory=dict)  # kept BN name -> why it could not be folded

    def describe(self) -> str:
        lines = [f"folded {len(self.folded)} BatchNorm(s) into the preceding conv"]
        if self.kept_affine:
            lines.append(f"kept {len(self.kept_affine)} BatchNorm(s) as per-channel scale-and-shift "
                         "(Mul+Add, fused by TensorRT) because no conv directly precedes them:")
            lines += [f"  {name}: {self.reasons.get(name, '')}" for name in self.kept_affine]
        return "\n".join(lines)


@functools.cache
def _affine_class():
    import torch
    from torch import nn

    class ChannelAffine(nn.Module):
        """y = x * scale + shift per channel (a BatchNorm in eval mode that no conv precedes)."""

        def __init__(self, num_features: int):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(num_features))
            self.shift = nn.Parameter(torch.zeros(num_features))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            shape = (1, -1) + (1,) * (x.dim() - 2)
            return x * self.scale.view(shape) + self.shift.view(shape)

    return ChannelAffine


def channel_affine(num_features: int):
    return _affine_class()(num_features)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


def plan_fold(model) -> list[tuple[str, str | None, str]]:
    """[(bn_name, conv_name or None, reason if not foldable)] in graph order, from a torch.fx trace."""
    import torch.fx
    from torch import nn

    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as e:  # fx raises many types for untraceable control flow
        raise EdgeresError(f"cannot trace {type(model).__name__} to find its BatchNorms: {_first_line(e)}") from None
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    plan: list[tuple[str, str | None, str]] = []
    seen: set[str] = set()
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
            continue
        name = node.target
        if name in seen:
            continue
        seen.add(name)
        src = node.args[0] if node.args else None
        bn = modules[name]
        reason = ""
        if calls[name] != 1:
            reason = f"called {calls[name]} times"
        elif not isinstance(src, torch.fx.Node):
            reason = "input is not a tensor from the graph"
        elif src.op != "call_module" or not isinstance(modules.get(src.target), nn.Conv2d):
            what = src.target if src.op in ("call_module", "call_function", "call_method") else src.op
            what = getattr(what, "__name__", what)
            reason = f"follows {what}, not a conv"
        elif len(src.users) != 1 or calls[src.target] != 1:
            reason = f"the conv before it ({src.target}) is used elsewhere too"
        elif modules[src.target].out_channels != bn.num_features:
            reason = "channel count differs from the conv before it"
        plan.append((name, None if reason else src.target, reason))
    return plan


def _set_module(model, name: str, module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def fold_batchnorm(model) -> FoldResult:
    """Fold every foldable BatchNorm2d into the conv before it; turn the rest into ChannelAffine.

    Works on a copy (the given model is untouched). Raises EdgeresError when the model has no BatchNorm.
    """
    import torch
    from torch import nn

    model = copy.deepcopy(model).eval()
    plan = plan_fold(model)
    if not plan:
        raise EdgeresError(f"nothing to fold: {type(model).__name__} has no BatchNorm2d in its forward graph")
    folded, kept, reasons = [], [], {}
    with torch.no_grad():
        for bn_name, conv_name, reason in plan:
            bn = model.get_submodule(bn_name)
            var = bn.running_var.double()
            mean = bn.running_mean.double()
            gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(var)
            beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(var)
            scale = gamma / torch.sqrt(var + bn.eps)
            shift = beta - mean * scale
            if conv_name is not None:
                conv: nn.Conv2d = model.get_submodule(conv_name)
                w = conv.weight.double() * scale.view(-1, *([1] * (conv.weight.dim() - 1)))
                b = conv.bias.double() if conv.bias is not None else torch.zeros_like(var)
                conv.weight.copy_(w.to(conv.weight.dtype))
                new_bias = (b * scale + shift).to(conv.weight.dtype)
                if conv.bias is None:
                    conv.bias = nn.Parameter(new_bias)
                else:
                    conv.bias.copy_(new_bias)
                _set_module(model, bn_name, nn.Identity())
                folded.append(bn_name)
            else:
                affine = channel_affine(bn.num_features).to(bn.running_var.device)
                affine.scale.copy_(scale.float())
                affine.shift.copy_(shift.float())
                _set_module(model, bn_name, affine)
                kept.append(bn_name)
                reasons[bn_name] = reason
    return FoldResult(model=model.eval(), folded=folded, kept_affine=kept, reasons=reasons)


def has_batchnorm(model) -> bool:
    from torch import nn

    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def torch_logits(model, x, batch_size: int = 64):
    import numpy as np
    import torch

    x = torch.as_tensor(np.asarray(x, dtype=np.float32))
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    outs = []
    was_training = model.training
    model.eval()
    with torch.no_grad(), exact_math(device):   # plain FP32 on the GPU too: the fold check compares closely
        for i in range(0, len(x), batch_size):
            outs.append(model(x[i:i + batch_size].to(device)).float().cpu().numpy())
    model.train(was_training)
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def fold_gate(reference, folded, probe_x, *, rel_tol: float = FP32_REL_TOL, origins: dict | None = None):
    """Compare the folded model with the unfolded one on a probe batch: the same function, so both gates are exact
    (max|logit diff| relative to the logit scale; no decisive top-1 flip, a near tie within the tolerance aside).
    Returns (metrics, [Gate])."""

    metrics = compare_logits(torch_logits(reference, probe_x), torch_logits(folded, probe_x), near_tie_rel=rel_tol)
    n = metrics["n_probe"]
    source = (origins or {}).get("gates.fold_rel_tol", "built-in default")
    gates = [Gate("fold_max_abs_diff_rel", metrics["rel_diff"], rel_tol, "<=", n=n, key="gates.fold_rel_tol",
                  source=source, what="folded vs unfolded max|logit diff| / logit scale"),
             Gate("fold_decisive_flips", metrics["decisive_flips"], 0, "<=", n=n,
                  what=f"top-1 flips folded vs unfolded beyond near ties ({metrics['flips']} flips in all)")]
    return metrics, gates


def save_folded(path: str | Path, fold_result: FoldResult, meta) -> Path:
    """Write the folded weights + ModelMeta + which BNs were folded/kept (atomic)."""

    info = {"format": FOLDED_FORMAT, "folded": list(fold_result.folded), "kept_affine": list(fold_result.kept_affine)}
    return save_checkpoint(path, fold_result.model, meta, fold=info)


def load_folded(path: str | Path):
    """Rebuild the arch from the checkpoint's ModelMeta, apply the same fold, load the weights. -> (model, meta)."""

    state, meta, rest = read_checkpoint(path)
    info = rest.get("fold")
    if not isinstance(info, dict) or info.get("format") != FOLDED_FORMAT:
        raise CheckpointError(f"{path} is not a folded checkpoint (make one with `edgeres fold`)")
    if meta is None:
        raise CheckpointError(f"{path} carries no model metadata")
    result = fold_batchnorm(meta.create_model())
    if list(result.folded) != list(info.get("folded", [])) or \
            list(result.kept_affine) != list(info.get("kept_affine", [])):
        raise CheckpointError(f"{path}: its fold plan does not match {meta.arch} as built now")
    load_weights(result.model, state, source=str(path))
    return result.model.eval(), meta


# ---------------------------------------------------------------------------------------------------- the stage

@dataclass(frozen=True)
class FoldInputs:
    model: Any          # the trained FP32 model (left as it is)
    meta: Any           # its ModelMeta
    probe: Any          # float32 [N, C, H, W]: the images the fold is checked on
    out: Path           # the folded checkpoint to write


@dataclass(frozen=True)
class FoldSettings:
    rel_tol: float = setting("gates.fold_rel_tol", help="Largest max|logit diff| allowed, relative to the "
                                                            "logit scale.")
    probe_size: int = setting("gates.probe_size", help="Images in the probe batch the fold is checked on.")
    origins: dict = origins_field()

    @classmethod
    def from_recipe(cls, recipe) -> FoldSettings:
        return read(cls, recipe)


@dataclass(frozen=True)
class FoldOutput:
    model: Any          # the folded model (eval mode)
    meta: Any
    result: FoldResult | None = None   # which BNs were folded / kept (None when loaded from a checkpoint)

    @classmethod
    def load(cls, path: str | Path) -> FoldOutput:
        model, meta = load_folded(path)
        return cls(model, meta)


def run(inputs: FoldInputs, settings: FoldSettings = FoldSettings(), *, quiet: bool = True):
    """The fold stage: fold, check against the unfolded model on the probe, and only then write the checkpoint.
    -> StageResult[FoldOutput]"""
    import torch

    result = fold_batchnorm(inputs.model)
    metrics, gates = fold_gate(inputs.model, result.model, torch.as_tensor(inputs.probe), rel_tol=settings.rel_tol,
                               origins=settings.origins)
    rec = StageRecord(stage="fold", metrics={**metrics, "folded": len(result.folded),
                                             "kept_affine": list(result.kept_affine)})
    for g in gates:
        rec.add_gate(g)
    if rec.passed:
        save_folded(inputs.out, result, inputs.meta)
        rec.set_artifact(inputs.out)
    else:   # kept beside the output for inspection; the output path keeps what it had
        rejected = save_folded(rejected_path(inputs.out), result, inputs.meta)
        rec.extra_artifacts["rejected"] = str(rejected)
        rec.message += f"; {Path(inputs.out).name} not written, the rejected model is {rejected}"
    return StageResult(rec, FoldOutput(result.model, inputs.meta, result))
