"""The CPU INT8 artifact: an OpenVINO IR (`export/model_int8_cpu.xml` + `.bin`) for x86 / ARM CPUs and the
Jetson's own CPU, run with OpenVINO's INT8 kernels.

Why OpenVINO and not ONNX Runtime: ONNX Runtime's CPU Q/DQ fusion does not take the TensorRT-style graph (signed
INT8 activations, no Q after the convs that feed residual adds), so it runs it in float and dequantizes every
weight on every call — slower than FP32 (benchmarks/RESULTS.md). Three ways, measured side by side there
(recipe `export.cpu_int8`):
- "qat" (default): the final INT8 model itself - the INT8 ONNX TensorRT builds, QAT included - with its activation
  quantizers whose input cannot be negative re-expressed as unsigned INT8 at the same scales
  (`unsigned_non_negative`: the same quantized values, in the form CPUs' u8 x s8 kernels take). It makes the Jetson
  model's decisions at OpenVINO's own PTQ latency (resnet18 at 128 and 224 px, batch 1 and 8: 0.99-1.015x);
- "qdq": the INT8 ONNX converted as it is (signed activations): the same decisions, 1.15-1.25x slower;
- "openvino": NNCF's OpenVINO PTQ of the BN-folded FP32 ONNX on the PTQ calibration images - OpenVINO's own model
  (its placement, no QAT): on a weak model it changed 13.6 % of the Jetson model's decisions.
Either way the IR keeps INT8 weights on disk and is gated on its top-1 drop against FP32, its agreement with FP32,
and its agreement with the INT8 ONNX (the two INT8 artifacts of one build make the same decisions).
OpenVINO is optional (`pip install 'edgeres[openvino]'`) and imported here only.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeres.check import GraphIndex
from edgeres.errors import BackendUnavailable
from edgeres.io import rejected_path
from edgeres.metrics import compare_logits
from edgeres.onnx_info import read_metadata
from edgeres.progress import silenced
from edgeres.records import StageRecord, StageResult, Status, add_fp32_gates, proportion_gate
from edgeres.settings import level_field, origins_field, read, setting


def openvino_status() -> tuple[bool, str]:
    """(available, version or why not). Never raises."""
    try:
        import openvino as ov
    except Exception as e:  # noqa: BLE001 - ImportError, or a broken install
        return False, f"OpenVINO is not installed ({type(e).__name__}); pip install 'edgeres[openvino]'"
    return True, ov.get_version()


# ops whose output is >= 0 when their (first) input is: pooling and reshaping, and a Q/DQ with zero-point 0
_SIGN_KEEPING = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Flatten", "Reshape", "Squeeze",
                 "Unsqueeze", "Transpose", "Identity", "QuantizeLinear", "DequantizeLinear"}


def unsigned_non_negative(model) -> int:
    """Re-express, in an ONNX ModelProto (edited in place), every activation quantizer whose input cannot be
    negative - a Relu's output, or a max/average pool or reshape of one, through Q/DQ pairs with zero-point 0 (the
    residual input after the stem's MaxPool, the classifier's input after global average pooling) - as unsigned
    INT8 with the same scale and zero-point 0: the values are >= 0, so each keeps its quantized value (only a value
    past the signed range's 127 steps, which the signed quantizer clipped, now reaches up to 255 steps). TensorRT
    needs signed activations; CPUs' INT8 kernels (VNNI: u8 x s8) want unsigned ones, so this is the same model in
    the CPU's preferred form, and OpenVINO fuses it as it fuses its own PTQ. Returns how many quantizers changed."""
    import numpy as np
    from onnx import numpy_helper

    graph = model.graph
    index = GraphIndex(model)   # producers and constant values (initializers and Constant nodes)
    known: dict[str, bool] = {}

    def zero_point_zero(node) -> bool:   # absent counts as 0; any node but Q/DQ: True
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 3 or not node.input[2]:
            return True
        return node.input[2] in index.const and not index.const[node.input[2]].any()

    def non_negative(name: str) -> bool:
        if name not in known:
            node = index.producer.get(name)
            known[name] = node is not None and (
                node.op_type == "Relu" or (node.op_type in _SIGN_KEEPING and bool(node.input)
                                           and zero_point_zero(node) and non_negative(node.input[0])))
        return known[name]

    zero = "edgeres_uint8_zero_point"
    chosen = [node for node in graph.node   # decided on the graph as it is, before any edit
              if node.op_type == "QuantizeLinear" and len(node.input) == 3 and non_negative(node.input[0])]
    changed = set()
    for node in chosen:
        node.input[2] = zero
        changed.add(node.output[0])
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in changed:
            node.input[2] = zero
    if changed:
        graph.initializer.append(numpy_helper.from_array(np.array(0, dtype=np.uint8), name=zero))
    return len(changed)


def export_openvino(onnx_path: str | Path, xml_path: str | Path, *, calibration=None,
                    subset_size: int | None = None, quiet: bool = True, unsigned_activations: bool = False,
                    say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The ONNX as an OpenVINO IR at xml_path (+ .bin), written atomically: both files are made in a temporary
    folder beside the destination and moved in, .bin first. With `calibration` (an iterable of float32 NCHW
    batches) the FP32 model is quantized by NNCF's OpenVINO PTQ on exactly those images; without, the ONNX (the
    TensorRT INT8 Q/DQ ONNX) is converted as it is. Unless `quiet`, each step is said (`say`, default print) and
    NNCF's own progress bars (statistics collection, bias correction) are shown."""
    ok, why = openvino_status()
    if not ok:
        raise BackendUnavailable(why)
    import openvino as ov

    say = say or (lambda line: None if quiet else print(line, flush=True))
    onnx_path, xml_path = Path(onnx_path), Path(xml_path)
    props = read_metadata(onnx_path)
    xml_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{xml_path.stem}.", dir=xml_path.parent))
    try:
        return _export_openvino(ov, onnx_path, xml_path, tmp, props, calibration=calibration,
                                subset_size=subset_size, quiet=quiet, unsigned_activations=unsigned_activations,
                                say=say)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _export_openvino(ov, onnx_path: Path, xml_path: Path, tmp: Path, props: dict, *, calibration, subset_size,
                     quiet: bool, unsigned_activations: bool, say: Callable[[str], None]) -> dict[str, Any]:
    source, method, unsigned = onnx_path, "converted Q/DQ ONNX", 0
    if unsigned_activations:
        import onnx

        edited = onnx.load(str(onnx_path))
        unsigned = unsigned_non_negative(edited)
        source = tmp / "unsigned.onnx"
        onnx.save(edited, str(source))
        method = "the INT8 ONNX, post-ReLU activations unsigned"
    say(f"export_cpu: converting {onnx_path.name} to OpenVINO {ov.get_version().split('-')[0]}"
        + (f" ({unsigned} post-ReLU activations as unsigned INT8, same scales)" if unsigned_activations else ""))
    model = ov.convert_model(str(source))
    if calibration is not None:
        import nncf

        items = list(calibration)
        n = subset_size or len(items)
        say(f"export_cpu: INT8 by NNCF's PTQ: statistics on {n} images, then bias correction")
        with silenced(quiet):
            model = nncf.quantize(model, nncf.Dataset(items), subset_size=n,
                                  preset=nncf.QuantizationPreset.PERFORMANCE)
        method = "NNCF OpenVINO PTQ"
        props["precision"] = "int8"
    model.set_rt_info(json.dumps(props, sort_keys=True), "edgeres_meta")
    ov.save_model(model, str(tmp / xml_path.name), compress_to_fp16=False)
    os.replace(tmp / xml_path.with_suffix(".bin").name, xml_path.with_suffix(".bin"))
    os.replace(tmp / xml_path.name, xml_path)
    return {"xml": str(xml_path), "bin_bytes": xml_path.with_suffix(".bin").stat().st_size,
            "openvino": ov.get_version(), "method": method,
            **({"unsigned_activations": unsigned} if unsigned_activations else {})}


# ---------------------------------------------------------------------------------------------------- the stage

@dataclass(frozen=True)
class CpuInputs:
    onnx: Path                 # "openvino": the FP32 ONNX; "qat", "qdq": the TensorRT INT8 ONNX
    eval_data: Any             # the evaluation split
    out: Path                  # export/model_int8_cpu.xml (+ .bin), written only after its check passed
    calibration: Any = None    # "openvino": float32 [1, C, H, W] images, PTQ's calibration images
    reference_top1: float | None = None   # FP32 top-1 (%) on eval_data
    tensorrt_int8: Any = None  # EvalResult of the TensorRT INT8 ONNX (as written): the two INT8 artifacts' agreement
                               # is recorded and gated (add_artifacts_gate)
    reference_logits: Any = None   # the FP32 model's logits on eval_data: its agreement with FP32 is gated


@dataclass(frozen=True)
class CpuSettings:
    mode: str = setting("export.cpu_int8", help="qat: the INT8 ONNX with unsigned post-ReLU activations (same "
                                                "scales); qdq: the INT8 ONNX as it is; openvino: OpenVINO's PTQ "
                                                "of the FP32 ONNX.", flag="--cpu-int8")
    calib_size: int = setting("quant.calib_size", help="Calibration images (openvino), as PTQ draws them.")
    seed: int = setting("train.seed", help="Seed of the calibration subset.")
    max_drop: float | None = None
    drop_source: str = "gates.max_drop_qat"
    min_agreement_pct: float | None = None   # top-1 agreement with FP32 (%): a drop gate alone passes a model that
                                             # trades as many right answers as it loses
    level: float = level_field()
    origins: dict = origins_field()

    @classmethod
    def from_recipe(cls, recipe, *, calib_available: int | None = None) -> CpuSettings:
        """The CPU artifact is a final INT8 model: gated like one (Recipe.max_drop, gates.min_agreement_pct)."""
        return read(cls, recipe, calib_size=recipe.calib_count(calib_available), **recipe.final_gates())


@dataclass(frozen=True)
class CpuOutput:
    path: Path
    evaluation: Any = None


def add_artifacts_gate(rec: StageRecord, int8_onnx_logits, cpu_logits, settings: CpuSettings) -> None:
    """The two INT8 artifacts of one build (the INT8 ONNX TensorRT builds for the Jetson, and this CPU model) make
    the same decisions: their top-1 agreement on the evaluation images, `int8_artifacts_agreement_pct`, gated like
    agreement with FP32 (gates.min_agreement_pct, Wilson interval). A user who ships both ships one model."""
    import numpy as np

    a, b = np.asarray(int8_onnx_logits).argmax(1), np.asarray(cpu_logits).argmax(1)
    n, k = int(a.shape[0]), int((a == b).sum())
    rec.metrics["int8_artifacts_agreement_pct"] = round(100.0 * k / n, 4) if n else 100.0
    if settings.min_agreement_pct is not None and n:
        rec.add_gate(proportion_gate("int8_artifacts_agreement_pct", k, n, settings.min_agreement_pct,
                                     level=settings.level, key="gates.min_agreement_pct",
                                     what="top-1 agreement with the INT8 ONNX (the model TensorRT builds)",
                                     source=(settings.origins or {}).get("gates.min_agreement_pct",
                                                                          "built-in default")))


def skipped():
    """The stage's result where OpenVINO is not installed (skipped, with the reason), else None."""
    ok, why = openvino_status()
    if ok:
        return None
    return StageResult(StageRecord(stage="export_cpu", status=Status.SKIPPED.value, metrics={"reason": why},
                                   message=f"CPU INT8 artifact not written: {why}"), None)


def run(inputs: CpuInputs, settings: CpuSettings = CpuSettings(), *, quiet: bool = True):
    """The CPU INT8 artifact stage: write the IR beside `out`, evaluate it with OpenVINO, gate its top-1 drop vs
    FP32, then move it into place. Skipped, with the reason, without OpenVINO. -> StageResult[CpuOutput | None]"""
    from edgeres.evaluate import evaluate
    from edgeres.runners import OpenVinoRunner

    skip = skipped()
    if skip is not None:
        return skip
    out = Path(inputs.out)
    staged = out.with_name(f".{out.stem}.unverified.xml")
    try:
        info = export_openvino(inputs.onnx, staged,
                               calibration=inputs.calibration if settings.mode == "openvino" else None, quiet=quiet,
                               unsigned_activations=settings.mode == "qat")
        runner = OpenVinoRunner(staged)
        ev = evaluate(runner, inputs.eval_data, batch_size=256, progress=False if quiet else "evaluating CPU INT8")
        metrics: dict[str, Any] = {**info, "xml": str(out), "int8_kernels": runner.kernel_report()}
        runner.close()
        if inputs.tensorrt_int8 is not None:
            metrics.update(compare_logits(inputs.tensorrt_int8.logits, ev.logits),
                           compared_with="TensorRT INT8 ONNX as written")
            metrics["n_compared"] = metrics.pop("n_probe")
            del metrics["top1_agreement_pct"]   # recorded once, by name, as int8_artifacts_agreement_pct (gated)
        rec = StageRecord(stage="export_cpu", metrics={**metrics, "n_eval": ev.n})
        add_fp32_gates(rec, ev, inputs.reference_top1, inputs.reference_logits, settings,
                       key="fp32_top1_agreement_pct")
        if inputs.tensorrt_int8 is not None:
            add_artifacts_gate(rec, inputs.tensorrt_int8.logits, ev.logits, settings)
        if not rec.passed:   # kept beside the output as model_int8_cpu.rejected.xml (+ .bin)
            rejected = rejected_path(out)
            os.replace(staged.with_suffix(".bin"), rejected.with_suffix(".bin"))
            os.replace(staged, rejected)
            rec.extra_artifacts["rejected"] = str(rejected)
            rec.message += f"; {out.name} not written, the rejected model is {rejected}"
            return StageResult(rec, CpuOutput(rejected, ev))
        os.replace(staged.with_suffix(".bin"), out.with_suffix(".bin"))
        os.replace(staged, out)
        rec.extra_artifacts["openvino_weights"] = str(out.with_suffix(".bin"))
        rec.set_artifact(out)
        return StageResult(rec, CpuOutput(out, ev))
    finally:
        staged.unlink(missing_ok=True)
        staged.with_suffix(".bin").unlink(missing_ok=True)
