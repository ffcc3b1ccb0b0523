"""Datasets and transforms on real files: digits, MNIST (shared copy), CIFAR-10 / ImageFolder written to tmp."""
from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeres.data import datasets as D
from edgeres.data import get_data, make_loader
from edgeres.data import transforms as T
from edgeres.errors import ConfigError, DataError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MNIST = SHARED / "mnist"
needs_mnist = pytest.mark.skipif(not (MNIST / "t10k-images-idx3-ubyte.gz").is_file(), reason="no shared MNIST copy")


def test_digits_split_is_fixed_and_disjoint():
    a = get_data(dataset="digits", input_size=16, augment=("pad_crop", "flip"))
    b = get_data(dataset="digits", input_size=16)
    assert (a.info.train_size, a.info.test_size) == (1438, 359)
    assert a.info.fingerprint == b.info.fingerprint and a.info.in_channels == 1 and a.info.num_classes == 10
    x, y = a.test[0]
    assert x.shape == (1, 16, 16) and x.dtype == torch.float32 and isinstance(y, int)
    assert torch.equal(a.test[5][0], b.test[5][0])
    assert torch.equal(a.calib[3][0], b.test.__class__(a.train.source, b.test.spec)[3][0])
    train_imgs = {a.train.source.array[i].numpy().tobytes() for i in range(len(a.train))}
    assert sum(a.test.source.array[i].numpy().tobytes() in train_imgs for i in range(len(a.test))) < 5  # few duplicates
    # 3-channel model: gray replicated; mean/std broadcast
    c = get_data(dataset="digits", input_size=16, in_channels=3)
    assert c.test[0][0].shape == (3, 16, 16) and len(c.info.mean) == 3


def test_augmentation_is_seeded_by_epoch_and_index():
    d = get_data(dataset="digits", input_size=16, augment=("pad_crop", "flip"), pad=4, seed=1).train
    d.set_epoch(0)
    first = [d[i][0] for i in range(8)]
    assert all(torch.equal(a, d[i][0]) for i, a in enumerate(first))
    d.set_epoch(1)
    assert not all(torch.equal(a, d[i][0]) for i, a in enumerate(first))
    loader = make_loader(d, batch_size=4, shuffle=True, seed=3, epoch=2)
    again = make_loader(d, batch_size=4, shuffle=True, seed=3, epoch=2)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(loader, again))


def test_transforms():
    img = torch.arange(3 * 10 * 14, dtype=torch.int64).remainder(256).to(torch.uint8).view(3, 10, 14)
    rng = T.sample_rng(0, 0, 0)
    assert T.pad_random_crop(img, 8, 2, rng).shape == (3, 8, 8)
    assert T.random_resized_crop(img, 12, rng).shape == (3, 12, 12)
    out = T.resize_center_crop(img, 20, 16)
    assert out.shape == (3, 16, 16) and out.dtype == torch.uint8
    assert torch.equal(T.center_fit(img, 10, 14), img)
    padded = T.center_fit(img, 14, 14)
    assert padded.shape == (3, 14, 14) and int(padded[:, :2].sum()) == 0
    assert torch.equal(T.hflip(img, T.sample_rng(0, 0, 1), p=1.0), img.flip(-1))
    norm = T.normalize(torch.full((1, 2, 2), 255, dtype=torch.uint8), torch.tensor([0.5]).view(1, 1, 1),
                       torch.tensor([0.25]).view(1, 1, 1))
    assert torch.allclose(norm, torch.full((1, 2, 2), 2.0))
    assert T.match_channels(img, 1).shape == (1, 10, 14)


@needs_mnist
def test_mnist_shared_copy_loads_without_checksum_warning(recwarn):
    b = get_data(dataset="mnist", data_dir=str(MNIST), input_size=32, augment=("pad_crop", "flip"), download=False)
    assert (b.info.train_size, b.info.test_size, b.info.input_size) == (60000, 10000, 32)
    assert not [w for w in recwarn if "md5" in str(w.message)]
    x, _ = b.test[0]
    assert x.shape == (1, 32, 32)
    bg = (0 - 0.1307) / 0.3081
    assert torch.allclose(x[:, :2], torch.full_like(x[:, :2], bg))  # 28x28 centered on a black 32x32 canvas


def _write_idx(path: Path, arr: np.ndarray, gz: bool) -> None:
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    (path.with_name(path.name + ".gz").write_bytes(gzip.compress(data)) if gz else path.write_bytes(data))


def test_mnist_user_copy_with_other_checksums_warns_and_loads(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 20), ("t10k", 10)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte", rng.integers(0, 255, (n, 28, 28)), gz=split == "train")
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte", rng.integers(0, 10, (n,)), gz=False)
    with pytest.warns(UserWarning, match="md5 differs"):
        b = get_data(dataset="mnist", data_dir=str(tmp_path), download=False)
    assert (b.info.train_size, b.info.test_size) == (20, 10)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01" + (99).to_bytes(4, "big") + b"\x01")
    with pytest.raises(DataError, match="truncated"), pytest.warns(UserWarning):
        get_data(dataset="mnist", data_dir=str(tmp_path), download=False)


def test_mnist_offline_error_says_data_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "MNIST_URL", "http://127.0.0.1:9/")
    with pytest.raises(DataError, match="--data-dir"):
        get_data(dataset="mnist", data_dir=str(tmp_path / "empty"))


def _write_cifar(root: Path, n: int = 6) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in D.CIFAR_FILES:
        batch = {b"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, n)),
                 b"batch_label": name.encode()}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    return folder


def test_cifar10_official_pickle_format(tmp_path):
    _write_cifar(tmp_path)
    with pytest.warns(UserWarning, match="md5"):
        b = get_data(dataset="cifar10", data_dir=str(tmp_path), augment=("pad_crop", "flip"), download=False)
    assert (b.info.train_size, b.info.test_size, b.info.in_channels) == (30, 6, 3)
    assert b.info.class_names[0] == "airplane" and b.train[0][0].shape == (3, 32, 32)
    raw = pickle.load(open(tmp_path / "cifar-10-batches-py" / "test_batch", "rb"), encoding="bytes")
    assert np.array_equal(b.test.source.array[2].numpy().reshape(-1), raw[b"data"][2])


def test_cifar10_refuses_pickles_that_run_code(tmp_path):
    folder = _write_cifar(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": [0]}, f)
    with pytest.raises(DataError, match="test_batch"), pytest.warns(UserWarning):
        get_data(dataset="cifar10", data_dir=str(tmp_path), download=False)


def _imagefolder(root: Path) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 2)):
        for c in ("cat", "ant", "bee"):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                arr = rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)
                im = Image.fromarray(arr)
                mode = i % 3
                if mode == 0:
                    im.save(d / f"{i}.JPEG", quality=90)
                elif mode == 1:
                    im.convert("L").save(d / f"{i}.png")
                else:
                    im.convert("P").save(d / f"{i}.png")
            if split == "train" and c == "bee":
                im.convert("CMYK").save(d / "cmyk.jpg")
    return root


def test_imagefolder_formats_and_class_order(tmp_path):
    root = _imagefolder(tmp_path)
    b = get_data(dataset="imagefolder", data_dir=str(root), input_size=24, augment=("random_resized_crop", "flip"))
    assert b.info.class_names == ("ant", "bee", "cat") and b.info.resize_size == round(24 / 0.875)
    assert (b.info.train_size, b.info.test_size) == (10, 6)
    for ds in (b.train, b.test, b.calib):
        for i in range(len(ds)):
            x, y = ds[i]
            assert x.shape == (3, 24, 24) and 0 <= y < 3
    cached = get_data(dataset="imagefolder", data_dir=str(root), input_size=24, cache=True)
    assert all(torch.allclose(cached.test[i][0], b.test[i][0], atol=1e-5) for i in range(6))


def test_imagefolder_bad_data(tmp_path):
    with pytest.raises(DataError, match="not found"):
        get_data(dataset="imagefolder", data_dir=str(tmp_path / "nope"))
    with pytest.raises(DataError, match="--data-dir"):
        get_data(dataset="imagefolder")
    root = _imagefolder(tmp_path / "a")
    (root / "val" / "dog").mkdir()
    with pytest.raises(DataError, match="empty class folder .*dog"):
        get_data(dataset="imagefolder", data_dir=str(root))
    (root / "val" / "dog" / "1.png").write_bytes((root / "val" / "cat" / "1.png").read_bytes())
    with pytest.raises(DataError, match="only in val: \\['dog'\\]"):
        get_data(dataset="imagefolder", data_dir=str(root))


def test_corrupt_image_named_or_skipped(tmp_path):
    root = _imagefolder(tmp_path)
    bad = root / "train" / "ant" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    b = get_data(dataset="imagefolder", data_dir=str(root), input_size=24)
    idx = b.train.source.files.index(str(bad))
    with pytest.raises(DataError, match="broken.jpg.*--skip-bad-images"):
        b.train[idx]
    with pytest.raises(DataError, match="broken.jpg"):
        get_data(dataset="imagefolder", data_dir=str(root), input_size=24, cache=True)
    s = get_data(dataset="imagefolder", data_dir=str(root), input_size=24, skip_bad_images=True)
    assert s.info.skipped_images == 1 and s.info.train_size == 10


def test_bad_options():
    with pytest.raises(ConfigError, match="unknown dataset"):
        get_data(dataset="svhn")
    with pytest.raises(ConfigError, match="mean"):
        get_data(dataset="digits", mean=(0.1, 0.2))


def test_worker_processes_give_the_same_batches():
    d = get_data(dataset="digits", input_size=16, augment=("pad_crop", "flip"), seed=2).train
    sub = torch.utils.data.Subset(d, range(64))
    a = list(make_loader(sub, batch_size=16, shuffle=True, workers=0, seed=1, epoch=3))
    b = list(make_loader(sub, batch_size=16, shuffle=True, workers=2, seed=1, epoch=3))
    assert len(a) == len(b) == 4
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


def test_epoch_reaches_datasets_inside_subsets():
    d = get_data(dataset="digits", input_size=16, augment=("pad_crop", "flip"), pad=4, seed=2).train
    sub = torch.utils.data.Subset(d, range(32))
    e0 = next(iter(make_loader(sub, batch_size=32, shuffle=False, epoch=0)))[0]
    e1 = next(iter(make_loader(sub, batch_size=32, shuffle=False, epoch=1)))[0]
    assert d.epoch == 1 and not torch.equal(e0, e1)
