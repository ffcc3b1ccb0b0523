"""The engineer's path: the wheel carries what commands need, build flags instead of YAML, defaults that follow
the data, a small dataset, fine-tuning a published checkpoint, eval without --data-dir, honest small messages."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edgeres.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """A small ImageFolder of real PNG files: 2 classes (dark / bright), 16 train and 6 val images each."""
    from PIL import Image

    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("val", 6)):
        for c, base in (("dark", 40), ("bright", 200)):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                px = np.clip(base + rng.normal(0, 25, (40, 48, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(px).save(root / split / c / f"{i}.png")
    return root


def test_a_changed_dataset_brings_its_own_defaults(tmp_path):
    from edgeres.build import BuildOptions, _resolve_recipe

    demo = _resolve_recipe(BuildOptions(out=tmp_path))
    assert demo.data.input_size == 32 and demo.data.dataset == "digits"
    photos = _resolve_recipe(BuildOptions(out=tmp_path, dataset="imagefolder", data_dir="x"))
    assert photos.data.input_size is None          # -> the dataset's own: 224 for photos, not the demo's 32
    assert photos.data.augment == ("random_resized_crop", "flip")
    sized = _resolve_recipe(BuildOptions(out=tmp_path, dataset="imagefolder", data_dir="x",
                                         overrides={"data.input_size": 64, "quant.calib_size": 20}))
    assert sized.data.input_size == 64 and sized.quant.calib_size == 20


@pytest.mark.slow
def test_small_imagefolder_builds_from_flags_and_a_changed_size_never_reuses_the_probe(tiny_folder, tmp_path):
    run = tmp_path / "run"
    common = ["build", "--recipe", "demo", "--dataset", "imagefolder", "--data-dir", str(tiny_folder), "--arch",
              "mnist_resnet",
              "--epochs", "2", "--batch-size", "8", "--lr", "0.01", "--int8", "--qat-epochs", "0", "--max-drop", "100",
              "--bench-seconds", "0", "--out", str(run)]
    r = CliRunner().invoke(main, [*common, "--input-size", "32"])
    assert r.exit_code == 0, r.output
    assert "calibrating on all 29 images (the recipe asks 256)" in r.output   # 32 less the 10 % holdout
    assert "evaluating" in r.stderr                       # no silent minutes: evaluation shows a bar
    ptq = next(json.loads(ln) for ln in (run / "stages.jsonl").read_text().splitlines() if '"ptq"' in ln)
    assert ptq["metrics"]["calib_size"] == 29
    with np.load(run / "probe.npz") as z:
        assert z["x"].shape[1:] == (3, 32, 32)
    r = CliRunner().invoke(main, [*common, "--input-size", "48"])
    assert r.exit_code == 0, r.output
    with np.load(run / "probe.npz") as z:
        assert z["x"].shape[1:] == (3, 48, 48)
    r = CliRunner().invoke(main, [*common, "--input-size", "48", "--calib-size", "500"])
    assert r.exit_code == 1 and "--calib-size 500: the calibration split has 29 images" in r.stderr
    # the checkpoint knows its dataset and where it was: eval needs neither flag
    r = CliRunner().invoke(main, ["eval", "--weights", str(run / "train" / "best.pt"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["n"] == 12


def _published_1000_class(path: Path):
    from edgeres.models import create_model

    torch.manual_seed(1)
    model = create_model("mnist_resnet", num_classes=1000, in_channels=3)
    torch.save({k: v for k, v in model.state_dict().items()}, path)   # a plain state_dict, no edgeres metadata
    return model


def test_load_backbone_reinitialises_only_a_classifier_of_another_size(tmp_path):
    from edgeres.checkpoint import load_backbone
    from edgeres.errors import CheckpointError
    from edgeres.models import create_model

    src = _published_1000_class(tmp_path / "pub.pth")
    torch.manual_seed(2)
    model = create_model("mnist_resnet", num_classes=2, in_channels=3)
    fc_before = model.fc.weight.clone()
    assert load_backbone(model, tmp_path / "pub.pth") == ["fc.weight", "fc.bias"]
    assert torch.equal(model.conv1.weight, src.conv1.weight) and torch.equal(model.fc.weight, fc_before)
    other = create_model("resnet20", num_classes=2)
    with pytest.raises(CheckpointError, match="does not fit the model"):
        load_backbone(other, tmp_path / "pub.pth")


def test_backbone_lr_scale_makes_two_groups(tmp_path):
    from edgeres.models import create_model
    from edgeres.recipe import load_recipe
    from edgeres.train import _optimizer

    model = create_model("mnist_resnet", num_classes=2, in_channels=3)
    cfg = load_recipe("finetune_imagefolder").train
    opt = _optimizer(model, cfg)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([cfg.lr * 0.1, cfg.lr])
    assert {id(p) for p in opt.param_groups[1]["params"]} == {id(model.fc.weight), id(model.fc.bias)}


@pytest.mark.slow
def test_fine_tune_a_1000_class_checkpoint_on_two_classes(tiny_folder, tmp_path):
    _published_1000_class(tmp_path / "pub.pth")
    lenient = tmp_path / "lenient.yaml"   # one epoch on 24 images: FP32 quality is not what this test is about
    lenient.write_text("gates: {fp32_over_chance_sigma: 0}\n")
    base = ["build", "--dataset", "imagefolder", "--data-dir", str(tiny_folder), "--arch", "mnist_resnet",
            "--input-size", "32", "--epochs", "1", "--batch-size", "8", "--bench-seconds", "0", "--recipe",
            str(lenient)]
    r = CliRunner().invoke(main, [*base, "--pretrained", str(tmp_path / "pub.pth"), "--out", str(tmp_path / "a")])
    assert r.exit_code == 1 and "predicts 1000 classes, the dataset has 2: fine-tune it instead with --init-from" \
        in " ".join(r.output.split())   # said once, on the verdict line
    r = CliRunner().invoke(main, [*base, "--init-from", str(tmp_path / "pub.pth"), "--backbone-lr-scale", "0.1",
                                  "--out", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    assert "classifier re-initialised for 2 classes" in r.output
    from edgeres.checkpoint import read_checkpoint

    _, meta, _ = read_checkpoint(tmp_path / "b" / "train" / "best.pt")
    assert meta.num_classes == 2 and meta.class_names == ("bright", "dark")


def test_check_says_when_a_model_is_not_quantized(tmp_path):
    from helpers import export_tiny_onnx

    from edgeres.models import create_model

    path = export_tiny_onnx(create_model("resnet20", num_classes=10), tmp_path / "fp32.onnx")
    r = CliRunner().invoke(main, ["check", str(path)])
    assert r.exit_code == 0
    assert "not quantized (no Q/DQ nodes" in r.stdout and "ok (0 Q" not in r.stdout


def test_a_gate_miss_is_never_printed_as_100_percent():
    from edgeres.cli.quant import _pct

    assert _pct(99.99) == "99.99%" and _pct(99.999) == "99.99%" and _pct(100.0) == "100.00%"   # percent in


def test_shell_completion_script():
    p = subprocess.run([sys.executable, "-m", "edgeres"], capture_output=True, text=True,
                       env={**os.environ, "_EDGERES_COMPLETE": "bash_source"})
    assert p.returncode == 0 and "_edgeres_completion" in p.stdout


@pytest.mark.slow
def test_the_wheel_runs_the_demo_outside_the_checkout(tmp_path):
    """Build the wheel, install it into a fresh venv (its dependencies from this one), run `edgeres build` on the
    embedded default from a folder outside the checkout: everything a command needs ships in the wheel."""
    import site
    import venv

    dist = tmp_path / "dist"
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(dist), str(REPO)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    wheel = next(dist.glob("edgeres-*.whl"))
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    py = env_dir / "bin" / "python"
    fresh_site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                     capture_output=True, text=True, check=True).stdout.strip())
    p = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(fresh_site),
                        str(wheel)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    # the dependencies (torch, nncf, onnx...) from this venv, appended after the wheel: a plain path entry, so this
    # venv's editable edgeres (a .pth hook) is not picked up
    (fresh_site / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    work = tmp_path / "elsewhere"
    work.mkdir()
    p = subprocess.run([str(py), "-c", "import edgeres, sys; print(edgeres.__file__)"], capture_output=True,
                       text=True, cwd=work, env={**os.environ, "PYTHONPATH": ""})
    assert p.stdout.startswith(str(fresh_site)), p.stdout + p.stderr
    p = subprocess.run([str(py), "-m", "edgeres", "build", "--arch", "mnist_resnet", "--epochs", "3", "--int8",
                        "--qat-epochs", "0", "--max-drop", "100", "--bench-seconds", "0", "--quiet", "--out", "run"],
                       capture_output=True, text=True, cwd=work, timeout=900, env={**os.environ, "PYTHONPATH": ""})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert (work / "run" / "export" / "model_int8.onnx").is_file() and (work / "run" / "report.html").is_file()
    assert "recipes" in {q.name for q in (fresh_site / "edgeres").iterdir()}
