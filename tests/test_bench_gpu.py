"""benchmarks/bench_gpu.py runs end to end with --quick (on the CPU here), so the GPU benchmark cannot rot."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("nncf", reason="NNCF (edgeres[quant]) is not installed")
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_gpu_quick_writes_every_measurement(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--quick", "--out", str(tmp_path),
                        "--device", "cpu"], capture_output=True, text=True, timeout=900,
                       env={**os.environ, "NNCF_CI": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads((tmp_path / "gpu.json").read_text())
    assert r["quick"] is True and r["environment"]["torch_device"] == "cpu"
    assert r["ceiling"]["img_s"] > 0 and r["train"]["img_s"] > 0 and r["qat"]["img_s"] > 0
    assert r["train"]["vs_ceiling"] == pytest.approx(r["train"]["img_s"] / r["ceiling"]["img_s"], rel=1e-2)
    assert r["qat"]["busy_pct"] is None and r["qat"]["reason"] == "not a GPU"
    assert r["ptq"]["seconds"] > 0 and r["ptq"]["images"] == 32
    assert r["build"]["ok"], r["build"]["message"]
    assert {"train", "fold", "ptq", "export_int8", "verify"} <= set(r["build"]["stage_s"])
    md = (tmp_path / "gpu.md").read_text()
    assert "synthetic training ceiling" in md and ">= 0.6x" in md and "build --int8" in md
