"""The degradation experiment (He et al. 2016, Fig. 1 and 6): plain vs residual nets of growing depth.

Every (variant, depth) net is trained with the same recipe, the same initial weights for plain and residual
twins (option-A shortcuts have no parameters, and each net is built right after `torch.manual_seed(seed)`),
and the same batches in the same order. We record the running training error over the last `eval_every`
iterations and the test error every `eval_every` iterations, and plot both against iterations on one figure:
thin lines training error, bold lines test error, plain nets left, ResNets right.

Depths are any 6n+2 (8, 14, 20, ...): the net is the registry's CIFAR ResNet (the `resnet20` /
`plain_resnet20` spec) with n blocks per stage, so registered depths are exactly `create_model("resnet56")`
etc., and small depths (8, 14) need no registry entries.

The schedule is the paper's scaled to `iterations`: SGD, lr 0.1 divided by 10 at 50% and 75% of the run
(32k and 48k of 64k in the paper), momentum 0.9, weight decay 1e-4 on every parameter, batch 128.

Outputs in `out/`: curves.json, curves.csv, degradation.png/.svg (the curves), gradients.png/.svg
(per-layer gradient norms on the first batch(es), before any update).
"""
from __future__ import annotations

import copy
import csv
import io
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from edgeres import stats
from edgeres.data import get_data, make_loader
from edgeres.env import environment
from edgeres.errors import ConfigError
from edgeres.io import atomic_path, atomic_write_json, atomic_write_text, refuse_overwrite
from edgeres.loop import Step, sgd_steps

FILES = {"json": "curves.json", "csv": "curves.csv", "figure": "degradation.png", "figure_svg": "degradation.svg",
         "gradients": "gradients.png", "gradients_svg": "gradients.svg"}
CSV_FIELDS = ("variant", "depth", "arch", "iteration", "lr", "train_error", "train_loss", "test_error")
PAPER_AUGMENT = {"cifar10": ("pad_crop", "flip"), "mnist": ("pad_crop",), "digits": ("pad_crop",),
                 "imagefolder": ("pad_crop", "flip")}


class Variant(str, Enum):
    PLAIN = "plain"
    RESIDUAL = "residual"

    @property
    def template(self) -> str:
        return "plain_resnet20" if self is Variant.PLAIN else "resnet20"

    def arch(self, depth: int) -> str:
        return f"{'plain_' if self is Variant.PLAIN else ''}resnet{depth}"


@dataclass(frozen=True)
class DegradationConfig:
    depths: tuple[int, ...] = (20, 56)
    dataset: str = "cifar10"
    data_dir: str | None = None
    input_size: int | None = None        # default: the dataset's native side
    iterations: int = 64_000
    eval_every: int = 500
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    milestones: tuple[float, ...] = (0.5, 0.75)   # fractions of `iterations` where lr is divided by 10
    augment: bool = True                 # pad-and-crop (+ flip on CIFAR-10), as in the paper
    test_images: int | None = None       # evaluate on the first N test images (None: all)
    grad_batches: int = 1                # batches averaged for the start-of-training gradient norms
    seed: int = 0


def parse_depths(depths: Any) -> tuple[int, ...]:
    """'20,56' or (20, 56) -> sorted distinct depths, each 6n+2 with n >= 1; one clear error otherwise."""
    if isinstance(depths, str):
        try:
            values = [int(v) for v in depths.split(",") if v.strip()]
        except ValueError:
            raise ConfigError(f"--depths: expected comma-separated integers like 20,56, got {depths!r}") from None
    else:
        values = [int(v) for v in depths]
    bad = [d for d in values if d < 8 or (d - 2) % 6]
    if bad:
        raise ConfigError(f"--depths: {', '.join(map(str, bad))} not of the form 6n+2 with n >= 1 "
                          f"(CIFAR ResNet depths: 8, 14, 20, 26, 32, 44, 56, 110, ...)")
    out = tuple(sorted(set(values)))
    if len(out) < 2:
        raise ConfigError(f"--depths: give at least two different depths to compare, got {depths!r}")
    return out


def validate(cfg: DegradationConfig) -> DegradationConfig:
    cfg = DegradationConfig(**{**asdict(cfg), "depths": parse_depths(cfg.depths)})
    for name in ("iterations", "eval_every", "batch_size", "grad_batches"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.eval_every > cfg.iterations:
        raise ConfigError(f"--eval-every ({cfg.eval_every}) is larger than --iterations ({cfg.iterations})")
    if cfg.lr <= 0 or cfg.weight_decay < 0 or not 0 <= cfg.momentum < 1:
        raise ConfigError("need lr > 0, weight decay >= 0 and 0 <= momentum < 1")
    if any(not 0 < m < 1 for m in cfg.milestones):
        raise ConfigError(f"--lr-steps are fractions of the run strictly between 0 and 1, got {list(cfg.milestones)}")
    if cfg.test_images is not None and cfg.test_images < 1:
        raise ConfigError(f"--test-images must be >= 1, got {cfg.test_images}")
    return cfg


def cifar_resnet(depth: int, *, variant: Variant, num_classes: int, in_channels: int):
    """The registry's CIFAR ResNet of any depth 6n+2 (option-A shortcuts; plain twins have none)."""
    from edgeres.models.registry import BUILDERS, get_spec

    if depth < 8 or (depth - 2) % 6:
        raise ConfigError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
    n = (depth - 2) // 6
    spec = get_spec(variant.template)
    return BUILDERS[spec.builder](num_classes=num_classes, in_channels=in_channels, **{**spec.args, "layers": (n,) * 3})


def step_lr(cfg: DegradationConfig, iteration: int) -> float:
    """Step schedule: lr / 10 at each milestone fraction of the run (iteration is 0-based)."""
    passed = sum(iteration >= round(m * cfg.iterations) for m in cfg.milestones)
    return cfg.lr * 0.1 ** passed


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def weight_layers(model) -> list[tuple[str, Any]]:
    """Conv and fc weights in forward order: the 'layers' of the paper's depth count."""
    return [(name[: -len(".weight")], p) for name, p in model.named_parameters()
            if name.endswith(".weight") and p.dim() in (2, 4)]


def gradient_norms(model, batches: list) -> dict[str, Any]:
    """Per-layer L2 norm of dLoss/dW on the first batch(es), before any update; the model is left unchanged."""
    import torch
    import torch.nn.functional as F

    state = copy.deepcopy(model.state_dict())   # train-mode forwards move BN running stats: restore them
    model.train()
    model.zero_grad(set_to_none=True)
    device = next(model.parameters()).device
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        (F.cross_entropy(model(x), y) / len(batches)).backward()
    layers = weight_layers(model)
    norms = [float(p.grad.norm()) for _, p in layers]
    model.load_state_dict(state)
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        weights = [float(p.norm()) for _, p in layers]
    return {"layers": [n for n, _ in layers], "grad_norm": norms, "weight_norm": weights,
            "first_to_last_ratio": norms[0] / norms[-1] if norms[-1] > 0 else None}


def error_rate(model, x_test, y_test, batch: int = 500) -> float:
    """The share of test images the model gets wrong (the paper's error rate)."""
    import torch

    model.eval()
    wrong = 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for i in range(0, len(x_test), batch):
            pred = model(x_test[i:i + batch].to(device)).argmax(1).cpu()
            wrong += int((pred != y_test[i:i + batch]).sum())
    model.train()
    return wrong / len(x_test)


def train_curve(model, data, x_test, y_test, cfg: DegradationConfig, *, label: str,
                log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train for cfg.iterations; every eval_every iterations record the running train error and the test error."""
    import torch
    import torch.nn.functional as F

    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    curve: dict[str, list] = {k: [] for k in ("iteration", "lr", "train_error", "train_loss", "test_error",
                                              "train_seen")}
    window = {"wrong": 0, "seen": 0, "loss_sum": 0.0}
    diverged = False
    it = epoch = 0
    start = time.perf_counter()

    def after(step: Step) -> None:
        nonlocal diverged
        value = float(step.loss)
        diverged = diverged or not math.isfinite(value)
        n = len(step.labels)
        window["wrong"] += n - int(step.correct)
        window["seen"] += n
        window["loss_sum"] += value * n
        if step.iteration % cfg.eval_every == 0 or step.iteration == cfg.iterations:
            for key, v in (("iteration", step.iteration), ("lr", step.lr),
                           ("train_error", window["wrong"] / window["seen"]),
                           ("train_loss", _finite(window["loss_sum"] / window["seen"])),
                           ("test_error", error_rate(model, x_test, y_test)), ("train_seen", window["seen"])):
                curve[key].append(v)
            window.update(wrong=0, seen=0, loss_sum=0.0)
            if log:
                log(f"{label:<16} iter {step.iteration:>6}/{cfg.iterations}  lr {step.lr:.4g}  "
                    f"train err {curve['train_error'][-1]:6.2%}  test err {curve['test_error'][-1]:6.2%}")

    while it < cfg.iterations:
        loader = make_loader(data.train, batch_size=cfg.batch_size, shuffle=True, seed=cfg.seed, epoch=epoch,
                             drop_last=True)
        steps = sgd_steps(model, loader, opt, criterion=F.cross_entropy, lr_at=lambda i: step_lr(cfg, i), iteration=it,
                          max_steps=cfg.iterations - it, on_step=after).steps
        if steps == 0:
            raise ConfigError(f"the training split has fewer images than one batch ({cfg.batch_size})")
        it += steps
        epoch += 1
    return {**curve, "diverged": diverged, "seconds": round(time.perf_counter() - start, 2)}


HELD, NOT_HELD, NOT_SHOWN = "held", "not held", "not shown"


def finding(deep: float, n_deep: int, shallow: float, n_shallow: int, *, deeper_higher: bool,
            level: float = stats.DEFAULT_LEVEL) -> dict[str, Any]:
    """One ordering between two error rates measured on n images each, by the gates' interval rule: HELD when the
    whole interval of (deep - shallow) lies on the stated side of 0, NOT HELD when it lies on the other, NOT SHOWN
    when it straddles 0 (the difference is within noise: a few images either way)."""
    lo, hi = stats.difference_interval(deep * n_deep, n_deep, shallow * n_shallow, n_shallow, level)
    above, below = lo > 0, hi < 0   # deep - shallow: wholly above 0, wholly below it
    outcome = (HELD if (above if deeper_higher else below) else
               NOT_HELD if (below if deeper_higher else above) else NOT_SHOWN)
    return {"outcome": outcome, "held": outcome == HELD, "diff_pp": round(100 * (deep - shallow), 4),
            "interval_pp": [round(lo, 4), round(hi, 4)], "level": level}


def orderings(runs: list[dict[str, Any]], depths: tuple[int, ...]) -> dict[str, Any]:
    """Did the paper's orderings hold on the final window? Each adjacent depth pair is checked, with the interval
    of the difference (training error: on the images of the last window; test error: on the test images)."""
    final = {(r["variant"], r["depth"]): r["final"] for r in runs}

    def check(variant: str, metric: str, deeper_higher: bool, statement: str) -> dict[str, Any]:
        pairs = []
        n_key = "train_images" if metric == "train_error" else "test_images"
        for shallow, deep in zip(depths, depths[1:]):
            fs, fd = final[(variant, shallow)], final[(variant, deep)]
            s, d = fs[metric], fd[metric]
            pairs.append({"shallow": shallow, "deep": deep, "shallow_value": s, "deep_value": d,
                          **finding(d, fd.get(n_key) or 1, s, fs.get(n_key) or 1, deeper_higher=deeper_higher)})
        outcomes = {p["outcome"] for p in pairs}
        outcome = NOT_HELD if NOT_HELD in outcomes else NOT_SHOWN if NOT_SHOWN in outcomes else HELD
        return {"statement": statement, "variant": variant, "metric": metric, "outcome": outcome,
                "held": outcome == HELD, "pairs": pairs}

    return {
        "plain_deeper_higher_train_error": check(
            "plain", "train_error", True, "(a) the deeper plain net has higher TRAINING error than the shallower"),
        "residual_deeper_lower_test_error": check(
            "residual", "test_error", False, "(b) the deeper ResNet has lower test error than the shallower"),
        "residual_deeper_lower_train_error": check(
            "residual", "train_error", False, "(b') the deeper ResNet has lower training error than the shallower"),
    }


def run_degradation(cfg: DegradationConfig, *, out: str | Path, force: bool = False, device: str | None = None,
                    threads: int | None = None, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train plain and residual nets of every depth, write curves.json/.csv and the figures; return the result.

    device: "cpu", "cuda", "cuda:1"...; default: the first GPU if torch sees one, else the CPU.
    threads: torch intra-op CPU threads for the run (restored afterwards); default: torch's own.
    On a busy shared CPU, 1 thread can be many times faster than oversubscribed OpenMP threads.
    """
    cfg = validate(cfg)
    out = Path(out)
    for name in FILES.values():
        refuse_overwrite(out / name, force)
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {threads}")

    import torch

    saved = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run(cfg, out, device, log)
    finally:
        torch.set_num_threads(saved)


def _run(cfg: DegradationConfig, out: Path, device: str | None, log: Callable[[str], None] | None) -> dict[str, Any]:
    import torch

    data = get_data(dataset=cfg.dataset, data_dir=cfg.data_dir, input_size=cfg.input_size, seed=cfg.seed,
                    augment=PAPER_AUGMENT[cfg.dataset] if cfg.augment else (), workers=0)
    info = data.info
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for but torch sees no CUDA device")
    if len(data.train) < cfg.batch_size:
        raise ConfigError(f"--batch-size {cfg.batch_size} is larger than the training set ({len(data.train)})")
    n_test = len(data.test) if cfg.test_images is None else min(cfg.test_images, len(data.test))
    test = [data.test[i] for i in range(n_test)]
    x_test, y_test = torch.stack([t[0] for t in test]), torch.tensor([t[1] for t in test])
    first = list(itertools.islice(make_loader(data.calib, batch_size=cfg.batch_size, shuffle=True, seed=cfg.seed),
                                  cfg.grad_batches))

    runs, grads = [], []
    start = time.perf_counter()
    for variant in Variant:
        for depth in cfg.depths:
            torch.manual_seed(cfg.seed)
            model = cifar_resnet(depth, variant=variant, num_classes=info.num_classes,
                                 in_channels=info.in_channels).to(device)
            arch = variant.arch(depth)
            grads.append({"variant": variant.value, "depth": depth, "arch": arch, **gradient_norms(model, first)})
            torch.manual_seed(cfg.seed)
            curve = train_curve(model, data, x_test, y_test, cfg, label=arch, log=log)
            runs.append({"variant": variant.value, "depth": depth, "arch": arch,
                         "params": sum(p.numel() for p in model.parameters()),
                         "layers": len(weight_layers(model)), **curve,
                         "final": {"iteration": curve["iteration"][-1], "train_error": curve["train_error"][-1],
                                   "test_error": curve["test_error"][-1], "train_images": curve["train_seen"][-1],
                                   "test_images": n_test}})
    result = {
        "experiment": "degradation",
        "config": asdict(cfg),
        "dataset": {k: v for k, v in info.to_dict().items() if k != "class_names"},
        "test_images": n_test,
        "device": device,
        "threads": torch.get_num_threads(),
        "runs": runs,
        "gradient_norms": grads,
        "orderings": orderings(runs, cfg.depths),
        "seconds": round(time.perf_counter() - start, 2),
        "environment": environment(),
        "files": dict(FILES),
    }
    write_outputs(result, out)
    return result


def curves_csv(result: dict[str, Any]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for r in result["runs"]:
        for i, it in enumerate(r["iteration"]):
            writer.writerow({"variant": r["variant"], "depth": r["depth"], "arch": r["arch"], "iteration": it,
                             "lr": r["lr"][i], "train_error": r["train_error"][i], "train_loss": r["train_loss"][i],
                             "test_error": r["test_error"][i]})
    return buf.getvalue()


def write_outputs(result: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / FILES["csv"], curves_csv(result))
    plot_curves(result, out / FILES["figure"], out / FILES["figure_svg"])
    plot_gradients(result, out / FILES["gradients"], out / FILES["gradients_svg"])
    atomic_write_json(out / FILES["json"], result)


def format_result(result: dict[str, Any]) -> str:
    lines = [f"degradation on {result['dataset']['name']} ({result['config']['iterations']} iterations, "
             f"{result['test_images']} test images, {result['seconds']:.0f} s)",
             f"{'net':<18}{'params':>10}{'train err':>11}{'test err':>10}  grad first/last layer"]
    grads = {(g["variant"], g["depth"]): g for g in result["gradient_norms"]}
    for r in result["runs"]:
        g = grads[(r["variant"], r["depth"])]
        ratio = "n/a" if g["first_to_last_ratio"] is None else f"{g['first_to_last_ratio']:.3g}"
        lines.append(f"{r['arch']:<18}{r['params']:>10,}{r['final']['train_error']:>11.2%}"
                     f"{r['final']['test_error']:>10.2%}  {ratio}" + ("  DIVERGED" if r["diverged"] else ""))
    for o in result["orderings"].values():
        pairs = ", ".join(
            f"{p['shallow']}: {p['shallow_value']:.2%} vs {p['deep']}: {p['deep_value']:.2%}"
            + (f", deep - shallow {p['diff_pp']:+.2f} pp, {100 * p['level']:g} % interval "
               f"{p['interval_pp'][0]:+.2f} to {p['interval_pp'][1]:+.2f}" if "interval_pp" in p else "")
            for p in o["pairs"])
        word = o.get("outcome", HELD if o["held"] else NOT_HELD).upper()
        lines.append(f"{word:<9} {o['statement']}  ({o['metric']}: {pairs})")
    return "\n".join(lines)


# ---------------------------------------------------------------- figures (matplotlib, Agg, imported here only)
def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, png: Path, svg: Path) -> None:
    for path, fmt in ((png, "png"), (svg, "svg")):
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=150, bbox_inches="tight")


VARIANT_PANELS = (("plain", "plain networks"), ("residual", "ResNets"))


def _label(variant: str, depth: int) -> str:
    return f"{'plain' if variant == 'plain' else 'ResNet'}-{depth}"


def _two_panels(result: dict[str, Any]):
    """One figure, plain nets left and ResNets right; yields (ax, variant, depth, color) for every curve."""
    plt = _pyplot()
    colors = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, (_, title) in zip(axes, VARIANT_PANELS):
        ax.set_title(title)
    curves = [(ax, variant, depth, colors(k)) for ax, (variant, _) in zip(axes, VARIANT_PANELS)
              for k, depth in enumerate(result["config"]["depths"])]
    return plt, fig, axes, curves


def plot_curves(result: dict[str, Any], png: Path, svg: Path) -> None:
    """The paper's CIFAR-10 figure: error (%) vs iterations; thin = training error, bold = test error."""
    plt, fig, axes, curves = _two_panels(result)
    for ax, variant, depth, color in curves:
        r = next(r for r in result["runs"] if r["variant"] == variant and r["depth"] == depth)
        name = _label(variant, depth)
        ax.plot(r["iteration"], [100 * e for e in r["train_error"]], color=color, lw=0.9, alpha=0.85,
                label=f"{name} train")
        ax.plot(r["iteration"], [100 * e for e in r["test_error"]], color=color, lw=2.6, label=f"{name} test")
    for ax in axes:
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("error (%)")
    fig.suptitle(f"{result['dataset']['name']}: thin lines training error, bold lines test error", fontsize=10)
    _save(fig, png, svg)
    plt.close(fig)


def plot_gradients(result: dict[str, Any], png: Path, svg: Path) -> None:
    """Per-layer |dL/dW| on the first batch, before any update: plain (left) vs residual (right), log scale."""
    plt, fig, axes, curves = _two_panels(result)
    for ax, variant, depth, color in curves:
        g = next(g for g in result["gradient_norms"] if g["variant"] == variant and g["depth"] == depth)
        ax.plot(range(1, len(g["grad_norm"]) + 1), g["grad_norm"], color=color, marker=".", lw=1.2,
                label=_label(variant, depth))
    for ax in axes:
        ax.set_yscale("log")
        ax.set_xlabel("layer (input -> output)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("gradient norm ||dL/dW||")
    fig.suptitle("per-layer gradient norms at the start of training (before any update)", fontsize=10)
    _save(fig, png, svg)
    plt.close(fig)
