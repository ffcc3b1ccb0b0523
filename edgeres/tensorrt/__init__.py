"""TensorRT: engine compile per TensorRT version (8.5, 8.6, 10.x, 11.x), sidecar checks, trtexec command
lines, calibration caches for implicit INT8, and the TensorRT runner; one module each, imported by name
(`from edgeres.tensorrt.compile import compile_engine`).

Nothing here imports tensorrt, onnx, onnxruntime or CUDA bindings at import time.
"""
