"""DDP under torchrun (gloo, CPU, 2 processes) against single-process training with the same global batch."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent("""
    import json, os, sys, torch
    torch.set_num_threads(1)
    from edgeres.data import DataBundle, get_data
    from edgeres.recipe import recipe_from_dict
    from edgeres.train import train
    recipe = recipe_from_dict({"model": {"arch": "resnet20"},
        "data": {"dataset": "digits", "input_size": 16, "batch_size": 32, "workers": 0,
                 "augment": ["pad_crop"], "pad": 2},
        "train": {"epochs": 2, "optimizer": "sgd", "lr": 0.02, "momentum": 0.9, "schedule": "constant", "seed": 5}})
    b = get_data(dataset="digits", input_size=16, augment=("pad_crop",), pad=2, seed=5)
    sub = torch.utils.data.Subset
    bundle = DataBundle(sub(b.train, range(128)), sub(b.test, range(64)), sub(b.calib, range(128)), b.info)
    res = train(recipe, sys.argv[1], quiet=True, data=bundle)
    # one file per rank: two ranks printing to one pipe can interleave their lines on a busy machine
    with open(os.path.join(sys.argv[2], f"rank{os.environ.get('RANK', '0')}.json"), "w") as f:
        json.dump(res.history, f)
""")


def run(cmd, out_dir, results):
    results.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd + [str(out_dir), str(results)], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return [json.loads(f.read_text()) for f in sorted(results.glob("rank*.json"))]


@pytest.mark.slow
def test_torchrun_two_processes_match_single_process(tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun not installed next to the interpreter")
    script = tmp_path / "train_ddp.py"
    script.write_text(SCRIPT)
    single = run([sys.executable, str(script)], tmp_path / "single", tmp_path / "single-results")[0]
    # --standalone: torchrun picks a free port, so two test runs on one machine do not collide
    both = run([torchrun, "--standalone", "--nproc-per-node", "2", str(script)], tmp_path / "ddp",
               tmp_path / "ddp-results")
    assert len(both) == 2 and both[0] == both[1]           # every rank returns rank 0's history
    ddp = both[0]
    assert [r["iteration"] for r in ddp] == [r["iteration"] for r in single] == [4, 8]
    # same samples and augmentation, averaged gradients; BN statistics are per process, hence a tolerance
    for a, b in zip(single, ddp):
        assert abs(a["train_loss"] - b["train_loss"]) < 0.15 * a["train_loss"]
        assert abs(a["test_top1"] - b["test_top1"]) <= 15.0
    files = sorted(p.name for p in (tmp_path / "ddp").iterdir())
    assert files == [".edgeres", "best.pt", "last.pt", "metrics.csv", "metrics.jsonl"]   # + the ownership marker
