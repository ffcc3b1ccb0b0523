"""A refused build changes nothing: checked before the folder is touched (no folder, no .lock, nothing rewritten)."""
from __future__ import annotations

import importlib.util

import numpy as np
from click.testing import CliRunner

from edgeres.cli import main


def test_int8_without_nncf_is_refused_before_training(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nncf" else real(name, *a))
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["build", "--int8", "--out", str(out)])
    assert r.exit_code == 1 and "--int8 needs NNCF for PTQ and QAT: pip install 'edgeres[quant]'" in r.output
    assert not out.exists()


def test_bad_data_leaves_no_folder_and_no_lock(tmp_path):
    from PIL import Image

    photos = tmp_path / "photos"
    for split in ("train", "val"):
        (photos / split / "only").mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(photos / split / "only" / "a.png")
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["build", "--dataset", "imagefolder", "--data-dir", str(photos), "--out", str(out)])
    lines = r.output.strip().splitlines()
    assert r.exit_code == 1 and lines[-1].startswith("Error: ") and "class folder" in lines[-1]
    assert sum(line.startswith("Error") for line in lines) == 1 and "Traceback" not in r.output
    assert not out.exists(), "refused before the run folder (or its .lock) was made"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = CliRunner().invoke(main, ["build", "--dataset", "imagefolder", "--data-dir", str(photos), "--out", str(out)])
    assert r.exit_code == 1 and sorted(p.name for p in out.iterdir()) == ["keep.txt"]
