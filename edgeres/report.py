"""The stage report: report.json, report.md, a self-contained report.html with plots, and the terminal table."""
from __future__ import annotations

import base64
import html
import io
import time
from pathlib import Path
from typing import Any

from edgeres.env import environment
from edgeres.io import atomic_write_json, atomic_write_text
from edgeres.records import StageRecord

COLUMNS = [("stage", "stage"), ("backend", "backend"), ("precision", "precision"), ("top1", "top-1"),
           ("delta_pp", "Δ vs FP32"), ("agree_pct", "agree w/ FP32"), ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"),
           ("img_s", "img/s"), ("size_mb", "size MB")]


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "delta_pp":
        return f"{value:+.2f}"
    if key in ("top1", "agree_pct"):
        return f"{value:.2f}"
    if isinstance(value, float):
        return f"{value:.3f}" if value < 100 else f"{value:,.0f}"
    return str(value)


def table_rows(report: dict[str, Any]) -> list[list[str]]:
    return [[_cell(k, r.get(k)) for k, _ in COLUMNS] for r in report.get("rows", [])]


def format_table(report: dict[str, Any]) -> str:
    """The one table the terminal shows: one row per stage and backend."""
    header = [h for _, h in COLUMNS]
    rows = table_rows(report)
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) if rows else len(header[i]) for i in range(len(header))]
    line = lambda cells: " | ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    out = [line(header), "-+-".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    for note in report.get("notes", []):
        out.append(f"note: {note}")
    out.append(("PASSED: " if report["ok"] else "FAILED: ") + report["message"])
    return "\n".join(out)


def _gate_lines(records: list[dict[str, Any]]) -> list[str]:
    lines = []
    for r in records:
        for g in r.get("gates", []):
            mark = "pass" if g["passed"] else "FAIL"
            lines.append(f"| {r['stage']} | {g['name']} | {g['value']:.6g} | {g['op']} {g['limit']:.6g} | {mark} |")
    return lines


def to_markdown(report: dict[str, Any]) -> str:
    header = [h for _, h in COLUMNS]
    md = [f"# edgeres report: {report['run']}", "",
          f"**{'PASSED' if report['ok'] else 'FAILED'}**: {html.escape(report['message'])}", "",
          "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(r) + " |" for r in table_rows(report)]
    md += [""] + [f"- {n}" for n in report.get("notes", [])]
    md += ["", "## Gates", "", "| stage | gate | value | limit | result |", "|---|---|---|---|---|"]
    md += _gate_lines(report["stages"])
    md += ["", "## Stages", "", "| stage | status | duration s | artifact | sha256 |", "|---|---|---|---|---|"]
    for r in report["stages"]:
        md.append(f"| {r['stage']} | {r['status']} | {r['duration_s']:.1f} | {r.get('artifact') or '-'} | "
                  f"{(r.get('sha256') or '-')[:12]} |")
    env = report["environment"]
    md += ["", "## Environment", "", f"- python {env.get('python')}, {env.get('platform')}, "
           f"{env.get('cpu_count')} CPUs, device {env.get('device', 'cpu')}",
           "- " + ", ".join(f"{k} {v}" for k, v in env.get("packages", {}).items())]
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
        for key in ("train_loss", "test_loss"):
            if key in hist[0]:
                ax[0].plot(ep, [h[key] for h in hist], marker="o", label=key)
        for key in ("train_top1", "test_top1"):
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
        ax.bar(labels, [r["top1"] for r in rows], color="#4c72b0")
        lo = min(r["top1"] for r in rows)
        ax.set_ylim(max(0, lo - 5), 100.5), ax.set_ylabel("top-1 %"), ax.set_title("Top-1 per stage")
        ax.tick_params(axis="x", labelsize=8)
        figs.append(("Top-1 per stage", fig))
    lat = [r for r in rows if r.get("p50_ms") is not None]
    if lat:
        fig, ax = plt.subplots(figsize=(9, 3.2))
        labels = [f"{r['stage']}\n{r['backend']} {r['precision']}" for r in lat]
        ax.bar(labels, [r["p50_ms"] for r in lat], color="#55a868", label="p50")
        ax.scatter(labels, [r["p99_ms"] for r in lat], color="#c44e52", zorder=3, label="p99")
        ax.set_ylabel("ms (batch 1)"), ax.set_title("Latency per stage and backend"), ax.legend()
        ax.tick_params(axis="x", labelsize=8)
        figs.append(("Latency per stage and backend", fig))
    pc = report.get("per_class") or {}
    if pc.get("fp32") and pc.get("int8"):
        import numpy as np

        n = len(pc["fp32"])
        names = report.get("class_names") or [str(i) for i in range(n)]
        fig, ax = plt.subplots(figsize=(9, 3.2))
        xs = np.arange(n)
        ax.bar(xs - 0.2, pc["fp32"], 0.4, label="FP32")
        ax.bar(xs + 0.2, pc["int8"], 0.4, label="INT8 (ONNX Runtime)")
        ax.set_xticks(xs, names[:n], rotation=45 if n > 10 else 0, fontsize=8)
        ax.set_ylabel("top-1 %"), ax.set_title("Per-class accuracy, FP32 vs INT8")
        ax.set_ylim(0, 118), ax.legend(loc="upper center", ncol=2, fontsize=8)
        figs.append(("Per-class accuracy", fig))
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
        f"</td><td>{g['value']:.6g}</td><td>{g['op']} {g['limit']:.6g}</td><td>{'pass' if g['passed'] else 'FAIL'}"
        f"</td></tr>" for r in report["stages"] for g in r.get("gates", []))
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in report.get("notes", []))
    status = "PASSED" if report["ok"] else "FAILED"
    title = html.escape(report["run"])
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>edgeres report {title}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
td:nth-child(-n+3),th{{text-align:left}}.ok{{background:#eef8ee}}.bad{{background:#fbeaea}}
.status{{font-size:1.2em;font-weight:bold;color:{'#2a7' if report['ok'] else '#c33'}}}img{{max-width:100%}}</style>
</head><body><h1>edgeres report: {html.escape(report['run'])}</h1>
<p class="status">{status}: {html.escape(report['message'])}</p>
<table><tr>{header}</tr>{body}</table><ul>{notes}</ul>
<h2>Gates</h2><table><tr><th>stage</th><th>gate</th><th>value</th><th>limit</th><th>result</th></tr>{gates}</table>
{plot_html}
<h2>Environment</h2><pre>{html.escape(str(report['environment']))}</pre>
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


def build_report(run_dir: Path, records: list[StageRecord], *, ok: bool, message: str,
                 total_s: float = 0.0) -> dict[str, Any]:
    stages = [r.to_dict() for r in records]
    verify = next((r for r in records if r.stage == "verify"), None)
    notes = [r.message for r in records if r.status == "skipped" and r.message]
    return {"run": str(run_dir), "ok": ok, "message": message, "total_s": round(total_s, 2),
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
