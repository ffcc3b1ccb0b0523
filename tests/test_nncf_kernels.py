"""NNCF's CPU quantization kernels: edgeres's eager ones by default (nothing compiled), bit-identical to NNCF's C++
extension, which stays available (`EDGERES_NNCF_KERNELS=extension`) and survives busy machines and killed builds."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from edgeres.errors import ConfigError
from edgeres.nncf_kernels import wanted_mode


def _python(code: str, timeout: float = 1200, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "NNCF_CI": "1", **env})


needs_compiler = pytest.mark.skipif(shutil.which("c++") is None,
                                    reason="no C++ compiler: NNCF's C++ extension cannot be built here")


@pytest.fixture(scope="module")
def ext_dir(tmp_path_factory):
    """One build folder for the module: the first test that needs the compiled extension builds it there."""
    return str(tmp_path_factory.mktemp("torch_extensions"))


def test_eager_kernels_are_the_default_and_nothing_is_compiled(tmp_path):
    code = ("from edgeres.nncf_kernels import prepare, EagerQuantizedFunctions as E; print(prepare());"
            "from nncf.torch.quantization.extensions import QuantizedFunctionsCPU as Q;"
            "print(Q.get('Quantize_forward') is E.Quantize_forward, Q.get('Quantize_backward') is E.Quantize_backward);"
            "from edgeres.env import environment; print(environment()['nncf_kernels']); import os;"
            "print(os.environ['NNCF_EXTENSION_LOAD_TIMEOUT'], os.environ['TORCH_EXTENSIONS_DIR'])")
    env = {k: v for k, v in os.environ.items()
           if k not in ("EDGERES_NNCF_KERNELS", "TORCH_EXTENSIONS_DIR", "NNCF_EXTENSION_LOAD_TIMEOUT")}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**env, "NNCF_CI": "1", "XDG_CACHE_HOME": str(tmp_path / "cache"),
                            "HOME": str(tmp_path)})
    assert p.returncode == 0, p.stderr[-2000:]
    said = p.stdout.split()
    assert said[:4] == ["eager", "True", "True", "eager"]   # and the stage records say so
    # what NNCF still compiles itself (its CUDA kernels, on a GPU) goes to edgeres's folder, without a 60 s limit
    assert said[4] == "0" and said[5].startswith(str(tmp_path / "cache" / "edgeres" / "torch_extensions"))
    assert "kernels" not in p.stderr, p.stderr   # nothing to say: no compile, no fallback
    assert not (tmp_path / "cache").exists() and not (tmp_path / ".cache").exists()


def test_an_unknown_kernel_mode_is_refused(monkeypatch):
    monkeypatch.setenv("EDGERES_NNCF_KERNELS", "fast")
    with pytest.raises(ConfigError, match="must be one of eager, extension, reference, got 'fast'"):
        wanted_mode()
    monkeypatch.setenv("EDGERES_NNCF_KERNELS", "")
    assert wanted_mode() == "eager"


def test_a_build_refuses_an_unknown_kernel_mode_before_it_trains(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from edgeres.cli import main

    monkeypatch.setenv("EDGERES_NNCF_KERNELS", "fast")
    r = CliRunner().invoke(main, ["build", "--arch", "mnist_resnet", "--int8", "--out", str(tmp_path / "run")])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert "EDGERES_NNCF_KERNELS must be one of eager, extension, reference, got 'fast'" in r.output
    assert "[train]" not in r.output and not (tmp_path / "run").exists()


def test_a_failed_extension_build_falls_back_to_the_eager_kernels(tmp_path):
    p = _python("from edgeres.nncf_kernels import prepare; print(prepare())", timeout=300,
                EDGERES_NNCF_KERNELS="extension", TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"),
                EDGERES_NNCF_BUILD_TIMEOUT="0.5")
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split() == ["eager"]
    assert "NNCF's C++ kernels unavailable (the compile took longer than 0 s" in p.stderr, p.stderr
    assert "using edgeres's eager kernels (same results)" in p.stderr
    assert not list((tmp_path / "ext").rglob("lock"))   # the killed build left no torch lock behind


@pytest.mark.slow
@needs_compiler
def test_two_processes_build_nncf_kernels_into_a_fresh_folder_at_once(ext_dir):
    """Two first runs at once on one machine (two clones asking for the extension): one compiles, the other waits."""
    env = {**os.environ, "NNCF_CI": "1", "TORCH_EXTENSIONS_DIR": ext_dir, "EDGERES_NNCF_KERNELS": "extension"}
    code = "from edgeres.nncf_kernels import prepare; print(prepare())"
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=1200) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-1500:] for o in outs]
    assert [o[0].strip() for o in outs] == ["extension", "extension"]
    said = outs[0][1] + outs[1][1]
    assert said.count("preparing NNCF's C++ quantization kernels") == 1, said
    assert "waiting for another edgeres process" in said, said


@needs_compiler
def test_nncf_kernels_survive_a_stale_lock(ext_dir):
    """A compile killed mid-way leaves torch's `lock` file; the next run must neither hang nor fail."""
    code = ("from nncf.torch.quantization.extensions import QuantizedFunctionsCPULoader as L;"
            "from edgeres.nncf_kernels import prepare; import os;"
            "d = L.get_build_dir(); open(os.path.join(d, 'lock'), 'w').close();"
            "print(prepare(), os.path.exists(os.path.join(d, 'lock')))")
    p = _python(code, TORCH_EXTENSIONS_DIR=ext_dir, EDGERES_NNCF_KERNELS="extension")
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split() == ["extension", "False"], p.stdout + p.stderr[-1000:]


_SAME_BITS = """
import torch
from edgeres.nncf_kernels import prepare, EagerQuantizedFunctions as E
assert prepare() == "extension"
from nncf.torch.quantization.extensions import QuantizedFunctionsCPU as Q
F, B = Q.get("Quantize_forward"), Q.get("Quantize_backward")
torch.manual_seed(0)
cases = differ = 0
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    # per tensor (the activations), per output channel (weights), per input channel, a 2-D input
    for shape, rshape in [((4, 16, 28, 28), (1,)), ((32, 16, 3, 3), (32, 1, 1, 1)), ((4, 16, 28, 28), (1, 16, 1, 1)),
                          ((3, 5), (1, 1))]:
        x = (torch.randn(shape) * 2).to(dtype)
        rng = (torch.rand(rshape) + 2).to(dtype)
        g = torch.randn(shape).to(dtype)
        for asym, levels, lo_, hi_ in ((False, 256, -128, 127), (True, 256, 0, 255), (False, 255, -127, 127)):
            low = (-torch.rand(rshape) - 1).to(dtype) if asym else (-rng * -lo_ / (levels - 1)).to(dtype)
            got = [F(x, low, rng, levels)] + list(B(g, x, low, rng, levels, lo_, hi_, asym))
            want = [E.Quantize_forward(x, low, rng, levels)] + list(E.Quantize_backward(g, x, low, rng, levels, lo_,
                                                                                        hi_, asym))
            same = [torch.equal(got[i], want[i]) for i in (0, 1, 3)] + [got[2].shape == want[2].shape]
            if asym:
                same.append(torch.equal(got[2], want[2]))
            cases += 1
            differ += not all(same)
            if not all(same):
                print("differ:", dtype, shape, rshape, asym, levels, same)
print("cases", cases, "differ", differ)
"""


@needs_compiler
def test_eager_kernels_give_the_extensions_bits(ext_dir):
    """Forward and backward, per tensor and per channel, symmetric and asymmetric, float32/16 and bfloat16."""
    p = _python(_SAME_BITS, TORCH_EXTENSIONS_DIR=ext_dir, EDGERES_NNCF_KERNELS="extension")
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip().splitlines()[-1] == "cases 36 differ 0", p.stdout


def test_reference_kernels_when_asked():
    code = ("import torch; from edgeres.nncf_kernels import prepare; print(prepare());"
            "from nncf.torch.quantization.extensions import QuantizedFunctionsCPU as Q;"
            "from nncf.torch.quantization.reference import ReferenceQuantizedFunctions as R;"
            "print(Q.get('Quantize_forward') is R.Quantize_forward)")
    p = _python(code, timeout=300, EDGERES_NNCF_KERNELS="reference")
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split() == ["reference", "True"]
