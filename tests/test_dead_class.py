"""A small folder of photos with one class the FP32 model can never get right ('rose' looks exactly like 'red'):
the build must not read PASSED, must name the class, and its report must show per-class numbers and confusion
matrices with the class names in text (and render in a real browser)."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgeres.cli import main

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def make_photos(root: Path) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, color, n in (("red", (220, 30, 30), 60), ("blue", (30, 30, 220), 60), ("rose", (220, 30, 30), 12)):
        (root / name).mkdir(parents=True)
        for i in range(n):
            a = np.clip(np.array(color) + rng.integers(-30, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(a).save(root / name / f"{name} {i}.png")
    return root


@pytest.fixture(scope="module")
def dead_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("dead")
    photos = make_photos(root / "photos")
    out = root / "run"
    r = CliRunner().invoke(main, ["build", "--data-dir", str(photos), "--recipe", "demo", "--arch", "resnet20",
                                  "--input-size", "32", "--epochs", "6", "--int8", "--bench-seconds", "0",
                                  "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out, r.output


def test_a_dead_class_is_named_and_never_a_plain_passed(dead_run):
    out, printed = dead_run
    rep = json.loads((out / "report.json").read_text())
    assert rep["verdict"] != "PASSED"
    kinds = {(f["class"], f["kind"]) for f in rep["class_findings"]}
    assert ("rose", "fp32_never_right") in kinds and ("rose", "few_images") in kinds
    verdict = " ".join(printed[printed.rindex(rep["verdict"] + ":"):].split())
    assert "class 'rose': FP32 never right (0 of 2 evaluation images)" in verdict
    assert rep["class_counts"]["evaluation"] == [12, 12, 2] and rep["class_names"] == ["blue", "red", "rose"]
    assert rep["per_class"]["fp32"][2] == 0.0 and rep["confusion"]["fp32"]["matrix"][2] == [0, 2, 0]
    assert json.loads((out / "data_split.json").read_text())["evaluation"][0].startswith("blue/")


def test_report_html_has_the_per_class_table_and_confusion_matrices_in_text(dead_run):
    out, _ = dead_run
    page = (out / "report.html").read_text()
    assert "<h2>Per class</h2>" in page and "Confusion matrix, FP32" in page and "Confusion matrix, final INT8" in page
    assert "<td>rose</td>" in page and "FP32 never right" in page
    md = (out / "report.md").read_text()
    assert "## Per class" in md and "| rose | 8 | 2 | 2 | 0.0 |" in md


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (Debian package chromium; .ci/run installs it)")
def test_the_per_class_report_renders_in_a_browser(dead_run, tmp_path):
    out, _ = dead_run
    shots = REPO / "bench-results"
    shots.mkdir(exist_ok=True)
    p = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1024,4200",
                        f"--screenshot={shots / 'report_per_class.png'}", (out / "report.html").as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and (shots / "report_per_class.png").stat().st_size > 10_000, p.stderr[-2000:]
