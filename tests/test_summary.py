"""`edgeres summary`: per-stage params / MACs against the paper's table and the architecture's arithmetic."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from edgeres.cli import main
from edgeres.models import create_model
from edgeres.models.blocks import BasicBlock, Bottleneck
from edgeres.summary import format_summary, summary

LAYERS = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)), 50: ("bottleneck", (3, 4, 6, 3)),
          101: ("bottleneck", (3, 4, 23, 3)), 152: ("bottleneck", (3, 8, 36, 3))}
# He et al. 2015, table 1: "FLOPs" (multiply-adds) at 224x224, x10^9.
PAPER_GMACS = {18: 1.8, 34: 3.6, 50: 3.8, 101: 7.6, 152: 11.3}


pytestmark = pytest.mark.usefixtures("one_thread")


def out_side(side: int, k: int, stride: int, pad: int) -> int:
    return (side + 2 * pad - k) // stride + 1


def expected_imagenet_macs(depth: int, *, v1: bool, size: int = 224, num_classes: int = 1000) -> dict[str, int]:
    """Multiply-accumulates of conv and fc layers, stage by stage, from the architecture."""
    block, layers = LAYERS[depth]
    s = out_side(size, 7, 2, 3)
    macs = {"stem": s * s * 64 * 7 * 7 * 3}
    h = out_side(s, 3, 2, 1)                              # max-pool
    cin = 64
    for i, (n, planes) in enumerate(zip(layers, (64, 128, 256, 512))):
        total = 0
        for j in range(n):
            stride = 2 if (i > 0 and j == 0) else 1
            ho = out_side(h, 3, stride, 1)
            if block == "basic":
                cout = planes
                total += ho * ho * planes * 9 * cin + ho * ho * planes * 9 * planes
            else:
                cout = planes * 4
                h1 = ho if v1 else h                     # v1: the stride sits on the first 1x1
                total += h1 * h1 * planes * cin + ho * ho * planes * 9 * planes + ho * ho * cout * planes
            if stride != 1 or cin != cout:
                total += ho * ho * cout * cin            # 1x1 projection
            cin, h = cout, ho
        macs[f"layer{i + 1}"] = total
    macs["head"] = cin * num_classes
    return macs


def expected_cifar_macs(n: int, *, size: int = 32, num_classes: int = 10) -> int:
    total = size * size * 16 * 9 * 3
    h, cin = size, 16
    for i, planes in enumerate((16, 32, 64)):
        for j in range(n):
            stride = 2 if (i > 0 and j == 0) else 1
            ho = out_side(h, 3, stride, 1)
            total += ho * ho * planes * 9 * cin + ho * ho * planes * 9 * planes   # option A: no projection MACs
            cin, h = planes, ho
    return total + 64 * num_classes


def meta_summary(arch: str, **kw):
    """summary() on the meta device: same shapes and counts, no arithmetic (checked against CPU below)."""
    with torch.device("meta"):
        return summary(arch, **kw)


def v1_opts(depth: int):
    return {"stride_in_1x1": True} if LAYERS[depth][0] == "bottleneck" else None


@pytest.mark.parametrize("arch,options", [("resnet18", None), ("resnet50", None),
                                          ("resnet50", {"stride_in_1x1": True})])
def test_meta_device_agrees_with_cpu(arch, options):
    cpu, meta = summary(arch, options=options), meta_summary(arch, options=options)
    assert cpu == meta


@pytest.mark.parametrize("depth", sorted(LAYERS))
def test_totals_agree_with_the_paper(depth):
    paper = PAPER_GMACS[depth]
    v1 = meta_summary(f"resnet{depth}", options=v1_opts(depth))
    exp_v1 = expected_imagenet_macs(depth, v1=True)
    assert v1["macs"] == sum(exp_v1.values())
    assert {s["stage"]: s["macs"] for s in v1["stages"]} == exp_v1
    # The paper prints one decimal (sometimes truncated, e.g. 3.66 -> "3.6"): the exact value lies within it.
    g = v1["macs"] / 1e9
    assert paper - 0.05 <= g < paper + 0.1, (depth, g)
    if LAYERS[depth][0] == "bottleneck":
        v15 = meta_summary(f"resnet{depth}")
        exp_v15 = expected_imagenet_macs(depth, v1=False)
        assert v15["macs"] == sum(exp_v15.values())
        # v1.5 runs the first 1x1 of stages 2-4 at the input resolution: (56^2-28^2)*128*256 = 77,070,336 each
        assert v15["macs"] - v1["macs"] == 3 * 77_070_336
        assert paper < v15["macs"] / 1e9 < paper * 1.08   # "a little higher"
        assert v15["params"] == v1["params"]


def test_torchvision_documented_gflops():
    """torchvision documents 1.81 / 3.66 / 4.09 / 7.80 / 11.51 GFLOPS for its (v1.5) resnets at 224."""
    documented = {18: 1.81, 34: 3.66, 50: 4.09, 101: 7.80, 152: 11.51}
    for depth, g in documented.items():
        assert round(meta_summary(f"resnet{depth}")["macs"] / 1e9, 2) == g


def test_bottleneck_arithmetic_from_real_modules():
    def conv_weights(m: nn.Module) -> int:
        return sum(c.weight.numel() for c in m.modules() if isinstance(c, nn.Conv2d))

    bottleneck = Bottleneck(256, 64)
    assert bottleneck.downsample is None                 # 256 in, 64*4 out: identity shortcut
    assert conv_weights(bottleneck) == 1 * 1 * 256 * 64 + 3 * 3 * 64 * 64 + 1 * 1 * 64 * 256 == 69_632
    two_plain = BasicBlock(256, 256)
    assert conv_weights(two_plain) == 3 * 3 * 256 * 256 * 2 == 1_179_648
    # the same block inside a real resnet50 (its stage-1 blocks after the first)
    r50 = create_model("resnet50")
    assert conv_weights(r50.layer1[1]) == 69_632
    assert [type(b) for b in r50.layer1] == [Bottleneck] * 3
    # and the MACs of that block at 56x56 are its weights times the output positions
    s = meta_summary("resnet50", input_size=224)
    per_block = 69_632 * 56 * 56
    layer1 = next(st for st in s["stages"] if st["stage"] == "layer1")
    first = (64 * 64 + 9 * 64 * 64 + 64 * 256 + 64 * 256) * 56 * 56    # 64 in: conv1..3 + 1x1 projection
    assert layer1["macs"] == first + 2 * per_block


def test_stages_of_resnet50():
    s = summary("resnet50")
    assert s["arch"] == "resnet50" and s["input_size"] == 224 and s["in_channels"] == 3
    assert [st["stage"] for st in s["stages"]] == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    assert [st["output_shape"] for st in s["stages"]] == [[64, 56, 56], [256, 56, 56], [512, 28, 28],
                                                          [1024, 14, 14], [2048, 7, 7], [1000]]
    model = create_model("resnet50")
    own = {"stem": sum(p.numel() for p in [*model.conv1.parameters(), *model.bn1.parameters()]),
           "head": sum(p.numel() for p in model.fc.parameters())}
    for i in range(1, 5):
        own[f"layer{i}"] = sum(p.numel() for p in getattr(model, f"layer{i}").parameters())
    assert {st["stage"]: st["params"] for st in s["stages"]} == own
    assert sum(st["params"] for st in s["stages"]) == s["params"] == 25_557_032
    assert sum(st["macs"] for st in s["stages"]) == s["macs"]
    assert own["head"] == 2048 * 1000 + 1000


@pytest.mark.parametrize("arch,size,classes,cin", [("resnet20", 32, 10, 3), ("resnet56", 32, 10, 3),
                                                   ("resnet20", 64, 100, 3), ("preact_resnet20", 32, 10, 3),
                                                   ("plain_resnet20", 32, 10, 3), ("mnist_resnet", 28, 10, 1)])
def test_small_nets(arch, size, classes, cin):
    s = summary(arch, input_size=size, num_classes=classes)
    assert s["in_channels"] == cin and s["input_size"] == size
    assert sum(st["params"] for st in s["stages"]) == s["params"]
    assert s["params"] == sum(p.numel() for p in create_model(arch, num_classes=classes).parameters())
    assert sum(st["macs"] for st in s["stages"]) == s["macs"]
    assert s["stages"][-1]["output_shape"] == [classes]
    assert [st["stage"] for st in s["stages"]][1:-1] == ["layer1", "layer2", "layer3"]
    if arch in ("resnet20", "resnet56", "plain_resnet20", "preact_resnet20"):
        assert s["macs"] == expected_cifar_macs((int(arch.split("resnet")[1]) - 2) // 6, size=size,
                                                num_classes=classes)
        assert [st["output_shape"] for st in s["stages"]][1:4] == [[16, size, size], [32, size // 2, size // 2],
                                                                   [64, size // 4, size // 4]]


def test_resnet20_macs_pinned():
    # 32*32*16*27 + 6*(32*32*16*144) + (16*16*32*144 + 5*16*16*32*288) + (8*8*64*288 + 5*8*8*64*576) + 640
    assert summary("resnet20", num_classes=10)["macs"] == 40_551_040


def test_input_size_scales_macs():
    a = meta_summary("resnet18", input_size=224)
    b = meta_summary("resnet18", input_size=448)
    assert b["params"] == a["params"]
    conv = a["macs"] - 512 * 1000
    assert b["macs"] - 512 * 1000 == 4 * conv
    assert b["macs"] == sum(expected_imagenet_macs(18, v1=False, size=448).values())


def test_format_summary_text():
    s = summary("resnet20", num_classes=10)
    text = format_summary(s)
    for st in s["stages"]:
        assert st["stage"] in text and f"{st['params']:,}" in text and f"{st['macs']:,}" in text
    assert "total" in text and f"{s['params']:,}" in text and "0.27 M parameters" in text


# ---------------------------------------------------------------- the command

def run(*args):
    return CliRunner().invoke(main, ["summary", *args])


def test_cli_json():
    r = run("--arch", "resnet50", "--json")
    assert r.exit_code == 0, r.output
    obj = json.loads(r.output)
    assert obj["arch"] == "resnet50"
    assert type(obj["params"]) is int and obj["params"] == 25_557_032
    assert type(obj["macs"]) is int and obj["macs"] == sum(expected_imagenet_macs(50, v1=False).values())
    assert isinstance(obj["stages"], list) and len(obj["stages"]) == 6
    assert all({"stage", "params", "macs", "output_shape"} <= set(st) for st in obj["stages"])


def test_cli_options():
    r = json.loads(run("--arch", "resnet50", "--v1", "--input-size", "96", "--json").output)
    assert r["macs"] == sum(expected_imagenet_macs(50, v1=True, size=96).values())
    r15 = json.loads(run("--arch", "resnet50", "--input-size", "96", "--json").output)
    assert r15["macs"] == sum(expected_imagenet_macs(50, v1=False, size=96).values()) > r["macs"]
    a = json.loads(run("--arch", "resnet20", "--num-classes", "10", "--json").output)
    b = json.loads(run("--arch", "resnet20", "--num-classes", "10", "--shortcut", "B", "--json").output)
    assert b["params"] - a["params"] == 2752 and a["params"] == 269_722
    c = json.loads(run("--arch", "resnet18", "--input-size", "64", "--in-channels", "1", "--num-classes", "5",
                       "--json").output)
    assert c["input_size"] == 64 and c["in_channels"] == 1 and c["stages"][-1]["output_shape"] == [5]
    assert c["macs"] == 32 * 32 * 64 * 49 * 1 + sum(v for k, v in expected_imagenet_macs(18, v1=False, size=64,
                                                                                         num_classes=5).items()
                                                    if k != "stem")


def test_cli_text():
    r = run("--arch", "resnet18")
    assert r.exit_code == 0
    assert "layer4" in r.output and "11,689,512" in r.output and "1.814 G" in r.output


@pytest.mark.parametrize("args,needle", [(["--arch", "resnet19"], "resnet19"),
                                         (["--arch", "resnet18", "--v1"], "stride_in_1x1"),
                                         (["--arch", "resnet50", "--shortcut", "A"], "shortcut")])
def test_cli_bad_arch_or_option_is_one_line(args, needle):
    r = run(*args)
    assert r.exit_code == 1
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and needle in lines[0], r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)


def test_cli_usage_errors():
    assert run().exit_code == 2                              # --arch is required
    assert run("--arch", "resnet18", "--input-size", "2").exit_code == 2
    assert run("--arch", "resnet18", "--num-classes", "0").exit_code == 2
