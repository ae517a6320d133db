"""fold-shapes: fold what is static in Shape/Size→Gather/Slice→Concat→Reshape chains.

With shape inference (onnx's, with data propagation), a Shape of a tensor whose dims are
known is a constant, and so is any chain of Gather/Slice/Concat/arithmetic over it; a chain
that mixes static and symbolic dims keeps the symbolic part. A Reshape whose target mixes
them gets a constant target where 0 copies the matching input dim and -1 the last unknown,
so exported transformers lose their Shape→Gather→Concat scaffolding; a literal 0 in the
target (copy the input's dim) stays as it is. With ``allowzero`` (PyTorch's dynamo exports
its views so) a 0 is a zero-sized dim: the one unknown entry becomes -1 instead, and a target
with a literal 0 stays computed.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from onnxsqueeze.core.graphs import (
    GraphLike,
    add_constant,
    all_value_names,
    constant_array,
    scopes,
    unique_name,
)
from onnxsqueeze.core.io import count_nodes
from onnxsqueeze.core.pass_base import SqueezePass, SqueezeResult
from onnxsqueeze.core.shape_values import ShapePropagator, ShapeValue
from onnxsqueeze.core.shapes import inferred_shapes

#: Inference rounds at most (PP-OCR rec's two attention blocks need two).
MAX_ROUNDS = 4


@dataclasses.dataclass(frozen=True)
class FoldShapesOptions:
    reshape_targets: bool = True


class FoldShapesPass(SqueezePass):
    """Replace shape computations whose result is known by constants."""

    name = "fold-shapes"
    summary = (
        "fold Shape/Size/Gather/Slice/Concat chains with static dims; constant Reshape targets"
    )
    lossless = True
    Options = FoldShapesOptions

    def call(self, model: ir.Model) -> SqueezeResult:
        nodes_before = count_nodes(model)
        stats = {"shapes_folded": 0, "reshape_targets_folded": 0}
        # A Reshape whose target was unknown hides the shapes after it, so a folded target
        # can make the next block's chain foldable: infer again until nothing changes.
        for _ in range(MAX_ROUNDS):
            if not any(n.op_type in ("Shape", "Size") for scope in scopes(model) for n in scope):
                break  # nothing to propagate from
            with inferred_shapes(model):
                found = fold_shapes(model, all_value_names(model), self.options.reshape_targets)
            if not any(found.values()):
                break
            RemoveUnusedNodesPass()(model)
            for key, count in found.items():
                stats[key] += count
        stats["nodes_removed"] = nodes_before - count_nodes(model)
        return SqueezeResult(
            model,
            modified=bool(stats["shapes_folded"] or stats["reshape_targets_folded"]),
            stats=stats,
        )


def fold_shapes(model: ir.Model, names: set[str], reshape_targets: bool = True) -> dict[str, int]:
    """Materialise known shape values in every scope; needs shapes inferred already."""
    stats = {"shapes_folded": 0, "reshape_targets_folded": 0}
    propagator = ShapePropagator()  # one for the model: subgraphs see outer-scope values
    for scope in list(scopes(model)):
        for node in list(scope):
            propagator.visit(node)
            out = node.outputs[0] if node.outputs else None
            known = propagator.values.get(out) if out is not None else None
            if known is not None and known.known and _worth_folding(node, out):
                dtype = _dtype(out, node)
                replacement = add_constant(
                    model, scope, known.array(dtype), unique_name(names, out.name or "shape"), node
                )
                out.replace_all_uses_with(replacement)
                propagator.values[replacement] = known
                stats["shapes_folded"] += 1
            elif (
                reshape_targets
                and node.op_type == "Reshape"
                and node.domain in ("", "ai.onnx")
                and _fold_reshape_target(model, scope, node, propagator, names)
            ):
                stats["reshape_targets_folded"] += 1
    return stats


def _worth_folding(node: ir.Node, out: ir.Value) -> bool:
    if out.is_graph_output() or not out.uses():
        return False
    if node.op_type == "Constant" or constant_array(out) is not None:
        return False
    return all(len(o.uses()) == 0 and not o.is_graph_output() for o in node.outputs[1:])


def _dtype(out: ir.Value, node: ir.Node) -> np.dtype:
    if out.dtype is not None:
        try:
            return np.dtype(out.dtype.numpy())
        except TypeError:  # a dtype numpy cannot hold: fall back below
            pass
    if node.op_type == "Equal":
        return np.dtype(bool)
    return np.dtype(np.int64)


def _fold_reshape_target(
    model: ir.Model, scope: GraphLike, node: ir.Node, propagator: ShapePropagator, names: set[str]
) -> bool:
    data, target = node.inputs[0], node.inputs[1] if len(node.inputs) > 1 else None
    if data is None or target is None or constant_array(target) is not None:
        return False
    partial: ShapeValue | None = propagator.values.get(target)
    allowzero = node.attributes.get("allowzero")
    literal = allowzero is not None and allowzero.as_int()  # a 0 in the target is a 0
    if partial is None or partial.scalar or (literal and 0 in partial.entries):
        return False
    in_dims = list(data.shape.dims) if data.shape is not None else None
    resolved: list[int] = []
    for i, entry in enumerate(partial.entries):
        if isinstance(entry, int):
            resolved.append(entry)  # a literal 0 stays 0: it copies the input dim (allowzero 0)
        elif (
            not literal  # with allowzero, 0 cannot copy a dim: the one unknown is -1 instead
            and isinstance(entry, str)
            and in_dims is not None
            and i < len(in_dims)
            and _symbol(in_dims[i]) == entry
        ):
            resolved.append(0)  # same symbolic size as the input's dim i: copy it
        else:
            resolved.append(-1)
    if resolved.count(-1) > 1:
        return False
    const = add_constant(
        model,
        scope,
        np.array(resolved, dtype=np.int64),
        unique_name(names, "reshape_target"),
        node,
    )
    node.replace_input_with(1, const)
    return True


def _symbol(dim: object) -> str | None:
    return None if isinstance(dim, int) else getattr(dim, "value", None)
