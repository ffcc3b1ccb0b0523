"""Shell completion knows recipes, architectures and datasets (click's completion protocol, as bash calls it)."""
from __future__ import annotations

import os
import subprocess
import sys


def _complete(words: str) -> list[str]:
    env = {**os.environ, "COMP_WORDS": words, "COMP_CWORD": str(len(words.split()) - 1),
           "_EDGERES_COMPLETE": "bash_complete"}
    p = subprocess.run([sys.executable, "-m", "edgeres"], env=env, capture_output=True, text=True, timeout=120)
    return [line.split(",", 1)[1] for line in p.stdout.splitlines() if "," in line]


def test_completion_of_recipes_archs_and_datasets():
    assert "imagenette_resnet18" in _complete("edgeres build --recipe imagen")
    assert set(_complete("edgeres build --arch resnet1")) >= {"resnet18", "resnet101", "resnet152", "resnet110"}
    assert _complete("edgeres build --dataset ima") == ["imagefolder"]
    assert "demo" in _complete("edgeres train --recipe de")
