"""`edgeres build` (the whole pipeline) and `edgeres report` (re-render a run's report)."""
from __future__ import annotations

from pathlib import Path

import click

from edgeres.build import BuildOptions
from edgeres.build import build as run_build
from edgeres.cli._common import (
    DATA_DIR,
    complete_arch,
    complete_dataset,
    complete_recipe,
    device_option,
    emit,
    floats,
    gate_option,
    json_option,
    quiet_option,
)
from edgeres.cli.types import FiniteFloat
from edgeres.errors import ArtifactError
from edgeres.recipe import CALIB_METHODS
from edgeres.records import read_plan, read_records_counted, verdict
from edgeres.report import format_table, write_report


@click.command()
@click.option("--arch", default=None, shell_complete=complete_arch,
              help="Architecture (default: the recipe's; see `edgeres archs`).")
@click.option("--dataset", default=None, shell_complete=complete_dataset,
              help="digits (embedded default) | mnist | cifar10 | imagefolder.")
@click.option("--data-dir", type=DATA_DIR, default=None, help="Where the dataset lives.")
@click.option("--recipe", default=None, shell_complete=complete_recipe,
              help="Built-in recipe name (edgeres/recipes/, see README) or a YAML path [default: demo; for photos, "
                   "finetune_imagefolder from the published ImageNet weights when they are on this machine "
                   "(`edgeres weights`), else imagenette_resnet18 from scratch].")
@click.option("--epochs", type=click.IntRange(1), default=None, help="FP32 training epochs (overrides the recipe).")
@click.option("--qat-epochs", type=click.IntRange(0), default=None, help="QAT epochs; 0 = PTQ only.")
@click.option("--calib-method", type=click.Choice(CALIB_METHODS), default=None,
              help="PTQ range estimator (default: the recipe's).")
@click.option("--input-size", type=click.IntRange(8, 4096), default=None,
              help="Input side in pixels (default: the recipe's, or the dataset's own when --dataset changes it).")
@click.option("--batch-size", type=click.IntRange(1), default=None, help="Training batch size.")
@click.option("--lr", type=FiniteFloat(0, 100, min_open=True), default=None, help="Training learning rate.")
@click.option("--seed", type=click.IntRange(0), default=None, help="Seed for training, calibration subset, QAT.")
@click.option("--workers", type=click.IntRange(0), default=None, help="Data loader worker processes.")
@click.option("--mean", default=None, help="Normalization mean, e.g. 0.485,0.456,0.406 (default: the dataset's).")
@click.option("--std", default=None, help="Normalization std, e.g. 0.229,0.224,0.225 (default: the dataset's).")
@click.option("--skip-bad-images", is_flag=True, default=None, help="Skip and count unreadable images.")
@click.option("--calib-size", type=click.IntRange(1), default=None,
              help="PTQ calibration images (default: the recipe's; all of them when the dataset has fewer).")
@click.option("--qat-lr", type=FiniteFloat(0, 100, min_open=True), default=None, help="QAT learning rate.")
@click.option("--int8", is_flag=True, help="Quantize (PTQ, then QAT) and export an INT8 Q/DQ ONNX.")
@click.option("--fp16", is_flag=True, help="Also allow FP16 kernels when compiling a TensorRT engine.")
@click.option("--pretrained", type=click.Path(dir_okay=False), default=None,
              help="A checkpoint for this dataset's classes: skip training.")
@click.option("--init-from", default=None,
              help="Fine-tune: start training from this checkpoint, or torchvision:ARCH for the published ImageNet "
                   "weights (fetched once, sha256-checked); a classifier with another class count is re-initialised.")
@click.option("--backbone-lr-scale", type=FiniteFloat(0, 100), default=None,
              help="Fine-tuning: lr multiplier for every layer but the classifier (e.g. 0.1).")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Run folder [default: runs/ARCH-DATASETNAME, e.g. runs/resnet18-photos or runs/resnet18-digits].")
@click.option("--max-drop", type=FiniteFloat(0, 100), default=None,
              help="Largest top-1 drop (pp) of the INT8 model vs FP32 before the build fails [default: the "
                   "recipe's gates.max_drop_qat, or gates.max_drop_ptq with --qat-epochs 0].")
@click.option("--force", is_flag=True, help="Re-run every stage instead of reusing finished ones.")
@click.option("--bench-seconds", type=FiniteFloat(0, 3600), default=1.0, show_default=True,
              help="Latency measurement time per artifact in the verify stage (0 = skip timing).")
@click.option("--val-split", type=FiniteFloat(0.01, 0.9), default=None,
              help="Photos given as class folders alone: the share of each class set aside as the evaluation split, "
                   "the same files on every rebuild (data.val_split; 0.2).")
@click.option("--holdout", type=FiniteFloat(0, 0.9), default=None,
              help="Fraction of the training split held out to select best.pt and QAT's epoch (data.holdout).")
@click.option("--qat-loss", type=click.Choice(["kd", "kd+ce", "ce"]), default=None,
              help="QAT loss: kd distils the FP32 model (default), ce trains on labels (quant.qat_loss).")
@click.option("--min-agreement", type=FiniteFloat(0, 100), default=None,
              help="Smallest top-1 agreement (%) of the INT8 models with FP32 (gates.min_agreement_pct).")
@gate_option
@device_option
@quiet_option
@json_option
def build(arch, dataset, data_dir, recipe, epochs, qat_epochs, calib_method, input_size, batch_size, lr, seed, workers,
          mean, std, skip_bad_images, calib_size, qat_lr, int8, fp16, pretrained, init_from, backbone_lr_scale, out,
          max_drop, force, bench_seconds, val_split, holdout, qat_loss, min_agreement, gates, device, quiet,
          as_json) -> None:
    """Data -> train -> fold -> PTQ -> QAT -> export -> compile -> verify -> report, each stage gated against FP32."""

    opts = BuildOptions(out=Path(out) if out else None, recipe=recipe, arch=arch, dataset=dataset, data_dir=data_dir,
                        epochs=epochs,
                        qat_epochs=qat_epochs, calib_method=calib_method, int8=int8, fp16=fp16,
                        pretrained=Path(pretrained) if pretrained else None, max_drop=max_drop, force=force,
                        quiet=quiet or as_json, bench_seconds=bench_seconds, device=device, gates=gates,
                        overrides={k: v for k, v in {
                            "data.input_size": input_size, "data.batch_size": batch_size, "train.lr": lr,
                            "train.seed": seed, "data.workers": workers, "data.mean": floats(mean, "--mean"),
                            "data.std": floats(std, "--std"), "data.skip_bad_images": skip_bad_images,
                            "quant.calib_size": calib_size, "quant.qat_lr": qat_lr, "train.init_from": init_from,
                            "train.backbone_lr_scale": backbone_lr_scale, "data.holdout": holdout,
                            "data.val_split": val_split, "quant.qat_loss": qat_loss,
                            "gates.min_agreement_pct": min_agreement}.items()
                            if v is not None})
    result = run_build(opts)
    if as_json:
        emit(result.report, True)
    else:
        click.echo(f"\nreport: {result.run_dir / 'report.html'}")
        click.echo(format_table(result.report))   # the verdict is the last thing a build prints
    if not result.ok:   # the verdict line above said why (once)
        raise click.exceptions.Exit(1)


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@json_option
def report(run_dir, as_json) -> None:
    """Re-render report.json/md/html of a run folder from its stages.jsonl and print the table."""

    records, torn = read_records_counted(run_dir)
    if not records:
        raise ArtifactError(f"{run_dir} has no readable stages.jsonl records; is it an edgeres run folder?")
    planned = read_plan(run_dir)
    ok, message = verdict(records, planned, torn=torn, run_dir=run_dir)   # re-hashes the artifacts
    latest = {}
    for r in records:
        if planned is None or r.stage in planned:
            latest[r.stage] = r
    rep = write_report(Path(run_dir), list(latest.values()), ok=ok, message=message)
    emit(rep, as_json, lambda: format_table(rep))
    if not ok:   # as `build`: a FAILED verdict is exit 1 (the report and its last line say why)
        raise click.exceptions.Exit(1)


COMMANDS = [build, report]
