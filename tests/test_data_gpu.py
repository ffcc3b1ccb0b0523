"""The GPU data path (edgeres.data.gpu): the same samples, order and per-sample draws as the CPU pipeline.

Its plumbing (index maps under Subset, (seed, epoch, index) draws, normalization, order) runs here on the CPU
device against the CPU loader; nvJPEG itself needs a GPU and torchvision (marked `gpu`)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeres.data import get_data, make_loader, split_holdout
from edgeres.data import gpu as G


def _imagefolder(tmp_path, n=6):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                size = (40 + 3 * i, 36 + 5 * i)
                Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(d / f"{i}.jpg",
                                                                                         quality=90)
    return tmp_path


@pytest.mark.parametrize("augment", [(), ("random_resized_crop", "flip")])
def test_device_batches_equal_the_cpu_loader(tmp_path, augment):
    root = _imagefolder(tmp_path)
    b = split_holdout(get_data(dataset="imagefolder", data_dir=str(root), input_size=24, augment=augment, seed=4,
                               workers=0), 0.25, seed=4)
    split = b.train if augment else b.test
    cpu = make_loader(split, batch_size=4, shuffle=bool(augment), seed=4, epoch=2, drop_last=False)
    order = list(cpu.sampler) if augment else list(range(len(split)))
    dev = list(G.device_batches(split, order, batch_size=4, device="cpu", epoch=2))
    ref = list(cpu)
    assert len(dev) == len(ref) == -(-len(split) // 4)
    for (x1, y1), (x2, y2) in zip(ref, dev):
        assert torch.equal(y1, y2)
        assert torch.allclose(x1, x2, atol=1e-6), "same decode, same draws, same tensors"
    other = list(G.device_batches(split, order, batch_size=4, device="cpu", epoch=3))
    if augment:   # the epoch's draws differ: the test above would see a wrong epoch
        assert not all(torch.allclose(a[0], b2[0]) for a, b2 in zip(dev, other))


def test_why_not_says_why(tmp_path):
    ds = torch.utils.data.TensorDataset(torch.zeros(2, 1, 4, 4), torch.zeros(2))
    assert "not a GPU" in G.why_not(ds, "cpu")
    assert "not an edgeres image dataset" in G.why_not(ds, "cuda:0")


@pytest.mark.gpu
def test_nvjpeg_eval_tensors_match_the_cpu_path_to_1_255(tmp_path):
    if G._nvjpeg() is None:
        pytest.skip("torchvision's decode_jpeg is not importable")
    root = _imagefolder(tmp_path, n=8)
    b = get_data(dataset="imagefolder", data_dir=str(root), input_size=24, seed=0, workers=0)
    loader = make_loader(b.test, batch_size=8, shuffle=False, device="cuda")
    assert isinstance(loader, G.DeviceLoader)
    std = torch.tensor(b.info.std).view(1, -1, 1, 1)
    for (x1, y1), (x2, y2) in zip(make_loader(b.test, batch_size=8, shuffle=False), loader):
        assert torch.equal(y1, y2.cpu())
        diff = ((x1 - x2.cpu()) * std).abs()   # back in [0, 1] pixel units
        assert float(diff.mean()) <= 1 / 255
