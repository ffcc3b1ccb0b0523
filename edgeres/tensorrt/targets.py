"""The device plan: what each target TensorRT must do with a run's ONNX files, decided once, on the host.

For every target TensorRT (8.5 = JetPack 5.1, 8.6 = JetPack 6.0, 10.3 = JetPack 6.1/6.2, newest 10.x and
11.x on desktops) x precision (int8, fp16, fp32) x device (GPU, DLA) the plan says which ONNX, whether a
calibration cache is used, the profile shapes, the `engine_build.build_engine` arguments and the stock
trtexec argv (tensorrt/trtexec.py) — or refuses the combination with one line saying why. The rules are the
ones `edgeres compile` applies (options.validate_options over versions.capabilities); nothing here is
re-decided on the device: the bundle's device runtime looks up its entry and executes it.

Choices (and why; each version fact is a row of versions.capabilities, with its NVIDIA source in SOURCES):
- INT8 on the GPU: the Q/DQ ONNX (explicit quantization: the scales QAT/PTQ chose), strongly typed with no
  precision flag where TensorRT has strong typing (10.x: STRONGLY_TYPED / --stronglyTyped; 11.x: always), the
  weakly typed BuilderFlag.INT8 / --int8 only on 8.5/8.6 — the same on the Python and trtexec paths. Never a
  calibration cache with the Q/DQ ONNX (TensorRT ignores it). The Q/DQ ONNX is taken in the INT8 weight form the
  target documents
  (`int8_weight_forms`): 8.5/8.6 get the copy with FP32 weights behind QuantizeLinear (`int8_fp32w`), 10.x+ the
  INT8 constants; a target whose form the inputs lack is refused with that reason.
- INT8 on DLA: the FP32 ONNX + the calibration cache (implicit INT8) where TensorRT has calibration caches (8.5 to
  10.7): TensorRT 8.5 does not support explicit quantization on DLA, and one rule for those versions keeps DLA
  figures comparable. FP16 is allowed too (INT8 + FP16): the parser's own tensors (inside a Gemm) have no scale in
  the cache. 11.4.1+ (strongly typed, no caches): the Q/DQ ONNX. The cache header is re-tagged on the device to that
  TensorRT's NV_TENSORRT_VERSION (a cache from another version is ignored by TensorRT, and trtexec then calibrates
  on random data without an error).
- DLA: only where NVIDIA ships it (versions.DLA_ROWS: 8.5 .. 10.7 on JetPack 5.1/6.x, 11.4.1 on Jetson AGX Orin with
  JetPack 7.2.2+; the entry names the modules and JetPack, the device checks them), a static batch (min = opt = max),
  FP16 or INT8, and GPU fallback for exactly the layers NVIDIA's DLA layer table excludes (dla.py: the average Reduce
  of GlobalAveragePool, the MatrixMultiply of Gemm, the Flatten to 2D), listed in the entry (`gpu_fallback_layers`).
  Everything else must run on DLA: the device asks TensorRT before building and refuses otherwise; a strongly typed
  (11.4.1) INT8 model that would leave another layer in FP32 is refused here (dla.fp32_nodes).
- One build configuration on both device paths (`build_config`): workspace, timing cache, builder optimization level
  and profile go into the build_engine arguments and the trtexec argv alike.
- Platforms: 11.x other than 11.4.1 is for desktops only (no JetPack release; none from 11.5): the device refuses it
  on a Jetson.
- FP16 on 11.x: refused (no FP16 flag; it needs an FP16 ONNX, which a bundle does not carry).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from edgeres.check import INT8_WEIGHTS_PROP, int8_weight_form, load_onnx
from edgeres.errors import ConfigError
from edgeres.export import restore_fp32_weights
from edgeres.io import atomic_write_bytes, atomic_write_json, atomic_write_text, sha256_file
from edgeres.onnx_info import inspect_onnx
from edgeres.tensorrt.dla import fp32_nodes
from edgeres.tensorrt.options import CompileOptions, Precision, resolve, validate_options
from edgeres.tensorrt.trtexec import format_command, trtexec_command
from edgeres.tensorrt.versions import (
    FP32_QUANTIZE,
    INT8_CONSTANTS,
    JETSON_MODULES,
    capabilities,
    dla_rule_text,
    readme_table,
)

PLAN_FORMAT = "edgeres-trt-plan/1"
# key -> (the version whose rules apply, version prefixes it serves, label, lowest version it serves or None,
# platforms). The device runtime picks the longest matching prefix: 11.4.1 -> "11.4.1" (JetPack 7.2.2+, DLA on AGX
# Orin), every other 11.x -> "11" (desktops only: no JetPack release before 11.4.1, none from 11.5).
TARGETS: dict[str, tuple[str, tuple[str, ...], str, str | None, tuple[str, ...]]] = {
    "8.5": ("8.5.2", ("8.5",), "TensorRT 8.5.2 (JetPack 5.1.x)", None, ("jetson", "desktop")),
    "8.6": ("8.6.2", ("8.6",), "TensorRT 8.6 (JetPack 6.0)", None, ("jetson", "desktop")),
    "10.3": ("10.3.0", ("10.3",), "TensorRT 10.3 (JetPack 6.1/6.2)", None, ("jetson", "desktop")),
    "10": ("10.16.0", ("10",), "TensorRT 10.x (desktop GPUs)", None, ("jetson", "desktop")),
    "11": ("11.0.0", ("11",), "TensorRT 11.x other than 11.4.1 (desktop GPUs only)", None, ("desktop",)),
    "11.4.1": ("11.4.1", ("11.4.1",), "TensorRT 11.4.1 (JetPack 7.2.2+, DLA on Jetson AGX Orin only; desktop GPUs)",
               None, ("jetson", "desktop")),
}
# the build configuration both device paths use (engine_build arguments and trtexec argv): a 1 GiB workspace, a
# timing cache beside the engine, TensorRT's default optimization level (3) written out where it exists (8.6+)
WORKSPACE_MB, OPTIMIZATION_LEVEL = 1024, 3
PRECISIONS = ("int8", "fp16", "fp32")
DEVICES = ("gpu", "dla")
# placeholders the device substitutes with its own paths (it decides nothing else)
ONNX, ENGINE, CALIB, TIMING = "{onnx}", "{engine}", "{calib}", "{timing}"


@dataclasses.dataclass(frozen=True)
class PlanInputs:
    """What the host has: the two ONNX files (bundle-relative names and their inspected inputs) and the cache."""

    fp32_name: str
    int8_name: str
    fp32_onnx: Path
    int8_onnx: Path
    calib_name: str | None = None
    calib_cache: Path | None = None
    # the INT8 ONNX with FP32 weights behind QuantizeLinear, for targets that document only that form (8.5/8.6)
    int8_fp32w_name: str | None = None
    int8_fp32w_onnx: Path | None = None


def _refused(target: str, precision: str, device: str, why: str) -> dict[str, Any]:
    return {"target": target, "precision": precision, "device": device, "refused": why}


def plan_entry(target: str, precision: str, device: str, inputs: PlanInputs, *, batch: int,
               inspected: dict | None = None) -> dict[str, Any]:
    """One decision: the build and run instructions for (target TensorRT, precision, gpu|dla), or a refusal.
    `inspected`: ONNX path -> inspect_onnx result, so a whole plan reads and hashes each file once."""

    def info_of(path: Path):
        return inspected[path] if inspected and path in inspected else inspect_onnx(path)

    rules_version, _, label, _, platforms = TARGETS[target]
    caps = capabilities(rules_version)
    dla = device == "dla"
    if dla and not caps.dla:
        return _refused(target, precision, device, f"{label} has no DLA support ({dla_rule_text()})")
    if dla and precision == "fp32":
        return _refused(target, precision, device, "DLA runs FP16 or INT8 only")
    if precision == "fp16" and not caps.weak_typing:
        return _refused(target, precision, device, f"{label} is strongly typed only: FP16 needs an FP16 ONNX, "
                                                   "which the bundle does not carry (use int8 or fp32)")
    use_cache = precision == "int8" and dla and caps.implicit_int8
    explicit = precision == "int8" and not use_cache
    if use_cache and inputs.calib_cache is None:
        return _refused(target, precision, device, "INT8 on DLA needs the calibration cache (implicit INT8); this "
                                                   "run has none (build with --int8 to write calibration/calib.cache)")
    onnx_path, onnx_name = inputs.fp32_onnx, inputs.fp32_name
    if explicit:
        onnx_path, onnx_name = inputs.int8_onnx, inputs.int8_name
        form = info_of(onnx_path).weight_form
        if form is not None and form not in caps.int8_weight_forms:
            if inputs.int8_fp32w_onnx is None:
                return _refused(target, precision, device,
                                f"{label} documents INT8 Q/DQ weights only as {' or '.join(caps.int8_weight_forms)} "
                                f"and {onnx_name} stores them as {form}; the inputs have no {FP32_QUANTIZE} copy "
                                "(edgeres writes it beside the plan)")
            onnx_path, onnx_name = inputs.int8_fp32w_onnx, inputs.int8_fp32w_name
    info = info_of(onnx_path)
    shapes = (batch, batch, batch) if dla or not info.dynamic_batch else (1, batch, batch)
    if not info.dynamic_batch and batch != int(info.input_shape[0]):   # type: ignore[arg-type]
        shapes = (int(info.input_shape[0]),) * 3   # type: ignore[arg-type]
    fallback = list(info.dla_gpu_layers) if dla else []
    if dla and precision == "int8" and explicit and caps.always_strongly_typed:
        left = fp32_nodes(load_onnx(onnx_path), {g["node"] for g in fallback})
        if left:
            return _refused(target, precision, device,
                            f"strongly typed INT8 on DLA: {onnx_name} would leave {', '.join(left[:4])} in FP32 "
                            "(no Q/DQ around it), which DLA cannot run and the plan does not let fall back")
    # implicit INT8 on DLA also allows FP16: tensors the ONNX parser names itself (the MatrixMultiply inside a Gemm)
    # have no scale in a cache made from the ONNX's names, and DLA runs no FP32, so those layers run in FP16
    build_precision = Precision.BEST if use_cache else Precision(precision)
    level = OPTIMIZATION_LEVEL if caps.builder_optimization_level else None
    opts = CompileOptions(precision=build_precision, dla_core=0 if dla else None, gpu_fallback=bool(fallback),
                          batch=shapes if info.dynamic_batch else None,
                          calib_cache=inputs.calib_cache if use_cache else None, workspace_mb=WORKSPACE_MB,
                          timing_cache=Path(TIMING), builder_optimization_level=level)
    try:
        warnings = validate_options(opts, rules_version, is_jetson=dla, dla_cores=1 if dla else 0,
                                    onnx_has_qdq=info.has_qdq, onnx_weight_form=info.weight_form,
                                    jetson_module=caps.dla_modules[0] if dla else None)
    except ConfigError as e:
        return _refused(target, precision, device, str(e))
    opts = resolve(opts, rules_version, onnx_has_qdq=info.has_qdq)
    argv_opts = dataclasses.replace(opts, calib_cache=Path(CALIB) if use_cache else None)
    argv = trtexec_command(ONNX, ENGINE, argv_opts, rules_version, input_name=info.input_name,
                           input_chw=info.chw, dynamic_batch=info.dynamic_batch, batch=shapes)
    return {
        "target": target, "precision": precision, "device": device, "refused": None,
        "onnx": onnx_name, "onnx_sha256": info.sha256, "explicit_quantization": info.has_qdq,
        "int8_weight_form": info.weight_form,
        "calib_cache": inputs.calib_name if use_cache else None,
        "input": info.input_name, "profile": {"min": shapes[0], "opt": shapes[1], "max": shapes[2]},
        "static_batch": shapes[0] == shapes[2],
        "dynamic_input": info.dynamic_batch,   # run with explicit shapes (trtexec --shapes) even when static_batch
        # DLA: the layers NVIDIA's DLA table excludes run on the GPU (dla.py); every other layer runs on DLA
        "gpu_fallback_layers": fallback if dla else None,
        # where it may run (the device refuses a Jetson for a desktop-only target, a DLA entry on another module or an
        # older JetPack it can read): versions.DLA_ROWS, written here so the device decides nothing
        "platforms": list(platforms),
        "dla_modules": [JETSON_MODULES[m] for m in caps.dla_modules] if dla else None,
        "jetpack_min": caps.dla_jetpack_min if dla else None,
        # one build configuration for both device paths: the engine_build arguments below and the trtexec argv
        "build_config": {"workspace_mb": WORKSPACE_MB, "timing_cache": True, "builder_optimization_level": level,
                         "strongly_typed": bool(opts.strongly_typed), "profile": list(shapes)},
        # keyword arguments of engine_build.build_engine (the device adds paths, its timing cache and DLA core index)
        "engine_build": {"precision": build_precision.value, "dla_core": 0 if dla else None,
                         "gpu_fallback": bool(fallback), "batch": list(shapes),
                         "strongly_typed": bool(opts.strongly_typed), "workspace_mb": WORKSPACE_MB,
                         "builder_optimization_level": level,
                         "dla_gpu_layers": [{"node": g["node"], "index": g.get("index")} for g in fallback]
                         if dla else None},
        "trtexec": argv,
        "warnings": warnings,
    }


def device_plan(inputs: PlanInputs, *, batch: int) -> dict[str, Any]:
    """Every (target, precision, device) entry."""

    paths = {inputs.fp32_onnx, inputs.int8_onnx} | ({inputs.int8_fp32w_onnx} if inputs.int8_fp32w_onnx else set())
    inspected = {path: inspect_onnx(path) for path in paths}
    entries = [plan_entry(t, p, d, inputs, batch=batch, inspected=inspected)
               for t in TARGETS for p in PRECISIONS for d in DEVICES]
    return {"format": PLAN_FORMAT, "batch": batch,
            "targets": {k: {"rules": v[0], "match": list(v[1]), "label": v[2], "from": v[3], "platforms": list(v[4])}
                        for k, v in TARGETS.items()},
            "entries": entries}


def script_name(entry: dict[str, Any]) -> str:
    return f"trtexec-{entry['target']}-{entry['precision']}-{entry['device']}.sh"


def script_for(entry: dict[str, Any], *, onnx: str, calib: str | None) -> str:
    """A stock trtexec build for one plan entry, runnable on the device from the folder holding the files."""

    label = TARGETS[entry["target"]][2]
    argv = [a.replace(ONNX, onnx).replace(ENGINE, f"model-{entry['precision']}-{entry['device']}.plan")
            .replace(CALIB, "calib.local.cache")
            .replace(TIMING, f"model-{entry['precision']}-{entry['device']}.timing.cache") for a in entry["trtexec"]]
    lines = ["#!/bin/sh", f"# {label}: {entry['precision']} on the {entry['device'].upper()}, written by edgeres "
             "(the host's plan; see plan.json).", "# Run it on the target device next to the files it names "
             "(trtexec is in /usr/src/tensorrt/bin on JetPack).", 'cd "$(dirname "$0")"', "set -e",
             'TRTEXEC="${TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}"']
    for w in entry["warnings"]:
        lines.append(f"# note: {w}")
    if calib:
        lines += ["# the cache header must name this TensorRT (else TensorRT ignores it and trtexec calibrates on "
                  "random data)",
                  "tag=$(\"$TRTEXEC\" --help 2>&1 | sed -n 's/.*TensorRT v\\([0-9]*\\).*/\\1/p' | head -n 1)",
                  '[ -n "$tag" ] || { echo "cannot read the TensorRT version from trtexec --help" >&2; exit 1; }',
                  f"sed \"1s/.*/TRT-$tag-EntropyCalibration2/\" {calib} > calib.local.cache"]
    lines.append('"$TRTEXEC" ' + format_command(argv[1:]))
    return "\n".join(lines) + "\n"


def write_run_plan(folder: Path, inputs: PlanInputs, *, batch: int, relative_to: Path) -> dict[str, Any]:
    """FOLDER/plan.json and one stock trtexec script per planned (not refused) entry, whose paths are relative
    to FOLDER as seen from `relative_to` (the run folder): copy the run folder to a device and run a script."""
    import os

    folder.mkdir(parents=True, exist_ok=True)
    inputs = with_fp32_weights_copy(inputs, folder)
    plan = device_plan(inputs, batch=batch)

    def rel(p: Path | None) -> str | None:
        return None if p is None else os.path.relpath(Path(p).resolve(), folder.resolve())

    scripts = []
    for entry in plan["entries"]:
        if entry["refused"]:
            continue
        by_name = {inputs.int8_name: inputs.int8_onnx, inputs.fp32_name: inputs.fp32_onnx,
                   inputs.int8_fp32w_name: inputs.int8_fp32w_onnx}
        onnx = rel(by_name[entry["onnx"]])
        path = folder / script_name(entry)
        atomic_write_text(path, script_for(entry, onnx=str(onnx), calib=rel(inputs.calib_cache)
                                           if entry["calib_cache"] else None))
        path.chmod(0o755)
        entry["script"] = path.name
        scripts.append(path.name)
    atomic_write_json(folder / "plan.json", plan)
    return {"plan": str((folder / "plan.json").relative_to(relative_to)), "scripts": len(scripts),
            "refused": sum(1 for e in plan["entries"] if e["refused"]), "batch": batch,
            "sha256": sha256_file(folder / "plan.json")}


FP32W_SUFFIX = ".fp32w.onnx"


def with_fp32_weights_copy(inputs: PlanInputs, folder: Path) -> PlanInputs:
    """When the INT8 ONNX stores INT8 constants (documented from TensorRT 10 only), write FOLDER/<name>.fp32w.onnx:
    the same graph with FP32 weights behind QuantizeLinear (export.restore_fp32_weights: bit-identical outputs), the
    form 8.5/8.6 document, and name it in the inputs. Replaces only a file of that name edgeres wrote itself."""

    if inputs.int8_fp32w_onnx is not None or inputs.int8_onnx == inputs.fp32_onnx:
        return inputs
    model = load_onnx(inputs.int8_onnx)
    if int8_weight_form(model) != INT8_CONSTANTS:
        return inputs
    restore_fp32_weights(model)
    stem = Path(inputs.int8_name).name
    name = (stem[:-len(".onnx")] if stem.endswith(".onnx") else stem) + FP32W_SUFFIX
    dest = folder / name
    if dest.exists():
        prior = load_onnx(dest)
        if not any(p.key == INT8_WEIGHTS_PROP for p in prior.metadata_props):
            raise ConfigError(f"{dest} exists and was not written by edgeres; move it away")
    model.metadata_props.add(key=INT8_WEIGHTS_PROP, value=FP32_QUANTIZE)
    atomic_write_bytes(dest, model.SerializeToString())
    return dataclasses.replace(inputs, int8_fp32w_name=name, int8_fp32w_onnx=dest)


# ---------------------------------------------------------------------------------------------------- the README
README_BEGIN = "<!-- generated by python -m edgeres.tensorrt.targets: begin -->"
README_END = "<!-- generated by python -m edgeres.tensorrt.targets: end -->"


def readme_section() -> str:
    """The README's TensorRT table (versions.DLA_ROWS) and plan targets (TARGETS), between its markers:
    `python -m edgeres.tensorrt.targets` rewrites that block of README.md and nothing else; tests/test_tensorrt_plan.py
    fails when the README differs."""
    targets = "\n".join(f"- `{key}`: {spec[2]}" for key, spec in TARGETS.items())
    return (f"{README_BEGIN}\n{readme_table()}\n{dla_rule_text()}.\n\nPlan targets (`edgeres bundle --target`, "
            f"plan.json):\n\n{targets}\n{README_END}")


def rewrite_readme(readme: Path) -> bool:
    """Replace the generated block of `readme`; True when the file changed."""
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise ConfigError(f"{readme} has no generated TensorRT block ({README_BEGIN} ... {README_END})")
    new = text[:text.index(README_BEGIN)] + readme_section() + text[text.index(README_END) + len(README_END):]
    if new != text:
        atomic_write_text(readme, new)
    return new != text


if __name__ == "__main__":
    import sys

    path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / "README.md"
    print(f"{path}: {'rewritten' if rewrite_readme(path) else 'already current'}")
