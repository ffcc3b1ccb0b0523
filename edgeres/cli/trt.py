"""TensorRT commands: `edgeres compile`, `edgeres calib-cache`, `edgeres trt-status`."""
from __future__ import annotations

from pathlib import Path

import click

from edgeres import settings
from edgeres.cli._common import DATA_DIR, complete_dataset, emit, json_option, recipe_option, stage_recipe
from edgeres.data import get_data, split_holdout
from edgeres.errors import BackendUnavailable, ConfigError
from edgeres.io import check_replaceable, refuse_overwrite
from edgeres.onnx_info import read_metadata
from edgeres.quantize import calibration_indices
from edgeres.recipe import QuantCfg
from edgeres.tensorrt.calib_cache import CalibCacheInputs, CalibCacheSettings, npz_batches, run
from edgeres.tensorrt.compile import check_engine_out, compile_engine, plan_compile, write_trtexec_script
from edgeres.tensorrt.options import CompileOptions, parse_batch, precision_from_flags
from edgeres.tensorrt.sidecar import trtexec_script_path
from edgeres.tensorrt.status import tensorrt_status
from edgeres.tensorrt.trtexec import format_command
from edgeres.tensorrt.versions import JETSON_MODULES, calib_version_tag, capabilities, dla_rule_text

PLAN_TARGET_WITHOUT_TRT = "10.3"   # JetPack 6.1/6.2: the trtexec spelling printed when TensorRT is absent
JETSON_DLA_CORES = 2               # Xavier / Orin AGX / Orin NX 16GB, for planning a DLA build off-device


def _options(fp16, int8, dla_core, gpu_fallback, workspace, batch, timing_cache, version_compatible,
             hardware_compatibility, sparsity, calib_cache, strongly_typed):

    return CompileOptions(
        precision=precision_from_flags(fp16=fp16, int8=int8), dla_core=dla_core, gpu_fallback=gpu_fallback,
        workspace_mb=workspace, batch=parse_batch(batch) if batch else None,
        timing_cache=Path(timing_cache) if timing_cache else None, version_compatible=version_compatible,
        hardware_compatibility=hardware_compatibility, sparsity=sparsity,
        calib_cache=Path(calib_cache) if calib_cache else None, strongly_typed=strongly_typed)


def _write_plan(out: str, plan: dict, force: bool) -> str | None:

    if trtexec_script_path(out).exists() and not force:
        return None
    return str(write_trtexec_script(out, plan, force=True))


@click.command("compile")
@click.option("--onnx", "onnx_path", required=True, type=click.Path(dir_okay=False), help="ONNX model to compile.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Engine file to write (model.plan).")
@click.option("--fp16", is_flag=True,
              help="Allow FP16 kernels (weak typing: TensorRT 8.5 to 10.x, deprecated since 10.12, gone in 11).")
@click.option("--int8", is_flag=True,
              help="INT8: from the Q/DQ ONNX (strongly typed with no precision flag on 10.x and 11.x, the --int8 flag "
                   "on 8.5/8.6), or an FP32 ONNX with --calib-cache (implicit INT8, TensorRT <= 10.x).")
@click.option("--dla-core", type=click.IntRange(0), default=None,
              help=f"Run on this DLA core (Jetson; {dla_rule_text()}).")
@click.option("--gpu-fallback", is_flag=True, help="With --dla-core: layers DLA cannot run go to the GPU.")
@click.option("--workspace", type=click.IntRange(1), default=None, help="Builder workspace limit in MiB.")
@click.option("--batch", default=None, help="Optimization profile of the batch axis: min,opt,max (default 1,8,32).")
@click.option("--timing-cache", type=click.Path(dir_okay=False), default=None, help="Timing cache file (read+write).")
@click.option("--version-compatible", is_flag=True, help="Engine runs on later TensorRT versions (8.6+).")
@click.option("--hardware-compatibility", type=click.Choice(["ampere+"]), default=None,
              help="Engine runs on any Ampere-or-newer desktop GPU (8.6+).")
@click.option("--sparsity", is_flag=True, help="Use 2:4 structured-sparse weights where present (Ampere+).")
@click.option("--calib-cache", type=click.Path(dir_okay=False), default=None,
              help="TensorRT calibration cache for implicit INT8 of an FP32 ONNX (see `edgeres calib-cache`).")
@click.option("--strongly-typed/--no-strongly-typed", default=None,
              help="Strongly typed network (10.x: on by default for INT8 from a Q/DQ ONNX; always on in 11.x).")
@click.option("--trt-version", default=None,
              help="Plan for this TensorRT (8.5, 8.6, 10.3, 11...) without building: validate and write the "
                   "trtexec command only.")
@click.option("--jetson", is_flag=True, help="With --trt-version: the target is a Jetson (DLA where NVIDIA ships it).")
@click.option("--jetson-module", type=click.Choice(sorted(JETSON_MODULES)), default=None,
              help="With --jetson: which module (DLA differs: 11.4.1 has it on agx-orin only).")
@click.option("--print-trtexec", is_flag=True, help="Print the equivalent trtexec command.")
@click.option("--force", is_flag=True, help="Replace an existing engine / trtexec script.")
@json_option
def compile_cmd(onnx_path, out, fp16, int8, dla_core, gpu_fallback, workspace, batch, timing_cache,
                version_compatible, hardware_compatibility, sparsity, calib_cache, strongly_typed, trt_version,
                jetson, jetson_module, print_trtexec, force, as_json) -> None:
    """Compile an ONNX model into a TensorRT engine with a sidecar and the equivalent trtexec command."""

    check_engine_out(out)
    # the engine's path, in every mode (built here, or planned for the device with its script beside it): a file of
    # the user's there is refused without --force, a folder, link or FIFO always; nothing is written before this
    check_replaceable(out, force, what="--out")
    opts = _options(fp16, int8, dla_core, gpu_fallback, workspace, batch, timing_cache, version_compatible,
                    hardware_compatibility, sparsity, calib_cache, strongly_typed)
    if trt_version:
        refuse_overwrite(trtexec_script_path(out), force)   # before planning: exit 1, nothing written
        if jetson_module and not jetson:
            raise ConfigError("--jetson-module needs --jetson (the target is a Jetson)")
        plan = plan_compile(onnx_path, out, opts, trt_version=trt_version, is_jetson=jetson,
                            dla_cores=JETSON_DLA_CORES if jetson else 0, jetson_module=jetson_module)
        plan["trtexec_script"] = _write_plan(out, plan, force)
        emit(plan, as_json, lambda: "\n".join(
            [f"warning: {w}" for w in plan["warnings"]] + [format_command(plan["trtexec"])]
            + [f"written to {plan['trtexec_script']}"]))
        return
    status = tensorrt_status()
    if not status.available:
        target = PLAN_TARGET_WITHOUT_TRT
        try:
            plan = plan_compile(onnx_path, out, opts, trt_version=target, is_jetson=dla_core is not None,
                                dla_cores=JETSON_DLA_CORES)
        except ConfigError as e:
            raise BackendUnavailable(
                f"{status.reason}; and the options are not valid for TensorRT {target}: {e}") from None
        written = _write_plan(out, plan, force)
        emit({**plan, "trtexec_script": written}, as_json, lambda: format_command(plan["trtexec"]))   # one document
        where = f"written to {written}" if written else "printed above"
        raise BackendUnavailable(f"{status.reason}. The trtexec command for TensorRT {target} (JetPack 6.1/6.2) is "
                                 f"{where}; run it on the device, or plan another version with --trt-version")
    info = compile_engine(onnx_path, out, opts, force=force)
    emit(info, as_json, lambda: "\n".join(
        [f"warning: {w}" for w in info["warnings"]]
        + [f"engine {out} ({info['engine_bytes']} bytes) built with TensorRT {info['trt_version']} on "
           f"{info['device']} (sm {info['compute_capability']}) in {info['build_seconds']} s",
           f"sidecar {info['sidecar']}", f"trtexec command {info['trtexec_script']}"]
        + ([format_command(info["trtexec"])] if print_trtexec else [])))


@click.command("calib-cache")
@click.option("--onnx", "onnx_path", required=True, type=click.Path(dir_okay=False), help="The FP32 ONNX.")
@click.option("--images", type=click.Path(dir_okay=False), default=None,
              help=".npz with preprocessed float32 images [N,C,H,W] under key 'x' (e.g. runs/<name>/probe.npz).")
@click.option("--dataset", default=None, shell_complete=complete_dataset,
              help="Or a dataset name (edgeres.data): its calibration split [default, without --images: the run's "
                   "dataset when --onnx comes from a run].")
@click.option("--data-dir", type=DATA_DIR, default=None, help="Dataset folder for --dataset.")
@settings.options(CalibCacheSettings, keys=(("data.holdout", "--holdout", "With --dataset: the share of the "
                                                                          "training split held out (seeded by "
                                                                          "--seed), never calibrated on."),))
@recipe_option
@click.option("--trt-version", default=None,
              help="TensorRT that will read the cache (its version is in the header); default: the installed one.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Cache file, e.g. calibration/calib.cache")
@click.option("--force", is_flag=True, help="Replace an existing cache.")
@json_option
def calib_cache_cmd(onnx_path, images, dataset, data_dir, recipe_name, trt_version, out, force, as_json,
                    **given) -> None:
    """Write a TensorRT calibration cache (EntropyCalibration2 text) from ONNX Runtime activation ranges (the
    `calib_cache` stage of `build`: without flags, on the images the run's PTQ calibrated on)."""

    if images is not None and dataset is not None:
        raise ConfigError("give exactly one of --images FILE.npz or --dataset NAME")
    flags = {**settings.overrides(given), "data.data_dir": data_dir}
    recipe, dataset, data_dir = stage_recipe(recipe_name, onnx_path, dataset, flags)
    if images is not None:
        dataset = None   # the run's dataset is only the default source of images
    elif dataset is None:
        raise ConfigError("give --images FILE.npz or --dataset NAME (--onnx does not come from a run)")
    refuse_overwrite(out, force)   # before minutes of calibration, not after
    if trt_version is None:
        status = tensorrt_status()
        if status.version is None:
            raise ConfigError("TensorRT is not installed here: pass --trt-version (e.g. 8.5.2 for JetPack 5.1, "
                              "8.6.2 for JetPack 6.0, 10.3.0 for JetPack 6.1/6.2); the cache header must match it")
        trt_version = status.version
    caps = capabilities(trt_version)
    if not caps.implicit_int8:
        raise ConfigError(f"TensorRT {trt_version} has no implicit INT8 calibration; use the Q/DQ INT8 ONNX")
    indices = None
    count_given = "quant.calib_size" in flags
    s = CalibCacheSettings.from_recipe(recipe, version_tag=calib_version_tag(trt_version), force=force)
    if images is not None:
        batches = npz_batches(images, limit=s.count if count_given else None, default_limit=s.count)
    else:
        batches, indices = _dataset_batches(dataset, data_dir, s.count if count_given else None, s.seed, onnx_path,
                                            holdout=recipe.data.holdout, default_count=s.count)
    res = run(CalibCacheInputs(Path(onnx_path), batches, Path(out), indices), s)
    m = res.record.metrics
    result = {"path": out, "tag": m["tag"], "tensors": m["tensors"] - len(m["skipped"]), "skipped": m["skipped"],
              "images": m["images"], "record": res.record.to_dict()}
    if indices is not None:
        result["calibration_indices"] = indices
    if caps.implicit_int8_deprecated:
        result["warning"] = "implicit INT8 calibration is deprecated since TensorRT 10.1"
    emit(result, as_json, lambda: f"{result['tensors']} tensor scales for {result['tag']} written to {out}"
         + (f" ({len(result['skipped'])} never-active tensors left out)" if result["skipped"] else ""))


def _dataset_batches(dataset: str, data_dir: str | None, count: int | None, seed: int, onnx_path=None,
                     batch_size: int = 32, holdout: float = 0.0, default_count: int = QuantCfg.calib_size):
    """The calibration images PTQ would draw (quantize.calibration_indices: same count and seed, same images),
    preprocessed as the ONNX's own metadata says (input size, channels, mean/std), as `build` does. `count` None:
    `default_count`, or all of them when there are fewer (more than there are is an error)."""
    import numpy as np

    from edgeres.runners import parse_meta

    pre = {}
    if onnx_path is not None:
        meta = parse_meta(read_metadata(onnx_path))
        pre = {k: meta[k] for k in ("input_size", "mean", "std", "resize_size", "in_channels") if meta.get(k)}
    # the build's calibration split: the training images less the holdout (data.holdout, drawn with the same seed)
    calib = split_holdout(get_data(dataset=dataset, data_dir=data_dir, download=False, **pre), holdout,
                          seed=seed).calib
    if count is not None and count > len(calib):
        raise ConfigError(f"asked for {count} calibration images; {dataset} has {len(calib)}")
    n = count or min(default_count, len(calib))
    indices = calibration_indices(len(calib), n, seed=seed)
    xs = np.stack([np.asarray(calib[i][0], dtype=np.float32) for i in indices])
    return [xs[i:i + batch_size] for i in range(0, n, batch_size)], indices


@click.command("trt-status")
@json_option
def trt_status_cmd(as_json) -> None:
    """Is TensorRT usable here: version, GPU, compute capability, Jetson, DLA cores."""

    status = tensorrt_status()
    emit(status.describe(), as_json, status.reason)


COMMANDS = [compile_cmd, calib_cache_cmd, trt_status_cmd]
