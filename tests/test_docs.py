"""The docs are tested: the Python API page's examples run, and every command the README shows exists."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from edgeres.cli import main

REPO = Path(__file__).resolve().parents[1]


def _blocks(path: Path, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", path.read_text(), flags=re.S)


@pytest.mark.slow
def test_api_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = _blocks(REPO / "docs" / "API.md", "python")
    assert len(blocks) >= 3
    scope: dict = {}
    for code in blocks[:2]:            # the pipeline, then one stage at a time on its run
        exec(compile(code, "docs/API.md", "exec"), scope)
    assert scope["result"].ok and (tmp_path / "runs" / "api-demo" / "fp32-api.onnx").is_file()


def test_every_readme_command_exists():
    used = set()
    for block in _blocks(REPO / "README.md", "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line.split("#", 1)[0]) if line.strip() else []
            if words[:1] == ["sudo"]:
                words = words[1:]
            if words[:1] == ["edgeres"] and len(words) > 1 and not words[1].startswith("-"):
                used.add(words[1])
    assert used, "no edgeres command found in the README"
    unknown = used - set(main.commands)
    assert not unknown, f"README shows commands that do not exist: {sorted(unknown)}"
    assert {"build", "predict", "bench", "bundle", "deploy"} <= used
