"""The controller's journal of activations it could not confirm.

When a device does not answer an activation in time, the controller reports "unknown" (never "switched") and records
the attempt here; the next command to that device (deploy, status) asks the device how that attempt ended (its
STATE/activations/<attempt>.json: committed, fell back, refused, or no record: it never ran) and reports it, then
the entry goes. One JSON file, written atomically:

    $XDG_STATE_HOME/edgeres/activations.json   (default ~/.local/state/edgeres/activations.json)
    {"<user@host:port> <remote root>": {"host": ..., "release": ..., "attempt": ..., "at": ...}, ...}
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from edgeres.io import atomic_write_text


def default_path() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path("~/.local/state").expanduser())
    return Path(base) / "edgeres" / "activations.json"


def key(resolved: str | None, host: str, remote_root: str) -> str:
    """One device's entry: its address as ssh resolves it (the host as given when unresolved) and install root."""
    return f"{resolved or host} {remote_root}"


class Journal:
    def __init__(self, path: Path):
        self.path = path

    def read(self) -> dict[str, dict]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def update(self, add: dict[str, dict], drop: set[str]) -> None:
        """Record ADD (key -> the attempt left unknown) and forget DROP (keys whose attempt was read back)."""
        if not add and not drop:
            return
        data = {k: v for k, v in self.read().items() if k not in drop}
        data.update({k: {**v, "at": time.time()} for k, v in add.items()})
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write_text(self.path, json.dumps(data, indent=2, sort_keys=True) + "\n")
