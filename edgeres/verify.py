"""The verify stage (every candidate on every backend present, one table) and the ONNX checks' constants and helpers.

The export stage (edgeres/export.py) checks each ONNX with these tolerances before it writes it:
FP32 ONNX vs the torch FP32 (folded) model: max|diff| <= 1e-4 relative to the logit scale, top-1 agreement 100 %.
INT8 ONNX vs the fake-quant NNCF torch model: top-1 agreement >= 99 %; max|diff| is reported. The INT8 check runs
the graph as written (ONNX Runtime's graph optimizations off): it judges the export, i.e. whether the Q/DQ graph
computes what the fake-quant model computes. With optimizations on, ONNX Runtime swaps in its own INT8 kernels
(QLinearConv: int32 accumulation, requantization), a different INT8 implementation as TensorRT is one; that is a
backend, measured by accuracy here, and its agreement is recorded beside the gated one.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeres import stats
from edgeres.check import load_onnx
from edgeres.quantize import quantizer_hooks
from edgeres.records import StageRecord, StageResult, add_fp32_gates
from edgeres.settings import level_field, origins_field, read, setting


def ort_session(path: str | Path, threads: int | None = None, *, optimize: bool = True):
    """A CPU ONNX Runtime runner (edgeres.runners.OrtRunner), with a clear error for a missing or non-ONNX file.
    `optimize=False`: the graph as written (see the module docstring)."""
    from edgeres.runners import OrtRunner

    load_onnx(path)
    return OrtRunner(path, threads=threads, optimize=optimize)


def ort_logits(runner, x, *, batch_size: int = 64):
    """Logits of `runner` for x [N, C, H, W], in batches."""
    import numpy as np

    x = np.asarray(x, dtype=np.float32)
    return np.concatenate([runner.infer(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def _constant(proto, name: str):
    """The value of an initializer or Constant-node output `name` (a Q/DQ scale), as a numpy array."""
    from onnx import numpy_helper

    for init in proto.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in proto.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return numpy_helper.to_array(node.attribute[0].t)
    return None


def layerwise(model, onnx_path: str | Path, x) -> list[dict[str, Any]]:
    """Where an INT8 ONNX and its fake-quant NNCF model part ways, activation quantizer by quantizer (graph order):
    the share of elements that land on a different INT8 step and the largest gap, in steps.

    ONNX Runtime runs the graph as written (optimizations off), so this compares the exported graph itself, not
    ONNX Runtime's INT8 kernels. A correct export differs only by float rounding at step boundaries: a tiny share
    at the first layers, growing layer by layer as those one-step flips propagate; a wrong scale, sign or
    placement shows up as many-step gaps at one quantizer."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch

    proto = load_onnx(onnx_path)
    weights = {i.name for i in proto.graph.initializer}
    consumers: dict[str, list] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    acts = []   # (hook op name in the ONNX node name, DQ output, step)
    for node in proto.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in weights:
            continue
        dq = next((c for c in consumers.get(node.output[0], []) if c.op_type == "DequantizeLinear"), None)
        scale = _constant(proto, node.input[1])
        if dq is not None and scale is not None and scale.size == 1:
            acts.append((node.name.removesuffix("/QuantizeLinear"), dq.output[0], float(scale.reshape(()))))
    captured: dict[str, list] = {}
    handles = [q.register_forward_hook(lambda m, i, o, op=name.partition(".")[2]:
                                       captured.setdefault(op, []).append(o.detach().float().cpu().numpy()))
               for name, q in quantizer_hooks(model)]
    try:
        with torch.no_grad():
            model.eval()(torch.as_tensor(np.asarray(x, dtype=np.float32)))
    finally:
        for h in handles:
            h.remove()
    wanted = {dq for _, dq, _ in acts}
    graph_outputs = {o.name for o in proto.graph.output}
    for dq in sorted(wanted - graph_outputs):
        proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(dq))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    values = dict(zip(names, session.run(None, {session.get_inputs()[0].name: np.asarray(x, dtype=np.float32)})))
    rows = []
    for onnx_name, dq, step in acts:
        ops = [op for op in captured if onnx_name == f"/{op}" or onnx_name.endswith(f"/{op}")]
        op = max(ops, key=len, default=None)   # "relu/relu_/0" is also a suffix of "layer1/0/relu/relu_/0"
        if op is None or len(captured[op]) != 1 or captured[op][0].shape != values[dq].shape:
            continue
        gap = np.abs(captured[op][0] - values[dq]) / step
        rows.append({"quantizer": op, "elements": int(gap.size), "step": step,
                     "differ_pct": round(100.0 * float(np.mean(gap > 0.5)), 5),
                     "max_steps": round(float(gap.max()), 3)})
    return rows


def format_layerwise(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'activation quantizer':<48} {'elements':>10} {'differ %':>9} {'max steps':>9}"]
    lines += [f"{r['quantizer'][:48]:<48} {r['elements']:>10} {r['differ_pct']:>9.4f} {r['max_steps']:>9.2f}"
              for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- the stage

BENCH_MIN_RUNS = 10   # trtexec's minimum


@dataclass
class Candidate:
    """One row of the table: an artifact on one backend, its evaluation, and a runner to time (None: not timed)."""

    stage: str
    backend: str
    precision: str
    evaluation: Any = None     # EvalResult on the evaluation split (None: a row that only carries a note)
    runner: Any = None
    artifact: Path | None = None
    int8_kernels: str | None = None
    note: str | None = None


@dataclass(frozen=True)
class VerifyInputs:
    reference: Any             # EvalResult of the FP32 model (torch) on the evaluation split
    candidates: list[Candidate]
    input_shape: tuple[int, int, int]
    class_names: list[str]
    class_counts: dict[str, list[int]] | None = None   # images per class in each split (train, holdout, evaluation)


@dataclass(frozen=True)
class VerifySettings:
    bench_seconds: float = 1.0     # per row, after warm-up and at least BENCH_MIN_RUNS calls; 0: not timed
    max_drop: float | None = None  # pp, on the INT8 ONNX
    drop_source: str = "gates.max_drop_qat"
    min_agreement_pct: float | None = None   # %, the INT8 ONNX's top-1 agreement with FP32
    torch_device: str = "cpu"      # where the torch rows ran (CUDA: timed with CUDA events)
    max_class_drop_pp: float = setting("gates.max_class_drop_pp", flag="",
                                       help="A class whose INT8 top-1 falls by more is named in the verdict.")
    min_class_images: int = setting("gates.min_class_images", flag="",
                                    help="A class with fewer evaluation images is named in the verdict.")
    level: float = level_field()
    origins: dict = origins_field()

    @classmethod
    def from_recipe(cls, recipe, *, int8: bool, bench_seconds: float, torch_device: str) -> VerifySettings:
        """The INT8 ONNX is gated as the final INT8 model (Recipe.max_drop, gates.min_agreement_pct)."""
        return read(cls, recipe, bench_seconds=bench_seconds, torch_device=torch_device,
                    **recipe.final_gates(gated=int8))


def artifact_bytes(path) -> int:
    """On-disk size of an artifact; an OpenVINO IR counts its .xml and .bin."""
    path = Path(path)
    extra = path.with_suffix(".bin") if path.suffix == ".xml" else None
    return path.stat().st_size + (extra.stat().st_size if extra is not None and extra.is_file() else 0)


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _row(c: Candidate, ref, shape, bench_seconds: float) -> dict[str, Any]:
    import numpy as np

    from edgeres.bench import benchmark

    ev = c.evaluation
    r: dict[str, Any] = {"stage": c.stage, "backend": c.backend, "precision": c.precision, "top1": None,
                         "delta_pp": None, "agree_pct": None, "p50_ms": None, "p99_ms": None, "img_s": None,
                         "size_mb": round(artifact_bytes(c.artifact) / 1e6, 3) if c.artifact else None}
    if ev is not None:
        r.update(top1=round(ev.top1, 3), delta_pp=round(ev.top1 - ref.top1, 3),
                 agree_pct=round(100.0 * float(np.mean(ev.logits.argmax(1) == ref.logits.argmax(1))), 3))
    if c.int8_kernels is not None:
        r["int8_kernels"] = c.int8_kernels
    if c.note:
        r["note"] = c.note
    if c.runner is not None and bench_seconds > 0:
        # as `edgeres bench` measures: warm-up, then at least BENCH_MIN_RUNS calls and --bench-seconds
        res = benchmark(c.runner, batch_sizes=(1,), iterations=BENCH_MIN_RUNS, duration_s=bench_seconds,
                        input_shape=shape)
        stats = res.results[0]
        r.update(p50_ms=round(stats.latency.median, 4), p99_ms=round(stats.latency.p99, 4),
                 img_s=round(stats.images_per_s, 1), runs=stats.iterations,
                 threads=(res.environment.get("runner") or {}).get("threads"), latency_warning=stats.warning)
    return r


def explain_slow_int8(rows: list[dict[str, Any]], artifacts: dict[int, Path]) -> None:
    """Mark rows that run INT8 kernels (ONNX Runtime: counted on its optimized graph), and say in one line why an
    INT8 row is slower than FP32 on its backend."""
    fp32 = {r["backend"]: r for r in rows if r["precision"] == "fp32" and r.get("p50_ms")}
    fp32.setdefault("openvino", fp32.get("onnxruntime"))   # the CPU artifact is compared with ONNX Runtime FP32
    for i, r in enumerate(rows):
        if i in artifacts and r.get("int8_kernels") is None:
            from edgeres.runners import ort_int8_kernels

            k = ort_int8_kernels(artifacts[i], r.get("threads"))
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


CONFUSION_MAX_CLASSES = 100   # above this, the most frequent confusions instead of the whole matrix


def confusion(ev, num_classes: int) -> dict[str, Any]:
    """Rows = true class, columns = predicted class (counts), or the 20 most frequent confusions when the class
    count is large."""
    import numpy as np

    pred, y = np.asarray(ev.logits).argmax(1), np.asarray(ev.labels)
    m = np.zeros((num_classes, num_classes), dtype=np.int64)
    ok = (y >= 0) & (y < num_classes) & (pred < num_classes)
    np.add.at(m, (y[ok], pred[ok]), 1)
    if num_classes <= CONFUSION_MAX_CLASSES:
        return {"matrix": m.tolist()}
    off = m.copy()
    np.fill_diagonal(off, 0)
    top = np.argsort(off, axis=None)[::-1][:20]
    return {"top": [{"true": int(i // num_classes), "pred": int(i % num_classes), "count": int(off.flat[i])}
                    for i in top if off.flat[i] > 0]}


def class_findings(ref, final, class_names: list[str], settings: VerifySettings) -> list[dict[str, Any]]:
    """What a verdict must name per class: a class the FP32 model never gets right, a class whose INT8 top-1 falls
    by more than gates.max_class_drop_pp (its paired interval wholly beyond the limit), and a class with fewer
    evaluation images than gates.min_class_images (its top-1 moves by more than 100/N pp per image)."""
    import numpy as np

    y, rp = np.asarray(ref.labels), np.asarray(ref.logits).argmax(1)
    fp = np.asarray(final.logits).argmax(1) if final is not None else None
    out = []
    for c, name in enumerate(class_names):
        mask = y == c
        n = int(mask.sum())
        if n == 0:
            continue
        right = int((rp[mask] == c).sum())
        if right == 0:
            out.append({"class": name, "kind": "fp32_never_right", "n": n,
                        "text": f"class {name!r}: FP32 never right (0 of {n} evaluation images)"})
        if fp is not None:
            p = stats.paired(rp[mask].tolist(), fp[mask].tolist(), y[mask].tolist())
            g = stats.drop_gate_numbers(p, settings.max_class_drop_pp, settings.level)
            if g["outcome"] == stats.FAILED:
                out.append({"class": name, "kind": "int8_class_drop", "n": n, "drop_pp": g["value"],
                            "lo": g["lo"], "hi": g["hi"],
                            "text": f"class {name!r}: INT8 top-1 falls {g['value']:.1f} pp ({100 * settings.level:g} % "
                                    f"interval {g['lo']:.1f} to {g['hi']:.1f}, {n} images), more than "
                                    f"gates.max_class_drop_pp {settings.max_class_drop_pp:g}"})
        if n < settings.min_class_images:
            out.append({"class": name, "kind": "few_images", "n": n,
                        "text": f"class {name!r}: {n} evaluation image{'s' if n != 1 else ''} (fewer than "
                                f"gates.min_class_images {settings.min_class_images}: one image moves its top-1 by "
                                f"{100 / n:.0f} pp)"})
    return out


def run(inputs: VerifyInputs, settings: VerifySettings = VerifySettings(), *, quiet: bool = True):
    """The verify stage: every artifact on every backend present — top-1, its difference from FP32 (pp), agreement
    with FP32 (%), latency measured like `edgeres bench` — and the INT8 ONNX's drop gate. Closes every runner it
    was given. -> StageResult[list of rows]"""

    ref = inputs.reference
    rows: list[dict[str, Any]] = []
    # absolute top-1 (%) per class: "fp32" (the trained model), "int8" (the final INT8 ONNX), and every row by
    # "stage/backend"
    per_class: dict[str, Any] = {"fp32": list(ref.per_class), "rows": {}}
    ort_int8: dict[int, Path] = {}
    final_int8 = None
    try:
        for c in inputs.candidates:
            rows.append(_row(c, ref, inputs.input_shape, settings.bench_seconds))
            if c.evaluation is not None:
                per_class["rows"][f"{c.stage}/{c.backend}"] = list(c.evaluation.per_class)
            if c.backend == "onnxruntime" and c.precision == "int8" and c.evaluation is not None:
                ort_int8[len(rows) - 1] = Path(c.artifact)
                final_int8 = c.evaluation
                per_class["int8"] = list(c.evaluation.per_class)
    finally:
        for c in inputs.candidates:
            if c.runner is not None:
                c.runner.close()
    explain_slow_int8(rows, ort_int8)
    bench = {"batch": 1, "min_runs": BENCH_MIN_RUNS, "min_seconds": settings.bench_seconds,
             "torch_threads": _torch_threads(), "torch_device": settings.torch_device,
             "timing": "host wall time per call, after warm-up" + (
                 f"; torch on {settings.torch_device}: CUDA events (H2D + compute + D2H)"
                 if settings.torch_device.startswith("cuda") else "")}
    k = len(inputs.class_names) or len(ref.per_class)
    names = list(inputs.class_names) or [str(i) for i in range(k)]
    confusions = {"fp32": confusion(ref, k)}
    if final_int8 is not None:
        confusions["int8"] = confusion(final_int8, k)
    rec = StageRecord(stage="verify", metrics={"rows": rows, "per_class": per_class, "bench": bench,
                                               "class_names": list(inputs.class_names), "n_eval": ref.n,
                                               "class_counts": inputs.class_counts, "confusion": confusions,
                                               "class_findings": class_findings(ref, final_int8, names, settings)})
    if final_int8 is not None:
        add_fp32_gates(rec, final_int8, ref.top1, ref.logits, settings, key="int8_top1_agreement_pct")
        if rec.message:
            rec.message = rec.message.replace("verify:", "verify (INT8 ONNX on onnxruntime):")
    return StageResult(rec, rows)
