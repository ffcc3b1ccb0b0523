"""Never silent: `edgeres build` on a terminal prints something at least every few seconds (a pseudo-terminal
records the gaps); the heartbeat itself is only on terminals."""
from __future__ import annotations

import fcntl
import io
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time

import pytest

from edgeres import progress


def test_heartbeat_speaks_after_silence_only_on_a_terminal(monkeypatch):
    monkeypatch.setattr(progress, "QUIET_S", 0.3)
    monkeypatch.setattr(progress, "PERIOD_S", 0.05)

    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty = Tty()
    monkeypatch.setattr(sys, "stdout", tty)
    with progress.heartbeat("[x]"):
        time.sleep(1.0)
    assert "[x] running (" in tty.getvalue()
    log = io.StringIO()   # not a terminal: nothing added
    monkeypatch.setattr(sys, "stdout", log)
    with progress.heartbeat("[x]"):
        time.sleep(0.5)
    assert log.getvalue() == ""


@pytest.mark.slow
def test_build_in_a_pseudo_terminal_has_no_10_s_gap(tmp_path):
    pytest.importorskip("nncf")
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))   # an 80-column terminal
    cmd = [sys.executable, "-m", "edgeres", "build", "--arch", "resnet20", "--epochs", "1", "--int8",
           "--input-size", "16", "--calib-size", "64", "--bench-seconds", "0.2", "--max-drop", "100",
           "--min-agreement", "0", "--out", str(tmp_path / "run")]
    p = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env={**os.environ, "NNCF_CI": "1"},
                         close_fds=True)
    os.close(slave)
    last, worst, out, where = time.monotonic(), 0.0, b"", 0
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:   # the child closed the terminal
                break
            if not chunk:
                break
            now = time.monotonic()
            if now - last > worst:
                worst, where = now - last, len(out)
            out += chunk
            last = now
        elif p.poll() is not None:
            break
    p.wait(timeout=60)
    os.close(master)
    assert p.returncode in (0, 1), out[-2000:]
    assert b"[verify]" in out or b"FAILED" in out
    assert worst < 10.0, f"{worst:.1f} s without output after: {out[max(0, where - 300):where]!r}"
    text = out.decode("utf-8", "replace").replace("\r\n", "\n")
    table = text[text.rindex("report: "):].splitlines()[1:]   # the table, its notes and the verdict, printed last
    wide = [line for line in (raw.split("\r")[-1] for raw in table) if len(line) > 80
            and " " in line.strip()]   # a path longer than the terminal is printed whole, on its own line
    assert table and not wide, wide


def test_device_runtime_ticks_while_it_builds_or_times(monkeypatch, capsys):
    """The device runtime (a standalone script on the Jetson) says how long an engine build or the timing loop has
    run every TICK_S; --quiet keeps stderr empty."""
    import argparse
    import time

    from edgeres.deploy import device_runtime as rt

    monkeypatch.setattr(rt, "TICK_S", 0.05)
    with rt.ticking(argparse.Namespace(quiet=False), "timing 200 iterations"):
        time.sleep(1.0)   # 20 ticks due: at least 3 even on a loaded machine
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) >= 3 and all(line.startswith("edgeres-device: timing 200 iterations: ") for line in lines)
    with rt.ticking(argparse.Namespace(quiet=True), "building the engine"):
        time.sleep(0.15)
    assert capsys.readouterr().err == ""
