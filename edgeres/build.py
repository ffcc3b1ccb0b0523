"""`edgeres build`: data -> train -> fold -> PTQ -> QAT -> export -> calibration cache -> compile -> verify -> report.

Each stage is a plain function `(ctx, parent) -> StageRecord`. `run_stage` adds what every stage shares: the
inputs hash (parent sha256 + the stage's own settings), reuse of a finished stage whose inputs are unchanged and whose
artifact is intact, timing, the append to stages.jsonl, and stopping at the first failed gate.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeres.errors import ConfigError, EdgeresError, GateError
from edgeres.io import atomic_write_json, atomic_write_text, sha256_file, sha256_json
from edgeres.records import Gate, StageRecord, Status, append_record, reusable


@dataclass(frozen=True)
class BuildOptions:
    out: Path
    recipe: str = "demo"
    arch: str | None = None
    dataset: str | None = None
    data_dir: str | None = None
    epochs: int | None = None
    qat_epochs: int | None = None
    calib_method: str | None = None
    int8: bool = False
    fp16: bool = False
    pretrained: Path | None = None
    max_drop: float | None = None  # pp of top-1 vs FP32 allowed for the final INT8 model; None: the recipe's
                                   # gates.max_drop_ptq (PTQ only) or gates.max_drop_qat (with QAT)
    force: bool = False
    quiet: bool = False
    bench_seconds: float = 1.0     # per artifact latency measurement in the verify stage
    overrides: dict[str, Any] = field(default_factory=dict)   # any other dotted recipe key: {"data.input_size": 64}


@dataclass
class BuildContext:
    opts: BuildOptions
    recipe: Any
    run_dir: Path
    records: dict[str, StageRecord] = field(default_factory=dict)
    _data: Any = None
    cache: dict[str, Any] = field(default_factory=dict)   # in-memory models handed from stage to stage

    @property
    def data(self):
        if self._data is None:
            from edgeres.data import get_data_for

            self._data = get_data_for(self.recipe)
        return self._data

    def say(self, msg: str) -> None:
        if not self.opts.quiet:
            print(msg, flush=True)

    def path(self, *parts: str) -> Path:
        p = self.run_dir.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p


@dataclass
class BuildResult:
    run_dir: Path
    records: list[StageRecord]
    ok: bool
    message: str
    report: dict[str, Any]


StageFn = Callable[[BuildContext, "StageRecord | None"], StageRecord]


def run_stage(ctx: BuildContext, name: str, fn: StageFn, parent: StageRecord | None, settings: dict[str, Any],
              *, fatal: bool = True) -> StageRecord:
    inputs_hash = sha256_json({"stage": name, "parent": parent.sha256 if parent else None,
                               "parent_inputs": parent.inputs_hash if parent else None, "settings": settings})
    if not ctx.opts.force:
        prev = reusable(ctx.run_dir, name, inputs_hash)
        if prev is not None:
            ctx.say(f"[{name}] unchanged, reused ({prev.artifact or prev.status})")
            ctx.records[name] = prev
            return prev
    ctx.say(f"[{name}] running")
    start = time.perf_counter()
    try:
        rec = fn(ctx, parent)
    except GateError:
        raise
    except EdgeresError as e:
        rec = StageRecord(stage=name, status=Status.FAILED.value, message=f"{name}: {e}")
    rec.stage = name
    rec.inputs_hash = inputs_hash
    rec.parent_sha256 = parent.sha256 if parent else None
    rec.recipe_hash = ctx.recipe.hash()
    rec.duration_s = round(time.perf_counter() - start, 3)
    append_record(ctx.run_dir, rec)
    ctx.records[name] = rec
    verdict = rec.status if rec.status != Status.PASSED.value else f"passed in {rec.duration_s:.1f}s"
    ctx.say(f"[{name}] {verdict}" + (f": {rec.message}" if rec.message and not rec.passed else ""))
    if fatal and rec.status == Status.FAILED.value:
        raise GateError(rec.message or f"{name} failed")
    return rec


# ---------------------------------------------------------------------------------------------------- stages

def stage_train(ctx: BuildContext, parent: StageRecord | None) -> StageRecord:
    from edgeres.checkpoint import load_model, num_outputs, save_checkpoint
    from edgeres.train import train

    rec = StageRecord(stage="train")
    if ctx.opts.pretrained:
        model, meta = load_model(ctx.opts.pretrained, arch=ctx.recipe.model.arch)
        classes = (meta.num_classes if meta else None) or num_outputs(model)
        if classes != ctx.data.info.num_classes:
            raise ConfigError(f"--pretrained {ctx.opts.pretrained} predicts {classes} classes, the dataset has "
                              f"{ctx.data.info.num_classes}: fine-tune it instead with --init-from")
        if meta is None:
            meta = _meta_from_data(ctx)
        dest = ctx.path("train", "best.pt")
        save_checkpoint(dest, model, meta)
        rec.metrics = {"pretrained": str(ctx.opts.pretrained)}
    else:
        # the build only gets here when the training inputs changed (or --force): start that run afresh
        result = train(ctx.recipe, ctx.run_dir / "train", data=ctx.data, quiet=ctx.opts.quiet, force=True)
        dest = result.best
        meta = result.meta
        rec.metrics = {"best_top1": result.best_top1, "epochs": len(result.history),
                       "history": result.history}
    atomic_write_json(ctx.run_dir / "meta.json", meta.to_dict())
    rec.set_artifact(dest)
    return rec


def _meta_from_data(ctx: BuildContext):
    from edgeres.checkpoint import ModelMeta

    info = ctx.data.info
    return ModelMeta(arch=ctx.recipe.model.arch, num_classes=info.num_classes, in_channels=info.in_channels,
                     input_size=info.input_size, mean=tuple(info.mean), std=tuple(info.std),
                     class_names=tuple(info.class_names), arch_options=dict(ctx.recipe.model.options),
                     resize_size=info.resize_size, dataset=info.name, recipe_hash=ctx.recipe.hash(),
                     data_dir=str(Path(ctx.recipe.data.data_dir).expanduser().resolve())
                     if ctx.recipe.data.data_dir else None)


def _probe(ctx: BuildContext):
    """The fixed probe batch: the first `gates.probe_size` evaluation images as this build preprocesses them, in
    probe.npz. Always computed from the data (cheap), so a probe left by a build with other settings (another input
    size) is replaced, never reused; an identical one is left untouched."""
    import numpy as np

    if "probe" not in ctx.cache:
        path = ctx.run_dir / "probe.npz"
        n = min(ctx.recipe.gates.probe_size, len(ctx.data.test))
        xs, ys = zip(*(ctx.data.test[i] for i in range(n)))
        x = np.stack([np.asarray(t, dtype=np.float32) for t in xs])
        y = np.asarray(ys, dtype=np.int64)
        if not _same_probe(path, x, y):
            from edgeres.io import atomic_path

            with atomic_path(path) as tmp:
                with open(tmp, "wb") as f:
                    np.savez(f, x=x, y=y)
        ctx.cache["probe"] = (x, y)
    return ctx.cache["probe"]


def _same_probe(path: Path, x, y) -> bool:
    import numpy as np

    try:
        with np.load(path) as z:
            return z["x"].shape == x.shape and np.array_equal(z["x"], x) and np.array_equal(z["y"], y)
    except (OSError, ValueError, KeyError, EOFError):
        return False


def _fp32_model(ctx: BuildContext):
    from edgeres.checkpoint import load_model

    if "fp32" not in ctx.cache:
        ctx.cache["fp32"], ctx.cache["meta"] = load_model(ctx.records["train"].artifact)
    return ctx.cache["fp32"]


def _meta(ctx: BuildContext):
    _fp32_model(ctx)
    return ctx.cache["meta"]


def stage_fold(ctx: BuildContext, parent: StageRecord | None) -> StageRecord:
    import torch

    from edgeres.fold import fold_batchnorm, fold_gate, save_folded

    ref = _fp32_model(ctx)
    result = fold_batchnorm(ref)
    x, _ = _probe(ctx)
    metrics, gates = fold_gate(ref, result.model, torch.from_numpy(x), rel_tol=ctx.recipe.gates.fold_rel_tol)
    rec = StageRecord(stage="fold", metrics={**metrics, "folded": len(result.folded),
                                             "kept_affine": list(result.kept_affine)})
    for g in gates:
        rec.add_gate(g)
    dest = ctx.path("fold", "folded.pt")
    save_folded(dest, result, _meta(ctx))
    rec.set_artifact(dest)
    ctx.cache["folded"] = result.model
    return rec


def _folded(ctx: BuildContext):
    from edgeres.fold import load_folded

    if "folded" not in ctx.cache:
        ctx.cache["folded"], _ = load_folded(ctx.records["fold"].artifact)
    return ctx.cache["folded"]


def _eval(ctx: BuildContext, key: str, target=None, *, make=None) -> Any:
    """The evaluation of `target` (or of what `make()` returns, made only when not yet evaluated) under `key`,
    computed once per build."""
    from edgeres.evaluate import evaluate

    if key not in ctx.cache:
        label = key.removeprefix("eval_").replace("_", " ")
        ctx.cache[key] = evaluate(make() if make is not None else target, ctx.data.test, batch_size=256,
                                  progress=False if ctx.opts.quiet else f"evaluating {label}")
    return ctx.cache[key]


def _fp32_eval(ctx: BuildContext):
    return _eval(ctx, "eval_fp32", _fp32_model(ctx))


def max_drop(opts: BuildOptions, recipe) -> tuple[float, str]:
    """The allowed top-1 drop (pp) of the final INT8 model and where it comes from: --max-drop, else the recipe's
    gates.max_drop_qat (QAT runs) or gates.max_drop_ptq (PTQ only)."""
    if opts.max_drop is not None:
        return opts.max_drop, "--max-drop"
    if recipe.quant.qat_epochs > 0:
        return recipe.gates.max_drop_qat, "gates.max_drop_qat"
    return recipe.gates.max_drop_ptq, "gates.max_drop_ptq"


def _drop_gate(ctx: BuildContext, rec: StageRecord, top1: float, *, final: bool) -> None:
    base = _fp32_eval(ctx).top1
    drop = round(base - top1, 4)
    rec.metrics.update({"top1": top1, "fp32_top1": base, "drop_pp": drop})
    if final:
        lim, source = max_drop(ctx.opts, ctx.recipe)
        g = rec.add_gate(Gate("top1_drop_pp", drop, lim, "<="))
        if not g.passed:
            rec.message = f"{rec.stage}: top-1 dropped {drop:.2f} pp > {source} {lim:g}"


def _calib_size(ctx: BuildContext) -> int:
    """The recipe's calibration count, or every image of a smaller dataset (said once); an explicit
    --calib-size larger than the dataset is an error."""
    asked, have = ctx.recipe.quant.calib_size, len(ctx.data.calib)
    if asked <= have:
        return asked
    if "quant.calib_size" in ctx.opts.overrides:
        raise ConfigError(f"--calib-size {asked}: the calibration split has {have} images")
    if "calib_note" not in ctx.cache:
        ctx.cache["calib_note"] = True
        ctx.say(f"note: calibrating on all {have} images (the recipe asks {asked})")
    return have


def stage_ptq(ctx: BuildContext, parent: StageRecord | None) -> StageRecord:
    from edgeres.quantize import quantize_ptq, save_quantized

    q, n = ctx.recipe.quant, _calib_size(ctx)
    res = quantize_ptq(_folded(ctx), ctx.data.calib, subset_size=n, method=q.calib_method,
                       seed=ctx.recipe.train.seed, manifest_path=ctx.path("calibration", "manifest.json"),
                       dataset_fingerprint=ctx.data.info.fingerprint, quiet=ctx.opts.quiet)
    ctx.cache["ptq"] = res.model
    rec = StageRecord(stage="ptq", metrics={"calib_size": n, "calib_method": q.calib_method})
    ev = _eval(ctx, "eval_ptq", res.model)
    _drop_gate(ctx, rec, ev.top1, final=q.qat_epochs == 0)
    dest = ctx.path("quant", "ptq.pt")
    save_quantized(dest, res.model, _meta(ctx), mode="ptq", manifest=res.manifest)
    rec.set_artifact(dest)
    rec.extra_artifacts["calibration_manifest"] = str(ctx.run_dir / "calibration" / "manifest.json")
    return rec


def _quantized(ctx: BuildContext, stage: str):
    from edgeres.quantize import load_quantized

    if stage not in ctx.cache:
        ctx.cache[stage] = load_quantized(ctx.records[stage].artifact)[0]
    return ctx.cache[stage]


def stage_qat(ctx: BuildContext, parent: StageRecord | None) -> StageRecord:
    from edgeres.quantize import quantize_qat, read_manifest, save_quantized

    q = ctx.recipe.quant
    res = quantize_qat(_quantized(ctx, "ptq"), ctx.data.train, ctx.data.test, epochs=q.qat_epochs, lr=q.qat_lr,
                       batch_size=q.qat_batch_size or ctx.recipe.data.batch_size, seed=ctx.recipe.train.seed,
                       quiet=ctx.opts.quiet)
    ctx.cache["qat"] = res.model
    rec = StageRecord(stage="qat", metrics={"epochs": q.qat_epochs, "history": res.history,
                                            "best_epoch": res.best_epoch})   # 0: no QAT epoch beat the PTQ model
    ev = _eval(ctx, "eval_qat", res.model)
    _drop_gate(ctx, rec, ev.top1, final=True)
    dest = ctx.path("quant", "qat.pt")
    save_quantized(dest, res.model, _meta(ctx), mode="qat", manifest=read_manifest(parent.artifact))
    rec.set_artifact(dest)
    return rec


def stage_export_fp32(ctx: BuildContext, parent: StageRecord | None) -> StageRecord:
    import torch

    from edgeres.export import export_onnx
    from edgeres.verify import verify_onnx

    dest = ctx.path("export", "model_fp32.onnx")
    export_onnx(_folded(ctx), dest, meta=_meta(ctx), int8=False, opset=ctx.recipe.export.opset,
                simplify=ctx.recipe.export.simplify, recipe_hash=ctx.recipe.hash())
    x, _ = _probe(ctx)
    metrics, gates = verify_onnx(dest, _folded(ctx), torch.from_numpy(x), rel_tol=ctx.recipe.gates.export_rel_tol,
                                 min_agreement=1.0)
    rec = StageRecord(stage="export_fp32", metrics=metrics)
    for g in gates:
        rec.add_gate(g)
    rec.set_artifact(dest)
    return rec


def stage_export_int8(ctx: BuildContext, parent: StageRecord | None) -> StageRecord:
    """INT8 Q/DQ ONNX from the final quantized model; gates: TensorRT rules, and top-1 agreement with the
    fake-quant model over the whole evaluation split (a 99 % gate needs hundreds of images to mean anything:
    on a 64-image probe one disagreement is already 98.4 %), ONNX Runtime running the graph as written (see
    edgeres.verify). The agreement of ONNX Runtime's own INT8 kernels (its default, optimized session, the one
    `verify` scores) is recorded beside it; the probe's max|diff| is reported too."""
    import numpy as np

    from edgeres.check import check_onnx
    from edgeres.export import export_onnx
    from edgeres.fold import compare_logits
    from edgeres.runners import OrtRunner

    source = "qat" if "qat" in ctx.records else "ptq"
    model = _quantized(ctx, source)
    dest = ctx.path("export", "model_int8.onnx")
    export_onnx(model, dest, meta=_meta(ctx), int8=True, opset=ctx.recipe.export.opset,
                simplify=ctx.recipe.export.simplify, recipe_hash=ctx.recipe.hash())
    violations = check_onnx(dest)
    fake_quant = _eval(ctx, f"eval_{source}", model).logits
    as_written = _eval(ctx, "eval_export_int8_as_written", OrtRunner(dest, optimize=False)).logits
    metrics = compare_logits(fake_quant, as_written)
    n = min(ctx.recipe.gates.probe_size, len(fake_quant))   # the probe is the first evaluation images
    probe = compare_logits(fake_quant[:n], as_written[:n])
    optimized = _eval(ctx, "eval_export_int8", OrtRunner(dest)).logits   # reused by verify
    metrics["n_compared"] = metrics.pop("n_probe")
    metrics.update(compared_on="evaluation split", precision="int8", probe=probe, onnxruntime_optimizations=False,
                   optimized_top1_agreement=float(np.mean(fake_quant.argmax(1) == optimized.argmax(1))))
    rec = StageRecord(stage="export_int8", metrics={**metrics, "source": source,
                                                    "violations": [str(v) for v in violations]})
    rec.add_gate(Gate("tensorrt_rule_violations", len(violations), 0, "<="))
    agree = rec.add_gate(Gate("onnx_int8_top1_agreement", metrics["top1_agreement"],
                              ctx.recipe.gates.min_int8_agreement / 100.0, ">="))
    if not agree.passed and not violations:
        rec.message = (f"export_int8: {agree.describe()} over {metrics['n_compared']} images; where they part: "
                       f"edgeres compare {ctx.records[source].artifact} {dest} --layers")
    if violations and not rec.message.startswith("export_int8: tensorrt"):
        rec.message = f"export_int8: {len(violations)} TensorRT rule violation(s), first: {violations[0]}"
    rec.set_artifact(dest)
    return rec


def _calib_batches(ctx: BuildContext, bs: int = 64):
    """The calibration images PTQ calibrated on (calibration_indices with the recipe's seed), as float32 batches."""
    import numpy as np

    from edgeres.quantize import calibration_indices

    n = _calib_size(ctx)
    idx = calibration_indices(len(ctx.data.calib), n, seed=ctx.recipe.train.seed)
    for i in range(0, n, bs):
        yield np.stack([np.asarray(ctx.data.calib[int(j)][0], dtype=np.float32) for j in idx[i:i + bs]])


def stage_export_cpu(ctx: BuildContext, parent: StageRecord | None) -> StageRecord:
    """The CPU INT8 artifact (edgeres/cpu.py), an OpenVINO IR run with OpenVINO's INT8 kernels: NNCF's OpenVINO PTQ
    of the FP32 ONNX on the PTQ calibration images (recipe export.cpu_int8 = openvino), or the TensorRT INT8 ONNX
    converted (= qdq). Gate: its top-1 drop against FP32 over the evaluation split, with the final INT8 model's
    limit. Its agreement with the TensorRT INT8 ONNX (as written) is recorded, not gated: another quantizer
    placement, or OpenVINO's own INT8 arithmetic (on AVX2 without VNNI u8 x s8 pairs accumulate in int16).
    Skipped, with the reason, without OpenVINO."""
    import numpy as np

    from edgeres.cpu import export_openvino, openvino_status
    from edgeres.fold import compare_logits
    from edgeres.runners import OpenVinoRunner, OrtRunner

    ok, why = openvino_status()
    if not ok:
        return StageRecord(stage="export_cpu", status=Status.SKIPPED.value,
                           message=f"CPU INT8 artifact not written: {why}", metrics={"reason": why})
    dest = ctx.path("export", "model_int8_cpu.xml")
    if ctx.recipe.export.cpu_int8 == "openvino":
        images = [b[None] for batch in _calib_batches(ctx) for b in batch]
        info = export_openvino(parent.artifact, dest, calibration=images)
    else:
        info = export_openvino(parent.artifact, dest)
    trt_int8 = ctx.records["export_int8"].artifact
    as_written = _eval(ctx, "eval_export_int8_as_written", make=lambda: OrtRunner(trt_int8, optimize=False)).logits
    runner = OpenVinoRunner(dest)
    ev = _eval(ctx, "eval_export_cpu", runner)
    metrics = compare_logits(as_written, ev.logits)
    metrics["n_compared"] = metrics.pop("n_probe")
    metrics.update(info, int8_kernels=runner.kernel_report(), compared_with="TensorRT INT8 ONNX as written",
                   top1_agreement=float(np.mean(as_written.argmax(1) == ev.logits.argmax(1))))
    rec = StageRecord(stage="export_cpu", metrics=metrics)
    rec.extra_artifacts["openvino_weights"] = str(dest.with_suffix(".bin"))
    _drop_gate(ctx, rec, ev.top1, final=True)
    rec.set_artifact(dest)
    return rec


def stage_calib_cache(ctx: BuildContext, parent: StageRecord | None) -> StageRecord:
    """A TensorRT calibration cache for the FP32 ONNX (implicit INT8 on TensorRT 8.x / DLA)."""
    from edgeres.tensorrt.calib_cache import activation_ranges, write_calibration_cache

    n = _calib_size(ctx)
    ranges = activation_ranges(ctx.records["export_fp32"].artifact, _calib_batches(ctx))   # PTQ's images
    dest = ctx.path("calibration", "calib.cache")
    write_calibration_cache(ranges, dest, force=True)
    rec = StageRecord(stage="calib_cache", metrics={"tensors": len(ranges), "images": n})
    rec.set_artifact(dest)
    return rec


def _write_device_plan(ctx: BuildContext) -> dict[str, Any]:
    """RUN/tensorrt/plan.json + a stock trtexec script per target TensorRT, precision and GPU/DLA, written
    whether or not this machine has TensorRT (the host decides; the device runs the script)."""
    from edgeres.tensorrt.targets import PlanInputs, write_run_plan

    fp32 = Path(ctx.records["export_fp32"].artifact)
    int8 = Path(ctx.records["export_int8"].artifact) if "export_int8" in ctx.records else fp32
    calib = ctx.records.get("calib_cache")
    inputs = PlanInputs(fp32_name=fp32.name, int8_name=int8.name, fp32_onnx=fp32, int8_onnx=int8,
                        calib_name=Path(calib.artifact).name if calib else None,
                        calib_cache=Path(calib.artifact) if calib else None)
    return write_run_plan(ctx.path("tensorrt"), inputs, batch=8, relative_to=ctx.run_dir)


def stage_compile(ctx: BuildContext, parent: StageRecord | None) -> StageRecord:
    from edgeres.tensorrt import tensorrt_status

    status = tensorrt_status()
    onnx_path = parent.artifact if parent else None
    plan = _write_device_plan(ctx)
    if not status.available:
        return StageRecord(stage="compile", status=Status.SKIPPED.value,
                           message=f"TensorRT engine not built: {status.reason}. The ONNX {onnx_path} is ready "
                                   f"to be built on the target: {plan['scripts']} trtexec scripts in tensorrt/ "
                                   "(plan.json), or `edgeres bundle`.",
                           metrics={"tensorrt": None, "reason": status.reason, "device_plan": plan})
    from edgeres.tensorrt.compile import compile_engine
    from edgeres.tensorrt.options import CompileOptions, precision_from_flags

    precision = precision_from_flags(fp16=ctx.opts.fp16, int8=ctx.opts.int8)   # --int8 --fp16: both kernels
    dest = ctx.path("engine", "model.plan")
    info = compile_engine(onnx_path, dest, CompileOptions(precision=precision), force=True)
    rec = StageRecord(stage="compile", metrics={"engine": info, "device_plan": plan})
    rec.set_artifact(dest)
    return rec


BENCH_MIN_RUNS = 10   # trtexec's minimum


def _artifact_bytes(path) -> int:
    """On-disk size of an artifact; an OpenVINO IR counts its .xml and .bin."""
    path = Path(path)
    extra = path.with_suffix(".bin") if path.suffix == ".xml" else None
    return path.stat().st_size + (extra.stat().st_size if extra is not None and extra.is_file() else 0)


def _explain_slow_int8(rows: list[dict[str, Any]]) -> None:
    """Mark rows that run INT8 kernels, and say in one line why an INT8 row is slower than FP32 on its backend."""
    fp32 = {r["backend"]: r for r in rows if r["precision"] == "fp32" and r.get("p50_ms")}
    fp32.setdefault("openvino", fp32.get("onnxruntime"))   # the CPU artifact is compared with ONNX Runtime FP32
    for r in rows:
        path = r.pop("_artifact", None)
        if path and r.get("int8_kernels") is None:
            from edgeres.runners import ort_int8_kernels

            k = ort_int8_kernels(path, r.get("threads"))
            r["int8_kernels"] = f"{k['int8_kernels']}/{k['int8_kernels'] + k['float_convs']}"
        ref = fp32.get(r["backend"])
        if r["precision"].startswith("int8") and r.get("p50_ms") and ref and r["p50_ms"] > ref["p50_ms"]:
            if r["backend"] == "onnxruntime":
                r["note"] = ("slower than FP32: ONNX Runtime does not fuse this TensorRT-style Q/DQ graph into INT8 "
                             "kernels on the CPU (signed activations, weights dequantized every call); the CPU "
                             "artifact is export/model_int8_cpu.xml (OpenVINO)")
            else:
                r["note"] = (f"slower than FP32 on {ref['backend']} ({ref['p50_ms']:g} ms) although "
                             f"{r.get('int8_kernels', '?')} layers run in INT8: at this model size per-call overhead "
                             "outweighs the INT8 kernels")


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def stage_verify(ctx: BuildContext, parent: StageRecord | None) -> StageRecord:
    """Every artifact on every backend present: accuracy, agreement with FP32, latency."""
    import numpy as np

    from edgeres.bench import benchmark
    from edgeres.runners import OrtRunner, TorchRunner

    fp32 = _fp32_eval(ctx)
    meta = _meta(ctx)
    shape = (meta.in_channels, meta.input_size, meta.input_size)
    rows: list[dict[str, Any]] = []
    per_class: dict[str, list[float]] = {"fp32": list(fp32.per_class)}

    def row(stage: str, backend: str, precision: str, ev, runner=None, size_path=None) -> None:
        r: dict[str, Any] = {"stage": stage, "backend": backend, "precision": precision,
                             "top1": round(ev.top1, 3), "delta_pp": round(ev.top1 - fp32.top1, 3),
                             "agree_pct": round(100.0 * float(np.mean(ev.logits.argmax(1) == fp32.logits.argmax(1))),
                                                3),
                             "p50_ms": None, "p99_ms": None, "img_s": None,
                             "size_mb": round(_artifact_bytes(size_path) / 1e6, 3) if size_path else None}
        if runner is not None and ctx.opts.bench_seconds > 0:
            # as `edgeres bench` measures: warm-up, then at least BENCH_MIN_RUNS calls and --bench-seconds
            res = benchmark(runner, batch_sizes=(1,), iterations=BENCH_MIN_RUNS, duration_s=ctx.opts.bench_seconds,
                            input_shape=shape)
            stats = res.results[0]
            r.update(p50_ms=round(stats.latency.median, 4), p99_ms=round(stats.latency.p99, 4),
                     img_s=round(stats.images_per_s, 1), runs=stats.iterations,
                     threads=(res.environment.get("runner") or {}).get("threads"), latency_warning=stats.warning)
        rows.append(r)

    row("train", "torch", "fp32", fp32, TorchRunner(_fp32_model(ctx)), ctx.records["train"].artifact)
    if "fold" in ctx.records:
        row("fold", "torch", "fp32", _eval(ctx, "eval_fold", _folded(ctx)), TorchRunner(_folded(ctx)),
            ctx.records["fold"].artifact)
    for stage in ("ptq", "qat"):
        if stage in ctx.records:
            ev = _eval(ctx, f"eval_{stage}", _quantized(ctx, stage))
            row(stage, "torch", "int8 (fake-quant)", ev, None, ctx.records[stage].artifact)
    final_int8 = None
    for stage, precision in (("export_fp32", "fp32"), ("export_int8", "int8")):
        if stage in ctx.records:
            runner = OrtRunner(ctx.records[stage].artifact)
            ev = _eval(ctx, f"eval_{stage}", runner)
            row(stage, "onnxruntime", precision, ev, runner, ctx.records[stage].artifact)
            if precision == "int8":
                rows[-1]["_artifact"] = ctx.records[stage].artifact
            if precision == "int8":
                final_int8 = ev
                per_class["int8"] = list(ev.per_class)
    cpu = ctx.records.get("export_cpu")
    if cpu is not None and cpu.passed and cpu.artifact:
        from edgeres.runners import OpenVinoRunner

        runner = OpenVinoRunner(cpu.artifact)
        row("export_cpu", "openvino", "int8", _eval(ctx, "eval_export_cpu", runner), runner, cpu.artifact)
        kernels = runner.kernel_report()
        rows[-1]["int8_kernels"] = f"{kernels['int8_kernels']}/{kernels['int8_kernels'] + kernels['float_convs']}"
    _explain_slow_int8(rows)
    comp = ctx.records.get("compile")
    if comp is not None and comp.passed and comp.artifact:
        from edgeres.tensorrt.runner import TrtRunner

        runner = TrtRunner(comp.artifact)
        row("compile", "tensorrt", "int8" if ctx.opts.int8 else "fp16" if ctx.opts.fp16 else "fp32",
            _eval(ctx, "eval_trt", runner), runner, comp.artifact)
    elif comp is not None:
        rows.append({"stage": "compile", "backend": "tensorrt", "precision": "-", "top1": None, "delta_pp": None,
                     "agree_pct": None, "p50_ms": None, "p99_ms": None, "img_s": None, "size_mb": None,
                     "note": comp.message})
    bench = {"batch": 1, "min_runs": BENCH_MIN_RUNS, "min_seconds": ctx.opts.bench_seconds,
             "torch_threads": _torch_threads(), "timing": "host wall time per call, after warm-up"}
    rec = StageRecord(stage="verify", metrics={"rows": rows, "per_class": per_class, "bench": bench,
                                               "class_names": list(meta.class_names), "n_eval": fp32.n})
    if final_int8 is not None:
        _drop_gate(ctx, rec, final_int8.top1, final=True)
        if rec.message:
            rec.message = rec.message.replace("verify:", "verify (INT8 ONNX on onnxruntime):")
    return rec


# ---------------------------------------------------------------------------------------------------- driver

# a dataset given on the command line brings its own input size, statistics and augmentation, unless given too
DATASET_AUGMENT = {"digits": ("pad_crop",), "mnist": ("pad_crop",), "cifar10": ("pad_crop", "flip"),
                   "imagefolder": ("random_resized_crop", "flip")}


def _resolve_recipe(opts: BuildOptions):
    from edgeres.recipe import DataCfg, load_recipe

    recipe = load_recipe(opts.recipe)
    overrides: dict[str, Any] = {}
    if opts.dataset and opts.dataset != recipe.data.dataset:
        # the recipe's data settings were chosen for its own dataset (the demo's 32 px digits): start from defaults
        overrides.update({"data.input_size": None, "data.mean": None, "data.std": None, "data.resize_size": None,
                          "data.pad": DataCfg.pad, "data.augment": DATASET_AUGMENT.get(opts.dataset, ())})
    overrides.update({"model.arch": opts.arch, "data.dataset": opts.dataset, "data.data_dir": opts.data_dir,
                      "train.epochs": opts.epochs, "quant.qat_epochs": opts.qat_epochs,
                      "quant.calib_method": opts.calib_method})
    overrides.update(opts.overrides)
    return recipe.with_overrides(overrides, keep_none=("data.input_size", "data.mean", "data.std",
                                                       "data.resize_size"))


def build(opts: BuildOptions) -> BuildResult:
    """Validate everything, then hold the run folder and run the plan. A build refused before its first stage
    (bad option, recipe or data, unwritable or busy folder) changes nothing in the folder."""
    from edgeres.io import ensure_writable_dir
    from edgeres.records import run_lock

    if opts.max_drop is not None and opts.max_drop < 0:
        raise ConfigError(f"--max-drop must be >= 0, got {opts.max_drop}")
    if opts.pretrained is not None and not Path(opts.pretrained).is_file():
        raise ConfigError(f"--pretrained checkpoint not found: {opts.pretrained}")
    recipe = _resolve_recipe(opts)
    if recipe.train.init_from and not Path(recipe.train.init_from).is_file():
        raise ConfigError(f"--init-from checkpoint not found: {recipe.train.init_from}")
    if recipe.train.init_from and opts.pretrained:
        raise ConfigError("--pretrained skips training, --init-from starts it from a checkpoint: give one")
    from edgeres.models.registry import get_spec, resolve_options

    resolve_options(get_spec(recipe.model.arch), recipe.model.options)   # an unknown arch is refused here
    run_dir = ensure_writable_dir(opts.out, "run folder")
    with run_lock(run_dir):
        ctx = BuildContext(opts=opts, recipe=recipe, run_dir=run_dir)
        ctx.data  # noqa: B018 -- load (and so validate) the data before anything is written
        return _run_plan(ctx)


def _run_plan(ctx: BuildContext) -> BuildResult:
    from edgeres.records import write_plan
    from edgeres.report import write_report

    opts, recipe, run_dir = ctx.opts, ctx.recipe, ctx.run_dir
    data_fp = {"fingerprint": ctx.data.info.fingerprint}
    pretrained = {"pretrained": sha256_file(opts.pretrained) if opts.pretrained else None,
                  "init_from": sha256_file(recipe.train.init_from) if recipe.train.init_from else None}
    d = recipe.to_dict()
    plan: list[tuple[str, StageFn, str | None, dict[str, Any]]] = [
        ("train", stage_train, None, {**data_fp, **pretrained, "model": d["model"], "data": d["data"],
                                      "train": d["train"]}),
        ("fold", stage_fold, "train", {"tol": recipe.gates.fold_rel_tol, "probe": recipe.gates.probe_size}),
    ]
    if opts.int8:
        calib = {"calib_size": _calib_size(ctx), "calib_method": recipe.quant.calib_method,
                 "seed": recipe.train.seed, **data_fp}
        final_ptq = recipe.quant.qat_epochs == 0
        limit = max_drop(opts, recipe)[0]
        plan.append(("ptq", stage_ptq, "fold", {**calib, "max_drop": limit if final_ptq else None}))
        if not final_ptq:
            plan.append(("qat", stage_qat, "ptq", {"quant": d["quant"], "max_drop": limit,
                                                   "batch_size": recipe.data.batch_size, "seed": recipe.train.seed}))
    plan.append(("export_fp32", stage_export_fp32, "fold", {"export": d["export"], "gates": d["gates"]}))
    if opts.int8:
        plan.append(("export_int8", stage_export_int8, "qat" if recipe.quant.qat_epochs > 0 else "ptq",
                     {"export": d["export"], "gates": d["gates"]}))
        cpu_from = "export_fp32" if recipe.export.cpu_int8 == "openvino" else "export_int8"
        plan.append(("export_cpu", stage_export_cpu, cpu_from, {"gates": d["gates"], "export": d["export"],
                                                                 **calib}))
        plan.append(("calib_cache", stage_calib_cache, "export_fp32", calib))
    plan.append(("compile", stage_compile, "export_int8" if opts.int8 else "export_fp32",
                 {"int8": opts.int8, "fp16": opts.fp16}))
    atomic_write_text(run_dir / "recipe.yaml", recipe.to_yaml())
    write_plan(run_dir, [name for name, *_ in plan] + ["verify"])
    ok, message = True, "all gates passed"
    start = time.perf_counter()
    try:
        for name, fn, parent_name, settings in plan:
            parent = ctx.records.get(parent_name) if parent_name else None
            run_stage(ctx, name, fn, parent, settings)
        parents = [ctx.records[n] for n in ("export_int8", "export_fp32") if n in ctx.records]
        run_stage(ctx, "verify", stage_verify, parents[0],
                  {"max_drop": max_drop(opts, recipe)[0], "bench_s": opts.bench_seconds, "artifacts":
                   sorted((r.stage, r.sha256, r.status) for r in ctx.records.values())})
    except GateError as e:
        ok, message = False, str(e)
    report = write_report(run_dir, list(ctx.records.values()), ok=ok, message=message,
                          total_s=time.perf_counter() - start)
    return BuildResult(run_dir=run_dir, records=list(ctx.records.values()), ok=ok, message=message, report=report)
