"""`edgeres bench` statistics on a real ONNX model under real ONNX Runtime, and the CLI."""
import importlib.util
import json
import time

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import export_tiny_onnx as _export

from edgeres.bench import Stats, benchmark, format_bench, percentile, stability_warning, stats
from edgeres.cli import main
from edgeres.errors import ConfigError
from edgeres.runners import OrtRunner


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory):
    import torch

    from edgeres.models import create_model

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("bench")
    model = create_model("resnet20", num_classes=10)
    return {"dynamic": _export(model, d / "r20.onnx"), "static": _export(model, d / "r20_static.onnx", dynamic=False)}


@pytest.fixture(scope="module")
def runner(onnx_files):
    r = OrtRunner(onnx_files["dynamic"], threads=1)
    yield r
    r.close()


class Counting:
    """A real runner, instrumented: counts calls and makes the first `slow` calls sleep."""

    def __init__(self, inner, slow=0, sleep_s=0.0):
        self.inner, self.calls, self.slow, self.sleep_s = inner, 0, slow, sleep_s
        self.name, self.device, self.precision, self.path = inner.name, inner.device, inner.precision, inner.path
        self.input_shape, self.batch_dim, self.threads = inner.input_shape, inner.batch_dim, inner.threads

    def infer(self, x):
        self.calls += 1
        if self.calls <= self.slow:
            time.sleep(self.sleep_s)
        return self.inner.infer(x)


def test_percentiles_ordered_and_consistent_with_samples(runner):
    res = benchmark(runner, iterations=40, warmup_s=0, warmup_iterations=2)
    r = res.results[0]
    s = np.array(r.samples_ms)
    lat = r.latency
    assert r.iterations == len(s) == 40
    assert lat.min <= lat.median <= lat.p90 <= lat.p95 <= lat.p99 <= lat.max
    assert lat.min == s.min() and lat.max == s.max()
    assert lat.mean == pytest.approx(s.mean()) and lat.median == pytest.approx(np.median(s))
    for p, v in ((90, lat.p90), (95, lat.p95), (99, lat.p99)):
        assert v in s                                   # nearest rank: an actual sample
        assert (s <= v).mean() >= p / 100 > (s < v).mean()
    assert lat.cv == pytest.approx(s.std() / s.mean())
    assert r.wall_s >= s.sum() / 1e3                    # wall covers every timed call
    assert r.inferences_per_s == pytest.approx(40 / r.wall_s)
    assert r.gpu_compute is None and r.h2d is None       # CPU: no device timings invented
    assert res.backend == "onnxruntime" and res.input_shape == (3, 32, 32)
    assert "packages" in res.environment and res.environment["runner"]["threads"] == 1


def test_iterations_exact_and_warmup_excluded(runner):
    c = Counting(runner, slow=3, sleep_s=0.25)
    r = benchmark(c, iterations=12, warmup_s=0, warmup_iterations=3).results[0]
    assert r.iterations == 12 and r.warmup_iterations == 3
    assert c.calls == 15
    assert r.latency.max < 250.0                        # the slow warm-up calls are not in the samples
    assert r.warmup_s >= 0.75


def test_warmup_duration_respected(runner):
    c = Counting(runner)
    r = benchmark(c, iterations=5, warmup_s=0.3, warmup_iterations=0).results[0]
    assert r.warmup_s >= 0.3 and r.warmup_iterations >= 1
    assert c.calls == r.warmup_iterations + 5


def test_duration_limit_respected(runner):
    r = benchmark(runner, duration_s=0.4, warmup_s=0, warmup_iterations=0).results[0]
    assert r.wall_s >= 0.4
    # the loop stops at the first iteration ending past the limit: without the last call it was still under
    assert r.wall_s - r.samples_ms[-1] / 1e3 < 0.4 + 0.05
    assert r.iterations == len(r.samples_ms) >= 1


def test_iterations_and_duration_both_minimums(runner):
    r = benchmark(runner, iterations=3, duration_s=0.3, warmup_s=0, warmup_iterations=0).results[0]
    assert r.iterations >= 3 and r.wall_s >= 0.3


def test_batch_list(runner):
    res = benchmark(runner, batch_sizes=(1, 4), iterations=5, warmup_s=0)
    assert [r.batch for r in res.results] == [1, 4]
    r4 = res.results[1]
    assert r4.images_per_s == pytest.approx(4 * r4.inferences_per_s)
    text = format_bench(res)
    assert "p99" in text and "img/s" in text and len(text.splitlines()) >= 6


def test_bad_options_are_config_errors(runner, onnx_files):
    with pytest.raises(ConfigError, match="batch sizes"):
        benchmark(runner, batch_sizes=(0,), iterations=1)
    with pytest.raises(ConfigError, match="iterations"):
        benchmark(runner, iterations=0)
    with pytest.raises(ConfigError, match="threads"):
        benchmark(runner, iterations=1, threads=2)
    static = OrtRunner(onnx_files["static"])
    with pytest.raises(ConfigError, match="fixed batch of 1"):
        benchmark(static, batch_sizes=(1, 2), iterations=1)


def test_percentile_nearest_rank():
    a = np.arange(1, 101, dtype=float)
    assert (percentile(a, 50), percentile(a, 90), percentile(a, 99), percentile(a, 100)) == (50, 90, 99, 100)
    assert percentile(np.array([7.0]), 99) == 7.0


def test_cv_warning_on_synthetic_latencies():
    steady = stats([1.0] * 50 + [1.02] * 50)
    assert steady.cv < 0.02 and stability_warning(steady, iterations=100) is None
    noisy = stats([1.0, 3.0] * 50)
    assert noisy.cv == pytest.approx(0.5)
    warning = stability_warning(noisy, iterations=100)
    assert warning is not None and "CV 50.0 %" in warning
    edge = Stats(min=1, mean=1, median=1, p90=1, p95=1, p99=1, max=1, std=0.1, cv=0.1)
    assert stability_warning(edge) is None and stability_warning(edge, threshold=0.05) is not None
    assert "iterations" in stability_warning(steady, iterations=3)


def test_cli_json_and_text(onnx_files):
    cli = CliRunner()
    res = cli.invoke(main, ["bench", "--engine", str(onnx_files["dynamic"]), "--batch", "1,2", "--iterations", "5",
                            "--warmup", "0", "--threads", "1", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert {"artifact", "backend", "device", "precision", "threads", "input_shape", "results",
            "environment"} <= set(out)
    assert [r["batch"] for r in out["results"]] == [1, 2]
    r = out["results"][0]
    assert {"iterations", "wall_s", "inferences_per_s", "images_per_s", "latency", "gpu_compute", "h2d", "d2h",
            "warning"} <= set(r)
    assert {"min", "mean", "median", "p90", "p95", "p99", "max", "cv"} <= set(r["latency"])
    assert r["iterations"] == 5 and "samples_ms" not in r
    text = cli.invoke(main, ["bench", "--engine", str(onnx_files["dynamic"]), "--iterations", "3", "--warmup", "0"])
    assert text.exit_code == 0 and "p50" in text.output


def test_cli_errors_are_one_line(onnx_files, tmp_path):
    cli = CliRunner()
    res = cli.invoke(main, ["bench", "--engine", str(tmp_path / "none.onnx")])
    assert res.exit_code == 1 and res.output.strip().count("\n") == 0 and "not found" in res.output
    res = cli.invoke(main, ["bench", "--engine", str(onnx_files["dynamic"]), "--batch", "a,b"])
    assert res.exit_code == 2 and "comma-separated integers" in res.output
    assert cli.invoke(main, ["bench", "--help"]).exit_code == 0


def test_cli_plan_without_tensorrt(tmp_path):
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here")
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"\0" * 64)
    res = CliRunner().invoke(main, ["bench", "--engine", str(plan)])
    assert res.exit_code == 1
    assert res.output.strip().count("\n") == 0 and res.output.startswith("Error:") and "TensorRT" in res.output


def test_cli_checkpoint(tmp_path):
    import torch

    from edgeres.checkpoint import ModelMeta, save_checkpoint
    from edgeres.models import create_model

    torch.manual_seed(0)
    meta = ModelMeta(arch="mnist_resnet", num_classes=10, in_channels=1, input_size=28, mean=(0.13,), std=(0.31,))
    save_checkpoint(tmp_path / "m.pt", create_model("mnist_resnet", num_classes=10), meta)
    res = CliRunner().invoke(main, ["bench", "--engine", str(tmp_path / "m.pt"), "--iterations", "3", "--warmup",
                                    "0", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["backend"] == "torch" and out["input_shape"] == [1, 28, 28]
