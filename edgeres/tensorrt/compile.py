"""The compile stage: ONNX -> TensorRT engine + sidecar + the equivalent trtexec command.

`plan_compile` validates options for a TensorRT version and writes nothing but the trtexec command; it works
without TensorRT (to prepare a build for a Jetson). `compile_engine` builds for real through engine_build.
"""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeres.errors import ArtifactError, BackendUnavailable, ConfigError
from edgeres.io import atomic_write_text, refuse_overwrite, rejected_path
from edgeres.onnx_info import OnnxInfo, inspect_onnx  # noqa: F401 - inspect_onnx re-exported
from edgeres.records import StageRecord, StageResult, Status, add_fp32_gates
from edgeres.settings import level_field, origins_field, read, setting
from edgeres.tensorrt import engine_build
from edgeres.tensorrt.calib_cache import read_calibration_cache
from edgeres.tensorrt.options import (
    DEFAULT_BATCH,
    DLA_DEFAULT_BATCH,
    CompileOptions,
    Precision,
    resolve,
    validate_options,
)
from edgeres.tensorrt.sidecar import read_sidecar, sidecar_path, trtexec_script_path, write_sidecar
from edgeres.tensorrt.status import TrtStatus, tensorrt_status  # noqa: F401 - re-exported
from edgeres.tensorrt.targets import FP32W_SUFFIX, write_run_plan
from edgeres.tensorrt.trtexec import script_text, trtexec_command
from edgeres.tensorrt.versions import capabilities, parse_version


def _batch_for(onnx: OnnxInfo, options: CompileOptions) -> tuple[int, int, int]:
    if onnx.dynamic_batch:
        return options.batch or (DLA_DEFAULT_BATCH if options.dla_core is not None else DEFAULT_BATCH)
    fixed = int(onnx.input_shape[0])  # type: ignore[arg-type]
    if options.batch is not None and not all(b == fixed for b in options.batch):
        raise ConfigError(f"the ONNX input {onnx.input_name} has a fixed batch of {fixed}; --batch "
                          f"{','.join(map(str, options.batch))} needs an ONNX exported with a dynamic batch axis")
    return (fixed, fixed, fixed)


def check_engine_out(out_path: str | Path) -> Path:
    """An engine's --out is a file path (model.plan): its sidecar and trtexec script are written beside it, so ''
    would write a hidden ./.trtexec.sh and '.' or 'dir/' would name a folder."""
    text = str(out_path)
    if not text.strip() or text.endswith("/") or Path(text).name in ("", ".", ".."):
        raise ConfigError(f"--out {text!r} is not an engine file path; give one such as model.plan")
    return Path(text)


def plan_compile(onnx_path: str | Path, out_path: str | Path, options: CompileOptions, *, trt_version: str,
                 is_jetson: bool, dla_cores: int, compute_capability: str | None = None,
                 jetson_module: str | None = None) -> dict[str, Any]:
    """Validate for a TensorRT version/device; return warnings and the trtexec command (from the options as built:
    strong typing resolved once: "options" is what is built). Writes nothing."""
    check_engine_out(out_path)
    capabilities(trt_version)  # unsupported version -> ConfigError before anything else
    onnx = inspect_onnx(onnx_path)
    warnings = validate_options(options, trt_version, is_jetson=is_jetson, dla_cores=dla_cores,
                                compute_capability=compute_capability, onnx_has_qdq=onnx.has_qdq,
                                onnx_weight_form=onnx.weight_form, jetson_module=jetson_module)
    options = resolve(options, trt_version, onnx_has_qdq=onnx.has_qdq)
    if options.calib_cache is not None:
        read_calibration_cache(options.calib_cache)   # its format, before TensorRT or trtexec is handed it
    batch = _batch_for(onnx, options)
    argv = trtexec_command(onnx_path, out_path, options, trt_version, input_name=onnx.input_name,
                           input_chw=onnx.chw, dynamic_batch=onnx.dynamic_batch, batch=batch)
    return {"trt_version": str(parse_version(trt_version)), "onnx": str(onnx_path), "onnx_sha256": onnx.sha256,
            "onnx_has_qdq": onnx.has_qdq, "input": onnx.input_name, "batch": list(batch),
            "options": options.describe(), "warnings": warnings, "trtexec": argv}


def write_trtexec_script(out_path: str | Path, plan: dict[str, Any], *, force: bool = False) -> Path:
    path = trtexec_script_path(out_path)
    refuse_overwrite(path, force)
    note = "\n".join(plan["warnings"])
    atomic_write_text(path, script_text(plan["trtexec"], trt_version=plan["trt_version"], note=note))
    path.chmod(0o755)
    return path


def compile_engine(onnx_path: str | Path, out_path: str | Path, options: CompileOptions, *,
                   force: bool = False) -> dict[str, Any]:
    """Build the engine with the installed TensorRT; write engine, sidecar and trtexec script atomically."""

    status = tensorrt_status()
    if not status.available:
        raise BackendUnavailable(status.reason)
    out_path = Path(out_path)
    refuse_overwrite(out_path, force)
    plan = plan_compile(onnx_path, out_path, options, trt_version=str(status.version), is_jetson=status.is_jetson,
                        dla_cores=status.dla_cores, compute_capability=status.compute_capability,
                        jetson_module=status.module)
    try:
        info = engine_build.build_engine(
            onnx_path, out_path, precision=options.precision.value, dla_core=options.dla_core,
            gpu_fallback=options.gpu_fallback, workspace_mb=options.workspace_mb, batch=tuple(plan["batch"]),
            timing_cache=options.timing_cache, calib_cache=options.calib_cache,
            version_compatible=options.version_compatible, hardware_compatibility=options.hardware_compatibility,
            sparsity=options.sparsity, strongly_typed=plan["options"]["strongly_typed"],
            builder_optimization_level=options.builder_optimization_level)
    except engine_build.BuildError as e:
        raise ArtifactError(str(e)) from None
    info.update({"trtexec": plan["trtexec"], "warnings": plan["warnings"], "options": options.describe()})
    write_sidecar(out_path, info)
    script = write_trtexec_script(out_path, plan, force=True)
    info["sidecar"] = str(sidecar_path(out_path))
    info["trtexec_script"] = str(script)
    return info


def documented_form(onnx: Path, trt_version: str, plan_dir: Path) -> Path:
    """The ONNX in the INT8 weight form this TensorRT documents: `onnx` itself, or the FP32-weights copy the device
    plan wrote beside plan.json (targets.with_fp32_weights_copy) for 8.5/8.6."""

    form = inspect_onnx(onnx).weight_form
    if form is None or form in capabilities(trt_version).int8_weight_forms:
        return Path(onnx)
    name = Path(onnx).name
    copy = Path(plan_dir) / ((name[:-len(".onnx")] if name.endswith(".onnx") else name) + FP32W_SUFFIX)
    if not copy.is_file():
        raise ConfigError(f"TensorRT {trt_version} does not document {form} weights and {copy} is missing")
    return copy


# ---------------------------------------------------------------------------------------------------- the stage

@dataclass(frozen=True)
class CompileInputs:
    onnx: Path                 # the ONNX this machine builds (INT8 Q/DQ with --int8, else FP32)
    plan: Any                  # targets.PlanInputs: what the device plan is made from
    plan_dir: Path             # RUN/tensorrt: plan.json + one trtexec script per target
    out: Path                  # engine/model.plan
    relative_to: Path | None = None
    eval_data: Any = None      # the evaluation split: an engine built here is run on it and gated
    reference: Any = None      # the FP32 model's EvalResult on eval_data


@dataclass(frozen=True)
class CompileSettings:
    precision: str = "fp32"    # options.Precision value (build: --int8 / --fp16)
    plan_batch: int = setting("export.plan_batch", help="The device plan's batch (trtexec opt; DLA: static).")
    max_drop: float | None = None          # pp of top-1 vs FP32 allowed for an engine built and run here
    drop_source: str = "gates.max_drop_ptq"
    min_agreement_pct: float | None = None   # % top-1 agreement with FP32 required of that engine
    level: float = level_field()
    origins: dict = origins_field()

    @classmethod
    def from_recipe(cls, recipe, *, precision: str) -> CompileSettings:
        """An engine is a final model: gated like the final INT8 model (Recipe.max_drop, gates.min_agreement_pct)
        whatever its precision (FP16/FP32 engines only pass more easily)."""
        return read(cls, recipe, precision=precision, **recipe.final_gates())


@dataclass(frozen=True)
class CompileOutput:
    engine: Path | None        # None where TensorRT is not installed here
    device_plan: dict[str, Any]
    evaluation: Any = None     # the engine's EvalResult on eval_data, when it was built and run here


def run(inputs: CompileInputs, settings: CompileSettings = CompileSettings(), *, quiet: bool = True):
    """The compile stage: the device plan (always: the host decides, the device runs it; bundle reuses it), then,
    where TensorRT is installed, an engine built beside `out`, run on the evaluation split and gated against FP32
    before it is moved into place (a failed gate keeps it as model.rejected.plan); otherwise skipped with the
    reason. -> StageResult[CompileOutput]"""

    plan = write_run_plan(inputs.plan_dir, inputs.plan, batch=settings.plan_batch, relative_to=inputs.relative_to)
    status = tensorrt_status()
    if not status.available:
        rec = StageRecord(stage="compile", status=Status.SKIPPED.value,
                          message=f"TensorRT engine not built: {status.reason}. The ONNX {inputs.onnx} is ready "
                                  f"to be built on the target: {plan['scripts']} trtexec scripts in "
                                  f"{inputs.plan_dir.name}/ (plan.json), or `edgeres bundle`.",
                          metrics={"tensorrt": None, "reason": status.reason, "device_plan": plan})
        rec.extra_artifacts["device_plan"] = plan["plan"]
        return StageResult(rec, CompileOutput(None, plan))
    onnx = documented_form(inputs.onnx, str(status.version), inputs.plan_dir)
    out = Path(inputs.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".unverified-", dir=out.parent))   # same file names, beside `out`
    try:
        staged = staging / out.name
        info = compile_engine(onnx, staged, CompileOptions(precision=Precision(settings.precision)), force=True)
        rec = StageRecord(stage="compile", metrics={"engine": info, "device_plan": plan})
        rec.extra_artifacts["device_plan"] = plan["plan"]
        ev = None
        if inputs.eval_data is not None and inputs.reference is not None:
            from edgeres.evaluate import evaluate
            from edgeres.tensorrt.runner import TrtRunner

            with TrtRunner(staged) as runner:
                ev = evaluate(runner, inputs.eval_data, batch_size=settings.plan_batch,
                              progress=False if quiet else "evaluating the TensorRT engine")
            add_fp32_gates(rec, ev, inputs.reference.top1, inputs.reference.logits, settings,
                           key="fp32_top1_agreement_pct")
        dest = out if rec.passed else rejected_path(out)
        _move_engine(staged, dest)
        info.update(sidecar=str(sidecar_path(dest)), trtexec_script=str(trtexec_script_path(dest)))
        if rec.passed:
            rec.set_artifact(dest)
        else:
            rec.extra_artifacts["rejected"] = str(dest)
            rec.message += f"; {out.name} not written, the rejected engine is {dest}"
        return StageResult(rec, CompileOutput(dest if rec.passed else None, plan, ev))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _move_engine(staged: Path, dest: Path) -> None:
    """The engine, its sidecar and its trtexec script from the staging folder to `dest` (the script and the
    sidecar's trtexec line name the engine's path: rewritten for where it now lies); the engine last."""
    import os

    old, new = str(staged), str(dest)
    side = read_sidecar(staged)
    side["trtexec"] = [a.replace(old, new) for a in side.get("trtexec", [])]
    side["engine"] = dest.name
    write_sidecar(dest, side)
    script = trtexec_script_path(staged)
    if script.is_file():
        atomic_write_text(trtexec_script_path(dest), script.read_text().replace(old, new))
        trtexec_script_path(dest).chmod(0o755)
    os.replace(staged, dest)
