"""The FP32 training stage: `train(recipe, out_dir) -> TrainResult`.

Writes out_dir/best.pt (best test top-1), last.pt (+ optimizer, schedule state and RNG for --resume),
metrics.jsonl and metrics.csv (one row per epoch). Checkpoints are written atomically at the end of each
epoch, so a run killed at any moment (even kill -9) resumes from its last finished epoch; data order and
augmentation depend only on (seed, epoch, index), so the resumed run ends with the same weights.

Under `torchrun --nproc-per-node N` it trains with DistributedDataParallel (gloo on CPU, nccl on CUDA):
the recipe's batch_size is the GLOBAL batch, each process takes batch_size / N; only rank 0 evaluates
and writes. BatchNorm statistics are per process (SyncBatchNorm is CUDA-only), so DDP matches
single-process training within a tolerance, not bit for bit.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import time
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeres.checkpoint import (
    CLASSIFIER_KEYS,
    ModelMeta,
    check_checkpoints,
    load_backbone,
    load_model,
    num_outputs,
    read_checkpoint,
    save_checkpoint,
)
from edgeres.data import get_data_for, make_loader
from edgeres.device import resolve
from edgeres.dist import Dist, init_dist
from edgeres.errors import BackendUnavailable, ConfigError, DataError
from edgeres.io import atomic_write_text, check_owned_dir, check_replaceable, claim_dir, rejected_path
from edgeres.loop import PRECISE_BN_BELOW, Step, refresh_bn_stats, sgd_steps, stale_bn_share
from edgeres.recipe import DataCfg, GatesCfg, ModelCfg, Recipe, TrainCfg, recipe_from_dict
from edgeres.records import Gate, StageRecord, StageResult, proportion_gate
from edgeres.settings import level_field, origins_field, read, setting

METRIC_FIELDS = ("epoch", "iteration", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "test_loss",
                 "test_top1", "test_top5", "lr", "images_per_s", "seconds")


@dataclass(frozen=True)
class TrainResult:
    best: Path
    last: Path
    meta: ModelMeta
    history: list[dict[str, Any]]
    best_top1: float
    test_eval: Any = None           # best.pt's EvalResult on the test split, when train read it at the end (rank 0)


def _init_dist() -> Dist:
    return init_dist()


def lr_at(cfg, iteration: int, iters_per_epoch: int, total_iters: int, warming: bool) -> float:
    """The learning rate before optimizer step `iteration` (0-based)."""
    if warming:                                          # ResNet-110 rule: hold warmup_lr until error drops
        return cfg.warmup_lr
    epoch_f = iteration / iters_per_epoch
    warm_iters = cfg.warmup_epochs * iters_per_epoch
    if cfg.warmup_until_error is None and warm_iters > 0 and iteration < warm_iters:
        start = cfg.warmup_lr if cfg.warmup_lr is not None else 0.0
        return start + (cfg.lr - start) * iteration / warm_iters
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "multistep":
        pos = epoch_f if cfg.milestone_unit == "epoch" else iteration
        return cfg.lr * cfg.gamma ** sum(1 for m in cfg.milestones if pos >= m)
    span = max(1.0, total_iters - warm_iters)            # cosine to zero after the warm-up
    t = min(1.0, max(0.0, (iteration - warm_iters) / span))
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * t))


def _optimizer(model, cfg):
    import torch

    groups = []
    # fine-tuning: the backbone at lr * backbone_lr_scale, the classifier at lr (one split only when they differ)
    parts = (None,) if cfg.backbone_lr_scale == 1.0 else (False, True)
    for head in parts:
        named = [(n, p) for n, p in model.named_parameters() if head is None or (n in CLASSIFIER_KEYS) == head]
        scale = 1.0 if head else cfg.backbone_lr_scale
        if cfg.wd_exclude_bn_bias:
            groups += [{"params": [p for _, p in named if p.ndim > 1], "weight_decay": cfg.weight_decay,
                        "lr_scale": scale},
                       {"params": [p for _, p in named if p.ndim <= 1], "weight_decay": 0.0, "lr_scale": scale}]
        else:
            groups.append({"params": [p for _, p in named], "weight_decay": cfg.weight_decay, "lr_scale": scale})
    groups = [g for g in groups if g["params"]]
    for g in groups:
        g["lr"] = cfg.lr * g["lr_scale"]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    return torch.optim.Adam(groups, lr=cfg.lr)


def _write_metrics(out: Path, history: list[dict[str, Any]]) -> None:
    import json

    atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in history))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, extrasaction="ignore")
    w.writeheader()
    w.writerows(history)
    atomic_write_text(out / "metrics.csv", buf.getvalue())


def _one_line(e: Exception) -> str:
    """DataLoader workers re-raise with a traceback in the message: keep the last meaningful line."""
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else str(e)
    return last.split("DataError: ", 1)[-1]


def _changed_keys(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return [f"{sec}.{k}" for sec in a for k in a[sec] if b.get(sec, {}).get(k) != a[sec][k]]


def _check_resumable(saved: dict[str, Any], recipe, last_path: Path) -> None:
    """A resumed run keeps the recipe it was started with; only the epoch count may grow."""
    changed = [k for k in _changed_keys(saved, recipe.to_dict()) if k != "train.epochs"
               and k.split(".")[0] in ("model", "data", "train")]   # what trains the model (runs before this
                                                                    # round saved every section)
    if changed:
        raise ConfigError(f"{last_path} was started with other settings ({', '.join(changed[:4])}); resume with "
                          f"the same options, or pass --force to start over")


def resume_recipe(out_dir: str | Path, overrides: dict[str, Any]):
    """The recipe a run in `out_dir` was started with, plus the options given now (so `train --resume` after
    `--epochs 2` stops at 2, not at the named recipe's count). None for runs saved before this was recorded."""

    last = Path(out_dir) / "last.pt"
    if not last.is_file():
        raise ConfigError(f"nothing to resume: {last} does not exist")
    _, _, rest = read_checkpoint(last)
    if not isinstance(rest.get("recipe"), str):
        return None
    return recipe_from_dict(json.loads(rest["recipe"]), source=str(last)).with_overrides(overrides)


def train(recipe, out_dir: str | Path, *, resume: bool = False, quiet: bool = False, data=None,
          force: bool = False, device: str | None = None,
          on_epoch: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Train recipe.model on recipe.data; see the module docstring for what is written. `device`: see
    edgeres.device.resolve (default: the first GPU torch sees, else the CPU; under torchrun the process's own).

    Selection: best.pt is the epoch with the best top-1 on the holdout (data.holdout of the training split); the
    test split is read once, at the end, to report best.pt. Without a holdout, best.pt is the last epoch and the test
    split is evaluated every epoch for the curves only."""
    recipe = TrainSettings.from_recipe(recipe).recipe   # what trains the model, and nothing else: its hash
                                                        # is the checkpoint's recipe_hash, whoever trains it
    import torch

    from edgeres.models import create_model

    out = Path(out_dir)
    dist_info = _init_dist()
    tcfg, dcfg = recipe.train, recipe.data
    last_path, best_path = out / "last.pt", out / "best.pt"
    if tcfg.init_from and not resume:   # a checkpoint of another architecture: one line, before the folder is claimed
        check_checkpoints(None, tcfg.init_from, arch=recipe.model.arch)
    if dist_info.main:   # one process checks and claims the folder; the others wait for it (no race on the marker)
        _check_run_folder(out, resume=resume, force=force, batch_size=dcfg.batch_size, world=dist_info.world)
    if dist_info.world > 1:
        torch.distributed.barrier()
    device = resolve(device)
    use_amp = bool(tcfg.amp and device.type == "cuda")
    if tcfg.amp and not use_amp and dist_info.main and not quiet:
        warnings.warn("train.amp is for CUDA; training in FP32 on CPU", stacklevel=2)

    torch.manual_seed(tcfg.seed)
    bundle = data if data is not None else get_data_for(recipe)
    info = bundle.info
    if len(bundle.train) < dcfg.batch_size:
        raise ConfigError(f"the training split has {len(bundle.train)} images, fewer than one batch "
                          f"(data.batch_size {dcfg.batch_size})")
    model = create_model(recipe.model.arch, num_classes=info.num_classes, in_channels=info.in_channels,
                         options=recipe.model.options).to(device)
    if tcfg.init_from and not resume:
        fresh = load_backbone(model, tcfg.init_from)
        if dist_info.main and not quiet:
            _say(f"initialised from {tcfg.init_from}" + (f"; classifier re-initialised for {info.num_classes} "
                                                         f"classes" if fresh else ""))
    if tcfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    meta = meta_for(recipe, info)
    opt = _optimizer(model, tcfg)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    state = {"epoch": 0, "iteration": 0, "best_top1": -1.0, "warming": tcfg.warmup_until_error is not None,
             "history": []}
    if resume:
        state = _restore(last_path, recipe, model, opt, scaler if use_amp else None)

    net = model
    if dist_info.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    per_rank = dcfg.batch_size // dist_info.world
    sampler = torch.utils.data.DistributedSampler(bundle.train, num_replicas=dist_info.world, rank=dist_info.rank,
                                                  shuffle=True, seed=tcfg.seed)
    ipe = max(1, (-(-len(bundle.train) // dist_info.world)) // per_rank)
    total = tcfg.epochs * ipe if tcfg.max_iterations is None else min(tcfg.epochs * ipe, tcfg.max_iterations)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=tcfg.label_smoothing)
    writer = _tensorboard(out) if tcfg.tensorboard and dist_info.main else None
    history: list[dict[str, Any]] = list(state["history"])
    selects = getattr(bundle, "holdout", None) is not None and len(bundle.holdout) > 0

    from edgeres.evaluate import evaluate

    try:
        for epoch in range(state["epoch"], tcfg.epochs):
            if state["iteration"] >= total:
                break
            sampler.set_epoch(epoch)
            loader = make_loader(bundle.train, batch_size=per_rank, shuffle=True, workers=dcfg.workers,
                                 seed=tcfg.seed, drop_last=True, sampler=sampler, epoch=epoch, device=device)
            t0 = time.perf_counter()
            window: deque = deque(maxlen=20)
            steps = min(len(loader), total - state["iteration"])   # max_iterations may end this epoch early
            bar = _bar(steps, f"epoch {epoch + 1}/{tcfg.epochs}", quiet or not dist_info.main)
            seen, lr, shown = 0, tcfg.lr, [-math.inf]

            def after(step: Step, window=window, bar=bar, t0=t0, shown=shown) -> None:   # bound now: this epoch
                nonlocal seen, lr
                state["iteration"], lr = step.iteration, step.lr
                seen += int(step.labels.shape[0])
                if state["warming"]:
                    window.append((int(step.correct), int(step.labels.shape[0])))
                    if step.index % 10 == 9 and _window_error(window, dist_info) < tcfg.warmup_until_error:
                        state["warming"] = False
                if bar is not None:
                    _bar_step(bar, step, shown, rate=seen * dist_info.world / max(time.perf_counter() - t0, 1e-9))

            done = sgd_steps(net, loader, opt, criterion=criterion, iteration=state["iteration"], max_steps=steps,
                             lr_at=lambda it: lr_at(tcfg, it, ipe, total, state["warming"]), device=device,
                             amp=use_amp, scaler=scaler, channels_last=tcfg.channels_last, on_step=after)
            loss_sum, correct, seen = done.loss_sum, done.correct, done.seen
            if bar is not None:
                bar.close()
            train_s = time.perf_counter() - t0
            if stale_bn_share(done.steps) > PRECISE_BN_BELOW:
                # few steps an epoch (a few hundred photos): BatchNorm's running statistics are still mostly their
                # starting values while the weights have moved, and the holdout (and the saved model) would be judged
                # with them - recompute them on the training images (eval transform; every rank: buffers stay equal),
                # in a seeded shuffled order: batches of one class each (the folder order) would average away the
                # variance between classes and blow the activations up in eval mode
                refresh_bn_stats(model, make_loader(bundle.calib, batch_size=per_rank, shuffle=True, seed=tcfg.seed,
                                                    epoch=epoch, workers=dcfg.workers, device=device), device=device)
            loss_sum, correct, seen_t = _reduce(dist_info, loss_sum, correct, seen, device)
            row = {"epoch": epoch + 1, "iteration": state["iteration"], "train_loss": loss_sum / max(1, seen_t),
                   "train_top1": 100.0 * correct / max(1, seen_t), "lr": lr,
                   "images_per_s": seen_t / train_s if train_s > 0 else 0.0}
            state["epoch"] = epoch + 1
            if dist_info.main:
                split, prefix = (bundle.holdout, "val") if selects else (bundle.test, "test")
                res = evaluate(model, split, batch_size=max(256, per_rank), workers=dcfg.workers)
                row.update({f"{prefix}_loss": res.loss, f"{prefix}_top1": res.top1, f"{prefix}_top5": res.top5,
                            "seconds": time.perf_counter() - t0})
                history.append(row)
                state["history"] = history
                _save_epoch(out, recipe, model, meta, opt, scaler if use_amp else None, state, row,
                            "val_top1" if selects else None)
                _log_epoch(row, writer, quiet, num_classes=info.num_classes)
                if on_epoch is not None and not quiet:   # e.g. the build's whole-build estimate after epoch 1
                    on_epoch(row)
            if dist_info.world > 1:
                torch.distributed.barrier()
    except DataError as e:
        raise DataError(_one_line(e)) from None
    finally:
        if writer is not None:
            writer.close()
    if dist_info.world > 1:   # every rank returns the rank-0 history
        obj = [history]
        torch.distributed.broadcast_object_list(obj, src=0)
        history = obj[0]
    best_top1, test_eval = _final_test(best_path, bundle.test, history, selects, dist_info, device)
    return TrainResult(best=best_path, last=last_path, meta=meta, history=history, best_top1=best_top1,
                       test_eval=test_eval)


def _final_test(best_path: Path, test, history: list[dict[str, Any]], selects: bool, dist_info: Dist,
                device) -> tuple[float, Any]:
    """Top-1 (%) of best.pt on the test split, and its EvalResult (rank 0): read here, once, after selection."""
    if not history:
        return 0.0, None
    if not selects:
        return float(history[-1]["test_top1"]), None
    value, ev = [0.0], None
    if dist_info.main:
        from edgeres.evaluate import evaluate

        model, _ = load_model(best_path)
        ev = evaluate(model.to(device), test, batch_size=256)
        value = [ev.top1]
    if dist_info.world > 1:
        import torch

        torch.distributed.broadcast_object_list(value, src=0)
    return float(value[0]), ev


def _check_run_folder(out: Path, *, resume: bool, force: bool, batch_size: int, world: int) -> None:
    """Refuse, before anything is trained, what would fail or overwrite a run later."""

    last_path = out / "last.pt"
    check_owned_dir(out, what="training folder", legacy=("metrics.jsonl",), owner_parent=True)
    if resume and not last_path.is_file():
        raise ConfigError(f"nothing to resume: {last_path} does not exist")
    held = [n for n in ("best.pt", "last.pt", "metrics.jsonl", "metrics.csv") if os.path.lexists(out / n)]
    for name in held:   # a link, folder or FIFO is never replaced, whatever --force says
        check_replaceable(out / name, True, what="training file")
    if not resume and not force and held:
        raise ConfigError(f"{out} already holds a training run ({', '.join(held)}); pass --resume to continue it or "
                          f"--force to replace it")
    # before the first epoch, not after it
    claim_dir(out, what="training folder", kind="train", legacy=("metrics.jsonl",), owner_parent=True)
    if batch_size % world:
        raise ConfigError(f"data.batch_size {batch_size} must divide by the {world} processes")


def _restore(last_path: Path, recipe, model, opt, scaler) -> dict[str, Any]:
    """Load last.pt into model / optimizer / AMP scaler / torch RNG; returns the saved training state."""
    import torch

    weights, _, rest = read_checkpoint(last_path)
    if isinstance(rest.get("recipe"), str):
        _check_resumable(json.loads(rest["recipe"]), recipe, last_path)
    model.load_state_dict(weights)
    opt.load_state_dict(rest["optimizer"])
    if scaler is not None and "scaler" in rest:
        scaler.load_state_dict(rest["scaler"])
    torch.set_rng_state(rest["rng"])
    return dict(rest["train_state"])


def _save_epoch(out: Path, recipe, model, meta, opt, scaler, state: dict[str, Any], row: dict[str, Any],
                select: str | None) -> None:
    """best.pt when this epoch's holdout top-1 (`select`) is the best so far - on a tie (common on a holdout of a
    few dozen photos), the lower holdout loss decides - (without a holdout: every epoch, the last one is kept),
    last.pt (everything --resume needs), the metrics."""
    import torch

    loss = row.get(select.replace("top1", "loss")) if select else None
    loss = loss if isinstance(loss, float) and math.isfinite(loss) else float("inf")
    tie_better = select is not None and row[select] == state["best_top1"] and loss < state.get("best_loss", math.inf)
    if select is None or row[select] > state["best_top1"] or tie_better:
        state["best_top1"] = row[select] if select else row["epoch"]
        state["best_loss"] = loss
        extra = {f"{select}": row[select]} if select else {}
        save_checkpoint(out / "best.pt", model, meta, epoch=row["epoch"], **extra)
    save_checkpoint(out / "last.pt", model, meta, optimizer=opt.state_dict(), train_state=dict(state),
                    rng=torch.get_rng_state(), recipe_hash=recipe.hash(),
                    recipe=json.dumps(recipe.to_dict(), sort_keys=True),
                    **({"scaler": scaler.state_dict()} if scaler is not None else {}))
    _write_metrics(out, state["history"])


def _log_epoch(row: dict[str, Any], writer, quiet: bool, *, num_classes: int | None = None) -> None:
    if writer is not None:
        for key in METRIC_FIELDS[2:]:
            writer.add_scalar(key, row[key], row["epoch"])
    if not quiet:
        _say(epoch_line(row, num_classes))


TOP5_FROM = 6   # top-5 is said from 6 classes: with 5 or fewer every label is among the top 5 (always 100 %)


def epoch_line(row: dict[str, Any], num_classes: int | None = None) -> str:
    """The line said after each epoch; top-5 only where it can be below 100 % (more than 5 classes)."""
    split = "val" if "val_top1" in row else "test"
    top5 = f" top5 {row[split + '_top5']:.2f}%" if num_classes is None or num_classes >= TOP5_FROM else ""
    return (f"epoch {row['epoch']}: train loss {row['train_loss']:.4f} top1 {row['train_top1']:.2f}% | "
            f"{split} loss {row[split + '_loss']:.4f} top1 {row[split + '_top1']:.2f}%{top5} | "
            f"{row['images_per_s']:.0f} img/s")


def _bar_step(bar, step: Step, shown: list[float], *, rate: float) -> None:
    """One batch on the bar: its loss, the speed and the lr whenever the bar may redraw (every batch that is not
    within tqdm's mininterval of the last: `.item()` waits for the GPU, so not on every one of thousands of
    fast batches), then the step itself."""
    now = time.monotonic()
    if now - shown[0] >= bar.mininterval or bar.n + 1 >= (bar.total or 0):
        shown[0] = now
        bar.set_postfix(loss=f"{step.loss.item():.3f}", img_s=f"{rate:.0f}", lr=f"{step.lr:.3g}", refresh=False)
    bar.update(1)


def _window_error(window, dist_info: Dist) -> float:
    correct, n = sum(c for c, _ in window), sum(k for _, k in window)
    if dist_info.world > 1:
        import torch

        t = torch.tensor([correct, n], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        correct, n = float(t[0]), float(t[1])
    return 100.0 * (1 - correct / max(1, n))


def _reduce(dist_info: Dist, loss_sum, correct, seen: int, device):
    import torch

    seen_t = torch.tensor(float(seen), device=device, dtype=torch.float64)
    t = torch.stack([loss_sum.double(), correct.double(), seen_t])
    if dist_info.world > 1:
        t = t.cpu()
        torch.distributed.all_reduce(t)
    return float(t[0]), float(t[1]), int(t[2])


def _bar(total: int, desc: str, off: bool):
    if off:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="batch", leave=False, dynamic_ncols=True)


def _say(msg: str) -> None:
    from tqdm import tqdm

    tqdm.write(msg)


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:

        raise BackendUnavailable("train.tensorboard needs the tensorboard package (pip install tensorboard)") from None
    return SummaryWriter(str(out / "tensorboard"))


__all__ = ["TrainResult", "train", "lr_at"]


# ---------------------------------------------------------------------------------------------------- the stage

@dataclass(frozen=True)
class TrainInputs:
    data: Any                       # edgeres.data bundle (train / calib / test splits, info)
    out_dir: Path                   # RUN/train: best.pt, last.pt, metrics
    pretrained: Path | None = None  # a finished checkpoint to take as it is (no training)
    device: Any = None              # torch device (edgeres.device.resolve; None: the GPU if any)
    on_epoch: Any = None            # called with each epoch's row (the build's whole-build estimate)


@dataclass(frozen=True)
class TrainSettings:
    """What the FP32 model is made from: the recipe's model, data and train sections and the FP32 sanity gates,
    nothing else (editing a quantization gate never retrains)."""

    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataCfg = field(default_factory=DataCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    fp32_over_chance_sigma: float = setting("gates.fp32_over_chance_sigma", flag="",
                                            help="FP32 top-1 must beat chance by this many standard deviations.")
    fp32_loss_must_fall: bool = setting("gates.fp32_loss_must_fall", flag="",
                                        help="A training loss that does not fall fails the stage.")
    level: float = level_field(hashed=False)
    origins: dict = origins_field()

    @classmethod
    def from_recipe(cls, recipe) -> TrainSettings:
        return read(cls, recipe, model=recipe.model, data=recipe.data, train=recipe.train)

    @property
    def recipe(self) -> Recipe:
        """The training recipe: these sections, every other at its default. Its hash is the checkpoint's
        recipe_hash (what trained the model), the same whether `build` or `edgeres train` trains it."""
        return Recipe(model=self.model, data=self.data, train=self.train,
                      gates=GatesCfg(fp32_over_chance_sigma=self.fp32_over_chance_sigma,
                                     fp32_loss_must_fall=self.fp32_loss_must_fall), source="train settings")


@dataclass(frozen=True)
class TrainOutput:
    model: Any                      # the FP32 model (eval mode)
    meta: ModelMeta
    evaluation: Any = None          # its EvalResult on the evaluation (test) split, when this build made it

    @classmethod
    def load(cls, path: str | Path) -> TrainOutput:

        model, meta = load_model(path)
        return cls(model, meta)


def meta_for(recipe, info) -> ModelMeta:
    """ModelMeta of a model trained from `recipe` on data described by `info`."""
    return ModelMeta(arch=recipe.model.arch, num_classes=info.num_classes, in_channels=info.in_channels,
                     input_size=info.input_size, mean=tuple(info.mean), std=tuple(info.std),
                     class_names=tuple(info.class_names), arch_options=dict(recipe.model.options),
                     resize_size=info.resize_size, dataset=info.name, recipe_hash=recipe.hash(),
                     data_dir=str(Path(recipe.data.data_dir).expanduser().resolve())
                     if recipe.data.data_dir else None)


TRAINED_FILES = ("best.pt", "last.pt", "metrics.jsonl", "metrics.csv", "tensorboard")


def run(inputs: TrainInputs, settings: TrainSettings, *, quiet: bool = False):
    """The train stage (in `build`): train afresh, or take `pretrained` as it is (its classes must be the
    dataset's). Training runs in a staging folder beside out_dir (.train.staging) and moves in only after the FP32
    gates pass: a rebuild that fails them leaves the model an earlier build made in out_dir as it was (the
    rejected one is kept as best.rejected.pt). -> StageResult[TrainOutput]"""

    recipe, info = settings.recipe, inputs.data.info
    out = Path(inputs.out_dir)
    rec = StageRecord(stage="train")
    ev = None   # the FP32 model's test evaluation, when train already made it
    staging = out.with_name(f".{out.name}.staging")
    if inputs.pretrained:
        model, meta = load_model(inputs.pretrained, arch=recipe.model.arch)
        classes = (meta.num_classes if meta else None) or num_outputs(model)
        if classes != info.num_classes:
            raise ConfigError(f"--pretrained {inputs.pretrained} predicts {classes} classes, the dataset has "
                              f"{info.num_classes}: fine-tune it instead with --init-from")
        meta = meta or meta_for(recipe, info)
        claim_dir(staging, what="training staging folder", kind="train", owner_parent=True)
        save_checkpoint(staging / "best.pt", model, meta)
        rec.metrics = {"pretrained": str(inputs.pretrained)}
        output = TrainOutput(model.eval(), meta)
    else:
        # the build only gets here when the training inputs changed (or --force): start that run afresh
        result = train(recipe, staging, data=inputs.data, quiet=quiet, force=True, device=inputs.device,
                       on_epoch=inputs.on_epoch)
        ev = result.test_eval
        rec.metrics = {"best_top1": result.best_top1, "epochs": len(result.history), "history": result.history,
                       "selection": "holdout top-1" if inputs.data.holdout is not None else "last epoch",
                       "holdout_size": len(inputs.data.holdout) if inputs.data.holdout is not None else 0}
        output = TrainOutput.load(result.best)
    if ev is None:   # taken as it is, or nothing selected (the last epoch): evaluate it here
        from edgeres.evaluate import evaluate

        ev = evaluate(output.model.to(inputs.device or "cpu"), inputs.data.test, batch_size=256)
    fp32_sanity(rec, ev, settings, info.num_classes, rec.metrics.get("history") or [])
    claim_dir(out, what="training folder", kind="train", owner_parent=True)
    if rec.passed:   # the gates passed: this training replaces what out_dir held
        for name in TRAINED_FILES:
            if os.path.lexists(staging / name):
                if (out / name).is_dir() and not (out / name).is_symlink():
                    shutil.rmtree(out / name)
                os.replace(staging / name, out / name)
        rec.set_artifact(out / "best.pt")
    else:   # what out_dir held stays; the rejected model keeps another name beside it
        rejected = rejected_path(out / "best.pt")
        os.replace(staging / "best.pt", rejected)
        rec.extra_artifacts["rejected"] = str(rejected)
        kept = f" ({out / 'best.pt'}, an earlier build's, is left as it was)" if (out / "best.pt").is_file() else ""
        rec.message += f"; the rejected model is {rejected}{kept}"
    shutil.rmtree(staging, ignore_errors=True)
    return StageResult(rec, TrainOutput(output.model, output.meta, ev))


def fp32_sanity(rec, ev, settings, num_classes: int, history: list[dict[str, Any]]) -> None:
    """Gates on the FP32 model itself (every other gate compares INT8 with it): its top-1 above chance for the
    class count, decided by the interval rule on the evaluation split (a precondition: it must be shown, so NOT
    MEASURABLE stops the build too), and a training loss that fell. A failure names the next step."""
    import numpy as np

    n, chance = max(ev.n, 1), 100.0 / max(num_classes, 1)
    rec.metrics.update(fp32_top1_pct=round(ev.top1, 4), chance_pct=round(chance, 4), n_eval=ev.n)
    if settings.fp32_over_chance_sigma > 0:
        right = int(np.sum(np.asarray(ev.logits).argmax(1) == np.asarray(ev.labels))) if ev.n else 0
        g = rec.add_gate(proportion_gate(
            "fp32_top1_pct", right, n, round(chance, 4), level=settings.level, required=True,
            key="gates.fp32_over_chance_sigma", what="FP32 top-1",
            source=settings.origins.get("gates.fp32_over_chance_sigma", "built-in default")))
        if not g.passed:
            verdict = "is not above chance" if g.outcome == "failed" else "cannot be told from chance"
            more = f"; about {g.resolve_n:,} evaluation images would tell" if g.resolve_n else ""
            rec.message = (f"train: FP32 top-1 {ev.top1:.1f} % on {ev.n} images ({100 * settings.level:g} % "
                           f"interval {g.lo:.1f} to {g.hi:.1f} %) {verdict} ({chance:.1f} % for {num_classes} "
                           f"classes){more}: the model did not learn enough for any INT8 comparison with it to mean "
                           f"anything. Next: more epochs (--epochs), or fine-tune published weights (--recipe "
                           f"finetune_imagefolder --init-from torchvision:resnet18 for photos); --gate "
                           f"fp32_over_chance_sigma=0 skips this check")
    losses = [r.get("train_loss") for r in history]
    if settings.fp32_loss_must_fall and len(losses) >= 2:
        first, last = losses[0], losses[-1]
        ratio = last / first if first and math.isfinite(first) and math.isfinite(last) else float("inf")
        g = rec.add_gate(Gate("train_loss_last_over_first", round(ratio, 4), 1.0, "<=", key="gates.fp32_loss_must_fall",
                              what="last over first training loss",
                              source=settings.origins.get("gates.fp32_loss_must_fall", "built-in default")))
        if not g.passed and "did not learn" not in rec.message:
            rec.message = (f"train: the training loss did not fall (epoch 1: {first:.4g}, last: {last:.4g}): "
                           f"diverging or not learning; lower --lr")
