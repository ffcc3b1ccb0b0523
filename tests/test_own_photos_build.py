"""Issue 33's first hour, end to end: a flat folder of class folders (a PNG, a grayscale, a CMYK, an EXIF-rotated
phone photo, a truncated JPEG, a text file named .jpg, a 3-image class) through `edgeres build --data-dir DIR --int8`
with no other flag: all the bad files named at once before anything trains, then (--skip-bad-images) the summary
lines, the scan report with the skipped files, the split files and the small-class warning."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgeres.cli import main

pytestmark = pytest.mark.slow


def _photo(path: Path, seed: int, mode: str = "RGB", exif=None) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    a = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
    a[:, :16] = (seed * 37) % 255   # a left half that says which way up the photo is
    im = Image.fromarray(a).convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, **({"exif": exif} if exif is not None else {}))


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    from PIL import Image

    root = tmp_path_factory.mktemp("user") / "My Photos"
    for c, name in enumerate(("cats", "dogs", "fish")):
        for i in range(10):
            _photo(root / name / f"IMG {i:03d}.jpg", 10 * c + i)
    for i in range(3):
        _photo(root / "rare bird" / f"bird {i}.jpg", 100 + i)
    _photo(root / "cats" / "scan.png", 200)
    _photo(root / "dogs" / "old photo.jpg", 201, "L")
    _photo(root / "fish" / "print.jpg", 202, "CMYK")
    ex = Image.Exif()
    ex[0x0112] = 6   # a phone photo stored sideways: shown upright by every decode path (tests/test_exif.py)
    _photo(root / "cats" / "phone.jpg", 203, exif=ex)
    data = (root / "dogs" / "IMG 000.jpg").read_bytes()
    (root / "dogs" / "truncated.jpg").write_bytes(data[:len(data) // 2])
    (root / "fish" / "notes.jpg").write_text("not a photo\n")
    return root


def test_every_bad_file_is_named_at_once_before_anything_trains(photos, tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["build", "--data-dir", str(photos), "--int8", "--out", str(out)])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "2 image file(s) cannot be read" in r.output
    assert "dogs/truncated.jpg: truncated" in r.output and "fish/notes.jpg: not an image" in r.output
    assert "[train]" not in r.output and not out.exists(), "refused before the run folder is made"


def test_a_plain_class_folder_to_a_verdict(photos, tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["build", "--data-dir", str(photos), "--int8", "--skip-bad-images",
                                  "--bench-seconds", "0", "--out", str(out)])
    text = " ".join(r.output.split())
    assert r.exit_code in (0, 1), r.output   # a verdict either way: a weak model may fail its INT8 gates
    assert "it holds 4 class folders and no train/val split" in text
    assert "weights: no published ImageNet resnet18 weights on this machine" in text
    assert "data: " + str(photos) + " (class folders), split 80/20 train/evaluation per class: 4 classes" in text
    assert "2 unreadable skipped" in text and "per class (train/holdout/evaluation): cats" in text
    assert "note: 4 class(es) with fewer than 10 evaluation images" in text and "rare bird" in text
    assert "input 128 px, resize 146, batch 8; 30 epoch(s)" in text and "recipe imagenette_resnet18" in text
    assert "note: batch 8 instead of the recipe's 64: the training split has 27 images" in text
    assert "2 unreadable (skipped): dogs/truncated.jpg (truncated)" in text
    assert "1 turned upright (EXIF)" in text
    scan = json.loads((out / "data_report.json").read_text())
    assert {u["path"] for u in scan["unreadable"]} == {"dogs/truncated.jpg", "fish/notes.jpg"}
    split = json.loads((out / "data_split.json").read_text())
    assert set(split) == {"train", "holdout", "evaluation"}
    assert sum(len(v) for v in split.values()) == 12 + 11 + 11 + 3   # every readable photo, in one split
    assert not set(split["train"]) & set(split["evaluation"])
    train = next(json.loads(line) for line in (out / "stages.jsonl").read_text().splitlines()
                 if json.loads(line)["stage"] == "train")
    assert train["metrics"]["data_report"]["unreadable"] == scan["unreadable"]
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["unreadable"] == scan["unreadable"] and report["verdict"] != "PASSED"
