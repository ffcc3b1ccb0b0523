"""Issue 33: every image file of a dataset looked at once, up front (edgeres/data/scan.py): what decodes, why the
others do not (all of them in one error), small classes, identical files across the splits, in a few short lines."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edgeres.data import get_data, split_holdout
from edgeres.data import scan as S
from edgeres.errors import DataError


def _photo(path: Path, seed: int, mode: str = "RGB", fmt: str | None = None, exif=None, shape=(18, 22)) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).convert(mode)
    kw = {"exif": exif} if exif is not None else {}
    im.save(path, format=fmt, **kw)
    return path


def _rotated(path: Path) -> Path:
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6   # a phone held upright
    return _photo(path, 7, fmt="JPEG", exif=exif.tobytes())


def _truncated(path: Path, keep: int = -300) -> Path:
    """A JPEG whose last 300 bytes (its pixel data's end) are missing: the header reads, the decode fails."""
    _photo(path, 8, fmt="JPEG", shape=(48, 48))
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    return path


def test_each_file_decoded_with_its_mode_size_hash_or_reason(tmp_path):
    ok = S.scan_file(str(_photo(tmp_path / "a.jpg", 1, fmt="JPEG")))
    assert ok.ok and ok.format == "JPEG" and ok.mode == "RGB" and ok.size == (22, 18) and len(ok.sha256) == 64
    assert S.scan_file(str(_photo(tmp_path / "g.png", 2, "L"))).mode == "L"
    assert S.scan_file(str(_photo(tmp_path / "k.jpg", 3, "CMYK", fmt="JPEG"))).mode == "CMYK"
    assert S.scan_file(str(_rotated(tmp_path / "r.jpg"))).orientation == 6
    cut = S.scan_file(str(_truncated(tmp_path / "cut.jpg")))
    assert not cut.ok and cut.reason == "truncated" and cut.mode == "RGB" and cut.size == (48, 48), cut
    head = S.scan_file(str(_truncated(tmp_path / "head.jpg", keep=100)))   # ends inside its header
    assert not head.ok and head.reason == "truncated" and head.mode is None, head
    (tmp_path / "notes.jpg").write_text("shopping list\n")
    text = S.scan_file(str(tmp_path / "notes.jpg"))
    assert not text.ok and text.reason == "not an image" and "shopping" in text.detail
    (tmp_path / "empty.png").write_bytes(b"")
    assert S.scan_file(str(tmp_path / "empty.png")).reason == "empty file"


def test_too_large_is_refused_from_the_header(tmp_path, monkeypatch):
    monkeypatch.setattr(S, "MAX_IMAGE_PIXELS", 100)
    big = S.scan_file(str(_photo(tmp_path / "big.png", 1)))
    assert not big.ok and big.reason == "too large" and "22x18" in big.detail


def _items(tmp_path: Path) -> list[tuple[str, int, str]]:
    """3 classes; cat has a truncated JPEG and a text file named .jpg; owl has 3 images; one evaluation photo is
    a byte copy of a training one, and one training photo is in two class folders."""
    items = []
    for c, (label, n) in {"cat": (0, 8), "dog": (1, 8), "owl": (2, 3)}.items():
        for i in range(n):
            split = "evaluation" if i < 2 else "train"
            items.append((str(_photo(tmp_path / c / f"{i}.png", 100 * label + i)), label, split))
    _photo(tmp_path / "dog" / "copy.png", 5)                    # = cat/5.png (train) ...
    items.append((str(tmp_path / "dog" / "copy.png"), 1, "train"))
    leak = (tmp_path / "cat" / "leak.png")
    leak.write_bytes((tmp_path / "cat" / "7.png").read_bytes())   # evaluation copy of a training image
    items.append((str(leak), 0, "evaluation"))
    items.append((str(_truncated(tmp_path / "cat" / "cut.jpg")), 0, "train"))
    (tmp_path / "cat" / "notes.jpg").write_text("not a photo")
    items.append((str(tmp_path / "cat" / "notes.jpg"), 0, "train"))
    return items


def test_report_counts_bad_files_small_classes_and_duplicates(tmp_path):
    seen = []
    report = S.scan_files(_items(tmp_path), class_names=["cat", "dog", "owl"], root=str(tmp_path), min_images=5,
                          progress=lambda d, t: seen.append((d, t)))
    assert report["files"] == 23 and report["bad_count"] == 2
    assert report["counts"]["train"] == [6, 7, 1] and report["counts"]["evaluation"] == [3, 2, 2], "readable ones"
    assert report["images"] == {"train": 14, "holdout": 0, "evaluation": 7}
    assert {(u["path"], u["reason"]) for u in report["unreadable"]} == {("cat/cut.jpg", "truncated"),
                                                                         ("cat/notes.jpg", "not an image")}
    assert [c["class"] for c in report["small_classes"]] == ["owl"] and report["small_classes"][0]["images"] == 3
    groups = {tuple(sorted(f["path"] for f in g["files"])): g for g in report["duplicates"]}
    assert groups[("cat/5.png", "dog/copy.png")]["classes_differ"]
    assert not groups[("cat/5.png", "dog/copy.png")]["leak"]
    assert groups[("cat/7.png", "cat/leak.png")]["leak"] and report["evaluation_in_training"] == 1
    assert seen[0] == (0, 23) and seen[-1] == (23, 23) and len(seen) == 24
    import json

    json.dumps(report)   # JSON-able: it goes into stages.jsonl and report.json


def test_all_bad_files_in_one_error_unless_skipped(tmp_path):
    report = S.scan_files(_items(tmp_path), class_names=["cat", "dog", "owl"], root=str(tmp_path))
    with pytest.raises(DataError) as e:
        S.check_readable(report, skip_bad_images=False)
    text = str(e.value)
    assert text.startswith("2 image file(s) cannot be read") and "--skip-bad-images" in text
    assert "cat/cut.jpg: truncated" in text and "cat/notes.jpg: not an image" in text
    S.check_readable(report, skip_bad_images=True)


def test_summary_is_a_few_lines_of_80_columns(tmp_path):
    report = S.scan_files(_items(tmp_path), class_names=["cat", "dog", "owl"], root=str(tmp_path), min_images=5)
    lines = S.format_report(report)
    assert 3 <= len(lines) <= 10 and all(len(line) <= 80 for line in lines), lines
    text = " ".join(" ".join(lines).split())
    assert "2 unreadable (cannot be read)" in text and "cat/cut.jpg (truncated)" in text
    assert "owl 3" in text and "(1 evaluation image(s) in training, 1 in two classes)" in text
    many = dict(report, unreadable=[{"path": f"cat/{'x' * 30}{i}.jpg", "reason": "truncated"} for i in range(9)])
    lines = S.format_report(many)
    assert all(len(line) <= 80 for line in lines) and "3.jpg (truncated), ... (5 more in the data report)" in \
        " ".join(" ".join(lines).split()), lines


def test_scan_runs_on_a_bounded_pool_in_parallel(tmp_path, monkeypatch):
    active, peak, lock = [0], [0], threading.Lock()
    both = threading.Barrier(2, timeout=10)   # broken (an error) unless two files are read at once

    def fake(path, label=0, split="train", *, channels=3):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        if int(Path(path).stem) < 2:
            both.wait()
        time.sleep(0.01)
        with lock:
            active[0] -= 1
        return S.FileScan(path, label, split, True, sha256=path, mode="RGB")

    monkeypatch.setattr(S, "scan_file", fake)
    report = S.scan_files([(f"/x/{i}", 0, "train") for i in range(40)], workers=2)
    assert report["files"] == 40 and peak[0] == 2
    S.scan_files([(f"/x/{i}", 0, "train") for i in range(40)], workers=64)
    assert peak[0] <= S.MAX_WORKERS


def test_scan_of_a_photo_folder_bundle_and_skipped_files(tmp_path):
    root = tmp_path / "photos"
    for k, (c, n) in enumerate((("cat", 5), ("dog", 6))):
        for i in range(n):
            _photo(root / c / f"{i}.jpg", 10 * k + i, fmt="JPEG")
    _truncated(root / "dog" / "cut.jpg")
    bundle = get_data(dataset="imagefolder", data_dir=str(root), input_size=16)
    report = S.scan_bundle(bundle, min_images=6)
    assert report["images"]["train"] + report["images"]["evaluation"] == 11 and report["bad_count"] == 1
    assert report["files"] == 12
    assert report["unreadable"][0]["path"] == "dog/cut.jpg" and not report["unreadable"][0]["skipped"]
    assert [c["class"] for c in report["small_classes"]] == ["cat"]
    with pytest.raises(DataError, match="dog/cut.jpg: truncated"):
        S.check_readable(report, skip_bad_images=False)
    held = S.scan_bundle(split_holdout(bundle, 0.3, seed=0))
    assert held["images"]["holdout"] == 3 and held["images"]["train"] == report["images"]["train"] - 3
    skipping = get_data(dataset="imagefolder", data_dir=str(root), input_size=16, skip_bad_images=True)
    rep = S.scan_bundle(skipping)
    assert rep["images"]["train"] + rep["images"]["evaluation"] == 11 and rep["files"] == 12
    assert rep["unreadable"] == [{"path": "dog/cut.jpg", "split": rep["unreadable"][0]["split"], "class": "dog",
                                  "reason": "truncated", "detail": rep["unreadable"][0]["detail"], "skipped": True}]
    S.check_readable(rep, skip_bad_images=True)
    assert "1 unreadable (skipped)" in "\n".join(S.format_report(rep))


def test_in_memory_data_gets_counts_only():
    bundle = get_data(dataset="digits")
    report = S.scan_bundle(bundle)
    assert report["in_memory"] and report["files"] == 0 and report["unreadable"] == []
    assert report["images"]["train"] == bundle.info.train_size and sum(report["counts"]["evaluation"]) == 359
    assert report["classes"] == [str(i) for i in range(10)] and report["small_classes"] == []
    assert S.format_report(report)[0].startswith("scan: in-memory data: train 1438")
