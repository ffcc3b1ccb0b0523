"""Install edgeres and its pinned dependencies into a venv: `make install` runs this (standard library only).

With uv (installed into the venv from constraints.txt, pinned there) the install takes seconds instead of most of a
minute. uv does not read pip's configuration, so the indexes, find-links, constraint files and certificate that
pip would use on this machine (`pip config list`: its files and PIP_* variables) are handed to uv as flags; the
torch it picks is then the one pip would pick (the pinned CPU build where the machine provides one), never a
multi-GB CUDA build chosen freely. Anything that goes wrong on the uv path falls back to pip, said in one line.
EDGERES_INSTALLER=pip asks for pip outright.

    python3 tools/install.py VENV
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET = "-e .[dev]"


def pip_config(python: str) -> dict[str, list[str]]:
    """pip's effective settings, file and environment, as `pip config list` prints them."""
    return parse_pip_config(subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True,
                                           text=True).stdout)


def parse_pip_config(out: str) -> dict[str, list[str]]:
    """`pip config list` lines (`global.find-links='/opt/wheels'`, `:env:.find-links='...'`) as lists of values per
    setting; an `:env:` line (a PIP_* variable) replaces the files' values, as it does for pip."""
    found: dict[str, list[str]] = {}
    env_keys: set[str] = set()
    for line in out.splitlines():
        key, sep, value = line.partition("=")
        if not sep or "." not in key:
            continue
        scope, _, name = key.partition(".")
        if scope not in (":env:", "global", "install"):
            continue
        values = shlex.split(value.strip().strip("'\"")) if value.strip() else []
        if scope == ":env:":
            env_keys.add(name)
            found[name] = values
        elif name not in env_keys:
            found.setdefault(name, []).extend(values)
    return found


def uv_args(cfg: dict[str, list[str]]) -> list[str]:
    # pip takes the best version across every index it knows; uv's safe default (first index that has the name) would
    # refuse pins found only on a later index
    args = ["--index-strategy", "unsafe-best-match"]
    for url in cfg.get("index-url", [])[:1]:
        args += ["--index-url", url]
    for url in cfg.get("extra-index-url", []):
        args += ["--extra-index-url", url]
    for link in cfg.get("find-links", []):
        args += ["--find-links", link]
    for path in cfg.get("constraint", []):
        if Path(path).is_file():
            args += ["-c", path]
    return args


def run(cmd: list[str], env: dict[str, str] | None = None) -> bool:
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode == 0


def with_pip(python: str) -> None:
    ok = run([python, "-m", "pip", "install", "-q", "--upgrade", "pip"]) and \
        run([python, "-m", "pip", "install", "-q", "-c", "constraints.txt", *shlex.split(TARGET)])
    if not ok:
        sys.exit("install: pip could not install edgeres (see above)")


def with_uv(python: str, venv: Path) -> bool:
    if not run([python, "-m", "pip", "install", "-qq", "-c", "constraints.txt", "uv"]):
        return False
    cfg = pip_config(python)
    env = dict(os.environ)
    cert = (cfg.get("cert") or [""])[0]
    if cert and "SSL_CERT_FILE" not in env:
        env["SSL_CERT_FILE"] = cert   # the certificate pip is told to trust
    cmd = [str(venv / "bin" / "uv"), "pip", "install", "-q", "--python", python, "-c", "constraints.txt",
           *uv_args(cfg), *shlex.split(TARGET)]
    return run(cmd, env)


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        sys.exit("usage: python3 tools/install.py VENV")
    venv = Path(argv[0]).absolute()
    python = str(venv / "bin" / "python")
    if os.environ.get("EDGERES_INSTALLER", "uv") == "pip":
        with_pip(python)
    elif not with_uv(python, venv):
        print("install: uv could not install edgeres (see above); installing with pip instead", file=sys.stderr)
        with_pip(python)


if __name__ == "__main__":
    main(sys.argv[1:])
