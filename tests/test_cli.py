"""The `edgeres` command as a user meets it: help, version, every command's --help, light start-up."""
from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import edgeres
from edgeres.cli import COMMAND_MODULES, EdgeresGroup, main
from edgeres.errors import ConfigError

HEAVY = ("torch", "onnx", "onnxruntime", "nncf", "tensorrt", "asyncssh", "matplotlib", "polygraphy")
EXE = Path(sys.executable).parent / "edgeres"


def sh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=120)


def test_console_script_help_and_version():
    assert EXE.is_file(), f"console script not installed next to {sys.executable} (pip install -e .)"
    r = sh(str(EXE), "--help")
    assert r.returncode == 0, r.stderr
    assert "Usage: edgeres" in r.stdout
    for name in main.commands:
        assert name in r.stdout
    r = sh(str(EXE), "--version")
    assert r.returncode == 0 and r.stdout.strip() == f"edgeres, version {edgeres.__version__}"


def test_python_dash_m():
    r = sh(sys.executable, "-m", "edgeres", "--help")
    assert r.returncode == 0, r.stderr
    assert "Usage:" in r.stdout and "summary" in r.stdout
    r = sh(sys.executable, "-m", "edgeres", "--version")
    assert r.returncode == 0 and edgeres.__version__ in r.stdout


def test_help_imports_no_heavy_package():
    """`import edgeres`, `edgeres --help` and every `edgeres <cmd> --help` leave torch & co. unimported."""
    code = f"""
import sys
import edgeres
import edgeres.cli
from click.testing import CliRunner
runner = CliRunner()
codes = [runner.invoke(edgeres.cli.main, ["--help"]).exit_code]
codes += [runner.invoke(edgeres.cli.main, [name, "--help"]).exit_code for name in edgeres.cli.main.commands]
heavy = sorted(m for m in {HEAVY!r} if m in sys.modules)
print(codes, heavy)
sys.exit(1 if heavy or any(codes) else 0)
"""
    r = sh(sys.executable, "-c", code)
    assert r.returncode == 0, f"heavy packages imported by --help: {r.stdout} {r.stderr}"
    # control: the check sees torch when something does import it
    r = sh(sys.executable, "-c", "import sys, edgeres.models; print('torch' in sys.modules)")
    assert r.stdout.strip() == "True"


def test_every_command_module_is_registered():
    listed = []
    for name in COMMAND_MODULES:
        mod = importlib.import_module(f"edgeres.cli.{name}")
        assert isinstance(mod.COMMANDS, list), name
        for cmd in mod.COMMANDS:
            assert isinstance(cmd, click.Command)
            assert main.commands.get(cmd.name) is cmd, f"{name}.{cmd.name} not registered"
            listed.append(cmd.name)
    assert len(listed) == len(set(listed)), f"two modules define the same command: {listed}"
    assert sorted(listed) == sorted(main.commands)
    assert {"archs", "summary"} <= set(main.commands)


@pytest.mark.parametrize("name", sorted(main.commands))
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_every_command_has_help(name, flag):
    r = CliRunner().invoke(main, [name, flag])
    assert r.exit_code == 0, r.output
    assert f"Usage: main {name}" in r.output or f"Usage: edgeres {name}" in r.output
    assert main.commands[name].help, f"`edgeres {name}` has no help text"


def test_unknown_command_is_a_usage_error():
    r = CliRunner().invoke(main, ["no-such-command"])
    assert r.exit_code == 2 and "no-such-command" in r.output


def _group_with(exc: BaseException) -> click.Group:
    @click.group(cls=EdgeresGroup)
    def group():
        pass

    @group.command()
    def boom():
        raise exc

    return group


def test_library_errors_become_one_line_exit_1():
    r = CliRunner().invoke(_group_with(ConfigError("resnet19 is not an architecture")), ["boom"])
    assert r.exit_code == 1
    assert r.output.strip() == "Error: resnet19 is not an architecture"


def test_other_exceptions_are_not_swallowed():
    """A bug must show as a bug (traceback), not be dressed up as a user error."""
    r = CliRunner().invoke(_group_with(ZeroDivisionError("bug")), ["boom"])
    assert isinstance(r.exception, ZeroDivisionError)
    assert not r.output.startswith("Error:")


def test_keyboard_interrupt_exits_130():
    r = CliRunner().invoke(_group_with(KeyboardInterrupt()), ["boom"])
    assert r.exit_code == 130 and "interrupted" in r.output


def test_archs_lists_the_registry():
    from edgeres.models import ARCHS

    r = CliRunner().invoke(main, ["archs", "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)
    assert sorted(row["arch"] for row in rows) == sorted(ARCHS)
    by = {row["arch"]: row for row in rows}
    assert by["resnet50"]["family"] == "imagenet" and by["resnet50"]["options"] == {"stride_in_1x1": [False, True]}
    assert by["resnet20"]["options"] == {"shortcut": ["A", "B"]}
    assert (by["mnist_resnet"]["in_channels"], by["mnist_resnet"]["input_size"]) == (1, 28)
    text = CliRunner().invoke(main, ["archs"])
    assert text.exit_code == 0
    for name in ARCHS:
        assert name in text.output
    assert len(text.output.strip().splitlines()) == len(ARCHS)


def test_archs_subprocess_as_a_user():
    r = sh(str(EXE), "archs")
    assert r.returncode == 0 and "preact_resnet1202" in r.stdout and "plain_mnist_resnet" in r.stdout
    r = sh(str(EXE), "summary", "--arch", "nope")
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "nope" in r.stderr and "Traceback" not in r.stderr


def test_every_command_has_an_example_whose_options_exist():
    """`--help` ends with an example on every command; each example names the command and only its own options."""
    import shlex

    from edgeres.cli import main

    for path, cmd in _commands(main):
        help_text = cmd.help or ""
        assert "Example" in help_text, f"edgeres {' '.join(path)} --help has no example"
        after = help_text.split("Example", 1)[1].lstrip("s:").splitlines()
        example = next(line for line in after if line.strip().startswith("edgeres")).split("#", 1)[0]
        words = shlex.split(example)
        assert words[:1 + len(path)] == ["edgeres", *path], example
        known = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
        unknown = [w for w in words if w.startswith("--") and w.split("=", 1)[0] not in known]
        assert not unknown, f"edgeres {' '.join(path)} example uses unknown options {unknown}"


def test_help_paragraphs_are_rewrapped_not_indented():
    """The description in --help reads as paragraphs: a docstring's own indentation never shows up as runs of spaces
    inside a wrapped line (the appended example once stopped click from dedenting it)."""
    import re

    import click

    from edgeres.cli import main

    for path, cmd in _commands(main):
        with click.Context(cmd, info_name=" ".join(["edgeres", *path])) as ctx:
            text = cmd.get_help(ctx).split("Options:", 1)[0]
        prose = [line for line in text.split("Example", 1)[0].splitlines()[1:] if line.strip()]
        bad = [line for line in prose if re.search(r"\S {3,}\S", line) or line.startswith("      ")]
        assert not bad, f"edgeres {' '.join(path)} --help: {bad[:2]}"


@pytest.mark.parametrize("command", ["status", "rollback"])
def test_ssh_commands_without_asyncssh_say_what_to_install(monkeypatch, command):
    """asyncssh is optional (edgeres[deploy]): without it the fleet commands stop in one line, before any host."""
    import sys

    from edgeres.cli import main

    monkeypatch.setitem(sys.modules, "asyncssh", None)   # `import asyncssh` raises ImportError
    r = CliRunner().invoke(main, [command, "--host", "jetson1"])
    assert r.exit_code == 1
    assert r.stderr.strip() == ("Error: deploying over SSH needs asyncssh: pip install 'edgeres[deploy]' (nothing was "
                                "sent to any device)")


def _commands(cmd, path=()):
    """(path, command) for every command under a click group."""
    import click

    if isinstance(cmd, click.Group):
        for name, sub in cmd.commands.items():
            yield from _commands(sub, [*path, name])
    else:
        yield list(path), cmd


def test_quantize_names_a_missing_checkpoint_before_anything_else(tmp_path):
    """Without --dataset the run's recipe would name one; a --weights that does not exist is the error to report."""
    from edgeres.cli import main

    r = CliRunner().invoke(main, ["quantize", "--ptq", "--weights", str(tmp_path / "nope.pt"), "--out",
                                  str(tmp_path / "q.pt")])
    assert r.exit_code == 1 and r.stderr.strip() == f"Error: checkpoint not found: {tmp_path / 'nope.pt'}"
    assert list(tmp_path.iterdir()) == []


def test_a_users_file_named_like_the_rejected_output_is_not_replaced(tmp_path):
    """A failed gate keeps <out>.rejected.<ext> beside --out: a file of that name already there is the user's, so the
    command refuses up front (as for --out itself) unless --force."""
    from edgeres.cli import main

    mine = tmp_path / "f.rejected.pt"
    mine.write_bytes(b"the user's own file")
    r = CliRunner().invoke(main, ["fold", "--weights", str(tmp_path / "w.pt"), "--out", str(tmp_path / "f.pt")])
    assert r.exit_code == 1 and str(mine) in r.stderr and "--force" in r.stderr, r.stderr
    assert mine.read_bytes() == b"the user's own file" and sorted(p.name for p in tmp_path.iterdir()) == [mine.name]
