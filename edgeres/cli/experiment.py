"""Experiment commands: `edgeres experiment degradation` (plain vs residual nets, the ResNet paper's Fig. 6)."""
from __future__ import annotations

import click

from edgeres.cli._common import DATA_DIR, emit, floats, json_option, quiet_option
from edgeres.cli.types import FiniteFloat
from edgeres.experiment import FILES, DegradationConfig, format_result, parse_depths, run_degradation
from edgeres.io import check_own_files, check_owned_dir, claim_dir, record_files


@click.group()
def experiment() -> None:
    """Experiments that show why residual learning works."""


@experiment.command()
@click.option("--depths", default="20,56", show_default=True,
              help="Comma-separated depths 6n+2 (8, 14, 20, 32, 44, 56, 110...); each trained plain and residual.")
@click.option("--dataset", type=click.Choice(["cifar10", "mnist", "digits", "imagefolder"]), default="cifar10",
              show_default=True)
@click.option("--data-dir", type=DATA_DIR, default=None, help="Where the dataset lives.")
@click.option("--input-size", type=click.IntRange(8, 512), default=None, help="Input side (default: the dataset's).")
@click.option("--iterations", type=click.IntRange(1), default=64000, show_default=True,
              help="Training iterations per net (the paper: 64k; lr / 10 at 50% and 75%).")
@click.option("--eval-every", type=click.IntRange(1), default=500, show_default=True,
              help="Record running training error and test error every K iterations.")
@click.option("--batch-size", type=click.IntRange(1), default=128, show_default=True)
@click.option("--lr", type=FiniteFloat(0, 100, min_open=True), default=0.1, show_default=True)
@click.option("--lr-steps", default="0.5,0.75", show_default=True,
              help="Fractions of the run where lr is divided by 10 (the paper: 32k and 48k of 64k); '' for none.")
@click.option("--momentum", type=FiniteFloat(0, 1, max_open=True), default=0.9, show_default=True)
@click.option("--weight-decay", type=FiniteFloat(0, 1), default=1e-4, show_default=True)
@click.option("--augment/--no-augment", default=True, show_default=True,
              help="Pad-and-crop (+ horizontal flip on CIFAR-10) as in the paper.")
@click.option("--test-images", type=click.IntRange(1), default=None, help="Evaluate on the first N test images.")
@click.option("--grad-batches", type=click.IntRange(1), default=1, show_default=True,
              help="Batches averaged for the start-of-training gradient norms.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default=None, help="cpu, cuda, cuda:1... (default: GPU if available).")
@click.option("--threads", type=click.IntRange(1), default=None,
              help="CPU threads for torch (default: torch's; 1 is often fastest on a busy machine).")
@click.option("--out", type=click.Path(file_okay=False), default="runs/degradation", show_default=True,
              help="Folder for curves.json, curves.csv, degradation.png/.svg, gradients.png/.svg.")
@click.option("--force", is_flag=True, help="Replace the outputs of an earlier run in --out.")
@quiet_option
@json_option
def degradation(depths, dataset, data_dir, input_size, iterations, eval_every, batch_size, lr, lr_steps, momentum,
                weight_decay, augment, test_images, grad_batches, seed, device, threads, out, force, quiet,
                as_json) -> None:
    """Train plain and residual nets of each depth with one recipe; plot training/test error vs iterations.

    States whether the paper's orderings held on the final window: (a) the deeper plain net has higher
    training error, (b) the deeper ResNet has lower error. Also records per-layer gradient norms before
    the first update. Example: edgeres experiment degradation --depths 20,56 --data-dir ~/data/cifar10
    """
    cfg = DegradationConfig(depths=parse_depths(depths), dataset=dataset, data_dir=data_dir, input_size=input_size,
                            iterations=iterations, eval_every=eval_every, batch_size=batch_size, lr=lr,
                            milestones=floats(lr_steps, "--lr-steps"), momentum=momentum, weight_decay=weight_decay,
                            augment=augment, test_images=test_images, grad_batches=grad_batches, seed=seed)
    log = None if (quiet or as_json) else (lambda line: click.echo(line, err=True))
    # the ownership rule (io.py), before any training: a folder edgeres did not make is refused; in its own folder
    # edgeres replaces only the files it recorded writing there, unchanged since (never a file the user put there)
    names = tuple(FILES.values())
    legacy = (FILES["json"],)   # an experiment folder written before folders carried the marker
    check_owned_dir(out, what="--out", legacy=legacy)
    check_own_files(out, names, force=force, fallback=names)
    claim_dir(out, what="--out", kind="experiment", legacy=legacy)
    result = run_degradation(cfg, out=out, force=force, device=device, threads=threads, log=log)
    record_files(out, names, kind="experiment")
    emit({k: result[k] for k in ("orderings", "config", "device", "threads", "seconds", "files")}
         | {"out": str(out), "final": [{k: r[k] for k in ("arch", "variant", "depth", "params", "final")}
                                       for r in result["runs"]]},
         as_json, lambda: format_result(result) + f"\nwrote {out}/")


COMMANDS = [experiment]
