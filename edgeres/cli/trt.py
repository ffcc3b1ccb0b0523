"""TensorRT commands: `edgeres compile`, `edgeres calib-cache`, `edgeres trt-status`."""
from __future__ import annotations

from pathlib import Path

import click

from edgeres.cli._common import emit, json_option
from edgeres.recipe import DataCfg
from edgeres.tensorrt.versions import dla_rule_text

PLAN_TARGET_WITHOUT_TRT = "10.3"   # JetPack 6.1/6.2: the trtexec spelling printed when TensorRT is absent
DEFAULT_CALIB_COUNT = 256
JETSON_DLA_CORES = 2               # Xavier / Orin AGX / Orin NX 16GB, for planning a DLA build off-device


def _options(fp16, int8, dla_core, gpu_fallback, workspace, batch, timing_cache, version_compatible,
             hardware_compatibility, sparsity, calib_cache, strongly_typed):
    from edgeres.tensorrt.options import CompileOptions, parse_batch, precision_from_flags

    return CompileOptions(
        precision=precision_from_flags(fp16=fp16, int8=int8), dla_core=dla_core, gpu_fallback=gpu_fallback,
        workspace_mb=workspace, batch=parse_batch(batch) if batch else None,
        timing_cache=Path(timing_cache) if timing_cache else None, version_compatible=version_compatible,
        hardware_compatibility=hardware_compatibility, sparsity=sparsity,
        calib_cache=Path(calib_cache) if calib_cache else None, strongly_typed=strongly_typed)


def _write_plan(out: str, plan: dict, force: bool) -> str | None:
    from edgeres.tensorrt.compile import write_trtexec_script
    from edgeres.tensorrt.sidecar import trtexec_script_path

    if trtexec_script_path(out).exists() and not force:
        return None
    return str(write_trtexec_script(out, plan, force=True))


@click.command("compile")
@click.option("--onnx", "onnx_path", required=True, type=click.Path(dir_okay=False), help="ONNX model to compile.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Engine file to write (model.plan).")
@click.option("--fp16", is_flag=True, help="Allow FP16 kernels (TensorRT <= 10.x).")
@click.option("--int8", is_flag=True, help="INT8: from the Q/DQ ONNX, or an FP32 ONNX with --calib-cache.")
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
              help="Strongly typed network (10.x option; always on in 11.x).")
@click.option("--trt-version", default=None,
              help="Plan for this TensorRT (8.5, 8.6, 10.3, 11...) without building: validate and write the "
                   "trtexec command only.")
@click.option("--jetson", is_flag=True, help="With --trt-version: the target is a Jetson (DLA allowed).")
@click.option("--print-trtexec", is_flag=True, help="Print the equivalent trtexec command.")
@click.option("--force", is_flag=True, help="Replace an existing engine / trtexec script.")
@json_option
def compile_cmd(onnx_path, out, fp16, int8, dla_core, gpu_fallback, workspace, batch, timing_cache,
                version_compatible, hardware_compatibility, sparsity, calib_cache, strongly_typed, trt_version,
                jetson, print_trtexec, force, as_json) -> None:
    """Compile an ONNX model into a TensorRT engine with a sidecar and the equivalent trtexec command."""
    from edgeres.errors import BackendUnavailable, ConfigError
    from edgeres.tensorrt.compile import compile_engine, plan_compile
    from edgeres.tensorrt.status import tensorrt_status
    from edgeres.tensorrt.trtexec import format_command

    opts = _options(fp16, int8, dla_core, gpu_fallback, workspace, batch, timing_cache, version_compatible,
                    hardware_compatibility, sparsity, calib_cache, strongly_typed)
    if trt_version:
        from edgeres.io import refuse_overwrite
        from edgeres.tensorrt.sidecar import trtexec_script_path

        refuse_overwrite(trtexec_script_path(out), force)   # before planning: exit 1, nothing written
        plan = plan_compile(onnx_path, out, opts, trt_version=trt_version, is_jetson=jetson,
                            dla_cores=JETSON_DLA_CORES if jetson else 0)
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
        click.echo(format_command(plan["trtexec"]))
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
@click.option("--dataset", default=None, help="Or a dataset name (edgeres.data): its calibration split.")
@click.option("--data-dir", default=None, help="Dataset folder for --dataset.")
@click.option("--count", type=click.IntRange(1), default=None,
              help="Calibration images [default: 256, or all of them when there are fewer; more than there are is "
                   "an error].")
@click.option("--trt-version", default=None,
              help="TensorRT that will read the cache (its version is in the header); default: the installed one.")
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True,
              help="With --dataset: the seed of the calibration draw (the same images `quantize --ptq` and `build` "
                   "calibrate on for the same count and seed).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Cache file, e.g. calibration/calib.cache")
@click.option("--force", is_flag=True, help="Replace an existing cache.")
@click.option("--holdout", type=click.FloatRange(0, 0.9), default=DataCfg.holdout, show_default=True,
              help="With --dataset: the share of the training split held out (seeded by --seed) and so not "
                   "calibrated on, as `build` does (data.holdout).")
@json_option
def calib_cache_cmd(onnx_path, images, dataset, data_dir, count, trt_version, seed, out, force, holdout,
                    as_json) -> None:
    """Write a TensorRT calibration cache (EntropyCalibration2 text) from ONNX Runtime activation ranges."""
    from edgeres.errors import ConfigError
    from edgeres.tensorrt.calib_cache import CalibCacheInputs, CalibCacheSettings, npz_batches, run
    from edgeres.tensorrt.status import tensorrt_status
    from edgeres.tensorrt.versions import calib_version_tag, capabilities

    if (images is None) == (dataset is None):
        raise ConfigError("give exactly one of --images FILE.npz or --dataset NAME")
    from edgeres.io import refuse_overwrite

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
    if images is not None:
        batches = npz_batches(images, limit=count, default_limit=DEFAULT_CALIB_COUNT)
    else:
        batches, indices = _dataset_batches(dataset, data_dir, count, seed, onnx_path, holdout=holdout)
    res = run(CalibCacheInputs(Path(onnx_path), batches, Path(out), indices),
              CalibCacheSettings(version_tag=calib_version_tag(trt_version), force=force))
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
                     batch_size: int = 32, holdout: float = 0.0):
    """The calibration images PTQ would draw (quantize.calibration_indices: same count and seed, same images),
    preprocessed as the ONNX's own metadata says (input size, channels, mean/std), as `build` does."""
    import numpy as np

    from edgeres.data import get_data, split_holdout
    from edgeres.errors import ConfigError
    from edgeres.quantize import calibration_indices

    pre = {}
    if onnx_path is not None:
        from edgeres.onnx_info import read_metadata
        from edgeres.runners import parse_meta

        meta = parse_meta(read_metadata(onnx_path))
        pre = {k: meta[k] for k in ("input_size", "mean", "std", "resize_size", "in_channels") if meta.get(k)}
    # the build's calibration split: the training images less the holdout (data.holdout, drawn with the same seed)
    calib = split_holdout(get_data(dataset=dataset, data_dir=data_dir, download=False, **pre), holdout,
                          seed=seed).calib
    if count is not None and count > len(calib):
        raise ConfigError(f"asked for {count} calibration images; {dataset} has {len(calib)}")
    n = count or min(DEFAULT_CALIB_COUNT, len(calib))
    indices = calibration_indices(len(calib), n, seed=seed)
    xs = np.stack([np.asarray(calib[i][0], dtype=np.float32) for i in indices])
    return [xs[i:i + batch_size] for i in range(0, n, batch_size)], indices


@click.command("trt-status")
@json_option
def trt_status_cmd(as_json) -> None:
    """Is TensorRT usable here: version, GPU, compute capability, Jetson, DLA cores."""
    from edgeres.tensorrt.status import tensorrt_status

    status = tensorrt_status()
    emit(status.describe(), as_json, status.reason)


COMMANDS = [compile_cmd, calib_cache_cmd, trt_status_cmd]
