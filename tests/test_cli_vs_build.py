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


# what a record says about the stage's result; timing, environment, paths and the run's own hashes aside
SAME = ("stage", "status", "sha256", "metrics", "gates", "message")


def _untimed(value):
    """A record's metrics without its throughput figures (img/s of a QAT epoch): wall time is never the same."""
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items() if k != "images_per_s"}
    if isinstance(value, list):
        return [_untimed(v) for v in value]
    return value


def same_record(cli_obj: dict, build_rec) -> None:
    ours, theirs = _untimed(cli_obj["record"]), _untimed(build_rec.to_dict())
    for key in SAME:
        assert ours[key] == theirs[key], f"{build_rec.stage}: {key} differs: {ours[key]!r} vs {theirs[key]!r}"


def test_cli_stages_write_what_build_writes(run, tmp_path):
    """Each command runs the stage's own `run()` on the build's inputs with the build's settings: the artifact has
    the build's sha256 and the record the build's metrics, gates and verdict."""
    by = {r.stage: r for r in read_records(run)}
    recipe_hash = json.loads((run / "meta.json").read_text())["recipe_hash"]
    calib = by["ptq"].metrics
    n, seed, probe = calib["calib_size"], 0, "64"

    obj = cli("fold", "--weights", by["train"].artifact, "--out", str(tmp_path / "folded.pt"), "--dataset", "digits",
              "--probe-size", probe)
    assert sha256_file(tmp_path / "folded.pt") == by["fold"].sha256
    same_record(obj, by["fold"])

    obj = cli("quantize", "--ptq", "--weights", by["fold"].artifact, "--dataset", "digits", "--calib-size", str(n),
              "--seed", str(seed), "--max-drop", "100", "--min-agreement", "95", "--out", str(tmp_path / "ptq.pt"),
              "--quiet")
    assert sha256_file(tmp_path / "ptq.pt") == by["ptq"].sha256
    same_record(obj, by["ptq"])
    assert obj["record"]["metrics"]["drop_pp"] == by["ptq"].metrics["drop_pp"]   # against the same FP32 top-1

    obj = cli("export", "--weights", by["fold"].artifact, "--out", str(tmp_path / "fp32.onnx"), "--recipe-hash",
              recipe_hash, "--dataset", "digits", "--limit", probe)
    assert sha256_file(tmp_path / "fp32.onnx") == by["export_fp32"].sha256
    same_record(obj, by["export_fp32"])

    obj = cli("export", "--weights", by["ptq"].artifact, "--int8", "--out", str(tmp_path / "int8.onnx"),
              "--recipe-hash", recipe_hash, "--dataset", "digits")
    assert sha256_file(tmp_path / "int8.onnx") == by["export_int8"].sha256
    same_record(obj, by["export_int8"])

    obj = cli("calib-cache", "--onnx", by["export_fp32"].artifact, "--dataset", "digits", "--count", str(n),
              "--seed", str(seed), "--trt-version", "8.6.1", "--out", str(tmp_path / "calib.cache"))
    assert sha256_file(tmp_path / "calib.cache") == by["calib_cache"].sha256
    same_record(obj, by["calib_cache"])


def test_cli_qat_writes_what_build_writes(tmp_path):
    """`edgeres quantize --qat --recipe RUN/recipe.yaml` from the folded model (PTQ, then QAT, trained with the
    recipe's augmentation) on a build's inputs: the build's QAT checkpoint, byte for byte, and its record."""
    import yaml

    from edgeres.build import BuildOptions, build

    out = tmp_path / "run"
    res = build(BuildOptions(out=out, arch="mnist_resnet", epochs=2, qat_epochs=1, int8=True, bench_seconds=0,
                             max_drop=100.0, quiet=True,
                             # a 2-epoch model's CPU artifact agrees with it on ~88 %: not what is compared here
                             overrides={"quant.calib_size": 64, "gates.min_agreement_pct": 0.0}))
    assert res.ok, res.message
    by = {r.stage: r for r in read_records(out)}
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    q = recipe["quant"]
    obj = cli("quantize", "--qat", "--weights", by["fold"].artifact, "--dataset", "digits", "--calib-size", "64",
              "--seed", str(recipe["train"]["seed"]), "--epochs", str(q["qat_epochs"]), "--lr", str(q["qat_lr"]),
              "--batch-size", str(q.get("qat_batch_size") or recipe["data"]["batch_size"]), "--max-drop", "100",
              "--min-agreement", str(recipe["gates"]["min_agreement_pct"]), "--qat-loss", q["qat_loss"],
              "--recipe", str(out / "recipe.yaml"), "--out", str(tmp_path / "qat.pt"), "--quiet")
    assert sha256_file(tmp_path / "qat.pt") == by["qat"].sha256
    same_record(obj, by["qat"])
    assert not list(tmp_path.glob(".qat*"))   # the intermediate PTQ checkpoint is not left behind
