"""The stock `trtexec` command line equivalent to a build, spelled for the target TensorRT version.

Flag spellings by version (trt-api <ver>/trtexec_options.txt, NVIDIA's 8.x->10.x / 10.x->11.x guides):
--explicitBatch is never written (8.x: deprecated, no effect; 10.x: gone); --workspace is replaced by
--memPoolSize=workspace:<MiB> (8.4+, --workspace removed in 10); --buildOnly (8.5) became --skipInference
(8.6+); --versionCompatible, --hardwareCompatibilityLevel=ampere+ and --builderOptimizationLevel need 8.6+;
--stronglyTyped on 10.x (the Q/DQ ONNX is built with it and no precision flag), implied (and deprecated) on 11.x;
11.x has no --fp16/--int8/--best/--calib; 10.12+ deprecates --fp16/--int8 (they still work).
"""
from __future__ import annotations

import shlex
from pathlib import Path

from edgeres.tensorrt.options import CompileOptions, resolved_strongly_typed
from edgeres.tensorrt.versions import TrtVersion, capabilities


def _shape(name: str, batch: int, chw: tuple[int, ...]) -> str:
    return f"{name}:" + "x".join(str(d) for d in (batch, *chw))


def trtexec_command(onnx_path: str | Path, engine_path: str | Path, options: CompileOptions,
                    trt_version: str | TrtVersion, *, input_name: str, input_chw: tuple[int, ...],
                    dynamic_batch: bool, batch: tuple[int, int, int]) -> list[str]:
    """argv for trtexec; options are assumed already validated for this version."""
    caps = capabilities(trt_version)
    p = options.precision
    argv = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}"]
    if dynamic_batch:
        for flag, b in zip(("--minShapes", "--optShapes", "--maxShapes"), batch):
            argv.append(f"{flag}={_shape(input_name, b, input_chw)}")
    typed = resolved_strongly_typed(options, caps.version)
    if caps.weak_typing and not typed:
        if p.uses_fp16:
            argv.append("--fp16")
        if p.uses_int8:
            argv.append("--int8")
        if options.calib_cache is not None:
            argv.append(f"--calib={options.calib_cache}")
    if caps.strongly_typed and not caps.always_strongly_typed and typed:
        argv.append("--stronglyTyped")
    if options.workspace_mb is not None:
        argv.append(f"--memPoolSize=workspace:{options.workspace_mb}")
    if options.dla_core is not None:
        argv.append(f"--useDLACore={options.dla_core}")
        if options.gpu_fallback:
            argv.append("--allowGPUFallback")
    if options.timing_cache is not None:
        argv.append(f"--timingCacheFile={options.timing_cache}")
    if options.builder_optimization_level is not None:
        argv.append(f"--builderOptimizationLevel={options.builder_optimization_level}")
    if options.version_compatible:
        argv.append("--versionCompatible")
    if options.hardware_compatibility:
        argv.append(f"--hardwareCompatibilityLevel={options.hardware_compatibility}")
    if options.sparsity:
        argv.append("--sparsity=enable")
    argv.append(caps.trtexec_skip_inference)
    return argv


def format_command(argv: list[str]) -> str:
    """One shell line per flag, continued with backslashes."""
    return " \\\n    ".join(shlex.quote(a) for a in argv)


def script_text(argv: list[str], *, trt_version: str, note: str = "") -> str:
    head = [
        "#!/bin/sh",
        f"# Equivalent trtexec build for TensorRT {trt_version}, written by edgeres.",
        "# Run it on the target device (trtexec is in /usr/src/tensorrt/bin on JetPack).",
    ]
    if note:
        head += [f"# {line}" for line in note.splitlines()]
    return "\n".join(head + ["set -e", format_command(argv), ""])
