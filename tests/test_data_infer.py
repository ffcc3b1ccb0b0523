"""--data-dir without --dataset: the folder decides the dataset (said in one line), or the command is refused."""
from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from edgeres.cli import main
from edgeres.data.infer import dataset_for, infer_dataset
from edgeres.errors import ConfigError


def _photos(root, classes=("cat", "dog"), n=4):
    from PIL import Image

    rng = np.random.default_rng(1)
    for split in ("train", "val"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def test_infer_each_layout(tmp_path, shared_data):
    assert infer_dataset(_photos(tmp_path / "p"))[0] == "imagefolder"
    assert infer_dataset(shared_data / "mnist")[0] == "mnist"
    c = tmp_path / "c" / "cifar-10-batches-py"
    c.mkdir(parents=True)
    (c / "data_batch_1").write_bytes(b"x")
    (c / "test_batch").write_bytes(b"x")
    assert infer_dataset(tmp_path / "c")[0] == "cifar10"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="cannot tell which dataset it holds .* pass --dataset"):
        infer_dataset(tmp_path / "empty")
    assert dataset_for(str(tmp_path / "p"), None, "digits")[0] == "imagefolder"
    assert dataset_for(str(tmp_path / "p"), None, "imagefolder") == (None, None)   # the recipe's own: as it is
    assert dataset_for(str(tmp_path / "p"), "mnist", "digits") == ("mnist", None)   # an explicit --dataset wins


def test_build_with_a_data_dir_and_no_dataset_is_never_ignored(tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["build", "--data-dir", str(tmp_path / "empty"), "--out", str(out)])
    assert r.exit_code == 1 and "cannot tell which dataset it holds" in r.output and not out.exists()
    photos = _photos(tmp_path / "photos")
    r = CliRunner().invoke(main, ["train", "--data-dir", str(photos), "--epochs", "1", "--arch", "resnet20",
                                  "--input-size", "16", "--batch-size", "4", "--holdout", "0", "--quiet",
                                  "--json", "--out", str(tmp_path / "t")])
    assert r.exit_code == 0, r.output
    assert "is taken as --dataset imagefolder (it holds train/ and val/ with 2 class folders)" in r.output
    import json

    summary = json.loads(r.output[r.output.index("{"):])
    assert summary["meta"]["dataset"] == "imagefolder" and summary["meta"]["class_names"] == ["cat", "dog"]
