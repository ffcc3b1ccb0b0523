"""`edgeres train --resume` after a real kill -9 reaches the same weights as an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from edgeres.checkpoint import read_checkpoint

pytestmark = pytest.mark.slow

RECIPE = """
model: {arch: mnist_resnet}
data: {dataset: digits, input_size: 16, batch_size: 64, workers: 0, augment: [pad_crop], pad: 2}
train: {epochs: 3, optimizer: adam, lr: 0.003, weight_decay: 0.0, schedule: cosine, seed: 3}
"""


def _train(recipe, out, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "edgeres", "train", "--recipe", str(recipe), "--out", str(out),
                             "--quiet", *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_kill_9_then_resume_equals_uninterrupted(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    full = _train(recipe, tmp_path / "full")
    victim = _train(recipe, tmp_path / "killed")
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and victim.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 1:
            break
        time.sleep(0.05)
    assert victim.poll() is None, "the run finished before it could be killed: " + victim.communicate()[0]
    time.sleep(0.3)   # into the second epoch
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    done_before = len(metrics.read_text().splitlines())
    assert done_before < 3
    resumed = _train(recipe, tmp_path / "killed", "--resume")
    out_resumed, _ = resumed.communicate(timeout=600)
    out_full, _ = full.communicate(timeout=600)
    assert resumed.returncode == 0, out_resumed
    assert full.returncode == 0, out_full
    a, _, _ = read_checkpoint(tmp_path / "full" / "last.pt")
    b, _, _ = read_checkpoint(tmp_path / "killed" / "last.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
