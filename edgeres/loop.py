"""The one training loop: SGD steps over a loader, shared by FP32 training (`train.train`), QAT
(`quantize.quantize_qat`) and the degradation experiment (`experiment.train_curve`).

Each caller owns its schedule (a function iteration -> learning rate), its loader (and so its data order) and what
happens after a step (progress bars, warm-up switches, divergence checks, periodic evaluation) through `on_step`.

`refresh_bn_stats`: BatchNorm's running statistics are an average with momentum 0.1 over the steps taken, starting
from mean 0 / variance 1. After a few steps (a folder of 300 photos at batch 64 is 3 steps an epoch) most of them are
still those starting values while the weights have moved: the model in eval mode then normalizes with the wrong
statistics, its logits reach hundreds and its loss thousands (the first epoch's "val loss 3962" of issue 33),
although the same weights with the right statistics are fine. Recomputing them over the training images with the
weights as they are ("precise BN"; torch.optim.swa_utils.update_bn) is what such a short run needs before each
evaluation; `stale_bn_share` says how much of the starting values a run still holds.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class Step:
    """What `on_step` sees after each optimizer step."""

    iteration: int       # global iterations done, this one included
    index: int           # the step's index in this call
    lr: float
    loss: Any            # detached scalar tensor
    logits: Any          # detached [n, classes]
    labels: Any
    correct: Any         # scalar tensor: right top-1 answers in this batch


@dataclass
class Pass:
    """Totals of one call (tensors stay on the device: no sync per step)."""

    steps: int
    seen: int
    loss_sum: Any
    correct: Any


def sgd_steps(net, loader, opt, *, criterion, lr_at: Callable[[int], float], iteration: int = 0,
              max_steps: int | None = None, device=None, amp: bool = False, scaler=None, channels_last: bool = False,
              amp_dtype=None, teacher: Callable[[Any], Any] | None = None,
              on_step: Callable[[Step], None] | None = None) -> Pass:
    """Train `net` on the batches of `loader` (at most `max_steps`), from global `iteration`: before each step every
    parameter group's lr is `lr_at(iteration) * group.get("lr_scale", 1)`. AMP (fp16 autocast + `scaler`, or
    `amp_dtype`) on CUDA. With `teacher` (distillation), `criterion(logits, labels, teacher(x))`, the teacher run
    without gradients."""
    import torch

    device = device or next(net.parameters()).device
    dev = torch.device(device)
    loss_sum = torch.zeros((), device=dev)
    correct = torch.zeros((), device=dev, dtype=torch.long)
    seen = steps = 0
    net.train()
    for index, (x, y) in enumerate(loader):
        if max_steps is not None and steps >= max_steps:
            break
        lr = lr_at(iteration)
        for g in opt.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if teacher is not None:
            with torch.no_grad():
                target = teacher(x)
        with torch.autocast(dev.type, dtype=amp_dtype or torch.float16, enabled=amp):
            logits = net(x)
            loss = criterion(logits, y) if teacher is None else criterion(logits.float(), y, target)
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        iteration += 1
        steps += 1
        n = int(y.shape[0])
        seen += n
        loss = loss.detach()
        logits = logits.detach()
        batch_correct = (logits.argmax(1) == y).sum()
        loss_sum += loss * n
        correct += batch_correct
        if on_step is not None:
            on_step(Step(iteration, index, lr, loss, logits, y, batch_correct))
    return Pass(steps, seen, loss_sum, correct)


PRECISE_BN_BELOW = 0.01   # recompute BN statistics when more than this share of them is still from before the steps


def stale_bn_share(steps: int, momentum: float = 0.1) -> float:
    """The weight BatchNorm's running statistics still give to what they were `steps` optimizer steps ago."""
    return (1.0 - momentum) ** max(0, steps)


def refresh_bn_stats(model, batches, *, device=None, max_batches: int | None = None) -> int:
    """Recompute every BatchNorm's running mean and variance as the plain average over `batches` (an iterable of
    (x, y) or of x; e.g. a loader over the training images with the eval transform), with the weights as they are,
    no gradient. Momenta and the train/eval mode are restored. Returns the batches read (0: no BatchNorm)."""
    import torch

    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    device = device or next(model.parameters()).device
    momenta = [bn.momentum for bn in bns]
    before = [{k: v.clone() for k, v in bn.state_dict().items()} for bn in bns]
    was_training = model.training
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None   # a cumulative average: every batch counts the same
    model.train()
    n = 0
    try:
        with torch.no_grad():
            for batch in batches:
                if max_batches is not None and n >= max_batches:
                    break
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                model(x.to(device, non_blocking=True))
                n += 1
    finally:
        for bn, m, old in zip(bns, momenta, before):
            bn.momentum = m
            if n == 0:   # no batch (or an error before the first): the statistics stay as they were
                bn.load_state_dict(old)
        model.train(was_training)
    return n
