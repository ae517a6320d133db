"""simplify-graph: remove identity-like ops and merge redundant data movement.

Rewrites (each exact: no arithmetic changes):
- Identity; Dropout in inference (mask unused); Cast to the type it already has;
- Add/Sub of 0, Mul/Div by 1, Pow by 1 where broadcasting cannot change the shape;
- Reshape to the shape the input already has; Reshape of a Reshape (when no 0 copies a dim);
- Transpose pairs composed (and dropped when they cancel); Transpose with identity perm.
A value that is a graph (or subgraph) output keeps its producer: an outer-scope value
returned straight from a subgraph is what a peer broke by removing such an Identity.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from onnxsqueeze.core.graphs import GraphLike, constant_array, replace_value, scopes
from onnxsqueeze.core.io import count_nodes
from onnxsqueeze.core.pass_base import SqueezePass, SqueezeResult
from onnxsqueeze.core.shapes import inferred_shapes, rank, static_shape

_NEUTRAL = {"Add": 0.0, "Sub": 0.0, "Mul": 1.0, "Div": 1.0, "Pow": 1.0}


@dataclasses.dataclass(frozen=True)
class SimplifyGraphOptions:
    identities: bool = True
    neutral_elements: bool = True
    reshapes: bool = True
    transposes: bool = True
    slices: bool = True


class SimplifyGraphPass(SqueezePass):
    """Drop ops that compute nothing and merge consecutive data-movement ops."""

    name = "simplify-graph"
    summary = "remove Identity/Dropout/no-op Cast/x+0/x*1/no-op Reshape, merge Reshape and Transpose pairs"
    lossless = True
    Options = SimplifyGraphOptions

    def call(self, model: ir.Model) -> SqueezeResult:
        nodes_before = count_nodes(model)
        counts: dict[str, int] = {}
        with inferred_shapes(model):
            for scope in list(scopes(model)):
                for node in list(scope):
                    rule = self._rewrite(scope, node)
                    if rule:
                        counts[rule] = counts.get(rule, 0) + 1
        RemoveUnusedNodesPass()(model)
        stats = {**counts, "nodes_removed": nodes_before - count_nodes(model)}
        return SqueezeResult(model, modified=bool(counts), stats=stats)

    def _rewrite(self, scope: GraphLike, node: ir.Node) -> str | None:
        if node.domain not in ("", "ai.onnx") or not node.outputs:
            return None
        opts: SimplifyGraphOptions = self.options
        op = node.op_type
        if opts.identities and op in ("Identity", "Dropout", "Cast"):
            return (
                _bypass(node, node.inputs[0]) and "identities_removed"
                if _is_identity(node)
                else None
            )
        if opts.neutral_elements and op in _NEUTRAL:
            source = _neutral_operand(node)
            return _bypass(node, source) and "neutral_ops_removed" if source is not None else None
        if opts.reshapes and op == "Reshape":
            return _simplify_reshape(node)
        if opts.transposes and op == "Transpose":
            return _simplify_transpose(scope, node)
        if opts.slices and op == "Slice" and _is_full_slice(node):
            return "slices_removed" if _bypass(node, node.inputs[0]) else None
        return None


def _bypass(node: ir.Node, source: ir.Value | None) -> bool:
    """Make the node's first output's readers read ``source``; False if it must stay."""
    if source is None or any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
        return False
    return replace_value(node.outputs[0], source)


def _is_identity(node: ir.Node) -> bool:
    if node.op_type == "Identity":
        return True
    if node.op_type == "Dropout":
        training = node.inputs[2] if len(node.inputs) > 2 else None
        if training is not None:
            value = constant_array(training)
            if value is None or bool(value):
                return False
        is_test = node.attributes.get("is_test")  # opset < 7: is_test=0 means training
        return is_test is None or bool(is_test.as_int())
    if node.op_type == "Cast":
        to = node.attributes.get("to")
        src = node.inputs[0]
        return (
            to is not None
            and src is not None
            and src.dtype is not None
            and src.dtype.value == to.as_int()
        )
    return False


def _neutral_operand(node: ir.Node) -> ir.Value | None:
    """For x+0, 0+x, x-0, x*1, 1*x, x/1, x**1: x, when the result has x's shape and dtype."""
    if len(node.inputs) != 2 or any(v is None for v in node.inputs):
        return None
    neutral = _NEUTRAL[node.op_type]
    commutative = node.op_type in ("Add", "Mul")
    for const_index in (1, 0) if commutative else (1,):
        const = constant_array(node.inputs[const_index])
        other = node.inputs[1 - const_index]
        if const is None or constant_array(other) is not None:
            continue
        if const.size == 0 or not np.all(const == neutral):
            continue
        other_rank = rank(other)
        out = node.outputs[0]
        if other_rank is None or const.ndim > other_rank or any(d != 1 for d in const.shape):
            continue  # broadcasting could change the shape
        if other.dtype is None or out.dtype is not None and out.dtype != other.dtype:
            continue
        return other
    return None


def _simplify_reshape(node: ir.Node) -> str | None:
    data, shape_value = node.inputs[0], node.inputs[1] if len(node.inputs) > 1 else None
    target = constant_array(shape_value)
    if data is None or target is None:
        return None
    in_shape = static_shape(data)
    out_shape = static_shape(node.outputs[0])
    if in_shape is not None and in_shape == out_shape:
        return "reshapes_removed" if _bypass(node, data) else None
    producer = data.producer()
    allowzero = node.attributes.get("allowzero")
    zero_copies = 0 in target.tolist() and not (allowzero and allowzero.as_int())
    if (
        producer is not None
        and producer.op_type == "Reshape"
        and producer.domain in ("", "ai.onnx")
    ):
        if zero_copies or len(data.uses()) != 1 or data.is_graph_output():
            return None
        node.replace_input_with(0, producer.inputs[0])
        return "reshapes_merged"
    return None


_FULL = 2**31 - 1  # exporters write INT32_MAX or INT64_MAX for "to the end"


def _is_full_slice(node: ir.Node) -> bool:
    """Starts 0, steps 1, ends past every dim: the whole tensor. A peer also dropped Slices
    ending at -1 (all but the last element) and changed outputs; those are not full."""
    if "starts" in node.attributes:  # opset < 10
        starts = list(node.attributes["starts"].as_ints())
        ends = list(node.attributes["ends"].as_ints())
        axes = list(node.attributes["axes"].as_ints()) if "axes" in node.attributes else None
        steps = [1] * len(starts)
    else:
        inputs = list(node.inputs[1:])
        arrays = [constant_array(v) if v is not None else None for v in inputs]
        if len(arrays) < 2 or arrays[0] is None or arrays[1] is None:
            return False
        if any(v is not None and a is None for v, a in zip(inputs[2:], arrays[2:], strict=True)):
            return False  # axes or steps given but not constant
        starts, ends = arrays[0].tolist(), arrays[1].tolist()
        axes = arrays[2].tolist() if len(arrays) > 2 and arrays[2] is not None else None
        steps = (
            arrays[3].tolist() if len(arrays) > 3 and arrays[3] is not None else [1] * len(starts)
        )
    dims = static_shape(node.inputs[0])
    for i, (start, end, step) in enumerate(zip(starts, ends, steps, strict=False)):
        axis = axes[i] if axes is not None else i
        known = dims[axis] if dims is not None and -len(dims) <= axis < len(dims) else None
        if start != 0 or step != 1 or not (end >= _FULL or (known is not None and end >= known)):
            return False
    return True


def _perm(node: ir.Node) -> list[int] | None:
    attr = node.attributes.get("perm")
    if attr is not None:
        return list(attr.as_ints())
    r = rank(node.inputs[0])
    return list(reversed(range(r))) if r is not None else None


def _simplify_transpose(scope: GraphLike, node: ir.Node) -> str | None:
    perm = _perm(node)
    if perm is None:
        return None
    if perm == sorted(perm):
        return "transposes_removed" if _bypass(node, node.inputs[0]) else None
    source = node.inputs[0]
    producer = source.producer() if source is not None else None
    if (
        producer is None
        or producer.op_type != "Transpose"
        or producer.domain not in ("", "ai.onnx")
    ):
        return None
    inner = _perm(producer)
    if (
        inner is None
        or len(inner) != len(perm)
        or len(source.uses()) != 1
        or source.is_graph_output()
    ):
        return None
    combined = [inner[p] for p in perm]
    if combined == sorted(combined) and _bypass(node, producer.inputs[0]):
        return "transposes_removed"
    # Merge into one Transpose (an identity perm stays only where a graph output needs a node).
    node.replace_input_with(0, producer.inputs[0])
    node.attributes["perm"] = ir.AttrInt64s("perm", combined)
    return "transposes_merged"
