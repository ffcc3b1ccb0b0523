"""What an ONNX file says about itself: its metadata_props (edgeres's preprocessing contract) and its input, Q/DQ
and INT8 weight form. A low module: the export, CPU, TensorRT and runner modules all read ONNX files through it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgeres.check import int8_weight_form, load_onnx
from edgeres.errors import ArtifactError
from edgeres.io import sha256_file
from edgeres.tensorrt.dla import gpu_layers


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata_props of an ONNX file, key -> value."""
    return {p.key: p.value for p in load_onnx(path).metadata_props}


@dataclass(frozen=True)
class OnnxInfo:
    input_name: str
    input_shape: tuple[int | None, ...]   # None for a symbolic dimension
    has_qdq: bool
    sha256: str
    weight_form: str | None = None            # check.int8_weight_form: INT8 constants or FP32 behind QuantizeLinear
    dla_gpu_layers: tuple = ()                # dla.gpu_layers: the nodes NVIDIA's DLA table excludes

    @property
    def dynamic_batch(self) -> bool:
        return self.input_shape[0] is None

    @property
    def chw(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.input_shape[1:])  # type: ignore[arg-type]


def inspect_onnx(path: str | Path) -> OnnxInfo:
    """Input name and shape, and whether the graph carries Q/DQ nodes (explicit INT8)."""

    path = Path(path)
    model = load_onnx(path)
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise ArtifactError(f"{path} has {len(inputs)} inputs; edgeres engines take one image tensor")
    dims = inputs[0].type.tensor_type.shape.dim
    shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims)
    if len(shape) != 4 or any(d is None for d in shape[1:]):
        raise ArtifactError(f"{path} input {inputs[0].name} has shape {shape}; expected [N, C, H, W] with fixed "
                            "C, H, W")
    qdq = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)
    return OnnxInfo(inputs[0].name, shape, qdq, sha256_file(path), int8_weight_form(model),
                    tuple(gpu_layers(model)))
