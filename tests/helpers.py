"""Small helpers shared by test files (imported as `from helpers import ...`; tests/ is on sys.path)."""
import warnings


def export_tiny_onnx(model, path, shape=(1, 3, 32, 32), dynamic=True):
    """FP32 ONNX via the TorchScript exporter: input "input", output "logits", optional dynamic batch."""
    import torch

    with warnings.catch_warnings():  # the exporter's deprecation and constant-folding chatter
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), torch.randn(*shape), str(path), dynamo=False, input_names=["input"],
                          output_names=["logits"],
                          dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}} if dynamic else None)
    return path
