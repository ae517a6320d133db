"""Gram matrices X^T X of the activations that feed constant MatMul/Gemm weights.

GPTQ needs, per weight, how its input channels co-vary on real data; that is a K x K
matrix summed over every row of every sample, so memory stays constant in the sample
count, as for the observers. Only main-graph MatMul/Gemm inputs are gathered, and only up
to MAX_CHANNELS (a 8192 x 8192 float64 matrix is 512 MB).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxsqueeze.graphs import constant_array
from onnxsqueeze.shapes import inferred_shapes

MAX_CHANNELS = 4096
#: Activation rows gathered before they are folded into the sum.
POOL_ROWS = 1024


def weighted_inputs(model: ir.Model) -> dict[str, int]:
    """Activation name -> K for each main-graph MatMul/Gemm with a constant 2-D weight
    (Gemm only without transA, whose rows are then samples)."""
    found: dict[str, int] = {}
    for node in model.graph:
        if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx"):
            continue
        if len(node.inputs) < 2 or node.inputs[0] is None or node.inputs[1] is None:
            continue
        trans_a = node.attributes.get("transA")
        if node.op_type == "Gemm" and trans_a is not None and trans_a.as_int():
            continue
        weight = constant_array(node.inputs[1])
        x = node.inputs[0]
        if weight is None or weight.ndim != 2 or constant_array(x) is not None or not x.name:
            continue
        trans_b = node.attributes.get("transB")
        k = weight.shape[1] if trans_b is not None and trans_b.as_int() else weight.shape[0]
        if k <= MAX_CHANNELS:
            found[x.name] = k
    return found


def gram_matrices(
    model: ir.Model,
    feeds: Iterable[Mapping[str, Any]],
    names: Sequence[str] | None = None,
    providers: Sequence[str] = ("cpu",),
) -> dict[str, np.ndarray]:
    """Sum over the samples of X^T X (float64, K x K) for each activation in ``names``
    (default: every ``weighted_inputs``), X = the activation with its last axis as channels."""
    from onnxsqueeze.runtime import Session

    wanted = dict(weighted_inputs(model))
    if names is not None:
        wanted = {n: k for n, k in wanted.items() if n in set(names)}
    if not wanted:
        return {}
    clone = model.clone()
    graph_inputs = {v.name for v in clone.graph.inputs}
    produced = {v.name: v for node in clone.graph for v in node.outputs}
    present = {v.name for v in clone.graph.outputs}
    with inferred_shapes(clone):
        for name in wanted:
            if name in produced and name not in present:
                value = produced[name]
                if value.type is None:
                    value.type = ir.TensorType(ir.DataType.FLOAT)
                value.shape = None
                clone.graph.outputs.append(value)
    session = Session(clone, providers)
    grams = {n: np.zeros((k, k)) for n, k in wanted.items()}
    # Rows are pooled before each product: a sentence has a dozen rows, and a product per
    # sample would read and write the whole K x K sum for each (MiniLM: 36 s -> 2 s).
    pending: dict[str, list[np.ndarray]] = {n: [] for n in wanted}
    pooled = dict.fromkeys(wanted, 0)

    def flush(name: str) -> None:
        if pending[name]:
            x = np.concatenate(pending[name])
            grams[name] += x.T @ x
            pending[name], pooled[name] = [], 0

    for feed in feeds:
        outputs = session.run(feed)
        for name, k in wanted.items():
            array = outputs.get(name) if name not in graph_inputs else feed.get(name)
            if array is None:
                continue
            rows = np.asarray(array, np.float64).reshape(-1, k)
            pending[name].append(rows)
            pooled[name] += rows.shape[0]
            if pooled[name] >= POOL_ROWS:
                flush(name)
    for name in wanted:
        flush(name)
    return {n: g for n, g in grams.items() if np.any(g)}
