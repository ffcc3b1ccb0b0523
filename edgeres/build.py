"""`edgeres build`: the plan (which stages run, in order, and what each consumes) and one loop over it.

Every stage is one function in its own module, `run(inputs, settings, *, quiet) -> StageResult[Output]` (train.run,
fold.run, quantize.run_ptq / run_qat, export.run, cpu.run, tensorrt.calib_cache.run, tensorrt.compile.run,
verify.run): it checks its result against its gates, writes its artifact atomically only when they pass (else keeps
it beside the output as <name>.rejected.<ext>), and returns its record and typed output. Its Settings dataclass is
its contract: read from the recipe by `Settings.from_recipe` (edgeres/settings.py), the same call the stage's CLI
command makes. A row of `PLAN` names a stage, what it consumes, when it runs, how its settings and typed inputs are
made, and the identity of inputs that are not its parent's artifact (the dataset's fingerprint, a checkpoint file).
`run_stage` adds what every stage shares: the inputs hash (parent sha256 + `hashed(settings)`, asdict(settings)
without where each limit came from, + that identity), reuse of a finished stage whose inputs are unchanged and
whose artifact is intact, timing, the append to stages.jsonl, and stopping at the first failed gate.
"""
from __future__ import annotations

import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from edgeres import cpu, export, fold, pretrained, quantize, train, verify
from edgeres.checkpoint import check_checkpoints
from edgeres.data import get_data_for, split_files
from edgeres.data.infer import dataset_for
from edgeres.device import describe as describe_device
from edgeres.device import resolve as resolve_device
from edgeres.errors import BackendUnavailable, ConfigError, DataError, EdgeresError
from edgeres.io import (
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    check_owned_dir,
    claim_dir,
    rejected_path,
    sha256_file,
    sha256_json,
)
from edgeres.memory import check as check_memory
from edgeres.nncf_kernels import wanted_mode as nncf_kernels_wanted
from edgeres.progress import heartbeat
from edgeres.recipe import Recipe, for_dataset, gate_overrides, load_recipe, shipped_reference
from edgeres.records import StageRecord, StageResult, Status, append_record, finish_plan, reusable, run_lock, write_plan
from edgeres.report import write_report
from edgeres.settings import hashed
from edgeres.tensorrt import calib_cache, compile
from edgeres.tensorrt.options import precision_from_flags
from edgeres.tensorrt.targets import PlanInputs


@dataclass(frozen=True)
class BuildOptions:
    out: Path | None = None        # None: runs/ARCH-DATASETNAME (the photos' folder name for an ImageFolder)
    recipe: str | None = None      # None: chosen by the data (choose_recipe): demo, or for photos a fine-tune of
                                   # published weights when they are on this machine
    arch: str | None = None
    dataset: str | None = None
    data_dir: str | None = None
    epochs: int | None = None
    qat_epochs: int | None = None
    calib_method: str | None = None
    int8: bool = False
    fp16: bool = False
    pretrained: Path | None = None
    max_drop: float | None = None  # pp of top-1 vs FP32 allowed for the final INT8 model: sets the recipe's
                                   # gates.max_drop_ptq and gates.max_drop_qat (None: the recipe's own)
    force: bool = False
    quiet: bool = False
    bench_seconds: float = 1.0     # per artifact latency measurement in the verify stage
    device: str | None = None      # torch device for every torch stage (edgeres.device.resolve; None: GPU if any)
    overrides: dict[str, Any] = field(default_factory=dict)   # any other dotted recipe key: {"data.input_size": 64}
    gates: tuple[str, ...] = ()    # --gate NAME=VALUE: any gates.* key (recipe.gate_overrides)


@dataclass
class Outputs:
    """What the stages handed on, typed: one field per stage. A stage reused from an earlier build has no output
    until something asks for it; then its `load` (see PLAN) rebuilds it from the artifact."""

    train: train.TrainOutput | None = None
    fold: fold.FoldOutput | None = None
    ptq: quantize.QuantOutput | None = None
    qat: quantize.QuantOutput | None = None
    export_fp32: export.ExportOutput | None = None
    export_int8: export.ExportOutput | None = None
    export_cpu: cpu.CpuOutput | None = None
    calib_cache: calib_cache.CalibCacheOutput | None = None
    compile: compile.CompileOutput | None = None
    verify: list[dict[str, Any]] | None = None   # the table's rows


class EvalKey(NamedTuple):
    """An evaluation on the evaluation split: which stage's artifact, on which backend, at which precision."""

    stage: str
    backend: str
    precision: str


@dataclass
class BuildContext:
    opts: BuildOptions
    recipe: Recipe             # frozen, validated; --max-drop and every other flag already applied
    run_dir: Path
    records: dict[str, StageRecord] = field(default_factory=dict)
    outputs: Outputs = field(default_factory=Outputs)
    evaluations: dict[EvalKey, Any] = field(default_factory=dict)   # -> EvalResult, each made once per build
    device: Any = None         # the torch.device every torch stage runs on, decided once (build)
    _data: Any = None
    _probe: Any = None
    _calib_note: bool = False
    data_report: dict[str, Any] | None = None   # the up-front scan of the data (edgeres.data.scan)

    @property
    def data(self):
        if self._data is None:
            self._data = get_data_for(self.recipe)
        return self._data

    def say(self, msg: str) -> None:
        if not self.opts.quiet:
            print(msg, flush=True)

    def path(self, *parts: str) -> Path:
        p = self.run_dir.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def output(self, stage: str):
        """The typed output of `stage`: handed on by this build, or loaded from the artifact of a reused one."""
        value = getattr(self.outputs, stage)
        if value is None:
            step = next(s for s in PLAN if s.name == stage)
            value = step.load(self.records[stage]) if step.load else None
            setattr(self.outputs, stage, value)
        return value

    def evaluation(self, key: EvalKey, make: Callable[[], Any], known: Any = None):
        """The evaluation under `key`: `known` (a stage already made it), else made by `make()` (a model or a
        runner, evaluated here) once per build."""
        from edgeres.evaluate import evaluate

        if key not in self.evaluations and known is not None:
            self.evaluations[key] = known
        if key not in self.evaluations:
            target = make()
            if hasattr(target, "parameters") and hasattr(target, "to"):   # a torch model: on the build's device
                target = target.to(self.device)
            self.evaluations[key] = evaluate(target, self.data.test, batch_size=256,
                                             progress=False if self.opts.quiet else f"evaluating {'/'.join(key)}")
        return self.evaluations[key]

    def probe(self):
        """The fixed probe: the first `gates.probe_size` evaluation images as this build preprocesses them, in
        probe.npz (replaced when it differs, left untouched when identical). -> (x float32 NCHW, y int64)"""
        if self._probe is None:
            import numpy as np

            n = min(self.recipe.gates.probe_size, len(self.data.test))
            xs, ys = zip(*(self.data.test[i] for i in range(n)))
            x = np.stack([np.asarray(t, dtype=np.float32) for t in xs])
            y = np.asarray(ys, dtype=np.int64)
            path = self.run_dir / "probe.npz"
            if not _same_probe(path, x, y):
                with atomic_path(path) as tmp:
                    with open(tmp, "wb") as f:
                        np.savez(f, x=x, y=y)
            self._probe = (x, y)
        return self._probe


def _same_probe(path: Path, x, y) -> bool:
    import numpy as np

    try:
        with np.load(path) as z:
            return z["x"].shape == x.shape and np.array_equal(z["x"], x) and np.array_equal(z["y"], y)
    except (OSError, ValueError, KeyError, EOFError):
        return False


@dataclass
class BuildResult:
    run_dir: Path
    records: list[StageRecord]
    ok: bool
    message: str
    report: dict[str, Any]


# ---------------------------------------------------------------------------------------------------- the plan

def _none(ctx: BuildContext) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class Step:
    """One row of the plan."""

    name: str
    consumes: str | None                                   # its parent stage; "a|b": the first of them that ran
    settings: Callable[[BuildContext], Any]                # the stage's Settings (hashed, passed to run)
    inputs: Callable[[BuildContext, Any], Any]             # its typed Inputs, from earlier outputs (and settings)
    run: Callable[..., StageResult]                        # the stage's own run(inputs, settings, *, quiet)
    identity: Callable[[BuildContext], dict[str, Any]] = _none   # inputs other than the parent's artifact
    when: Callable[[BuildContext], bool] = lambda ctx: True
    load: Callable[[StageRecord], Any] | None = None       # the output of a reused stage, from its artifact
    skip: Callable[[], StageResult | None] | None = None   # a skipped result, before inputs are assembled
    then: Callable[[BuildContext, StageResult], None] | None = None   # the run folder's own files, after it passed


def _calib_available(ctx: BuildContext) -> int | None:
    """The calibration split's size when it is smaller than the recipe asks (all of it is used, said once); an
    explicit --calib-size larger than the dataset is an error. None: the recipe's count fits."""
    asked, have = ctx.recipe.quant.calib_size, len(ctx.data.calib)
    if asked <= have:
        return None
    if "quant.calib_size" in ctx.opts.overrides:
        raise ConfigError(f"--calib-size {asked}: the calibration split has {have} images")
    if not ctx._calib_note:
        ctx._calib_note = True
        ctx.say(f"note: calibrating on all {have} images (the recipe asks {asked})")
    return have


def _calib_batches(ctx: BuildContext, n: int, seed: int, bs: int = 64):
    """The calibration images PTQ calibrated on (calibration_indices for `n` and `seed`), as float32 batches:
    the same images for PTQ, the calibration cache and the CPU artifact."""
    import numpy as np

    idx = quantize.calibration_indices(len(ctx.data.calib), n, seed=seed)
    for i in range(0, n, bs):
        yield np.stack([np.asarray(ctx.data.calib[int(j)][0], dtype=np.float32) for j in idx[i:i + bs]])


def _final_quant(ctx: BuildContext) -> str:
    return "ptq" if ctx.recipe.ptq_is_final else "qat"


def _fp32_eval(ctx: BuildContext):
    """The FP32 reference every later stage compares with (train's own evaluation when this build trained)."""
    trained = ctx.output("train")
    return ctx.evaluation(EvalKey("train", "torch", "fp32"), lambda: trained.model, known=trained.evaluation)


def _write_meta(ctx: BuildContext, result: StageResult) -> None:
    """RUN/meta.json: the trained model's metadata, which the bundle and the report read."""
    atomic_write_json(ctx.run_dir / "meta.json", result.output.meta.to_dict())


def _quant_eval(ctx: BuildContext, stage: str):
    out = ctx.output(stage)
    return ctx.evaluation(EvalKey(stage, "torch", "int8 (fake-quant)"), lambda: out.model, known=out.evaluation)


def _int8_as_written(ctx: BuildContext):
    from edgeres.runners import OrtRunner

    out = ctx.output("export_int8")
    return ctx.evaluation(EvalKey("export_int8", "onnxruntime", "int8 (as written)"),
                          lambda: OrtRunner(out.path, optimize=False), known=out.onnxruntime)


def _data_identity(ctx: BuildContext) -> dict[str, Any]:
    return {"data": ctx.data.info.fingerprint}


# ------------------------------------------------------------------------------- each stage: settings, inputs

def _train_identity(ctx: BuildContext) -> dict[str, Any]:
    pre, init = ctx.opts.pretrained, ctx.recipe.train.init_from
    return {**_data_identity(ctx), "pretrained": sha256_file(pre) if pre else None,
            "init_from": sha256_file(init) if init else None}


def _train_inputs(ctx: BuildContext, settings) -> train.TrainInputs:
    return train.TrainInputs(ctx.data, ctx.run_dir / "train", ctx.opts.pretrained, device=ctx.device,
                             on_epoch=lambda row: _say_eta(ctx, row))


ETA_FIXED_S = {"fp32": 3.0, "int8": 12.0}   # exports, OpenVINO's conversion, sessions: measured on the demo, 2 cores
ETA_TIMED_ROWS = {"fp32": 3, "int8": 6}      # rows the verify stage times for --bench-seconds each


def build_eta_s(epoch_s: float, recipe: Recipe, *, done_epochs: int, int8: bool, train_images: int,
                eval_images: int, bench_seconds: float) -> float:
    """The whole build's remaining time, from the first training epoch's: the other training epochs; QAT's epochs at
    about twice a training epoch (fake-quant forward and backward, its holdout passes); PTQ's statistics and the
    evaluations and exports at about one forward pass over their images each (a third of a training image); the
    verify stage's timings; a fixed part for exports and conversions."""
    per_image = epoch_s / max(1, train_images)
    kind = "int8" if int8 else "fp32"
    left = (recipe.train.epochs - done_epochs) * epoch_s + ETA_FIXED_S[kind] + ETA_TIMED_ROWS[kind] * bench_seconds
    if int8:
        calib = min(recipe.quant.calib_size, train_images)
        agree = min(recipe.gates.int8_agreement_images, train_images + eval_images)
        left += 2.0 * epoch_s * recipe.quant.qat_epochs + per_image / 3 * (calib + 6 * eval_images + agree)
    return left + per_image / 3 * 3 * eval_images


def _say_eta(ctx: BuildContext, row: dict[str, Any]) -> None:
    if row.get("epoch") != 1 or not row.get("seconds"):
        return
    left = build_eta_s(row["seconds"], ctx.recipe, done_epochs=1, int8=ctx.opts.int8,
                       train_images=len(ctx.data.train), eval_images=len(ctx.data.test),
                       bench_seconds=ctx.opts.bench_seconds)
    when = time.strftime("%H:%M", time.localtime(time.time() + left))
    more = f"{left:.0f} s" if left < 120 else f"{left / 60:.0f} min"
    ctx.say(f"[build] epoch 1 took {row['seconds']:.0f} s: the whole build needs about {more} more (done around "
            f"{when})")


def _fold_inputs(ctx: BuildContext, settings) -> fold.FoldInputs:
    trained = ctx.output("train")
    return fold.FoldInputs(trained.model.to(ctx.device), trained.meta, ctx.probe()[0],
                           ctx.path("fold", "folded.pt"))


def _quant_inputs(ctx: BuildContext, model, out: Path, **kw) -> quantize.QuantInputs:
    fp32 = _fp32_eval(ctx)
    return quantize.QuantInputs(model=model, meta=ctx.output("train").meta, eval_data=ctx.data.test, out=out,
                                reference_top1=fp32.top1, reference_logits=fp32.logits, device=ctx.device, **kw)


def _ptq_inputs(ctx: BuildContext, settings) -> quantize.QuantInputs:
    return _quant_inputs(ctx, ctx.output("fold").model, ctx.path("quant", "ptq.pt"), calib=ctx.data.calib,
                         dataset_fingerprint=ctx.data.info.fingerprint,
                         manifest_path=ctx.path("calibration", "manifest.json"))


def _qat_inputs(ctx: BuildContext, settings) -> quantize.QuantInputs:
    ptq = ctx.output("ptq")
    return _quant_inputs(ctx, ptq.model, ctx.path("quant", "qat.pt"), train_data=ctx.data.train,
                         manifest=ptq.manifest, evaluation=_quant_eval(ctx, "ptq"),
                         teacher=ctx.output("fold").model, holdout=ctx.data.holdout)


def _export_fp32_inputs(ctx: BuildContext, settings) -> export.ExportInputs:
    """FP32 ONNX vs the folded model on the probe (exact)."""
    folded = ctx.output("fold")
    x, y = ctx.probe()
    probe = [(x[i], int(y[i])) for i in range(len(x))]
    return export.ExportInputs(folded.model, folded.meta, probe, ctx.path("export", "model_fp32.onnx"))


def _export_int8_inputs(ctx: BuildContext, settings) -> export.ExportInputs:
    """INT8 Q/DQ ONNX vs the fake-quant model over the whole evaluation split and, up to
    gates.int8_agreement_images, training images (a 99 % gate needs thousands of images to mean anything: on 359,
    four near ties that float rounding flips already fail it)."""
    source = _final_quant(ctx)
    quant = ctx.output(source)
    return export.ExportInputs(quant.model, quant.meta, ctx.data.test, ctx.path("export", "model_int8.onnx"),
                               reference=_quant_eval(ctx, source), more_images=ctx.data.calib)


def _cpu_source(ctx: BuildContext) -> str:
    return "export_fp32" if ctx.recipe.export.cpu_int8 == "openvino" else "export_int8"


def _cpu_inputs(ctx: BuildContext, settings) -> cpu.CpuInputs:
    images = ([b[None] for batch in _calib_batches(ctx, settings.calib_size, settings.seed) for b in batch]
              if settings.mode == "openvino" else None)
    fp32 = _fp32_eval(ctx)
    return cpu.CpuInputs(Path(ctx.records[_cpu_source(ctx)].artifact), ctx.data.test,
                         ctx.path("export", "model_int8_cpu.xml"), calibration=images, reference_top1=fp32.top1,
                         tensorrt_int8=_int8_as_written(ctx), reference_logits=fp32.logits)


def _calib_cache_inputs(ctx: BuildContext, settings) -> calib_cache.CalibCacheInputs:
    return calib_cache.CalibCacheInputs(Path(ctx.records["export_fp32"].artifact),
                                        _calib_batches(ctx, settings.count, settings.seed),
                                        ctx.path("calibration", "calib.cache"))


def _compile_settings(ctx: BuildContext) -> compile.CompileSettings:
    precision = precision_from_flags(fp16=ctx.opts.fp16, int8=ctx.opts.int8)   # --int8 --fp16: both kernels
    return compile.CompileSettings.from_recipe(ctx.recipe, precision=precision.value)


def _compile_inputs(ctx: BuildContext, settings) -> compile.CompileInputs:
    fp32 = Path(ctx.records["export_fp32"].artifact)
    int8 = Path(ctx.records["export_int8"].artifact) if "export_int8" in ctx.records else fp32
    calib = ctx.records.get("calib_cache")
    plan = PlanInputs(fp32_name=fp32.name, int8_name=int8.name, fp32_onnx=fp32, int8_onnx=int8,
                      calib_name=Path(calib.artifact).name if calib else None,
                      calib_cache=Path(calib.artifact) if calib else None)
    return compile.CompileInputs(int8 if ctx.opts.int8 else fp32, plan, ctx.path("tensorrt", "plan.json").parent,
                                 ctx.path("engine", "model.plan"), relative_to=ctx.run_dir, eval_data=ctx.data.test,
                                 reference=_fp32_eval(ctx))


def _verify_settings(ctx: BuildContext) -> verify.VerifySettings:
    return verify.VerifySettings.from_recipe(ctx.recipe, int8=ctx.opts.int8, bench_seconds=ctx.opts.bench_seconds,
                                             torch_device=str(ctx.device))


def _verify_identity(ctx: BuildContext) -> dict[str, Any]:
    return {"artifacts": sorted((r.stage, r.sha256, r.status) for r in ctx.records.values())}


def _verify_inputs(ctx: BuildContext, settings) -> verify.VerifyInputs:
    """Every artifact this build made, on every backend present."""
    from edgeres.runners import OpenVinoRunner, OrtRunner, TorchRunner

    Candidate, rec, dev = verify.Candidate, ctx.records, str(ctx.device)
    trained, folded = ctx.output("train"), ctx.output("fold")
    cands = [Candidate("train", "torch", "fp32", _fp32_eval(ctx), TorchRunner(trained.model, device=dev),
                       rec["train"].artifact),
             Candidate("fold", "torch", "fp32", ctx.evaluation(EvalKey("fold", "torch", "fp32"),
                                                               lambda: folded.model),
                       TorchRunner(folded.model, device=dev), rec["fold"].artifact)]
    for stage in ("ptq", "qat"):
        if stage in rec:
            cands.append(Candidate(stage, "torch", "int8 (fake-quant)", _quant_eval(ctx, stage), None,
                                   rec[stage].artifact))
    runner = OrtRunner(rec["export_fp32"].artifact)
    cands.append(Candidate("export_fp32", "onnxruntime", "fp32",
                           ctx.evaluation(EvalKey("export_fp32", "onnxruntime", "fp32"), lambda: runner), runner,
                           rec["export_fp32"].artifact))
    if "export_int8" in rec:
        out = ctx.output("export_int8")
        runner = OrtRunner(out.path)
        cands.append(Candidate("export_int8", "onnxruntime", "int8",
                               ctx.evaluation(EvalKey("export_int8", "onnxruntime", "int8"), lambda: runner,
                                              known=out.onnxruntime_int8), runner, out.path))
    rec_cpu = rec.get("export_cpu")
    if rec_cpu is not None and rec_cpu.passed and rec_cpu.artifact:
        out = ctx.output("export_cpu")
        runner = OpenVinoRunner(rec_cpu.artifact)
        k = runner.kernel_report()
        cands.append(Candidate("export_cpu", "openvino", "int8",
                               ctx.evaluation(EvalKey("export_cpu", "openvino", "int8"), lambda: runner,
                                              known=out.evaluation), runner, Path(rec_cpu.artifact),
                               int8_kernels=f"{k['int8_kernels']}/{k['int8_kernels'] + k['float_convs']}"))
    comp = rec.get("compile")
    if comp is not None and comp.passed and comp.artifact:
        from edgeres.tensorrt.runner import TrtRunner

        out, runner = ctx.output("compile"), TrtRunner(comp.artifact)
        precision = "int8" if ctx.opts.int8 else "fp16" if ctx.opts.fp16 else "fp32"
        cands.append(Candidate("compile", "tensorrt", precision,
                               ctx.evaluation(EvalKey("compile", "tensorrt", precision), lambda: runner,
                                              known=out.evaluation if out else None), runner, Path(comp.artifact)))
    elif comp is not None:
        cands.append(Candidate("compile", "tensorrt", "-", note=comp.message))
    meta = trained.meta
    return verify.VerifyInputs(_fp32_eval(ctx), cands, (meta.in_channels, meta.input_size, meta.input_size),
                               list(meta.class_names), class_counts=class_counts(ctx.data, len(meta.class_names)))


def _labels_of(split):
    """The labels of a split without decoding an image (a dataset's own labels, through Subsets), or None."""
    import numpy as np

    if split is None:
        return None
    if hasattr(split, "labels"):
        return np.asarray(split.labels)
    if hasattr(split, "dataset") and hasattr(split, "indices"):
        inner = _labels_of(split.dataset)
        return None if inner is None else inner[np.asarray(split.indices, dtype=np.int64)]
    return None


def class_counts(data, num_classes: int) -> dict[str, list[int]]:
    """Images per class in each split: train, holdout (selects epochs), evaluation (what the gates read)."""
    import numpy as np

    out = {}
    for name, split in (("train", data.train), ("holdout", data.holdout), ("evaluation", data.test)):
        labels = _labels_of(split)
        if labels is not None:
            out[name] = np.bincount(labels[(labels >= 0) & (labels < num_classes)], minlength=num_classes).tolist()
    return out


DATA_REPORT = "data_report.json"   # the scan of the data the build ran on (report.json's "data")
VERDICT_FILES = ("probe.npz", "meta.json")   # what the device checks and the class names: hashed into verify's record


def _verify_then(ctx: BuildContext, result: StageResult) -> None:
    """The files the verdict (and the bundle made from it) rests on besides the artifacts, hashed into the verify
    record so that `report`, `bundle` and `records.verdict` refuse a run where one was altered."""
    result.record.depends_on = {name: sha256_file(ctx.run_dir / name) for name in VERDICT_FILES
                                if (ctx.run_dir / name).is_file()}


def _load_cpu(rec: StageRecord):
    return cpu.CpuOutput(Path(rec.artifact)) if rec.artifact else None


def _load_compile(rec: StageRecord):
    return compile.CompileOutput(Path(rec.artifact) if rec.artifact else None, rec.metrics.get("device_plan", {}))


def _int8(ctx: BuildContext) -> bool:
    return ctx.opts.int8


def _calib(ctx: BuildContext) -> dict[str, Any]:
    return {"calib_available": _calib_available(ctx)}


PLAN: list[Step] = [
    Step("train", None, lambda c: train.TrainSettings.from_recipe(c.recipe), _train_inputs, train.run,
         identity=_train_identity, load=lambda r: train.TrainOutput.load(r.artifact), then=_write_meta),
    Step("fold", "train", lambda c: fold.FoldSettings.from_recipe(c.recipe), _fold_inputs, fold.run,
         load=lambda r: fold.FoldOutput.load(r.artifact)),
    Step("ptq", "fold", lambda c: quantize.PtqSettings.from_recipe(c.recipe, **_calib(c)), _ptq_inputs,
         quantize.run_ptq, identity=_data_identity, when=_int8, load=lambda r: quantize.QuantOutput.load(r.artifact)),
    Step("qat", "ptq", lambda c: quantize.QatSettings.from_recipe(c.recipe), _qat_inputs, quantize.run_qat,
         identity=_data_identity, when=lambda c: c.opts.int8 and not c.recipe.ptq_is_final,
         load=lambda r: quantize.QuantOutput.load(r.artifact)),
    Step("export_fp32", "fold", lambda c: export.ExportSettings.from_recipe(c.recipe, int8=False),
         _export_fp32_inputs, export.run, load=lambda r: export.ExportOutput(Path(r.artifact))),
    Step("export_int8", "qat|ptq", lambda c: export.ExportSettings.from_recipe(c.recipe, int8=True),
         _export_int8_inputs, export.run, when=_int8, load=lambda r: export.ExportOutput(Path(r.artifact))),
    Step("export_cpu", "export_fp32", lambda c: cpu.CpuSettings.from_recipe(c.recipe, **_calib(c)), _cpu_inputs,
         cpu.run, identity=lambda c: {**_data_identity(c), "onnx": c.records[_cpu_source(c)].sha256},
         when=_int8, load=_load_cpu, skip=cpu.skipped),
    Step("calib_cache", "export_fp32", lambda c: calib_cache.CalibCacheSettings.from_recipe(c.recipe, **_calib(c)),
         _calib_cache_inputs, calib_cache.run, identity=_data_identity, when=_int8),
    Step("compile", "export_int8|export_fp32", _compile_settings, _compile_inputs, compile.run,
         identity=lambda c: {**_data_identity(c), "calib_cache": getattr(c.records.get("calib_cache"), "sha256", None)},
         load=_load_compile),
    Step("verify", "export_int8|export_fp32", _verify_settings, _verify_inputs, verify.run,
         identity=_verify_identity, then=_verify_then),
]


def inputs_hash(ctx: BuildContext, step: Step, settings: Any) -> str:
    """What a stage's result is a function of: its parent's artifact (sha256, and that parent's own inputs hash),
    exactly `hashed(settings)` (asdict(settings) without where each limit came from), and the identity of its
    other inputs."""
    parent = _parent(ctx, step)
    return sha256_json({"stage": step.name, "parent": parent.sha256 if parent else None,
                        "parent_inputs": parent.inputs_hash if parent else None, "settings": hashed(settings),
                        "inputs": step.identity(ctx)})


def _parent(ctx: BuildContext, step: Step) -> StageRecord | None:
    return next((ctx.records[p] for p in (step.consumes or "").split("|") if p in ctx.records), None)


def run_stage(ctx: BuildContext, step: Step) -> StageRecord:
    name = step.name
    parent = _parent(ctx, step)
    settings = step.settings(ctx)
    digest = inputs_hash(ctx, step, settings)
    if not ctx.opts.force:
        prev = reusable(ctx.run_dir, name, digest)
        if prev is not None:
            ctx.say(f"[{name}] unchanged, reused ({prev.artifact or prev.status})")
            ctx.records[name] = prev
            return prev
    ctx.say(f"[{name}] running")
    start = time.perf_counter()
    try:
        with heartbeat(f"[{name}]", enabled=not ctx.opts.quiet):
            result = step.skip() if step.skip else None
            if result is None:
                result = step.run(step.inputs(ctx, settings), settings, quiet=ctx.opts.quiet)
        rec = result.record
        setattr(ctx.outputs, name, result.output)
        if step.then is not None and rec.passed:
            step.then(ctx, result)
    except EdgeresError as e:   # a stage that could not run at all: a failed record, like a failed gate
        rec = StageRecord(stage=name, status=Status.FAILED.value, message=f"{name}: {e}")
    rec.stage = name
    if name == "train" and ctx.data_report is not None:   # what the model was trained on, in stages.jsonl
        rec.metrics.setdefault("data_report", ctx.data_report)
    rec.environment.update(describe_device(ctx.device))
    rec.inputs_hash = digest
    rec.parent_sha256 = parent.sha256 if parent else None
    rec.recipe_hash = ctx.recipe.hash()
    rec.duration_s = round(time.perf_counter() - start, 3)
    append_record(ctx.run_dir, rec)
    ctx.records[name] = rec
    # a failure is said once, on the verdict line under the table
    verdict = "FAILED (the verdict below says why)" if rec.status == Status.FAILED.value else \
        rec.status if rec.status != Status.PASSED.value else f"passed in {rec.duration_s:.1f}s"
    ctx.say(f"[{name}] {verdict}")
    if rec.status == Status.FAILED.value:
        raise StageFailed(rec.message or f"{name} failed")
    return rec


class StageFailed(EdgeresError):
    """A stage's record is failed (a gate, or an error it could not run past): the build stops there."""


# ---------------------------------------------------------------------------------------------------- driver

def _resolve_recipe(opts: BuildOptions):
    """The recipe with every option applied: what recipe.yaml records is what the stages run with."""

    overrides = {"model.arch": opts.arch, "data.dataset": opts.dataset, "data.data_dir": opts.data_dir,
                 "train.epochs": opts.epochs, "quant.qat_epochs": opts.qat_epochs,
                 "quant.calib_method": opts.calib_method,   # --max-drop: the final INT8 model's limit, either way
                 "gates.max_drop_ptq": opts.max_drop, "gates.max_drop_qat": opts.max_drop, **opts.overrides}
    origins = {k: f"--max-drop {opts.max_drop:g}" for k in ("gates.max_drop_ptq", "gates.max_drop_qat")} \
        if opts.max_drop is not None else {}
    if "gates.min_agreement_pct" in opts.overrides:
        origins["gates.min_agreement_pct"] = f"--min-agreement {opts.overrides['gates.min_agreement_pct']:g}"
    values, flagged = gate_overrides(opts.gates)   # --gate last: it names the key it sets
    return for_dataset(load_recipe(opts.recipe or "demo"), opts.dataset, {**overrides, **values},
                       origins={**origins, **flagged})


def _with_dataset_of_data_dir(opts: BuildOptions) -> BuildOptions:
    """--data-dir without --dataset: the folder says which dataset it is (one line), or the build is refused."""
    from dataclasses import replace

    dataset, note = dataset_for(opts.data_dir, opts.dataset, load_recipe(opts.recipe or "demo").data.dataset)
    if note is None:
        return opts
    if not opts.quiet:
        print(note, flush=True)
    return replace(opts, dataset=dataset)


SCRATCH_RECIPE = "imagenette_resnet18"   # photos without published weights: a recipe that learns from scratch


def choose_recipe(opts: BuildOptions) -> tuple[BuildOptions, str | None]:
    """The recipe when none was named, and one line saying why. Photos (an ImageFolder) are fine-tuned from the
    published ImageNet weights of the architecture when they are on this machine (edgeres weights: the cache,
    EDGERES_WEIGHTS or torchvision's cache): `finetune_imagefolder`, which learns from a few hundred photos; without
    them, the line says how to get them, and the build trains from scratch with a recipe that can (SCRATCH_RECIPE).
    Everything else: the demo recipe."""
    from dataclasses import replace

    if opts.recipe is not None:
        return opts, None
    if opts.dataset != "imagefolder":
        return replace(opts, recipe="demo"), None
    arch = opts.arch or "resnet18"
    if opts.pretrained or "train.init_from" in opts.overrides:
        return replace(opts, recipe="finetune_imagefolder"), None
    found = pretrained.available_offline(arch)
    if found is not None:
        note = (f"weights: fine-tuning the published ImageNet {arch} ({found}); recipe finetune_imagefolder "
                f"(--recipe to choose another)")
        return replace(opts, recipe="finetune_imagefolder",
                       overrides={**opts.overrides, "train.init_from": str(found)}), note
    how = (f"`edgeres weights fetch {arch}` (or `edgeres weights import --from FILE`) gets them"
           if arch in pretrained.PUBLISHED else f"{arch} has no published ImageNet weights")
    note = (f"weights: no published ImageNet {arch} weights on this machine ({how}); training from scratch with "
            f"recipe {SCRATCH_RECIPE} ({load_recipe(SCRATCH_RECIPE).train.epochs} epochs), which needs more photos "
            f"and time to learn than a fine-tune")
    return replace(opts, recipe=SCRATCH_RECIPE), note


def default_out(opts: BuildOptions, recipe: Recipe) -> Path:
    """runs/ARCH-DATASETNAME: the photos' folder name for an ImageFolder, else the dataset's name."""
    name = Path(opts.data_dir).expanduser().resolve().name if opts.data_dir else recipe.data.dataset
    return Path("runs") / f"{recipe.model.arch}-{name}"


def build(opts: BuildOptions) -> BuildResult:
    """Validate everything, then hold the run folder and run the plan. A build refused before its first stage
    (bad option, recipe or data, unwritable or busy folder) changes nothing in the folder."""

    if opts.max_drop is not None and not opts.max_drop >= 0:   # NaN too: every gate against it would fail
        raise ConfigError(f"--max-drop must be >= 0, got {opts.max_drop}")
    if not 0 <= opts.bench_seconds <= 3600:   # NaN/inf would be refused only in the verify stage, after training
        raise ConfigError(f"--bench-seconds must lie in [0, 3600], got {opts.bench_seconds}")
    opts = _with_dataset_of_data_dir(opts)
    if opts.pretrained is not None and not Path(opts.pretrained).is_file():
        raise ConfigError(f"--pretrained checkpoint not found: {opts.pretrained}")
    opts, why = choose_recipe(opts)
    if why and not opts.quiet:
        print(why, flush=True)
    recipe = _resolve_recipe(opts)
    if opts.out is None:
        from dataclasses import replace

        opts = replace(opts, out=default_out(opts, recipe))
    if recipe.train.init_from:   # torchvision:<arch> -> the verified published file (fetched once), else a path

        say = None if opts.quiet else (lambda m: print(m, flush=True))
        recipe = recipe.with_overrides({"train.init_from": pretrained.resolve(recipe.train.init_from, say=say)})
    if recipe.train.init_from and not Path(recipe.train.init_from).is_file():
        raise ConfigError(f"--init-from checkpoint not found: {recipe.train.init_from}")
    if recipe.train.init_from and opts.pretrained:
        raise ConfigError("--pretrained skips training, --init-from starts it from a checkpoint: give one")
    from edgeres.models.registry import get_spec, resolve_options

    resolve_options(get_spec(recipe.model.arch), recipe.model.options)   # an unknown arch is refused here
    device = resolve_device(opts.device)   # decided once for every torch stage; an unusable --device is refused here
    check_checkpoints(opts.pretrained, recipe.train.init_from, arch=recipe.model.arch)   # read before any write
    _check_dependencies(opts, recipe)   # what the planned stages need, before hours of training
    check_owned_dir(opts.out, what="run folder", legacy=("stages.jsonl",))

    if not opts.quiet:   # everything above was quick; the data load may not be
        print(f"[build] {opts.out}: {recipe.model.arch} on {recipe.data.dataset}{' --int8' if opts.int8 else ''}, "
              f"torch on {device}", flush=True)
    from edgeres.data import scan as data_scan  # loads torch (decode_image): here, not when the CLI starts

    with heartbeat("[data]", enabled=not opts.quiet):
        data = _load_data(recipe, data_scan)   # load (and so validate) the data before the folder is touched
        # every file looked at before any is trained on: all the unreadable ones named at once, duplicates, counts
        data_report = data_scan.scan_bundle(data, workers=max(1, recipe.data.workers),
                                            min_images=recipe.gates.min_class_images,
                                            progress=None if opts.quiet else data_scan.progress_printer("[data] scan"))
    data_scan.check_readable(data_report, skip_bad_images=recipe.data.skip_bad_images)
    recipe, batch_note = fit_batch(recipe, len(data.train), given="data.batch_size" in opts.overrides)
    check_memory(recipe.model.arch, input_size=data.info.input_size, batch=recipe.data.batch_size,
                 num_classes=data.info.num_classes, in_channels=data.info.in_channels, options=recipe.model.options,
                 device=str(device), lower="--input-size or --batch-size")
    if not opts.quiet:
        for line in summary_lines(opts, recipe, data) + data_scan.format_report(data_report) + batch_note:
            print(line, flush=True)
    run_dir = claim_dir(opts.out, what="run folder", kind="run", legacy=("stages.jsonl",))
    with run_lock(run_dir):
        files = split_files(data)
        if files is not None:   # which photo is in which split: the same on every rebuild
            atomic_write_json(run_dir / "data_split.json", files)
        atomic_write_json(run_dir / DATA_REPORT, data_report)
        ctx = BuildContext(opts=opts, recipe=recipe, run_dir=run_dir, device=device, _data=data,
                           data_report=data_report)
        return _run_plan(ctx)


def fit_batch(recipe: Recipe, train_images: int, *, given: bool) -> tuple[Recipe, list[str]]:
    """A recipe's batch larger than half the training split (a few dozen photos) would leave at most one full batch
    an epoch (none when larger than the split): the recipe's own batch becomes the largest power of two that gives at
    least two steps an epoch (QAT's too), said in one line. A batch given with --batch-size is the user's: never
    changed (one that is too large is refused in one line)."""
    batch = recipe.data.batch_size
    if given or train_images >= 2 * batch or train_images < 2:
        return recipe, []
    fitted = 1 << max(0, (train_images // 2).bit_length() - 1)
    if fitted >= batch:
        return recipe, []
    return recipe.with_overrides({"data.batch_size": fitted}), [
        f"note: batch {fitted} instead of the recipe's {batch}: the training split has {train_images} images "
        f"(--batch-size to choose)"]


def _load_data(recipe: Recipe, data_scan):
    """get_data_for(recipe); where building the decoded-image cache stops at the first unreadable file, the scan
    of the uncached listing names every unreadable file at once instead (one run, not one per bad file)."""
    try:
        return get_data_for(recipe)
    except DataError:
        if not recipe.data.cache or recipe.data.skip_bad_images:
            raise
        listing = get_data_for(recipe.with_overrides({"data.cache": False}))
        data_scan.check_readable(data_scan.scan_bundle(listing, workers=max(1, recipe.data.workers)),
                                 skip_bad_images=False)
        raise


def summary_lines(opts: BuildOptions, recipe: Recipe, data) -> list[str]:
    """What the build is about to do, before it trains: the data (where, which layout, images per split and per
    class), the input size, batch, epochs and recipe, and the stages it plans."""
    info, d, t = data.info, recipe.data, recipe.train
    where = f"{info.root} ({info.layout})" if info.root else info.name
    if info.val_split:
        where += f", split {100 * (1 - info.val_split):.0f}/{100 * info.val_split:.0f} train/evaluation per class"
    counts = class_counts(data, info.num_classes)
    splits = ", ".join(f"{name} {sum(c)}" for name, c in counts.items())
    lines = [f"data: {where}: {info.num_classes} classes; {splits or f'train {info.train_size}'} images"
             + (f"; {info.skipped_images} unreadable skipped" if info.skipped_images else "")]
    if counts and info.num_classes <= 12:
        per = [f"{n} {'/'.join(str(c[i]) for c in counts.values())}" for i, n in enumerate(info.class_names)]
        lines.append(f"      per class ({'/'.join(counts)}): " + ", ".join(per))
    small = [n for n, c in zip(info.class_names, counts.get("evaluation", [])) if c < recipe.gates.min_class_images]
    if small:
        lines.append(f"note: {len(small)} class(es) with fewer than {recipe.gates.min_class_images} evaluation images "
                     f"({', '.join(small[:5])}): their per-class numbers mean little")
    resize = f", resize {info.resize_size}" if info.resize_size else ""
    steps = -(-info.train_size // d.batch_size) * t.epochs
    train = "no training (--pretrained)" if opts.pretrained else (
        f"{t.epochs} epoch(s), {steps} optimizer steps" + (f", from {Path(t.init_from).name}" if t.init_from else
                                                           ", from scratch"))
    lines.append(f"input {info.input_size} px{resize}, batch {d.batch_size}; {train}; recipe {opts.recipe}")
    return [w for line in lines for w in textwrap.wrap(line, 80, subsequent_indent="      ", break_on_hyphens=False,
                                                        break_long_words=False)]


def _check_dependencies(opts: BuildOptions, recipe) -> None:
    """Refuse up front what a planned stage would fail on later (NNCF for --int8); say once what will be skipped
    for want of an optional package (OpenVINO: the CPU INT8 artifact; matplotlib: the report's figures)."""
    import importlib.util

    def have(name: str) -> bool:
        return importlib.util.find_spec(name) is not None

    if opts.int8 and not have("nncf"):
        raise BackendUnavailable("--int8 needs NNCF for PTQ and QAT: pip install 'edgeres[quant]' (nothing was run)")
    if opts.int8:
        nncf_kernels_wanted()   # a wrong EDGERES_NNCF_KERNELS is refused now, not at PTQ after the training
    notes = []
    if opts.int8 and recipe.export.cpu_int8 == "openvino" and not have("openvino"):
        notes.append("OpenVINO is not installed: the CPU INT8 artifact (export_cpu) will be skipped "
                     "(pip install 'edgeres[openvino]')")
    if not have("matplotlib"):
        notes.append("matplotlib is not installed: report.html will have no figures (pip install 'edgeres[report]')")
    if not opts.quiet:
        for n in notes:
            print(f"note: {n}", flush=True)


def prune(ctx: BuildContext) -> list[str]:
    """After a build that ran its plan to the end: remove the files of ours it no longer needs - train/last.pt
    (the resume checkpoint of a training that finished: weights and optimizer state, 3x best.pt with Adam) and the
    models earlier failed gates kept as <name>.rejected.<ext> for a stage that has passed since. Only regular files
    at the names edgeres writes; what a record's verdict rests on is never touched. -> ["train/last.pt (131 MB)"]"""
    import os
    import stat

    candidates = [ctx.run_dir / "train" / "last.pt"] if ctx.records.get("train") and ctx.records["train"].passed \
        and not ctx.opts.pretrained else []
    for rec in ctx.records.values():
        if rec.passed and rec.artifact:
            rejected = rejected_path(ctx.run_dir / Path(rec.artifact).parent.name / Path(rec.artifact).name)
            candidates += [rejected, rejected.with_suffix(".bin")] if rejected.suffix == ".xml" else [rejected]
    freed = []
    for path in candidates:
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):   # never a link, a folder or a device of the user's at that name
            path.unlink()
            freed.append(f"{path.relative_to(ctx.run_dir)} ({st.st_size / 1e6:.0f} MB)")
    return freed


def _run_plan(ctx: BuildContext) -> BuildResult:

    steps = [s for s in PLAN if s.when(ctx)]
    atomic_write_text(ctx.run_dir / "recipe.yaml", ctx.recipe.to_yaml())
    # the limits of this build that are looser than the shipped recipe's: part of the verdict, the report and the
    # bundle manifest
    write_plan(ctx.run_dir, [s.name for s in steps],
               limits={"loosened": ctx.recipe.loosened(shipped_reference(ctx.opts.recipe)),
                       "confidence": ctx.recipe.gates.confidence})
    ok, message = True, "all gates passed"
    start = time.perf_counter()
    try:
        for step in steps:
            run_stage(ctx, step)
    except StageFailed as e:
        ok, message = False, str(e)
    finish_plan(ctx.run_dir)
    if ok:
        freed = prune(ctx)
        if freed:
            ctx.say(f"[build] removed what the finished build no longer needs: {', '.join(freed)}")
    with heartbeat("[report]", enabled=not ctx.opts.quiet):
        report = write_report(ctx.run_dir, list(ctx.records.values()), ok=ok, message=message,
                              total_s=time.perf_counter() - start)
    return BuildResult(run_dir=ctx.run_dir, records=list(ctx.records.values()), ok=ok, message=message, report=report)
