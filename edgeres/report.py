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
from edgeres.records import Gate, StageRecord, read_plan_info
from edgeres.stats import DEFAULT_LEVEL, NOT_MEASURABLE

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


# what the terminal leaves out first when the table is wider than the terminal (report.md/html keep every column)
DROP_FIRST = ("int8_kernels", "p99_ms", "size_mb", "img_s", "speedup")
SHORT = {"int8 (fake-quant)": "int8 fakeq", "onnxruntime": "ort"}   # terminal only; the report says it in full


def terminal_width() -> int:
    """The terminal's width, between 80 and TERMINAL_WIDTH columns (80 when it cannot be told, e.g. a pipe)."""
    import shutil

    return max(80, min(TERMINAL_WIDTH, shutil.get_terminal_size((80, 24)).columns))


def format_table(report: dict[str, Any], width: int | None = None) -> str:
    """The one table the terminal shows, within `width` columns (default: the terminal's, at least 80): one row
    per stage and backend; columns that do not fit are left out (in DROP_FIRST order, said in one line), notes and
    the verdict wrapped."""
    import textwrap

    width = width or terminal_width()
    keys = [k for k, _ in TERMINAL_COLUMNS]
    cells = [[SHORT.get(c, c) for c in r] for r in table_rows(report, TERMINAL_COLUMNS)]
    header = [h for _, h in TERMINAL_COLUMNS]

    def render(cols: list[int]) -> list[str]:
        widths = [max(len(header[i]), *(len(r[i]) for r in cells)) if cells else len(header[i]) for i in cols]
        line = lambda row: "  ".join(row[i].ljust(w) if i < 3 else row[i].rjust(w)   # noqa: E731
                                     for i, w in zip(cols, widths)).rstrip()
        return [line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in cells]

    cols = list(range(len(keys)))
    dropped = []
    for key in DROP_FIRST:
        if max(len(x) for x in render(cols)) <= width:
            break
        cols.remove(keys.index(key))
        dropped.append(dict(TERMINAL_COLUMNS)[key])
    out = render(cols) if cells else []   # a build stopped before any model was measured: no empty table
    fill = dict(width=width, break_on_hyphens=False, break_long_words=False)
    if dropped and cells:
        out.append(textwrap.fill(f"(left out at {width} columns: {', '.join(dropped)}; report.html has them)",
                                 **fill))
    for note in report.get("notes", []):
        out.append(textwrap.fill(note, initial_indent="note: ", subsequent_indent="      ", **fill))
    worst = worst_classes(report)
    if worst:
        out.append(textwrap.fill(worst, subsequent_indent="  ", **fill))
    word, text = verdict_parts(report)
    out.append(textwrap.fill(f"{word}: {text}", subsequent_indent="  ", **fill))
    return "\n".join(out)


VERDICTS = ("PASSED", "PASSED WITH WARNINGS", "NOT MEASURABLE", "FAILED")


def verdict_word(report: dict[str, Any]) -> str:
    """FAILED: a gate failed (or the run is incomplete or altered); NOT MEASURABLE: no gate failed but at least one
    cannot be decided with these images; PASSED WITH WARNINGS: every gate passed but a class needs a look (FP32
    never right on it, its INT8 top-1 falls past gates.max_class_drop_pp, or too few images); else PASSED."""
    if not report["ok"]:
        return "FAILED"
    if report.get("not_measurable"):
        return "NOT MEASURABLE"
    return "PASSED WITH WARNINGS" if report.get("class_findings") else "PASSED"


def verdict_parts(report: dict[str, Any]) -> tuple[str, str]:
    """(one of VERDICTS, the sentence): the last line of the table, the report's headline."""
    word = verdict_word(report)
    found = report.get("class_findings") or []
    if word == "NOT MEASURABLE":
        nm = report["not_measurable"]
        groups: dict[str, list[str]] = {}
        for n in nm:   # the same gate at several stages, said once
            groups.setdefault(n["short"], []).append(n["stage"])
        text = (f"no gate failed, but {len(nm)} cannot be decided with these images: "
                + "; ".join(f"{short.format(stages=', '.join(stages))}" for short, stages in groups.items()))
    elif word == "PASSED WITH WARNINGS":
        text = "every gate passed"
    else:
        text = report["message"] + _trade_hint(report) + _weak_fp32_hint(report)
    if found and word != "FAILED":   # a class the verdict must name, whatever else it says
        text += "; but " + "; ".join(f["text"] for f in found[:3]) + \
            (f"; and {len(found) - 3} more (see the report)" if len(found) > 3 else "")
    loose = report.get("limits_loosened") or []
    if loose:
        text += "; limits loosened: " + ", ".join(
            f"{x['key']} {x['value']:g} (shipped {x['shipped']:g}, from {x['origin']})" for x in loose)
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


def gate_cells(g: dict[str, Any]) -> tuple[str, str, str, str]:
    """(what was measured, value with its interval and image count, "op limit (where from)", outcome) in the unit
    the table uses: agreements in %, drops in pp (percentage points)."""
    gate = Gate.from_dict(g)
    value = gate._num(gate.value)
    if gate.lo is not None and gate.hi is not None:
        value += f" [{gate._num(gate.lo)}, {gate._num(gate.hi)}]"
    if gate.n:
        value += f" on {gate.n:,}"
    limit = f"{gate.op} {gate._num(gate.limit)}" + (f" ({gate.key}, {gate.source or 'built-in default'})"
                                                    if gate.key else "")
    outcome = {"passed": "pass", "failed": "FAIL"}.get(gate.outcome, "NOT MEASURABLE")
    if gate.outcome == "not measurable" and not gate.passed:
        outcome = "NOT MEASURABLE (stops)"
    return gate.what or gate.name, value, limit, outcome


def _gate_lines(records: list[dict[str, Any]]) -> list[str]:
    lines = []
    for r in records:
        for g in r.get("gates", []):
            cells = [c.replace("|", "\\|") for c in gate_cells(g)]   # max|diff| must not split a cell
            lines.append(f"| {r['stage']} | " + " | ".join(cells) + " |")
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
    md += ["", "## Gates", "", f"Each value with its {_level_text(report)} confidence interval and the images it was "
           "measured on (exact checks have no interval): PASSED when the whole interval is within the limit, FAILED "
           "when beyond it, NOT MEASURABLE when it straddles it.", "",
           "| stage | gate | value [interval] on images | limit | result |", "|---|---|---|---|---|"]
    md += _gate_lines(report["stages"])
    if report.get("not_measurable"):
        md += ["", "### Not measurable", ""] + [f"- {n['text']}" for n in report["not_measurable"]]
    table = per_class_table(report)
    if table:
        md += ["", "## Per class", "", "| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
        md += ["| " + " | ".join(r) + " |" for r in table[1:]]
    if report.get("data"):
        from edgeres.data.scan import format_report

        md += ["", "## Data", "", "```", *format_report(report["data"]), "```"]
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


def _status_color(report: dict[str, Any]) -> str:
    return {"PASSED": "#2a7", "FAILED": "#c33"}.get(verdict_word(report), "#b80")


def to_html(report: dict[str, Any]) -> str:
    header = "".join(f"<th>{html.escape(h)}</th>" for _, h in COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in table_rows(report))
    plots = _plots(report)
    plot_html = "".join(f"<h2>{html.escape(t)}</h2><img alt='{html.escape(t)}' src='data:image/png;base64,{b}'>"
                        for t, b in plots) or "<p>(plots need matplotlib: pip install 'edgeres[report]')</p>"
    gates = "".join(
        f"<tr class='{_gate_class(g)}'><td>{html.escape(r['stage'])}</td>"
        + "".join(f"<td>{html.escape(c)}</td>" for c in gate_cells(g)) + "</tr>"
        for r in report["stages"] for g in r.get("gates", []))
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
.warn{{background:#fff6dd}}.perclass td:nth-child(n+2),.confusion td:nth-child(n+2){{text-align:right}}
.status{{font-size:1.2em;font-weight:bold;color:{_status_color(report)}}}img{{max-width:100%}}
table{{max-width:100%}}.path{{text-align:left;word-break:break-all}}.sha{{font-family:monospace}}
.scroll{{overflow-x:auto;max-width:100%}}</style>
</head><body><h1>edgeres report: {html.escape(report['run'])}</h1>
<p class="status">{status}: {html.escape(verdict)}</p>
<div class="scroll"><table><tr>{header}</tr>{body}</table></div><ul>{notes}</ul>
<p>Units: top-1, Δ and agreement in % / percentage points (pp) of the evaluation split.</p>
<h2>Gates</h2><p>Each value with its {_level_text(report)} confidence interval and the images it was measured on
(exact checks have no interval): PASSED when the whole interval is within the limit, FAILED when beyond it, NOT
MEASURABLE when it straddles it.</p>
<table><tr><th>stage</th><th>gate</th><th>value [interval] on images</th><th>limit</th><th>result</th></tr>{gates}
</table>{_not_measurable_html(report)}
{_per_class_html(report)}{_data_html(report)}
{plot_html}
<h2>Stages</h2><table><tr><th>stage</th><th>status</th><th>seconds</th><th>artifact</th><th>sha256</th></tr>
{stages}</table>
<h2>Environment</h2><table>{env}</table>
<p>generated {html.escape(report['generated_at'])}</p></body></html>
"""


def _data_html(report: dict[str, Any]) -> str:
    if not report.get("data"):
        return ""
    from edgeres.data.scan import format_report

    return "<h2>Data</h2><pre>" + html.escape("\n".join(format_report(report["data"]))) + "</pre>"


def _not_measurable_html(report: dict[str, Any]) -> str:
    items = "".join(f"<li>{html.escape(n['text'])}</li>" for n in report.get("not_measurable") or [])
    return f"<h3>Not measurable</h3><ul>{items}</ul>" if items else ""


def _gate_class(g: dict[str, Any]) -> str:
    gate = Gate.from_dict(g)
    return "ok" if gate.outcome == "passed" else "bad" if not gate.passed else "warn"


def _html_table(rows: list[list[str]], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
    return f"<div class='scroll'><table class='{cls}'><tr>{head}</tr>{body}</table></div>"


CONFUSION_HTML_MAX = 30   # classes: above this the report lists the most frequent confusions instead


def _confusion_html(title: str, conf: dict[str, Any] | None, names: list[str]) -> str:
    if not conf:
        return ""
    if conf.get("matrix") is not None and len(conf["matrix"]) <= CONFUSION_HTML_MAX:
        m = conf["matrix"]
        rows = [["true \\ predicted", *names[:len(m)]]]
        rows += [[names[i], *(str(v) for v in row)] for i, row in enumerate(m)]
        return f"<h3>{html.escape(title)}</h3>" + _html_table(rows, "confusion")
    pairs = conf.get("top")
    if pairs is None:   # a matrix too large to show: its largest off-diagonal cells
        m = conf["matrix"]
        pairs = sorted(({"true": i, "pred": j, "count": v} for i, row in enumerate(m) for j, v in enumerate(row)
                        if i != j and v), key=lambda p: -p["count"])[:20]
    rows = [["true class", "predicted as", "images"]]
    rows += [[names[p["true"]], names[p["pred"]], str(p["count"])] for p in pairs]
    return f"<h3>{html.escape(title)} (most frequent confusions)</h3>" + _html_table(rows)


def _per_class_html(report: dict[str, Any]) -> str:
    """Per-class truth as text: the findings the verdict names, the per-class table, the confusion matrices."""
    table = per_class_table(report)
    if not table:
        return ""
    names = [r[0] for r in table[1:]]
    findings = "".join(f"<li>{html.escape(f['text'])}</li>" for f in report.get("class_findings") or [])
    conf = report.get("confusion") or {}
    return ("<h2>Per class</h2>" + (f"<ul class='findings'>{findings}</ul>" if findings else "")
            + "<p>Absolute top-1 per class on the evaluation split, for FP32 and every INT8 artifact.</p>"
            + _html_table(table, "perclass")
            + _confusion_html("Confusion matrix, FP32", conf.get("fp32"), names)
            + _confusion_html("Confusion matrix, final INT8 (ONNX Runtime)", conf.get("int8"), names))


def _stage_rows(records: list[StageRecord]) -> list[dict[str, Any]]:
    """Without a verify stage (the build stopped at a gate): the accuracies the quantize stages measured on the way,
    with their agreement with FP32 (the failing value of the gate that stopped it among them)."""
    rows: list[dict[str, Any]] = []
    for r in records:
        m = r.metrics
        if r.stage not in ("ptq", "qat") or "top1" not in m or "fp32_top1" not in m:
            continue
        if not rows:
            rows.append({"stage": "train", "backend": "torch", "precision": "fp32", "top1": m["fp32_top1"],
                         "delta_pp": 0.0, "agree_pct": 100.0})
        rows.append({"stage": r.stage, "backend": "torch", "precision": "int8 (fake-quant)", "top1": m["top1"],
                     "delta_pp": -m["drop_pp"], "agree_pct": m.get("top1_agreement_pct")})
    return rows


def not_measurable_gates(records: list[StageRecord]) -> list[dict[str, str]]:
    """Every gate whose interval straddles its limit: [{"stage", "gate", "text" (in words, with the images that
    would decide it), "short"}]."""
    out = []
    for r in records:
        for g in r.gates:
            gate = Gate.from_dict(g)
            if gate.outcome == NOT_MEASURABLE and gate.passed:   # a required one that stops is the failure itself
                need = f", ~{gate.resolve_n:,} images would decide it" if gate.resolve_n else ""
                out.append({"stage": r.stage, "gate": gate.name, "text": f"{r.stage}: {gate.describe()}",
                            "short": f"{{stages}} {gate.what or gate.name} {gate._num(gate.value)} vs {gate.op} "
                                     f"{gate._num(gate.limit)} ({_interval(gate)} on {gate.n:,} images{need})"})
    return out


def _interval(gate: Gate) -> str:
    return f"interval {gate._num(gate.lo)} to {gate._num(gate.hi)}" if gate.lo is not None else "exact"


def _level_text(report: dict[str, Any]) -> str:
    return f"{100 * float(report.get('confidence') or DEFAULT_LEVEL):g} %"


# the INT8 artifacts a per-class table shows, by stage (the FP32 rows all equal the trained model's)
INT8_COLUMNS = {"ptq": "PTQ", "qat": "QAT", "export_int8": "INT8 ONNX", "export_cpu": "CPU INT8", "compile": "engine"}


def per_class_table(report: dict[str, Any]) -> list[list[str]]:
    """Header + one row per class: images per split, absolute top-1 of FP32 and of every INT8 artifact, and the
    final INT8 model's change. Empty without per-class numbers."""
    pc = report.get("per_class") or {}
    if not pc.get("fp32"):
        return []
    n = len(pc["fp32"])
    names = report.get("class_names") or [str(i) for i in range(n)]
    counts = report.get("class_counts") or {}
    splits = [s for s in ("train", "holdout", "evaluation") if counts.get(s)]
    order = list(INT8_COLUMNS)   # pipeline order (report.json's keys come back sorted)
    rows = dict(sorted(((k, v) for k, v in (pc.get("rows") or {}).items() if k.split("/")[0] in INT8_COLUMNS),
                       key=lambda kv: order.index(kv[0].split("/")[0])))
    header = ["class", *(f"{s} images" for s in splits), "FP32 top-1 %",
              *(f"{INT8_COLUMNS[k.split('/')[0]]} %" for k in rows), "Δ INT8 pp"]
    out = [header]

    def pct(v):
        return "-" if v is None or v != v else f"{v:.1f}"

    for i in range(n):
        fp32, int8 = pc["fp32"][i], (pc.get("int8") or [None] * n)[i]
        delta = "-" if fp32 is None or int8 is None or fp32 != fp32 or int8 != int8 else f"{int8 - fp32:+.1f}"
        out.append([str(names[i]), *(str(counts[s][i]) for s in splits), pct(fp32),
                    *(pct(v[i]) for v in rows.values()), delta])
    return out


def worst_classes(report: dict[str, Any], k: int = 3) -> str | None:
    """One line naming the k classes with the lowest final-model top-1 (INT8 when there is one), for the terminal."""
    pc = report.get("per_class") or {}
    base = pc.get("int8") or pc.get("fp32")
    if not base or len(base) < 2:
        return None
    names = report.get("class_names") or [str(i) for i in range(len(base))]
    evals = (report.get("class_counts") or {}).get("evaluation") or [None] * len(base)
    order = sorted((i for i in range(len(base)) if base[i] is not None and base[i] == base[i]), key=lambda i: base[i])
    label = "INT8" if pc.get("int8") else "FP32"
    parts = []
    for i in order[:k]:
        extra = f", FP32 {pc['fp32'][i]:.0f} %" if pc.get("int8") and pc["fp32"][i] is not None else ""
        imgs = f", {evals[i]} images" if evals[i] is not None else ""
        parts.append(f"'{names[i]}' {base[i]:.0f} %{extra}{imgs}")
    return f"lowest {label} top-1 per class: " + "; ".join(parts)


def fp32_quality(records: list[StageRecord]) -> dict[str, Any] | None:
    """What the verdict stands on: the FP32 model's top-1, on how many images, against chance (train's record)."""
    train = next((r for r in records if r.stage == "train"), None)
    m = train.metrics if train is not None else {}
    if not isinstance(m.get("fp32_top1_pct"), (int, float)) or not m.get("n_eval"):
        return None
    return {"top1_pct": m["fp32_top1_pct"], "n": m["n_eval"], "chance_pct": m.get("chance_pct")}


INT8_VS_FP32_STAGES = ("ptq", "qat", "export_cpu", "compile", "verify")


def _trade_hint(report: dict[str, Any]) -> str:
    """"Higher accuracy but FAILED", explained where it happens: an agreement gate failed while top-1 rose."""
    for r in report.get("stages", []):
        m = r.get("metrics") or {}
        failed = [g for g in r.get("gates", []) if not g.get("passed", True) and "agreement" in g.get("name", "")]
        if r.get("status") == "failed" and failed and isinstance(m.get("drop_pp"), (int, float)) and m["drop_pp"] < 0:
            changed = 100 - failed[0]["value"]
            return (f". Its top-1 is {-m['drop_pp']:.2f} pp above FP32's, yet it changes {changed:.1f} % of FP32's "
                    f"decisions: it trades right answers for others, which the agreement gate refuses")
    return ""


def _weak_fp32_hint(report: dict[str, Any]) -> str:
    """A failed INT8-vs-FP32 gate on an FP32 model far from sure of itself: the next step is a better FP32 model."""
    q = report.get("fp32")
    stage = report.get("message", "").split(":", 1)[0].split(" ")[0]
    if report.get("ok") or not q or stage not in INT8_VS_FP32_STAGES or q.get("chance_pct") is None:
        return ""
    chance = q["chance_pct"]
    if q["top1_pct"] >= chance + (100.0 - chance) / 2:
        return ""
    return (f". The FP32 model is weak ({q['top1_pct']:.1f} %, chance {chance:.1f} %): most of its decisions are near "
            f"ties that INT8 rounding flips. A better FP32 model is the fix: more epochs, more photos, or fine-tuning "
            f"published weights (`edgeres weights fetch resnet18`, then build again)")


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
    not_measurable = not_measurable_gates(records)   # named on the verdict line; in full in report.md/html
    vm = verify.metrics if verify else {}
    limits = (read_plan_info(run_dir) or {}).get("limits") or {}
    report = {"run": str(run_dir), "ok": ok, "message": message, "total_s": round(total_s, 2),
              "not_measurable": not_measurable, "fp32": fp32_quality(records),
              "class_findings": vm.get("class_findings") or [],
              "limits_loosened": limits.get("loosened") or [], "confidence": limits.get("confidence"),
              "rows": vm.get("rows", []) if verify else _stage_rows(records),
              "per_class": vm.get("per_class"), "class_names": vm.get("class_names"),
              "class_counts": vm.get("class_counts"), "confusion": vm.get("confusion"),
              "notes": notes, "stages": stages, "environment": environment(),
              "generated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    report["data"] = _data_report(run_dir, records)
    report["verdict"] = verdict_word(report)
    return report


def _data_report(run_dir: Path, records: list[StageRecord]) -> dict[str, Any] | None:
    """The up-front scan of the data (RUN/data_report.json, else the train record's copy)."""
    import json

    try:
        return json.loads((Path(run_dir) / "data_report.json").read_text())
    except (OSError, ValueError):
        train = next((r for r in records if r.stage == "train"), None)
        return (train.metrics.get("data_report") if train else None) or None


def write_report(run_dir: Path, records: list[StageRecord], *, ok: bool, message: str,
                 total_s: float = 0.0) -> dict[str, Any]:
    report = build_report(Path(run_dir), records, ok=ok, message=message, total_s=total_s)
    atomic_write_json(Path(run_dir) / "report.json", report)
    atomic_write_text(Path(run_dir) / "report.md", to_markdown(report))
    atomic_write_text(Path(run_dir) / "report.html", to_html(report))
    return report
