"""The torch device every torch stage runs on: decided once (`--device`, default the first GPU torch sees, else the
CPU), recorded in each stage record and the report, and used by train, the fold check, PTQ statistics, QAT,
evaluation and the torch latency rows.

Under torchrun each process takes the GPU of its LOCAL_RANK (`cuda` and the default both mean that one).
"""
from __future__ import annotations

import os
import re
from typing import Any

from edgeres.errors import ConfigError

DEVICE_HELP = "cpu | cuda | cuda:N (default: the first GPU torch sees, else the CPU; under torchrun the process's own)"
_SPEC = re.compile(r"cuda(?::(\d{1,3}))?")


def resolve(spec: str | None = None):
    """'cpu', 'cuda', 'cuda:N' or None/'auto' -> torch.device, refused in one line when it cannot be had."""
    import torch

    if isinstance(spec, torch.device):
        return spec
    text = (spec or "auto").strip().lower()
    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if text == "auto":
        return torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    m = _SPEC.fullmatch(text)
    if m is None:
        raise ConfigError(f"--device {spec!r}: expected cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise ConfigError(f"--device {spec}: torch {torch.__version__} ({build}) sees no CUDA GPU; use --device cpu")
    index = int(m.group(1)) if m.group(1) is not None else local
    count = torch.cuda.device_count()
    if index >= count:
        raise ConfigError(f"--device {spec}: torch sees {count} GPU(s) (cuda:0..cuda:{count - 1})")
    return torch.device(f"cuda:{index}")


def is_cuda(device) -> bool:
    return str(device).startswith("cuda")


def describe(device) -> dict[str, Any]:
    """What a record says about where torch ran."""
    info: dict[str, Any] = {"torch_device": str(device)}
    if is_cuda(device):
        import torch

        info["torch_device_name"] = torch.cuda.get_device_name(device)
    return info


def synchronize(device) -> None:
    """Wait for the device's queued work (a no-op on the CPU): timings must include the work they time."""
    if is_cuda(device):
        import torch

        torch.cuda.synchronize(device)


def exact_math(device):
    """A context in which CUDA convolutions and matmuls are plain FP32 (no TF32): for checks that compare two
    models' logits closely (the BN fold). On the CPU nothing changes."""
    import contextlib

    if not is_cuda(device):
        return contextlib.nullcontext()
    return _no_tf32()


class _no_tf32:
    def __enter__(self):
        import torch

        self._saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        return self

    def __exit__(self, *exc):
        import torch

        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self._saved
        return False
