"""The environment a result was measured in: versions, device, threads."""
from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from typing import Any

PACKAGES = ("edgeres", "torch", "nncf", "onnx", "onnxruntime", "openvino", "numpy", "tensorrt", "polygraphy")


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def environment() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "packages": package_versions(),
    }
    if "torch" in sys.modules:  # only describe torch's device when torch is already loaded
        torch = sys.modules["torch"]
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["device"] = torch.cuda.get_device_name(0)
        else:
            info["device"] = "cpu"
    kernels = sys.modules.get("edgeres.nncf_kernels")
    used = kernels.mode() if kernels is not None else None   # which NNCF CPU kernels quantized, once prepared
    if used:
        info["nncf_kernels"] = used
    return info
