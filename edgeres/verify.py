"""Verify an exported ONNX model on ONNX Runtime (CPU) against its torch parent on a probe batch.

FP32 ONNX vs the torch FP32 (folded) model: max|diff| <= 1e-4 relative to the logit scale, top-1 agreement 100 %.
INT8 ONNX vs the fake-quant NNCF torch model: top-1 agreement >= 99 %; max|diff| is reported. The INT8 check runs
the graph as written (ONNX Runtime's graph optimizations off): it judges the export, i.e. whether the Q/DQ graph
computes what the fake-quant model computes. With optimizations on, ONNX Runtime swaps in its own INT8 kernels
(QLinearConv: int32 accumulation, requantization), a different INT8 implementation as TensorRT is one; that is a
backend, measured by accuracy in `verify`, and its agreement is recorded beside the gated one.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

FP32_REL_TOL = 1e-4
FP32_MIN_AGREEMENT = 1.0
INT8_MIN_AGREEMENT = 0.99


def ort_session(path: str | Path, threads: int | None = None, *, optimize: bool = True):
    """A CPU ONNX Runtime runner (edgeres.runners.OrtRunner), with a clear error for a missing or non-ONNX file.
    `optimize=False`: the graph as written (see the module docstring)."""
    from edgeres.check import load_onnx
    from edgeres.runners import OrtRunner

    load_onnx(path)
    return OrtRunner(path, threads=threads, optimize=optimize)


def ort_logits(runner, x, *, batch_size: int = 64):
    """Logits of `runner` for x [N, C, H, W], in batches."""
    import numpy as np

    x = np.asarray(x, dtype=np.float32)
    return np.concatenate([runner.infer(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def is_int8_onnx(path: str | Path) -> bool:
    from edgeres.check import count_qdq

    return sum(count_qdq(path).values()) > 0


def verify_onnx(onnx_path: str | Path, reference, probe_x, *, rel_tol: float | None = None,
                min_agreement: float | None = None, threads: int | None = None) -> tuple[dict[str, Any], list]:
    """Compare ONNX Runtime's logits with the torch reference's. Returns (metrics, [Gate])."""
    from edgeres.fold import compare_logits, torch_logits
    from edgeres.records import Gate

    int8 = is_int8_onnx(onnx_path)
    session = ort_session(onnx_path, threads=threads, optimize=not int8)
    metrics = compare_logits(torch_logits(reference, probe_x), ort_logits(session, probe_x))
    metrics["precision"] = "int8" if int8 else "fp32"
    metrics["onnxruntime_optimizations"] = not int8
    prefix = "onnx_int8" if int8 else "onnx_fp32"
    if int8:
        gates = [Gate(f"{prefix}_top1_agreement", metrics["top1_agreement"],
                      INT8_MIN_AGREEMENT if min_agreement is None else min_agreement, ">=")]
    else:
        gates = [Gate(f"{prefix}_max_abs_diff_rel", metrics["rel_diff"], FP32_REL_TOL if rel_tol is None else rel_tol),
                 Gate(f"{prefix}_top1_agreement", metrics["top1_agreement"],
                      FP32_MIN_AGREEMENT if min_agreement is None else min_agreement, ">=")]
    return metrics, gates


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

    from edgeres.check import load_onnx
    from edgeres.quantize import quantizer_hooks

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
