"""Multiply-adds of the layers that dominate a CNN's or MLP's cost: Conv, MatMul, Gemm.

Counted from inferred shapes of the main graph, a symbolic dim (the batch) taken as 1, so
models before and after a rewrite compare per sample. Layers whose shapes are unknown are
left out (and so on both sides of a comparison).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxsqueeze.core.graphs import constant_array
from onnxsqueeze.core.shapes import inferred_shapes


def _dims(value: ir.Value | None) -> list[int] | None:
    if value is None:
        return None
    array = constant_array(value)
    if array is not None:
        return list(array.shape)
    if value.shape is None:
        return None
    return [d if isinstance(d, int) and d > 0 else 1 for d in value.shape.dims]


def layer_macs(model: ir.Model, feed: Mapping[str, Any] | None = None) -> dict[str, int]:
    """Node name (or op and position) -> multiply-adds per sample; with ``feed``, at its
    inputs' shapes (a detection model's image size decides its cost), batch still 1."""
    found: dict[str, int] = {}
    saved = {v: v.shape for v in model.graph.inputs}
    for value in model.graph.inputs:
        array = (feed or {}).get(value.name)
        if array is not None and np.ndim(array) >= 1:
            value.shape = ir.Shape([1, *np.shape(array)[1:]])
    try:
        _count(model, found)
    finally:
        for value, shape in saved.items():
            value.shape = shape
    return found


def _count(model: ir.Model, found: dict[str, int]) -> None:
    with inferred_shapes(model):
        for position, node in enumerate(model.graph):
            if node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
                continue
            out = _dims(node.outputs[0]) if node.outputs else None
            w = _dims(node.inputs[1])
            if out is None or w is None:
                continue
            label = node.name or f"{node.op_type}_{position}"
            if node.op_type == "Conv" and len(w) >= 3:
                found[label] = int(np.prod(out)) * int(np.prod(w[1:]))
            elif node.op_type in ("MatMul", "Gemm"):
                x = _dims(node.inputs[0])
                if x is None or len(w) < 2:
                    continue
                trans_a = node.attributes.get("transA")
                k = x[-2] if trans_a is not None and trans_a.as_int() else x[-1]
                found[label] = int(np.prod(out)) * int(k)


def total_macs(model: ir.Model, feed: Mapping[str, Any] | None = None) -> int:
    return sum(layer_macs(model, feed).values())
