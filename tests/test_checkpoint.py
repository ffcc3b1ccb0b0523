"""Checkpoints: torchvision-named state_dicts, wrappers, weights_only safety, clear mismatch reports, atomic save."""
from __future__ import annotations

import errno
import os
import pickle
import re
import threading
from collections import OrderedDict
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner

from edgeres.checkpoint import ModelMeta, load_model, load_weights, read_checkpoint, save_checkpoint
from edgeres.errors import CheckpointError
from edgeres.models import create_model

TV_LAYERS = {18: ("basic", (2, 2, 2, 2)), 50: ("bottleneck", (3, 4, 6, 3))}


pytestmark = pytest.mark.usefixtures("one_thread")


def _bn(prefix: str, c: int) -> list[tuple[str, tuple[int, ...]]]:
    return [(f"{prefix}.weight", (c,)), (f"{prefix}.bias", (c,)), (f"{prefix}.running_mean", (c,)),
            (f"{prefix}.running_var", (c,)), (f"{prefix}.num_batches_tracked", ())]


def torchvision_resnet_keys(depth: int, num_classes: int = 1000) -> list[tuple[str, tuple[int, ...]]]:
    """torchvision.models.resnet{18,50}().state_dict() names and shapes, written out from its structure."""
    block, layers = TV_LAYERS[depth]
    keys = [("conv1.weight", (64, 3, 7, 7)), *_bn("bn1", 64)]
    inplanes = 64
    for i, (n, planes) in enumerate(zip(layers, (64, 128, 256, 512))):
        for j in range(n):
            p = f"layer{i + 1}.{j}"
            if block == "basic":
                keys += [(f"{p}.conv1.weight", (planes, inplanes, 3, 3)), *_bn(f"{p}.bn1", planes),
                         (f"{p}.conv2.weight", (planes, planes, 3, 3)), *_bn(f"{p}.bn2", planes)]
                out = planes
            else:
                out = planes * 4
                keys += [(f"{p}.conv1.weight", (planes, inplanes, 1, 1)), *_bn(f"{p}.bn1", planes),
                         (f"{p}.conv2.weight", (planes, planes, 3, 3)), *_bn(f"{p}.bn2", planes),
                         (f"{p}.conv3.weight", (out, planes, 1, 1)), *_bn(f"{p}.bn3", out)]
            if j == 0 and (i > 0 or inplanes != out):
                keys += [(f"{p}.downsample.0.weight", (out, inplanes, 1, 1)), *_bn(f"{p}.downsample.1", out)]
            inplanes = out
    return keys + [("fc.weight", (num_classes, inplanes)), ("fc.bias", (num_classes,))]


def torchvision_state(depth: int, num_classes: int = 1000, seed: int = 0) -> OrderedDict:
    g = torch.Generator().manual_seed(seed)
    state = OrderedDict()
    for name, shape in torchvision_resnet_keys(depth, num_classes):
        if name.endswith("num_batches_tracked"):
            state[name] = torch.tensor(1234 + seed, dtype=torch.long)
        elif name.endswith("running_var"):
            state[name] = torch.rand(shape, generator=g) + 0.5
        else:
            state[name] = torch.randn(shape, generator=g)
    return state


def assert_same_weights(model, state):
    own = model.state_dict()
    assert set(own) == set(state)
    for k, v in state.items():
        assert torch.equal(own[k], v), k


def test_key_list_sanity():
    """The hand-written torchvision key list is itself right: 11,689,512 / 25,557,032 parameters, 62/161 tensors."""
    for depth, params, n_params_tensors in ((18, 11_689_512, 62), (50, 25_557_032, 161)):
        keys = torchvision_resnet_keys(depth)
        learn = [s for k, s in keys if k.endswith((".weight", ".bias"))]
        assert sum(int(torch.Size(s).numel()) for s in learn) == params
        assert len(learn) == n_params_tensors
        assert len({k for k, _ in keys}) == len(keys)


@pytest.mark.parametrize("depth", (18, 50))
def test_model_names_and_shapes_equal_torchvision(depth):
    own = {k: tuple(v.shape) for k, v in create_model(f"resnet{depth}").state_dict().items()}
    assert own == dict(torchvision_resnet_keys(depth))


@pytest.mark.parametrize("depth", (18, 50))
def test_load_a_torchvision_state_dict(tmp_path, depth):
    state = torchvision_state(depth)
    path = tmp_path / f"resnet{depth}-tv.pth"
    torch.save(state, path)
    model, meta = load_model(path, arch=f"resnet{depth}")
    assert meta is None
    assert not model.training
    assert_same_weights(model, state)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_torchvision_fine_tuned_head_is_read_off_fc(tmp_path):
    state = torchvision_state(18, num_classes=10)
    torch.save(state, tmp_path / "ft.pt")
    model, _ = load_model(tmp_path / "ft.pt", arch="resnet18")
    assert model.fc.out_features == 10
    assert_same_weights(model, state)


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "module", "state_dict+module", "model+module"])
def test_wrappers_and_module_prefix(tmp_path, wrap):
    state = torchvision_state(18, seed=1)
    saved = state
    if "module" in wrap:
        saved = OrderedDict((f"module.{k}", v) for k, v in saved.items())
    if wrap.startswith("state_dict"):
        saved = {"state_dict": saved, "epoch": 7, "optimizer": {"lr": 0.1}}
    elif wrap.startswith("model"):
        saved = {"model": saved, "args": {"lr": 0.1}}
    torch.save(saved, tmp_path / "ckpt.pth")
    model, _ = load_model(tmp_path / "ckpt.pth", arch="resnet18")
    assert_same_weights(model, state)
    got, meta, rest = read_checkpoint(tmp_path / "ckpt.pth")
    assert not any(k.startswith("module.") for k in got)
    if wrap.startswith("state_dict"):
        assert rest["epoch"] == 7


class Evil:
    """Unpickling this runs code: exec(...) writes a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def test_pickled_code_is_refused_not_run(tmp_path):
    marker = tmp_path / "ran.txt"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}, "payload": Evil(marker)}, path)
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(CheckpointError):
        load_model(path, arch="resnet18")
    assert not marker.exists(), "loading the checkpoint executed pickled code"
    # control: an unsafe load of the very same file does run the code, so the check above can fail
    torch.load(path, weights_only=False)
    assert marker.read_text() == "pwned"


class Sneaky:
    """A custom class whose unpickling (via __setstate__) runs code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __setstate__(self, state):
        Path(state["marker"]).write_text("ran")
        self.__dict__.update(state)


def test_custom_class_in_checkpoint_is_refused(tmp_path):
    marker = tmp_path / "setstate.txt"
    path = tmp_path / "custom.pt"
    torch.save({"model": torchvision_state(18), "extra": Sneaky(str(marker))}, path)
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_model(path, arch="resnet18")
    assert not marker.exists()
    torch.load(path, weights_only=False)      # control: an unsafe load runs __setstate__
    assert marker.read_text() == "ran"


def test_plain_pickle_with_code_is_refused(tmp_path):
    marker = tmp_path / "ran.txt"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(Evil(marker), protocol=2))
    with pytest.raises(CheckpointError):
        read_checkpoint(path)
    assert not marker.exists()
    pickle.loads(path.read_bytes())          # control: the file really carries code
    assert marker.exists()


def _fit_message(tmp_path, state, arch="resnet18") -> str:
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as e:
        load_model(path, arch=arch)
    msg = str(e.value)
    assert "\n" not in msg, "the report must be one line"
    assert str(path) in msg
    return msg


def test_missing_keys_are_named(tmp_path):
    state = torchvision_state(18)
    del state["layer3.1.bn2.running_var"], state["layer4.0.downsample.0.weight"]
    msg = _fit_message(tmp_path, state)
    assert "missing" in msg
    assert "layer3.1.bn2.running_var" in msg and "layer4.0.downsample.0.weight" in msg
    assert "unexpected" not in msg and "shape" not in msg


def test_unexpected_keys_are_named(tmp_path):
    state = torchvision_state(18)
    state["layer5.0.conv1.weight"] = torch.zeros(3, 3)
    state["aux_head.bias"] = torch.zeros(3)
    msg = _fit_message(tmp_path, state)
    assert "unexpected" in msg and "layer5.0.conv1.weight" in msg and "aux_head.bias" in msg
    assert "missing" not in msg


def test_shape_mismatch_names_expected_and_found(tmp_path):
    state = torchvision_state(18)
    state["layer2.0.conv1.weight"] = torch.zeros(128, 64, 5, 5)
    msg = _fit_message(tmp_path, state)
    assert "layer2.0.conv1.weight" in msg
    assert re.search(r"expected \(128, 64, 3, 3\).*found \(128, 64, 5, 5\)", msg), msg


def test_all_problems_in_one_message(tmp_path):
    state = torchvision_state(50)
    del state["layer1.0.downsample.1.weight"]
    state["layer1.0.conv4.weight"] = torch.zeros(1)
    state["layer4.2.bn3.bias"] = torch.zeros(7)
    msg = _fit_message(tmp_path, state, arch="resnet50")
    for piece in ("missing", "layer1.0.downsample.1.weight", "unexpected", "layer1.0.conv4.weight",
                  "layer4.2.bn3.bias", "(2048,)", "(7,)"):
        assert piece in msg, piece


def test_many_missing_keys_are_counted(tmp_path):
    """A resnet18 state_dict loaded as resnet50: the message stays one line and says how many there are."""
    msg = _fit_message(tmp_path, torchvision_state(18), arch="resnet50")
    missing = set(dict(torchvision_resnet_keys(50))) - set(dict(torchvision_resnet_keys(18)))
    # BatchNorm's num_batches_tracked is not a true mismatch (torch fills it for files from before it existed)
    n_missing = len([k for k in missing if not k.endswith("num_batches_tracked")])
    assert f"{n_missing} in all" in msg
    assert len(msg) < 2000


def test_load_weights_leaves_the_model_untouched_on_mismatch():
    model = create_model("resnet20", num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = {k: torch.ones_like(v) for k, v in before.items()}
    state.pop("fc.bias")
    with pytest.raises(CheckpointError, match="fc.bias"):
        load_weights(model, state)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("content", [
    os.urandom(4096),
    b"this is a text file, not a checkpoint\n" * 20,
    b"",
    b"PK\x03\x04" + os.urandom(200),                      # looks like a zip, is not one
])
def test_junk_files_are_checkpoint_errors(tmp_path, content):
    path = tmp_path / "junk.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as e:
        load_model(path, arch="resnet18")
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_truncated_checkpoint_is_a_checkpoint_error(tmp_path):
    good = tmp_path / "good.pt"
    torch.save(torchvision_state(18), good)
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError):
        read_checkpoint(bad)


@pytest.mark.parametrize("obj", [[torch.zeros(2)], {"state_dict": {}}, {"epoch": 3, "lr": 0.1}, torch.zeros(3)])
def test_tensors_missing_where_the_state_dict_should_be(tmp_path, obj):
    path = tmp_path / "odd.pt"
    torch.save(obj, path)
    with pytest.raises(CheckpointError):
        read_checkpoint(path)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError):
        read_checkpoint(tmp_path)


def test_foreign_state_dict_needs_an_arch(tmp_path):
    torch.save(torchvision_state(18), tmp_path / "tv.pth")
    with pytest.raises(CheckpointError, match="--arch"):
        load_model(tmp_path / "tv.pth")


# ---------------------------------------------------------------- save_checkpoint and ModelMeta

def make_meta(**over) -> ModelMeta:
    kw = dict(arch="resnet20", num_classes=3, in_channels=3, input_size=32, mean=(0.49, 0.48, 0.45),
              std=(0.25, 0.24, 0.26), class_names=("cat", "dog", "frog"), arch_options={"shortcut": "B"},
              resize_size=36, dataset="cifar10", recipe_hash="ab12")
    kw.update(over)
    if "class_names" not in over:   # one name per class (checkpoint.check_meta refuses another count)
        kw["class_names"] = ("cat", "dog", "frog", *(f"c{i}" for i in range(3, kw["num_classes"])))[:kw["num_classes"]]
    return ModelMeta(**kw)


def test_save_round_trips_meta_and_weights(tmp_path):
    meta = make_meta()
    model = meta.create_model()
    assert model.layer2[0].downsample is not None and len(list(model.layer2[0].downsample.parameters())) == 3
    path = save_checkpoint(tmp_path / "sub" / "best.pt", model, meta, epoch=4, top1=0.5)
    state, got, rest = read_checkpoint(path)
    assert got == meta and isinstance(got.mean, tuple) and isinstance(got.class_names, tuple)
    assert rest == {"epoch": 4, "top1": 0.5}
    loaded, meta2 = load_model(path)
    assert meta2 == meta
    assert loaded.fc.out_features == 3 and loaded.layer2[0].downsample is not None   # arch_options honoured
    assert_same_weights(loaded, model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


def test_meta_defaults_round_trip(tmp_path):
    meta = ModelMeta(arch="mnist_resnet", num_classes=10, in_channels=1, input_size=28, mean=(0.13,), std=(0.31,))
    path = save_checkpoint(tmp_path / "m.pt", create_model("mnist_resnet", num_classes=10), meta)
    assert read_checkpoint(path)[1] == meta
    assert ModelMeta.from_dict(meta.to_dict()) == meta


def test_save_without_meta_and_arch_mismatch(tmp_path):
    model = create_model("resnet20", num_classes=10)
    path = save_checkpoint(tmp_path / "nometa.pt", model.state_dict(), None)
    assert read_checkpoint(path)[1] is None
    m, meta = load_model(path, arch="resnet20")
    assert meta is None and m.fc.out_features == 10
    save_checkpoint(tmp_path / "meta.pt", model, make_meta(num_classes=10, arch_options={}))
    with pytest.raises(CheckpointError, match="resnet20"):
        load_model(tmp_path / "meta.pt", arch="resnet32")


def test_incomplete_meta_is_a_checkpoint_error(tmp_path):
    torch.save({"state_dict": create_model("resnet20").state_dict(), "meta": {"arch": "resnet20"}},
               tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match="metadata"):
        read_checkpoint(tmp_path / "m.pt")


def test_save_is_atomic(tmp_path):
    path = tmp_path / "best.pt"
    save_checkpoint(path, create_model("resnet20", num_classes=10), make_meta(num_classes=10, arch_options={}))
    old_bytes = path.read_bytes()
    reader = open(path, "rb")               # a reader holding the old file keeps seeing a complete old file
    try:
        new_model = create_model("resnet32", num_classes=10)
        save_checkpoint(path, new_model, make_meta(arch="resnet32", num_classes=10, arch_options={}))
        assert reader.read() == old_bytes
    finally:
        reader.close()
    assert read_checkpoint(path)[1].arch == "resnet32"
    # a save that fails (a value torch cannot store) leaves the previous file intact and no temp file behind
    new_bytes = path.read_bytes()
    with pytest.raises(TypeError, match="pickle"):
        save_checkpoint(path, new_model, None, lock=threading.Lock())
    assert path.read_bytes() == new_bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt"]


def test_disk_full_mid_write_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "best.pt"
    save_checkpoint(path, create_model("resnet20", num_classes=10), None)
    old_bytes = path.read_bytes()

    def half_then_fail(self, data):           # the disk fills up half-way through the write
        with open(self, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", half_then_fail)
    with pytest.raises(OSError):
        save_checkpoint(path, create_model("resnet32", num_classes=10), None)
    monkeypatch.undo()
    assert path.read_bytes() == old_bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt"]
    assert read_checkpoint(path)[0].keys() == create_model("resnet20").state_dict().keys()


def test_cli_reports_checkpoint_errors_as_one_line(tmp_path):
    """The CLI group turns a CheckpointError into 'Error: ...' and exit 1, never a traceback."""
    from edgeres.cli import EdgeresGroup

    bad = tmp_path / "bad.pt"
    state = torchvision_state(18)
    state["fc.weight"] = torch.zeros(1000, 256)
    torch.save(state, bad)

    @click.group(cls=EdgeresGroup)
    def group():
        pass

    @group.command()
    @click.argument("path")
    def load(path):
        load_model(path, arch="resnet18")

    result = CliRunner().invoke(group, ["load", str(bad)])
    assert result.exit_code == 1
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and "fc.weight" in lines[0]
    assert "Traceback" not in result.output
