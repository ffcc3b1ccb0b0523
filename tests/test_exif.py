"""Photos as a camera wrote them: a phone held upright stores its pixels sideways with EXIF Orientation=6. Every
decode path turns them upright: training and evaluation samples, the decoded-image cache, calibration images,
`edgeres predict`, and the GPU path (nvJPEG ignores EXIF; tested here with a stand-in decoder that ignores it too)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeres.data import get_data, make_loader
from edgeres.data import gpu as G
from edgeres.data.datasets import decode_image

ORIENTATION = 0x0112


def _phone_photo(path: Path, orientation: int = 6) -> Path:
    """Stored 48 wide x 24 high, left half white, right half black. With orientation 6 (turn 90 degrees clockwise to
    view) the photo is 24 wide x 48 high, white on top, black below."""
    from PIL import Image

    arr = np.zeros((24, 48, 3), dtype=np.uint8)
    arr[:, :24] = 255
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, quality=95, exif=exif)
    return path


def _upright(x: torch.Tensor) -> bool:
    """A (normalized) sample of the photo, viewed as meant: its top half brighter than its bottom half, and no
    left/right difference (sideways would be the other way round)."""
    h, w = x.shape[-2:]
    top, bottom = x[..., : h // 2, :].mean(), x[..., h - h // 2:, :].mean()
    left, right = x[..., :, : w // 2].mean(), x[..., :, w - w // 2:].mean()
    return bool(top - bottom > 1.0 and abs(left - right) < 0.2)


def _photos(root: Path) -> Path:
    for c in ("a", "b"):
        for i in range(3):
            _phone_photo(root / c / f"phone {i}.jpg")
    return root


def test_decode_image_applies_the_exif_orientation(tmp_path):
    from PIL import Image

    path = _phone_photo(tmp_path / "p.jpg")
    assert Image.open(path).size == (48, 24), "stored sideways, as a phone does"
    img = decode_image(str(path))
    assert img.shape == (3, 48, 24) and _upright(img.float())
    assert decode_image(str(path), 1).shape == (1, 48, 24)
    plain = _phone_photo(tmp_path / "plain.jpg", orientation=1)
    assert decode_image(str(plain)).shape == (3, 24, 48) and not _upright(decode_image(str(plain)).float())


def test_every_dataset_split_and_the_cache_see_the_photo_upright(tmp_path):
    root = _photos(tmp_path / "photos")
    for cache in (False, True):
        b = get_data(dataset="imagefolder", data_dir=str(root), input_size=16, augment=("flip",), cache=cache)
        for name, split in (("train", b.train), ("evaluation", b.test), ("calibration", b.calib)):
            assert len(split) and all(_upright(split[i][0]) for i in range(len(split))), (name, cache)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_turns_a_tensor_as_pil_turns_the_image(tmp_path, orientation):
    """gpu.orient (for nvJPEG's output) against PIL's exif_transpose (decode_image), on a lossless PNG."""
    from PIL import Image

    arr = np.random.default_rng(orientation).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    Image.fromarray(arr).save(tmp_path / "o.png", exif=exif)
    stored = torch.from_numpy(arr).permute(2, 0, 1)
    assert torch.equal(G.orient(stored, orientation), decode_image(str(tmp_path / "o.png")))


def test_jpeg_orientation_reads_the_header(tmp_path):
    assert G.jpeg_orientation(_phone_photo(tmp_path / "p.jpg").read_bytes()) == 6
    assert G.jpeg_orientation(_phone_photo(tmp_path / "q.jpg", 1).read_bytes()) == 1
    assert G.jpeg_orientation(b"\xff\xd8 not really a jpeg") == 1


def _nvjpeg_stand_in(datas, channels, dev):
    """What torchvision.io.decode_jpeg(..., device=cuda) returns: the pixels as stored (apply_exif_orientation is
    False by default), uint8 C x H x W, RGB or GRAY; it refuses a JPEG it cannot decode with RuntimeError."""
    from PIL import Image

    out = []
    for data in datas:
        try:
            im = Image.open(io.BytesIO(data.numpy().tobytes()))
            arr = np.array(im.convert("RGB" if channels == 3 else "L"))
        except OSError as e:
            raise RuntimeError(str(e)) from None
        t = torch.from_numpy(arr)
        out.append((t.permute(2, 0, 1) if t.ndim == 3 else t[None]).contiguous().to(dev))
    return out


def test_the_gpu_path_turns_nvjpeg_output_upright(tmp_path, monkeypatch):
    root = _photos(tmp_path / "photos")
    raw = _nvjpeg_stand_in([torch.frombuffer(bytearray((root / "a" / "phone 0.jpg").read_bytes()),
                                             dtype=torch.uint8)], 3, torch.device("cpu"))[0]
    assert raw.shape == (3, 24, 48), "the stand-in, like nvJPEG, leaves the pixels sideways"
    calls = []
    monkeypatch.setattr(G, "_jpeg_decoder", lambda dev: lambda *a: calls.append(1) or _nvjpeg_stand_in(*a))
    b = get_data(dataset="imagefolder", data_dir=str(root), input_size=16, workers=0)
    for split in (b.train, b.test):
        dev = list(G.device_batches(split, list(range(len(split))), batch_size=4, device="cpu"))
        ref = list(make_loader(split, batch_size=4, shuffle=False))
        for (x1, y1), (x2, y2) in zip(ref, dev):
            assert torch.equal(y1, y2) and torch.allclose(x1, x2, atol=1e-6)
            assert all(_upright(x) for x in x2)
    assert calls, "the batch decoder was used"


def test_predict_sees_the_photo_upright(tmp_path, monkeypatch):
    """`edgeres predict` (its library function): what reaches the model is the upright photo (a recording runner
    stands in for the model)."""
    import edgeres.runners
    from edgeres.predict import predict

    seen = []

    class Recording:
        meta = {"input_size": 16, "in_channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3, "resize_size": 18,
                "class_names": ["a", "b"]}

        def infer(self, x):
            seen.append(torch.from_numpy(np.asarray(x)))
            return np.zeros((len(x), 2), dtype=np.float32)

        def close(self):
            pass

    monkeypatch.setattr(edgeres.runners, "open_runner", lambda artifact, threads=None: Recording())
    photo = _phone_photo(tmp_path / "IMG 0001.JPG")
    preds = predict(tmp_path / "model.onnx", [str(tmp_path)])
    assert [p.file for p in preds] == [str(photo)] and preds[0].top[0]["class"] in ("a", "b")
    assert len(seen) == 1 and seen[0].shape == (1, 3, 16, 16) and _upright(seen[0][0])
