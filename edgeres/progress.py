"""Never silent for long: while a stage runs on a terminal, one status line with its elapsed time once nothing else
was printed for a few seconds (progress bars, NNCF's, the stage's own lines all count as output). The line is
rewritten in place (carriage return), never added to: it is erased before the next output and when the stage ends,
so a build's scrollback holds what the stages said, not a line per tick. In a log (not a terminal) nothing is added."""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator

QUIET_S = 4.0      # no output for this long -> the status line
PERIOD_S = 0.5


class _Status:
    """The one status line on `out`: shown, rewritten in place, erased before anything else is written."""

    def __init__(self, out):
        self.out, self.lock = out, threading.Lock()
        self.last = time.monotonic()   # the last time anything else was written
        self.shown = ""                # the status text on screen now ("" : none)
        self.partial = False           # the last output left a line unfinished (not a bar, which redraws itself)

    def wrote(self, text: str) -> None:
        """Called (under the lock) before `text` goes out: erase the status line first."""
        if text:
            self.erase()
            self.last = time.monotonic()
            self.partial = not text.endswith(("\n", "\r")) and "\r" not in text

    def show(self, text: str) -> None:
        if text == self.shown:
            return
        lead = "\n" if self.partial and not self.shown else "\r"
        self.partial = False
        pad = " " * max(0, len(self.shown) - len(text))
        self.out.write(f"{lead}{text}{pad}")
        self.out.flush()
        self.shown = text

    def erase(self) -> None:
        if self.shown:
            self.out.write("\r" + " " * len(self.shown) + "\r")
            self.out.flush()
            self.shown = ""


class _Tap:
    """A stream that erases the status line before each write and remembers when it was written to (and otherwise
    is the stream it wraps)."""

    def __init__(self, inner, status: _Status):
        self._inner, self._status = inner, status

    def write(self, text):
        with self._status.lock:
            self._status.wrote(text)
            return self._inner.write(text)

    def __getattr__(self, name):
        return getattr(self._inner, name)


@contextlib.contextmanager
def heartbeat(label: str, *, enabled: bool = True, stream=None) -> Iterator[None]:
    """While the block runs: after QUIET_S seconds without output on stdout/stderr, show `label running (N s)` on
    one line rewritten in place on `stream` (stdout), until the next output or the block's end erase it. Only on a
    terminal: in a log, the stage's own start and finish lines (with its time) are what a reader wants."""
    out = stream or sys.stdout
    if not enabled or not getattr(out, "isatty", lambda: False)():
        yield
        return
    status = _Status(out)
    start = status.last
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Tap(sys.stdout, status), _Tap(sys.stderr, status)
    stop = threading.Event()

    def beat():
        while not stop.wait(PERIOD_S):
            with status.lock:
                now = time.monotonic()
                if now - status.last >= QUIET_S:
                    status.show(f"{label} running ({now - start:.0f} s)")

    t = threading.Thread(target=beat, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()
        with status.lock:
            status.erase()
        sys.stdout, sys.stderr = saved


@contextlib.contextmanager
def silenced(quiet: bool):
    """Send NNCF's progress bars (rich, written to stdout/stderr whatever the log level) to /dev/null when quiet;
    its INFO log lines are already off (see quantize._nncf)."""
    if not quiet:
        yield
        return
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
        yield
