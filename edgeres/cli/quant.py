"""`edgeres fold`, `edgeres quantize`, `edgeres export`, `edgeres check`: thin commands over the library."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from edgeres.cli._common import emit, json_option, quiet_option
from edgeres.recipe import CALIB_METHODS, QuantCfg


def _pct(fraction: float) -> str:
    """A fraction as a percent that never rounds a miss up to 100 (0.9999 -> 99.99 %)."""
    import math

    value = math.floor(fraction * 10000) / 100
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


def _probe(meta, n: int = 32, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, meta.in_channels, meta.input_size, meta.input_size, generator=g)


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
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@json_option
def fold(weights, out, arch, probe_size, force, as_json) -> None:
    """Fold BatchNorm into the preceding convs; check the result on a probe batch.

    BatchNorms that no conv precedes (pre-activation ResNets, DenseNet) are kept as a per-channel
    scale-and-shift (exported as Mul+Add, which TensorRT fuses); the command lists them.
    """
    from edgeres.checkpoint import load_model
    from edgeres.errors import GateError
    from edgeres.fold import fold_batchnorm, fold_gate, save_folded
    from edgeres.io import refuse_overwrite

    refuse_overwrite(out, force)
    model, meta = load_model(weights, arch=arch)
    meta = _meta_for(model, meta, arch or (meta.arch if meta else None))
    result = fold_batchnorm(model)
    metrics, gates = fold_gate(model, result.model, _probe(meta, probe_size))
    failed = [g for g in gates if not g.passed]
    if failed:
        raise GateError("fold check failed: " + "; ".join(g.describe() for g in failed))
    save_folded(out, result, meta)
    obj = {"out": out, "arch": meta.arch, "folded": result.folded, "kept_affine": result.kept_affine,
           "kept_reasons": result.reasons, "metrics": metrics, "gates": [g.describe() for g in gates]}
    emit(obj, as_json, lambda: "\n".join([result.describe(),
                                          *(f"gate {g.describe()}: ok" for g in gates), f"wrote {out}"]))


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
@quiet_option
@json_option
def quantize(ptq, qat, weights, dataset, data_dir, arch, calib_size, calib_method, manifest, seed, epochs, lr,
             batch_size, out, force, quiet, as_json) -> None:
    """INT8 quantization with NNCF, configured for TensorRT (PTQ or QAT)."""
    from edgeres.checkpoint import read_checkpoint
    from edgeres.data import get_data
    from edgeres.errors import ConfigError
    from edgeres.io import refuse_overwrite
    from edgeres.quantize import (
        is_quantized_checkpoint,
        load_quantized,
        quantize_ptq,
        quantize_qat,
        save_quantized,
        top1,
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
    if start_quantized:
        model, meta, man = load_quantized(weights)
    else:
        model, meta, _ = load_float_or_folded(weights, arch)
    data = get_data(dataset=dataset, data_dir=data_dir, input_size=meta.input_size, mean=meta.mean, std=meta.std,
                    resize_size=meta.resize_size, in_channels=meta.in_channels)
    if data.info.num_classes != meta.num_classes:
        raise ConfigError(f"{dataset} has {data.info.num_classes} classes, the model {meta.num_classes}")
    log = (lambda s: None) if (quiet or as_json) else (lambda s: click.echo(s, err=True))
    history: list = []
    if not start_quantized:
        ptq = quantize_ptq(model, data.calib, subset_size=calib_size, method=calib_method, seed=seed,
                           manifest_path=manifest, dataset_fingerprint=data.info.fingerprint, quiet=quiet or as_json)
        model, man = ptq.model, ptq.manifest
        log(f"PTQ: {calib_size} calibration images ({calib_method}), manifest {manifest}")
    if mode == "qat":
        res = quantize_qat(model, data.train, data.test, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                           log=log)
        model, history = res.model, res.history
    acc = top1(model, data.test)
    save_quantized(out, model, meta, mode=mode, manifest=man)
    obj = {"out": out, "mode": mode, "top1_fake_quant": acc, "manifest": manifest if not start_quantized else None,
           "calib_size": man.get("subset_size"), "calib_method": man.get("method"), "qat_history": history}
    emit(obj, as_json, lambda: f"{mode.upper()} INT8 (fake-quant) top-1 {acc:.2f}% on {dataset} test\nwrote {out}")


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
    from edgeres.errors import ConfigError, GateError
    from edgeres.export import export_onnx, export_summary
    from edgeres.io import refuse_overwrite
    from edgeres.quantize import is_quantized_checkpoint, load_quantized
    from edgeres.verify import verify_onnx

    refuse_overwrite(out, force)
    _, _, rest = read_checkpoint(weights)
    if is_quantized_checkpoint(rest):
        if not int8:
            raise ConfigError(f"{weights} is an INT8 checkpoint; export it with --int8")
        model, meta, _ = load_quantized(weights)
    else:
        if int8:
            raise ConfigError(f"--int8 needs an INT8 checkpoint from `edgeres quantize`; {weights} is FP32")
        model, meta, _ = load_float_or_folded(weights, arch)
    # export next to --out, verify, and only then move into place: a failed check leaves what was there untouched
    path = Path(out)
    staged = path.with_name(f".{path.stem}.unverified.onnx")
    try:
        export_onnx(model, staged, meta=meta, int8=int8, opset=opset, simplify=simplify, recipe_hash=recipe_hash)
        if dataset:
            import torch

            from edgeres.compare import load_dataset_inputs

            x = torch.from_numpy(load_dataset_inputs(staged, dataset=dataset, data_dir=data_dir, split="test",
                                                     limit=limit)[0])
        else:
            x = _probe(meta)
        metrics, gates = verify_onnx(staged, model, x)
        metrics["inputs"] = f"{dataset} test split" if dataset else "random"
        failed = [g for g in gates if not g.passed]
        if failed and (dataset or not int8):
            raise GateError("ONNX Runtime disagrees with torch: " + "; ".join(g.describe() for g in failed)
                            + f"; {path} not written")
        os.replace(staged, path)
    finally:
        staged.unlink(missing_ok=True)
    obj = {**export_summary(path), "verify": metrics, "gates": [g.describe() for g in gates]}
    emit(obj, as_json, lambda: "\n".join([
        f"wrote {path} ({obj['bytes']} bytes, opset {obj['opset']}, {obj['QuantizeLinear']} Q / "
        f"{obj['DequantizeLinear']} DQ)",
        f"ONNX Runtime vs torch on {metrics['n_probe']} {metrics['inputs']} inputs: max|diff| "
        f"{metrics['max_abs_diff']:.3g}"
        f" (rel {metrics['rel_diff']:.3g}), top-1 agreement {_pct(metrics['top1_agreement'])}",
        *(f"gate {g.describe()}: {'ok' if g.passed else 'FAILED'}" for g in gates)]))


@click.command()
@click.argument("model", type=click.Path(dir_okay=False))
@json_option
def check(model, as_json) -> None:
    """Check an ONNX model against TensorRT's INT8 Q/DQ rules; exit 1 on any violation."""
    from edgeres.check import check_onnx, count_qdq

    violations = check_onnx(model)
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
