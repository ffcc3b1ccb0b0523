"""TensorRT: engine compile per TensorRT version (8.5, 8.6, 10.x, 11.x), sidecar checks, trtexec command
lines, calibration caches for implicit INT8, and the TensorRT runner.

Nothing here imports tensorrt, onnx, onnxruntime or CUDA bindings at import time.
"""
from edgeres.tensorrt.compile import compile_engine, inspect_onnx, plan_compile
from edgeres.tensorrt.options import CompileOptions, Precision, parse_batch, validate_options
from edgeres.tensorrt.sidecar import check_sidecar, read_sidecar, sidecar_path
from edgeres.tensorrt.status import TrtStatus, tensorrt_status
from edgeres.tensorrt.versions import TrtVersion, calib_version_tag, capabilities, parse_version

__all__ = ["CompileOptions", "Precision", "TrtStatus", "TrtVersion", "calib_version_tag", "capabilities",
           "check_sidecar", "compile_engine", "inspect_onnx", "parse_batch", "parse_version", "plan_compile",
           "read_sidecar", "sidecar_path", "tensorrt_status", "validate_options"]
