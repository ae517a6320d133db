"""Bring values computed inside If branches out as model outputs, so they can be calibrated.

onnxruntime returns only graph outputs, and a branch's values never reach the main graph. A
value ``v`` in a branch of If node N becomes an extra output of that branch; N's other branch
gets an empty tensor of the same element type in that position (a sample that takes the other
branch contributes nothing), and N gets a matching extra output. Repeated up the chain of
enclosing Ifs, ``v`` reaches the main graph. Loop and Scan bodies are not exposed: their
outputs are per iteration (scan outputs must have one shape), so they stay uncalibrated.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxsqueeze.graphs import unique_name

EXPOSED = "__exposed"


def branch_chain(model: ir.Model) -> dict[ir.Graph, tuple[ir.Node, str]]:
    """Each If branch graph reachable from the main graph through Ifs only -> (If, attr)."""
    chain: dict[ir.Graph, tuple[ir.Node, str]] = {}
    stack = [model.graph]
    while stack:
        graph = stack.pop()
        for node in graph:
            if node.op_type != "If" or node.domain not in ("", "ai.onnx"):
                continue
            for key in ("then_branch", "else_branch"):
                attr = node.attributes.get(key)
                if attr is not None and attr.type == ir.AttributeType.GRAPH:
                    body = attr.as_graph()
                    chain[body] = (node, key)
                    stack.append(body)
    return chain


def expose(model: ir.Model, value: ir.Value, chain, names: set[str]) -> str:
    """Make ``value`` (of a branch in ``chain``, or of the main graph) a model output; returns
    the output's name. ``chain`` must come from ``branch_chain(model)``."""
    dtype = value.dtype or ir.DataType.FLOAT
    current = value
    graph = value.graph
    while graph is not model.graph:
        node, key = chain[graph]
        other = node.attributes["else_branch" if key == "then_branch" else "then_branch"]
        other_graph = other.as_graph()
        graph.outputs.append(current)
        empty = ir.node(
            "Constant",
            [],
            attributes={"value": ir.tensor(np.zeros((0,), dtype.numpy()), name="empty")},
        )
        empty.outputs[0].name = unique_name(names, f"{value.name}{EXPOSED}_empty")
        empty.outputs[0].type = ir.TensorType(dtype)
        other_graph.append(empty)
        other_graph.outputs.append(empty.outputs[0])
        node.resize_outputs(len(node.outputs) + 1)
        out = node.outputs[-1]
        out.name = unique_name(names, f"{value.name}{EXPOSED}")
        out.type = ir.TensorType(dtype)
        current = out
        graph = node.graph
    if current not in model.graph.outputs:
        if current.type is None:
            current.type = ir.TensorType(dtype)
        model.graph.outputs.append(current)
    return current.name
