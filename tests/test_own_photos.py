"""Issue 33, "your own photos, first try": any folder of class folders is a dataset (split here, the same split every
time), a folder holding one dataset is found, and mistakes (a file, an archive, a run folder, a typo) get one line
saying what to do instead."""
from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edgeres.cli import main
from edgeres.data import get_data, get_data_for, split_files
from edgeres.data.infer import dataset_for, find_layout, infer_dataset, split_class_files
from edgeres.errors import ConfigError, DataError
from edgeres.models.registry import ARCHS, get_spec
from edgeres.recipe import load_recipe
from edgeres.suggest import close_matches, did_you_mean, unknown_name


def _photo(path: Path, seed: int, mode: str = "RGB") -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(rng.integers(0, 256, (18, 22, 3), dtype=np.uint8))
    im = im.convert(mode) if mode != "RGB" else im
    im.save(path, quality=90) if path.suffix.lower() in (".jpg", ".jpeg") else im.save(path)


def _classes(root: Path, counts: dict[str, int]) -> Path:
    for c, n in counts.items():
        for i in range(n):
            _photo(root / c / f"img {i}.jpg", hash((c, i)) % 1000)
    return root


def test_class_folders_alone_are_split_per_class(tmp_path):
    root = _classes(tmp_path / "photos", {"cat": 10, "dog": 6, "yak": 2})
    b = get_data(dataset="imagefolder", data_dir=str(root), input_size=16)
    assert b.info.class_names == ("cat", "dog", "yak") and b.info.layout == "class folders"
    assert b.info.val_split == 0.2 and b.info.root == str(root)
    per_class = np.bincount(b.test.source.labels, minlength=3).tolist()
    assert per_class == [2, 1, 1], "20 % of each class, at least one, never the whole class"
    assert (b.info.train_size, b.info.test_size) == (14, 4)
    assert not set(b.train.source.files) & set(b.test.source.files)
    assert b.test[0][0].shape == (3, 16, 16)
    wider = get_data(dataset="imagefolder", data_dir=str(root), input_size=16, val_split=0.5)
    assert np.bincount(wider.test.source.labels).tolist() == [5, 3, 1]
    assert wider.info.fingerprint != b.info.fingerprint, "another split is other data"
    again = get_data(dataset="imagefolder", data_dir=str(root), input_size=16)
    assert again.info.fingerprint == b.info.fingerprint and again.test.source.files == b.test.source.files


def test_the_split_depends_on_file_names_only(tmp_path):
    """Not on listing order (nor on creation order, nor on where the folder lives): copied elsewhere in another
    order, the same files are evaluated; one photo added moves no other."""
    files = {c: [Path(f"/a/{c}/{i}.jpg") for i in range(9)] for c in ("x", "y")}
    train, evaluation, alone = split_class_files(files, Path("/a"), 0.3)
    shuffled = {c: random.Random(1).sample(v, len(v)) for c, v in reversed(files.items())}
    assert split_class_files(shuffled, Path("/a"), 0.3)[1] == evaluation and not alone
    moved = {c: [Path("/elsewhere") / p.relative_to("/a") for p in v] for c, v in files.items()}
    assert [p.name for p in split_class_files(moved, Path("/elsewhere"), 0.3)[1]["x"]] == \
        [p.name for p in evaluation["x"]]
    assert split_class_files(files, Path("/a"), 0.3, seed=1)[1] != evaluation, "the seed draws"
    grown = {**files, "x": files["x"] + [Path("/a/x/new.jpg")]}
    assert set(evaluation["x"]) <= set(split_class_files(grown, Path("/a"), 0.3)[1]["x"]) | {Path("/a/x/new.jpg")}
    with pytest.raises(ConfigError, match="val_split"):
        split_class_files(files, Path("/a"), 0.0)


def test_a_one_image_class_stays_in_train_with_a_warning(tmp_path):
    root = _classes(tmp_path / "p", {"a": 5, "b": 1})
    with pytest.warns(UserWarning, match="b hold one image: it is kept for training"):
        d = get_data(dataset="imagefolder", data_dir=str(root), input_size=16)
    assert sorted(d.train.source.labels.tolist()) == [0, 0, 0, 0, 1] and d.test.source.labels.tolist() == [0]


def test_split_files_name_train_holdout_and_evaluation(tmp_path):
    root = _classes(tmp_path / "p", {"cat": 10, "dog": 10})
    recipe = load_recipe("demo").with_overrides({"data.dataset": "imagefolder", "data.data_dir": str(root),
                                                 "data.input_size": 16, "data.holdout": 0.25, "data.mean": [0.5],
                                                 "data.std": [0.25], "data.augment": []})
    files = split_files(get_data_for(recipe))
    assert list(files) == ["train", "holdout", "evaluation"]
    assert [len(v) for v in files.values()] == [12, 4, 4]
    everything = sorted(str(p.relative_to(root)) for p in root.rglob("*.jpg"))
    assert sorted(sum(files.values(), [])) == everything, "each photo in exactly one split"
    assert "cat/img 0.jpg" in everything
    assert split_files(get_data(dataset="digits")) is None
    other = split_files(get_data_for(recipe.with_overrides({"data.val_split": 0.5})))
    assert len(other["evaluation"]) == 10


def test_a_folder_holding_one_dataset_is_taken_and_named(tmp_path):
    photos = _classes(tmp_path / "download" / "photos", {"cat": 3, "dog": 3})
    (tmp_path / "download" / "__MACOSX").mkdir()
    (tmp_path / "download" / "README.txt").write_text("my photos")
    name, why = infer_dataset(tmp_path / "download")
    assert name == "imagefolder" and why.startswith("its sub-folder photos/ holds 2 class folders and no train/val")
    assert find_layout(tmp_path / "download").root == photos
    b = get_data(dataset="imagefolder", data_dir=str(tmp_path / "download"), input_size=16)
    assert b.info.root == str(photos) and b.info.class_names == ("cat", "dog")
    nested = tmp_path / "in" / "imagenette"
    for split in ("train", "val"):
        _classes(nested / split, {"a": 2, "b": 2})
    assert infer_dataset(tmp_path / "in")[1] == "its sub-folder imagenette/ holds train/ and val/ with 2 class folders"
    plain = get_data(dataset="imagefolder", data_dir=str(nested), input_size=16)
    assert get_data(dataset="imagefolder", data_dir=str(tmp_path / "in"), input_size=16).info.fingerprint == \
        plain.info.fingerprint == get_data(dataset="imagefolder", data_dir=str(nested), input_size=16).info.fingerprint
    # the note: the layout and the folder taken, even when the recipe's dataset is imagefolder already
    _, note = dataset_for(str(tmp_path / "download"), None, "imagefolder")
    assert note == f"data: --data-dir {tmp_path / 'download'}: {why}"
    assert dataset_for(str(nested), None, "imagefolder") == (None, None)
    assert dataset_for(str(photos), None, "digits")[1].startswith(f"data: --data-dir {photos} is taken as --dataset "
                                                                  f"imagefolder (it holds 2 class folders")
    two = tmp_path / "two"
    _classes(two / "x", {"a": 2, "b": 2})
    _classes(two / "y", {"a": 2, "b": 2})
    assert find_layout(two).root == two, "two sub-folders of photos: they are the classes"


def test_users_folder_of_odd_photos(tmp_path):
    """The photos a new user has: PNG, grayscale, CMYK, spaces in names, a 6-image class, a truncated JPEG and a text
    file named .jpg (found and skipped with --skip-bad-images, named without it)."""
    root = tmp_path / "My Photos"
    _classes(root, {"birds": 8, "cats": 8, "dogs": 8, "fish": 8, "tiny class": 6})
    _photo(root / "cats" / "scan.png", 1)
    _photo(root / "dogs" / "old photo.png", 2, "L")
    _photo(root / "fish" / "print.jpg", 3, "CMYK")
    data = (root / "birds" / "img 0.jpg").read_bytes()
    (root / "birds" / "truncated.jpg").write_bytes(data[:len(data) // 2])
    (root / "fish" / "notes.jpg").write_text("not a photo")
    b = get_data(dataset="imagefolder", data_dir=str(root), input_size=16, skip_bad_images=True)
    assert b.info.skipped_images == 2 and b.info.num_classes == 5
    assert np.bincount(b.test.source.labels).tolist() == [2, 2, 2, 2, 1]
    for ds in (b.train, b.test):
        assert all(ds[i][0].shape == (3, 16, 16) for i in range(len(ds)))
    strict = get_data(dataset="imagefolder", data_dir=str(root), input_size=16)
    bad = [i for i, f in enumerate(strict.train.source.files + strict.test.source.files) if "notes" in f]
    ds, i = (strict.train, bad[0]) if bad[0] < len(strict.train) else (strict.test, bad[0] - len(strict.train))
    with pytest.raises(DataError, match="notes.jpg.*--skip-bad-images"):
        ds[i]


def test_a_file_or_an_archive_as_data_dir_is_one_line(tmp_path):
    photo = tmp_path / "cat.jpg"
    _photo(photo, 0)
    with pytest.raises(ConfigError, match=r"cat.jpg is a file, not a folder: .* use `edgeres predict MODEL .*cat.jpg`"):
        infer_dataset(photo)
    with pytest.raises(DataError, match="is a file, not a folder"):
        get_data(dataset="imagefolder", data_dir=str(photo))
    archive = tmp_path / "photos.tar.gz"
    archive.write_bytes(b"\x1f\x8b")
    with pytest.raises(ConfigError, match="photos.tar.gz is an archive: unpack it first"):
        infer_dataset(archive)
    with pytest.raises(DataError, match="is an archive: unpack it first"):
        get_data(dataset="imagefolder", data_dir=str(archive))
    _classes(tmp_path / "one", {"only": 3})
    with pytest.raises(DataError, match="has 1 class folder with images \\(only\\); a classifier needs at least 2"):
        get_data(dataset="imagefolder", data_dir=str(tmp_path / "one"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no class folders of images"):
        get_data(dataset="imagefolder", data_dir=str(tmp_path / "empty"))


def test_typos_get_a_guess():
    assert close_matches("resnet-18", ARCHS) == ["resnet18"]
    assert close_matches("ResNet50", ["resnet50", "resnet56"])[0] == "resnet50"
    with pytest.raises(ConfigError) as e:
        get_spec("resnet-18")
    assert str(e.value) == "unknown architecture 'resnet-18'; did you mean resnet18?"
    with pytest.raises(ConfigError) as e:
        get_spec("vgg")
    assert len(str(e.value)) < 160 and "`edgeres archs` lists them" in str(e.value)
    with pytest.raises(ConfigError, match="unknown dataset 'imagefolders'; did you mean imagefolder\\?"):
        get_data(dataset="imagefolders")
    assert unknown_name("recipe", "dmeo", ["demo", "mnist"]) == "unknown recipe 'dmeo'; did you mean demo?"
    assert unknown_name("x", "zzz", ["a", "b"]) == "unknown x 'zzz'; valid: a, b"
    assert unknown_name("x", "zzz", list("abcdefgh"), shown=2, list_all="see y") == \
        "unknown x 'zzz'; valid: a, b, ... (6 more; see y)"
    assert did_you_mean("imagefolders", ["digits", "imagefolder"]) == "; did you mean imagefolder?"
    assert did_you_mean("svhn", ["digits", "imagefolder"]) == ""
    r = CliRunner().invoke(main, ["summary", "--arch", "resnet-18"])
    assert r.exit_code == 1 and r.stderr.strip() == "Error: unknown architecture 'resnet-18'; did you mean resnet18?"


def _run_folder(root: Path) -> Path:
    for rel in ("export/model_int8.onnx", "export/model_fp32.onnx", "train/best.pt"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    return root


def test_predict_says_which_file_of_a_run_folder_to_use(tmp_path):
    run = _run_folder(tmp_path / "runs" / "demo")
    _photo(tmp_path / "a.jpg", 0)
    r = CliRunner().invoke(main, ["predict", str(run), str(tmp_path / "a.jpg")])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.stderr.strip() == (f"Error: {run} is a folder; give one model file: edgeres predict "
                                f"{run / 'export/model_int8.onnx'} IMAGES... (or {run / 'export/model_fp32.onnx'}, "
                                f"{run / 'train/best.pt'})")
    (tmp_path / "empty").mkdir()
    r = CliRunner().invoke(main, ["predict", str(tmp_path / "empty"), str(tmp_path / "a.jpg")])
    assert r.exit_code == 1 and "is a folder with no model in it" in r.stderr
    shutil.copy(tmp_path / "a.jpg", tmp_path / "photos.zip")
    r = CliRunner().invoke(main, ["predict", str(run / "export/model_int8.onnx"), str(tmp_path / "photos.zip")])
    assert r.exit_code == 1 and r.stderr.strip().startswith(f"Error: {tmp_path / 'photos.zip'} is an archive: "
                                                            f"unpack it first")
    assert r.stderr.count("\n") == 1


def test_recipes_fingerprint_and_loader_still_agree_for_train_val_folders(tmp_path):
    """The train/ + val/ layout keeps its own split and its fingerprint (runs made before keep theirs)."""
    import hashlib
    import os

    root = tmp_path / "tv"
    for split in ("train", "val"):
        _classes(root / split, {"a": 2, "b": 2})
    b = get_data(dataset="imagefolder", data_dir=str(root), input_size=16)
    digest = hashlib.sha256()
    for split in ("train", "val"):
        for label, c in enumerate(("a", "b")):
            for f in sorted((root / split / c).iterdir()):
                digest.update(f"{os.path.relpath(f, root)}\0{os.path.getsize(f)}\0{label}\n".encode())
    assert b.info.fingerprint == digest.hexdigest() and b.info.layout == "train/val" and b.info.val_split is None
    assert torch.is_tensor(b.test[0][0])
