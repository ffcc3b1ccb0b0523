"""Published weights by name (--init-from torchvision:ARCH): cached, sha256-checked, and offline says what to do."""
from __future__ import annotations

import hashlib
import urllib.error
import urllib.request

import pytest
import torch
from click.testing import CliRunner

from edgeres import pretrained
from edgeres.checkpoint import load_backbone
from edgeres.cli import main
from edgeres.errors import CheckpointError, ConfigError
from edgeres.models import create_model


def _offline(*a, **k):
    raise urllib.error.URLError("no network here")


def test_offline_names_the_file_the_url_and_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGERES_WEIGHTS", str(tmp_path / "w"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(urllib.request, "urlopen", _offline)
    with pytest.raises(ConfigError) as e:
        pretrained.resolve("torchvision:resnet18")
    msg = str(e.value)
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in msg and "f37072fd" in msg
    assert str(tmp_path / "w" / "resnet18-f37072fd.pth") in msg and "\n" not in msg
    assert not (tmp_path / "w" / "resnet18-f37072fd.pth").exists()
    with pytest.raises(ConfigError, match="valid: torchvision:resnet18"):
        pretrained.resolve("torchvision:vgg16")
    assert pretrained.resolve("some/path.pth") == "some/path.pth"
    r = CliRunner().invoke(main, ["build", "--init-from", "torchvision:resnet18", "--out", str(tmp_path / "run")])
    assert r.exit_code == 1 and "cannot download (no network here)" in r.output and not (tmp_path / "run").exists()


def test_a_cached_file_is_used_only_when_its_hash_matches(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGERES_WEIGHTS", str(tmp_path))
    monkeypatch.setattr(urllib.request, "urlopen", _offline)
    body = b"published weights"
    name = f"tiny-{hashlib.sha256(body).hexdigest()[:8]}.pth"
    monkeypatch.setitem(pretrained.PUBLISHED, "tiny", name)
    (tmp_path / name).write_bytes(body)
    assert pretrained.resolve("torchvision:tiny") == str(tmp_path / name)
    (tmp_path / name).write_bytes(b"something else")
    with pytest.raises(ConfigError, match="does not start with"):
        pretrained.resolve("torchvision:tiny")


def test_download_is_verified_and_written_atomically(tmp_path, monkeypatch):
    import io

    monkeypatch.setenv("EDGERES_WEIGHTS", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    body = b"the real file"
    name = f"tiny-{hashlib.sha256(body).hexdigest()[:8]}.pth"
    monkeypatch.setitem(pretrained.PUBLISHED, "tiny", name)
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: io.BytesIO(body))
    assert pretrained.resolve("torchvision:tiny") == str(tmp_path / name)
    assert (tmp_path / name).read_bytes() == body
    monkeypatch.setitem(pretrained.PUBLISHED, "other", "other-00000000.pth")
    with pytest.raises(ConfigError, match="does not start with 00000000"):
        pretrained.resolve("torchvision:other")
    assert not (tmp_path / "other-00000000.pth").exists(), "a file that fails its hash is not kept"


def test_wrong_channels_or_arch_get_one_line(tmp_path):
    gray = tmp_path / "gray.pt"
    torch.save(create_model("resnet18", num_classes=10, in_channels=1).state_dict(), gray)
    with pytest.raises(CheckpointError, match="takes 1-channel images, this model's data has 3 channel"):
        load_backbone(create_model("resnet18", num_classes=10), gray)
    dense = tmp_path / "dense.pt"
    torch.save(create_model("densenet121", num_classes=10).state_dict(), dense)
    with pytest.raises(CheckpointError, match="weights of another architecture"):
        load_backbone(create_model("resnet18", num_classes=10), dense)


def test_a_checkpoint_of_another_arch_is_refused_before_the_run_folder(tmp_path):
    """--init-from / --pretrained: a checkpoint whose edgeres metadata (or published file name) names another
    architecture than --arch is one line naming the --arch to pass, and no run folder is made."""
    from edgeres.checkpoint import ModelMeta, check_checkpoints, save_checkpoint

    ck = tmp_path / "mine.pt"
    meta = ModelMeta(arch="resnet20", num_classes=2, in_channels=3, input_size=32, mean=(0.5,) * 3, std=(0.25,) * 3)
    save_checkpoint(ck, create_model("resnet20", num_classes=2), meta)
    with pytest.raises(CheckpointError) as e:
        check_checkpoints(None, ck, arch="resnet18")
    assert str(e.value) == f"checkpoint {ck} is a resnet20; pass --arch resnet20 or another checkpoint"
    check_checkpoints(ck, ck, arch="resnet20")   # the same arch: accepted
    for flag in ("--init-from", "--pretrained"):
        r = CliRunner().invoke(main, ["build", flag, str(ck), "--arch", "resnet18", "--out", str(tmp_path / "run")])
        assert r.exit_code == 1 and r.stderr.strip() == f"Error: {str(e.value)}", r.output
        assert not (tmp_path / "run").exists()
    published = tmp_path / "resnet50-0676ba61.pth"   # torchvision's file name says which arch it is
    torch.save(create_model("resnet20", num_classes=2).state_dict(), published)
    with pytest.raises(CheckpointError, match="is a resnet50; pass --arch resnet50 or another checkpoint"):
        check_checkpoints(None, published, arch="resnet18")
