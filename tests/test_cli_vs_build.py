"""Each stage run through its CLI command and through `build`, on the same inputs, writes the same bytes.

A real small `edgeres build --int8` (PTQ only, 128 calibration images, seed 0) is the reference; every command
below starts from the artifact the build's previous stage wrote, with the build's settings, and must produce a
file whose sha256 equals the build's own artifact: same calibration subset, same defaults, same metadata.
"""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from test_bundle import make_run  # tests/ is on sys.path (pytest rootdir insertion)

from edgeres.cli import main
from edgeres.io import sha256_file
from edgeres.records import read_records

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("ref"))


def cli(*args: str) -> dict:
    r = CliRunner().invoke(main, [*args, "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.output[r.output.index("{"):])


def test_cli_stages_write_what_build_writes(run, tmp_path):
    by = {r.stage: r for r in read_records(run)}
    recipe_hash = json.loads((run / "meta.json").read_text())["recipe_hash"]
    calib = by["ptq"].metrics
    n, seed = calib.get("calib_size") or calib["subset_size"], 0

    cli("fold", "--weights", by["train"].artifact, "--out", str(tmp_path / "folded.pt"))
    assert sha256_file(tmp_path / "folded.pt") == by["fold"].sha256

    cli("quantize", "--ptq", "--weights", by["fold"].artifact, "--dataset", "digits", "--calib-size", str(n),
        "--seed", str(seed), "--out", str(tmp_path / "ptq.pt"), "--quiet")
    assert sha256_file(tmp_path / "ptq.pt") == by["ptq"].sha256

    cli("export", "--weights", by["fold"].artifact, "--out", str(tmp_path / "fp32.onnx"), "--recipe-hash",
        recipe_hash)
    assert sha256_file(tmp_path / "fp32.onnx") == by["export_fp32"].sha256

    cli("export", "--weights", by["ptq"].artifact, "--int8", "--out", str(tmp_path / "int8.onnx"),
        "--recipe-hash", recipe_hash)
    assert sha256_file(tmp_path / "int8.onnx") == by["export_int8"].sha256

    cli("calib-cache", "--onnx", by["export_fp32"].artifact, "--dataset", "digits", "--count", str(n), "--seed",
        str(seed), "--trt-version", "8.6.1", "--out", str(tmp_path / "calib.cache"))
    assert sha256_file(tmp_path / "calib.cache") == by["calib_cache"].sha256
