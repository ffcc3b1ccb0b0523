"""QAT under torchrun (gloo, CPU, 2 processes) against one process with the same global batch: the same model up to
float noise (the folded model has no BatchNorm, and each step's global batch is the single process's batch)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("nncf", reason="NNCF (edgeres[quant]) is not installed")

SCRIPT = textwrap.dedent("""
    import json, os, sys, torch
    torch.set_num_threads(1)
    from edgeres.data import get_data, split_holdout
    from edgeres.fold import fold_batchnorm
    from edgeres.models import create_model
    from edgeres.quantize import quantize_ptq, quantize_qat
    b = split_holdout(get_data(dataset="digits", input_size=16, augment=("pad_crop",), pad=2, seed=3), 0.1, seed=3)
    sub = torch.utils.data.Subset
    train, holdout = sub(b.train, range(128)), sub(b.holdout, range(48))
    torch.manual_seed(0)
    teacher = fold_batchnorm(create_model("resnet20", num_classes=10, in_channels=1)).model.eval()
    ptq = quantize_ptq(teacher, b.calib, subset_size=64, seed=3, quiet=True)
    res = quantize_qat(ptq.model, train, holdout, teacher=teacher, epochs=2, lr=0.01, batch_size=32, seed=3,
                       quiet=True)
    rank = os.environ.get("RANK", "0")
    torch.save({k: v.detach() for k, v in res.model.state_dict().items()},
               os.path.join(sys.argv[1], f"rank{rank}.pt"))
    with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
        json.dump({"history": res.history, "best_epoch": res.best_epoch}, f)
""")


def _run(cmd, out: Path):
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NNCF_CI": "1"}
    p = subprocess.run(cmd + [str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return sorted(out.glob("rank*.pt")), [json.loads(f.read_text()) for f in sorted(out.glob("rank*.json"))]


@pytest.mark.slow
def test_qat_under_torchrun_matches_one_process(tmp_path):
    import torch

    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun not installed next to the interpreter")
    script = tmp_path / "qat_ddp.py"
    script.write_text(SCRIPT)
    (one,), (one_log,) = _run([sys.executable, str(script)], tmp_path / "one")
    both, logs = _run([torchrun, "--standalone", "--nproc-per-node", "2", str(script)], tmp_path / "two")
    assert len(both) == 2
    a, b0, b1 = (torch.load(p, weights_only=True) for p in (one, *both))
    assert a.keys() == b0.keys() == b1.keys()
    for k in a:
        assert torch.equal(b0[k], b1[k]), f"the two ranks differ at {k}"
        assert torch.allclose(a[k].float(), b0[k].float(), rtol=1e-3, atol=1e-4), f"{k}: 2 processes != 1"
    h1, h2 = one_log["history"], logs[0]["history"]
    assert [r["epoch"] for r in h1] == [r["epoch"] for r in h2] == [0, 1, 2]
    for r1, r2 in zip(h1[1:], h2[1:]):   # the loss over the global batch, summed across processes
        assert r1["loss"] == pytest.approx(r2["loss"], rel=1e-3)
        assert r1["holdout_agreement_pct"] == pytest.approx(r2["holdout_agreement_pct"], abs=2.1)  # <= 1 image
    # and the sharding itself: every step's samples over the ranks are exactly the single process's batch
    from edgeres.dist import shard_of_global_batches

    single = shard_of_global_batches(100, 20, seed=4, epoch=1)
    r0 = shard_of_global_batches(100, 20, seed=4, epoch=1, rank=0, world=2)
    r1 = shard_of_global_batches(100, 20, seed=4, epoch=1, rank=1, world=2)
    for step in range(5):
        assert sorted(r0[step * 10:(step + 1) * 10] + r1[step * 10:(step + 1) * 10]) == \
            sorted(single[step * 20:(step + 1) * 20])


def test_one_process_shard_is_the_loader_order():
    """shard_of_global_batches(world=1) walks exactly the order make_loader draws for (seed, epoch)."""
    import torch

    from edgeres.data import make_loader
    from edgeres.dist import shard_of_global_batches

    ds = torch.utils.data.TensorDataset(torch.arange(103))
    for epoch in (0, 3):
        loader = make_loader(ds, batch_size=10, shuffle=True, seed=9, epoch=epoch, drop_last=True)
        order = [int(i) for (x,) in loader for i in x]
        assert order == shard_of_global_batches(103, 10, seed=9, epoch=epoch)
        assert order != shard_of_global_batches(103, 10, seed=9, epoch=epoch + 1)
