"""Never silent for long: while a stage runs on a terminal, a line with its elapsed time whenever nothing else was
printed for a few seconds (progress bars, NNCF's, the stage's own lines all count as output)."""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator

QUIET_S = 4.0      # no output for this long -> a heartbeat line
PERIOD_S = 0.5


class _Tap:
    """A stream that remembers when it was last written to (and otherwise is the stream it wraps)."""

    def __init__(self, inner, clock: list[float]):
        self._inner, self._clock = inner, clock

    def write(self, text):
        if text:
            self._clock[0] = time.monotonic()
        return self._inner.write(text)

    def __getattr__(self, name):
        return getattr(self._inner, name)


@contextlib.contextmanager
def heartbeat(label: str, *, enabled: bool = True, stream=None) -> Iterator[None]:
    """While the block runs: after QUIET_S seconds without output on stdout/stderr, print `label running (N s)`
    (through tqdm.write, so a live bar is redrawn under it). Only on a terminal: in a log, the stage's own start and
    finish lines (with its time) are what a reader wants."""
    out = stream or sys.stdout
    if not enabled or not getattr(out, "isatty", lambda: False)():
        yield
        return
    clock = [time.monotonic()]
    start = clock[0]
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Tap(sys.stdout, clock), _Tap(sys.stderr, clock)
    stop = threading.Event()

    def beat():
        from tqdm import tqdm

        while not stop.wait(PERIOD_S):
            now = time.monotonic()
            if now - clock[0] >= QUIET_S:
                tqdm.write(f"{label} running ({now - start:.0f} s)", file=sys.stdout)

    t = threading.Thread(target=beat, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()
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
