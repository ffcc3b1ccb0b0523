"""The degradation experiment: depths, the nets it builds, a tiny real run through the CLI, its files."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from edgeres.cli import main
from edgeres.errors import ConfigError
from edgeres.experiment import (
    CSV_FIELDS,
    FILES,
    DegradationConfig,
    Variant,
    cifar_resnet,
    gradient_norms,
    orderings,
    parse_depths,
    run_degradation,
    step_lr,
)
from edgeres.models import create_model

MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"
TINY = ["--dataset", "digits", "--input-size", "8", "--depths", "14,8", "--iterations", "6", "--eval-every", "3",
        "--batch-size", "32", "--test-images", "60", "--grad-batches", "2", "--device", "cpu", "--threads", "1"]


def test_parse_depths():
    assert parse_depths("56,20") == (20, 56)
    assert parse_depths((8, 14, 8)) == (8, 14)
    with pytest.raises(ConfigError, match=r"21, 30 not of the form 6n\+2"):
        parse_depths("20,21,30")
    with pytest.raises(ConfigError, match="at least two"):
        parse_depths("20")
    with pytest.raises(ConfigError, match="comma-separated integers"):
        parse_depths("20,x")
    with pytest.raises(ConfigError, match="6n\\+2"):
        parse_depths("2,8")


@pytest.mark.parametrize("variant,arch", [(Variant.RESIDUAL, "resnet20"), (Variant.PLAIN, "plain_resnet20")])
def test_nets_are_the_registry_nets(variant, arch):
    torch.manual_seed(3)
    ours = cifar_resnet(20, variant=variant, num_classes=10, in_channels=3)
    torch.manual_seed(3)
    reg = create_model(arch, num_classes=10)
    a, b = ours.state_dict(), reg.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(2, 3, 32, 32)
    ours.eval(), reg.eval()
    with torch.no_grad():
        assert torch.equal(ours(x), reg(x))


def test_plain_and_residual_twins_differ_only_by_shortcuts():
    torch.manual_seed(0)
    plain = cifar_resnet(8, variant=Variant.PLAIN, num_classes=10, in_channels=1)
    torch.manual_seed(0)
    res = cifar_resnet(8, variant=Variant.RESIDUAL, num_classes=10, in_channels=1)
    p, r = plain.state_dict(), res.state_dict()
    assert p.keys() == r.keys() and all(torch.equal(p[k], r[k]) for k in p)   # same initial weights
    x = torch.randn(2, 1, 16, 16)
    plain.eval(), res.eval()
    with torch.no_grad():
        assert not torch.allclose(plain(x), res(x))                           # but different functions
    convs = [n for n, m in res.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 7   # 8 layers = 7 convs + fc
    with pytest.raises(ConfigError):
        cifar_resnet(10, variant=Variant.PLAIN, num_classes=10, in_channels=1)


def test_lr_schedule_is_the_papers_scaled():
    cfg = DegradationConfig(iterations=64_000)
    assert [step_lr(cfg, i) for i in (0, 31_999, 32_000, 47_999, 48_000, 63_999)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001])


def test_gradient_norms_leave_the_model_unchanged():
    torch.manual_seed(0)
    model = cifar_resnet(14, variant=Variant.PLAIN, num_classes=10, in_channels=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = [(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,)))]
    g = gradient_norms(model, batch)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert len(g["grad_norm"]) == len(g["layers"]) == 14
    assert g["layers"][0] == "conv1" and g["layers"][-1] == "fc"
    assert all(n > 0 for n in g["grad_norm"])
    assert all(p.grad is None for p in model.parameters())


def test_orderings_are_decided_with_intervals():
    """A finding is HELD only when the whole interval of the difference lies on its side of 0, NOT HELD when it lies
    on the other side, NOT SHOWN when a few images either way could reverse it."""
    def run(variant, depth, train, test, n_train=3200, n_test=359):
        return {"variant": variant, "depth": depth,
                "final": {"train_error": train, "test_error": test, "train_images": n_train, "test_images": n_test}}

    runs = [run("plain", 8, 0.0056, 0.012), run("plain", 14, 0.0228, 0.015), run("plain", 20, 0.0056, 0.02),
            run("residual", 8, 0.0056, 5 / 359), run("residual", 14, 0.004, 2 / 359),
            run("residual", 20, 0.0001, 0.001)]
    o = orderings(runs, (8, 14, 20))
    a = o["plain_deeper_higher_train_error"]   # 73 vs 18 of 3,200 images: held; then 18 vs 73: not held
    assert [p["outcome"] for p in a["pairs"]] == ["held", "not held"] and a["outcome"] == "not held"
    assert a["pairs"][0]["interval_pp"][0] > 0 and not a["held"]
    b = o["residual_deeper_lower_test_error"]   # 5 vs 2 of 359 test images: within noise
    assert b["pairs"][0]["outcome"] == "not shown" and b["outcome"] == "not shown" and b["held"] is False
    lo, hi = b["pairs"][0]["interval_pp"]
    assert lo < 0 < hi and b["pairs"][0]["diff_pp"] == pytest.approx(100 * (2 - 5) / 359, abs=1e-3)
    many = [run("plain", 8, 0.10, 0.1), run("plain", 14, 0.10, 0.1),   # a tie: not shown, never "held"
            run("residual", 8, 0.0056, 0.05, n_test=10000), run("residual", 14, 0.004, 0.02, n_test=10000)]
    o = orderings(many, (8, 14))
    assert o["residual_deeper_lower_test_error"]["outcome"] == "held"
    assert o["plain_deeper_higher_train_error"]["outcome"] == "not shown"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("degradation")
    result = CliRunner().invoke(main, ["experiment", "degradation", *TINY, "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    return out, json.loads(result.output)


def test_cli_tiny_run_writes_documented_files(tiny_run):
    out, printed = tiny_run
    for name in FILES.values():
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / FILES["figure"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / FILES["gradients"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in (out / FILES["figure_svg"]).read_bytes()[:2000]
    result = json.loads((out / FILES["json"]).read_text())
    for key in ("experiment", "config", "dataset", "device", "runs", "gradient_norms", "orderings", "environment",
                "files", "seconds", "test_images"):
        assert key in result, key
    assert result["config"]["depths"] == [8, 14]
    assert printed["orderings"] == result["orderings"]
    assert {(r["variant"], r["depth"]) for r in result["runs"]} == {(v, d) for v in ("plain", "residual")
                                                                  for d in (8, 14)}
    for r in result["runs"]:
        assert r["iteration"] == [3, 6]
        assert len(r["train_error"]) == len(r["test_error"]) == len(r["lr"]) == 2
        assert all(0 <= e <= 1 for e in r["train_error"] + r["test_error"])
        assert r["final"] == {"iteration": 6, "train_error": r["train_error"][-1], "test_error": r["test_error"][-1],
                              "train_images": r["train_seen"][-1], "test_images": 60}
        assert r["layers"] == r["depth"]
    assert result["test_images"] == 60


def test_orderings_are_computed_from_the_curves(tiny_run):
    out, _ = tiny_run
    result = json.loads((out / FILES["json"]).read_text())
    final = {(r["variant"], r["depth"]): r for r in result["runs"]}
    a = result["orderings"]["plain_deeper_higher_train_error"]
    assert a["pairs"][0]["deep_value"] == final["plain", 14]["train_error"][-1]
    diff = final["plain", 14]["train_error"][-1] - final["plain", 8]["train_error"][-1]
    assert a["pairs"][0]["diff_pp"] == pytest.approx(100 * diff, abs=1e-3)
    lo, hi = a["pairs"][0]["interval_pp"]
    assert lo <= 100 * diff <= hi
    assert a["outcome"] == ("held" if lo > 0 else "not held" if hi < 0 else "not shown")
    b = result["orderings"]["residual_deeper_lower_test_error"]
    assert b["outcome"] in ("held", "not held", "not shown") and isinstance(b["held"], bool)


def test_csv_matches_json(tiny_run):
    out, _ = tiny_run
    result = json.loads((out / FILES["json"]).read_text())
    with open(out / FILES["csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0].keys()) == CSV_FIELDS
    assert len(rows) == sum(len(r["iteration"]) for r in result["runs"])
    row = next(r for r in rows if r["variant"] == "residual" and r["depth"] == "14" and r["iteration"] == "6")
    run = next(r for r in result["runs"] if r["variant"] == "residual" and r["depth"] == 14)
    assert float(row["test_error"]) == pytest.approx(run["test_error"][-1])
    assert float(row["train_error"]) == pytest.approx(run["train_error"][-1])


def test_gradient_norms_recorded_for_every_net(tiny_run):
    out, _ = tiny_run
    result = json.loads((out / FILES["json"]).read_text())
    assert len(result["gradient_norms"]) == 4
    for g in result["gradient_norms"]:
        assert len(g["grad_norm"]) == g["depth"]
        assert all(n > 0 for n in g["grad_norm"])


def test_refuses_to_overwrite_without_force(tiny_run):
    out, _ = tiny_run
    before = (out / FILES["json"]).read_bytes()
    result = CliRunner().invoke(main, ["experiment", "degradation", *TINY, "--out", str(out)])
    assert result.exit_code == 1
    assert "already exists" in result.output and "--force" in result.output
    assert (out / FILES["json"]).read_bytes() == before


def test_cli_stays_light():
    import subprocess
    import sys

    code = "import sys, edgeres.cli.experiment; print('torch' in sys.modules, 'matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_cli_help_and_bad_depths(tmp_path):
    runner = CliRunner()
    help_ = runner.invoke(main, ["experiment", "degradation", "--help"])
    assert help_.exit_code == 0
    for opt in ("--depths", "--dataset", "--data-dir", "--iterations", "--eval-every", "--batch-size", "--lr",
                "--seed", "--out", "--quiet", "--json"):
        assert opt in help_.output
    assert runner.invoke(main, ["experiment", "--help"]).exit_code == 0
    bad = runner.invoke(main, ["experiment", "degradation", "--depths", "20,51", "--out", str(tmp_path / "o")])
    assert bad.exit_code == 1
    lines = [line for line in bad.output.splitlines() if line.strip()]
    assert lines == ["Error: --depths: 51 not of the form 6n+2 with n >= 1 "
                     "(CIFAR ResNet depths: 8, 14, 20, 26, 32, 44, 56, 110, ...)"]
    assert not (tmp_path / "o").exists()


def test_bad_settings_are_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="eval-every"):
        run_degradation(DegradationConfig(depths=(8, 14), dataset="digits", iterations=5, eval_every=10),
                        out=tmp_path)
    with pytest.raises(ConfigError, match="lr-steps"):
        run_degradation(DegradationConfig(depths=(8, 14), dataset="digits", milestones=(0.5, 1.5)), out=tmp_path)
    with pytest.raises(ConfigError, match="batch-size"):
        run_degradation(DegradationConfig(depths=(8, 14), dataset="digits", iterations=5, eval_every=5,
                                          batch_size=100_000), out=tmp_path, device="cpu", threads=1)


@pytest.mark.skipif(not MNIST.is_dir(), reason=f"real MNIST not found at {MNIST}")
def test_real_mnist_run(tmp_path):
    result = run_degradation(DegradationConfig(depths=(8, 14), dataset="mnist", data_dir=str(MNIST), iterations=2,
                                               eval_every=2, batch_size=16, test_images=32), out=tmp_path,
                             device="cpu", threads=1)
    assert result["dataset"]["name"] == "mnist" and result["dataset"]["input_size"] == 28
    assert result["dataset"]["train_size"] == 60_000
    assert all(r["iteration"] == [2] for r in result["runs"])
    assert (tmp_path / FILES["figure"]).is_file()
