"""How big a model is, counted from the graph without copying a weight: nodes, initializers,
weight bytes, and (for the summary people read) op counts and weight bytes by element type."""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import onnx_ir as ir

from onnxsqueeze.core.io import tensor_nbytes


@dataclasses.dataclass(frozen=True)
class ModelStats:
    """Counts that say how big a model is; subgraphs and Constant-node tensors included."""

    nodes: int
    initializers: int
    weight_bytes: int
    #: "Op" or "domain:Op" -> count, functions included (what the summary compares)
    ops: dict[str, int] = dataclasses.field(default_factory=dict)
    #: element type ("float", "int8", ...) -> weight bytes
    bytes_by_dtype: dict[str, int] = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def model_stats(model: ir.Model) -> ModelStats:
    ops: collections.Counter = collections.Counter()
    by_dtype: collections.Counter = collections.Counter()
    nodes = list(ir.traversal.RecursiveGraphIterator(model.graph))
    nodes += [n for f in model.functions.values() for n in f]
    for node in nodes:
        ops[
            node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}:{node.op_type}"
        ] += 1
        if node.op_type == "Constant":
            for attr in node.attributes.values():
                dtype = attr.as_tensor().dtype if attr.type == ir.AttributeType.TENSOR else None
                by_dtype[_dtype_name(dtype)] += _constant_attr_nbytes(attr)
    count = 0
    for graph in model.graphs():
        for value in graph.initializers.values():
            count += 1
            if value.const_value is not None:
                by_dtype[_dtype_name(value.const_value.dtype)] += tensor_nbytes(value.const_value)
    return ModelStats(
        nodes=len(nodes),
        initializers=count,
        weight_bytes=sum(by_dtype.values()),
        ops=dict(ops.most_common()),
        bytes_by_dtype={k: v for k, v in by_dtype.most_common() if v},
    )


def _dtype_name(dtype: ir.DataType | None) -> str:
    return "other" if dtype is None else dtype.name.lower()


def _constant_attr_nbytes(attr: ir.Attr) -> int:
    if attr.is_ref():
        return 0
    if attr.type == ir.AttributeType.TENSOR:
        return tensor_nbytes(attr.as_tensor())
    if attr.type in (ir.AttributeType.INTS, ir.AttributeType.FLOATS):
        return (8 if attr.type == ir.AttributeType.INTS else 4) * len(attr.value)
    return {ir.AttributeType.INT: 8, ir.AttributeType.FLOAT: 4}.get(attr.type, 0)
