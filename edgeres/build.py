"""`edgeres build`: the plan (which stages run, in order, and what each consumes) and one loop over it.

Every stage is one function in its own module, `run(inputs, settings) -> StageResult[Output]` (train.run, fold.run,
quantize.run_ptq / run_qat, export.run, cpu.run, tensorrt.calib_cache.run, tensorrt.compile.run, verify.run): it
checks its result, writes its artifact atomically only then, and returns its record and typed output. The CLI
commands call the same functions. Here a row of `PLAN` names a stage, what it consumes, when it runs, the settings
that enter its inputs hash, and a short adapter that assembles its typed inputs from earlier outputs.
`run_stage` adds what every stage shares: the inputs hash (parent sha256 + the stage's settings), reuse of a
finished stage whose inputs are unchanged and whose artifact is intact, timing, the append to stages.jsonl, and
stopping at the first failed gate.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeres.device import describe as describe_device
from edgeres.device import resolve as resolve_device
from edgeres.errors import ConfigError, EdgeresError, GateError
from edgeres.io import atomic_write_json, atomic_write_text, sha256_file, sha256_json
from edgeres.progress import heartbeat
from edgeres.records import StageRecord, StageResult, Status, append_record, reusable


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
    device: str | None = None      # torch device for every torch stage (edgeres.device.resolve; None: GPU if any)
    overrides: dict[str, Any] = field(default_factory=dict)   # any other dotted recipe key: {"data.input_size": 64}


@dataclass
class Outputs:
    """What the stages handed on, typed: one field per stage. A stage reused from an earlier build has no output
    until something asks for it; then its `load` (see PLAN) rebuilds it from the artifact."""

    train: Any = None          # train.TrainOutput
    fold: Any = None           # fold.FoldOutput
    ptq: Any = None            # quantize.QuantOutput
    qat: Any = None            # quantize.QuantOutput
    export_fp32: Any = None    # export.ExportOutput
    export_int8: Any = None    # export.ExportOutput
    export_cpu: Any = None     # cpu.CpuOutput
    calib_cache: Any = None    # tensorrt.calib_cache.CalibCacheOutput
    compile: Any = None        # tensorrt.compile.CompileOutput
    verify: Any = None         # the table's rows


@dataclass
class BuildContext:
    opts: BuildOptions
    recipe: Any                # recipe.Recipe (frozen, validated)
    run_dir: Path
    records: dict[str, StageRecord] = field(default_factory=dict)
    outputs: Outputs = field(default_factory=Outputs)
    evaluations: dict[str, Any] = field(default_factory=dict)   # "<stage>/<backend>" -> EvalResult, once per build
    device: Any = None         # the torch.device every torch stage runs on, decided once (build)
    _data: Any = None
    _probe: Any = None
    _calib_note: bool = False

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

    def output(self, stage: str):
        """The typed output of `stage`: handed on by this build, or loaded from the artifact of a reused one."""
        value = getattr(self.outputs, stage)
        if value is None:
            step = next(s for s in PLAN if s.name == stage)
            value = step.load(self.records[stage]) if step.load else None
            setattr(self.outputs, stage, value)
        return value

    def evaluation(self, key: str, make: Callable[[], Any]):
        """The evaluation (EvalResult on the evaluation split) under `key`, made by `make()` once per build."""
        from edgeres.evaluate import evaluate

        if key not in self.evaluations:
            target = make()
            if hasattr(target, "parameters") and hasattr(target, "to"):   # a torch model: on the build's device
                target = target.to(self.device)
            self.evaluations[key] = evaluate(target, self.data.test, batch_size=256,
                                             progress=False if self.opts.quiet else f"evaluating {key}")
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
                from edgeres.io import atomic_path

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

@dataclass(frozen=True)
class Step:
    """One row of the plan."""

    name: str
    consumes: str | None                                   # its parent stage; "a|b": the first of them that ran
    call: Callable[[BuildContext], StageResult]            # assembles typed inputs, calls the stage's run()
    settings: Callable[[BuildContext], dict[str, Any]]     # with the parent's sha256: the stage's inputs hash
    when: Callable[[BuildContext], bool] = lambda ctx: True
    load: Callable[[StageRecord], Any] | None = None       # the output of a reused stage, from its artifact


def max_drop(opts: BuildOptions, recipe) -> tuple[float, str]:
    """The allowed top-1 drop (pp) of the final INT8 model and where it comes from: --max-drop, else the recipe's
    gates.max_drop_qat (QAT runs) or gates.max_drop_ptq (PTQ only)."""
    if opts.max_drop is not None:
        return opts.max_drop, "--max-drop"
    if recipe.quant.qat_epochs > 0:
        return recipe.gates.max_drop_qat, "gates.max_drop_qat"
    return recipe.gates.max_drop_ptq, "gates.max_drop_ptq"


def _calib_size(ctx: BuildContext) -> int:
    """The recipe's calibration count, or every image of a smaller dataset (said once); an explicit
    --calib-size larger than the dataset is an error."""
    asked, have = ctx.recipe.quant.calib_size, len(ctx.data.calib)
    if asked <= have:
        return asked
    if "quant.calib_size" in ctx.opts.overrides:
        raise ConfigError(f"--calib-size {asked}: the calibration split has {have} images")
    if not ctx._calib_note:
        ctx._calib_note = True
        ctx.say(f"note: calibrating on all {have} images (the recipe asks {asked})")
    return have


def _calib_batches(ctx: BuildContext, bs: int = 64):
    """The calibration images PTQ calibrated on (calibration_indices with the recipe's seed), as float32 batches:
    chosen once, for PTQ, the calibration cache and the CPU artifact."""
    import numpy as np

    from edgeres.quantize import calibration_indices

    n = _calib_size(ctx)
    idx = calibration_indices(len(ctx.data.calib), n, seed=ctx.recipe.train.seed)
    for i in range(0, n, bs):
        yield np.stack([np.asarray(ctx.data.calib[int(j)][0], dtype=np.float32) for j in idx[i:i + bs]])


def _final_quant(ctx: BuildContext) -> str:
    return "qat" if ctx.recipe.quant.qat_epochs > 0 else "ptq"


def _fp32_eval(ctx: BuildContext):
    return ctx.evaluation("train/torch", lambda: ctx.output("train").model)


def _quant_eval(ctx: BuildContext, stage: str):
    out = ctx.output(stage)
    if out.evaluation is not None:
        ctx.evaluations.setdefault(f"{stage}/torch", out.evaluation)
    return ctx.evaluation(f"{stage}/torch", lambda: out.model)


def _int8_as_written(ctx: BuildContext):
    from edgeres.runners import OrtRunner

    out = ctx.output("export_int8")
    if out.onnxruntime is not None:
        ctx.evaluations.setdefault("export_int8/onnxruntime-as-written", out.onnxruntime)
    return ctx.evaluation("export_int8/onnxruntime-as-written", lambda: OrtRunner(out.path, optimize=False))


# ------------------------------------------------------------------------------ adapters: typed inputs -> run()

def _train(ctx: BuildContext) -> StageResult:
    from edgeres.train import TrainInputs, TrainSettings, run

    result = run(TrainInputs(ctx.data, ctx.run_dir / "train", ctx.opts.pretrained, device=ctx.device),
                 TrainSettings(ctx.recipe), quiet=ctx.opts.quiet)
    if result.output.evaluation is not None:   # the FP32 reference every later stage compares with
        ctx.evaluations.setdefault("train/torch", result.output.evaluation)
    atomic_write_json(ctx.run_dir / "meta.json", result.output.meta.to_dict())
    return result


def _fold(ctx: BuildContext) -> StageResult:
    from edgeres.fold import FoldInputs, FoldSettings, run

    trained = ctx.output("train")
    return run(FoldInputs(trained.model.to(ctx.device), trained.meta, ctx.probe()[0], ctx.path("fold", "folded.pt")),
               FoldSettings(rel_tol=ctx.recipe.gates.fold_rel_tol))


def _quant_inputs(ctx: BuildContext, model, out: Path, **kw):
    from edgeres.quantize import QuantInputs

    fp32 = _fp32_eval(ctx)
    return QuantInputs(model=model, meta=ctx.output("train").meta, eval_data=ctx.data.test, out=out,
                       reference_top1=fp32.top1, reference_logits=fp32.logits, device=ctx.device, **kw)


def _ptq(ctx: BuildContext) -> StageResult:
    from edgeres.quantize import PtqSettings, run_ptq

    q = ctx.recipe.quant
    limit, source = max_drop(ctx.opts, ctx.recipe)
    inputs = _quant_inputs(ctx, ctx.output("fold").model, ctx.path("quant", "ptq.pt"), calib=ctx.data.calib,
                           dataset_fingerprint=ctx.data.info.fingerprint,
                           manifest_path=ctx.path("calibration", "manifest.json"))
    final = q.qat_epochs == 0   # PTQ is gated only when it is the final INT8 model
    return run_ptq(inputs, PtqSettings(calib_size=_calib_size(ctx), method=q.calib_method, seed=ctx.recipe.train.seed,
                                       max_drop=limit if final else None, drop_source=source,
                                       min_agreement_pct=ctx.recipe.gates.min_agreement_pct if final else None),
                   quiet=ctx.opts.quiet)


def _qat(ctx: BuildContext) -> StageResult:
    from edgeres.quantize import QatSettings, run_qat

    q = ctx.recipe.quant
    limit, source = max_drop(ctx.opts, ctx.recipe)
    ptq = ctx.output("ptq")
    inputs = _quant_inputs(ctx, ptq.model, ctx.path("quant", "qat.pt"), train_data=ctx.data.train,
                           manifest=ptq.manifest, evaluation=_quant_eval(ctx, "ptq"),
                           teacher=ctx.output("fold").model, holdout=ctx.data.holdout)
    return run_qat(inputs, QatSettings(epochs=q.qat_epochs, lr=q.qat_lr,
                                       batch_size=q.qat_batch_size or ctx.recipe.data.batch_size,
                                       seed=ctx.recipe.train.seed, max_drop=limit, drop_source=source,
                                       loss=q.qat_loss, temperature=q.qat_temperature, amp=q.qat_amp,
                                       min_agreement_pct=ctx.recipe.gates.min_agreement_pct),
                   quiet=ctx.opts.quiet)


def _export_settings(ctx: BuildContext, int8: bool):
    from edgeres.export import ExportSettings

    e, g = ctx.recipe.export, ctx.recipe.gates
    return ExportSettings(int8=int8, opset=e.opset, simplify=e.simplify, recipe_hash=ctx.recipe.hash(),
                          rel_tol=g.export_rel_tol, min_agreement_pct=g.min_int8_agreement, probe_size=g.probe_size)


def _export_fp32(ctx: BuildContext) -> StageResult:
    """FP32 ONNX vs the folded model on the probe (exact)."""
    from edgeres.export import ExportInputs, run

    folded = ctx.output("fold")
    x, y = ctx.probe()
    probe = [(x[i], int(y[i])) for i in range(len(x))]
    return run(ExportInputs(folded.model, folded.meta, probe, ctx.path("export", "model_fp32.onnx")),
               _export_settings(ctx, False), quiet=ctx.opts.quiet)


def _export_int8(ctx: BuildContext) -> StageResult:
    """INT8 Q/DQ ONNX vs the fake-quant model over the whole evaluation split (a 99 % gate needs hundreds of images
    to mean anything: on a 64-image probe one disagreement is already 98.4 %)."""
    from edgeres.export import ExportInputs, run

    source = _final_quant(ctx)
    quant = ctx.output(source)
    return run(ExportInputs(quant.model, quant.meta, ctx.data.test, ctx.path("export", "model_int8.onnx"),
                            reference=_quant_eval(ctx, source)),
               _export_settings(ctx, True), quiet=ctx.opts.quiet)


def _export_cpu(ctx: BuildContext) -> StageResult:
    from edgeres.cpu import CpuInputs, CpuSettings, run, skipped

    mode = ctx.recipe.export.cpu_int8
    limit, source = max_drop(ctx.opts, ctx.recipe)
    skip = skipped()   # before drawing calibration images and evaluations it would not use
    if skip is not None:
        return skip
    onnx = ctx.records["export_fp32" if mode == "openvino" else "export_int8"].artifact
    images = [b[None] for batch in _calib_batches(ctx) for b in batch] if mode == "openvino" else None
    return run(CpuInputs(Path(onnx), ctx.data.test, ctx.path("export", "model_int8_cpu.xml"), calibration=images,
                         reference_top1=_fp32_eval(ctx).top1, tensorrt_int8=_int8_as_written(ctx),
                         reference_logits=_fp32_eval(ctx).logits),
               CpuSettings(mode=mode, max_drop=limit, drop_source=source,
                           min_agreement_pct=ctx.recipe.gates.min_agreement_pct), quiet=ctx.opts.quiet)


def _calib_cache(ctx: BuildContext) -> StageResult:
    from edgeres.tensorrt.calib_cache import CalibCacheInputs, run

    return run(CalibCacheInputs(Path(ctx.records["export_fp32"].artifact), _calib_batches(ctx),
                                ctx.path("calibration", "calib.cache")))


def _compile(ctx: BuildContext) -> StageResult:
    from edgeres.tensorrt.compile import CompileInputs, CompileSettings, run
    from edgeres.tensorrt.options import precision_from_flags
    from edgeres.tensorrt.targets import PlanInputs

    fp32 = Path(ctx.records["export_fp32"].artifact)
    int8 = Path(ctx.records["export_int8"].artifact) if "export_int8" in ctx.records else fp32
    calib = ctx.records.get("calib_cache")
    plan = PlanInputs(fp32_name=fp32.name, int8_name=int8.name, fp32_onnx=fp32, int8_onnx=int8,
                      calib_name=Path(calib.artifact).name if calib else None,
                      calib_cache=Path(calib.artifact) if calib else None)
    precision = precision_from_flags(fp16=ctx.opts.fp16, int8=ctx.opts.int8)   # --int8 --fp16: both kernels
    return run(CompileInputs(int8 if ctx.opts.int8 else fp32, plan, ctx.path("tensorrt", "plan.json").parent,
                             ctx.path("engine", "model.plan"), relative_to=ctx.run_dir),
               CompileSettings(precision=precision.value))


def _verify(ctx: BuildContext) -> StageResult:
    """Every artifact this build made, on every backend present."""
    from edgeres.runners import OpenVinoRunner, OrtRunner, TorchRunner
    from edgeres.verify import Candidate, VerifyInputs, VerifySettings, run

    rec = ctx.records
    trained = ctx.output("train")
    meta = trained.meta
    dev = str(ctx.device)
    cands = [Candidate("train", "torch", "fp32", _fp32_eval(ctx), TorchRunner(trained.model, device=dev),
                       rec["train"].artifact)]
    folded = ctx.output("fold")
    cands.append(Candidate("fold", "torch", "fp32", ctx.evaluation("fold/torch", lambda: folded.model),
                           TorchRunner(folded.model, device=dev), rec["fold"].artifact))
    for stage in ("ptq", "qat"):
        if stage in rec:
            cands.append(Candidate(stage, "torch", "int8 (fake-quant)", _quant_eval(ctx, stage), None,
                                   rec[stage].artifact))
    fp32_runner = OrtRunner(rec["export_fp32"].artifact)
    cands.append(Candidate("export_fp32", "onnxruntime", "fp32",
                           ctx.evaluation("export_fp32/onnxruntime", lambda: fp32_runner), fp32_runner,
                           rec["export_fp32"].artifact))
    if "export_int8" in rec:
        out = ctx.output("export_int8")
        if out.onnxruntime_int8 is not None:
            ctx.evaluations.setdefault("export_int8/onnxruntime", out.onnxruntime_int8)
        runner = OrtRunner(out.path)
        cands.append(Candidate("export_int8", "onnxruntime", "int8",
                               ctx.evaluation("export_int8/onnxruntime", lambda: runner), runner, out.path))
    cpu = rec.get("export_cpu")
    if cpu is not None and cpu.passed and cpu.artifact:
        out = ctx.output("export_cpu")
        if out.evaluation is not None:
            ctx.evaluations.setdefault("export_cpu/openvino", out.evaluation)
        runner = OpenVinoRunner(cpu.artifact)
        k = runner.kernel_report()
        cands.append(Candidate("export_cpu", "openvino", "int8", ctx.evaluation("export_cpu/openvino", lambda: runner),
                               runner, Path(cpu.artifact),
                               int8_kernels=f"{k['int8_kernels']}/{k['int8_kernels'] + k['float_convs']}"))
    comp = rec.get("compile")
    if comp is not None and comp.passed and comp.artifact:
        from edgeres.tensorrt.runner import TrtRunner

        runner = TrtRunner(comp.artifact)
        precision = "int8" if ctx.opts.int8 else "fp16" if ctx.opts.fp16 else "fp32"
        cands.append(Candidate("compile", "tensorrt", precision, ctx.evaluation("compile/tensorrt", lambda: runner),
                               runner, Path(comp.artifact)))
    elif comp is not None:
        cands.append(Candidate("compile", "tensorrt", "-", note=comp.message))
    limit, source = max_drop(ctx.opts, ctx.recipe)
    return run(VerifyInputs(_fp32_eval(ctx), cands, (meta.in_channels, meta.input_size, meta.input_size),
                            list(meta.class_names)),
               VerifySettings(bench_seconds=ctx.opts.bench_seconds, max_drop=limit if "export_int8" in rec else None,
                              drop_source=source, torch_device=dev,
                              min_agreement_pct=ctx.recipe.gates.min_agreement_pct if "export_int8" in rec else None))


def _load(kind: str) -> Callable[[StageRecord], Any]:
    def load(rec: StageRecord):
        if kind == "train":
            from edgeres.train import TrainOutput

            return TrainOutput.load(rec.artifact)
        if kind == "fold":
            from edgeres.fold import FoldOutput

            return FoldOutput.load(rec.artifact)
        if kind == "quant":
            from edgeres.quantize import QuantOutput

            return QuantOutput.load(rec.artifact)
        if kind == "export":
            from edgeres.export import ExportOutput

            return ExportOutput(Path(rec.artifact))
        from edgeres.cpu import CpuOutput

        return CpuOutput(Path(rec.artifact)) if rec.artifact else None
    return load


def _int8(ctx: BuildContext) -> bool:
    return ctx.opts.int8


def _data_fp(ctx: BuildContext) -> dict[str, Any]:
    return {"fingerprint": ctx.data.info.fingerprint}


def _calib_settings(ctx: BuildContext) -> dict[str, Any]:
    return {"calib_size": _calib_size(ctx), "calib_method": ctx.recipe.quant.calib_method,
            "seed": ctx.recipe.train.seed, **_data_fp(ctx)}


def _train_settings(ctx: BuildContext) -> dict[str, Any]:
    d, opts, recipe = ctx.recipe.to_dict(), ctx.opts, ctx.recipe
    return {**_data_fp(ctx), "pretrained": sha256_file(opts.pretrained) if opts.pretrained else None,
            "init_from": sha256_file(recipe.train.init_from) if recipe.train.init_from else None,
            "model": d["model"], "data": d["data"], "train": d["train"]}


def _ptq_settings(ctx: BuildContext) -> dict[str, Any]:
    final = ctx.recipe.quant.qat_epochs == 0
    return {**_calib_settings(ctx), "max_drop": max_drop(ctx.opts, ctx.recipe)[0] if final else None,
            "min_agreement_pct": ctx.recipe.gates.min_agreement_pct if final else None}


def _export_keys(ctx: BuildContext) -> dict[str, Any]:
    d = ctx.recipe.to_dict()
    return {"export": d["export"], "gates": d["gates"]}


def _verify_settings(ctx: BuildContext) -> dict[str, Any]:
    return {"max_drop": max_drop(ctx.opts, ctx.recipe)[0], "bench_s": ctx.opts.bench_seconds,
            "min_agreement_pct": ctx.recipe.gates.min_agreement_pct, "artifacts":
            sorted((r.stage, r.sha256, r.status) for r in ctx.records.values())}


PLAN: list[Step] = [
    Step("train", None, _train, _train_settings, load=_load("train")),
    Step("fold", "train", _fold,
         lambda c: {"tol": c.recipe.gates.fold_rel_tol, "probe": c.recipe.gates.probe_size}, load=_load("fold")),
    Step("ptq", "fold", _ptq, _ptq_settings, when=_int8, load=_load("quant")),
    Step("qat", "ptq", _qat,
         lambda c: {"quant": c.recipe.to_dict()["quant"], "max_drop": max_drop(c.opts, c.recipe)[0],
                    "min_agreement_pct": c.recipe.gates.min_agreement_pct,
                    "batch_size": c.recipe.data.batch_size, "seed": c.recipe.train.seed},
         when=lambda c: c.opts.int8 and c.recipe.quant.qat_epochs > 0, load=_load("quant")),
    Step("export_fp32", "fold", _export_fp32, _export_keys, load=_load("export")),
    Step("export_int8", "qat|ptq", _export_int8, _export_keys, when=_int8, load=_load("export")),
    Step("export_cpu", "export_fp32", _export_cpu,
         lambda c: {**_export_keys(c), **_calib_settings(c),
                    "from": c.records["export_int8"].sha256 if c.recipe.export.cpu_int8 == "qdq" else None},
         when=_int8, load=_load("cpu")),
    Step("calib_cache", "export_fp32", _calib_cache, _calib_settings, when=_int8),
    Step("compile", "export_int8|export_fp32", _compile, lambda c: {"int8": c.opts.int8, "fp16": c.opts.fp16}),
    Step("verify", "export_int8|export_fp32", _verify, _verify_settings),
]


def run_stage(ctx: BuildContext, step: Step) -> StageRecord:
    name = step.name
    parent = next((ctx.records[p] for p in (step.consumes or "").split("|") if p in ctx.records), None)
    settings = step.settings(ctx)
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
        with heartbeat(f"[{name}]", enabled=not ctx.opts.quiet):
            result = step.call(ctx)
        rec = result.record
        setattr(ctx.outputs, name, result.output)
    except GateError:
        raise
    except EdgeresError as e:
        rec = StageRecord(stage=name, status=Status.FAILED.value, message=f"{name}: {e}")
    rec.stage = name
    rec.environment.update(describe_device(ctx.device))
    rec.inputs_hash = inputs_hash
    rec.parent_sha256 = parent.sha256 if parent else None
    rec.recipe_hash = ctx.recipe.hash()
    rec.duration_s = round(time.perf_counter() - start, 3)
    append_record(ctx.run_dir, rec)
    ctx.records[name] = rec
    verdict = rec.status if rec.status != Status.PASSED.value else f"passed in {rec.duration_s:.1f}s"
    ctx.say(f"[{name}] {verdict}" + (f": {rec.message}" if rec.message and not rec.passed else ""))
    if rec.status == Status.FAILED.value:
        raise GateError(rec.message or f"{name} failed")
    return rec


# ---------------------------------------------------------------------------------------------------- driver

# a dataset given on the command line brings its own input size, statistics and augmentation, unless given too
DATASET_AUGMENT = {"digits": ("pad_crop",), "mnist": ("pad_crop",), "cifar10": ("pad_crop", "flip"),
                   "imagefolder": ("random_resized_crop", "flip")}


DATASET_OWN = ("data.input_size", "data.mean", "data.std", "data.resize_size")   # None: the dataset's own


def for_dataset(recipe, dataset: str | None, overrides: dict[str, Any]):
    """`recipe` with `overrides` (None values: not given). A `dataset` other than the recipe's starts the data
    settings from that dataset's own defaults (the recipe's were chosen for its own dataset, e.g. the demo's 32 px
    digits): input size, statistics, padding and augmentation, unless given too. `build` and `train` both use it."""
    from edgeres.recipe import DataCfg

    if not dataset or dataset == recipe.data.dataset:
        return recipe.with_overrides(overrides)
    reset = {**dict.fromkeys(DATASET_OWN), "data.pad": DataCfg.pad,
             "data.augment": DATASET_AUGMENT.get(dataset, ()), "data.dataset": dataset}
    given = {k: v for k, v in overrides.items() if v is not None}
    return recipe.with_overrides({**reset, **given}, keep_none=DATASET_OWN)


def _resolve_recipe(opts: BuildOptions):
    from edgeres.recipe import load_recipe

    overrides = {"model.arch": opts.arch, "data.dataset": opts.dataset, "data.data_dir": opts.data_dir,
                 "train.epochs": opts.epochs, "quant.qat_epochs": opts.qat_epochs,
                 "quant.calib_method": opts.calib_method, **opts.overrides}
    return for_dataset(load_recipe(opts.recipe), opts.dataset, overrides)


def _with_dataset_of_data_dir(opts: BuildOptions) -> BuildOptions:
    """--data-dir without --dataset: the folder says which dataset it is (one line), or the build is refused."""
    from dataclasses import replace

    from edgeres.data.infer import dataset_for
    from edgeres.recipe import load_recipe

    dataset, note = dataset_for(opts.data_dir, opts.dataset, load_recipe(opts.recipe).data.dataset)
    if note is None:
        return opts
    if not opts.quiet:
        print(note, flush=True)
    return replace(opts, dataset=dataset)


def build(opts: BuildOptions) -> BuildResult:
    """Validate everything, then hold the run folder and run the plan. A build refused before its first stage
    (bad option, recipe or data, unwritable or busy folder) changes nothing in the folder."""
    from edgeres.checkpoint import check_checkpoints
    from edgeres.io import check_owned_dir, claim_dir
    from edgeres.records import run_lock

    if opts.max_drop is not None and not opts.max_drop >= 0:   # NaN too: every gate against it would fail
        raise ConfigError(f"--max-drop must be >= 0, got {opts.max_drop}")
    if not 0 <= opts.bench_seconds <= 3600:   # NaN/inf would be refused only in the verify stage, after training
        raise ConfigError(f"--bench-seconds must lie in [0, 3600], got {opts.bench_seconds}")
    opts = _with_dataset_of_data_dir(opts)
    if opts.pretrained is not None and not Path(opts.pretrained).is_file():
        raise ConfigError(f"--pretrained checkpoint not found: {opts.pretrained}")
    recipe = _resolve_recipe(opts)
    if recipe.train.init_from:   # torchvision:<arch> -> the verified published file (fetched once), else a path
        from edgeres import pretrained

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
    from edgeres.data import get_data_for

    if not opts.quiet:   # everything above was quick; the data load may not be
        print(f"[build] {opts.out}: {recipe.model.arch} on {recipe.data.dataset}{' --int8' if opts.int8 else ''}, "
              f"torch on {device}", flush=True)
    with heartbeat("[data]", enabled=not opts.quiet):
        data = get_data_for(recipe)   # load (and so validate) the data before the folder is touched
    run_dir = claim_dir(opts.out, what="run folder", kind="run", legacy=("stages.jsonl",))
    with run_lock(run_dir):
        ctx = BuildContext(opts=opts, recipe=recipe, run_dir=run_dir, device=device, _data=data)
        return _run_plan(ctx)


def _check_dependencies(opts: BuildOptions, recipe) -> None:
    """Refuse up front what a planned stage would fail on later (NNCF for --int8); say once what will be skipped
    for want of an optional package (OpenVINO: the CPU INT8 artifact; matplotlib: the report's figures)."""
    import importlib.util

    from edgeres.errors import BackendUnavailable

    def have(name: str) -> bool:
        return importlib.util.find_spec(name) is not None

    if opts.int8 and not have("nncf"):
        raise BackendUnavailable("--int8 needs NNCF for PTQ and QAT: pip install 'edgeres[quant]' (nothing was run)")
    notes = []
    if opts.int8 and recipe.export.cpu_int8 == "openvino" and not have("openvino"):
        notes.append("OpenVINO is not installed: the CPU INT8 artifact (export_cpu) will be skipped "
                     "(pip install 'edgeres[openvino]')")
    if not have("matplotlib"):
        notes.append("matplotlib is not installed: report.html will have no figures (pip install 'edgeres[report]')")
    if not opts.quiet:
        for n in notes:
            print(f"note: {n}", flush=True)


def _run_plan(ctx: BuildContext) -> BuildResult:
    from edgeres.records import finish_plan, write_plan
    from edgeres.report import write_report

    steps = [s for s in PLAN if s.when(ctx)]
    atomic_write_text(ctx.run_dir / "recipe.yaml", ctx.recipe.to_yaml())
    write_plan(ctx.run_dir, [s.name for s in steps])
    ok, message = True, "all gates passed"
    start = time.perf_counter()
    try:
        for step in steps:
            run_stage(ctx, step)
    except GateError as e:
        ok, message = False, str(e)
    finish_plan(ctx.run_dir)
    with heartbeat("[report]", enabled=not ctx.opts.quiet):
        report = write_report(ctx.run_dir, list(ctx.records.values()), ok=ok, message=message,
                              total_s=time.perf_counter() - start)
    return BuildResult(run_dir=ctx.run_dir, records=list(ctx.records.values()), ok=ok, message=message, report=report)
