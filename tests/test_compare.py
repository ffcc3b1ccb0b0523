"""`edgeres compare`: two real artifacts (ONNX Runtime, torch) on the same inputs."""
import copy
import json

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import export_tiny_onnx as _export

from edgeres.cli import main
from edgeres.compare import compare, find_probe, load_probe
from edgeres.errors import ArtifactError, DataError


@pytest.fixture(scope="module")
def arts(tmp_path_factory):
    import torch

    from edgeres.checkpoint import ModelMeta, save_checkpoint
    from edgeres.models import create_model

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("compare")
    model = create_model("resnet20", num_classes=10).eval()
    perturbed = copy.deepcopy(model)
    with torch.no_grad():   # a different classifier: the top-1 changes on some inputs
        perturbed.fc.weight.add_(0.5 * torch.randn_like(perturbed.fc.weight))
    mnist = create_model("mnist_resnet", num_classes=10).eval()
    meta = ModelMeta(arch="mnist_resnet", num_classes=10, in_channels=1, input_size=28, mean=(0.1307,),
                     std=(0.3081,))
    save_checkpoint(d / "mnist.pt", mnist, meta)
    x = np.random.default_rng(0).standard_normal((48, 3, 32, 32), dtype=np.float32)
    return {"dir": d, "x": x, "model": model,
            "a": _export(model, d / "a.onnx"),
            "a2": _export(model, d / "a2.onnx"),
            "b": _export(perturbed, d / "b.onnx"),
            "mnist_onnx": _export(mnist, d / "mnist.onnx", (1, 1, 28, 28)), "mnist_pt": d / "mnist.pt"}


def test_identical_models_agree(arts):
    r = compare(arts["a"], arts["a2"], arts["x"])
    assert r["samples"] == 48
    assert r["top1_agreement_pct"] == 100.0 and r["disagreements"] == 0
    assert r["cosine_mean"] == pytest.approx(1.0, abs=1e-6) and r["max_abs_diff"] < 1e-5
    assert "accuracy_pct" not in r["a"]


def test_onnx_against_torch_runner(arts):
    from edgeres.runners import TorchRunner

    r = compare(arts["a"], TorchRunner(arts["model"]), arts["x"], batch_size=16)
    assert r["b"]["backend"] == "torch" and r["a"]["backend"] == "onnxruntime"
    assert r["top1_agreement_pct"] == 100.0 and r["max_abs_diff"] < 1e-4


def test_perturbed_models_disagree_and_accuracy(arts):
    from edgeres.runners import open_runner

    ra = open_runner(arts["a"])
    labels = ra.infer(arts["x"]).argmax(1)   # labels = A's own predictions: A is 100 % right by construction
    r = compare(ra, arts["b"], arts["x"], labels)
    assert r["top1_agreement_pct"] < 100.0 and r["disagreements"] > 0
    assert r["cosine_mean"] < 0.9999 and r["cosine_min"] <= r["cosine_mean"]
    assert r["max_abs_diff"] > r["mean_abs_diff"] > 0
    assert r["a"]["accuracy_pct"] == 100.0
    assert r["b"]["accuracy_pct"] == pytest.approx(r["top1_agreement_pct"])


def test_mismatched_shapes_are_clear(arts):
    with pytest.raises(ArtifactError, match=r"different inputs: A \[3, 32, 32\], B \[1, 28, 28\]"):
        compare(arts["a"], arts["mnist_onnx"], arts["x"])
    with pytest.raises(ArtifactError, match=r"inputs are \[3, 32, 32\] but the artifacts expect \[1, 28, 28\]"):
        compare(arts["mnist_onnx"], arts["mnist_pt"], arts["x"])
    with pytest.raises(DataError, match="labels"):
        compare(arts["a"], arts["a2"], arts["x"], np.zeros(3))


def test_probe_files(arts, tmp_path):
    np.savez(tmp_path / "probe.npz", x=arts["x"][:8], y=np.arange(8) % 10)
    x, y = load_probe(tmp_path / "probe.npz")
    assert x.shape == (8, 3, 32, 32) and list(y) == list(np.arange(8) % 10)
    np.savez(tmp_path / "bad.npz", images=arts["x"][:2])
    with pytest.raises(DataError, match="no 'x' array"):
        load_probe(tmp_path / "bad.npz")
    (tmp_path / "sub").mkdir()
    assert find_probe(tmp_path / "sub" / "model.onnx") == tmp_path / "probe.npz"


def test_cli_probe_json_and_text(arts, tmp_path):
    np.savez(tmp_path / "probe.npz", x=arts["x"][:16], y=np.arange(16) % 10)
    cli = CliRunner()
    res = cli.invoke(main, ["compare", str(arts["a"]), str(arts["b"]), "--probe", str(tmp_path / "probe.npz"),
                            "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert {"max_abs_diff", "mean_abs_diff", "cosine_mean", "cosine_min", "top1_agreement_pct", "samples", "a",
            "b"} <= set(out)
    assert out["samples"] == 16 and "accuracy_pct" in out["a"] and "accuracy_pct" in out["b"]
    res = cli.invoke(main, ["compare", str(arts["a"]), str(arts["a2"]), "--probe", str(tmp_path / "probe.npz"),
                            "--limit", "4"])
    assert res.exit_code == 0 and "top-1 agreement  100.00 %" in res.output and "samples          4" in res.output


def test_cli_errors_are_one_line(arts, tmp_path):
    cli = CliRunner()
    res = cli.invoke(main, ["compare", str(arts["a"]), str(arts["b"])])   # no probe.npz near the artifact
    assert res.exit_code == 1 and "no inputs" in res.output and res.output.strip().count("\n") == 0
    np.savez(tmp_path / "probe.npz", x=arts["x"][:4])
    res = cli.invoke(main, ["compare", str(arts["a"]), str(arts["mnist_onnx"]), "--probe",
                            str(tmp_path / "probe.npz")])
    assert res.exit_code == 1 and "different inputs" in res.output and res.output.strip().count("\n") == 0
    res = cli.invoke(main, ["compare", str(arts["a"]), str(tmp_path / "missing.onnx"), "--probe",
                            str(tmp_path / "probe.npz")])
    assert res.exit_code == 1 and "not found" in res.output


def test_cli_dataset_mnist(arts, shared_data):
    res = CliRunner().invoke(main, ["compare", str(arts["mnist_onnx"]), str(arts["mnist_pt"]), "--dataset", "mnist",
                                    "--data-dir", str(shared_data / "mnist"), "--limit", "32", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["samples"] == 32 and out["top1_agreement_pct"] == 100.0 and out["max_abs_diff"] < 1e-4
    assert out["a"]["accuracy_pct"] == out["b"]["accuracy_pct"]   # same untrained net: same answers
