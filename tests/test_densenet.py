"""DenseNet in the registry: published parameter counts, torchvision naming, shapes, fx and ONNX export."""
from __future__ import annotations

import pytest
import torch

from edgeres.errors import ConfigError
from edgeres.models import create_model, get_spec, list_archs
from edgeres.models.densenet import DenseNet, bc_block_config


def torchvision_layout(*, growth: int, blocks: tuple[int, ...], init: int, num_classes: int, in_channels: int = 3,
                       bn_size: int = 4, stem: str = "imagenet") -> dict[str, tuple[int, ...]]:
    """State-dict names and shapes as torchvision's DenseNet builds them, derived here independently."""
    out: dict[str, tuple[int, ...]] = {}

    def bn(prefix: str, c: int) -> None:
        for k in ("weight", "bias", "running_mean", "running_var"):
            out[f"{prefix}.{k}"] = (c,)
        out[f"{prefix}.num_batches_tracked"] = ()

    k0 = 7 if stem == "imagenet" else 3
    out["features.conv0.weight"] = (init, in_channels, k0, k0)
    if stem == "imagenet":
        bn("features.norm0", init)
    c = init
    for b, n in enumerate(blocks, 1):
        for i in range(1, n + 1):
            p = f"features.denseblock{b}.denselayer{i}"
            bn(f"{p}.norm1", c)
            out[f"{p}.conv1.weight"] = (bn_size * growth, c, 1, 1)
            bn(f"{p}.norm2", bn_size * growth)
            out[f"{p}.conv2.weight"] = (growth, bn_size * growth, 3, 3)
            c += growth
        if b != len(blocks):
            bn(f"features.transition{b}.norm", c)
            out[f"features.transition{b}.conv.weight"] = (c // 2, c, 1, 1)
            c //= 2
    bn("features.norm5", c)
    out["classifier.weight"] = (num_classes, c)
    out["classifier.bias"] = (num_classes,)
    return out


def n_params(layout: dict[str, tuple[int, ...]]) -> int:
    total = 0
    for name, shape in layout.items():
        if name.endswith(("running_mean", "running_var", "num_batches_tracked")):
            continue
        size = 1
        for s in shape:
            size *= s
        total += size
    return total


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch,published", [("densenet121", 7_978_856), ("densenet169", 14_149_480),
                                            ("densenet201", 20_013_928), ("densenet161", 28_681_000)])
def test_imagenet_param_counts_match_published(arch, published):
    assert count(create_model(arch, num_classes=1000)) == published


def test_densenet_bc_100_params_match_formula_and_paper():
    layout = torchvision_layout(growth=12, blocks=(16, 16, 16), init=24, num_classes=10, stem="cifar")
    expected = n_params(layout)
    model = create_model("densenet_bc_100", num_classes=10)
    assert count(model) == expected == 769_162
    assert 0.76e6 <= expected <= 0.80e6  # the paper's "0.8M"
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == layout


def test_torchvision_state_dict_loads_unchanged():
    layout = torchvision_layout(growth=32, blocks=(6, 12, 24, 16), init=64, num_classes=1000)
    g = torch.Generator().manual_seed(0)
    state = {k: (torch.tensor(7) if not shape else torch.randn(shape, generator=g)) for k, shape in layout.items()}
    model = create_model("densenet121", num_classes=1000)
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(model.features.denseblock3.denselayer24.conv2.weight,
                       state["features.denseblock3.denselayer24.conv2.weight"])
    assert torch.equal(model.classifier.bias, state["classifier.bias"])


@pytest.mark.parametrize("arch,size,cin,classes", [("densenet121", 32, 3, 1000), ("densenet121", 96, 3, 7),
                                                   ("densenet121", 224, 3, 1000), ("densenet121", 64, 1, 5),
                                                   ("densenet_bc_100", 32, 3, 10), ("densenet_bc_100", 28, 1, 10),
                                                   ("densenet_bc_100", 40, 3, 100)])
def test_forward_shapes(arch, size, cin, classes):
    model = create_model(arch, num_classes=classes, in_channels=cin).eval()
    with torch.no_grad():
        out = model(torch.randn(2, cin, size, size))
    assert out.shape == (2, classes)
    assert torch.isfinite(out).all()


def test_dense_block_is_concatenation_of_all_previous_outputs():
    """Each layer sees [input, out_1, ..., out_{i-1}] and the block returns all of them, in that order."""
    model = DenseNet(growth_rate=4, block_config=(3,), num_init_features=6, num_classes=3, in_channels=2,
                     stem="cifar").eval()
    block = model.features.denseblock1
    x = torch.randn(2, 6, 8, 8)
    feats = [x]
    with torch.no_grad():
        for layer in (block.denselayer1, block.denselayer2, block.denselayer3):
            feats.append(layer(torch.cat(feats, 1)))
        assert torch.allclose(block(x), torch.cat(feats, 1))
    assert block(x).shape[1] == 6 + 3 * 4


def test_registry_specs():
    for name in ("densenet121", "densenet169", "densenet201", "densenet161", "densenet_bc_100"):
        assert name in list_archs()
        assert get_spec(name).family == "densenet"
    assert get_spec("densenet121").input_size == 224
    assert get_spec("densenet_bc_100").input_size == 32
    assert bc_block_config(100) == (16, 16, 16) and bc_block_config(40) == (6, 6, 6)
    with pytest.raises(ConfigError, match="6n\\+4"):
        bc_block_config(99)
    with pytest.raises(ConfigError, match="no option"):
        create_model("densenet121", options={"growth_rate": 12})


def test_fx_trace_matches_eager():
    model = create_model("densenet_bc_100", num_classes=10, in_channels=1).eval()
    traced = torch.fx.symbolic_trace(model)
    cats = [n for n in traced.graph.nodes if n.op == "call_function" and n.target is torch.cat]
    assert len(cats) == 48  # one per dense layer
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(traced(x), model(x), atol=1e-5)


def test_onnx_export_matches_torch(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = DenseNet(growth_rate=8, block_config=(2, 3), num_init_features=16, num_classes=4, in_channels=3,
                     stem="imagenet").eval()
    with torch.no_grad():  # non-trivial BN statistics
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 64, 64)
    path = tmp_path / "densenet.onnx"
    torch.onnx.export(model, (x,), str(path), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, dynamo=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"input": x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    assert abs(got - want).max() < 1e-4
