"""Which tensors calibration observes, and what is known of them before any run.

Float activations of the main graph, If branches and Loop/Scan bodies (brought out through
the nodes that hold them, see ``expose``);
Reshape/Transpose-like outputs share their source's statistics instead of being exposed.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnxsqueeze.calib.expose import branch_chain, per_iteration_shape
from onnxsqueeze.core.shapes import inferred_shapes, static_shape

FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)
#: Ops whose output holds exactly the values of their first input, rearranged: its
#: statistics are a copy of the input's, so it is neither exposed nor observed.
SAME_VALUES_OPS = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity"})


def select_tensors(
    model: ir.Model, op_types: Sequence[str] | None = None
) -> tuple[list[str], dict[str, str]]:
    """Float activations worth calibrating (main graph), and the ones left out with why."""
    with inferred_shapes(model):
        return select_inferred(model, op_types)


def select_inferred(
    model: ir.Model, op_types: Sequence[str] | None
) -> tuple[list[str], dict[str, str]]:
    """As select_tensors, on a model whose types are already inferred.

    Constants are weights, not activations. Values inside If branches and Loop/Scan bodies
    are brought out through their nodes (``expose``); those that cannot be (a body value
    whose shape may change from one iteration to the next, a subgraph of another op) are
    reported rather than silently ignored.
    """
    chosen: dict[str, None] = {}
    skipped: dict[str, str] = {}
    graph = model.graph
    for value in graph.inputs:
        constant = value.const_value is not None or value.name in graph.initializers
        if not constant and value.dtype in FLOAT_TYPES and not op_types:
            chosen[value.name] = None
    for node in graph:
        if op_types and node.op_type not in op_types:
            continue
        for value in (*node.inputs, *node.outputs):
            if value is None or not value.name or value.name in chosen:
                continue
            if value.const_value is not None or value.name in graph.initializers:
                continue
            producer = value.producer()
            if producer is not None and producer.op_type == "Constant":
                continue
            if value.dtype in FLOAT_TYPES:
                chosen[value.name] = None
            elif value.dtype is None:
                skipped[value.name] = "type unknown after shape inference"
    branches = branch_chain(model)

    def take(value: ir.Value) -> None:  # a float value of a subgraph expose() reaches
        if per_iteration_shape(value, branches):
            chosen[value.name] = None
        else:
            skipped[value.name] = "in a Loop/Scan body, shape may change per iteration"

    for sub in model.graphs():
        if sub is graph:
            continue
        # a Loop/Scan body's inputs (carried state, scanned slices) are activations too
        for value in sub.inputs if sub in branches else ():
            wanted = not op_types or any(user.op_type in op_types for user, _ in value.uses())
            if wanted and value.dtype in FLOAT_TYPES:
                take(value)
        for node in sub:
            for value in node.outputs:
                if not value.name:
                    continue
                if sub not in branches:
                    skipped[value.name] = "inside a subgraph of an op other than If/Loop/Scan"
                elif (
                    op_types
                    and node.op_type not in op_types
                    and not any(user.op_type in op_types for user, _ in value.uses())
                ):
                    continue
                elif value.dtype in FLOAT_TYPES and node.op_type != "Constant":
                    take(value)
                elif value.dtype is None:
                    skipped[value.name] = "type unknown after shape inference"
    return list(chosen), skipped


def same_values(model: ir.Model, names: set[str]) -> dict[str, str]:
    """Tensors among ``names`` whose values are those of another tensor among them
    (Reshape/Transpose/... chains in the main graph), mapped to that tensor."""
    aliases: dict[str, str] = {}
    for node in model.graph:  # topological: a chain resolves to its first tensor
        if node.op_type not in SAME_VALUES_OPS or not node.inputs or node.inputs[0] is None:
            continue
        out, source = node.outputs[0].name, node.inputs[0].name
        source = aliases.get(source, source)
        if out in names and source in names and out != source:
            aliases[out] = source
    return aliases


def produced_values(model: ir.Model) -> dict[str, ir.Value]:
    """Node outputs by name in the main graph and in the subgraphs ``expose`` reaches, and
    those subgraphs' inputs."""
    bodies = branch_chain(model)
    values = {v.name: v for body in bodies for v in body.inputs if v.name}
    for graph in (model.graph, *bodies):
        values.update((v.name, v) for node in graph for v in node.outputs if v.name)
    return values


def static_nbytes(value: ir.Value) -> int | None:
    shape = static_shape(value)
    if shape is None or value.dtype is None:
        return None
    return int(np.prod(shape, dtype=np.int64)) * value.dtype.itemsize


def feed_names(model: ir.Model) -> list[str]:
    """Graph inputs a caller feeds (an initializer listed as input has its default)."""
    return [v.name for v in model.graph.inputs if v.name not in model.graph.initializers]


class RangesAsked(Mapping[str, tuple[float, float]]):
    """A stand-in for calibrated ranges that answers every name with a placeholder and
    remembers which names were asked: a quantizer run against it tells which tensors
    calibration needs to observe (see ``CollectOptions.only``)."""

    def __init__(self) -> None:
        self.names: set[str] = set()

    def __getitem__(self, name: str) -> tuple[float, float]:
        self.names.add(name)
        return (-1.0, 1.0)

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0
