"""Which layers of an ONNX network DLA runs, from NVIDIA's DLA layer table, so a DLA plan can say exactly which
layers fall back to the GPU (and a DLA build without fallback is refused before it fails on the device).

Source: "DLA Supported Layers and Restrictions" (https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-
library/dla-layer-restrictions.html, same table in the 8.5/8.6/10.x developer guides' "DLA Supported Layers"):
- Activation: ReLU, Sigmoid, TanH, Clipped ReLU, Leaky ReLU;
- Convolution / Fully Connected: 2D, kernel [1, 32], stride [1, 8];
- ElementWise: Sum, Sub, Product, Max, Min, Div, Pow;
- Pooling: 2D, MAX / AVERAGE, window [1, 8];
- Scale (BatchNormalization);
- Reduce: MAX only — the ONNX parser imports GlobalAveragePool / ReduceMean as an average Reduce (onnx-tensorrt
  builtin_op_importers.cpp), which DLA cannot run;
- MatrixMultiply is not in the table — the parser imports Gemm / MatMul as MatrixMultiply (+ ElementWise bias);
- Shuffle runs on DLA only for 4D tensors; a Flatten/Reshape to a 2D [N, K] tensor does not;
- Q/DQ (explicit quantization) on DLA from TensorRT 8.6 (versions.capabilities: dla_explicit_quantization).
Anything else (not in the table) runs on the GPU. With GPU fallback such layers run on the GPU silently ("DLA
Runtime Configuration > GPU Fallback Mode", docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/dla-runtime-
configuration.html), so the plan names them. TensorRT's own placement can differ in detail (fusions, DLA loadable
limits); the emulator (tests/trt_emulator) applies its own reading of the table and the tests compare the two.
"""
from __future__ import annotations

from typing import Any

ACTIVATIONS = {"Relu", "Sigmoid", "Tanh", "Clip", "LeakyRelu"}
ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Pow"}
POOLING = {"MaxPool", "AveragePool"}
ALWAYS = ACTIVATIONS | ELEMENTWISE | {"BatchNormalization", "Constant"}
QDQ = {"QuantizeLinear", "DequantizeLinear"}


def _ints(node, name: str) -> list[int]:
    for a in node.attribute:
        if a.name == name:
            return list(a.ints)
    return []


def dla_refusal(node, *, explicit_quantization: bool) -> str | None:
    """Why DLA cannot run this ONNX node (None when it can)."""
    op = node.op_type
    if op in ALWAYS:
        return None
    if op in QDQ:
        return None if explicit_quantization else "Q/DQ (explicit quantization) is not supported on DLA before 8.6"
    if op == "Conv":
        kernel, strides = _ints(node, "kernel_shape"), _ints(node, "strides")
        if len(kernel) not in (0, 2):
            return "DLA convolution is 2D only"
        if any(not 1 <= k <= 32 for k in kernel) or any(not 1 <= s <= 8 for s in strides):
            return f"kernel {kernel} / stride {strides} outside DLA's [1,32] / [1,8]"
        return None
    if op in POOLING:
        kernel = _ints(node, "kernel_shape")
        if len(kernel) != 2 or any(not 1 <= k <= 8 for k in kernel):
            return f"pooling window {kernel} outside DLA's [1,8] (2D)"
        return None
    if op in ("GlobalAveragePool", "ReduceMean"):
        return "imported as an average Reduce; DLA's Reduce supports MAX only"
    if op in ("Gemm", "MatMul"):
        return "imported as MatrixMultiply, which DLA does not run"
    if op in ("Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose"):
        return "a Shuffle to a non-4D tensor; DLA's Shuffle is 4D only"
    return f"{op} is not in DLA's layer table"


def gpu_layers(model: Any, *, explicit_quantization: bool = True) -> list[dict[str, str]]:
    """The ONNX nodes DLA cannot run: [{"node", "op", "why"}], in graph order. Q/DQ nodes count as DLA layers
    (8.6+: versions.capabilities(v).dla_explicit_quantization; options refuses a Q/DQ DLA build before 8.6)."""
    explicit = explicit_quantization
    out = []
    for i, node in enumerate(model.graph.node):
        why = dla_refusal(node, explicit_quantization=explicit)
        if why:
            out.append({"node": node.name or f"{node.op_type}_{i}", "op": node.op_type, "why": why, "index": i})
    return out


# layers TensorRT keeps in INT8 after a quantized producer (fused into it or taking its INT8 output)
INT8_FOLLOWERS = ACTIVATIONS | POOLING | {"Add"}
WEIGHTED = {"Conv", "ConvTranspose", "Gemm"}   # input 0 is the activation, the others weights and bias


def fp32_nodes(model: Any, gpu_nodes: set[str]) -> list[str]:
    """In a strongly typed Q/DQ network (11.4.1 DLA), the nodes that would run in FP32 on DLA, which DLA cannot do:
    a compute node is INT8 when one of its activation inputs comes out of a DequantizeLinear, or when it follows an
    INT8 node as an activation / pooling / residual Add (fused or fed INT8); every other compute node not in
    `gpu_nodes` (the plan's GPU fallback) is listed. Reading of NVIDIA's explicit-quantization rules (Q/DQ placement
    and fusion) applied to the ONNX; the device checks again with TensorRT's own capability report."""
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name for i in model.graph.initializer}
    int8: set[str] = set()
    out: list[str] = []
    for i, node in enumerate(model.graph.node):
        name = node.name or f"{node.op_type}_{i}"
        if node.op_type in QDQ or node.op_type == "Constant":
            continue
        data = node.input[:1] if node.op_type in WEIGHTED else node.input   # a weight's own Q/DQ is not activation
        srcs = [producer.get(x) for x in data if x and x not in inits]
        fed_dq = any(s is not None and s.op_type == "DequantizeLinear" for s in srcs)
        fed_int8 = any(s is not None and (s.name or "") in int8 for s in srcs)
        if fed_dq or (node.op_type in INT8_FOLLOWERS and fed_int8):
            int8.add(node.name or "")
        elif name not in gpu_nodes:
            out.append(name)
    return out
