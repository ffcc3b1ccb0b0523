"""Recipes: every built-in loads; bad keys, types and ranges are errors naming the key and the file."""
from __future__ import annotations

import pytest

from edgeres.errors import ConfigError
from edgeres.recipe import Recipe, list_recipes, load_recipe, recipe_from_dict, recipes_dir


def test_builtin_recipes_load_and_cover_the_issue():
    names = list_recipes()
    for required in ("demo", "mnist", "cifar10_resnet20", "cifar10_resnet110", "imagenet_resnet18",
                     "imagenet_resnet50"):
        assert required in names
    for name in names:
        r = load_recipe(name)
        assert isinstance(r, Recipe) and r.source.endswith(f"{name}.yaml")
    c = load_recipe("cifar10_resnet20").train
    assert (c.optimizer, c.lr, c.momentum, c.weight_decay) == ("sgd", 0.1, 0.9, 1e-4)
    assert (c.milestones, c.milestone_unit, c.max_iterations) == ((32000, 48000), "iteration", 64000)
    assert load_recipe("cifar10_resnet110").train.warmup_until_error == 80.0
    m = load_recipe("mnist")
    assert (m.train.optimizer, m.train.lr, m.data.batch_size) == ("adam", 1e-3, 32)
    assert m.data.augment == ("pad_crop",) and m.train.schedule == "cosine"   # tuned: >= 99 % in 2 epochs
    t = load_recipe("mnist_tutorial")   # the tutorial as written: pad 4 + random crop 32 + flip, constant lr
    assert (t.train.optimizer, t.train.lr, t.data.batch_size, t.data.pad) == ("adam", 1e-3, 32, 4)
    assert t.data.augment == ("pad_crop", "flip") and t.train.schedule == "constant"


def write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("text,needle", [
    ("train:\n  epochz: 3\n", "train.epochz"),
    ("trian:\n  epochs: 3\n", "trian"),
    ("train:\n  epochs: three\n", "train.epochs"),
    ("train:\n  epochs: 0\n", "train.epochs"),
    ("train:\n  lr: -1\n", "train.lr"),
    ("train:\n  nesterov: 1\n", "train.nesterov"),
    ("data:\n  dataset: svhn\n", "data.dataset"),
    ("data:\n  augment: [cutout]\n", "data.augment"),
    ("data:\n  mean: 0.5\n", "data.mean"),
    ("train:\n  milestones: [30, 10]\n", "train.milestones"),
    ("gates:\n  min_int8_agreement: 101\n", "gates.min_int8_agreement"),
])
def test_bad_recipe_names_key_and_file(tmp_path, text, needle):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_recipe(p)
    assert needle in str(e.value) and str(p) in str(e.value)


def test_not_yaml_and_unknown_name(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(write(tmp_path, "train: [unclosed\n"))
    with pytest.raises(ConfigError, match="unknown recipe 'nope'.*demo"):
        load_recipe("nope")


def test_overrides_hash_and_yaml_round_trip(tmp_path):
    r = load_recipe("demo")
    r2 = r.with_overrides({"train.epochs": 3, "data.dataset": "mnist", "train.lr": None, "data.mean": (0.5,)})
    assert (r2.train.epochs, r2.data.dataset, r2.train.lr, r2.data.mean) == (3, "mnist", r.train.lr, (0.5,))
    assert r2.hash() != r.hash() and r.hash() == load_recipe("demo").hash()
    with pytest.raises(ConfigError, match="train.epochs"):
        r.with_overrides({"train.epochs": -2})
    with pytest.raises(ConfigError, match="bogus"):
        r.with_overrides({"bogus": 1})
    back = load_recipe(write(tmp_path, r2.to_yaml()))
    assert back == r2 and back.hash() == r2.hash()
    assert recipe_from_dict({}) == Recipe()
    assert recipes_dir().is_dir()
