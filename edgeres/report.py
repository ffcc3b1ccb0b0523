"""The stage report: report.json, report.md, a self-contained report.html with plots, and the terminal table."""
from __future__ import annotations

import base64
import html
import io
import math
import time
from pathlib import Path
from typing import Any

from edgeres.env import environment
from edgeres.io import atomic_write_json, atomic_write_text
from edgeres.records import StageRecord

COLUMNS = [("stage", "stage"), ("backend", "backend"), ("precision", "precision"), ("top1", "top-1"),
           ("delta_pp", "Δ vs FP32"), ("agree_pct", "agree w/ FP32"), ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"),
           ("img_s", "img/s"), ("size_mb", "size MB"), ("int8_kernels", "INT8 kernels")]


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "delta_pp":
        return f"{value:+.2f}"
    if key in ("top1", "agree_pct", "p50_ms", "p99_ms"):
        return f"{value:.2f}"
    if key == "img_s":
        return f"{value:,.0f}"
    if key == "size_mb":
        return f"{value:.1f}"
    if key == "speedup":
        return f"{value:.2f}x"
    if isinstance(value, float):
        return f"{value:.3f}" if value < 100 else f"{value:,.0f}"
    return str(value)


def table_rows(report: dict[str, Any], columns=COLUMNS) -> list[list[str]]:
    rows = with_speedups(report.get("rows", []))
    return [[_cell(k, r.get(k)) for k, _ in columns] for r in rows]


# the terminal's table: the same rows in at most TERMINAL_WIDTH columns (short headers that carry the units, a
# speed-up vs FP32 on the same backend, two-space gaps)
TERMINAL_COLUMNS = [("stage", "stage"), ("backend", "backend"), ("precision", "precision"), ("top1", "top-1 %"),
                    ("delta_pp", "Δ pp"), ("agree_pct", "agree %"), ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"),
                    ("img_s", "img/s"), ("speedup", "×FP32"), ("size_mb", "MB"), ("int8_kernels", "INT8 ops")]
TERMINAL_WIDTH = 120


def with_speedups(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each timed row's speed-up (p50) over the FP32 row on its own backend (OpenVINO's CPU artifact: over ONNX
    Runtime FP32, the CPU baseline); None where there is no such row."""
    fp32: dict[str, float] = {}
    for r in rows:   # the first FP32 row of each backend (torch: the trained model) is its baseline
        if r.get("precision") == "fp32" and r.get("p50_ms"):
            fp32.setdefault(r["backend"], r["p50_ms"])
    fp32.setdefault("openvino", fp32.get("onnxruntime"))
    out = []
    for r in rows:
        base = fp32.get(r.get("backend"))
        speed = round(base / r["p50_ms"], 2) if base and r.get("p50_ms") else None
        out.append({**r, "speedup": speed})
    return out


def format_table(report: dict[str, Any]) -> str:
    """The one table the terminal shows: one row per stage and backend, notes wrapped to TERMINAL_WIDTH."""
    import textwrap

    header = [h for _, h in TERMINAL_COLUMNS]
    rows = table_rows(report, TERMINAL_COLUMNS)
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) if rows else len(header[i]) for i in range(len(header))]
    line = lambda cells: "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    out = [line(header).rstrip(), "  ".join("-" * w for w in widths)]
    out += [line(r).rstrip() for r in rows]
    for note in report.get("notes", []):
        out.append(textwrap.fill(note, TERMINAL_WIDTH, initial_indent="note: ", subsequent_indent="      ",
                                 break_on_hyphens=False, break_long_words=False))
    word, text = verdict_parts(report)
    out.append(textwrap.fill(f"{word}: {text}", TERMINAL_WIDTH, subsequent_indent="  ", break_on_hyphens=False,
                             break_long_words=False))
    return "\n".join(out)


def verdict_parts(report: dict[str, Any]) -> tuple[str, str]:
    """("PASSED" | "NOT MEASURABLE" | "FAILED", the sentence): the last line of the table, the report's headline."""
    word = "FAILED" if not report["ok"] else "NOT MEASURABLE" if report.get("unmeasurable") else "PASSED"
    text = (report["message"] if word != "NOT MEASURABLE" else
            f"every gate passed, but {len(report['unmeasurable'])} of them cannot be measured with these images "
            f"(see the note)")
    return word, text + _fp32_text(report.get("fp32"))


def _merged_latency_warnings(rows: list[dict[str, Any]]) -> list[str]:
    """One note for every row whose latency varied too much (was: the same sentence once per row)."""
    import re

    flagged = [(r, re.search(r"CV ([\d.]+) %", r["latency_warning"])) for r in rows if r.get("latency_warning")]
    if not flagged:
        return []
    where = ", ".join(f"{r['stage']}/{r['backend']} {m.group(1)} %" if m else f"{r['stage']}/{r['backend']}"
                      for r, m in flagged)
    return [f"latency varied (coefficient of variation > 10 %) on {where}: other load on the machine, throttling or "
            f"too few runs; run longer (--bench-seconds) or on a quieter machine"]


def gate_cells(g: dict[str, Any]) -> tuple[str, str]:
    """(value, "op limit") in the unit the table uses: agreements in %, drops in pp (percentage points)."""
    if "agreement" in g["name"] and g["limit"] <= 1.0 and g["value"] <= 1.0:
        return f"{100 * g['value']:.2f} %", f"{g['op']} {100 * g['limit']:.2f} %"
    if g["name"].endswith("_pp"):
        return f"{g['value']:.2f} pp", f"{g['op']} {g['limit']:.2f} pp"
    return f"{g['value']:.6g}", f"{g['op']} {g['limit']:.6g}"


def _gate_lines(records: list[dict[str, Any]]) -> list[str]:
    lines = []
    for r in records:
        for g in r.get("gates", []):
            mark = "pass" if g["passed"] else "FAIL"
            value, limit = gate_cells(g)
            lines.append(f"| {r['stage']} | {g['name']} | {value} | {limit} | {mark} |")
    return lines


def env_rows(env: dict[str, Any]) -> list[tuple[str, str]]:
    """The environment as (name, value) rows: python, platform, CPUs, device, then each package."""
    rows = [(k, str(env[k])) for k in ("python", "platform", "cpu_count", "device", "torch_threads") if k in env]
    rows += [(k, str(v)) for k, v in (env.get("packages") or {}).items()]
    rows += [(k, str(v)) for k, v in env.items() if k not in {r[0] for r in rows} and k != "packages"
             and not isinstance(v, (dict, list))]
    return rows


def to_markdown(report: dict[str, Any]) -> str:
    header = [h for _, h in COLUMNS]
    md = [f"# edgeres report: {report['run']}", "",
          "**{}**: {}".format(*verdict_parts(report)), "",
          "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(r) + " |" for r in table_rows(report)]
    md += [""] + [f"- {n}" for n in report.get("notes", [])]
    md += ["", "## Gates", "", "| stage | gate | value | limit | result |", "|---|---|---|---|---|"]
    md += _gate_lines(report["stages"])
    md += ["", "## Stages", "", "| stage | status | duration s | artifact | sha256 |", "|---|---|---|---|---|"]
    for r in report["stages"]:
        md.append(f"| {r['stage']} | {r['status']} | {r['duration_s']:.1f} | {r.get('artifact') or '-'} | "
                  f"{(r.get('sha256') or '-')[:12]} |")
    md += ["", "## Environment", "", "| | |", "|---|---|"]
    md += [f"| {k} | {v} |" for k, v in env_rows(report["environment"])]
    return "\n".join(md) + "\n"


def _plots(report: dict[str, Any]) -> list[tuple[str, str]]:
    """(title, base64 PNG) for each plot; empty when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    figs: list[tuple[str, Any]] = []
    hist = next((r["metrics"].get("history") for r in report["stages"] if r["stage"] == "train"), None)
    if hist:
        fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
        ep = [h.get("epoch") for h in hist]
        for key in ("train_loss", "val_loss", "test_loss"):   # val: the holdout that selects best.pt
            if key in hist[0]:
                ax[0].plot(ep, [h[key] for h in hist], marker="o", label=key)
        for key in ("train_top1", "val_top1", "test_top1"):
            if key in hist[0]:
                ax[1].plot(ep, [h[key] for h in hist], marker="o", label=key)
        ax[0].set_title("loss"), ax[1].set_title("top-1 %")
        for a in ax:
            a.set_xlabel("epoch"), a.legend(), a.grid(alpha=0.3)
        figs.append(("Training curves", fig))
    rows = [r for r in report.get("rows", []) if r.get("top1") is not None]
    if rows:
        labels = [f"{r['stage']}\n{r['backend']}" for r in rows]
        fig, ax = plt.subplots(figsize=(9, 3.2))
        bars = ax.bar(labels, [r["top1"] for r in rows], color="#4c72b0")
        ax.bar_label(bars, labels=[f"{r['top1']:.2f}" for r in rows], fontsize=8, padding=2)   # the differences
        ax.set_ylim(0, 109), ax.set_ylabel("top-1 %"), ax.set_title("Top-1 per stage (axis from 0; values on bars)")
        ax.tick_params(axis="x", labelsize=8)
        figs.append(("Top-1 per stage", fig))
    lat = [r for r in rows if r.get("p50_ms") is not None]
    if lat:
        fig, ax = plt.subplots(figsize=(9, 3.2))
        labels = [f"{r['stage']}\n{r['backend']}\n{r['precision'].replace(' (fake-quant)', '')}" for r in lat]
        bars = ax.bar(labels, [r["p50_ms"] for r in lat], color="#55a868", label="p50")
        ax.scatter(labels, [r["p99_ms"] for r in lat], color="#c44e52", zorder=3, label="p99")
        ax.bar_label(bars, labels=[f"{r['p50_ms']:.3g}" for r in lat], fontsize=8, padding=2)
        ax.set_yscale("log")   # one slow torch row must not flatten the fast ones
        ax.set_ylabel("ms, batch 1 (log scale)"), ax.set_title("Latency per stage and backend (p50 bars, p99 dots)")
        ax.legend()
        ax.tick_params(axis="x", labelsize=8)
        figs.append(("Latency per stage and backend", fig))
    pc = report.get("per_class") or {}
    if pc.get("fp32") and pc.get("int8"):
        import numpy as np

        n = len(pc["fp32"])
        names = report.get("class_names") or [str(i) for i in range(n)]
        fig, ax = plt.subplots(figsize=(9, 3.2))
        xs = np.arange(n)
        diff = [(b - a) if a is not None and b is not None and a == a and b == b else 0.0   # a == a: not NaN
                for a, b in zip(pc["fp32"], pc["int8"])]
        ax.bar(xs, diff, color=["#c44e52" if d < 0 else "#55a868" for d in diff])
        ax.axhline(0, color="#444", linewidth=0.8)
        ax.set_xticks(xs, names[:n], rotation=45 if n > 10 else 0, fontsize=8)
        ax.set_ylabel("INT8 - FP32, pp"), ax.set_title("Per-class top-1 change, INT8 (ONNX Runtime) vs FP32")
        lim = max(1.0, *(abs(d) for d in diff)) * 1.15
        ax.set_ylim(-lim, lim)
        figs.append(("Per-class accuracy change", fig))
    out = []
    for title, fig in figs:
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=90)
        plt.close(fig)
        out.append((title, base64.b64encode(buf.getvalue()).decode()))
    return out


def to_html(report: dict[str, Any]) -> str:
    header = "".join(f"<th>{html.escape(h)}</th>" for _, h in COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in table_rows(report))
    plots = _plots(report)
    plot_html = "".join(f"<h2>{html.escape(t)}</h2><img alt='{html.escape(t)}' src='data:image/png;base64,{b}'>"
                        for t, b in plots) or "<p>(plots need matplotlib: pip install 'edgeres[report]')</p>"
    gates = "".join(
        f"<tr class='{'ok' if g['passed'] else 'bad'}'><td>{html.escape(r['stage'])}</td><td>{html.escape(g['name'])}"
        f"</td><td>{html.escape(gate_cells(g)[0])}</td><td>{html.escape(gate_cells(g)[1])}</td>"
        f"<td>{'pass' if g['passed'] else 'FAIL'}</td></tr>" for r in report["stages"] for g in r.get("gates", []))
    stages = "".join(
        f"<tr class='{'bad' if r['status'] == 'failed' else 'ok'}'><td>{html.escape(r['stage'])}</td>"
        f"<td>{html.escape(r['status'])}</td><td>{r['duration_s']:.1f}</td>"
        f"<td class='path'>{html.escape(r.get('artifact') or '-')}</td>"
        f"<td class='sha' title='{html.escape(r.get('sha256') or '')}'>{html.escape((r.get('sha256') or '-')[:16])}"
        f"</td></tr>" for r in report["stages"])
    env = "".join(f"<tr><td>{html.escape(k)}</td><td class='path'>{html.escape(v)}</td></tr>"
                  for k, v in env_rows(report["environment"]))
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in report.get("notes", []))
    status, verdict = verdict_parts(report)
    title = html.escape(report["run"])
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>edgeres report {title}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
td:nth-child(-n+3),th{{text-align:left}}.ok{{background:#eef8ee}}.bad{{background:#fbeaea}}
.status{{font-size:1.2em;font-weight:bold;color:{'#2a7' if report['ok'] else '#c33'}}}img{{max-width:100%}}
table{{max-width:100%}}.path{{text-align:left;word-break:break-all}}.sha{{font-family:monospace}}
.scroll{{overflow-x:auto;max-width:100%}}</style>
</head><body><h1>edgeres report: {html.escape(report['run'])}</h1>
<p class="status">{status}: {html.escape(verdict)}</p>
<div class="scroll"><table><tr>{header}</tr>{body}</table></div><ul>{notes}</ul>
<p>Units: top-1, Δ and agreement in % / percentage points (pp) of the evaluation split.</p>
<h2>Gates</h2><table><tr><th>stage</th><th>gate</th><th>value</th><th>limit</th><th>result</th></tr>{gates}</table>
{plot_html}
<h2>Stages</h2><table><tr><th>stage</th><th>status</th><th>seconds</th><th>artifact</th><th>sha256</th></tr>
{stages}</table>
<h2>Environment</h2><table>{env}</table>
<p>generated {html.escape(report['generated_at'])}</p></body></html>
"""


def _stage_rows(records: list[StageRecord]) -> list[dict[str, Any]]:
    """Without a verify stage (the build stopped at a gate): the accuracies the quantize stages measured on the way."""
    rows: list[dict[str, Any]] = []
    for r in records:
        m = r.metrics
        if r.stage not in ("ptq", "qat") or "top1" not in m or "fp32_top1" not in m:
            continue
        if not rows:
            rows.append({"stage": "train", "backend": "torch", "precision": "fp32", "top1": m["fp32_top1"],
                         "delta_pp": 0.0})
        rows.append({"stage": r.stage, "backend": "torch", "precision": "int8 (fake-quant)", "top1": m["top1"],
                     "delta_pp": -m["drop_pp"]})
    return rows


AGREEMENT_KEYS = ("top1_agreement_pct", "fp32_top1_agreement_pct", "int8_top1_agreement_pct")   # vs FP32


def unmeasurable_gates(records: list[StageRecord]) -> list[str]:
    """Drop gates (pp) the evaluation split cannot resolve: finer than one image (with N images top-1 moves in
    steps of 100/N pp), or finer than the drop's own sampling noise. Two models' top-1 on the same N images differ
    only on the images where they disagree: with a share d of disagreements the drop's standard deviation is at most
    100·sqrt(d/N) pp, so a limit below it passes or fails by which images were drawn, not by the model."""
    out = []
    for r in records:
        n = r.metrics.get("n_eval")
        if not n:
            continue
        step = 100.0 / n
        agree = next((r.metrics[k] for k in AGREEMENT_KEYS if isinstance(r.metrics.get(k), (int, float))), None)
        noise = 100.0 * math.sqrt((100.0 - agree) / 100.0 / n) if agree is not None else 0.0
        for g in r.gates:
            if not (g["name"].endswith("_pp") and g["op"] == "<=" and g["limit"] > 0):
                continue
            if g["limit"] < step:
                out.append(f"{r.stage} {g['name']} <= {g['limit']:g} pp is finer than one image of {n} "
                           f"({step:.2f} pp)")
            elif g["limit"] < noise:
                out.append(f"{r.stage} {g['name']} <= {g['limit']:g} pp is finer than the drop's sampling noise "
                           f"(±{noise:.2f} pp: {100 - agree:.1f} % of {n} images disagree with FP32)")
    return out


def fp32_quality(records: list[StageRecord]) -> dict[str, Any] | None:
    """What the verdict stands on: the FP32 model's top-1, on how many images, against chance (train's record)."""
    train = next((r for r in records if r.stage == "train"), None)
    m = train.metrics if train is not None else {}
    if not isinstance(m.get("fp32_top1_pct"), (int, float)) or not m.get("n_eval"):
        return None
    return {"top1_pct": m["fp32_top1_pct"], "n": m["n_eval"], "chance_pct": m.get("chance_pct")}


def _fp32_text(q: dict[str, Any] | None) -> str:
    if not q:
        return ""
    chance = f", chance {q['chance_pct']:.1f} %" if q.get("chance_pct") is not None else ""
    return f" (FP32 top-1 {q['top1_pct']:.1f} % on {q['n']} images{chance})"


def build_report(run_dir: Path, records: list[StageRecord], *, ok: bool, message: str,
                 total_s: float = 0.0) -> dict[str, Any]:
    stages = [r.to_dict() for r in records]
    verify = next((r for r in records if r.stage == "verify"), None)
    notes = [r.message for r in records if r.status == "skipped" and r.message]
    if verify is not None:
        rows = verify.metrics.get("rows", [])
        notes += _merged_latency_warnings(rows)
        notes += [f"{r['stage']} on {r['backend']}: {r['note']}" for r in rows if r.get("note") and r.get("top1")
                  is not None]
        b = verify.metrics.get("bench")
        if b and any(r.get("p50_ms") is not None for r in rows):
            notes.append(f"latency: batch {b['batch']}, at least {b['min_runs']} runs and {b['min_seconds']:g} s per "
                         f"row after warm-up, {b['timing']}; torch {b['torch_threads']} threads, ONNX Runtime and "
                         f"OpenVINO their default threads; INT8 kernels: convolution/FC layers the backend runs in "
                         f"INT8 / all")
    unmeasurable = unmeasurable_gates(records)
    if unmeasurable:
        notes.append("not measurable: " + "; ".join(unmeasurable) + ": such a gate passes only when not one image "
                     "changes, and fails on one; loosen it (e.g. --max-drop) or evaluate on more images")
    return {"run": str(run_dir), "ok": ok, "message": message, "total_s": round(total_s, 2),
            "unmeasurable": unmeasurable, "fp32": fp32_quality(records),
            "rows": verify.metrics.get("rows", []) if verify else _stage_rows(records),
            "per_class": verify.metrics.get("per_class") if verify else None,
            "class_names": verify.metrics.get("class_names") if verify else None,
            "notes": notes, "stages": stages, "environment": environment(),
            "generated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def write_report(run_dir: Path, records: list[StageRecord], *, ok: bool, message: str,
                 total_s: float = 0.0) -> dict[str, Any]:
    report = build_report(Path(run_dir), records, ok=ok, message=message, total_s=total_s)
    atomic_write_json(Path(run_dir) / "report.json", report)
    atomic_write_text(Path(run_dir) / "report.md", to_markdown(report))
    atomic_write_text(Path(run_dir) / "report.html", to_html(report))
    return report
