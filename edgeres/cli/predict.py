"""`edgeres predict`: top-k classes of images with any artifact."""
from __future__ import annotations

import click

from edgeres.cli._common import emit, json_option, quiet_option
from edgeres.errors import ConfigError
from edgeres.memory import check_artifact
from edgeres.predict import find_images, format_predictions, model_file, predictions_csv
from edgeres.predict import predict as run_predict


@click.command()
@click.argument("model", type=click.Path())   # a run folder or an archive is refused by predict.model_file, in words
@click.argument("images", nargs=-1, required=True)
@click.option("--top-k", type=click.IntRange(1), default=5, show_default=True, help="Classes to show per image.")
@click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True)
@click.option("--threads", type=click.IntRange(1), default=None, help="CPU threads (ONNX Runtime / torch).")
@click.option("--skip-bad-images", is_flag=True, help="Leave out unreadable images instead of stopping.")
@click.option("--csv", "as_csv", is_flag=True, help="One row per image and rank: file,rank,index,class,score.")
@quiet_option
@json_option
def predict(model, images, top_k, batch_size, threads, skip_bad_images, as_csv, quiet, as_json) -> None:
    """Classify IMAGES (files, folders, globs) with MODEL (.pt, .onnx, .plan) using the model's own preprocessing.

    Example: edgeres predict runs/demo/export/model_int8.onnx photos/ --top-k 3
    """
    if as_csv and as_json:
        raise ConfigError("choose one of --csv and --json")
    model = str(model_file(model))   # a run folder or an archive: which file to give, before anything opens it
    images = find_images(list(images))   # the images too (an archive: "unpack it first")
    check_artifact(model, batch=batch_size)   # before the model is built
    preds = run_predict(model, list(images), top_k=top_k, batch_size=batch_size, threads=threads,
                        skip_bad_images=skip_bad_images, progress=not (quiet or as_json or as_csv))
    if as_csv:
        click.echo(predictions_csv(preds), nl=False)
        return
    emit([p.to_dict() for p in preds], as_json, lambda: format_predictions(preds))


COMMANDS = [predict]
