"""One report per run: what each pass did, what verification measured, sizes before/after.

Library code fills it and never prints; the CLI renders ``to_table()`` and writes
``to_json()``, so pipelines can act on the same facts a human reads.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any


@dataclasses.dataclass
class PassRecord:
    """One pass run: time, stats, verification against the model before it, decision."""

    name: str
    lossless: bool
    seconds: float = 0.0
    modified: bool = False
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    verification: dict[str, Any] | None = None
    tolerance: float | None = None  # relative output change this pass was allowed
    status: str = "applied"  # applied | unchanged | rolled-back | failed
    reason: str | None = None


@dataclasses.dataclass
class Report:
    """Everything a run did and measured; JSON-serialisable."""

    source: str = "<model>"
    output: str | None = None
    passes: list[PassRecord] = dataclasses.field(default_factory=list)
    before: dict[str, int] = dataclasses.field(default_factory=dict)
    after: dict[str, int] = dataclasses.field(default_factory=dict)
    verification: dict[str, Any] | None = None
    verification_status: str = "not run"  # passed | failed | skipped | not run
    providers: list[str] = dataclasses.field(default_factory=list)
    verification_backend: str | None = None  # onnxruntime | reference
    warnings: list[str] = dataclasses.field(default_factory=list)
    #: What the factorize stage chose per layer and measured (None: not asked).
    factorization: dict[str, Any] | None = None
    #: What the prune stage removed per channel group or layer (None: not asked).
    pruning: dict[str, Any] | None = None
    #: What the quantize stage chose, measured and kept float (None: not asked).
    quantization: dict[str, Any] | None = None
    #: A framework model's export (onnxsqueeze.frameworks): exporter, opset, time, and the
    #: exported and squeezed models' outputs against the framework's (None: ONNX given).
    conversion: dict[str, Any] | None = None
    #: The lossy result held to the budget on samples the search never saw (None: no lossy
    #: stage ran): where they came from, each try's search and held-out figures, intervals.
    held_out: dict[str, Any] | None = None
    #: The pool of workers the run spread its work over (onnxsqueeze.distributed): backend,
    #: address, size, start-up time, what ran there (None: one process).
    workers: dict[str, Any] | None = None
    seconds: float = 0.0
    #: Every timing the lossy stages decided on, in order (stages.plan): what --plan writes.
    timings: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    file_bytes_before: int | None = None
    file_bytes_after: int | None = None

    @property
    def rolled_back(self) -> list[PassRecord]:
        return [p for p in self.passes if p.status in ("rolled-back", "failed")]

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """The JSON report, in the versioned envelope (pipeline.schema)."""
        from onnxsqueeze.pipeline.schema import envelope

        return json.dumps(envelope("squeeze", self.as_dict()), indent=2, default=_json_default)

    def to_table(self, warnings: bool = True, verbose: bool = False, render: Any = None) -> str:
        """The summary a person reads first: sizes and op counts before/after, what each
        lossy stage chose and why, the measured error; the per-pass rows when ``verbose``.
        ``render(headers, rows, right=...)`` draws the tables (the CLI's: rich on a
        terminal); plain aligned text by default."""
        render = render or _plain
        lines = _conversion_lines(self.conversion)
        lines += _pass_rows(self.passes) + [""] if verbose else []
        lines.append(render(["", "before", "after", "change"], _size_rows(self), right=(1, 2)))
        ops = _op_rows(self.before.get("ops") or {}, self.after.get("ops") or {})
        if ops:
            lines += ["", render(["op", "before", "after"], ops[0], right=(1, 2)), *ops[1]]
        lines.append("")
        if not verbose:
            applied = [p for p in self.passes if p.status == "applied" and not p.lossless]
            lossless = [p.name for p in self.passes if p.status == "applied" and p.lossless]
            if lossless:
                lines.append(
                    f"lossless passes that changed the graph: {', '.join(dict.fromkeys(lossless))}"
                )
            if applied and self.quantization is None:
                lines.append(f"lossy passes: {', '.join(p.name for p in applied)}")
            for p in self.rolled_back:
                lines.append(f"rolled back: {p.name} ({p.reason or p.status})")
        if self.factorization is not None:
            lines.append(_factorization_line(self.factorization))
        if self.pruning is not None:
            lines.append(_pruning_line(self.pruning))
        if self.quantization is not None:
            lines.append(_quantization_line(self.quantization))
            why = _quantization_choice(self.quantization)
            if why:
                lines.append(f"  {why}")
        verdict = self.verification_status
        if self.verification:
            verdict += f" ({self.verification.get('summary', '')})"
        lines.append(f"verification: {verdict}")
        lines.extend(_held_out_lines(self.held_out))
        if self.workers:
            lines.append(_workers_line(self.workers))
        if warnings:  # the CLI prints them on stderr instead
            lines.extend(f"warning: {w}" for w in self.warnings)
        return "\n".join(lines)


def _conversion_lines(record: dict[str, Any] | None) -> list[str]:
    """The export first: which step moved the numbers, the exporter's or ours."""
    if not record:
        return []
    exported = record["exported_vs_framework"]
    lines = [
        f"conversion: {record['framework']} -> ONNX opset {record.get('opset')} by "
        f"{record['exporter']} in {record['seconds']:.1f}s",
        f"  exported vs {record['framework']} on {exported['samples']} samples: "
        f"{exported['summary']}" + ("" if record.get("holds") else "  (DIFFERS)"),
    ]
    squeezed = record.get("squeezed_vs_framework")
    if squeezed:
        lines.append(f"  squeezed vs {record['framework']}: {squeezed['summary']}")
    return [*lines, ""]


def _workers_line(record: dict[str, Any]) -> str:
    """Where the run's independent work went, and how much of it."""
    done = [
        f"{record[key]} {what}"
        for key, what in (
            ("calibration_shards", "calibration shards"),
            ("models_run", "candidate models run"),
        )
        if record.get(key)
    ]
    nodes = record.get("nodes_used", 0)
    if nodes > 1:
        done.append(f"on {nodes} nodes")
    return (
        f"workers: {record['workers']} on Ray, {record['address']} (started in "
        f"{record['startup_s']:.1f} s): {', '.join(done) or 'nothing sent to them'}"
    )


def _held_out_lines(record: dict[str, Any] | None) -> list[str]:
    """The budget on the search samples beside the held-out ones, try by try."""
    if not record:
        return []
    if not record.get("attempts"):
        return [f"held-out check: {record['how']}"] if not record.get("checked", True) else []
    verdict = {True: "met", False: "missed", None: "nothing lossy shipped"}[record.get("met")]
    judged = record["judged"]
    if judged < record["held_out_samples"]:
        judged = f"the first {judged} judged"
    else:
        judged = f"all {judged} judged"
    lines = [
        f"held-out check: {verdict} ({record['how']}, {judged}; the search saw "
        f"{record['search_samples']} {record.get('units', 'samples')})"
    ]
    for index, attempt in enumerate(record["attempts"]):
        shipped = f"{attempt['shipped']}; " if attempt.get("shipped") else ""
        lines.append(f"  try {index + 1} ({attempt['budget']}): {shipped}search "
                     f"{attempt.get('search', '-')} | held-out {attempt['held_out']}")  # fmt: skip
    for name, c in (record.get("confidence") or {}).items():
        lines.append(
            f"  {name}: {c['agreement']:.1%} of {c['answers']} held-out answers agree "
            f"(95 % interval {c['low']:.1%}-{c['high']:.1%})"
        )
    return lines


def _pass_rows(passes: list[PassRecord]) -> list[str]:
    rows = [("pass", "status", "time", "changes")]
    for p in passes:
        changes = ", ".join(f"{k}={_brief(v)}" for k, v in p.stats.items() if v) or "-"
        if p.reason:
            changes = f"{changes}; {p.reason}" if changes != "-" else p.reason
        rows.append((p.name, p.status, f"{p.seconds:.2f}s", changes))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return ["  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3] for r in rows]


def _size_rows(report: Report) -> list[tuple[str, str, str, str]]:
    """Nodes, weight bytes by element type, and the file, before -> after."""
    rows = []
    before, after = report.before, report.after
    rows.append(("nodes", *_pair(before.get("nodes"), after.get("nodes"), str)))
    old, new = before.get("bytes_by_dtype") or {}, after.get("bytes_by_dtype") or {}
    if old or new:
        for dtype in dict.fromkeys([*old, *new]):
            rows.append((f"weights {dtype}", *_pair(old.get(dtype), new.get(dtype), _human)))
    else:
        rows.append(
            ("weights", *_pair(before.get("weight_bytes"), after.get("weight_bytes"), _human))
        )
    if report.file_bytes_before is not None and report.file_bytes_after is not None:
        rows.append(("file", *_pair(report.file_bytes_before, report.file_bytes_after, _human)))
    return rows


def _pair(before: int | None, after: int | None, fmt: Any) -> tuple[str, str, str]:
    text = (fmt(before) if before else "-", fmt(after) if after else "-")
    change = f"{(after - before) / before:+.1%}" if before and after is not None else ""
    return (*text, change)


#: At most this many op types in the summary's before/after table (the most changed first).
MAX_OP_ROWS = 12


def _op_rows(before: dict[str, int], after: dict[str, int]) -> tuple[list, list[str]] | None:
    """Op types whose count changed, and a note on those left out: the new nodes a user
    sees are named (Q/DQ pairs, integer MatMuls), not only counted."""
    changed = [op for op in dict.fromkeys([*before, *after]) if before.get(op) != after.get(op)]
    if not changed:
        return None
    changed.sort(key=lambda op: -abs(after.get(op, 0) - before.get(op, 0)))
    rows = [(op, before.get(op, "-"), after.get(op, "-")) for op in changed[:MAX_OP_ROWS]]
    more = len(changed) - len(rows)
    return rows, [f"(and {more} more op types changed: see --report)"] if more else []


def _plain(headers: Any, rows: Any, *, right: Any = ()) -> str:
    cells = [[str(h) for h in headers], *([str(v) for v in row] for row in rows)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(
            v.rjust(w) if i in right else v.ljust(w)
            for i, (v, w) in enumerate(zip(r, widths, strict=True))
        ).rstrip()
        for r in cells
    )


def _quantization_choice(q: dict[str, Any]) -> str | None:
    """Why the shipped mode won over auto's other alternatives (they all met the budget)."""
    alternatives = [a for a in q.get("alternatives") or [] if a.get("mode") != q.get("mode")]
    if not alternatives or not q.get("applied"):
        return None
    others = []
    for a in alternatives:
        if a.get("speed_vs_float") is not None and a.get("applied"):
            others.append(f"{a['mode']} {a['speed_vs_float']:.2f}x ({a.get('measured', '')})")
        else:
            others.append(f"{a['mode']}: {a.get('reason') or 'not applied'}")
    speeds = [a.get("speed_vs_float") or 0 for a in alternatives if a.get("applied")]
    mine = q.get("speed_vs_float") or 0
    if not speeds:
        why = "the only alternative within the budget and not slower"
    elif mine >= max(speeds):
        why = "the fastest"
    else:
        why = "within 15 % of the fastest and smaller"
    return f"chosen: {why}; the others: {'; '.join(others)}"


def _brief(value: Any) -> Any:
    """A stat as the table shows it: per-layer lists (names, records) by their length; the
    JSON report keeps them whole."""
    if isinstance(value, list) and (len(value) > 3 or any(isinstance(v, dict) for v in value)):
        return f"{len(value)} entries"
    return value


def _factorization_line(f: dict[str, Any]) -> str:
    if not f.get("applied"):
        return f"factorization: {f.get('mode')} not applied ({f.get('reason', '?')})"
    before, after = f.get("params_before") or 0, f.get("params_after") or 0
    text = (
        f"factorization: {f.get('mode')}, {f.get('factorized', 0)} of {len(f.get('layers', []))}"
        f" layers, their parameters {before} -> {after}"
    )
    if before:
        text += f" ({after / before:.0%})"
    if f.get("speed_vs_before") is not None:
        text += f", {f['speed_vs_before']:.2f}x the speed before"
    return text + f" ({f.get('measured', '')})"


def _pruning_line(p: dict[str, Any]) -> str:
    if not p.get("applied"):
        return f"pruning: {p.get('mode')} not applied ({p.get('reason', '?')})"
    if "clusters" in p:
        groups = [c for c in p["clusters"] if c.get("removed")]
        text = (
            f"pruning: {p.get('mode')}, {p.get('channels_removed', 0)} channels removed from "
            f"{len(groups)} of {len(p['clusters'])} channel groups"
        )
    else:
        text = f"pruning: {p.get('mode')}, {p.get('sparsity', 0):.0%} of the pruned weights zero"
    before, after = p.get("macs_before"), p.get("macs_after")
    if before and after is not None:
        text += f", multiply-adds {after / before:.0%} of before"
    if p.get("speed_vs_before") is not None:
        text += f", {p['speed_vs_before']:.2f}x the speed before"
    return text + f" ({p.get('measured', '')})"


def _quantization_line(q: dict[str, Any]) -> str:
    if not q.get("applied"):
        return f"quantization: {q.get('mode')} not applied ({q.get('reason', '?')})"
    text = f"quantization: {q.get('mode')}"
    if "candidates" in q:
        text += f", {q.get('quantized', 0)} of {q['candidates']} nodes quantized"
        if q.get("int8_for_budget"):
            text += f" ({q['int8_for_budget']} of them int8 for the budget)"
    if q.get("speed_vs_float") is not None:
        text += f", {q['speed_vs_float']:.2f}x float speed"
    if "->" in str(q.get("opset", "")):  # the opset the quantized ops need, said
        text += f", opset {q['opset']}"
    return text + f" ({q.get('measured', '')})"


def _delta(label: str, before: int | None, after: int | None, human: bool = False) -> str:
    if before is None or after is None:
        return f"{label}: -"
    fmt = _human if human else str
    pct = f" ({(after - before) / before:+.1%})" if before else ""
    return f"{label}: {fmt(before)} -> {fmt(after)}{pct}"


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return str(n)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return str(obj)
