"""Nothing lost, nothing crashes: run-folder locking, honest verdicts, published
checkpoint shapes, file modes, resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeres.cli import main
from edgeres.io import sha256_file
from edgeres.records import read_plan, read_records, verdict

EDGERES = [sys.executable, "-m", "edgeres"]
SMALL = ["--arch", "mnist_resnet", "--epochs", "2", "--bench-seconds", "0", "--max-drop", "100", "--min-agreement", "0"]


def _consistent(run: Path) -> None:
    """Every record's parent artifact is in the run, and every artifact matches its recorded sha256."""
    records = read_records(run)
    shas = {r.sha256 for r in records if r.sha256}
    for r in records:
        assert r.parent_sha256 is None or r.parent_sha256 in shas, f"{r.stage}: parent not in the run"
    latest = {r.stage: r for r in records}
    for r in latest.values():
        if r.artifact:
            assert sha256_file(r.artifact) == r.sha256, f"{r.stage}: artifact differs from its record"


@pytest.mark.slow
def test_killed_build_and_a_second_build_leave_the_folder_consistent(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen([*EDGERES, "build", "--int8", "--qat-epochs", "0", *SMALL, "--out", str(run)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                             start_new_session=True)
    try:
        seen = []
        for line in first.stdout:            # wait until it is inside a stage that writes artifacts
            seen.append(line)
            if line.startswith("[ptq] running"):
                break
        assert any(ln.startswith("[ptq] running") for ln in seen), "".join(seen)
        os.killpg(first.pid, signal.SIGSTOP)   # frozen mid-stage (still holding its lock), however fast the machine
        second = subprocess.run([*EDGERES, "build", "--int8", "--qat-epochs", "0", *SMALL, "--out", str(run)],
                                capture_output=True, text=True, env=env, timeout=300)
        assert second.returncode == 1
        assert second.stderr.strip().splitlines() == [
            f"Error: {run} is in use by another build (pid {first.pid}); wait for it or choose another --out"]
        os.killpg(first.pid, signal.SIGKILL)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    _consistent(run)
    ok, message = verdict(read_records(run), read_plan(run))
    assert not ok and message.startswith("incomplete: stopped after fold; not run: ptq"), message
    third = subprocess.run([*EDGERES, "build", "--int8", "--qat-epochs", "0", *SMALL, "--out", str(run)],
                           capture_output=True, text=True, env=env, timeout=600)
    assert third.returncode == 0, third.stdout[-2000:] + third.stderr[-2000:]
    assert "[train] unchanged, reused" in third.stdout and "[fold] unchanged, reused" in third.stdout
    _consistent(run)
    assert verdict(read_records(run), read_plan(run)) == (True, "all gates passed")


@pytest.mark.slow
def test_report_verdict_needs_every_planned_stage(tmp_path):
    run = tmp_path / "run"
    r = CliRunner().invoke(main, ["build", "--quiet", *SMALL, "--out", str(run)])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["report", str(run)])
    assert r.exit_code == 0 and "PASSED: all gates passed" in r.stdout
    lines = (run / "stages.jsonl").read_text().splitlines()
    # a run that stopped after fold (later records gone) and one whose last record is torn
    (run / "stages.jsonl").write_text("\n".join(lines[:2]) + "\n")
    r = CliRunner().invoke(main, ["report", str(run)])
    assert "PASSED" not in r.stdout and r.exit_code == 1   # a FAILED verdict exits 1, as build does
    assert "FAILED: incomplete: stopped after fold; not run: export_fp32, compile, verify" in " ".join(r.stdout.split())
    (run / "stages.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    r = CliRunner().invoke(main, ["report", str(run)])
    assert "FAILED: incomplete: stopped after compile; not run: verify (1 unreadable line(s) in stages.jsonl)" \
        in " ".join(r.stdout.split())


def test_artifacts_get_the_mode_of_any_new_file(tmp_path):
    from edgeres.io import atomic_write_bytes

    old = os.umask(0o022)
    try:
        path = atomic_write_bytes(tmp_path / "a.bin", b"x")
        os.umask(0o027)
        path2 = atomic_write_bytes(tmp_path / "b.bin", b"x")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
    assert path2.stat().st_mode & 0o777 == 0o640


def _published_style(model, path: Path, rename=lambda k: k) -> dict:
    """A state_dict as older PyTorch wrote it: no BatchNorm num_batches_tracked, an OrderedDict with _metadata."""
    import collections

    import torch

    state = model.state_dict()
    old = collections.OrderedDict((rename(k), v) for k, v in state.items() if not k.endswith("num_batches_tracked"))
    old._metadata = collections.OrderedDict((k.rsplit(".", 1)[0] if "." in k else "", {"version": 1})
                                            for k in state)
    torch.save(old, path)
    return state


def test_checkpoints_without_num_batches_tracked_load(tmp_path):
    import torch

    from edgeres.checkpoint import load_model
    from edgeres.models import create_model

    torch.manual_seed(0)
    ref = create_model("resnet18", num_classes=1000)
    state = _published_style(ref, tmp_path / "resnet18-5c106cde.pth")
    plain = create_model("resnet18", num_classes=1000)
    plain.load_state_dict(torch.load(tmp_path / "resnet18-5c106cde.pth", weights_only=True))   # torch accepts it
    model, meta = load_model(tmp_path / "resnet18-5c106cde.pth", arch="resnet18")
    assert meta is None
    assert torch.equal(model.state_dict()["layer4.1.bn2.running_var"], state["layer4.1.bn2.running_var"])
    x = torch.randn(1, 3, 64, 64)
    assert torch.allclose(model(x), ref.eval()(x))


def test_torchvision_era_densenet_keys_load(tmp_path):
    import re

    import torch

    from edgeres.checkpoint import load_model
    from edgeres.models import create_model

    ref = create_model("densenet121", num_classes=10)
    old_key = lambda k: re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k)
    _published_style(ref, tmp_path / "densenet121-a639ec97.pth", rename=old_key)
    model, _ = load_model(tmp_path / "densenet121-a639ec97.pth", arch="densenet121")
    x = torch.randn(1, 3, 32, 32)
    assert torch.allclose(model(x), ref.eval()(x))


def test_random_bytes_checkpoint_never_suggests_the_unsafe_fix(tmp_path):
    bad = tmp_path / "random.pt"
    bad.write_bytes(os.urandom(2048))
    r = CliRunner().invoke(main, ["eval", "--weights", str(bad), "--dataset", "digits"])
    assert r.exit_code == 1
    line = r.stderr.strip()
    assert line.startswith(f"Error: {bad} is not a readable PyTorch checkpoint (")
    assert "weights_only" not in line and line.endswith("never runs pickled code")


@pytest.mark.slow
def test_resume_keeps_the_runs_own_epoch_count(tmp_path):
    out = tmp_path / "t"
    base = ["train", "--arch", "mnist_resnet", "--input-size", "16", "--quiet", "--json", "--out", str(out)]
    r = CliRunner().invoke(main, [*base, "--epochs", "1"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, [*base, "--resume"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["epochs"] == 1          # not the demo recipe's 4
    r = CliRunner().invoke(main, [*base, "--resume", "--epochs", "2"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["epochs"] == 2
    r = CliRunner().invoke(main, [*base, "--resume", "--lr", "0.5"])
    assert r.exit_code == 1
    assert "was started with other settings (train.lr)" in r.stderr


def test_compile_refuses_to_leave_an_existing_trtexec_script(tmp_path):
    script = tmp_path / "m.plan.trtexec.sh"
    script.write_text("keep\n")
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"")
    r = CliRunner().invoke(main, ["compile", "--onnx", str(onnx), "--out", str(tmp_path / "m.plan"),
                                  "--trt-version", "10.3"])
    assert r.exit_code == 1 and "already exists; pass --force" in r.stderr
    assert script.read_text() == "keep\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.plan.trtexec.sh"]


def test_resume_compares_only_what_trains_the_model(tmp_path):
    """A run's last.pt records the recipe it was started with; resuming compares the sections that train the model
    (model, data, train; the epoch count may grow). Runs saved before this round recorded every section: a gate or a
    quantization setting there is no reason to refuse."""
    from edgeres.errors import ConfigError
    from edgeres.recipe import load_recipe
    from edgeres.train import _check_resumable

    recipe = load_recipe("demo")
    saved = recipe.with_overrides({"gates.max_drop_qat": 3.0, "quant.qat_epochs": 5}).to_dict()
    _check_resumable(saved, recipe, tmp_path / "last.pt")   # not refused
    saved["train"]["lr"] = 0.5
    with pytest.raises(ConfigError, match=r"other settings \(train.lr\)"):
        _check_resumable(saved, recipe, tmp_path / "last.pt")
