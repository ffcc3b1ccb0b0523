"""One small error family. The CLI turns EdgeresError (and only it) into a one-line message."""


class EdgeresError(Exception):
    """Base of every error a user can cause or fix."""


class ConfigError(EdgeresError):
    """Bad recipe, option or combination of options."""


class DataError(EdgeresError):
    """Missing, empty, corrupt or inconsistent dataset."""


class CheckpointError(EdgeresError):
    """A checkpoint that cannot be read or does not fit the model."""


class ArtifactError(EdgeresError):
    """An artifact (ONNX, engine, bundle) that is missing, malformed or mismatched."""


class GateError(EdgeresError):
    """A stage's check against its parent failed."""


class BackendUnavailable(EdgeresError):
    """An optional backend (TensorRT, CUDA, NNCF, ...) is not installed or has no device."""
