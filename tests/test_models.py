"""The ResNet zoo: parameter counts derived from the architecture, shortcuts, variants, shapes, errors."""
from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from edgeres.errors import ConfigError
from edgeres.models import create_model, get_spec, list_archs

RESNET_FAMILIES = ("imagenet", "cifar", "mnist")
IMAGENET_LAYERS = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)), 50: ("bottleneck", (3, 4, 6, 3)),
                   101: ("bottleneck", (3, 4, 23, 3)), 152: ("bottleneck", (3, 8, 36, 3))}
CIFAR_DEPTHS = (20, 32, 44, 56, 110, 1202)
VARIANTS = {"": "residual", "plain_": "plain", "preact_": "preact"}
# torchvision's published counts at 1000 classes.
TORCHVISION_PARAMS = {18: 11_689_512, 34: 21_797_672, 50: 25_557_032, 101: 44_549_160, 152: 60_192_808}
# He et al. 2015, table 6 (CIFAR-10): 0.27M / 0.46M / 0.66M / 0.85M / 1.7M / 19.4M, and the digits printed.
PAPER_CIFAR = {20: (0.27, 2), 32: (0.46, 2), 44: (0.66, 2), 56: (0.85, 2), 110: (1.7, 1), 1202: (19.4, 1)}


pytestmark = pytest.mark.usefixtures("one_thread")


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def resnet_names() -> list[str]:
    return [n for n in list_archs() if get_spec(n).family in RESNET_FAMILIES]


def parse_name(name: str) -> tuple[str, str, int | None]:
    """'preact_resnet50' -> ('preact', 'imagenet', 50); 'plain_mnist_resnet' -> ('plain', 'mnist', None)."""
    m = re.fullmatch(r"(plain_|preact_)?(mnist_resnet|resnet(\d+))", name)
    assert m, f"registry name {name!r} does not follow the naming scheme"
    variant = VARIANTS[m.group(1) or ""]
    if m.group(2) == "mnist_resnet":
        return variant, "mnist", None
    depth = int(m.group(3))
    return variant, ("imagenet" if depth in IMAGENET_LAYERS else "cifar"), depth


# ---------------------------------------------------------------- the architecture formula

def conv(cin: int, cout: int, k: int) -> int:
    return k * k * cin * cout            # no bias: every conv is followed by a BN (or is pre-activated)


def bn(c: int) -> int:
    return 2 * c                         # weight and bias (running stats are buffers)


def expected_params(variant: str, family: str, depth: int | None, *, num_classes: int, in_channels: int,
                    shortcut: str) -> int:
    """Count parameters layer by layer from the papers' description (He et al. 2015 / 2016)."""
    preact = variant == "preact"
    if family == "imagenet":
        block, layers = IMAGENET_LAYERS[depth]
        widths, stem_out = (64, 128, 256, 512), 64
        total = conv(in_channels, 64, 7) + bn(64)        # 7x7/2 conv, BN (kept by pre-act ImageNet nets too)
    else:
        n = 2 if family == "mnist" else (depth - 2) // 6
        block, layers = "basic", (n, n, n)
        widths, stem_out = (16, 32, 64), 16
        total = conv(in_channels, 16, 3) + (0 if preact else bn(16))  # pre-act CIFAR: conv straight into block
    expansion = 4 if block == "bottleneck" else 1
    cin = stem_out
    for stage, (n_blocks, planes) in enumerate(zip(layers, widths)):
        for j in range(n_blocks):
            stride = 2 if (stage > 0 and j == 0) else 1
            cout = planes * expansion
            if block == "basic":
                body = conv(cin, planes, 3) + bn(planes) + conv(planes, planes, 3) + bn(planes)
                if preact:   # BN(cin)-ReLU-conv-BN-ReLU-conv
                    body = bn(cin) + conv(cin, planes, 3) + bn(planes) + conv(planes, planes, 3)
            else:
                body = (conv(cin, planes, 1) + bn(planes) + conv(planes, planes, 3) + bn(planes)
                        + conv(planes, cout, 1) + bn(cout))
                if preact:
                    body = (bn(cin) + conv(cin, planes, 1) + bn(planes) + conv(planes, planes, 3) + bn(planes)
                            + conv(planes, cout, 1))
            proj = 0
            if variant != "plain" and (stride != 1 or cin != cout):
                k = {"A": 0, "B": 1, "B3": 3}[shortcut]
                if k:
                    proj = conv(cin, cout, k) + (0 if preact else bn(cout))  # pre-act projection: no BN
            total += body + proj
            cin = cout
    if preact:
        total += bn(cin)                 # the final BN-ReLU before the pool
    return total + cin * num_classes + num_classes


def cifar_option_a_closed_form(n: int) -> int:
    """resnet(6n+2), option A, 10 classes, summed by hand:
    stem 3*9*16 + 2*16 = 464; stage 1: n * 2*(9*16*16 + 32) = 4672 n;
    stage 2: (9*16*32 + 64) + (9*32*32 + 64) + 2(n-1)*(9*32*32 + 64) = 13952 + 18560 (n-1);
    stage 3: (9*32*64 + 128) + (9*64*64 + 128) + 2(n-1)*(9*64*64 + 128) = 55552 + 73984 (n-1); fc 64*10 + 10 = 650.
    """
    return 464 + 4672 * n + 13952 + 18560 * (n - 1) + 55552 + 73984 * (n - 1) + 650


# ---------------------------------------------------------------- the registry and parameter counts

def test_registry_holds_every_resnet_of_the_issue():
    expected = set()
    for prefix in VARIANTS:
        expected |= {f"{prefix}resnet{d}" for d in (*IMAGENET_LAYERS, *CIFAR_DEPTHS)}
        expected.add(f"{prefix}mnist_resnet")
    assert set(resnet_names()) == expected
    for name in expected:
        _, family, _ = parse_name(name)
        spec = get_spec(name)
        assert spec.family == family
        assert (spec.input_size, spec.in_channels) == {"imagenet": (224, 3), "cifar": (32, 3),
                                                       "mnist": (28, 1)}[family]


@pytest.mark.parametrize("name", resnet_names())
def test_parameter_count_follows_the_architecture(name):
    variant, family, depth = parse_name(name)
    num_classes = 1000 if family == "imagenet" else 10
    shortcut = {"imagenet": "B", "cifar": "A", "mnist": "B3"}[family]
    model = create_model(name, num_classes=num_classes)
    assert n_params(model) == expected_params(variant, family, depth, num_classes=num_classes,
                                              in_channels=get_spec(name).in_channels, shortcut=shortcut)


@pytest.mark.parametrize("depth", sorted(TORCHVISION_PARAMS))
def test_imagenet_counts_equal_torchvision(depth):
    model = create_model(f"resnet{depth}", num_classes=1000)
    assert n_params(model) == TORCHVISION_PARAMS[depth]
    assert expected_params("residual", "imagenet", depth, num_classes=1000, in_channels=3,
                           shortcut="B") == TORCHVISION_PARAMS[depth]


@pytest.mark.parametrize("depth", CIFAR_DEPTHS)
def test_cifar_counts_match_the_paper(depth):
    n = (depth - 2) // 6
    count = n_params(create_model(f"resnet{depth}", num_classes=10))
    exact = cifar_option_a_closed_form(n)
    assert exact == expected_params("residual", "cifar", depth, num_classes=10, in_channels=3, shortcut="A")
    assert count == exact
    paper, digits = PAPER_CIFAR[depth]
    assert round(count / 1e6, digits) == paper


def test_resnet20_exact_count_pinned():
    # 97216 n - 21926 with n = 3 (see cifar_option_a_closed_form); the well-known 0.27M resnet20.
    assert n_params(create_model("resnet20", num_classes=10)) == 269_722


@pytest.mark.parametrize("depth", (20, 56))
def test_option_b_adds_two_projections(depth):
    a = create_model(f"resnet{depth}", num_classes=10)
    b = create_model(f"resnet{depth}", num_classes=10, options={"shortcut": "B"})
    # 1x1 conv + BN: 16->32 and 32->64
    assert n_params(b) - n_params(a) == conv(16, 32, 1) + bn(32) + conv(32, 64, 1) + bn(64) == 2752
    assert n_params(b) == expected_params("residual", "cifar", depth, num_classes=10, in_channels=3, shortcut="B")
    for stage in (b.layer2, b.layer3):
        ds = stage[0].downsample
        assert isinstance(ds, nn.Sequential) and len(ds) == 2
        assert isinstance(ds[0], nn.Conv2d) and ds[0].kernel_size == (1, 1) and ds[0].stride == (2, 2)
        assert ds[0].out_channels == 2 * ds[0].in_channels
        assert isinstance(ds[1], nn.BatchNorm2d)
    assert b.layer1[0].downsample is None
    assert all(blk.downsample is None for stage in (b.layer2, b.layer3) for blk in stage[1:])


def test_num_classes_and_in_channels_are_parameters():
    m = create_model("resnet18", num_classes=7, in_channels=1)
    assert m.fc.out_features == 7 and m.conv1.weight.shape == (64, 1, 7, 7)
    assert n_params(m) == expected_params("residual", "imagenet", 18, num_classes=7, in_channels=1, shortcut="B")
    assert m.eval()(torch.randn(2, 1, 64, 64)).shape == (2, 7)
    m = create_model("resnet20", num_classes=100, in_channels=4)
    assert m.conv1.weight.shape == (16, 4, 3, 3)
    assert m.eval()(torch.randn(1, 4, 32, 32)).shape == (1, 100)
    assert create_model("mnist_resnet").conv1.in_channels == 1          # the family's default
    assert create_model("resnet18").fc.out_features == 1000


# ---------------------------------------------------------------- option A

def test_option_a_is_parameter_free():
    model = create_model("resnet56", num_classes=10)
    assert not [n for n in model.state_dict() if "downsample" in n]
    assert not [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    for stage in (model.layer2, model.layer3):
        ds = stage[0].downsample
        assert ds is not None, "option A shortcut missing where the shape changes"
        assert sum(p.numel() for p in ds.parameters()) == 0
        assert not list(ds.buffers())


@pytest.mark.parametrize("side", (8, 7))
def test_option_a_subsamples_and_pads_with_zeros(side):
    model = create_model("resnet20", num_classes=10)
    ds = model.layer2[0].downsample                      # 16 -> 32 channels, stride 2
    torch.manual_seed(0)
    x = torch.rand(2, 16, side, side) + 0.5              # strictly positive: a zero can only come from padding
    out = ds(x)
    sub = x[:, :, ::2, ::2]
    assert out.shape == (2, 32, sub.shape[2], sub.shape[3])
    data = [c for c in range(32) if out[:, c].abs().sum() > 0]
    assert len(data) == 16 and data == list(range(data[0], data[0] + 16)), "input channels must stay contiguous"
    lo = data[0]
    assert torch.equal(out[:, lo:lo + 16], sub)
    padded = [c for c in range(32) if c not in data]
    assert torch.equal(out[:, padded], torch.zeros(2, 16, *sub.shape[2:]))


def test_option_a_is_what_the_block_adds():
    """With the residual branch silenced, a downsampling block outputs relu(zero-padded x[:, :, ::2, ::2])."""
    model = create_model("resnet20", num_classes=10).eval()
    blk = model.layer3[0]
    with torch.no_grad():
        nn.init.zeros_(blk.bn2.weight)
        nn.init.zeros_(blk.bn2.bias)
        x = torch.randn(1, 32, 8, 8)
        out = blk(x)
    expected = torch.relu(blk.downsample(x))
    assert torch.equal(out, expected)
    assert out.shape == (1, 64, 4, 4)
    assert torch.equal(torch.relu(x[:, :, ::2, ::2]).sum(), out.sum())


# ---------------------------------------------------------------- MNIST ResNet

def test_mnist_resnet_structure_and_inputs():
    m = create_model("mnist_resnet", num_classes=10).eval()
    assert [len(m.layer1), len(m.layer2), len(m.layer3)] == [2, 2, 2]
    assert [m.layer1[0].conv1.out_channels, m.layer2[0].conv1.out_channels, m.layer3[0].conv1.out_channels] == \
        [16, 32, 64]
    assert m.conv1.in_channels == 1
    for stage in (m.layer2, m.layer3):                   # projection shortcut: conv + BN
        ds = stage[0].downsample
        assert isinstance(ds[0], nn.Conv2d) and ds[0].stride == (2, 2) and isinstance(ds[1], nn.BatchNorm2d)
    assert m.layer1[0].downsample is None
    with torch.no_grad():
        for side in (28, 32):
            assert m(torch.randn(3, 1, side, side)).shape == (3, 10)


# ---------------------------------------------------------------- plain twins

@pytest.mark.parametrize("depth", (20, 110))
def test_plain_cifar_has_no_shortcut_and_same_params_as_option_a(depth):
    res = create_model(f"resnet{depth}", num_classes=10)
    plain = create_model(f"plain_resnet{depth}", num_classes=10)
    assert n_params(plain) == n_params(res)
    assert list(plain.state_dict()) == list(res.state_dict())
    blocks = [b for s in (plain.layer1, plain.layer2, plain.layer3) for b in s]
    assert len(blocks) == 3 * ((depth - 2) // 6)
    assert all(b.downsample is None for b in blocks)


def test_plain_output_differs_from_residual_with_identical_weights():
    torch.manual_seed(0)
    res = create_model("resnet20", num_classes=10).eval()
    plain = create_model("plain_resnet20", num_classes=10).eval()
    plain.load_state_dict(res.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(res(x), plain(x), atol=1e-3)
        # and a residual net agrees with itself when rebuilt with the same weights (the comparison is fair)
        again = create_model("resnet20", num_classes=10).eval()
        again.load_state_dict(res.state_dict())
        assert torch.equal(again(x), res(x))


@pytest.mark.parametrize("name,bn_last", [("plain_resnet18", "bn2"), ("plain_resnet50", "bn3"),
                                          ("plain_resnet20", "bn2")])
def test_plain_block_adds_nothing(name, bn_last):
    """Silence the branch: a plain block then outputs zeros, its residual twin outputs relu(x)."""
    plain = create_model(name).eval()
    res = create_model(name.removeprefix("plain_")).eval()
    x = torch.randn(1, plain.layer1[1].conv1.in_channels, 8, 8)
    for model in (plain, res):
        nn.init.zeros_(getattr(model.layer1[1], bn_last).weight)
        nn.init.zeros_(getattr(model.layer1[1], bn_last).bias)
    with torch.no_grad():
        assert torch.equal(plain.layer1[1](x), torch.zeros_like(x))
        assert torch.equal(res.layer1[1](x), torch.relu(x))


def test_plain_imagenet_drops_exactly_the_projections():
    res, plain = create_model("resnet50"), create_model("plain_resnet50")
    ds = {k: v for k, v in res.state_dict().items() if ".downsample." in k}
    assert {k.split(".downsample")[0] for k in ds} == {"layer1.0", "layer2.0", "layer3.0", "layer4.0"}
    assert set(plain.state_dict()) == set(res.state_dict()) - set(ds)
    assert not any("downsample" in name for name, _ in plain.named_modules())
    proj = sum(p.numel() for n, p in res.named_parameters() if ".downsample." in n)
    assert n_params(plain) == n_params(res) - proj
    assert plain.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


# ---------------------------------------------------------------- pre-activation

@pytest.mark.parametrize("name,side", [("preact_resnet18", 64), ("preact_resnet50", 64), ("preact_resnet34", 32),
                                       ("preact_resnet101", 32), ("preact_resnet20", 32), ("preact_resnet110", 32),
                                       ("preact_mnist_resnet", 28)])
def test_preact_variants_build_and_run(name, side):
    spec = get_spec(name)
    m = create_model(name, num_classes=5).eval()
    x = torch.randn(2, spec.in_channels, side, side)
    with torch.no_grad():
        y = m(x)
    assert y.shape == (2, 5) and torch.isfinite(y).all()


@pytest.mark.parametrize("name", ("preact_resnet20", "preact_resnet18", "preact_resnet50"))
def test_preact_block_is_an_identity_mapping(name):
    """Zero the last conv of a non-downsampling pre-act block: its output is x itself (no ReLU after the add)."""
    m = create_model(name).eval()
    blk = m.layer1[1]
    last = blk.conv3 if hasattr(blk, "conv3") else blk.conv2
    nn.init.zeros_(last.weight)
    x = torch.randn(1, blk.conv1.in_channels, 8, 8)      # has negative values: a trailing ReLU would clip them
    with torch.no_grad():
        assert torch.equal(blk(x), x)
    # the pre-activation order: BN then ReLU then conv, so the block's first module is a BatchNorm over cin
    assert isinstance(blk.bn1, nn.BatchNorm2d) and blk.bn1.num_features == blk.conv1.in_channels


# ---------------------------------------------------------------- v1 vs v1.5

def _conv_out_sides(model, x, names):
    sides = {}
    mods = dict(model.named_modules())
    hooks = [mods[n].register_forward_hook(lambda mod, i, o, n=n: sides.__setitem__(n, o.shape[-1]))
             for n in names]
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    return sides


@pytest.mark.parametrize("name", ("resnet50", "preact_resnet50", "plain_resnet50"))
def test_v1_5_strides_the_3x3_and_v1_the_first_1x1(name):
    v15 = create_model(name)
    v1 = create_model(name, options={"stride_in_1x1": True})
    assert n_params(v1) == n_params(v15)
    for stage in ("layer2", "layer3", "layer4"):
        b15, b1 = getattr(v15, stage)[0], getattr(v1, stage)[0]
        assert (b15.conv1.stride, b15.conv2.stride) == ((1, 1), (2, 2))
        assert (b1.conv1.stride, b1.conv2.stride) == ((2, 2), (1, 1))
        for later in list(getattr(v1, stage))[1:]:
            assert later.conv1.stride == later.conv2.stride == (1, 1)
    x = torch.randn(1, 3, 64, 64)                        # 64 -> stem 16 -> layer2 in 16, out 8
    names = ["layer2.0.conv1", "layer2.0.conv2", "layer2.0.conv3"]
    assert _conv_out_sides(v15, x, names) == dict(zip(names, (16, 8, 8)))
    assert _conv_out_sides(v1, x, names) == dict(zip(names, (8, 8, 8)))
    with torch.no_grad():
        assert v1(x).shape == v15(x).shape == (1, 1000)


# ---------------------------------------------------------------- forward shapes

@pytest.mark.parametrize("name,sides", [("resnet18", (32, 64, 224)), ("resnet50", (32, 64, 224)),
                                        ("resnet34", (32, 96)), ("resnet101", (32, 64)), ("resnet152", (32,)),
                                        ("plain_resnet34", (64,)), ("resnet20", (32, 16, 64)),
                                        ("resnet32", (32,)), ("resnet44", (32,)), ("resnet56", (32, 40)),
                                        ("resnet110", (32,)), ("plain_resnet56", (32,)),
                                        ("mnist_resnet", (28, 32)), ("plain_mnist_resnet", (28, 32))])
def test_forward_shapes(name, sides):
    spec = get_spec(name)
    classes = 1000 if spec.family == "imagenet" else 10
    m = create_model(name, num_classes=classes).eval()
    with torch.no_grad():
        for side in sides:
            y = m(torch.randn(2, spec.in_channels, side, side))
            assert y.shape == (2, classes), (name, side)
            assert torch.isfinite(y).all()


@pytest.mark.parametrize("name,side", [("resnet1202", 8), ("plain_resnet1202", 8), ("preact_resnet1202", 8),
                                       ("preact_resnet152", 32), ("plain_resnet152", 32)])
def test_deepest_nets_run(name, side):
    """Built once, run at a small side. Train-mode BN: an untrained 1202-layer net in eval mode (running stats
    0/1) adds up 600 residual branches whose scale doubles each time, which overflows float32 to NaN."""
    spec = get_spec(name)
    m = create_model(name, num_classes=10).train()
    with torch.no_grad():
        y = m(torch.randn(2, spec.in_channels, side, side))
    assert y.shape == (2, 10) and torch.isfinite(y).all()


def test_imagenet_stage_shapes_at_224():
    m = create_model("resnet50").eval()
    names = ["maxpool", "layer1", "layer2", "layer3", "layer4"]
    shapes = {}
    mods = dict(m.named_modules())
    hooks = [mods[n].register_forward_hook(lambda mod, i, o, n=n: shapes.__setitem__(n, tuple(o.shape[1:])))
             for n in names]
    with torch.no_grad():
        m(torch.randn(1, 3, 224, 224))
    for h in hooks:
        h.remove()
    assert shapes == {"maxpool": (64, 56, 56), "layer1": (256, 56, 56), "layer2": (512, 28, 28),
                      "layer3": (1024, 14, 14), "layer4": (2048, 7, 7)}


# ---------------------------------------------------------------- errors

def test_unknown_arch_gets_a_guess_or_the_valid_names():
    with pytest.raises(ConfigError) as e:
        create_model("resnet19")
    msg = str(e.value)
    assert "unknown architecture 'resnet19'; did you mean resnet18" in msg   # a guess, not every name
    with pytest.raises(ConfigError) as e:
        create_model("xception")
    assert "xception" in str(e.value) and "edgeres archs" in str(e.value)   # nothing close: where all are
    with pytest.raises(ConfigError):
        get_spec("ResNet18")                              # names are exact


@pytest.mark.parametrize("name,options,words", [
    ("resnet18", {"stride_in_1x1": True}, ["stride_in_1x1"]),          # basic blocks have no 1x1 to stride
    ("resnet20", {"shortcut": "C"}, ["shortcut", "'C'", "A", "B"]),
    ("resnet50", {"stride_in_1x1": "yes"}, ["stride_in_1x1"]),
    ("resnet50", {"shortcut": "A"}, ["shortcut", "stride_in_1x1"]),
    ("mnist_resnet", {"width": 2}, ["width"]),
])
def test_bad_option_is_a_config_error(name, options, words):
    with pytest.raises(ConfigError) as e:
        create_model(name, options=options)
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize("kwargs", [{"num_classes": 0}, {"in_channels": 0}, {"num_classes": -3}])
def test_bad_sizes_are_config_errors(kwargs):
    with pytest.raises(ConfigError):
        create_model("resnet20", **kwargs)


def test_cifar_names_follow_the_scheme():
    """conv1, bn1, layer{1,2,3}.{i}.conv1/bn1/conv2/bn2, fc; option A adds no names."""
    bn_keys = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    expected = {"conv1.weight", *(f"bn1.{k}" for k in bn_keys), "fc.weight", "fc.bias"}
    for stage in (1, 2, 3):
        for i in range(3):
            p = f"layer{stage}.{i}"
            expected |= {f"{p}.conv1.weight", f"{p}.conv2.weight"}
            expected |= {f"{p}.{b}.{k}" for b in ("bn1", "bn2") for k in bn_keys}
    assert set(create_model("resnet20", num_classes=10).state_dict()) == expected
