"""BN folding: exact on every family (plain, residual A/B, pre-activation, MNIST, bottleneck, DenseNet)."""
from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from edgeres.checkpoint import ModelMeta, save_checkpoint
from edgeres.cli import main
from edgeres.errors import CheckpointError, EdgeresError
from edgeres.fold import fold_batchnorm, fold_gate, load_folded, save_folded
from edgeres.models import create_model, list_archs


def _randomize_bn(model, seed: int = 0):
    """Trained-like BN statistics, so folding is not a no-op."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) * 0.6 - 0.3)
    return model.eval()


CASES = [  # arch, options, in_channels, input side, expect kept_affine
    ("resnet20", {}, 3, 32, False),                      # option A shortcut (slice + pad)
    ("resnet20", {"shortcut": "B"}, 3, 32, False),       # 1x1 projection + BN
    ("plain_resnet20", {}, 3, 32, False),
    ("mnist_resnet", {}, 1, 28, False),                  # 3x3 projection (B3)
    ("resnet18", {}, 3, 32, False),                      # ImageNet stem + max-pool
    ("resnet50", {}, 3, 32, False),                      # bottleneck
    ("preact_resnet20", {}, 3, 32, True),
    ("preact_mnist_resnet", {}, 1, 28, True),
    ("preact_resnet18", {}, 3, 32, True),
]
if "densenet_bc_100" in list_archs():
    CASES.append(("densenet_bc_100", {}, 3, 32, True))


def _bn_count(model) -> int:
    return sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize("arch,options,cin,side,kept", CASES, ids=[f"{c[0]}{c[1] or ''}" for c in CASES])
def test_fold_is_exact(arch, options, cin, side, kept):
    model = _randomize_bn(create_model(arch, num_classes=10, in_channels=cin, options=options))
    n_bn = _bn_count(model)
    result = fold_batchnorm(model)
    assert _bn_count(result.model) == 0
    assert _bn_count(model) == n_bn, "the input model must be left untouched"
    assert len(result.folded) + len(result.kept_affine) == n_bn
    assert bool(result.kept_affine) == kept
    x = torch.randn(8, cin, side, side, generator=torch.Generator().manual_seed(1))
    metrics, gates = fold_gate(model, result.model, x)
    assert all(g.passed for g in gates), [g.describe() for g in gates]
    assert metrics["rel_diff"] <= 1e-4 and metrics["top1_agreement_pct"] == 100.0


def test_fold_targets_the_right_batchnorms():
    res = fold_batchnorm(_randomize_bn(create_model("resnet20", num_classes=10, options={"shortcut": "B"})))
    assert "bn1" in res.folded and "layer2.0.downsample.1" in res.folded and "layer1.0.bn2" in res.folded
    assert res.model.conv1.bias is not None
    pre = fold_batchnorm(_randomize_bn(create_model("preact_resnet20", num_classes=10)))
    assert "layer1.0.bn2" in pre.folded           # BN right after conv1: folded
    assert "layer1.1.bn1" in pre.kept_affine      # BN after the residual add: kept
    assert "bn_final" in pre.kept_affine
    # the stem conv of a CIFAR pre-act net also feeds the identity shortcut: not foldable
    assert "layer1.0.bn1" in pre.kept_affine and "used elsewhere" in pre.reasons["layer1.0.bn1"]
    assert "kept" in pre.describe() and "layer1.1.bn1" in pre.describe()


def test_gate_fails_on_a_wrong_fold():
    model = _randomize_bn(create_model("resnet20", num_classes=10))
    res = fold_batchnorm(model)
    with torch.no_grad():
        res.model.layer3[2].conv2.bias.add_(0.5)  # a fold that forgot part of the shift
    _, gates = fold_gate(model, res.model, torch.randn(8, 3, 32, 32))
    assert not gates[0].passed


def test_no_batchnorm_is_an_error():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    with pytest.raises(EdgeresError, match="nothing to fold"):
        fold_batchnorm(model)


def _meta(arch="preact_mnist_resnet"):
    return ModelMeta(arch=arch, num_classes=10, in_channels=1, input_size=28, mean=(0.5,), std=(0.25,),
                     class_names=tuple("abcdefghij"))


def test_save_and_load_folded(tmp_path):
    model = _randomize_bn(create_model("preact_mnist_resnet", num_classes=10))
    res = fold_batchnorm(model)
    save_folded(tmp_path / "f.pt", res, _meta())
    loaded, meta = load_folded(tmp_path / "f.pt")
    assert meta.class_names == tuple("abcdefghij")
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), res.model(x))
    save_checkpoint(tmp_path / "plain.pt", model, _meta())
    with pytest.raises(CheckpointError, match="not a folded checkpoint"):
        load_folded(tmp_path / "plain.pt")


def test_cli_fold(tmp_path):
    model = _randomize_bn(create_model("preact_mnist_resnet", num_classes=10))
    save_checkpoint(tmp_path / "w.pt", model, _meta())
    out = tmp_path / "folded.pt"
    runner = CliRunner()
    r = runner.invoke(main, ["fold", "--weights", str(tmp_path / "w.pt"), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "kept 7 BatchNorm(s)" in r.output and "bn_final" in r.output and out.is_file()
    before = out.read_bytes()
    r = runner.invoke(main, ["fold", "--weights", str(tmp_path / "w.pt"), "--out", str(out)])
    assert r.exit_code == 1 and "already exists" in r.output and out.read_bytes() == before
    r = runner.invoke(main, ["fold", "--weights", str(tmp_path / "w.pt"), "--out", str(tmp_path / "x.pt"),
                             "--arch", "resnet20"])
    assert r.exit_code == 1 and "is a preact_mnist_resnet; pass --arch preact_mnist_resnet" in r.output
    assert len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "x.pt").exists()
    r = runner.invoke(main, ["fold", "--weights", str(tmp_path / "w.pt"), "--out", str(out), "--force", "--json"])
    assert r.exit_code == 0 and '"kept_affine"' in r.output
