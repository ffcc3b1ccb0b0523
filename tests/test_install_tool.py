"""tools/install.py hands uv the settings pip is configured with, so uv resolves what pip would (the local CPU torch
wheel, never a CUDA build chosen freely from PyPI)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location("install_tool", Path(__file__).parent.parent / "tools" / "install.py")
install_tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(install_tool)

PIP_CONFIG_LIST = """\
:env:.cert='/etc/ssl/certs/ca-certificates.crt'
:env:.default-timeout='180'
:env:.find-links='/opt/wheels'
global.cert='/etc/ssl/certs/ca-certificates.crt'
global.constraint='{constraint}'
global.extra-index-url='file:///opt/pypi/simple file:///opt/pypi-more/simple'
global.find-links='/somewhere/else'
install.index-url='https://mirror.example/simple'
download.find-links='/not-for-install'
"""


def test_pip_settings_become_uv_flags(tmp_path):
    constraint = tmp_path / "constraints.txt"
    constraint.write_text("torch<=2.14.1\n")
    cfg = install_tool.parse_pip_config(PIP_CONFIG_LIST.format(constraint=constraint))
    assert cfg["find-links"] == ["/opt/wheels"]   # the environment wins over the file, as for pip
    args = install_tool.uv_args(cfg)
    assert args[:2] == ["--index-strategy", "unsafe-best-match"]   # pip's rule: the best version on any index
    pairs = list(zip(args[2::2], args[3::2]))
    assert ("--index-url", "https://mirror.example/simple") in pairs
    assert [v for k, v in pairs if k == "--extra-index-url"] == ["file:///opt/pypi/simple", "file:///opt/pypi-more/simple"]
    assert [v for k, v in pairs if k == "--find-links"] == ["/opt/wheels"]
    assert ("-c", str(constraint)) in pairs


def test_a_constraint_file_that_is_gone_is_not_passed(tmp_path):
    cfg = install_tool.parse_pip_config(PIP_CONFIG_LIST.format(constraint=tmp_path / "missing.txt"))
    assert "-c" not in install_tool.uv_args(cfg)


def test_no_pip_configuration_means_uv_defaults():
    assert install_tool.uv_args(install_tool.parse_pip_config("")) == ["--index-strategy", "unsafe-best-match"]
