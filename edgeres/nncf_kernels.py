"""NNCF's C++ quantization kernels, prepared deliberately so that a slow machine or a killed build never stops a run.

NNCF JIT-compiles a small C++ extension on first use (~80 s on 2 cores), gives up after 60 s, and a compile that is
killed leaves torch's `lock` file behind, which makes every later run wait forever or fail. edgeres therefore:

- builds the extension in its own cache folder (`~/.cache/edgeres/torch_extensions/<environment>`, one per Python
  environment, or `$TORCH_EXTENSIONS_DIR` when the user set one), so it fights neither other tools over
  `~/.cache/torch_extensions` nor another venv over one build;
- serialises builds with an `flock` (released by the kernel when a process dies, so it can never go stale), and
  under that lock removes torch's own `lock` file, which only a killed build can have left there;
- compiles in a child process with a generous timeout (`EDGERES_NNCF_BUILD_TIMEOUT`, default 900 s) and a
  progress line; on timeout the whole process group is killed;
- falls back to NNCF's pure-torch reference kernels (same arithmetic, slower QAT) when the extension cannot be had,
  and says so in one line. `EDGERES_NNCF_KERNELS=reference` asks for them outright.
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

MODE_ENV = "EDGERES_NNCF_KERNELS"            # auto (default) | reference
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


def prepare(say: Callable[[str], None] | None = None) -> str:
    """Make NNCF's CPU quantization kernels ready in this process; returns "extension" or "reference"."""
    if "mode" in _state:
        return _state["mode"]
    say = say or (lambda msg: print(msg, file=sys.stderr, flush=True))
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(extensions_root()))
    from nncf.torch.quantization import extensions as ext

    reason = None
    if os.environ.get(MODE_ENV, "auto") == "reference":
        reason = f"{MODE_ENV}=reference"
    else:
        build_dir = Path(ext.QuantizedFunctionsCPULoader.get_build_dir())
        with _flock(build_dir.parent / f"{build_dir.name}.edgeres-lock", say):
            # we hold the only build lock: a torch `lock` file here can only be left by a killed build
            (build_dir / "lock").unlink(missing_ok=True)
            if not _built(build_dir):
                reason = _compile(build_dir, say)
            if reason is None:
                os.environ["NNCF_EXTENSION_LOAD_TIMEOUT"] = "0"   # built: loading it only links the .so
                namespace = ext.QuantizedFunctionsCPULoader.load()
    if reason is not None:
        from nncf.torch.quantization.reference import ReferenceQuantizedFunctions

        namespace = ReferenceQuantizedFunctions
        say(f"NNCF's C++ kernels unavailable ({reason}); using its pure-torch reference kernels (slower QAT)")
    ext.QuantizedFunctionsCPU._loaded_namespace = namespace   # NNCF's lazy namespace: never load again
    _state["mode"] = "extension" if reason is None else "reference"
    return _state["mode"]
