"""FP32 training on real digits (tiny subset, tiny model): files, metrics, resume, schedules, CLI."""
from __future__ import annotations

import csv
import json
import warnings

import pytest
import torch
from click.testing import CliRunner

from edgeres.checkpoint import read_checkpoint
from edgeres.cli import main
from edgeres.data import DataBundle, get_data
from edgeres.errors import ConfigError
from edgeres.recipe import recipe_from_dict
from edgeres.train import lr_at, train

RECIPE = {"model": {"arch": "resnet20"},
          "data": {"dataset": "digits", "input_size": 16, "batch_size": 32, "workers": 0,
                   "augment": ["pad_crop", "flip"], "pad": 2},
          "train": {"epochs": 2, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True,
                    "weight_decay": 1e-4, "wd_exclude_bn_bias": True, "schedule": "multistep", "milestones": [1],
                    "label_smoothing": 0.1, "seed": 7}}


def small_bundle(n_train=96, n_test=64) -> DataBundle:
    b = get_data(dataset="digits", input_size=16, augment=("pad_crop", "flip"), pad=2, seed=7)
    sub = torch.utils.data.Subset
    return DataBundle(train=sub(b.train, range(n_train)), test=sub(b.test, range(n_test)),
                      calib=sub(b.calib, range(n_train)), info=b.info)


def test_train_writes_checkpoints_and_metrics(tmp_path):
    recipe = recipe_from_dict(RECIPE)
    res = train(recipe, tmp_path, quiet=True, data=small_bundle())
    assert res.best.is_file() and res.last.is_file() and len(res.history) == 2
    state, meta, rest = read_checkpoint(res.last)
    assert meta.arch == "resnet20" and meta.in_channels == 1 and meta.input_size == 16
    assert meta.mean == (0.3052,) and meta.class_names == tuple("0123456789") and meta.recipe_hash == recipe.hash()
    assert {"optimizer", "train_state", "rng"} <= set(rest) and rest["train_state"]["iteration"] == 6
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    with open(tmp_path / "metrics.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == [1, 2] and len(csv_rows) == 2
    assert set(csv_rows[0]) == {"epoch", "iteration", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5",
                                "test_loss", "test_top1", "test_top5", "lr", "images_per_s", "seconds"}
    assert rows[0]["lr"] == pytest.approx(0.05) and rows[1]["lr"] == pytest.approx(0.005)   # /10 at epoch 1
    # no holdout: nothing selects, best.pt is the last epoch (the test split only draws the curves)
    assert res.best_top1 == rows[-1]["test_top1"]
    _, best_meta, best_rest = read_checkpoint(res.best)
    assert best_meta == meta and best_rest["epoch"] == 2
    with pytest.raises(ConfigError, match="--resume"):
        train(recipe, tmp_path, quiet=True, data=small_bundle())


class _Counted(torch.utils.data.Dataset):
    """A split that counts how often each image is read."""

    def __init__(self, inner):
        self.inner, self.reads = inner, 0

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        self.reads += 1
        return self.inner[i]


def test_best_pt_is_selected_on_the_holdout_and_the_test_split_is_read_once(tmp_path):
    from edgeres.data import split_holdout

    b = small_bundle(n_train=128)
    b = split_holdout(b, 0.25, seed=7)
    test = _Counted(b.test)
    bundle = DataBundle(train=b.train, test=test, calib=b.calib, info=b.info, holdout=b.holdout)
    assert len(b.train) == 96 and len(b.holdout) == 32 and b.info.holdout_size == 32
    assert not set(b.train.indices) & set(b.holdout.indices), "held-out images are not trained on"
    res = train(recipe_from_dict(RECIPE), tmp_path, quiet=True, data=bundle)
    assert test.reads == len(test), "the test split is read once, after selection"
    rows = res.history
    assert all("val_top1" in r and "test_top1" not in r for r in rows)
    best = max(range(len(rows)), key=lambda i: rows[i]["val_top1"])
    _, _, rest = read_checkpoint(res.best)
    assert rest["epoch"] == rows[best]["epoch"] and rest["val_top1"] == rows[best]["val_top1"]
    from edgeres.checkpoint import load_model
    from edgeres.evaluate import evaluate

    assert res.best_top1 == pytest.approx(evaluate(load_model(res.best)[0], b.test).top1)
    with pytest.raises(ConfigError, match="data.holdout"):
        split_holdout(b, 1.0, seed=0)


def test_resume_matches_uninterrupted_run(tmp_path):
    full = recipe_from_dict(RECIPE)
    a = train(full, tmp_path / "a", quiet=True, data=small_bundle())
    half = full.with_overrides({"train.epochs": 1})
    train(half, tmp_path / "b", quiet=True, data=small_bundle())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the recipe changed (epochs 1 -> 2): a warning, not an error
        b = train(full, tmp_path / "b", resume=True, quiet=True, data=small_bundle())
    sa, _, _ = read_checkpoint(a.last)
    sb, _, _ = read_checkpoint(b.last)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [r["train_loss"] for r in a.history] == [r["train_loss"] for r in b.history]
    with pytest.raises(ConfigError, match="nothing to resume"):
        train(full, tmp_path / "c", resume=True, quiet=True, data=small_bundle())


def test_adam_learns_digits(tmp_path):
    recipe = recipe_from_dict({**RECIPE, "data": {**RECIPE["data"], "batch_size": 16},
                               "train": {"epochs": 2, "optimizer": "adam", "lr": 0.002, "weight_decay": 0,
                                                   "schedule": "cosine", "warmup_epochs": 0.5, "warmup_lr": 0.0005}})
    res = train(recipe, tmp_path, quiet=True, data=small_bundle(n_train=256, n_test=64))
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]
    assert res.best_top1 > 25.0   # 10 classes: chance is 10%


def test_lr_schedules():
    t = recipe_from_dict({"train": {"lr": 0.1, "schedule": "multistep", "milestones": [32000, 48000],
                                    "milestone_unit": "iteration"}}).train
    assert [lr_at(t, i, 390, 64000, False) for i in (0, 31999, 32000, 48000)] == pytest.approx([0.1, 0.1, 0.01, 0.001])
    w = recipe_from_dict({"train": {"lr": 0.1, "warmup_lr": 0.01, "warmup_until_error": 80.0}}).train
    assert lr_at(w, 5, 390, 64000, True) == 0.01 and lr_at(w, 5, 390, 64000, False) == 0.1
    c = recipe_from_dict({"train": {"lr": 1.0, "schedule": "cosine", "warmup_epochs": 1, "warmup_lr": 0.0}}).train
    assert lr_at(c, 0, 10, 110, False) == 0.0 and lr_at(c, 5, 10, 110, False) == pytest.approx(0.5)
    assert lr_at(c, 10, 10, 110, False) == pytest.approx(1.0) and lr_at(c, 60, 10, 110, False) == pytest.approx(0.5)


def test_cli_train_and_errors(tmp_path):
    r = CliRunner().invoke(main, ["train", "--help"])
    assert r.exit_code == 0 and "--resume" in r.output and "--recipe" in r.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: 0\n")
    r = CliRunner().invoke(main, ["train", "--recipe", str(bad), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "train.epochs" in r.output and str(bad) in r.output
    r = CliRunner().invoke(main, ["train", "--dataset", "imagefolder", "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "--data-dir" in r.output and len(r.output.strip().splitlines()) == 1
    rec = tmp_path / "tiny.yaml"
    rec.write_text("model: {arch: resnet20}\ndata: {dataset: digits, input_size: 8, batch_size: 128, workers: 0}\n"
                   "train: {epochs: 1, optimizer: adam, lr: 0.01}\n")
    r = CliRunner().invoke(main, ["train", "--recipe", str(rec), "--out", str(tmp_path / "run"), "--json",
                                  "--seed", "3", "--mean", "0.3", "--std", "0.3"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["epochs"] == 1 and out["meta"]["mean"] == [0.3] and (tmp_path / "run" / "best.pt").is_file()
