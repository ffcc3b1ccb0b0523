"""Per-stage output shape, parameters and multiply-accumulates of a model (`edgeres summary`)."""
from __future__ import annotations

from typing import Any

from edgeres.memory import check as check_memory


def _stage_of(name: str) -> str:
    parts = name.split(".")
    top = parts[1] if parts[0] == "features" and len(parts) > 1 else parts[0]   # DenseNet nests under features
    if top.startswith("layer") or top.startswith("denseblock") or top.startswith("transition"):
        return top
    if top in ("fc", "avgpool", "classifier", "bn_final", "norm5"):
        return "head"
    return "stem"


def summarize(model: Any, input_size: int, in_channels: int) -> dict[str, Any]:
    """MACs count conv and linear multiply-adds (the ResNet paper's 'FLOPs'); BN, ReLU and adds are not counted."""
    import torch
    from torch import nn

    macs: dict[str, int] = {}
    shapes: dict[str, list[int]] = {}
    order: list[str] = []
    hooks = []

    def count(module_name: str):
        def hook(mod, inp, out):
            stage = _stage_of(module_name)
            if isinstance(mod, nn.Conv2d):
                k = mod.kernel_size[0] * mod.kernel_size[1] * (mod.in_channels // mod.groups)
                macs[stage] = macs.get(stage, 0) + out.numel() // out.shape[0] * k
            elif isinstance(mod, nn.Linear):
                macs[stage] = macs.get(stage, 0) + mod.in_features * mod.out_features
        return hook

    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            hooks.append(mod.register_forward_hook(count(name)))
    children = list(model.named_children())
    if hasattr(model, "features"):
        children = [(f"features.{n}", c) for n, c in model.features.named_children()] + \
            [(n, c) for n, c in children if n != "features"]
    for name, child in children:
        stage = _stage_of(name)
        if stage not in order:
            order.append(stage)

        def shape_hook(mod, inp, out, stage=stage):
            shapes[stage] = list(out.shape[1:])
        hooks.append(child.register_forward_hook(shape_hook))

    model.eval()
    with torch.no_grad():
        out = model(torch.zeros(1, in_channels, input_size, input_size))
    for h in hooks:
        h.remove()
    shapes["head"] = list(out.shape[1:])
    params: dict[str, int] = {}
    for name, p in model.named_parameters():
        params[_stage_of(name)] = params.get(_stage_of(name), 0) + p.numel()
    stages = [{"stage": s, "output_shape": shapes.get(s), "params": params.get(s, 0), "macs": macs.get(s, 0)}
              for s in order if s in params or s in macs or s in shapes]
    return {"params": sum(p.numel() for p in model.parameters()), "macs": sum(macs.values()), "stages": stages}


def summary(arch: str, *, input_size: int | None = None, num_classes: int = 1000,
            in_channels: int | None = None, options: dict[str, Any] | None = None) -> dict[str, Any]:
    from edgeres.models import create_model, get_spec

    spec = get_spec(arch)
    size = input_size or spec.input_size
    cin = in_channels or spec.in_channels
    check_memory(arch, input_size=size, num_classes=num_classes, in_channels=cin, options=options,
                 lower="--input-size or --num-classes")   # before the model is built: refused, not swapped
    model = create_model(arch, num_classes=num_classes, in_channels=cin, options=options)
    return {"arch": arch, "input_size": size, "in_channels": cin, "num_classes": num_classes,
            **summarize(model, size, cin)}


def format_summary(s: dict[str, Any]) -> str:
    lines = [f"{s['arch']}  input {s['in_channels']}x{s['input_size']}x{s['input_size']}  "
             f"classes {s['num_classes']}",
             f"{'stage':<14}{'output':>18}{'params':>14}{'MACs':>18}"]
    for st in s["stages"]:
        shape = "x".join(map(str, st["output_shape"] or []))
        lines.append(f"{st['stage']:<14}{shape:>18}{st['params']:>14,}{st['macs']:>18,}")
    lines.append(f"{'total':<14}{'':>18}{s['params']:>14,}{s['macs']:>18,}")
    lines.append(f"= {s['params'] / 1e6:.2f} M parameters, {s['macs'] / 1e9:.3f} G multiply-accumulates")
    return "\n".join(lines)
