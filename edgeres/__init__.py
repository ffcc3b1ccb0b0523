"""edgeres: from a folder of images to a verified INT8 ResNet on Jetson and desktop GPUs.

Importing this package is cheap: torch, onnx, nncf and tensorrt are imported by the functions that use them.
"""
__version__ = "0.1.0"
