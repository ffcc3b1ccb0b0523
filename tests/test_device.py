"""One torch device for every torch stage: `--device` decided once, refused in one line when unusable, recorded."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from edgeres.cli import main
from edgeres.device import describe, resolve
from edgeres.errors import ConfigError


def test_resolve_names_and_refusals():
    assert resolve("cpu") == torch.device("cpu") and resolve(torch.device("cpu")) == torch.device("cpu")
    assert resolve(None) == (torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu"))
    with pytest.raises(ConfigError, match="expected cpu, cuda or cuda:N"):
        resolve("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="sees no CUDA GPU; use --device cpu"):
            resolve("cuda:0")
    assert describe("cpu") == {"torch_device": "cpu"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_build_with_an_unusable_device_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["build", "--device", "cuda", "--out", str(out)])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "--device cuda: torch" in r.output
    assert not out.exists()
    r = CliRunner().invoke(main, ["train", "--device", "npu", "--out", str(tmp_path / "t")])
    assert r.exit_code == 1 and "--device 'npu': expected cpu, cuda or cuda:N" in r.output


@pytest.mark.slow
def test_every_stage_record_says_where_torch_ran(tmp_path):
    pytest.importorskip("nncf")
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["build", "--arch", "resnet20", "--epochs", "1", "--int8", "--qat-epochs", "0",
                                  "--input-size", "16", "--calib-size", "32", "--bench-seconds", "0",
                                  "--device", "cpu", "--max-drop", "100", "--min-agreement", "0", "--quiet",
                                  "--out", str(out)])
    assert r.exit_code in (0, 1), r.output   # the verdict is not the point here: where it ran is
    records = [json.loads(line) for line in (out / "stages.jsonl").read_text().splitlines()]
    assert records and all(rec["environment"]["torch_device"] == "cpu" for rec in records)
    man = json.loads((out / "calibration" / "manifest.json").read_text())
    assert man["device"] == "cpu"


@pytest.mark.gpu
def test_build_runs_its_torch_stages_on_the_gpu(tmp_path):
    pytest.importorskip("nncf")
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["build", "--arch", "resnet20", "--epochs", "1", "--int8", "--input-size", "16",
                                  "--calib-size", "64", "--bench-seconds", "0.2", "--device", "cuda", "--max-drop",
                                  "100", "--min-agreement", "0", "--quiet", "--out", str(out)])
    assert r.exit_code in (0, 1), r.output
    records = {json.loads(x)["stage"]: json.loads(x) for x in (out / "stages.jsonl").read_text().splitlines()}
    assert all(rec["environment"]["torch_device"] == "cuda:0" for rec in records.values())
    assert json.loads((out / "calibration" / "manifest.json").read_text())["device"] == "cuda:0"
    from edgeres.checkpoint import load_model

    load_model(out / "train" / "best.pt")   # saved from the GPU, loads anywhere (CPU tensors)
    if "verify" in records:
        assert "CUDA events" in records["verify"]["metrics"]["bench"]["timing"]
