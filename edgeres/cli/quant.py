"""`edgeres fold`, `edgeres quantize`, `edgeres export`, `edgeres check`: thin commands over the library."""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import click

from edgeres.cli._common import device_option, emit, json_option, quiet_option
from edgeres.recipe import CALIB_METHODS, DataCfg, QuantCfg


def _pct(percent: float) -> str:
    """A percent that never rounds a miss up to 100 (99.999 -> 99.99 %)."""
    import math

    value = math.floor(percent * 100 + 1e-9) / 100
    return f"{value:.2f}%"


def _meta_for(model, meta, arch: str | None):
    """ModelMeta of a checkpoint, or one built from the registry for a foreign state_dict (--arch)."""
    from edgeres.checkpoint import ModelMeta, num_outputs
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
    from edgeres.data import get_data, get_data_for, split_holdout

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


def _stage_failed(rec) -> None:
    from edgeres.errors import GateError

    if not rec.passed:
        raise GateError(rec.message or f"{rec.stage} failed")


def load_float_or_folded(weights: str, arch: str | None = None):
    """A trained checkpoint (folded here) or an `edgeres fold` checkpoint -> (folded model, meta, FoldResult|None)."""
    from edgeres.checkpoint import load_model, read_checkpoint
    from edgeres.fold import fold_batchnorm, load_folded

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
@click.option("--probe-size", type=click.IntRange(1, 4096), default=32, show_default=True,
              help="Images in the probe batch the fold is checked on.")
@click.option("--dataset", default=None,
              help="Check on this dataset's first --probe-size evaluation images (as `build` does) instead of "
                   "random inputs.")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None, help="Where --dataset lives.")
@click.option("--rel-tol", type=click.FloatRange(0, min_open=True), default=1e-4, show_default=True,
              help="Largest max|logit diff| allowed, relative to the logit scale.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@json_option
def fold(weights, out, arch, probe_size, dataset, data_dir, rel_tol, force, as_json) -> None:
    """Fold BatchNorm into the preceding convs; check the result on a probe batch (the `fold` stage of `build`).

    BatchNorms that no conv precedes (pre-activation ResNets, DenseNet) are kept as a per-channel
    scale-and-shift (exported as Mul+Add, which TensorRT fuses); the command lists them.
    """
    import numpy as np

    from edgeres.checkpoint import load_model
    from edgeres.fold import FoldInputs, FoldSettings, run
    from edgeres.io import refuse_overwrite

    refuse_overwrite(out, force)
    model, meta = load_model(weights, arch=arch)
    meta = _meta_for(model, meta, arch or (meta.arch if meta else None))
    pairs = _first(_data(meta, dataset, data_dir).test, probe_size) if dataset else _random_inputs(meta, probe_size)
    probe = np.stack([np.asarray(x, dtype=np.float32) for x, _ in pairs])
    res = run(FoldInputs(model, meta, probe, Path(out)), FoldSettings(rel_tol=rel_tol))
    _stage_failed(res.record)
    result = res.output.result
    obj = {"out": out, "arch": meta.arch, "folded": result.folded, "kept_affine": result.kept_affine,
           "kept_reasons": result.reasons, "metrics": res.record.metrics, "record": res.record.to_dict(),
           "gates": [_describe(g) for g in res.record.gates]}
    emit(obj, as_json, lambda: "\n".join([result.describe(), *(f"gate {d}: ok" for d in obj["gates"]),
                                          f"wrote {out}"]))


def _describe(gate: dict) -> str:
    from edgeres.records import Gate

    return Gate(gate["name"], gate["value"], gate["limit"], gate["op"]).describe()


@click.command()
@click.option("--ptq", is_flag=True, help="Post-training quantization (calibration only).")
@click.option("--qat", is_flag=True, help="Quantization-aware fine-tuning (from a PTQ checkpoint, "
              "or PTQ first when given a float one).")
@click.option("--weights", required=True, type=click.Path(dir_okay=False),
              help="Trained, folded (edgeres fold) or, for --qat, INT8 PTQ checkpoint.")
@click.option("--dataset", required=True, help="digits | mnist | cifar10 | imagefolder.")
@click.option("--data-dir", default=None, help="Dataset folder.")
@click.option("--arch", default=None, help="Architecture, for a checkpoint without edgeres metadata.")
@click.option("--calib-size", type=click.IntRange(1), default=512, show_default=True,
              help="Calibration images (drawn from the training split with the eval transform).")
@click.option("--calib-method", type=click.Choice(CALIB_METHODS), default=QuantCfg.calib_method, show_default=True,
              help="NNCF range estimator: minmax, mean_minmax, percentile, histogram (MSE-style).")
@click.option("--manifest", default=None, type=click.Path(dir_okay=False),
              help="Calibration manifest path [default: <out dir>/calibration/<out name>.manifest.json].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--epochs", type=click.IntRange(1), default=3, show_default=True, help="QAT epochs.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-4, show_default=True, help="QAT LR.")
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Where to write the INT8 checkpoint.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--recipe", default=None,
              help="A recipe (name, or a run's recipe.yaml): QAT trains with its data augmentation, as `build` does "
                   "[default: no augmentation].")
@click.option("--max-drop", type=click.FloatRange(0), default=None,
              help="Fail (and write nothing) when top-1 drops more than this many percentage points below the "
                   "float model's on the test split [default: the drop is reported, not gated].")
@click.option("--min-agreement", type=click.FloatRange(0, 100), default=None,
              help="Fail when the INT8 model's top-1 agrees with the float model's on fewer than this % of the test "
                   "split [default: reported, not gated].")
@click.option("--qat-loss", type=click.Choice(["kd", "kd+ce", "ce"]), default=QuantCfg.qat_loss, show_default=True,
              help="kd: distil the float model's logits (KL); kd+ce: half labels; ce: labels only.")
@click.option("--temperature", type=click.FloatRange(0.05, 100), default=QuantCfg.qat_temperature,
              show_default=True, help="Distillation temperature.")
@click.option("--teacher", type=click.Path(dir_okay=False), default=None,
              help="--qat from an INT8 checkpoint: the float (or folded) model to distil [default: the float model "
                   "--weights is, when it is one].")
@click.option("--holdout", type=click.FloatRange(0, 0.9), default=DataCfg.holdout, show_default=True,
              help="Fraction of the training split held out (seeded by --seed) to select QAT's epoch; not used for "
                   "calibration. With --recipe, the recipe's data.holdout.")
@device_option
@quiet_option
@json_option
def quantize(ptq, qat, weights, dataset, data_dir, arch, calib_size, calib_method, manifest, seed, epochs, lr,
             batch_size, out, recipe, max_drop, min_agreement, qat_loss, temperature, teacher, holdout, device, force,
             quiet, as_json) -> None:
    """INT8 quantization with NNCF, configured for TensorRT (the `ptq` / `qat` stages of `build`).

    QAT distils the float model and keeps the epoch that agrees with it best on held-out training images. Under
    `torchrun --nproc-per-node N` QAT splits each global --batch-size across the processes (rank 0 writes).

    \b
    Example:
      edgeres quantize --qat --weights runs/x/train/best.pt --dataset imagefolder --data-dir photos --out qat.pt
    """
    from edgeres.checkpoint import read_checkpoint
    from edgeres.errors import ConfigError
    from edgeres.evaluate import evaluate
    from edgeres.io import refuse_overwrite
    from edgeres.quantize import (
        PtqSettings,
        QatSettings,
        QuantInputs,
        QuantOutput,
        is_quantized_checkpoint,
        run_ptq,
        run_qat,
    )

    if ptq == qat:
        raise ConfigError("choose one of --ptq (calibration only) or --qat (from a float checkpoint: PTQ, "
                          "then QAT)" + (", not both" if ptq else ""))
    mode = "ptq" if ptq else "qat"
    refuse_overwrite(out, force)
    out_path = Path(out)
    manifest = manifest or str(out_path.parent / "calibration" / f"{out_path.stem}.manifest.json")
    _, _, rest = read_checkpoint(weights)
    start_quantized = is_quantized_checkpoint(rest)
    if start_quantized and mode == "ptq":
        raise ConfigError(f"{weights} is already INT8; --ptq needs a float or folded checkpoint")
    from edgeres.device import resolve

    dev = resolve(device)
    if start_quantized:
        start = QuantOutput.load(weights)
        model, meta, man = start.model, start.meta, start.manifest
        teacher_model = load_float_or_folded(teacher, arch)[0] if teacher else None
        if teacher_model is None and mode == "qat" and qat_loss != "ce":
            raise ConfigError(f"{weights} is INT8: --qat-loss {qat_loss} distils the float model; give it with "
                              f"--teacher, or use --qat-loss ce")
    else:
        model, meta, _ = load_float_or_folded(weights, arch)
        teacher_model = model
    if recipe is not None:
        from edgeres.recipe import load_recipe

        recipe = load_recipe(recipe)
    data = _data(meta, dataset, data_dir, recipe, holdout=holdout, seed=seed)
    if data.info.num_classes != meta.num_classes:
        raise ConfigError(f"{dataset} has {data.info.num_classes} classes, the model {meta.num_classes}")
    quiet = quiet or as_json
    log = (lambda s: None) if quiet else (lambda s: click.echo(s, err=True))
    # the drop is measured against the float model (not known when starting from an INT8 checkpoint)
    reference = None if teacher_model is None else evaluate(teacher_model.to(dev), data.test, batch_size=256)
    inputs = QuantInputs(model=model, meta=meta, eval_data=data.test, out=out_path,
                         reference_top1=reference.top1 if reference else None,
                         reference_logits=reference.logits if reference else None,
                         calib=data.calib, dataset_fingerprint=data.info.fingerprint, manifest_path=Path(manifest),
                         train_data=data.train, manifest=None if not start_quantized else man,
                         teacher=teacher_model, holdout=data.holdout, device=dev)
    if not start_quantized:
        res = run_ptq(inputs if mode == "ptq" else replace(inputs, out=out_path.with_name(f".{out_path.stem}.ptq")),
                      PtqSettings(calib_size=calib_size, method=calib_method, seed=seed,
                                  max_drop=max_drop if mode == "ptq" else None,
                                  min_agreement_pct=min_agreement if mode == "ptq" else None), quiet=quiet)
        if mode == "qat" and res.record.artifact:
            Path(res.record.artifact).unlink(missing_ok=True)   # only the QAT model is the command's output
        log(f"PTQ: {calib_size} calibration images ({calib_method}), manifest {manifest}")
        inputs = replace(inputs, model=res.output.model, manifest=res.output.manifest,
                         evaluation=res.output.evaluation)
    if mode == "qat":
        res = run_qat(inputs, QatSettings(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, max_drop=max_drop,
                                          loss=qat_loss, temperature=temperature, min_agreement_pct=min_agreement),
                      quiet=quiet, log=log)
    _stage_failed(res.record)
    from edgeres.dist import init_dist

    if not init_dist().main:   # under torchrun: rank 0 wrote and reports
        return
    m = res.output.manifest
    acc = res.record.metrics["top1"]
    obj = {"out": out, "mode": mode, "top1_fake_quant": acc, "manifest": manifest if not start_quantized else None,
           "calib_size": m.get("subset_size"), "calib_method": m.get("method"),
           "qat_history": res.record.metrics.get("history", []), "record": res.record.to_dict()}
    drop = (f", {res.record.metrics['drop_pp']:.2f} pp below float" if "drop_pp" in res.record.metrics else "")
    emit(obj, as_json, lambda: f"{mode.upper()} INT8 (fake-quant) top-1 {acc:.2f}% on {dataset} test{drop}\n"
                               f"wrote {out}")


@click.command(name="export")
@click.option("--weights", required=True, type=click.Path(dir_okay=False),
              help="Trained/folded checkpoint (FP32) or an INT8 checkpoint from `edgeres quantize` (--int8).")
@click.option("--int8", is_flag=True, help="Export the INT8 Q/DQ model (needs an `edgeres quantize` checkpoint).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output .onnx path.")
@click.option("--arch", default=None, help="Architecture, for a checkpoint without edgeres metadata.")
@click.option("--opset", type=click.IntRange(13), default=17, show_default=True)
@click.option("--simplify", is_flag=True, help="Simplify with onnxslim (must keep every Q/DQ).")
@click.option("--recipe-hash", default="", help="Recipe hash to store in the metadata.")
@click.option("--dataset", default=None,
              help="Verify on this dataset's evaluation images (gated, INT8 too) instead of 32 random inputs.")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None, help="Where --dataset lives.")
@click.option("--limit", type=click.IntRange(1), default=None, help="At most this many --dataset images.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@json_option
def export_cmd(weights, int8, out, arch, opset, simplify, recipe_hash, dataset, data_dir, limit, force,
               as_json) -> None:
    """Export ONNX (input "input" [N,C,H,W], output "logits"), check TensorRT rules, verify on ONNX Runtime.

    FP32 must match torch (max|diff| <= 1e-4 relative, 100 % top-1 agreement); INT8 must agree with its
    fake-quant model on >= 99 % of --dataset images. A failed check leaves --out as it was and exits 1.
    On random inputs (no --dataset) the INT8 agreement is reported, not gated: it means little there."""
    from edgeres.checkpoint import read_checkpoint
    from edgeres.errors import ConfigError
    from edgeres.export import ExportInputs, ExportSettings, export_summary, run
    from edgeres.io import refuse_overwrite
    from edgeres.quantize import QuantOutput, is_quantized_checkpoint

    refuse_overwrite(out, force)
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
    images = _first(_data(meta, dataset, data_dir).test, limit) if dataset else _random_inputs(meta)
    # exported beside --out, verified, and only then moved into place: a failed check leaves what was there
    settings = ExportSettings(int8=int8, opset=opset, simplify=simplify, recipe_hash=recipe_hash,
                              gate_agreement=bool(dataset) or not int8)
    res = run(ExportInputs(model, meta, images, Path(out)), settings, quiet=as_json)
    _stage_failed(res.record)
    metrics = {**res.record.metrics, "inputs": f"{dataset} test split" if dataset else "random"}
    gates = [_describe(g) for g in res.record.gates]
    obj = {**export_summary(out), "verify": metrics, "gates": gates, "record": res.record.to_dict()}
    emit(obj, as_json, lambda: "\n".join([
        f"wrote {out} ({obj['bytes']} bytes, opset {obj['opset']}, {obj['QuantizeLinear']} Q / "
        f"{obj['DequantizeLinear']} DQ)",
        f"ONNX Runtime vs torch on {metrics['n_compared']} {metrics['inputs']} inputs: max|diff| "
        f"{metrics['max_abs_diff']:.3g} (rel {metrics['rel_diff']:.3g}), top-1 agreement "
        f"{_pct(metrics['top1_agreement_pct'])}", *(f"gate {g}: ok" for g in gates)]))


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
    from edgeres.check import check_onnx, count_qdq

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
