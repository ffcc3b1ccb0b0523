"""TensorRT's rules for a Q/DQ ONNX model, checked by our own code (`edgeres check model.onnx`).

- every QuantizeLinear / DequantizeLinear is int8 (no uint8), with a zero-point present and exactly 0;
- weights are quantized per output channel (axis 0, one scale per output channel); activations per tensor;
- no custom-domain ops;
- residual Add (two activation inputs): a Q/DQ pair on the identity/shortcut input and none on the
  input coming straight from the conv branch, so TensorRT can fuse conv + add (+ relu) (NVIDIA's
  "Q/DQ layer placement" recommendation). The conv branch is the input with more convs on its path
  from the graph input; in a ResNet that is the block's last conv, the shortcut being identity or a
  single projection conv.
- with a target TensorRT (`trt_version`): the INT8 weight form is one that version documents
  (versions.capabilities(v).int8_weight_forms: FP32 weights behind QuantizeLinear everywhere, INT8 constants into
  DequantizeLinear from TensorRT 10; sources in versions.SOURCES["int8_weight_forms"]).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from edgeres.errors import ArtifactError
from edgeres.tensorrt.versions import FP32_QUANTIZE, INT8_CONSTANTS, capabilities, parse_version

QDQ = ("QuantizeLinear", "DequantizeLinear")
STANDARD_DOMAINS = ("", "ai.onnx")
MIN_OPSET = 13


class Rule(str, Enum):
    OPSET = "opset"
    INT8 = "int8"
    ZERO_POINT = "zero_point"
    WEIGHT_PER_CHANNEL = "weight_per_channel"
    ACTIVATION_PER_TENSOR = "activation_per_tensor"
    CUSTOM_DOMAIN = "custom_domain"
    RESIDUAL_ADD = "residual_add"
    WEIGHT_FORM = "weight_form"


INT8_WEIGHTS_PROP = "edgeres.int8_weight_form"   # metadata key on an ONNX edgeres rewrote into another weight form


@dataclass(frozen=True)
class Violation:
    rule: str
    node: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    def __str__(self) -> str:
        return f"[{self.rule}] {self.node}: {self.message}"


def load_onnx(path: str | Path):
    """Load an ONNX model or raise ArtifactError with one clear line."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"ONNX file not found: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError and friends for junk
        raise ArtifactError(f"{path} is not an ONNX model ({type(e).__name__})") from None
    if not model.graph.node and not model.graph.output:
        raise ArtifactError(f"{path} is not an ONNX model (no graph)")
    _load_external(model, path)
    return model


def _load_external(model, path: Path) -> None:
    """Weights stored beside the model (external data): each file must lie inside the model's folder and exist;
    then they are read in, relative to that folder (never to the current directory)."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    folder = path.resolve().parent
    tensors = [t for t in model.graph.initializer if uses_external_data(t)]
    for t in tensors:
        loc = next((e.value for e in t.external_data if e.key == "location"), "")
        target = (folder / loc).resolve()
        if not loc or folder not in target.parents:
            raise ArtifactError(f"{path}: tensor {t.name}'s external data {loc!r} lies outside the model's folder; "
                                "edgeres reads weights only from beside the model")
        if not target.is_file():
            raise ArtifactError(f"{path}: tensor {t.name}'s external data {loc} is missing beside it")
    if tensors:
        try:
            onnx.load_external_data_for_model(model, str(folder))
        except Exception as e:  # truncated or unreadable data file
            raise ArtifactError(f"{path}: its external data cannot be read ({type(e).__name__})") from None


def tensor_array(tensor, source: str = "model"):
    """A TensorProto's values as a numpy array; one ArtifactError naming the tensor when its data does not fill the
    shape it declares (a hand-edited or truncated model), not numpy's reshape error."""
    from onnx import numpy_helper

    try:
        return numpy_helper.to_array(tensor)
    except (ValueError, TypeError) as e:
        raise ArtifactError(f"{source}: tensor {tensor.name!r} declares shape {list(tensor.dims)} but its data does "
                            f"not fit it ({str(e).splitlines()[0][:120]})") from None


class GraphIndex:
    """Constant values, producers and consumers of a graph's tensors."""

    def __init__(self, model, source: str = "model"):
        g = model.graph
        self.nodes = list(g.node)
        self.const: dict[str, Any] = {t.name: tensor_array(t, source) for t in g.initializer}
        self.const_dtype: dict[str, int] = {t.name: t.data_type for t in g.initializer}
        self.producer: dict[str, Any] = {}
        self.consumers: dict[str, list] = {}
        for node in self.nodes:
            for out in node.output:
                self.producer[out] = node
            for inp in node.input:
                self.consumers.setdefault(inp, []).append(node)
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.name == "value":
                        self.const[node.output[0]] = tensor_array(attr.t, source)
                        self.const_dtype[node.output[0]] = attr.t.data_type

    def is_const(self, name: str) -> bool:
        if name in self.const:
            return True
        node = self.producer.get(name)
        # a weight fed through QuantizeLinear (NNCF's Q/DQ pairs export) or a Cast/Identity of a constant
        if node is not None and node.op_type in QDQ + ("Identity", "Cast", "Reshape", "Transpose"):
            return self.is_const(node.input[0])
        return False

    def conv_depth(self) -> dict[str, int]:
        """For every tensor: the most convs on any path from the graph input (nodes are topologically sorted)."""
        depth: dict[str, int] = {}
        for node in self.nodes:
            d = max((depth.get(i, 0) for i in node.input if i and not self.is_const(i)), default=0)
            d += 1 if node.op_type in ("Conv", "ConvTranspose") else 0
            for out in node.output:
                depth[out] = d
        return depth

    def strip_qdq(self, name: str):
        """The node producing `name` once Q/DQ nodes are skipped."""
        node = self.producer.get(name)
        while node is not None and node.op_type in QDQ:
            node = self.producer.get(node.input[0])
        return node


def _attr(node, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return a.i if a.type == a.INT else a
    return default


def _node_name(node) -> str:
    return node.name or f"{node.op_type}({node.output[0]})"


def _check_qdq(g: GraphIndex, node, out: list[Violation]) -> None:
    import numpy as np
    from onnx import TensorProto

    name = _node_name(node)
    if len(node.input) < 3 or not node.input[2]:
        out.append(Violation(Rule.ZERO_POINT.value, name, "zero-point missing (TensorRT needs an explicit int8 0)"))
    else:
        zp_name = node.input[2]
        zp = g.const.get(zp_name)
        dtype = g.const_dtype.get(zp_name)
        if zp is None:
            out.append(Violation(Rule.ZERO_POINT.value, name, "zero-point is not a constant"))
        else:
            if dtype != TensorProto.INT8:
                out.append(Violation(Rule.INT8.value, name,
                                     f"zero-point type is {TensorProto.DataType.Name(dtype)}, not INT8"))
            if np.any(np.asarray(zp) != 0):
                out.append(Violation(Rule.ZERO_POINT.value, name, f"zero-point is not 0 (found {np.unique(zp)[:4]})"))
    scale = g.const.get(node.input[1]) if len(node.input) > 1 else None
    if scale is None:
        out.append(Violation(Rule.ZERO_POINT.value, name, "scale is not a constant"))
        return
    scale = np.asarray(scale)
    x = node.input[0]
    # a weight: the Q of a constant, or the DQ of such a Q / of an int8 initializer, feeding conv/gemm weights
    is_weight = g.is_const(x)
    if is_weight:
        weight = _weight_of(g, node)
        axis = _attr(node, "axis", 1)
        if scale.size <= 1:
            out.append(Violation(Rule.WEIGHT_PER_CHANNEL.value, name, "weight quantized per tensor, not per channel"))
        elif axis != 0:
            out.append(Violation(Rule.WEIGHT_PER_CHANNEL.value, name, f"per-channel axis is {axis}, not 0"))
        elif weight is not None and scale.size != weight.shape[0]:
            out.append(Violation(Rule.WEIGHT_PER_CHANNEL.value, name,
                                 f"{scale.size} scales for {weight.shape[0]} output channels"))
    elif scale.size != 1:
        out.append(Violation(Rule.ACTIVATION_PER_TENSOR.value, name,
                             f"activation quantized with {scale.size} scales, not per tensor"))


def _weight_of(g: GraphIndex, node):
    name = node.input[0]
    while name not in g.const:
        prod = g.producer.get(name)
        if prod is None:
            return None
        name = prod.input[0]
    return g.const[name]


def _check_residual_adds(g: GraphIndex, out: list[Violation]) -> None:
    depth = g.conv_depth()
    for node in g.nodes:
        if node.op_type != "Add" or len(node.input) != 2 or any(g.is_const(i) for i in node.input):
            continue
        a, b = node.input
        if depth.get(a, 0) == depth.get(b, 0):
            continue  # no conv branch / shortcut distinction: not a residual add
        main, short = (a, b) if depth.get(a, 0) > depth.get(b, 0) else (b, a)
        main_src = g.strip_qdq(main)
        if main_src is None or main_src.op_type != "Conv":
            continue
        name = _node_name(node)
        prod_main, prod_short = g.producer.get(main), g.producer.get(short)
        if prod_main is not None and prod_main.op_type in QDQ:
            out.append(Violation(Rule.RESIDUAL_ADD.value, name,
                                 f"Q/DQ on the conv-branch input (from {_node_name(main_src)}): TensorRT cannot "
                                 "fuse conv + add; quantize only the shortcut input"))
        if prod_short is None or prod_short.op_type != "DequantizeLinear":
            out.append(Violation(Rule.RESIDUAL_ADD.value, name,
                                 f"shortcut input {short!r} has no Q/DQ: TensorRT needs it int8 to fuse conv + add"))


def int8_weight_form(model) -> str | None:
    """How a Q/DQ ONNX stores its weights: INT8_CONSTANTS (INT8 initializers into DequantizeLinear), FP32_QUANTIZE
    (float initializers through QuantizeLinear), or None (no quantized weights)."""
    from onnx import TensorProto

    inits = {t.name: t for t in model.graph.initializer}
    forms = set()
    for node in model.graph.node:
        t = inits.get(node.input[0]) if node.input else None
        if t is None or len(t.dims) < 2:
            continue
        if node.op_type == "DequantizeLinear" and t.data_type == TensorProto.INT8:
            forms.add(INT8_CONSTANTS)
        elif node.op_type == "QuantizeLinear" and t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16):
            forms.add(FP32_QUANTIZE)
    return INT8_CONSTANTS if INT8_CONSTANTS in forms else FP32_QUANTIZE if forms else None


def _check_weight_form(model, trt_version, out: list[Violation]) -> None:
    form = int8_weight_form(model)
    caps = capabilities(trt_version)
    if form is not None and form not in caps.int8_weight_forms:
        out.append(Violation(Rule.WEIGHT_FORM.value, "model",
                             f"weights stored as {form}: TensorRT {parse_version(trt_version)} documents only "
                             f"{' / '.join(caps.int8_weight_forms)} (use the .fp32w.onnx copy edgeres writes beside "
                             "the device plan)"))


def check_model(model, *, trt_version: str | None = None, source: str = "model") -> list[Violation]:
    """All rule violations of a loaded onnx.ModelProto (empty list: TensorRT-ready), for `trt_version` when given.
    `source`: the model's name in an error."""
    out: list[Violation] = []
    opset = max((o.version for o in model.opset_import if o.domain in STANDARD_DOMAINS), default=0)
    if opset < MIN_OPSET:
        out.append(Violation(Rule.OPSET.value, "model", f"opset {opset} < {MIN_OPSET} (per-channel Q/DQ needs 13)"))
    g = GraphIndex(model, source)
    has_qdq = False
    for node in g.nodes:
        if node.domain not in STANDARD_DOMAINS:
            out.append(Violation(Rule.CUSTOM_DOMAIN.value, _node_name(node),
                                 f"op {node.op_type} from custom domain {node.domain!r}"))
        if node.op_type in QDQ:
            has_qdq = True
            _check_qdq(g, node, out)
    if has_qdq:
        _check_residual_adds(g, out)
        if trt_version is not None:
            _check_weight_form(model, trt_version, out)
    return out


def check_onnx(path: str | Path, *, trt_version: str | None = None) -> list[Violation]:
    """Check an ONNX file against TensorRT's Q/DQ rules (for `trt_version` when given). Not ONNX -> ArtifactError;
    a TensorRT version edgeres does not target -> ConfigError."""
    return check_model(load_onnx(path), trt_version=trt_version, source=str(path))


def count_qdq(path_or_model) -> dict[str, int]:
    model = load_onnx(path_or_model) if isinstance(path_or_model, (str, Path)) else path_or_model
    counts = {"QuantizeLinear": 0, "DequantizeLinear": 0}
    for node in model.graph.node:
        if node.op_type in counts:
            counts[node.op_type] += 1
    return counts
