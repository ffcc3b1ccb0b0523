"""The CPU INT8 artifact: the same INT8 model as the TensorRT Q/DQ ONNX, as an OpenVINO IR for x86 / ARM CPUs.

Why OpenVINO and not ONNX Runtime: ONNX Runtime's CPU Q/DQ fusion does not take the TensorRT-style graph (signed
INT8 activations, no Q after the convs that feed residual adds), so it runs it in float and dequantizes every
weight on every call — slower than FP32 (benchmarks/RESULTS.md). OpenVINO's low-precision transformations fuse
exactly these Q/DQ pairs into INT8 convolutions. The IR is converted from the INT8 ONNX itself (no second
quantization: same scales, same placement), its INT8 weights stay INT8 on disk, and its own gate is top-1
agreement with the fake-quant model's exported graph, run as written, over the evaluation split.
OpenVINO is optional (`pip install 'edgeres[openvino]'`) and imported here only.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from edgeres.errors import BackendUnavailable


def openvino_status() -> tuple[bool, str]:
    """(available, version or why not). Never raises."""
    try:
        import openvino as ov
    except Exception as e:  # noqa: BLE001 - ImportError, or a broken install
        return False, f"OpenVINO is not installed ({type(e).__name__}); pip install 'edgeres[openvino]'"
    return True, ov.get_version()


def export_openvino(onnx_path: str | Path, xml_path: str | Path) -> dict[str, Any]:
    """Convert the INT8 (or FP32) ONNX to an OpenVINO IR at xml_path (+ .bin), written atomically: both files are
    made in a temporary folder beside the destination and moved in, .bin first."""
    ok, why = openvino_status()
    if not ok:
        raise BackendUnavailable(why)
    import onnx
    import openvino as ov

    onnx_path, xml_path = Path(onnx_path), Path(xml_path)
    props = {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}
    model = ov.convert_model(str(onnx_path))
    model.set_rt_info(json.dumps(props, sort_keys=True), "edgeres_meta")
    xml_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{xml_path.stem}.", dir=xml_path.parent))
    try:
        ov.save_model(model, str(tmp / xml_path.name), compress_to_fp16=False)
        os.replace(tmp / xml_path.with_suffix(".bin").name, xml_path.with_suffix(".bin"))
        os.replace(tmp / xml_path.name, xml_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"xml": str(xml_path), "bin_bytes": xml_path.with_suffix(".bin").stat().st_size, "openvino": ov.get_version()}
