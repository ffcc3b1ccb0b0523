"""What an operator sees during and after a fleet command: one line per host as it finishes (or one JSON line with
--jsonl), then a table and the counts (ok, failed, unknown, skipped, duplicate): a host never attempted is skipped, not
failed; a host whose activation never answered is unknown (the next deploy or status reads it back). --json prints
one document at the end instead: {"hosts": [...], "summary": {...}}."""
from __future__ import annotations

import json
from collections import Counter
from typing import Any

from edgeres.deploy.ssh import HostResult

OUTCOMES = ("ok", "failed", "unknown", "skipped", "duplicate")


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def host_line(r: HostResult, *, as_json: bool = False) -> str:
    """The line printed when a host finishes."""
    if as_json:
        return json.dumps({"event": "host", **r.to_dict()}, sort_keys=True, default=str)
    if r.ok:
        out = r.result or {}
        what = r.release or "-"
        if "backend" in out:
            ver = out.get("verification") or {}
            what += (f" {out.get('backend')} agree {_fmt(ver.get('top1_agreement_pct'), '.2f')}%"
                     f" sent {r.bytes_sent} B ({len(r.sent)} files, {len(r.skipped)} already there)")
        return f"{r.host}: ok {what} ({r.duration_s:.1f} s)"
    return f"{r.host}: {r.outcome.upper()}({r.stage}) {r.message}".rstrip()


def progress_line(r: HostResult, event: dict, *, as_json: bool = False) -> str:
    """A line while a host works: bytes copied so far, or seconds the device has been verifying or checking."""
    if as_json:
        return json.dumps({"event": "progress", "host": r.host, **event}, sort_keys=True, default=str)
    seconds = f"{float(event.get('seconds') or 0):.0f} s"
    if event.get("what") == "copy":
        mb = 1e6
        return f"{r.host}: copy {event.get('bytes', 0) / mb:.1f} of {event.get('of', 0) / mb:.1f} MB ({seconds})"
    return f"{r.host}: {event.get('what')} on the device ({seconds}; an engine build takes minutes)"


def earlier_note(r: HostResult) -> str | None:
    """How an activation this controller could not confirm (unknown) ended, as the device told it now."""
    if not r.earlier:
        return None
    e, device = r.earlier, r.earlier.get("device")
    what = f"the earlier activation of {e.get('release')} (attempt {e.get('attempt')}, reported unknown)"
    if not device:
        return f"{what}: no record on the device, so it never switched"
    reason = f" ({device['reason']})" if device.get("reason") else ""
    return f"{what}: {device.get('outcome')}{reason}"


def summary(results: list[HostResult]) -> str:
    n = Counter(r.outcome for r in results)
    return ", ".join(f"{n[o]} {o}" for o in OUTCOMES if n[o] or o in ("ok", "failed"))


def _table(head: tuple[str, ...], rows: list[tuple], results: list[HostResult],
           counted: list[HostResult] | None = None) -> str:
    """The table, then the note lines of RESULTS (message, warnings, what an earlier activation did...), then the
    counts of COUNTED (default: RESULTS)."""
    rows = [head, *rows]
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    for r in results:
        notes = [r.message] if r.message else []
        notes += [f"warning: {w}" for w in r.warnings]
        if earlier_note(r):
            notes.append(earlier_note(r))
        if r.host_key_added:
            notes.append(f"new host key recorded: {r.host_key_added}")
        result = r.result or {}
        if result.get("note"):
            notes.append(result["note"])
        notes += [f"warning: {w}" for w in (result.get("device") or {}).get("warnings", [])]
        if r.pruned:
            notes.append("pruned: " + ", ".join(r.pruned))
        if r.units and not r.units.get("installed"):
            notes.append(f"verify-on-boot units not installed: {r.units.get('reason')}")
        lines += [f"{r.host}: {n}" for n in notes]
    lines.append(summary(results if counted is None else counted))
    return "\n".join(lines)


def _status_word(r: HostResult) -> str:
    return "ok" if r.ok else f"{r.outcome.upper()}({r.stage})"


def format_table(results: list[HostResult]) -> str:
    head = ("host", "status", "release", "backend", "tensorrt", "prec", "agree %", "acc %", "median_ms", "sent B",
            "sent/had")
    rows = []
    for r in results:
        out = r.result or {}
        ver, bench = out.get("verification") or {}, out.get("benchmark") or {}
        rows.append((r.host, _status_word(r), r.release or "-", out.get("backend") or "-",
                     (out.get("device") or {}).get("tensorrt") or "-", out.get("precision") or "-",
                     _fmt(ver.get("top1_agreement_pct"), ".2f"), _fmt(ver.get("accuracy_pct"), ".2f"),
                     _fmt(bench.get("median_ms"), ".3f"), r.bytes_sent, f"{len(r.sent)}/{len(r.skipped)}"))
    return _table(head, rows, results)


def format_status(results: list[HostResult]) -> str:
    head = ("host", "release", "bundle sha", "tensorrt", "backend", "engine", "verdict", "median_ms", "when")
    rows = []
    for r in results:
        st = r.result or {}
        res = st.get("result") or {}
        engine = res.get("engine")
        built = "-" if not engine else ("cached" if engine.get("cached") else "built")
        if not st.get("installed"):
            verdict = "not installed"
        elif st.get("trial"):
            verdict = "switched, being checked (not committed yet)"
        elif st.get("pending"):
            verdict = "pending (no passed verification of this release yet)"
        else:
            verdict = res.get("status") or "-"
        rows.append((r.host, st.get("current") or "-", (st.get("manifest_sha256") or "-")[:12],
                     (res.get("device") or {}).get("tensorrt") or "-", res.get("backend") or "-", built,
                     verdict if r.ok else _status_word(r), _fmt((res.get("benchmark") or {}).get("median_ms"), ".3f"),
                     res.get("finished_at") or "-"))
    return _table(head, rows, [r for r in results if not r.ok or r.earlier or r.warnings], counted=results)
