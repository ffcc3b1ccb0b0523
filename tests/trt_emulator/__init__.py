"""The TensorRT emulator and its device: see emulator.py (the `tensorrt` module), trtexec.py (the `trtexec`
stand-in) and cudart.c (the libcudart stand-in). `EmulatedDevice` puts the three where the code under test
looks for them: `tensorrt` on PYTHONPATH, `trtexec` on PATH, libcudart.so.13 on LD_LIBRARY_PATH, and emulates the
few operating-system facts a Jetson is recognised by (an EMULATED OS, a `sitecustomize` on the same PYTHONPATH, in
the device's Python processes only): /etc/nv_tegra_release (its L4T release), /proc/device-tree/model and
/compatible (which module) are read from the device's own root folder, and platform.machine() is its CPU
architecture — so a build on an emulated Orin records a Jetson (aarch64, its module) as a real one would.

Nothing here is TensorRT; results obtained through it are labelled by the module (`tensorrt.__emulator__`)
and the device name the stand-in reports ("edgeres emulated GPU (libcudart stand-in)").
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
VERSIONS = ("8.5.2", "8.6", "10.3", "10.16", "11.0", "11.4.1")
# the L4T release line of the JetPack that ships each TensorRT (JetPack 5.1 = L4T 35.2.1, 6.0 = 36.3, 6.1 = 36.4);
# 11.4.1 (JetPack 7.2.2+): its L4T release is not known here, so the emulated Jetson has no nv_tegra_release
L4T = {"8.5.2": "# R35 (release), REVISION: 2.1, GCID: 0, BOARD: t186ref, EABI: aarch64",
       "8.6": "# R36 (release), REVISION: 3.0, GCID: 0, BOARD: generic, EABI: aarch64",
       "10.3": "# R36 (release), REVISION: 4.0, GCID: 0, BOARD: generic, EABI: aarch64"}
CUDART_SONAME = "libcudart.so.13"   # CUDA 13: TensorRT 10.16 / 11's default; no unversioned libcudart.so


def build_cudart(dest: Path | None = None) -> Path:
    """Compile cudart.c into DEST/libcudart.so.13 (cached by source hash) and return its path."""
    src = HERE / "cudart.c"
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:12]
    dest = dest or Path(tempfile.gettempdir()) / f"edgeres-cudart-{digest}"
    lib = dest / CUDART_SONAME
    if not lib.is_file():
        dest.mkdir(parents=True, exist_ok=True)
        tmp = dest / f".{CUDART_SONAME}.{os.getpid()}"
        cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if not cc:
            raise RuntimeError("the libcudart stand-in needs a C compiler (cc or gcc)")
        subprocess.run([cc, "-shared", "-fPIC", "-O1", f"-Wl,-soname,{CUDART_SONAME}", "-o", str(tmp), str(src)],
                       check=True, capture_output=True)
        os.replace(tmp, lib)
    return lib


SHIM = '''"""tensorrt: {name} (TensorRT {version} surface). Not TensorRT."""
import sys
sys.path.insert(0, {tests!r})
from trt_emulator.emulator import build_module
sys.modules[__name__] = build_module({version!r})
'''

SITECUSTOMIZE = '''"""EMULATED OS for an edgeres emulated device (tests/trt_emulator): Jetson files from the device's
root folder, its CPU architecture from platform.machine(). Not the real machine."""
import builtins
import io
import os
import platform

_ROOT = os.environ.get("EDGERES_EMULATED_ROOTFS")
_FILES = ("/etc/nv_tegra_release", "/proc/device-tree")


def _map(path):
    try:
        text = os.fspath(path)
    except TypeError:
        return path
    if isinstance(text, str) and text.startswith(_FILES):
        return _ROOT + text
    return path


if _ROOT:
    _open, _stat = io.open, os.stat

    def _emulated_open(file, *args, **kwargs):
        return _open(_map(file), *args, **kwargs)

    def _emulated_stat(path, *args, **kwargs):
        return _stat(_map(path), *args, **kwargs)

    builtins.open = io.open = _emulated_open
    os.stat = _emulated_stat
if os.environ.get("EDGERES_EMULATED_MACHINE"):
    platform.machine = lambda: os.environ["EDGERES_EMULATED_MACHINE"]
'''

TRTEXEC = '''#!{python}
"""trtexec: {name} (TensorRT {version} options). Not trtexec."""
import sys
sys.path.insert(0, {tests!r})
from trt_emulator.trtexec import main
sys.exit(main(sys.argv[1:], {version!r}))
'''


@dataclass
class EmulatedDevice:
    """A machine with one emulated GPU and an emulated TensorRT (Python bindings and/or trtexec)."""

    root: Path
    version: str = "10.3"
    dla_cores: int = 0
    compute_capability: str = "8.6"
    numpy: str | None = None          # emulate this NumPy's attribute set inside tensorrt.nptype
    python_bindings: bool = True
    trtexec: bool = True
    jetson: str | None = None         # emulator.JETSONS key ("orin" = AGX Orin, "orin-nx", "xavier", ...): its compute
                                      # capability, DLA cores, device-tree model; aarch64
    machine: str | None = None        # CPU architecture the emulated engines record (default: this machine's)
    l4t: str | None = "auto"          # /etc/nv_tegra_release on a Jetson ("auto": L4T[version]; None: absent)
    cudart: Path = field(init=False)

    def __post_init__(self):
        from trt_emulator.emulator import EMULATOR_NAME, JETSONS

        self.root = Path(self.root)
        rootfs = self.root / "rootfs"
        if self.jetson is not None:
            self.compute_capability, cores, model = JETSONS[self.jetson]
            self.dla_cores = self.dla_cores or cores
            self.machine = self.machine or "aarch64"
            (rootfs / "proc" / "device-tree").mkdir(parents=True, exist_ok=True)
            (rootfs / "proc" / "device-tree" / "model").write_bytes(model.encode() + b"\x00")
            (rootfs / "proc" / "device-tree" / "compatible").write_bytes(b"nvidia,tegra234\x00")
            l4t = L4T.get(self.version) if self.l4t == "auto" else self.l4t
            if l4t:
                (rootfs / "etc").mkdir(parents=True, exist_ok=True)
                (rootfs / "etc" / "nv_tegra_release").write_text(l4t + "\n")
        rootfs.mkdir(parents=True, exist_ok=True)
        self.cudart = build_cudart()
        lib = self.root / "lib"
        lib.mkdir(parents=True, exist_ok=True)
        if not (lib / CUDART_SONAME).exists():
            shutil.copyfile(self.cudart, lib / CUDART_SONAME)
        self.cudart = lib / CUDART_SONAME
        site, bindir = self.root / "site", self.root / "bin"
        tests = str(HERE.parent)
        site.mkdir(parents=True, exist_ok=True)
        (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
        if self.python_bindings:
            (site / "tensorrt").mkdir(parents=True, exist_ok=True)
            (site / "tensorrt" / "__init__.py").write_text(SHIM.format(name=EMULATOR_NAME, version=self.version,
                                                                       tests=tests))
        if self.trtexec:
            bindir.mkdir(parents=True, exist_ok=True)
            exe = bindir / "trtexec"
            exe.write_text(TRTEXEC.format(python=sys.executable, name=EMULATOR_NAME, version=self.version,
                                          tests=tests))
            exe.chmod(0o755)

    def env(self, base: dict | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(self.root / "site"), env.get("PYTHONPATH", "")]))
        env["PATH"] = os.pathsep.join([str(self.root / "bin"), env.get("PATH", "")])
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(self.root / "lib"), env.get("LD_LIBRARY_PATH")]))
        env["EDGERES_EMULATED_ROOTFS"] = str(self.root / "rootfs")
        env.update({"EDGERES_TRT_EMULATOR_VERSION": self.version, "EDGERES_EMULATED_CC": self.compute_capability,
                    "EDGERES_TRT_EMULATOR_DLA_CORES": str(self.dla_cores), "EDGERES_EMULATED_CUDART": str(self.cudart)})
        for key, value in (("EDGERES_EMULATED_JETSON", self.jetson), ("EDGERES_EMULATED_MACHINE", self.machine)):
            if value:
                env[key] = value
            else:
                env.pop(key, None)
        if self.numpy:
            env["EDGERES_TRT_EMULATOR_NUMPY"] = self.numpy
        else:
            env.pop("EDGERES_TRT_EMULATOR_NUMPY", None)
        return env
