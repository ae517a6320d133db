"""Where a squeezed model's error comes from: the original's intermediate tensors matched by
name in the squeezed model, compared on the same inputs, in the original's topological order.

A tensor is matched by its name; where a quantizer renamed it (onnxruntime's QOperator format
writes ``X_quantized`` with ``X_scale``/``X_zero_point``), the integer tensor is dequantized
first. Where the squeezed model passes a matched tensor through a QuantizeLinear ->
DequantizeLinear pair, the pair's output is compared too (``after_qdq``): the value the next
layer actually reads. Tensors fused away (a MatMul's output inside a Gemm) have no match.

Each matched tensor's error is its relative RMS error (``10 ** (-SQNR / 20)``); what it
inherits is the largest error among the nearest matched tensors it is computed from. A jump
is a tensor whose error is over JUMP_FLOOR and JUMP_FACTOR times what it inherits: its own
node (or what the squeezed model did there) added the error.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxsqueeze.core.shapes import inferred_shapes
from onnxsqueeze.run.compare import OutputMetrics, compare_runs
from onnxsqueeze.run.session import Session, onnxruntime_float_types

JUMP_FLOOR = 1e-3
JUMP_FACTOR = 10.0
_FLOATS = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}


@dataclasses.dataclass
class TensorError:
    name: str
    op: str  # the original node that computes it
    index: int  # its position in the original's topological order
    rel_rms: float
    cosine: float
    max_rel: float
    inherited: float  # the largest error among the matched tensors it is computed from
    matched_as: str  # "name", "dequantized X_quantized"
    after_qdq: float | None = None  # rel. RMS error of the squeezed model's Q/DQ output of it

    @property
    def growth(self) -> float:
        return self.rel_rms / max(self.inherited, JUMP_FLOOR / JUMP_FACTOR)

    def is_jump(self) -> bool:
        return self.rel_rms > JUMP_FLOOR and self.rel_rms > JUMP_FACTOR * self.inherited

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "jump": self.is_jump()}


@dataclasses.dataclass
class TensorReport:
    tensors: list[TensorError]
    unmatched: list[str]  # original float tensors with no counterpart (fused, removed)
    skipped: str | None = None  # why subgraph values are not covered, when there are any

    @property
    def first_jump(self) -> TensorError | None:
        return next((t for t in self.tensors if t.is_jump()), None)

    def largest_jumps(self, count: int = 5) -> list[TensorError]:
        jumps = [t for t in self.tensors if t.is_jump()]
        return sorted(jumps, key=lambda t: -(t.rel_rms - t.inherited))[:count]

    def as_dict(self) -> dict[str, Any]:
        first = self.first_jump
        return {
            "first_jump": first.name if first else None,
            "largest_jumps": [t.name for t in self.largest_jumps()],
            "tensors": [t.as_dict() for t in self.tensors],
            "unmatched": self.unmatched,
            "skipped": self.skipped,
        }


def tensor_errors(
    original: ir.Model,
    candidate: ir.Model,
    feeds: Sequence[Mapping[str, Any]],
    providers: Sequence[str] | None = None,
) -> TensorReport:
    """Every float tensor of the original's main graph against its match in ``candidate``."""
    wanted = _float_tensors(original)
    producers = {v.name: n for n in candidate.graph for v in n.outputs}
    candidate_floats = set(_float_tensors(candidate))
    plan: dict[str, tuple[str, str]] = {}  # original name -> (candidate name, how)
    for name in wanted:
        if name in candidate_floats:
            plan[name] = (name, "name")
        elif f"{name}_quantized" in producers and _has_qparams(candidate, name):
            plan[name] = (f"{name}_quantized", f"dequantized {name}_quantized")
    qdq = _qdq_outputs(candidate, plan)
    ref_names = list(plan)
    cand_names = sorted({c for c, _ in plan.values()} | set(qdq.values()))
    ref_session = _exposing(original, ref_names, providers)
    cand_session = _exposing(candidate, cand_names, providers)
    per_name: dict[str, list[OutputMetrics]] = {}
    per_qdq: dict[str, list[OutputMetrics]] = {}
    for feed in feeds:
        ref = ref_session.run(feed)
        cand = cand_session.run(feed)
        pairs_ref, pairs_cand, qdq_ref, qdq_cand = {}, {}, {}, {}
        for name, (other, how) in plan.items():
            value = cand.get(other)
            if value is None or name not in ref:
                continue
            if how != "name":
                value = _dequantize(candidate, name, value)
            pairs_ref[name], pairs_cand[name] = ref[name], _like(ref[name], value)
            if name in qdq and qdq[name] in cand:
                qdq_ref[name], qdq_cand[name] = ref[name], _like(ref[name], cand[qdq[name]])
        for store, a, b in ((per_name, pairs_ref, pairs_cand), (per_qdq, qdq_ref, qdq_cand)):
            for metric in compare_runs([a], [b]).outputs:
                store.setdefault(metric.name, []).append(metric)
    errors = {name: _rel_rms(metrics) for name, metrics in per_name.items()}
    rows = _with_inheritance(original, errors, per_name, plan, per_qdq)
    unmatched = [n for n in wanted if n not in plan]
    nested = any(
        attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
        for node in original.graph
        for attr in node.attributes.values()
    )
    return TensorReport(
        rows, unmatched, "values inside If/Loop/Scan bodies are not compared" if nested else None
    )


def _float_tensors(model: ir.Model) -> list[str]:
    """Float node outputs of the main graph in topological order (types from onnx's
    inference, else onnxruntime's)."""
    names, untyped = [], []
    with inferred_shapes(model):
        for node in model.graph:
            if node.op_type == "Constant":  # weights, not activations
                continue
            for value in node.outputs:
                if not value.name:
                    continue
                if value.dtype in _FLOATS:
                    names.append(value.name)
                elif value.type is None:
                    untyped.append(value.name)
    if untyped:
        typed = onnxruntime_float_types(model, untyped)
        order = {n: i for i, n in enumerate(v.name for node in model.graph for v in node.outputs)}
        names = sorted([*names, *typed], key=lambda n: order[n])
    return names


def _exposing(model: ir.Model, names: Sequence[str], providers: Sequence[str] | None) -> Session:
    """A session returning ``names`` besides the outputs (graph rewrites off, so names hold)."""
    values = {v.name: v for node in model.graph for v in node.outputs}
    outputs = {v.name for v in model.graph.outputs}
    with inferred_shapes(model):
        for name in names:
            if name not in outputs and name in values:
                model.graph.outputs.append(values[name])
        return Session(model, providers, backend="auto")


def _has_qparams(model: ir.Model, name: str) -> bool:
    return f"{name}_scale" in model.graph.initializers


def _dequantize(model: ir.Model, name: str, value: np.ndarray) -> np.ndarray:
    scale = model.graph.initializers[f"{name}_scale"].const_value.numpy()
    point = model.graph.initializers.get(f"{name}_zero_point")
    zero = point.const_value.numpy() if point is not None and point.const_value is not None else 0
    return ((value.astype(np.float32) - np.float32(zero)) * scale).astype(np.float32)


def _qdq_outputs(model: ir.Model, plan: Mapping[str, tuple[str, str]]) -> dict[str, str]:
    """Original name -> the candidate's DequantizeLinear output of QuantizeLinear(match)."""
    matched = {c: o for o, (c, how) in plan.items() if how == "name"}
    out = {}
    for node in model.graph:
        if node.op_type != "DequantizeLinear" or not node.inputs or node.inputs[0] is None:
            continue
        q = node.inputs[0].producer()
        if q is None or q.op_type != "QuantizeLinear" or q.inputs[0] is None:
            continue
        source = q.inputs[0].name
        if source in matched and node.outputs[0].name:
            out[matched[source]] = node.outputs[0].name
    return out


def _like(ref: Any, value: Any) -> Any:
    """The candidate's value in the reference's float type (an fp16 model's tensors)."""
    ref, value = np.asarray(ref), np.asarray(value)
    if ref.dtype != value.dtype and ref.dtype.kind == "f" and value.dtype.kind in "fiu":
        return value.astype(ref.dtype)
    return value


def _rel_rms(metrics: list[OutputMetrics]) -> float:
    if any(m.mismatch for m in metrics):
        return math.inf
    worst = min(m.sqnr_db for m in metrics)
    if worst == math.inf:
        return 0.0
    return 10 ** (-worst / 20) if worst != -math.inf else math.inf


def _with_inheritance(
    original: ir.Model,
    errors: Mapping[str, float],
    per_name: Mapping[str, list[OutputMetrics]],
    plan: Mapping[str, tuple[str, str]],
    per_qdq: Mapping[str, list[OutputMetrics]],
) -> list[TensorError]:
    carried: dict[str, float] = {}
    rows = []
    for index, node in enumerate(original.graph):
        inherited = max(
            (carried.get(v.name, 0.0) for v in node.inputs if v is not None), default=0.0
        )
        for value in node.outputs:
            if value.name not in errors:
                carried[value.name] = inherited
                continue
            metrics = per_name[value.name]
            rows.append(
                TensorError(
                    name=value.name,
                    op=node.op_type,
                    index=index,
                    rel_rms=errors[value.name],
                    cosine=min(m.cosine for m in metrics),
                    max_rel=max(m.max_rel for m in metrics),
                    inherited=inherited,
                    matched_as=plan[value.name][1],
                    after_qdq=_rel_rms(per_qdq[value.name]) if value.name in per_qdq else None,
                )
            )
            carried[value.name] = errors[value.name]
    return rows
