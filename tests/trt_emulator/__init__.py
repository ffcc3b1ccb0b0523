"""The TensorRT emulator and its device: see emulator.py (the `tensorrt` module), trtexec.py (the `trtexec`
stand-in) and cudart.c (the libcudart stand-in). `EmulatedDevice` puts the three where the code under test
looks for them: `tensorrt` on PYTHONPATH, `trtexec` on PATH, libcudart.so.13 on LD_LIBRARY_PATH.

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
VERSIONS = ("8.5.2", "8.6", "10.3", "10.16", "11.0")
# the TensorRT each JetPack ships (JetPack 6.0: 8.6.2; the emulator's 8.6 surface is 8.6.1's)
DLA_VERSIONS = ("8.5.2", "8.6", "10.3", "10.16")
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
    jetson: str | None = None         # "orin" | "xavier": that module's compute capability and DLA cores, aarch64
    machine: str | None = None        # CPU architecture the emulated engines record (default: this machine's)
    cudart: Path = field(init=False)

    def __post_init__(self):
        from trt_emulator.emulator import EMULATOR_NAME, JETSONS

        if self.jetson is not None:
            self.compute_capability, self.dla_cores = JETSONS[self.jetson]
            self.machine = self.machine or "aarch64"
        self.root = Path(self.root)
        self.cudart = build_cudart()
        lib = self.root / "lib"
        lib.mkdir(parents=True, exist_ok=True)
        if not (lib / CUDART_SONAME).exists():
            shutil.copyfile(self.cudart, lib / CUDART_SONAME)
        self.cudart = lib / CUDART_SONAME
        site, bindir = self.root / "site", self.root / "bin"
        tests = str(HERE.parent)
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
