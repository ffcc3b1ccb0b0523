"""NNCF's CPU quantization kernels: by default edgeres's eager ones (nothing to compile), NNCF's C++ ones on request.

NNCF's CPU "kernels" (quantize forward and backward for QAT and calibration) are a C++ extension that only calls
ATen operators, JIT-compiled on first use: 31-35 s on 2 cores (two translation units that include all of
<torch/torch.h>, compiled without optimisation), the slowest part of a fresh `make demo`. `EagerQuantizedFunctions`
below makes the same ATen calls, in the same order, from Python: bit-identical results (forward and backward,
float32/float16/bfloat16; tests/test_nncf_kernels.py compares them with the compiled extension), the same speed on a
ResNet (the work is in the operators, not the ~15 calls per quantizer), and no compiler, no cache, no wait.
NNCF's own pure-torch fallback, `ReferenceQuantizedFunctions`, is not that: it goes through `torch.compile`
(inductor compiles C++ on the first batch of every new shape), about 2x slower over a build. On a GPU, NNCF's CUDA
kernels are real CUDA code, still compiled by NNCF on first use: `prepare` points that build at edgeres's folder for
the environment and lifts NNCF's 60 s limit (an nvcc build takes longer), unless the user set either.

`EDGERES_NNCF_KERNELS` = `eager` (default) | `extension` (NNCF's compiled C++ kernels) | `reference` (NNCF's
`torch.compile` fallback). For `extension`, since NNCF gives up on its compile after 60 s and a compile that is killed
leaves torch's `lock` file behind (which makes every later run wait forever or fail), edgeres:

- builds the extension in its own cache folder (`~/.cache/edgeres/torch_extensions/<environment>`, one per Python
  environment, or `$TORCH_EXTENSIONS_DIR` when the user set one), so it fights neither other tools over
  `~/.cache/torch_extensions` nor another venv over one build;
- serialises builds with an `flock` (released by the kernel when a process dies, so it can never go stale), and
  under that lock removes torch's own `lock` file, which only a killed build can have left there;
- compiles in a child process with a generous timeout (`EDGERES_NNCF_BUILD_TIMEOUT`, default 900 s) and a
  progress line; on timeout the whole process group is killed;
- falls back to the eager kernels (same results) when the extension cannot be had, and says so in one line.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from edgeres.errors import ConfigError

MODE_ENV = "EDGERES_NNCF_KERNELS"            # eager (default) | extension | reference
MODES = ("eager", "extension", "reference")
TIMEOUT_ENV = "EDGERES_NNCF_BUILD_TIMEOUT"   # seconds for the one-off compile
DEFAULT_TIMEOUT_S = 900
EXTENSION = "quantized_functions_cpu"

_state: dict[str, str] = {}

_BUILD = ("import logging, nncf; nncf.set_log_level(logging.ERROR)\n"
          "from nncf.torch.quantization.extensions import QuantizedFunctionsCPULoader as L\n"
          "L.load()\n")


def extensions_root() -> Path:
    """$TORCH_EXTENSIONS_DIR when the user set one, else one folder per Python environment (its sys.prefix): the
    build is specific to that environment's torch and include paths, so two venvs never rebuild over each other."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    import hashlib

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    env = hashlib.sha256(os.path.realpath(sys.prefix).encode()).hexdigest()[:12]
    return cache / "edgeres" / "torch_extensions" / env


@contextlib.contextmanager
def _flock(path: Path, on_wait: Callable[[str], None]) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            on_wait("waiting for another edgeres process that is building NNCF's kernels ...")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _timeout_s() -> float:
    raw = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"{TIMEOUT_ENV} must be a number of seconds, got {raw!r}") from None


def _compile(build_dir: Path, say: Callable[[str], None]) -> str | None:
    """Build the extension in a child process; None on success, else the reason."""
    say("preparing NNCF's C++ quantization kernels (first use on this machine; about 1-2 minutes) ...")
    env = {**os.environ, "NNCF_EXTENSION_LOAD_TIMEOUT": "0", "NNCF_CI": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _BUILD], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True, text=True)
    try:
        out, _ = proc.communicate(timeout=_timeout_s())
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)   # the compiler children too, not only python
        proc.communicate()
        (build_dir / "lock").unlink(missing_ok=True)
        return f"the compile took longer than {_timeout_s():.0f} s ({TIMEOUT_ENV})"
    if not _built(build_dir):
        tail = [ln for ln in (out or "").splitlines() if ln.strip()][-1:] or [f"exit code {proc.returncode}"]
        return f"the compile failed: {tail[0][:200]}"
    return None


def _built(build_dir: Path) -> bool:
    return (build_dir / f"{EXTENSION}.so").is_file()


def _sum_like(target, ref):
    # as the C++ kernel does it, quirk included: the test is on the *target's* size, so a per-tensor range's gradient
    # leaves here summed over the size-1 dimensions only, and autograd sums the rest (same order, same bits)
    if target.numel() == 1:
        return target.sum().view_as(ref)
    for dim in range(ref.dim()):
        if ref.size(dim) == 1:
            target = target.sum(dim, keepdim=True)
    return target


class EagerQuantizedFunctions:
    """NNCF's `Quantize_forward` / `Quantize_backward` CPU interface, made of the ATen calls its C++ kernels make.

    `input_low` / `input_range` are the quantizer's range (per tensor or per channel, broadcastable to the input);
    the forward clamps to it, snaps to `levels` steps and scales back (fake quantization); the backward is NNCF's
    straight-through estimator with the range's gradient. Scalars enter as 0-dim tensors of the input's dtype, as
    the C++ template's `scalar_t` does: `255 / t` in Python is `reciprocal(t) * 255`, not a division, and differs
    from the kernel in the last bit."""

    @staticmethod
    def Quantize_forward(input_, input_low, input_range, levels):   # noqa: N802 (NNCF's names)
        scale = input_range.new_tensor(levels - 1).div(input_range)
        out = input_.minimum(input_low + input_range).maximum(input_low)
        zero_point = input_low.neg().mul(scale).round_()
        out -= input_low
        out *= scale
        out -= zero_point
        return out.round_().div_(scale)

    @staticmethod
    def Quantize_backward(grad_output, input_, input_low, input_range, levels, level_low, level_high,   # noqa: N802
                          is_asymmetric=False):
        out = EagerQuantizedFunctions.Quantize_forward(input_, input_low, input_range, levels)
        alpha = input_.new_tensor(level_low).div(input_.new_tensor(level_high))
        mask_hi = input_.gt(input_low + input_range)
        mask_lo = input_.lt(input_low)
        err = out.sub(input_).mul_(input_range.new_tensor(1).div(input_range))
        err.masked_fill_(mask_hi, 1).masked_fill_(mask_lo, alpha).mul_(grad_output)
        grad_range = _sum_like(err, input_range)
        outside = mask_hi.add_(mask_lo)
        grad_input = grad_output.clone().masked_fill_(outside, 0)
        if is_asymmetric:
            grad_low = grad_output.clone().masked_fill_(outside.logical_not(), 0)
            return [grad_input, _sum_like(grad_low, input_low), grad_range]
        return [grad_input, input_low.new_empty(input_low.shape).requires_grad_(), grad_range]   # unused by NNCF


def wanted_mode() -> str:
    """The kernels EDGERES_NNCF_KERNELS asks for (ConfigError for any other value; `build --int8` asks first)."""
    mode = os.environ.get(MODE_ENV, "eager") or "eager"
    if mode not in MODES:
        raise ConfigError(f"{MODE_ENV} must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def prepare(say: Callable[[str], None] | None = None) -> str:
    """Make NNCF's CPU quantization kernels ready in this process; returns "eager", "extension" or "reference"."""
    if "mode" in _state:
        return _state["mode"]
    say = say or (lambda msg: print(msg, file=sys.stderr, flush=True))
    wanted = wanted_mode()
    # On a GPU NNCF still compiles its CUDA kernels itself, on first use (custom CUDA code, not ATen calls): into
    # edgeres's folder for this environment and without NNCF's 60 s limit, which an nvcc build exceeds
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(extensions_root()))
    os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "0")
    from nncf.torch.quantization import extensions as ext

    if wanted == "reference":
        from nncf.torch.quantization.reference import ReferenceQuantizedFunctions

        return _use(ext, ReferenceQuantizedFunctions, wanted)
    if wanted == "extension":
        build_dir = Path(ext.QuantizedFunctionsCPULoader.get_build_dir())
        with _flock(build_dir.parent / f"{build_dir.name}.edgeres-lock", say):
            # we hold the only build lock: a torch `lock` file here can only be left by a killed build
            (build_dir / "lock").unlink(missing_ok=True)
            reason = None if _built(build_dir) else _compile(build_dir, say)
            if reason is None:   # built: loading it only links the .so
                return _use(ext, ext.QuantizedFunctionsCPULoader.load(), wanted)
        say(f"NNCF's C++ kernels unavailable ({reason}); using edgeres's eager kernels (same results)")
    return _use(ext, EagerQuantizedFunctions, "eager")


def mode() -> str | None:
    """The kernels this process prepared (None before `prepare`): stage records name them (edgeres.env)."""
    return _state.get("mode")


def _use(ext, namespace, name: str) -> str:
    ext.QuantizedFunctionsCPU._loaded_namespace = namespace   # NNCF's lazy namespace: never loads on its own
    _state["mode"] = name
    return name
