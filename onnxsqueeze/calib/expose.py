"""Bring values computed inside If branches and Loop/Scan bodies out as model outputs, so
they can be calibrated.

onnxruntime returns only graph outputs, and a subgraph's values never reach the main graph.
A value ``v`` of a subgraph of node N becomes an extra output of that subgraph, and N gets a
matching extra output; repeated up the chain of enclosing nodes, ``v`` reaches the main graph:

- If: the other branch outputs an empty tensor of the same element type in that position (a
  sample that takes the other branch contributes nothing).
- Loop and Scan: ``v`` becomes an extra scan output of the body (through an Identity, so a
  body output is never listed twice), which the node stacks over the iterations: the
  observer sees every iteration's values. Stacking needs one shape in every iteration, so
  only values whose shape is static inside the body are exposed (``per_iteration_shape``).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxsqueeze.core.graphs import unique_name

EXPOSED = "__exposed"
#: Node -> its subgraph attributes whose values can be brought out.
CONTAINERS = {"If": ("then_branch", "else_branch"), "Loop": ("body",), "Scan": ("body",)}


def branch_chain(model: ir.Model) -> dict[ir.Graph, tuple[ir.Node, str]]:
    """Each subgraph reachable from the main graph through If/Loop/Scan nodes -> (node, attr)."""
    chain: dict[ir.Graph, tuple[ir.Node, str]] = {}
    stack = [model.graph]
    while stack:
        graph = stack.pop()
        for node in graph:
            if node.op_type not in CONTAINERS or node.domain not in ("", "ai.onnx"):
                continue
            for key in CONTAINERS[node.op_type]:
                attr = node.attributes.get(key)
                if attr is not None and attr.type == ir.AttributeType.GRAPH:
                    body = attr.as_graph()
                    chain[body] = (node, key)
                    stack.append(body)
    return chain


def per_iteration_shape(value: ir.Value, chain: dict[ir.Graph, tuple[ir.Node, str]]) -> bool:
    """Whether every Loop/Scan body between ``value`` and the main graph would stack it with
    one shape: its (inferred) shape is static, or no Loop/Scan encloses it."""
    graph = value.graph
    while graph in chain:
        node, _ = chain[graph]
        if node.op_type != "If":
            shape = value.shape
            return shape is not None and all(isinstance(d, int) for d in shape)
        graph = node.graph
    return True


def expose(model: ir.Model, value: ir.Value, chain, names: set[str]) -> str:
    """Make ``value`` (of a subgraph in ``chain``, or of the main graph) a model output;
    returns the output's name. ``chain`` must come from ``branch_chain(model)``."""
    dtype = value.dtype or ir.DataType.FLOAT
    current = value
    graph = value.graph
    while graph is not model.graph:
        node, key = chain[graph]
        if node.op_type == "If":
            _other_branch_empty(node, key, value.name, dtype, names)
        else:
            current = _stacked(graph, node, current, value.name, dtype, names)
        graph.outputs.append(current)
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


def _other_branch_empty(
    node: ir.Node, key: str, base: str, dtype: ir.DataType, names: set[str]
) -> None:
    other = node.attributes["else_branch" if key == "then_branch" else "then_branch"]
    other_graph = other.as_graph()
    empty = ir.node(
        "Constant",
        [],
        attributes={"value": ir.tensor(np.zeros((0,), dtype.numpy()), name="empty")},
    )
    empty.outputs[0].name = unique_name(names, f"{base}{EXPOSED}_empty")
    empty.outputs[0].type = ir.TensorType(dtype)
    other_graph.append(empty)
    other_graph.outputs.append(empty.outputs[0])


def _stacked(
    body: ir.Graph, node: ir.Node, current: ir.Value, base: str, dtype: ir.DataType, names
) -> ir.Value:
    """A fresh body value equal to ``current``, to append as the body's last scan output;
    Scan's per-scan-output attributes get an entry for it (axis 0, forward)."""
    copy = ir.node("Identity", [current])
    copy.outputs[0].name = unique_name(names, f"{base}{EXPOSED}_iter")
    copy.outputs[0].type = ir.TensorType(dtype)
    body.append(copy)
    if node.op_type == "Scan":
        for attr in ("scan_output_axes", "scan_output_directions"):
            if attr in node.attributes:
                values = list(node.attributes[attr].as_ints()) + [0]
                node.attributes[attr] = ir.AttrInt64s(attr, values)
    return copy.outputs[0]
