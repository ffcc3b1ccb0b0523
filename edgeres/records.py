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

from edgeres import stats
from edgeres.env import environment
from edgeres.errors import ArtifactError, ConfigError, EdgeresError
from edgeres.io import atomic_write_json, read_small_bytes, require_regular_file, sha256_file, special_file
from edgeres.recipe import load_recipe


class Status(str, Enum):
    PASSED = "passed"
    FAILED = "failed"
    SKIPPED = "skipped"


@dataclass
class Gate:
    """A check of a stage against its parent: `value` must be `op` (<= or >=) `limit`, decided by the one rule in
    edgeres/stats.py: from the value's confidence interval [lo, hi] (a sampled measurement: N images at `level`)
    or from the value alone (an exact check: lo = hi = None). `outcome` is passed / failed / not measurable;
    `passed` is False only when the build must stop: a FAILED gate, or a `required` gate (a precondition, the
    FP32 model beating chance) that is not shown to pass."""

    name: str                      # the machine name in records ("top1_drop_pp")
    value: float
    limit: float
    op: str = "<="
    lo: float | None = None        # the confidence interval of `value` (None: exact)
    hi: float | None = None
    n: int | None = None           # images it was measured on
    level: float | None = None     # confidence level of [lo, hi]
    what: str = ""                 # in words: "top-1 drop vs FP32"
    unit: str = ""                 # "pp", "%" or "" (a ratio, a count)
    key: str = ""                  # the recipe key of the limit ("gates.max_drop_qat"); "" when fixed
    source: str = ""               # where the limit came from ("built-in default", "recipe demo", "--gate ...")
    required: bool = False
    resolve_n: int | None = None   # NOT MEASURABLE: images that would decide it at the observed rates
    counts: dict[str, Any] | None = None   # what the value was computed from (paired decisions, flips)
    outcome: str = field(init=False)
    passed: bool = field(init=False)

    def __post_init__(self) -> None:
        lo = self.value if self.lo is None else self.lo
        hi = self.value if self.hi is None else self.hi
        self.outcome = stats.decide(lo, hi, self.op, self.limit)
        self.passed = self.outcome == stats.PASSED or (self.outcome == stats.NOT_MEASURABLE and not self.required)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Gate:
        """A gate from a record (older records carry only name, value, limit, op and passed)."""
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__ and k not in ("outcome", "passed")})

    def _num(self, x: float) -> str:
        text = f"{x:.2f}" if self.unit in ("pp", "%") else f"{x:.4g}"
        return f"{text} {self.unit}" if self.unit else text

    def flag(self) -> str:
        """The command-line setting that changes this gate's limit."""
        return f"--gate {self.key.removeprefix('gates.')}=VALUE" if self.key.startswith("gates.") else ""

    def measured(self) -> str:
        """What was measured, on how many images, with its interval: "top-1 drop vs FP32 1.11 pp (95 % interval
        -0.49 to 2.76 pp, 359 images)"."""
        what = self.what or self.name
        parts = []
        if self.lo is not None and self.hi is not None:
            parts.append(f"{100 * (self.level or stats.DEFAULT_LEVEL):g} % interval {self._num(self.lo)} to "
                         f"{self._num(self.hi)}")
        if self.n:
            parts.append(f"{self.n:,} images")
        return f"{what} {self._num(self.value)}" + (f" ({', '.join(parts)})" if parts else "")

    def limit_text(self) -> str:
        """The limit, where it came from and how to change it."""
        where = [w for w in (f"{self.key} from {self.source or 'built-in default'}" if self.key else "",
                             f"change it with {self.flag()}" if self.flag() else "") if w]
        return self._num(self.limit) + (f" ({'; '.join(where)})" if where else "")

    def describe(self) -> str:
        """The gate in words, for messages: what was measured, on how many images, the outcome and the limit."""
        side = "at most" if self.op == "<=" else "at least"
        if self.outcome == stats.PASSED:
            return f"{self.measured()}: within the limit, {side} {self.limit_text()}"
        if self.outcome == stats.FAILED:
            beyond = "above" if self.op == "<=" else "below"
            whole = "the whole interval lies " if self.lo is not None else ""
            return f"{self.measured()}: {whole}{beyond} the limit of {self.limit_text()}"
        more = (f"; about {self.resolve_n:,} images would decide it at these rates" if self.resolve_n
                else "; the value sits on the limit, so more images at these rates would not decide it")
        return f"{self.measured()}: cannot be told from the limit of {self.limit_text()}{more}"


def drop_gate(p: stats.Paired, limit: float, *, level: float, key: str = "", source: str = "",
              what: str = "top-1 drop vs FP32") -> Gate:
    """A top-1 drop (pp) gate decided from paired decisions on the same images (stats.paired_drop_interval)."""
    g = stats.drop_gate_numbers(p, limit, level)
    return Gate("top1_drop_pp", g["value"], limit, "<=", lo=g["lo"], hi=g["hi"], n=p.n, level=level, what=what,
                unit="pp", key=key, source=source, resolve_n=g["resolve_n"], counts=p.to_dict())


def proportion_gate(name: str, k: int, n: int, limit: float, *, op: str = ">=", level: float, key: str = "",
                    source: str = "", what: str = "", required: bool = False) -> Gate:
    """A proportion (%) gate, k of n images (Wilson interval): an agreement, a top-1."""
    g = stats.proportion_gate_numbers(k, n, op, limit, level)
    return Gate(name, g["value"], limit, op, lo=g["lo"], hi=g["hi"], n=n, level=level, what=what, unit="%",
                key=key, source=source, required=required, resolve_n=g["resolve_n"], counts={"k": int(k), "n": n})


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
    depends_on: dict[str, str] = field(default_factory=dict)   # run-folder files its verdict rests on -> sha256
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


def add_fp32_gates(rec: StageRecord, evaluation, reference_top1: float | None, reference_logits, settings, *,
                   key: str = "top1_agreement_pct") -> None:
    """The gates of a model that replaces FP32 (the final INT8 model, the CPU artifact, an engine), decided from
    paired decisions on the same evaluation images: its top-1 drop (pp; Newcombe's paired interval) and its top-1
    agreement (%) with FP32 (Wilson), recorded under `key`; each gated when its limit in `settings` (max_drop,
    drop_source, min_agreement_pct; level and origins) is not None. Without the reference logits only top-1 is
    recorded."""
    import numpy as np

    rec.metrics["top1"] = evaluation.top1
    if reference_top1 is None or reference_logits is None:
        return
    labels = np.asarray(evaluation.labels)
    pred, ref_pred = np.asarray(evaluation.logits).argmax(1), np.asarray(reference_logits).argmax(1)
    p = stats.paired(ref_pred.tolist(), pred.tolist(), labels.tolist())
    level = getattr(settings, "level", stats.DEFAULT_LEVEL)
    origins = getattr(settings, "origins", {}) or {}
    agree = round(100.0 * p.agree / p.n, 4) if p.n else 100.0
    rec.metrics.update(fp32_top1=reference_top1, drop_pp=round(reference_top1 - evaluation.top1, 4),
                       paired=p.to_dict(), n_eval=p.n)
    rec.metrics[key] = agree
    if settings.max_drop is not None:
        rec.add_gate(drop_gate(p, settings.max_drop, level=level, key=settings.drop_source,
                               source=origins.get(settings.drop_source, "built-in default")))
    if settings.min_agreement_pct is not None:
        rec.add_gate(proportion_gate(key, p.agree, p.n, settings.min_agreement_pct, level=level,
                                     key="gates.min_agreement_pct", what="top-1 agreement with FP32",
                                     source=origins.get("gates.min_agreement_pct", "built-in default")))


def append_record(run_dir: str | Path, record: StageRecord) -> None:
    path = Path(run_dir) / "stages.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    if special_file(path):   # opening a FIFO for writing blocks until a reader comes
        raise ArtifactError(f"{path} is {special_file(path)}, not the records file edgeres writes; refused")
    with open(path, "a") as f:
        f.write(json.dumps(record.to_dict(), sort_keys=True, default=str) + "\n")
        f.flush()


def read_records(run_dir: str | Path) -> list[StageRecord]:
    return read_records_counted(run_dir)[0]


def read_records_counted(run_dir: str | Path) -> tuple[list[StageRecord], int]:
    """The readable records and how many lines were not (a line torn by a kill mid-write, or garbage)."""
    path = Path(run_dir) / "stages.jsonl"
    if special_file(path):
        raise ArtifactError(f"{path} is {special_file(path)}, not the records file edgeres writes; refused")
    if not path.is_file():
        return [], 0
    out, bad = [], 0
    for line in read_small_bytes(path, "stage records", limit=256 << 20, error=ArtifactError).splitlines():
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
RECIPE_FILE = "recipe.yaml"


def write_plan(run_dir: str | Path, stages: list[str], *, limits: dict[str, Any] | None = None) -> None:
    """The stages this build means to run, so a verdict can require every one of them, and the hash of the
    recipe.yaml it runs with (written just before), so a verdict can tell when the recipe on disk is another one.
    `finished` turns true (finish_plan) only when the build ran its plan to the end or to a failed gate.
    `limits`: {"loosened": [...], "confidence": level}, what the verdict says of the limits it was decided with."""
    atomic_write_json(Path(run_dir) / PLAN_FILE, {"stages": stages, "finished": False,
                                                   "recipe_hash": _recipe_hash(Path(run_dir) / RECIPE_FILE),
                                                   "limits": limits or {}})


def _recipe_hash(path: Path) -> str | None:
    """Recipe.hash() of a recipe file (its settings, not its formatting), None when it is missing or invalid."""
    try:
        return load_recipe(path).hash()
    except (EdgeresError, OSError):
        return None


def finish_plan(run_dir: str | Path) -> None:
    info = read_plan_info(run_dir)
    if info is not None:
        atomic_write_json(Path(run_dir) / PLAN_FILE, {**info, "finished": True})


def read_plan_info(run_dir: str | Path) -> dict[str, Any] | None:
    """plan.json as a dict, or None when it is missing or unreadable (never blocks on a FIFO or reads a device)."""
    try:
        info = json.loads(read_small_bytes(Path(run_dir) / PLAN_FILE, "plan", limit=1 << 20))
    except (EdgeresError, OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def read_plan(run_dir: str | Path) -> list[str] | None:
    stages = (read_plan_info(run_dir) or {}).get("stages")
    return [s for s in stages if isinstance(s, str)] if isinstance(stages, list) else None


def artifact_in_run(run_dir: str | Path, artifact: str) -> Path:
    """Where a record's artifact lies in `run_dir` now: records name it as the build saw it (a relative --out, a
    folder since moved), and every artifact sits one folder deep (export/model_fp32.onnx) or at the top."""
    p, run = Path(artifact), Path(run_dir)
    for candidate in (run / p.parent.name / p.name, run / p.name):
        if candidate.exists():
            return candidate
    return p


def _recheck(run_dir: Path, chosen: list[StageRecord]) -> str | None:
    """The first reason the files on disk are not what the records say, or None."""
    info = read_plan_info(run_dir)
    if info is None and os.path.lexists(run_dir / PLAN_FILE):
        return f"{PLAN_FILE} is unreadable or not a regular file: the planned stages are unknown; re-run the build"
    info = info or {}
    if info.get("finished") is False:
        return "the last build did not finish (killed or crashed): its plan and recipe.yaml are newer than the " \
               "records; re-run the build"
    want = info.get("recipe_hash")
    if want:
        got = _recipe_hash(run_dir / RECIPE_FILE)
        if got != want:
            how = "changed since" if got else "missing or invalid now"
            return f"{RECIPE_FILE} is not the recipe the build ran with ({how}); re-run the build"
    for r in chosen:
        for name, want in (r.depends_on or {}).items():
            try:
                got = sha256_file(require_regular_file(run_dir / name, "file", ArtifactError))
            except (EdgeresError, OSError) as e:
                return f"{r.stage}: {name}, which its verdict rests on, is gone or unreadable ({e}); re-run the build"
            if got != want:
                return (f"{r.stage}: {run_dir / name} is not the file its verdict rests on (sha256 differs since the "
                        f"build); re-run the build")
        if not r.artifact or not r.sha256:
            continue
        path = artifact_in_run(run_dir, r.artifact)
        try:
            got = sha256_file(require_regular_file(path, "artifact", ArtifactError))
        except (EdgeresError, OSError) as e:
            return f"{r.stage}: its artifact is gone or unreadable ({e})"
        if got != r.sha256:
            return f"{r.stage}: {path} is not the file the stage wrote and checked (sha256 differs); re-run the build"
    return None


def verdict(records: list[StageRecord], planned: list[str] | None, *, torn: int = 0,
            run_dir: str | Path | None = None) -> tuple[bool, str]:
    """PASSED only when every planned stage has a record that passed (or was skipped with its reason) and each
    record was made from the artifact its parent record names; with `run_dir`, also only when the last build
    finished, recipe.yaml is the one it ran with and every artifact still has the sha256 its record holds.
    Else FAILED with the first reason."""
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
    problem = _recheck(Path(run_dir), chosen) if run_dir is not None else None
    if problem:
        return False, problem
    return True, "all gates passed"


def verify_copies(run_dir: str | Path, copies: list[tuple[Path, Path]]) -> None:
    """Each copy ((source in the run, the copy) pairs) must have the sha256 the latest record of its source holds:
    what a verdict rests on is what ships. ArtifactError naming the first file that does not."""
    records = read_records(run_dir)
    for src, copy in copies:
        want = None
        for r in reversed(records):
            if r.artifact and r.sha256 and artifact_in_run(run_dir, r.artifact).resolve() == Path(src).resolve():
                want = r.sha256
                break
        if want is None:
            raise ArtifactError(f"{src}: no stage record names it, so nothing vouches for it; re-run the build")
        if sha256_file(copy) != want:
            raise ArtifactError(f"{src} is not the file its stage wrote and checked (sha256 differs from the "
                                f"record); re-run the build")


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


def held_by(run_dir: str | Path) -> str | None:
    """The pid of the build holding `run_dir` (its RUN/.lock flock), None when no build holds it (or no lock file).
    Only tries the lock: never creates or writes the lock file."""
    path = Path(run_dir) / ".lock"
    if special_file(path) or not path.is_file():
        return None
    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return f.read().strip() or "?"
        fcntl.flock(f, fcntl.LOCK_UN)
    return None


@contextlib.contextmanager
def run_lock(run_dir: str | Path) -> Iterator[None]:
    """Hold the run folder for one build. An flock is released by the kernel when its process dies, so a killed
    build never leaves the folder locked; a second build while one runs is refused, not interleaved."""

    path = Path(run_dir) / ".lock"
    if special_file(path):
        raise ConfigError(f"{path} is {special_file(path)}, not the lock file edgeres writes; refused")
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
