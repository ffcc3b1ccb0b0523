"""ONNX export: FP32 (from the folded model) and INT8 Q/DQ (from the NNCF model), TensorRT-ready.

Both: input "input" [N, C, H, W] with a dynamic batch axis, output "logits"; metadata_props carry what a
runtime needs to feed the model (see `metadata_props`); onnx.checker passes; the file is written atomically.
INT8: NNCF quantizers switched to ONNX QuantizeLinear/DequantizeLinear pairs, legacy TorchScript exporter
(`dynamo=False`, the path NNCF supports), then `edgeres.check` must find no TensorRT rule violation
(the residual placement and signedness were already fixed on the NNCF model, see edgeres.quantize).
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeres import __version__
from edgeres.check import GraphIndex, check_model, check_onnx, count_qdq, load_onnx
from edgeres.errors import ArtifactError, BackendUnavailable, ConfigError, GateError
from edgeres.io import atomic_path, check_replaceable, rejected_path, sha256_file
from edgeres.metrics import FP32_MIN_AGREEMENT, NEAR_TIE_QUANTILE, compare_logits
from edgeres.quantize import force_signed, is_quantized_model, quantizer_hooks
from edgeres.records import Gate, StageRecord, StageResult
from edgeres.settings import origins_field, read, setting

DEFAULT_OPSET = 17
MIN_OPSET = 13
INPUT_NAME, OUTPUT_NAME = "input", "logits"


def metadata_props(meta, *, int8: bool, recipe_hash: str = "") -> dict[str, str]:
    """Key -> string stored in the ONNX model's metadata_props."""

    return {
        "edgeres.version": __version__,
        "arch": meta.arch,
        "precision": "int8" if int8 else "fp32",
        "num_classes": str(meta.num_classes),
        "in_channels": str(meta.in_channels),
        "input_size": str(meta.input_size),
        "resize_size": "" if meta.resize_size is None else str(meta.resize_size),
        "mean": json.dumps(list(meta.mean)),
        "std": json.dumps(list(meta.std)),
        "class_names": json.dumps(list(meta.class_names)),
        "preprocessing": json.dumps({"layout": "NCHW", "scale": "1/255", "mean": list(meta.mean),
                                     "std": list(meta.std), "resize_size": meta.resize_size,
                                     "center_crop": meta.input_size}),
        "dataset": meta.dataset,
        "recipe_hash": recipe_hash or meta.recipe_hash,
        "edgeres.meta": json.dumps(meta.to_dict(), sort_keys=True),
    }


def set_qdq_export_mode(model) -> int:
    """Switch every NNCF quantizer to emit ONNX QuantizeLinear/DequantizeLinear pairs."""
    from nncf.torch.quantization.layers import QuantizerExportMode

    force_signed(model)
    hooks = quantizer_hooks(model)
    for _, q in hooks:
        q.set_export_mode(QuantizerExportMode.ONNX_QUANTIZE_DEQUANTIZE_PAIRS)
    return len(hooks)



def _simplify(model):
    try:
        import onnxslim
    except ImportError:
        raise BackendUnavailable("--simplify needs onnxslim (pip install onnxslim)") from None
    return onnxslim.slim(model)


def _max_opset() -> int:
    """The newest opset the TorchScript exporter (the one that writes NNCF's Q/DQ pairs) supports."""
    try:
        from torch.onnx._constants import ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET

        return int(ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET)
    except ImportError:
        return 20


def export_onnx(model, path: str | Path, *, meta, int8: bool, opset: int = DEFAULT_OPSET, simplify: bool = False,
                recipe_hash: str = "", check: bool = True, int8_weights: bool = True,
                problems: list[str] | None = None) -> Path:
    """Export `model` to ONNX at `path` (atomic). INT8 models must come from edgeres.quantize; their weights are
    stored as INT8 constants feeding DequantizeLinear (`int8_weights=False`: FP32 weights behind QuantizeLinear).
    A graph that breaks TensorRT's rules (`check`) or lost Q/DQ nodes to --simplify raises GateError; with a
    `problems` list the graph is written anyway and the problems appended, for the caller's gate to judge."""
    import onnx
    import torch

    if opset < MIN_OPSET:
        raise ConfigError(f"opset must be >= {MIN_OPSET} (per-channel Q/DQ), got {opset}")
    top = _max_opset()
    if opset > top:
        raise ConfigError(f"opset {opset} is newer than this torch's ONNX exporter writes (<= {top})")
    if simplify:
        try:
            import onnxslim  # noqa: F401
        except ImportError:
            raise BackendUnavailable("--simplify needs onnxslim (pip install onnxslim)") from None

    is_nncf = is_quantized_model(model)
    if int8 and not is_nncf:
        raise ConfigError("INT8 export needs a quantized model (run `edgeres quantize` first)")
    if not int8 and is_nncf:
        raise ConfigError("this model is quantized; export it with --int8")
    if int8:
        set_qdq_export_mode(model)
    model = model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))   # a model on the GPU exports there
    x = torch.zeros(1, meta.in_channels, meta.input_size, meta.input_size, device=device)
    path = Path(path)
    with atomic_path(path) as tmp:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x,), str(tmp), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                              opset_version=opset, do_constant_folding=True, dynamo=False)
        proto = onnx.load(str(tmp))
        before = count_qdq(proto)
        if simplify:
            proto = _simplify(proto)
            after = count_qdq(proto)
            if after != before:
                _problem(problems, f"simplification changed the Q/DQ nodes ({before} -> {after}); export without "
                                   "--simplify")
        if int8 and int8_weights:
            store_int8_weights(proto)
        onnx.helper.set_model_props(proto, metadata_props(meta, int8=int8, recipe_hash=recipe_hash))
        proto.producer_name = "edgeres"
        onnx.checker.check_model(proto, full_check=True)
        if int8 and check and problems is None:   # with `problems`, the caller checks the written graph itself
            violations = check_model(proto)
            if violations:
                shown = "; ".join(str(v) for v in violations[:5])
                more = f" (+{len(violations) - 5} more)" if len(violations) > 5 else ""
                raise GateError(f"INT8 ONNX breaks TensorRT rules: {shown}{more}")
        onnx.save(proto, str(tmp))
    return path


def _problem(problems: list[str] | None, message: str) -> None:
    if problems is None:
        raise GateError(message)
    problems.append(message)


def store_int8_weights(proto) -> int:
    """Replace each weight's QuantizeLinear(float constant) by the INT8 constant it computes, feeding the same
    DequantizeLinear: bit-identical outputs, ~4x smaller file. NVIDIA documents pre-quantized INT8 weights into an
    IDequantizeLayer from TensorRT 10 (versions.SOURCES["int8_weight_forms"]); for 8.5/8.6 the device plan uses the
    copy `restore_fp32_weights` makes. Returns how many weights were converted."""
    import numpy as np
    from onnx import TensorProto, numpy_helper

    g = GraphIndex(proto)   # constants (initializers and Constant nodes: scales, zero-points) and consumers
    weights = {t.name for t in proto.graph.initializer}
    drop = []
    for node in g.nodes:
        if node.op_type != "QuantizeLinear" or node.input[0] not in weights or len(node.input) < 3:
            continue
        scale, zp = g.const.get(node.input[1]), g.const.get(node.input[2])
        users = g.consumers.get(node.output[0], [])
        if scale is None or zp is None or g.const_dtype.get(node.input[2]) != TensorProto.INT8 or \
                not users or any(u.op_type != "DequantizeLinear" for u in users):
            continue
        w = np.asarray(g.const[node.input[0]], dtype=np.float32)
        scale, zp = np.asarray(scale, dtype=np.float32), np.asarray(zp, dtype=np.int32)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if scale.ndim == 1 and scale.size > 1:   # per-axis: broadcast along `axis`
            shape = [1] * w.ndim
            shape[axis] = scale.size
            scale, zp = scale.reshape(shape), zp.reshape(shape)
        q = np.clip(np.rint(w / scale) + zp, -128, 127).astype(np.int8)   # QuantizeLinear: round half to even
        proto.graph.initializer.append(numpy_helper.from_array(q, node.output[0]))
        drop.append(node)
    for node in drop:
        proto.graph.node.remove(node)
    used = {name for node in proto.graph.node for name in node.input} | {o.name for o in proto.graph.output}
    for t in [t for t in proto.graph.initializer if t.name not in used]:
        proto.graph.initializer.remove(t)
    return len(drop)



def restore_fp32_weights(proto) -> int:
    """The inverse of store_int8_weights: each INT8 weight feeding DequantizeLinear becomes an FP32 constant
    ((q - zero_point) * scale) behind a QuantizeLinear with the same scale, zero-point and axis — the form TensorRT
    8.5/8.6 document (FP32 weights quantized by the IQuantizeLayer, as NVIDIA's pytorch-quantization exports).
    QuantizeLinear gives back q exactly (checked), so outputs are bit-identical. Returns how many were restored."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    g = GraphIndex(proto)
    before: dict[str, list] = {}   # name of a weight's first DequantizeLinear user -> QuantizeLinear nodes to insert
    restored = 0
    for t in [t for t in proto.graph.initializer if t.data_type == TensorProto.INT8 and len(t.dims) > 1]:
        users = g.consumers.get(t.name, [])
        if not users or any(u.op_type != "DequantizeLinear" or u.input[0] != t.name or len(u.input) < 3
                            for u in users):
            continue
        dq = users[0]
        q = numpy_helper.to_array(t).astype(np.int32)
        scale = np.asarray(g.const[dq.input[1]], dtype=np.float32)
        zp = np.asarray(g.const[dq.input[2]], dtype=np.int32)
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        b_scale, b_zp = scale, zp
        if scale.ndim == 1 and scale.size > 1:
            shape = [1] * q.ndim
            shape[axis] = scale.size
            b_scale, b_zp = scale.reshape(shape), zp.reshape(shape)
        w = ((q - b_zp) * b_scale).astype(np.float32)
        if not np.array_equal(np.clip(np.rint(w / b_scale) + b_zp, -128, 127).astype(np.int32), q):
            raise ArtifactError(f"weight {t.name}: FP32 weights would not quantize back to the same INT8 values")
        w_name = f"{t.name}_fp32"
        qnode = helper.make_node("QuantizeLinear", [w_name, dq.input[1], dq.input[2]], [t.name],
                                 name=f"{t.name}_QuantizeLinear", **({"axis": axis} if scale.size > 1 else {}))
        before.setdefault(dq.output[0], []).append(qnode)
        proto.graph.initializer.remove(t)
        proto.graph.initializer.append(numpy_helper.from_array(w, w_name))
        restored += 1
    nodes = []
    for node in proto.graph.node:   # each QuantizeLinear right before the DequantizeLinear it feeds (graph order)
        nodes += before.get(node.output[0], []) if node.op_type == "DequantizeLinear" else []
        kept = type(node)()
        kept.CopyFrom(node)
        nodes.append(kept)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    return restored

def export_summary(path: str | Path) -> dict[str, Any]:

    proto = load_onnx(path)
    return {"path": str(path), "sha256": sha256_file(path), "bytes": Path(path).stat().st_size,
            "opset": max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
            "nodes": len(proto.graph.node), **count_qdq(proto)}


# ---------------------------------------------------------------------------------------------------- the stage

@dataclass(frozen=True)
class ExportInputs:
    model: Any            # the folded FP32 model, or the fake-quant INT8 model (settings.int8)
    meta: Any             # its ModelMeta
    images: Any           # (image, label) pairs to check on: the probe (FP32), the evaluation split (INT8)
    out: Path             # the .onnx to write, only after the check passed
    reference: Any = None  # EvalResult of `model` on `images` when already computed (else computed here)
    more_images: Any = None   # INT8: images beyond `images` (the training split, eval transform) that the
                              # agreement with fake-quant is also measured on, up to settings.agreement_images


@dataclass(frozen=True)
class ExportSettings:
    int8: bool = False
    opset: int = setting("export.opset", help="ONNX opset (>= 13: per-channel Q/DQ).")
    simplify: bool = setting("export.simplify", help="Simplify with onnxslim (must keep every Q/DQ).")
    recipe_hash: str = ""              # stored in the metadata; "" (build): the checkpoint's own (what trained it)
    rel_tol: float = setting("gates.export_rel_tol", help="FP32: largest max|logit diff| vs torch, relative to the "
                                                          "logit scale.")
    min_agreement_pct: float = setting("gates.min_int8_agreement", flag="--min-agreement",
                                       help="INT8: smallest top-1 agreement (%) with the fake-quant model.")
    gate_agreement: bool = True        # False: INT8 agreement recorded, not gated (random inputs mean little)
    probe_size: int = setting("gates.probe_size", help="FP32: the first evaluation images it is checked on "
                                                       "(build's probe); INT8: max|diff| also reported on these.")
    noise_rel_tol: float = setting("gates.int8_rel_tol", flag="",
                                   help="INT8: numeric noise allowed vs fake-quant (99th percentile of the per-image "
                                        "max|logit diff|, relative to the logit scale).")
    origins: dict = origins_field()
    agreement_images: int = setting("gates.int8_agreement_images",
                                    help="INT8: agreement with fake-quant measured on at least this many images (the "
                                         "evaluation split, then training images), where there are that many.")

    @classmethod
    def from_recipe(cls, recipe, *, int8: bool) -> ExportSettings:
        return read(cls, recipe, int8=int8)


@dataclass(frozen=True)
class ExportOutput:
    path: Path
    onnxruntime: Any = None        # EvalResult on `images`: the graph as written (INT8) / the default session (FP32)
    onnxruntime_int8: Any = None   # INT8: ONNX Runtime's default session, its own fused INT8 kernels


def _gates(metrics: dict[str, Any], settings: ExportSettings, violations: int) -> list[Gate]:
    """The export's gates: numerical-equivalence checks, exact (no sampling interval). FP32: max|logit diff| within
    the tolerance and no decisive flip. INT8: TensorRT's rules, the numeric noise vs fake-quant within
    gates.int8_rel_tol, and decisive agreement >= gates.min_int8_agreement (a flip where fake-quant's top-2 margin is
    within twice the noise tolerance is a near tie, which float rounding decides; the raw flips are recorded)."""
    n, origins = metrics["n_compared"], settings.origins

    def src(key: str) -> str:
        return origins.get(key, "built-in default")

    if not settings.int8:
        return [Gate("onnx_fp32_max_abs_diff_rel", metrics["rel_diff"], settings.rel_tol, "<=", n=n,
                     key="gates.export_rel_tol", source=src("gates.export_rel_tol"),
                     what="FP32 ONNX vs torch max|logit diff| / logit scale"),
                Gate("onnx_fp32_decisive_flips", metrics["decisive_flips"], 100.0 - FP32_MIN_AGREEMENT, "<=", n=n,
                     what=f"top-1 flips FP32 ONNX vs torch beyond near ties ({metrics['flips']} flips in all)")]
    gates = [Gate("tensorrt_rule_violations", violations, 0, "<=", what="TensorRT Q/DQ rule violations")]
    if settings.gate_agreement:
        gates += [Gate("onnx_int8_noise_rel", metrics["noise_rel"], settings.noise_rel_tol, "<=", n=n,
                       key="gates.int8_rel_tol", source=src("gates.int8_rel_tol"),
                       what="INT8 ONNX vs fake-quant numeric noise (99th percentile max|logit diff| / logit scale)"),
                  Gate("onnx_int8_decisive_agreement_pct", metrics["decisive_agreement_pct"],
                       settings.min_agreement_pct, ">=", n=n, unit="%", key="gates.min_int8_agreement",
                       source=src("gates.min_int8_agreement"),
                       what=f"INT8 ONNX vs fake-quant top-1 agreement beyond near ties ({metrics['flips']} flips in "
                            f"all, {metrics['near_tie_flips']} near ties)")]
    return gates


def _more_images(inputs: ExportInputs, settings: ExportSettings, have: int) -> list:
    """The first training images (eval transform) that bring the INT8 comparison up to settings.agreement_images."""
    if not settings.int8 or inputs.more_images is None or have >= settings.agreement_images:
        return []
    k = min(settings.agreement_images - have, len(inputs.more_images))
    return [inputs.more_images[i] for i in range(k)]


def run(inputs: ExportInputs, settings: ExportSettings = ExportSettings(), *, quiet: bool = True):
    """The export stage: export beside `out`, check (FP32: ONNX Runtime vs torch, max|diff| and 100 % agreement;
    INT8: TensorRT's Q/DQ rules and agreement with the fake-quant model, ONNX Runtime running the graph as written),
    and only then move it into place. A failed check leaves `out` as it was; the rejected graph is kept beside it
    as `<name>.rejected.onnx` for `edgeres compare --layers`. -> StageResult[ExportOutput]"""
    import os

    import numpy as np

    from edgeres.evaluate import evaluate
    from edgeres.runners import OrtRunner

    out = check_replaceable(inputs.out, force=True)   # a regular file or nothing: never a device, link or FIFO
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = out.with_name(f".{out.stem}.unverified.onnx")
    stage = "export_int8" if settings.int8 else "export_fp32"
    try:
        problems: list[str] = []   # judged by this stage's gates below, never raised before them
        export_onnx(inputs.model, staged, meta=inputs.meta, int8=settings.int8, opset=settings.opset,
                    simplify=settings.simplify, recipe_hash=settings.recipe_hash, problems=problems)

        def ev(target, label: str):
            return evaluate(target, inputs.images, batch_size=256, progress=False if quiet else label)

        ref = inputs.reference if inputs.reference is not None else ev(inputs.model, "torch reference")
        optimized = None
        if settings.int8:
            violations = check_onnx(staged)
            as_written = OrtRunner(staged, optimize=False)   # one session for every image it checks
            ort = ev(as_written, "verifying INT8 ONNX")
            optimized = ev(OrtRunner(staged), "INT8 ONNX on ONNX Runtime's INT8 kernels")
            n = min(settings.probe_size, ref.n)
            more = _more_images(inputs, settings, ref.n)
            if more:   # the agreement on enough images that a few near ties cannot decide it
                ref_more = evaluate(inputs.model, more, batch_size=256, progress=False).logits
                ort_more = evaluate(as_written, more, batch_size=256,
                                    progress=False if quiet else "verifying INT8 ONNX on training images").logits
                metrics = compare_logits(np.concatenate([ref.logits, ref_more]),
                                         np.concatenate([ort.logits, ort_more]),
                                         near_tie_quantile=NEAR_TIE_QUANTILE)
            else:
                metrics = compare_logits(ref.logits, ort.logits, near_tie_quantile=NEAR_TIE_QUANTILE)
            metrics.update(precision="int8", onnxruntime_optimizations=False, n_eval_split=ref.n,
                           n_training_images=len(more),
                           probe=compare_logits(ref.logits[:n], ort.logits[:n]),
                           optimized_top1_agreement_pct=100.0 * float(np.mean(ref.logits.argmax(1)
                                                                               == optimized.logits.argmax(1))),
                           violations=[str(v) for v in violations])
        else:
            violations = []
            ort = ev(OrtRunner(staged), "verifying FP32 ONNX")
            metrics = compare_logits(ref.logits, ort.logits, near_tie_rel=settings.rel_tol)
            metrics.update(precision="fp32", onnxruntime_optimizations=True)
        metrics["n_compared"] = metrics.pop("n_probe")
        rec = StageRecord(stage=stage, metrics=metrics)
        if problems:
            rec.metrics["export_problems"] = problems
            rec.add_gate(Gate("export_problems", len(problems), 0, "<="))
            rec.message = f"{stage}: {problems[0]}"
        for gate in _gates(metrics, settings, len(violations)):
            rec.add_gate(gate)
        if rec.passed:
            os.replace(staged, out)
            rec.set_artifact(out)
            return StageResult(rec, ExportOutput(out, ort, optimized))
        rejected = rejected_path(out)
        os.replace(staged, rejected)
        if violations:
            rec.message = f"{stage}: {len(violations)} TensorRT rule violation(s), first: {violations[0]}"
        rec.message += f"; {out} not written, the rejected graph is {rejected}"
        rec.extra_artifacts["rejected"] = str(rejected)
        return StageResult(rec, ExportOutput(rejected, ort, optimized))
    finally:
        staged.unlink(missing_ok=True)
