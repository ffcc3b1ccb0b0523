"""report.html as a person sees it: rendered by headless Chromium, nothing wider than the page; a screenshot is
kept in bench-results/ to look at."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from test_bundle import make_run  # noqa: E402 - a real small build's run folder

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
REPO = Path(__file__).resolve().parents[1]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (Debian package chromium; .ci/run "
                                                          "installs it)")]

CHECK = """<script>
window.addEventListener('load', () => {
  const W = document.documentElement.clientWidth, bad = [];
  for (const el of document.body.querySelectorAll('*')) {
    const r = el.getBoundingClientRect();
    if (r.right > W + 1) bad.push(el.tagName + ' ' + (el.className || '') + ' right=' + Math.round(r.right));
  }
  const out = document.createElement('pre');
  out.id = 'edgeres-check';
  out.textContent = JSON.stringify({width: W, scroll: document.documentElement.scrollWidth, bad: bad,
                                    images: document.images.length});
  document.body.appendChild(out);
});
</script>"""


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args],
                          capture_output=True, text=True, timeout=120)


def test_report_html_fits_the_page(tmp_path):
    run = make_run(tmp_path)
    page = (run / "report.html").read_text()
    assert "<pre>{" not in page                      # the environment is a table, not a dict on one line
    checked = tmp_path / "checked.html"
    checked.write_text(page.replace("</body>", CHECK + "</body>"))
    p = _chromium(tmp_path, "--window-size=1024,800", "--virtual-time-budget=5000", "--dump-dom", checked.as_uri())
    assert p.returncode == 0, p.stderr[-2000:]
    marker = p.stdout.split('id="edgeres-check">', 1)
    assert len(marker) == 2, p.stdout[-2000:]
    result = json.loads(marker[1].split("</pre>", 1)[0].replace("&quot;", '"'))
    assert result["bad"] == [] and result["scroll"] <= result["width"], result
    assert result["images"] >= 3                      # curves, top-1, latency (and per-class) plots rendered
    shots = REPO / "bench-results"
    shots.mkdir(exist_ok=True)
    p = _chromium(tmp_path, "--window-size=1024,3600", f"--screenshot={shots / 'report.png'}",
                  (run / "report.html").as_uri())
    assert p.returncode == 0 and (shots / "report.png").stat().st_size > 10_000, p.stderr[-2000:]
