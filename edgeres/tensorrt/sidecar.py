"""The engine's sidecar JSON (`model.plan.json`) and the check of an engine against this machine.

TensorRT refuses a mismatched engine with "version tag does not match" or a segfault; we refuse it first, in one
line, saying which platform (CPU architecture, OS, Jetson or not), TensorRT and GPU built it and how to rebuild
(engine_build.sidecar_mismatch; "Serialized engines are not portable across platforms", NVIDIA Support Matrix).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from edgeres.errors import ArtifactError, BackendUnavailable
from edgeres.io import atomic_write_json, sha256_file
from edgeres.tensorrt.engine_build import platform_info, sidecar_mismatch
from edgeres.tensorrt.status import tensorrt_status


def sidecar_path(engine_path: str | Path) -> Path:
    return Path(f"{engine_path}.json")


def trtexec_script_path(engine_path: str | Path) -> Path:
    return Path(f"{engine_path}.trtexec.sh")


def write_sidecar(engine_path: str | Path, info: dict[str, Any]) -> Path:
    return atomic_write_json(sidecar_path(engine_path), info)


def read_sidecar(engine_path: str | Path) -> dict[str, Any]:
    import json

    path = sidecar_path(engine_path)
    if not path.is_file():
        raise ArtifactError(f"{engine_path} has no sidecar {path.name}: edgeres cannot tell which TensorRT and GPU "
                            "built it. Rebuild it with `edgeres compile` (which writes the sidecar)")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(
            f"sidecar {path} is not valid JSON ({e}); rebuild the engine with `edgeres compile`") from None
    if not isinstance(data, dict) or "trt_version" not in data:
        raise ArtifactError(f"sidecar {path} has no trt_version; rebuild the engine with `edgeres compile`")
    return data


def check_sidecar(engine_path: str | Path, runtime: dict[str, Any] | None = None, *,
                  verify_hash: bool = True) -> dict[str, Any]:
    """Return the sidecar if the engine can run here; ArtifactError with a plain explanation otherwise.

    `runtime` is engine_build.runtime_info() of the machine that will run the engine (queried when None).
    """
    engine_path = Path(engine_path)
    if not engine_path.is_file():
        raise ArtifactError(f"engine {engine_path} does not exist")
    sidecar = read_sidecar(engine_path)
    if verify_hash and sidecar.get("engine_sha256") and sha256_file(engine_path) != sidecar["engine_sha256"]:
        raise ArtifactError(f"{engine_path} does not match its sidecar (sha256 differs): the engine was replaced "
                            "after it was built; rebuild it with `edgeres compile`")
    if runtime is None:
        runtime = current_runtime()
    problem = sidecar_mismatch({**sidecar, "engine": engine_path.name}, runtime)
    if problem:
        raise ArtifactError(problem)
    return sidecar


def current_runtime() -> dict[str, Any]:
    status = tensorrt_status()
    if not status.available:
        raise BackendUnavailable(status.reason)
    return {**platform_info(), "trt_version": status.version, "device": status.device,
            "compute_capability": status.compute_capability, "is_jetson": status.is_jetson,
            "dla_cores": status.dla_cores}
