"""Memory known before it is asked for: what running a model takes, counted from its architecture, compared with what
the machine has, so a command that cannot fit refuses in one line instead of swapping, being killed, or dying in
torch's allocator.

The count is a forward pass on PyTorch's meta device (shapes only, no data: nothing is allocated): the parameters and
buffers, plus the peak of the activations alive at once during an inference forward pass (each tensor counted from
the op that makes it until the last reference to it goes). `benchmarks/bench_memory.py` compares it with the
measured peak RSS.
"""
from __future__ import annotations

import json
import os
import resource
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeres.checkpoint import check_meta, read_checkpoint
from edgeres.errors import ArtifactError, ConfigError
from edgeres.io import require_regular_file
from edgeres.onnx_info import read_metadata

GIB = 1 << 30


@dataclass(frozen=True)
class Estimate:
    arch: str
    input_size: int
    batch: int
    num_classes: int
    in_channels: int
    params_bytes: int        # parameters and buffers
    activations_bytes: int   # the input and the peak of the activations alive at once (inference)

    @property
    def total_bytes(self) -> int:
        return self.params_bytes + self.activations_bytes

    def to_dict(self) -> dict[str, Any]:
        return {"arch": self.arch, "input_size": self.input_size, "batch": self.batch,
                "num_classes": self.num_classes, "in_channels": self.in_channels, "params_bytes": self.params_bytes,
                "activations_bytes": self.activations_bytes, "total_bytes": self.total_bytes}


def _peak_tracker():
    """A TorchDispatchMode counting the bytes of the tensors ops create while they live (views share their base's
    storage and are not counted again)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class PeakBytes(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.live = self.peak = 0
            self.seen: set[int] = set()

        def _gone(self, key: int, n: int) -> None:
            self.live -= n
            self.seen.discard(key)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t._base is None and id(t) not in self.seen:
                    n = t.untyped_storage().nbytes()
                    self.seen.add(id(t))
                    self.live += n
                    weakref.finalize(t, self._gone, id(t), n)
            self.peak = max(self.peak, self.live)
            return out

    return PeakBytes()


def estimate(arch: str, *, input_size: int, batch: int = 1, num_classes: int = 1000, in_channels: int | None = None,
             options: dict[str, Any] | None = None) -> Estimate:
    """The memory of one inference forward pass of `arch`, counted on the meta device (nothing allocated)."""
    import torch

    from edgeres.models import create_model, get_spec

    cin = in_channels or get_spec(arch).in_channels
    with torch.device("meta"):
        model = create_model(arch, num_classes=num_classes, in_channels=cin, options=options).eval()
    params = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    x = torch.empty(batch, cin, input_size, input_size, device="meta")
    with torch.no_grad(), _peak_tracker() as tracker:
        model(x)
    return Estimate(arch, input_size, batch, num_classes, cin, int(params),
                    int(x.numel() * x.element_size() + tracker.peak))


def _read_int(path: str) -> int | None:
    try:
        return int(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None   # absent, or "max" (no limit)


def _proc_kib(path: str, key: str) -> int | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def available(device: str | None = "cpu") -> int | None:
    """Bytes this process may still take: the device's free memory on CUDA; on the CPU the least of MemAvailable,
    the cgroup's limit less its usage, and the address-space limit (ulimit -v) less this process's size. None where
    none of these can be read."""
    if device and str(device).startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.mem_get_info(torch.device(device))[0])
        return None
    found = []
    mem = _proc_kib("/proc/meminfo", "MemAvailable")
    if mem is None:
        try:
            import psutil

            mem = int(psutil.virtual_memory().available)
        except ImportError:
            pass
    if mem is not None:
        found.append(mem)
    for limit, usage in (("memory.max", "memory.current"),                                  # cgroup v2
                         ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):   # cgroup v1
        lim, used = _read_int(f"/sys/fs/cgroup/{limit}"), _read_int(f"/sys/fs/cgroup/{usage}")
        if lim is not None and used is not None and lim < 1 << 60:   # v1 says "no limit" with a huge number
            found.append(max(lim - used, 0))
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    size = _proc_kib(f"/proc/{os.getpid()}/status", "VmSize")
    if soft != resource.RLIM_INFINITY and size is not None:
        found.append(max(soft - size, 0))
    return min(found) if found else None


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}" if n < 10 * GIB else f"{n / GIB:.0f}"


def check(arch: str, *, input_size: int, batch: int = 1, num_classes: int = 1000, in_channels: int | None = None,
          options: dict[str, Any] | None = None, device: str | None = "cpu",
          lower: str = "--input-size or --batch-size") -> Estimate:
    """Refuse, in one line with the numbers, to run `arch` where its estimate exceeds the memory available;
    the estimate otherwise. `lower`: the options that lower it, as the command spells them."""
    need = estimate(arch, input_size=input_size, batch=batch, num_classes=num_classes, in_channels=in_channels,
                    options=options)
    require(need.total_bytes, f"{arch} at {input_size} px, batch {batch}, {num_classes} classes", device=device,
            lower=lower)
    return need


def require(need: int, what: str, *, device: str | None = "cpu", lower: str) -> None:
    """Refuse in one line when `need` bytes (for `what`) exceed what is available on `device`."""
    have = available(device)
    if have is not None and need > have:
        where = "" if not device or str(device) == "cpu" else f" on {device}"
        raise ConfigError(f"{what} needs ~{_gib(need)} GiB{where}, {_gib(have)} GiB available; lower {lower}")


def artifact_model(path: str | Path) -> dict[str, Any] | None:
    """arch, input_size, num_classes, in_channels and arch_options of an edgeres checkpoint (.pt/.pth) or ONNX, from
    its metadata; None for anything else, or where the artifact does not name an architecture edgeres knows."""
    from edgeres.models import ARCHS

    suffix = Path(path).suffix.lower()
    if suffix in (".pt", ".pth", ".onnx"):
        require_regular_file(path, "artifact", ArtifactError)   # a FIFO or a folder: the runner's own words
    meta: dict[str, Any] | None = None
    if suffix in (".pt", ".pth"):
        _, m, _ = read_checkpoint(path)
        meta = m.to_dict() if m is not None else None
    elif suffix == ".onnx":   # the ModelMeta edgeres's export writes (export.metadata_props)
        try:
            meta = json.loads(read_metadata(path).get("edgeres.meta", "null"))
        except ValueError:
            meta = None
        meta = check_meta(meta, str(path)) if isinstance(meta, dict) else None
    keys = ("arch", "input_size", "num_classes", "in_channels")
    if not meta or not all(meta.get(k) for k in keys) or meta["arch"] not in ARCHS:
        return None
    return {**{k: meta[k] for k in keys}, "options": dict(meta.get("arch_options") or {})}


def check_artifact(path: str | Path, *, batch: int, input_size: int | None = None, device: str | None = "cpu",
                   lower: str = "--batch-size") -> Estimate | None:
    """check() for the model an artifact holds, at its own input size unless `input_size` is given; None where the
    artifact does not say what it holds (a foreign ONNX, a TensorRT engine)."""
    model = artifact_model(path)
    if model is None:
        return None
    return check(model["arch"], input_size=input_size or model["input_size"], batch=batch,
                 num_classes=model["num_classes"], in_channels=model["in_channels"], options=model["options"],
                 device=device, lower=lower)
