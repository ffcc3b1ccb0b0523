"""Stage records: one JSON line per stage run in runs/<name>/stages.jsonl, so a run can be audited and resumed."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from edgeres.env import environment
from edgeres.io import sha256_file


class Status(str, Enum):
    PASSED = "passed"
    FAILED = "failed"
    SKIPPED = "skipped"


@dataclass
class Gate:
    """A check of a stage against its parent: `value` must be `op` (<= or >=) `limit`."""

    name: str
    value: float
    limit: float
    op: str = "<="
    passed: bool = field(init=False)

    def __post_init__(self) -> None:
        self.passed = bool(self.value <= self.limit if self.op == "<=" else self.value >= self.limit)

    def describe(self) -> str:
        return f"{self.name} {self.value:.4g} {'>' if self.op == '<=' else '<'} {self.limit:.4g}" if not self.passed \
            else f"{self.name} {self.value:.4g} {self.op} {self.limit:.4g}"


@dataclass
class StageRecord:
    stage: str
    status: str = Status.PASSED.value
    artifact: str | None = None
    sha256: str | None = None
    parent_sha256: str | None = None
    recipe_hash: str = ""
    inputs_hash: str = ""          # what the stage was computed from: parent sha + its own settings
    metrics: dict[str, Any] = field(default_factory=dict)
    gates: list[dict[str, Any]] = field(default_factory=list)
    extra_artifacts: dict[str, str] = field(default_factory=dict)
    message: str = ""
    environment: dict[str, Any] = field(default_factory=environment)
    duration_s: float = 0.0
    finished_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    def add_gate(self, gate: Gate) -> Gate:
        self.gates.append(asdict(gate))
        if not gate.passed:
            self.status = Status.FAILED.value
            self.message = self.message or f"{self.stage}: {gate.describe()}"
        return gate

    @property
    def passed(self) -> bool:
        return self.status == Status.PASSED.value

    def set_artifact(self, path: str | Path) -> None:
        self.artifact = str(path)
        self.sha256 = sha256_file(path)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StageRecord:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def append_record(run_dir: str | Path, record: StageRecord) -> None:
    path = Path(run_dir) / "stages.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record.to_dict(), sort_keys=True, default=str) + "\n")
        f.flush()


def read_records(run_dir: str | Path) -> list[StageRecord]:
    path = Path(run_dir) / "stages.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(StageRecord.from_dict(json.loads(line)))
        except (json.JSONDecodeError, TypeError):
            continue  # a line torn by a kill mid-write is ignored; the stage simply re-runs
    return out


def reusable(run_dir: str | Path, stage: str, inputs_hash: str) -> StageRecord | None:
    """The latest passed record of `stage` made from the same inputs whose artifact is intact on disk."""
    for rec in reversed(read_records(run_dir)):
        if rec.stage != stage or rec.inputs_hash != inputs_hash or not rec.passed:
            continue
        if rec.artifact is None:
            return rec
        if Path(rec.artifact).is_file() and sha256_file(rec.artifact) == rec.sha256:
            return rec
    return None
