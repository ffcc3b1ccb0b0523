"""Stage records: one JSON line per stage run in runs/<name>/stages.jsonl, so a run can be audited and resumed."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Generic, TypeVar

from edgeres.env import environment
from edgeres.io import atomic_write_json, sha256_file


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


Out = TypeVar("Out")


@dataclass
class StageResult(Generic[Out]):
    """What every stage's `run(inputs, settings)` returns: its record (metrics, gates, the artifact it wrote after
    its own check, and that file's sha256) and its typed output, which the next stage consumes."""

    record: StageRecord
    output: Out

    @property
    def passed(self) -> bool:
        return self.record.passed


def add_drop_gate(rec: StageRecord, top1: float, reference_top1: float | None, limit: float | None,
                  source: str = "--max-drop") -> None:
    """Record top-1, the FP32 reference's top-1 and the drop (all in %, the drop in percentage points), and gate the
    drop when a limit is given (`source` names where the limit came from, for the message)."""
    rec.metrics["top1"] = top1
    if reference_top1 is None:
        return
    drop = round(reference_top1 - top1, 4)
    rec.metrics.update(fp32_top1=reference_top1, drop_pp=drop)
    if limit is not None:
        g = rec.add_gate(Gate("top1_drop_pp", drop, limit, "<="))
        if not g.passed:
            rec.message = f"{rec.stage}: top-1 dropped {drop:.2f} pp > {source} {limit:g}"


def append_record(run_dir: str | Path, record: StageRecord) -> None:
    path = Path(run_dir) / "stages.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record.to_dict(), sort_keys=True, default=str) + "\n")
        f.flush()


def read_records(run_dir: str | Path) -> list[StageRecord]:
    return read_records_counted(run_dir)[0]


def read_records_counted(run_dir: str | Path) -> tuple[list[StageRecord], int]:
    """The readable records and how many lines were not (a line torn by a kill mid-write, or garbage)."""
    path = Path(run_dir) / "stages.jsonl"
    if not path.is_file():
        return [], 0
    out, bad = [], 0
    for line in path.read_bytes().splitlines():
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            if not isinstance(d, dict) or not isinstance(d.get("stage"), str):
                raise TypeError("not a record")
            out.append(StageRecord.from_dict(d))
        except (ValueError, TypeError):   # JSONDecodeError and UnicodeDecodeError are ValueErrors
            bad += 1                         # the stage simply re-runs
    return out, bad


PLAN_FILE = "plan.json"


def write_plan(run_dir: str | Path, stages: list[str]) -> None:
    """The stages this build means to run, so a verdict can require every one of them."""
    atomic_write_json(Path(run_dir) / PLAN_FILE, {"stages": stages})


def read_plan(run_dir: str | Path) -> list[str] | None:
    try:
        stages = json.loads((Path(run_dir) / PLAN_FILE).read_text()).get("stages")
    except (OSError, ValueError, AttributeError):
        return None
    return [s for s in stages if isinstance(s, str)] if isinstance(stages, list) else None


def verdict(records: list[StageRecord], planned: list[str] | None, *, torn: int = 0) -> tuple[bool, str]:
    """PASSED only when every planned stage has a record that passed (or was skipped with its reason) and each
    record was made from the artifact its parent record names; else FAILED with the first reason."""
    latest: dict[str, StageRecord] = {}
    for r in records:
        latest[r.stage] = r
    planned = planned if planned is not None else list(latest)
    chosen = [latest[s] for s in planned if s in latest]
    failed = [r for r in chosen if r.status == Status.FAILED.value]
    if failed:
        return False, failed[0].message or f"{failed[0].stage} failed"
    missing = [s for s in planned if s not in latest]
    if missing:
        last = chosen[-1].stage if chosen else None
        where = f"stopped after {last}" if last else "no stage finished"
        torn_note = f" ({torn} unreadable line(s) in stages.jsonl)" if torn else ""
        return False, f"incomplete: {where}; not run: {', '.join(missing)}{torn_note}"
    shas = {r.sha256 for r in chosen if r.sha256}
    stale = [r for r in chosen if r.parent_sha256 and r.parent_sha256 not in shas]
    if stale:
        return False, (f"inconsistent: {stale[0].stage} was made from an artifact no later record has "
                       f"(re-run the build)")
    return True, "all gates passed"


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


@contextlib.contextmanager
def run_lock(run_dir: str | Path) -> Iterator[None]:
    """Hold the run folder for one build. An flock is released by the kernel when its process dies, so a killed
    build never leaves the folder locked; a second build while one runs is refused, not interleaved."""
    from edgeres.errors import ConfigError

    path = Path(run_dir) / ".lock"
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            raise ConfigError(f"{run_dir} is in use by another build (pid {holder}); wait for it or choose "
                              f"another --out") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
