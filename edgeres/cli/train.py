"""Training and evaluation commands: `edgeres train`, `edgeres eval`."""
from __future__ import annotations

from pathlib import Path

import click

from edgeres import pretrained
from edgeres.cli._common import (
    DATA_DIR,
    complete_arch,
    complete_recipe,
    device_option,
    emit,
    floats,
    json_option,
    quiet_option,
)
from edgeres.cli.types import FiniteFloat
from edgeres.data.infer import dataset_for
from edgeres.errors import ConfigError
from edgeres.recipe import for_dataset, load_recipe
from edgeres.records import held_by
from edgeres.train import resume_recipe, train

DATASETS = ["digits", "mnist", "cifar10", "imagefolder"]


@click.command("train")
@click.option("--recipe", "recipe_name", default="demo", show_default=True, shell_complete=complete_recipe,
              help="Built-in recipe name (edgeres/recipes/<NAME>.yaml) or path to a YAML file.")
@click.option("--arch", default=None, shell_complete=complete_arch, help="Override model.arch.")
@click.option("--dataset", type=click.Choice(DATASETS), default=None, help="Override data.dataset.")
@click.option("--data-dir", type=DATA_DIR, default=None, help="Dataset folder.")
@click.option("--epochs", type=click.IntRange(1), default=None)
@click.option("--batch-size", type=click.IntRange(1), default=None, help="Global batch size.")
@click.option("--lr", type=FiniteFloat(0, 100, min_open=True), default=None)
@click.option("--seed", type=click.IntRange(0), default=None)
@click.option("--workers", type=click.IntRange(0), default=None, help="Data loader worker processes.")
@click.option("--input-size", type=click.IntRange(8, 4096), default=None)
@click.option("--mean", default=None, help="Normalization mean, e.g. 0.485,0.456,0.406.")
@click.option("--std", default=None, help="Normalization std, e.g. 0.229,0.224,0.225.")
@click.option("--skip-bad-images", is_flag=True, default=None, help="Skip and count unreadable images.")
@click.option("--init-from", default=None,
              help="Fine-tune from this checkpoint, or torchvision:ARCH for the published ImageNet weights (fetched "
                   "once, sha256-checked); a classifier with another class count is re-initialised.")
@click.option("--backbone-lr-scale", type=FiniteFloat(0, 100), default=None,
              help="Fine-tuning: lr multiplier for every layer but the classifier.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="runs/train", show_default=True)
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last finished epoch.")
@click.option("--force", is_flag=True, help="Replace an existing run in --out.")
@click.option("--holdout", type=FiniteFloat(0, 0.9), default=None,
              help="Fraction of the training split held out to select best.pt (data.holdout; 0: keep the last "
                   "epoch). The test split is read once, at the end.")
@device_option
@quiet_option
@json_option
def train_cmd(recipe_name, arch, dataset, data_dir, epochs, batch_size, lr, seed, workers, input_size, mean, std,
              skip_bad_images, init_from, backbone_lr_scale, out_dir, resume, force, holdout, device, quiet,
              as_json) -> None:
    """Train a model (FP32) from a recipe; flags override recipe values. Works under torchrun (DDP)."""

    holder = held_by(Path(out_dir).parent)   # RUN/train of a build that is running: its folder, not ours now
    if holder is not None:
        raise ConfigError(f"{Path(out_dir).parent} is in use by a build (pid {holder}); wait for it or choose another "
                          f"--out")
    overrides = {
        "model.arch": arch, "data.dataset": dataset, "data.data_dir": data_dir, "train.epochs": epochs,
        "data.batch_size": batch_size, "train.lr": lr, "train.seed": seed, "data.workers": workers,
        "data.input_size": input_size, "data.mean": floats(mean, "--mean"), "data.std": floats(std, "--std"),
        "data.skip_bad_images": skip_bad_images, "train.init_from": init_from,
        "train.backbone_lr_scale": backbone_lr_scale, "data.holdout": holdout}
    if init_from:
        overrides["train.init_from"] = init_from = pretrained.resolve(init_from, say=lambda m: click.echo(m, err=True))
        if not Path(init_from).is_file():
            raise ConfigError(f"--init-from checkpoint not found: {init_from}")
    recipe = resume_recipe(out_dir, overrides) if resume else None   # a resumed run keeps its own recipe
    if recipe is None:
        base = load_recipe(recipe_name)

        inferred, note = dataset_for(data_dir, dataset, base.data.dataset)
        if note:   # --data-dir without --dataset: the folder's dataset, with that dataset's own defaults
            click.echo(note, err=True)
        recipe = for_dataset(base, inferred if note else None, overrides)
    result = train(recipe, out_dir, resume=resume, quiet=quiet or as_json, force=force, device=device)
    last = result.history[-1] if result.history else {}
    summary = {"best": str(result.best), "last": str(result.last), "best_top1": result.best_top1,
               "epochs": len(result.history), "final": last, "meta": result.meta.to_dict()}
    emit(summary, as_json, lambda: f"best top-1 {result.best_top1:.2f}% -> {result.best}\nlast -> {result.last}")


@click.command("eval")
@click.option("--weights", type=click.Path(dir_okay=False), required=True, help="Checkpoint (.pt/.pth).")
@click.option("--arch", default=None, help="Architecture (needed only for checkpoints without edgeres metadata).")
@click.option("--dataset", type=click.Choice(DATASETS), default=None, help="Default: the checkpoint's dataset.")
@click.option("--data-dir", type=DATA_DIR, default=None)
@click.option("--split", type=click.Choice(["test", "train"]), default="test", show_default=True)
@click.option("--input-size", type=click.IntRange(8, 4096), default=None)
@click.option("--mean", default=None, help="Normalization mean (default: the checkpoint's).")
@click.option("--std", default=None, help="Normalization std (default: the checkpoint's).")
@click.option("--batch-size", type=click.IntRange(1), default=256, show_default=True)
@click.option("--workers", type=click.IntRange(0), default=0, show_default=True)
@device_option
@quiet_option
@json_option
def eval_cmd(weights, arch, dataset, data_dir, split, input_size, mean, std, batch_size, workers, device, quiet,
             as_json) -> None:
    """Top-1 / top-5 / loss of a checkpoint on a dataset split (the eval transform, no augmentation)."""
    from edgeres.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(weights, arch=arch, dataset=dataset, data_dir=data_dir, split=split,
                                 input_size=input_size, mean=floats(mean, "--mean"), std=floats(std, "--std"),
                                 batch_size=batch_size, workers=workers, progress=not (quiet or as_json),
                                 device=device)
    emit(result, as_json, lambda: f"{result['dataset']} {split}: top-1 {result['top1']:.2f}%  "
                                  f"top-5 {result['top5']:.2f}%  loss {result['loss']:.4f}  (n={result['n']})")


COMMANDS = [train_cmd, eval_cmd]
