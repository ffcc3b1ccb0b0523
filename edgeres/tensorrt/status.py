"""Is TensorRT usable here: `tensorrt_status()` (imports tensorrt only when called; never raises)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from edgeres.tensorrt import engine_build
from edgeres.tensorrt.versions import module_key


@dataclass(frozen=True)
class TrtStatus:
    available: bool
    version: str | None
    reason: str
    device: str | None = None
    compute_capability: str | None = None
    is_jetson: bool = False
    dla_cores: int = 0
    module: str | None = None      # versions.JETSON_MODULES key read from the device tree (None: not a known Jetson)

    def describe(self) -> dict[str, Any]:
        return asdict(self)


def tensorrt_status() -> TrtStatus:
    """Is TensorRT importable and is there a CUDA GPU for it? Never raises."""
    jetson = engine_build.is_jetson()
    try:
        import tensorrt as trt
    except Exception as e:  # noqa: BLE001 - ImportError, or a broken install raising OSError on its .so
        return TrtStatus(False, None, f"TensorRT is not installed ({type(e).__name__}: {e}); install it with "
                         "`pip install tensorrt` on a desktop or use JetPack's python3-libnvinfer on a Jetson",
                         is_jetson=jetson)
    version = str(getattr(trt, "__version__", "unknown"))
    try:
        info = engine_build.runtime_info(trt)
    except Exception as e:  # noqa: BLE001 - no driver, no GPU, no libcudart
        return TrtStatus(False, version, f"TensorRT {version} is installed but no CUDA GPU is usable: {e}",
                         is_jetson=jetson)
    return TrtStatus(True, version, f"TensorRT {version} on {info['device']}", info["device"],
                     info["compute_capability"], bool(info["is_jetson"]), int(info["dla_cores"]),
                     module_key(info.get("model")))
