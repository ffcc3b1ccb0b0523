"""`edgeres fold`, `edgeres quantize`, `edgeres export`, `edgeres check`: thin commands over the library."""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import click

from edgeres import settings
from edgeres.check import check_onnx, count_qdq
from edgeres.checkpoint import ModelMeta, load_model, num_outputs, read_checkpoint
from edgeres.cli._common import (
    DATA_DIR,
    complete_dataset,
    device_option,
    emit,
    gate_option,
    json_option,
    quiet_option,
    recipe_option,
    stage_recipe,
)
from edgeres.cli.types import FiniteFloat
from edgeres.data import get_data, get_data_for, split_holdout
from edgeres.device import resolve
from edgeres.dist import init_dist
from edgeres.errors import ConfigError, GateError
from edgeres.export import ExportInputs, ExportSettings, export_summary
from edgeres.export import run as run_export
from edgeres.fold import FoldInputs, FoldSettings, fold_batchnorm, load_folded
from edgeres.fold import run as run_fold
from edgeres.io import check_replaceable, refuse_overwrite, rejected_path
from edgeres.quantize import (
    PtqSettings,
    QatSettings,
    QuantInputs,
    QuantOutput,
    is_quantized_checkpoint,
    run_ptq,
    run_qat,
)
from edgeres.records import Gate


def _pct(percent: float) -> str:
    """A percent that never rounds a miss up to 100 (99.999 -> 99.99 %)."""
    import math

    value = math.floor(percent * 100 + 1e-9) / 100
    return f"{value:.2f}%"


def _meta_for(model, meta, arch: str | None):
    """ModelMeta of a checkpoint, or one built from the registry for a foreign state_dict (--arch)."""
    from edgeres.models import get_spec

    if meta is not None:
        return meta
    spec = get_spec(arch)
    cin = model.conv1.in_channels if hasattr(model, "conv1") else spec.in_channels
    ncls = num_outputs(model)
    mean, std = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) if cin == 3 else ((0.5,) * cin, (0.5,) * cin)
    return ModelMeta(arch=arch, num_classes=ncls, in_channels=cin, input_size=spec.input_size, mean=mean, std=std)


def _random_inputs(meta, n: int = 32, seed: int = 0):
    """`n` random inputs shaped like the model's, as (image, label 0) pairs."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, meta.in_channels, meta.input_size, meta.input_size, generator=g)
    return [(x[i], 0) for i in range(n)]


def _data(meta, dataset: str, data_dir: str | None, recipe=None, holdout: float | None = None, seed: int = 0):
    """`dataset` preprocessed as the model's own metadata says (input size, channels, mean/std); with a recipe, its
    training-data settings too (augmentation, padding, cache, holdout), as `build` trains with them. `holdout`:
    hold out that fraction of the training split (seeded by `seed`) as `build` does (None: none)."""

    own = dict(dataset=dataset, data_dir=data_dir, input_size=meta.input_size, mean=meta.mean, std=meta.std,
               resize_size=meta.resize_size)
    if recipe is not None:
        return get_data_for(recipe, in_channels=meta.in_channels, **own)
    data = get_data(in_channels=meta.in_channels, **own)
    return split_holdout(data, holdout, seed=seed) if holdout else data


def _first(split, limit: int | None):
    """The first `limit` samples of a split (all of them when None), as build's probe takes them."""
    n = len(split) if limit is None else min(limit, len(split))
    return [split[i] for i in range(n)]


def _refuse_overwrite(out: str, force: bool) -> None:
    """Before any work: --out, and the <out>.rejected.<ext> a failed gate keeps beside it, are ours to write only
    when absent or with --force (a file of the user's by that name is never replaced silently)."""
    refuse_overwrite(out, force)
    refuse_overwrite(rejected_path(out), force)


def _stage_failed(rec) -> None:

    if not rec.passed:
        raise GateError(rec.message or f"{rec.stage} failed")


def load_float_or_folded(weights: str, arch: str | None = None):
    """A trained checkpoint (folded here) or an `edgeres fold` checkpoint -> (folded model, meta, FoldResult|None)."""

    _, meta, rest = read_checkpoint(weights)
    if isinstance(rest.get("fold"), dict):
        model, meta = load_folded(weights)
        return model, meta, None
    model, meta = load_model(weights, arch=arch)
    meta = _meta_for(model, meta, arch)
    result = fold_batchnorm(model)
    return result.model, meta, result


@click.command()
@click.option("--weights", required=True, type=click.Path(dir_okay=False), help="Trained FP32 checkpoint.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Where to write the folded checkpoint.")
@click.option("--arch", default=None, help="Architecture, for a checkpoint without edgeres metadata.")
@click.option("--dataset", default=None, shell_complete=complete_dataset,
              help="Check on this dataset's first --probe-size evaluation images, as `build` does [default: the "
                   "run's dataset when --weights comes from a run, else random inputs].")
@click.option("--data-dir", type=DATA_DIR, default=None, help="Where --dataset lives.")
@settings.options(FoldSettings)
@recipe_option
@gate_option
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@json_option
def fold(weights, out, arch, dataset, data_dir, recipe_name, gates, force, as_json, **given) -> None:
    """Fold BatchNorm into the preceding convs; check the result on a probe batch (the `fold` stage of `build`).

    BatchNorms that no conv precedes (pre-activation ResNets, DenseNet) are kept as a per-channel
    scale-and-shift (exported as Mul+Add, which TensorRT fuses); the command lists them.
    """
    import numpy as np

    _refuse_overwrite(out, force)
    recipe, dataset, data_dir = stage_recipe(recipe_name, weights, dataset,
                                             {**settings.overrides(given), "data.data_dir": data_dir}, gates=gates)
    s = FoldSettings.from_recipe(recipe)
    model, meta = load_model(weights, arch=arch)
    meta = _meta_for(model, meta, arch or (meta.arch if meta else None))
    pairs = (_first(_data(meta, dataset, data_dir, recipe).test, s.probe_size) if dataset
             else _random_inputs(meta, s.probe_size))
    probe = np.stack([np.asarray(x, dtype=np.float32) for x, _ in pairs])
    res = run_fold(FoldInputs(model, meta, probe, Path(out)), s)
    _stage_failed(res.record)
    result = res.output.result
    obj = {"out": out, "arch": meta.arch, "folded": result.folded, "kept_affine": result.kept_affine,
           "kept_reasons": result.reasons, "metrics": res.record.metrics, "record": res.record.to_dict(),
           "gates": [_describe(g) for g in res.record.gates]}
    emit(obj, as_json, lambda: "\n".join([result.describe(), *(f"gate: {d}" for d in obj["gates"]),
                                          f"wrote {out}"]))


def _describe(gate: dict) -> str:

    return Gate.from_dict(gate).describe()


@click.command()
@click.option("--ptq", is_flag=True, help="Post-training quantization (calibration only): the final INT8 model.")
@click.option("--qat", is_flag=True, help="Quantization-aware fine-tuning (from a PTQ checkpoint, "
              "or PTQ first when given a float one).")
@click.option("--weights", required=True, type=click.Path(dir_okay=False),
              help="Trained, folded (edgeres fold) or, for --qat, INT8 PTQ checkpoint.")
@click.option("--dataset", default=None, shell_complete=complete_dataset,
              help="digits | mnist | cifar10 | imagefolder [default: the run's, when --weights comes from a run].")
@click.option("--data-dir", type=DATA_DIR, default=None, help="Dataset folder.")
@click.option("--arch", default=None, help="Architecture, for a checkpoint without edgeres metadata.")
@click.option("--manifest", default=None, type=click.Path(dir_okay=False),
              help="Calibration manifest path [default: <out dir>/calibration/<out name>.manifest.json].")
@settings.options(PtqSettings, QatSettings,
                  keys=(("gates.min_agreement_pct", "--min-agreement", "Fail when the INT8 model's top-1 agrees "
                                                                        "with the float model's on fewer than this % "
                                                                        "of the test split."),
                        ("data.holdout", "--holdout", "Fraction of the training split held out (seeded by --seed) "
                                                      "to select QAT's epoch; never calibrated on.")))
@click.option("--max-drop", type=FiniteFloat(0, 100), default=None,
              help="Fail (and write nothing but <out>.rejected.pt) when top-1 drops more than this many percentage "
                   "points below the float model's [recipe gates.max_drop_ptq (--ptq) / gates.max_drop_qat].")
@recipe_option
@gate_option
@click.option("--teacher", type=click.Path(dir_okay=False), default=None,
              help="--qat from an INT8 checkpoint: the float (or folded) model to distil [default: the float model "
                   "--weights is, when it is one].")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Where to write the INT8 checkpoint.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@device_option
@quiet_option
@json_option
def quantize(ptq, qat, weights, dataset, data_dir, arch, manifest, max_drop, recipe_name, gates, teacher, out, force,
             device, quiet, as_json, **given) -> None:
    """INT8 quantization with NNCF, configured for TensorRT (the `ptq` / `qat` stages of `build`).

    Settings come from a recipe as in `build` (the run's own when --weights comes from a run): without flags this
    command makes the build's model. QAT distils the float model and keeps the epoch that agrees with it best on
    held-out training images. Under `torchrun --nproc-per-node N` QAT splits each global --batch-size across the
    processes (rank 0 writes).

    \b
    Example:
      edgeres quantize --qat --weights runs/x/train/best.pt --dataset imagefolder --data-dir photos --out qat.pt
    """
    from edgeres.evaluate import evaluate

    if ptq == qat:
        raise ConfigError("choose one of --ptq (calibration only) or --qat (from a float checkpoint: PTQ, "
                          "then QAT)" + (", not both" if ptq else ""))
    mode = "ptq" if ptq else "qat"
    _refuse_overwrite(out, force)
    _, _, rest = read_checkpoint(weights)   # a missing or unreadable checkpoint says so first
    quiet = quiet or as_json
    log = (lambda s: None) if quiet else (lambda s: click.echo(s, err=True))
    flags = {**settings.overrides(given), "data.data_dir": data_dir,
             "gates.max_drop_ptq": max_drop, "gates.max_drop_qat": max_drop}
    if mode == "ptq":
        flags["quant.qat_epochs"] = 0   # --ptq: PTQ is the final INT8 model, gated as build gates one
    origins = {k: f"--max-drop {max_drop:g}" for k in ("gates.max_drop_ptq", "gates.max_drop_qat")} \
        if max_drop is not None else {}
    recipe, dataset, data_dir = stage_recipe(recipe_name, weights, dataset, flags, say=log, gates=gates,
                                             origins=origins)
    if dataset is None:
        raise ConfigError("--dataset is needed: --weights does not come from a run whose recipe names one")
    out_path = Path(out)
    manifest = manifest or str(out_path.parent / "calibration" / f"{out_path.stem}.manifest.json")
    start_quantized = is_quantized_checkpoint(rest)
    if not start_quantized:   # the manifest is written too: a file of the user's there is replaced only with --force
        check_replaceable(manifest, force, what="--manifest")
    if start_quantized and mode == "ptq":
        raise ConfigError(f"{weights} is already INT8; --ptq needs a float or folded checkpoint")
    dev = resolve(device)
    if start_quantized:
        start = QuantOutput.load(weights)
        model, meta, man = start.model, start.meta, start.manifest
        teacher_model = load_float_or_folded(teacher, arch)[0] if teacher else None
        if teacher_model is None and mode == "qat" and recipe.quant.qat_loss != "ce":
            raise ConfigError(f"{weights} is INT8: --qat-loss {recipe.quant.qat_loss} distils the float model; "
                              f"give it with --teacher, or use --qat-loss ce")
    else:
        model, meta, _ = load_float_or_folded(weights, arch)
        teacher_model = model
    data = _data(meta, dataset, data_dir, recipe)
    if data.info.num_classes != meta.num_classes:
        raise ConfigError(f"{dataset} has {data.info.num_classes} classes, the model {meta.num_classes}")
    # the drop is measured against the float model (not known when starting from an INT8 checkpoint)
    reference = None if teacher_model is None else evaluate(teacher_model.to(dev), data.test, batch_size=256)
    inputs = QuantInputs(model=model, meta=meta, eval_data=data.test, out=out_path,
                         reference_top1=reference.top1 if reference else None,
                         reference_logits=reference.logits if reference else None,
                         calib=data.calib, dataset_fingerprint=data.info.fingerprint,
                         manifest_path=None if start_quantized else Path(manifest),   # written after the gate
                         train_data=data.train, manifest=None if not start_quantized else man,
                         teacher=teacher_model, holdout=data.holdout, device=dev)
    if not start_quantized:
        given_size = "quant.calib_size" in flags   # given: more than there are is an error, as in build
        ptq_settings = PtqSettings.from_recipe(recipe, calib_available=None if given_size else len(data.calib))
        res = run_ptq(inputs if mode == "ptq" else replace(inputs, out=out_path.with_name(f".{out_path.stem}.ptq"),
                                                           manifest_path=None),
                      ptq_settings, quiet=quiet)
        if mode == "qat" and res.record.artifact:
            Path(res.record.artifact).unlink(missing_ok=True)   # only the QAT model is the command's output
        log(f"PTQ: {ptq_settings.calib_size} calibration images ({ptq_settings.method})")
        inputs = replace(inputs, model=res.output.model, manifest=res.output.manifest,
                         evaluation=res.output.evaluation)
    if mode == "qat":
        res = run_qat(inputs, QatSettings.from_recipe(recipe), quiet=quiet, log=log)
    _stage_failed(res.record)
    if not init_dist().main:   # under torchrun: rank 0 wrote and reports
        return
    m = res.output.manifest
    acc = res.record.metrics["top1"]
    obj = {"out": out, "mode": mode, "top1_fake_quant": acc, "manifest": manifest if not start_quantized else None,
           "calib_size": m.get("subset_size"), "calib_method": m.get("method"),
           "qat_history": res.record.metrics.get("history", []), "record": res.record.to_dict()}
    drop = (f", {res.record.metrics['drop_pp']:.2f} pp below float" if "drop_pp" in res.record.metrics else "")
    gates_text = "".join(f"gate: {_describe(g)}\n" for g in res.record.gates)
    emit(obj, as_json, lambda: f"{mode.upper()} INT8 (fake-quant) top-1 {acc:.2f}% on {dataset} test{drop}\n"
                               f"{gates_text}wrote {out}")


@click.command(name="export")
@click.option("--weights", required=True, type=click.Path(dir_okay=False),
              help="Trained/folded checkpoint (FP32) or an INT8 checkpoint from `edgeres quantize` (--int8).")
@click.option("--int8", is_flag=True, help="Export the INT8 Q/DQ model (needs an `edgeres quantize` checkpoint).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output .onnx path.")
@click.option("--arch", default=None, help="Architecture, for a checkpoint without edgeres metadata.")
@settings.options(ExportSettings)
@recipe_option
@click.option("--recipe-hash", default="", help="Recipe hash to store in the metadata [default: the checkpoint's "
                                                "own, the recipe that trained it].")
@click.option("--dataset", default=None, shell_complete=complete_dataset,
              help="Verify on this dataset's evaluation images (gated, INT8 too) [default: the run's, when "
                   "--weights comes from a run, else 32 random inputs].")
@click.option("--data-dir", type=DATA_DIR, default=None, help="Where --dataset lives.")
@click.option("--limit", type=click.IntRange(1), default=None,
              help="At most this many --dataset images [default: FP32 the first --probe-size, INT8 all].")
@gate_option
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@json_option
def export_cmd(weights, int8, out, arch, recipe_name, recipe_hash, dataset, data_dir, limit, gates, force, as_json,
               **given) -> None:
    """Export ONNX (input "input" [N,C,H,W], output "logits"), check TensorRT rules, verify on ONNX Runtime
    (the `export_fp32` / `export_int8` stages of `build`).

    Both are numerical-equivalence checks, decided exactly on logits. FP32 must match torch (max|diff| <= 1e-4
    relative, no top-1 flip beyond near ties); INT8 must match its fake-quant model within the numeric noise
    tolerance (gates.int8_rel_tol) and agree with it, near ties aside, on >= 99 % of --dataset's evaluation images
    and, up to --int8-agreement-images, its training images. A failed check leaves --out as it was, keeps the graph
    as <out>.rejected.onnx and exits 1. On random inputs (no --dataset) the INT8 agreement is reported, not gated."""

    _refuse_overwrite(out, force)
    flags = settings.overrides(given)
    given_min = flags.get("gates.min_int8_agreement")
    recipe, dataset, data_dir = stage_recipe(recipe_name, weights, dataset, {**flags, "data.data_dir": data_dir},
                                             gates=gates, origins={"gates.min_int8_agreement": f"--min-agreement "
                                                                   f"{given_min:g}"} if given_min is not None else {})
    _, _, rest = read_checkpoint(weights)
    if is_quantized_checkpoint(rest):
        if not int8:
            raise ConfigError(f"{weights} is an INT8 checkpoint; export it with --int8")
        q = QuantOutput.load(weights)
        model, meta = q.model, q.meta
    else:
        if int8:
            raise ConfigError(f"--int8 needs an INT8 checkpoint from `edgeres quantize`; {weights} is FP32")
        model, meta, _ = load_float_or_folded(weights, arch)
    # exported beside --out, verified, and only then moved into place: a failed check leaves what was there
    settings_ = replace(ExportSettings.from_recipe(recipe, int8=int8), recipe_hash=recipe_hash,
                        gate_agreement=bool(dataset) or not int8)
    more = None
    if dataset:
        data = _data(meta, dataset, data_dir, recipe)
        images = _first(data.test, limit if limit is not None else None if int8 else settings_.probe_size)
        more = data.calib if int8 and limit is None else None   # as build: up to --int8-agreement-images
    else:
        images = _random_inputs(meta)
    res = run_export(ExportInputs(model, meta, images, Path(out), more_images=more), settings_, quiet=as_json)
    _stage_failed(res.record)
    extra = res.record.metrics.get("n_training_images")
    metrics = {**res.record.metrics, "inputs": (f"{dataset} test split" + (f" + {extra} training" if extra else ""))
               if dataset else "random"}
    gates = [_describe(g) for g in res.record.gates]
    obj = {**export_summary(out), "verify": metrics, "gates": gates, "record": res.record.to_dict()}
    emit(obj, as_json, lambda: "\n".join([
        f"wrote {out} ({obj['bytes']} bytes, opset {obj['opset']}, {obj['QuantizeLinear']} Q / "
        f"{obj['DequantizeLinear']} DQ)",
        f"ONNX Runtime vs torch on {metrics['n_compared']} {metrics['inputs']} inputs: max|diff| "
        f"{metrics['max_abs_diff']:.3g} (rel {metrics['rel_diff']:.3g}), top-1 agreement "
        f"{_pct(metrics['top1_agreement_pct'])}", *(f"gate: {g}" for g in gates)]))


@click.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--trt-version", default=None,
              help="Check for this TensorRT version too (e.g. 8.6: INT8 weights must be FP32 behind QuantizeLinear).")
@json_option
def check(model, trt_version, as_json) -> None:
    """Check an ONNX model against TensorRT's INT8 Q/DQ rules; exit 1 on any violation.

    \b
    Example:
      edgeres check runs/demo/export/model_int8.onnx --trt-version 8.6
    """

    violations = check_onnx(model, trt_version=trt_version)
    obj = {"model": model, "ok": not violations, **count_qdq(model),
           "violations": [v.to_dict() for v in violations]}
    quantized = obj["QuantizeLinear"] + obj["DequantizeLinear"] > 0
    obj["quantized"] = quantized
    emit(obj, as_json, lambda: "\n".join([str(v) for v in violations] + [
        f"{model}: {len(violations)} violation(s)" if violations else
        f"{model}: ok ({obj['QuantizeLinear']} Q / {obj['DequantizeLinear']} DQ nodes meet TensorRT's rules)"
        if quantized else f"{model}: not quantized (no Q/DQ nodes, an FP32/FP16 model): the INT8 rules do not "
                          f"apply; export an INT8 model with `edgeres export --int8`"]))
    if violations:
        sys.exit(1)


COMMANDS = [fold, quantize, export_cmd, check]
