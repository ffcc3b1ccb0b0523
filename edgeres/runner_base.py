"""What every runner shares (edgeres/runners.py: ONNX Runtime, OpenVINO, torch; edgeres/tensorrt/runner.py:
TensorRT): one checked `infer(x) -> logits`. A low module, so the TensorRT runner needs nothing else of edgeres's."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeres.errors import ArtifactError, EdgeresError


def _first_line(e: BaseException) -> str:
    return ((str(e).strip().splitlines() or [type(e).__name__])[0])[:200]


def _check_batch(x: np.ndarray, shape: tuple[int | None, ...] | None, what: str) -> np.ndarray:
    """float32, contiguous, NCHW, and the C/H/W the model expects (when it says)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 4:
        raise ArtifactError(f"{what} expects NCHW input, got an array of shape {tuple(x.shape)}")
    if shape is not None:
        for got, want in zip(x.shape[1:], shape):
            if want is not None and got != want:
                raise ArtifactError(f"{what} expects input [N, {', '.join(str(s) for s in shape)}], "
                                    f"got {list(x.shape)}")
    return x


class Runner:
    """What every backend shares. `infer(x)` checks the batch once, here (float32 NCHW, the C/H/W the model
    expects, a fixed batch size), then calls the backend's `infer_impl`; a runner is a context manager that closes
    itself. Subclasses set name, device, precision, input_shape, batch_dim, path and implement infer_impl/close."""

    name = ""
    device = "cpu"
    input_shape: tuple[int | None, ...] | None = None
    batch_dim: int | None = None
    path: str | None = None

    def check(self, x: np.ndarray) -> np.ndarray:
        what = Path(self.path).name if self.path else f"{self.name} model"
        x = _check_batch(x, self.input_shape, what)
        if self.batch_dim is not None and x.shape[0] != self.batch_dim:
            raise ArtifactError(f"{what} has a fixed batch of {self.batch_dim}; cannot run a batch of {x.shape[0]}")
        return x

    def infer(self, x: np.ndarray) -> np.ndarray:
        """Checked input in, checked logits out; whatever the backend raises becomes one ArtifactError line that
        names the model and the input it expected."""
        x = self.check(x)
        try:
            out = self.infer_impl(x)
        except EdgeresError:
            raise
        except Exception as e:   # pybind/runtime errors of ONNX Runtime, OpenVINO, TensorRT, torch
            raise ArtifactError(f"{self._what()} failed on {self.name} with input {list(x.shape)} (it expects "
                                f"{self._expects()}): {_first_line(e)}") from None
        out = np.asarray(out)
        if out.ndim != 2 or out.shape[0] != x.shape[0] or not np.issubdtype(out.dtype, np.floating):
            raise ArtifactError(f"{self._what()} returned {out.dtype} {list(out.shape)} for a batch of {x.shape[0]}; "
                                f"edgeres needs float logits [N, classes]")
        return out

    def _what(self) -> str:
        return Path(self.path).name if self.path else f"{self.name} model"

    def _expects(self) -> str:
        dims = ["N" if self.batch_dim is None else str(self.batch_dim),
                *(["C", "H", "W"] if self.input_shape is None else
                  [("?" if d is None else str(d)) for d in self.input_shape])]
        return f"float32 [{', '.join(dims)}]"

    def infer_impl(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
