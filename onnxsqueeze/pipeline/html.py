"""``--report-html FILE``: one self-contained page (no network, no script from elsewhere) for
squeeze, bench and compare, with its plots as inline SVG.

The plots are drawn by matplotlib (the ``html`` extra) into SVG at write time. Chosen over
plotly and Vega/Altair because the page must open anywhere, offline, from a CI artifact or a
mail: plotly inlines 3.5 MB of JavaScript per page and Vega needs its runtime; matplotlib's SVG
is a few dozen KB of markup that any browser draws without a script, and it is installed in
most ML environments already. A short script at the end checks that every plot drew and
records any error, so a headless browser test can tell a broken page from a good one.
"""

from __future__ import annotations

import html
import io
import json
import math
import re
from collections.abc import Sequence
from typing import Any

from onnxsqueeze.core.errors import PipelineConfigError

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0}td,th{padding:2px 10px;border-bottom:1px solid #ddd}
td.n{text-align:right;font-variant-numeric:tabular-nums}.jump{background:#fde2e1}
figure{margin:1em 0}figure svg{max-width:100%;height:auto}.note{color:#666}
"""
#: Marks each plot's figure; the check below counts the ones that drew.
_CHECK = """
<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message)));
window.addEventListener('load', () => {
  const plots = [...document.querySelectorAll('figure.plot svg')];
  const drawn = plots.filter(s => s.getBBox().width > 0 && s.querySelectorAll('path').length);
  document.body.dataset.plots = plots.length;
  document.body.dataset.drawn = drawn.length;
  document.body.dataset.errors = JSON.stringify(window.__errors);
});
</script>
"""


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PipelineConfigError(
            "--report-html needs matplotlib: pip install 'onnxsqueeze[html]'"
        ) from None
    return plt


def check_available() -> None:
    """Before any work: say now, not after a long squeeze, that the page cannot be made."""
    _pyplot()


def _svg(fig: Any) -> str:
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    _pyplot().close(fig)
    text = buffer.getvalue()
    text = re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.S)  # creator, license URIs
    return text[text.index("<svg") :]  # the XML prolog and doctype do not belong inline


def _figure(title: str, svg: str) -> str:
    return f'<figure class="plot"><figcaption>{html.escape(title)}</figcaption>{svg}</figure>'


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], marks: Sequence[str] = ()) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = []
    for index, row in enumerate(rows):
        mark = f' class="{marks[index]}"' if index < len(marks) and marks[index] else ""
        cells = "".join(
            f'<td class="n">{_fmt(v)}</td>'
            if isinstance(v, (int, float))
            else f"<td>{_fmt(v)}</td>"
            for v in row
        )
        body.append(f"<tr{mark}>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isinf(value) or math.isnan(value):
            return str(value)
        return f"{value:.4g}"
    return html.escape(str(value))


def _page(title: str, sections: Sequence[str], payload: dict[str, Any]) -> str:
    data = html.escape(json.dumps(payload, default=str))
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>{''.join(sections)}"
        f"<script type='application/json' id='report'>{data}</script>{_CHECK}</body></html>"
    )


# ---------------------------------------------------------------------------- squeeze


def squeeze_page(report: Any) -> str:
    """Sizes by element type and op counts before/after, the quantization decision per
    node, the passes; the JSON report embedded."""
    plt = _pyplot()
    before = report.before.get("bytes_by_dtype") or {}
    after = report.after.get("bytes_by_dtype") or {}
    dtypes = list(dict.fromkeys([*before, *after]))
    fig, ax = plt.subplots(figsize=(7, 2.6))
    left = [0.0, 0.0]
    for dtype in dtypes:
        values = [before.get(dtype, 0) / 2**20, after.get(dtype, 0) / 2**20]
        ax.barh(["before", "after"], values, left=left, label=dtype)
        left = [a + b for a, b in zip(left, values, strict=True)]
    ax.set_xlabel("weights, MiB")
    ax.legend(loc="lower right", fontsize=8)
    sections = [
        f"<p>{html.escape(str(report.source))} &rarr; {html.escape(str(report.output))}</p>",
        *_conversion(report.conversion),
        "<h2>Size</h2>",
        _figure("weight bytes by element type, before and after", _svg(fig)),
    ]
    ops_before, ops_after = report.before.get("ops") or {}, report.after.get("ops") or {}
    changed = [
        o for o in dict.fromkeys([*ops_before, *ops_after]) if ops_before.get(o) != ops_after.get(o)
    ]
    if changed:
        fig, ax = plt.subplots(figsize=(7, 0.3 * len(changed) + 1))
        positions = range(len(changed))
        ax.barh(
            [p + 0.2 for p in positions],
            [ops_before.get(o, 0) for o in changed],
            0.4,
            label="before",
        )
        ax.barh(
            [p - 0.2 for p in positions], [ops_after.get(o, 0) for o in changed], 0.4, label="after"
        )
        ax.set_yticks(list(positions), changed, fontsize=8)
        ax.legend(fontsize=8)
        sections += ["<h2>Ops that changed</h2>", _figure("node count per op type", _svg(fig))]
    quantization = report.quantization
    if quantization:
        sections.append("<h2>Quantization</h2>")
        sections.append(f"<p>{_fmt(_decision(quantization))}</p>")
        nodes = quantization.get("nodes") or []
        if nodes:
            sections.append(_nodes_plot(plt, nodes))
            sections.append(
                _table(
                    ["node", "op", "sensitivity", "decision"],
                    [
                        [n.get("name"), n.get("op"), n.get("score"), n.get("decision")]
                        for n in nodes
                    ],
                )
            )
        alternatives = quantization.get("alternatives") or []
        if alternatives:
            sections.append(
                _table(
                    ["mode", "applied", "speed vs float", "measured", "reason"],
                    [
                        [
                            a.get("mode"),
                            a.get("applied"),
                            a.get("speed_vs_float"),
                            a.get("measured"),
                            a.get("reason"),
                        ]
                        for a in alternatives
                    ],
                )
            )
    sections.append("<h2>Passes</h2>")
    sections.append(
        _table(
            ["pass", "status", "seconds", "changes"],
            [
                [
                    p.name,
                    p.status,
                    round(p.seconds, 3),
                    ", ".join(
                        f"{k}={v}"
                        for k, v in p.stats.items()
                        if v and not isinstance(v, (list, dict))
                    )
                    or p.reason,
                ]
                for p in report.passes
            ],
        )
    )
    verdict = report.verification_status
    if report.verification:
        verdict += f" ({report.verification.get('summary', '')})"
    sections.append(f"<h2>Verification</h2><p>{_fmt(verdict)}</p>")
    held = report.held_out or {}
    if held:  # the search's samples beside the held-out ones, try by try
        sections.append(f"<p>held-out samples: {_fmt(held.get('how', ''))}</p>")
        rows = [[i + 1, a.get("budget"), a.get("shipped"), a.get("search"), a.get("held_out"),
                 a.get("met")] for i, a in enumerate(held.get("attempts") or [])]  # fmt: skip
        if rows:
            headers = ["try", "budget", "shipped", "search samples", "held-out samples", "met"]
            sections.append(_table(headers, rows))
    if report.warnings:
        sections.append("<ul>" + "".join(f"<li>{_fmt(w)}</li>" for w in report.warnings) + "</ul>")
    return _page("onnxsqueeze: squeeze report", sections, report.as_dict())


def _conversion(record: dict[str, Any] | None) -> list[str]:
    """A framework model's export first: the exported and squeezed models against it."""
    if not record:
        return []
    rows = [["exported", record["exported_vs_framework"]["summary"]]]
    if record.get("squeezed_vs_framework"):
        rows.append(["squeezed", record["squeezed_vs_framework"]["summary"]])
    head = (f"{html.escape(record['framework'])} &rarr; ONNX opset {record.get('opset')} by "
            f"{html.escape(record['exporter'])} in {record['seconds']:.1f} s")  # fmt: skip
    return ["<h2>Conversion</h2>", f"<p>{head}</p>",
            _table(["model", f"outputs against {record['framework']}"], rows)]  # fmt: skip


def _decision(q: dict[str, Any]) -> str:
    if not q.get("applied"):
        return f"{q.get('mode')}: not applied ({q.get('reason', '?')})"
    speed = q.get("speed_vs_float")
    return (
        f"{q.get('mode')}: {q.get('quantized', 0)} of {q.get('candidates', '?')} nodes, "
        + (f"{speed:.2f}x float speed, " if speed is not None else "")
        + str(q.get("measured", ""))
    )


def _nodes_plot(plt: Any, nodes: list[dict[str, Any]]) -> str:
    """Each candidate node in graph order: its sensitivity (where measured), colored by what
    was decided."""
    fig, ax = plt.subplots(figsize=(7, 2.6))
    colors = {"quantized": "tab:blue", "int8": "tab:cyan"}
    for index, node in enumerate(nodes):
        score = node.get("score")
        height = score if isinstance(score, (int, float)) and score > 0 else 1.0
        ax.bar(index, height, color=colors.get(node.get("decision"), "tab:orange"))
    ax.set_xlabel("candidate node, in graph order (orange: kept float)")
    ax.set_ylabel("sensitivity (1 where not measured)")
    return _figure("per-node decision", _svg(fig))


# ---------------------------------------------------------------------------- bench


def bench_page(report: Any) -> str:
    from onnxsqueeze.run.bench import FIGURES
    from onnxsqueeze.run.session import short_name

    plt = _pyplot()
    rows = [r for r in report.results if r.status == "ok"]
    sections = [f"<p>{_fmt(report.machine)}, {report.rounds} interleaved rounds</p>"]
    groups = list(dict.fromkeys((r.provider, r.batch) for r in rows))
    models = list(dict.fromkeys(r.model for r in rows))
    if rows:
        fig, ax = plt.subplots(figsize=(8, 0.5 * len(groups) * len(models) + 1))
        labels, position = [], 0
        for provider, batch in groups:
            for model in models:
                row = next(
                    (r for r in rows if (r.provider, r.batch, r.model) == (provider, batch, model)),
                    None,
                )
                if row is None:
                    continue
                ax.barh(
                    position,
                    row.p50_ms,
                    xerr=[[0], [row.p90_ms - row.p50_ms]],
                    color=f"C{models.index(model)}",
                )
                labels.append(f"{short_name(provider)} b{batch or '-'} {model[-40:]}")
                position += 1
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("latency ms: p50, whisker to p90")
        sections.append(_figure("latency per provider and batch", _svg(fig)))
    sections.append(
        _table(
            ["model", "provider", "batch", "status", *FIGURES],
            [
                [
                    r.model,
                    short_name(r.provider),
                    r.batch,
                    r.status if r.status == "ok" else f"{r.status}: {r.reason}",
                    r.p50_ms,
                    r.p90_ms,
                    r.p99_ms,
                    r.spread,
                    r.speedup,
                    r.throughput,
                    r.create_ms,
                    _mib(r.memory_bytes),
                    _mib(r.gpu_memory_bytes),
                    _mib(r.size_bytes),
                ]
                for r in report.results
            ],
        )
    )
    return _page("onnxsqueeze: bench", sections, report.as_dict())


def _mib(value: int | None) -> float | None:
    return None if value is None else round(value / 2**20, 2)


# ---------------------------------------------------------------------------- compare


def compare_page(result: Any) -> str:
    plt = _pyplot()
    outputs = result.outputs.outputs
    sections = [
        f"<p>{_fmt(result.candidate)} against {_fmt(result.original)} on {result.samples} "
        f"{'samples of the data' if result.inputs == 'data' else 'generated inputs'}</p>",
        _table(
            ["output", "max abs", "max rel", "cosine", "SQNR dB", "top-1", "top-5"],
            [
                [
                    o.name,
                    o.max_abs,
                    o.max_rel,
                    o.cosine,
                    o.sqnr_db,
                    o.top1_agreement,
                    o.top5_agreement,
                ]
                for o in outputs
            ],
        ),
    ]
    report = result.tensors
    if report is not None and report.tensors:
        fig, ax = plt.subplots(figsize=(8, 3))
        xs = [t.index for t in report.tensors]
        ys = [max(t.rel_rms, 1e-9) if math.isfinite(t.rel_rms) else 1e3 for t in report.tensors]
        ax.plot(xs, ys, marker=".", linewidth=0.8)
        ax.set_yscale("log")
        first = report.first_jump
        if first is not None:
            ax.axvline(first.index, color="tab:red", linestyle="--")
            ax.annotate(
                f"first jump: {first.name}",
                (first.index, max(first.rel_rms, 1e-9)),
                fontsize=8,
                color="tab:red",
            )
        ax.set_xlabel("node of the original, in topological order")
        ax.set_ylabel("relative RMS error")
        sections += ["<h2>Per tensor</h2>", _figure("error of each matched tensor", _svg(fig))]
        if first is not None:
            sections.append(f"<p>first jump: <b>{_fmt(first.name)}</b> ({_fmt(first.op)})</p>")
        sections.append(
            _table(
                ["#", "tensor", "op", "rel RMS", "cosine", "inherited", "after Q/DQ"],
                [
                    [t.index, t.name, t.op, t.rel_rms, t.cosine, t.inherited, t.after_qdq]
                    for t in report.tensors
                ],
                ["jump" if t.is_jump() else "" for t in report.tensors],
            )
        )
    return _page("onnxsqueeze: compare", sections, result.as_dict())
