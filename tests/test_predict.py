"""`edgeres predict`: files, folders and globs; .pt and .onnx agree; text, JSON and CSV; the model's preprocessing."""
from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
from click.testing import CliRunner

from edgeres.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_and_images(tmp_path_factory):
    from PIL import Image
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("predict")
    r = CliRunner().invoke(main, ["train", "--arch", "mnist_resnet", "--epochs", "2", "--input-size", "16",
                                  "--quiet", "--out", str(root / "train")])
    assert r.exit_code == 0, r.output
    ck = root / "train" / "best.pt"
    onnx = root / "model.onnx"
    r = CliRunner().invoke(main, ["export", "--weights", str(ck), "--out", str(onnx)])
    assert r.exit_code == 0, r.output
    digits = load_digits()
    images = root / "images" / "nested"
    images.mkdir(parents=True)
    labels = {}
    for i in range(1500, 1512):   # from the demo's test split region; 8x8 grey digits scaled to 0..255
        name = images / f"digit{i}.png"
        Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).save(name)
        labels[str(name)] = int(digits.target[i])
    return ck, onnx, root / "images", labels


def test_pt_and_onnx_agree_on_a_folder(model_and_images):
    ck, onnx, folder, labels = model_and_images
    runs = []
    for artifact in (ck, onnx):
        r = CliRunner().invoke(main, ["predict", str(artifact), str(folder), "--json", "--top-k", "3"])
        assert r.exit_code == 0, r.output
        runs.append(json.loads(r.stdout))
    a, b = runs
    assert [p["file"] for p in a] == sorted(labels) == [p["file"] for p in b]
    for pa, pb in zip(a, b):
        assert [t["index"] for t in pa["top"]] == [t["index"] for t in pb["top"]]
        assert all(abs(x["score"] - y["score"]) < 1e-4 for x, y in zip(pa["top"], pb["top"]))
        assert [t["rank"] for t in pa["top"]] == [1, 2, 3]
        assert pa["top"][0]["score"] >= pa["top"][1]["score"] >= pa["top"][2]["score"]
    correct = sum(p["top"][0]["index"] == labels[p["file"]] for p in a)
    assert correct >= 8, f"{correct}/12: the model's own preprocessing was not applied"
    assert a[0]["top"][0]["class"] == str(a[0]["top"][0]["index"])   # digits' class names are "0".."9"


def test_glob_file_and_csv(model_and_images):
    ck, _, folder, labels = model_and_images
    first = sorted(labels)[0]
    r = CliRunner().invoke(main, ["predict", str(ck), str(folder / "nested" / "digit150*.png"), first, "--csv",
                                  "--top-k", "2"])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    files = sorted({row["file"] for row in rows})
    assert files == sorted(f for f in labels if "digit150" in f)   # the glob, with the single file de-duplicated
    assert len(rows) == 2 * len(files) and {row["rank"] for row in rows} == {"1", "2"}
    r = CliRunner().invoke(main, ["predict", str(ck), first])
    assert r.exit_code == 0 and r.stdout.startswith(f"{first}: ") and r.stdout.count("%") == 5


def test_bad_inputs(model_and_images, tmp_path):
    ck, _, folder, _ = model_and_images
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    r = CliRunner().invoke(main, ["predict", str(ck), str(bad)])
    assert r.exit_code == 1 and "corrupt or unreadable image" in r.stderr
    r = CliRunner().invoke(main, ["predict", str(ck), str(bad), str(folder), "--skip-bad-images", "--json"])
    assert r.exit_code == 0 and len(json.loads(r.stdout)) == 12
    r = CliRunner().invoke(main, ["predict", str(ck), str(tmp_path / "*.jpg")])
    assert r.exit_code == 1 and "no file matches" in r.stderr
    r = CliRunner().invoke(main, ["predict", str(ck), str(tmp_path / "empty")])
    assert r.exit_code == 1 and "image not found" in r.stderr
