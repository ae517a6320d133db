"""merge-matmuls: MatMuls that read the same input with their own constant weights become one.

A transformer's attention block projects the same LayerNorm output three times (Q, K, V),
each a MatMul by a constant matrix plus a bias Add. One MatMul by the weights side by side
(and one Add of the biases side by side), then a Split of its last axis, computes the same
numbers: each output element is the same dot product over the same K values, so the float
result is bit-identical (measured on MiniLM: max difference 0). It is one kernel where there
were three: in float no faster on onnxruntime's CPU EP (MiniLM 1.00x), but once quantized
dynamically the three int8 kernels with their own output scaling become one (MiniLM dynamic
int8 1.61 -> 1.45 ms a sentence), and the graph loses two nodes per group net.

Merged only when: same input value, same scope, weights constant 2-D of one float dtype and
read by nothing else (a shared weight's copy would grow the file), each MatMul's output read
by one Add of a constant per-column bias (shared or not), or by anything when no MatMul of the
group has a bias (a group mixing both stays apart). The Split keeps each former output's name, so graph
outputs stay.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import numpy as np
import onnx_ir as ir

from onnxsqueeze.core.graphs import (
    GraphLike,
    add_constant,
    all_value_names,
    constant_array,
    drop_if_unused,
    opset_version,
    read_elsewhere,
    scopes,
    unique_name,
)
from onnxsqueeze.core.io import count_nodes
from onnxsqueeze.core.pass_base import SqueezePass, SqueezeResult
from onnxsqueeze.core.spill import lazy_concatenate

#: First opset whose Split takes its sizes as an input.
SPLIT_INPUT_OPSET = 13


@dataclasses.dataclass(frozen=True)
class MergeMatmulsOptions:
    #: Groups whose merged weight would exceed this many elements stay apart (a huge
    #: concatenated copy is made while rewriting).
    max_elements: int = 1 << 26


class MergeMatmulsPass(SqueezePass):
    """MatMuls (+ bias Adds) sharing an input -> one MatMul (+ Add) and a Split."""

    name = "merge-matmuls"
    summary = "merge MatMuls (and their bias Adds) that read the same input into one + Split"
    lossless = True
    Options = MergeMatmulsOptions

    def call(self, model: ir.Model) -> SqueezeResult:
        nodes_before = count_nodes(model)
        self._model, self._names = model, all_value_names(model)
        self._opset = opset_version(model)
        merged = 0
        for scope in list(scopes(model)):
            for group in _groups(scope):
                if sum(w.size for _, w, _ in group) <= self.options.max_elements:
                    self._merge(scope, group)
                    merged += 1
        stats = {"groups_merged": merged, "nodes_removed": nodes_before - count_nodes(model)}
        return SqueezeResult(model, modified=bool(merged), stats=stats)

    def _merge(self, scope: GraphLike, group: list) -> None:
        first = group[0][0]
        x, base = first.inputs[0], first.name or "matmul"
        sources = [node.inputs[1].const_value for node, _, _ in group]
        if all(isinstance(t, ir.ExternalTensor) for t in sources):
            weights = lazy_concatenate(sources, axis=1)  # weights on disk stay there
        else:
            weights = np.concatenate([w for _, w, _ in group], axis=1)
        w_value = add_constant(self._model, scope, weights, self._unique(base + "_merged"), first)
        matmul = ir.node("MatMul", [x, w_value])
        nodes, result = [matmul], matmul.outputs[0]
        if group[0][2] is not None:
            biases = np.concatenate([b[1] for _, _, b in group]).astype(group[0][1].dtype)
            b_value = add_constant(self._model, scope, biases, self._unique(base + "_bias"), first)
            add = ir.node("Add", [result, b_value])
            nodes.append(add)
            result = add.outputs[0]
        sizes = [w.shape[1] for _, w, _ in group]
        if self._opset >= SPLIT_INPUT_OPSET:
            split_sizes = add_constant(
                self._model, scope, np.array(sizes, np.int64), self._unique(base + "_sizes"), first
            )
            split = ir.node(
                "Split", [result, split_sizes], attributes={"axis": -1}, num_outputs=len(sizes)
            )
        else:
            split = ir.node(
                "Split", [result], attributes={"axis": -1, "split": sizes}, num_outputs=len(sizes)
            )
        nodes.append(split)
        for node in nodes[:-1]:
            node.outputs[0].name = self._unique(f"{base}_merged_{node.op_type}")
        scope.insert_before(first, nodes)
        for out, (node, _, bias) in zip(split.outputs, group, strict=True):
            old = bias[0].outputs[0] if bias is not None else node.outputs[0]
            name = old.name
            old.name = f"{name}__merged"
            out.name, out.type, out.shape = name, old.type, old.shape
            old.replace_all_uses_with(out, replace_graph_outputs=True)
            weight, bias_value = node.inputs[1], bias[2] if bias else None
            for gone in (bias[0], node) if bias is not None else (node,):
                scope.remove(gone, safe=True)
            for value in (weight, bias_value):
                if value is not None:
                    drop_if_unused(scope, value)

    def _unique(self, base: str) -> str:
        return unique_name(self._names, base)


def _groups(scope: GraphLike) -> list[list]:
    """Groups (two or more, graph order) of (MatMul, weight, (Add, bias, bias value) or None)."""
    by_input: dict[int, list] = defaultdict(list)
    for node in scope:
        entry = _entry(node)
        if entry is not None:
            by_input[id(node.inputs[0])].append(entry)
    groups = []
    for entries in by_input.values():
        dtypes = {w.dtype for _, w, _ in entries}
        with_bias = [e for e in entries if e[2] is not None]
        if len(dtypes) != 1 or 0 < len(with_bias) < len(entries):
            continue  # mixed: leave them be
        if len(entries) >= 2:
            groups.append(entries)
    return groups


def _entry(node: ir.Node):
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return None
    x, w_value = node.inputs
    weight = constant_array(w_value)
    if x is None or weight is None or weight.ndim != 2 or weight.dtype.kind != "f":
        return None
    if read_elsewhere(w_value, node) or w_value.is_graph_output():
        return None
    out = node.outputs[0]
    users = list(out.uses())
    if out.is_graph_output() or len(users) != 1:
        return (node, weight, None)
    add = users[0].node
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or add.graph is not node.graph:
        return (node, weight, None)
    other = add.inputs[1 - users[0].idx]
    bias = constant_array(other)
    # a bias other nodes read too (zeros a cleanup merged into one) is still this MatMul's
    # bias: copied into the merged one (a row of floats), so whether a group merges does not
    # depend on which equal constants an earlier cleanup merged (a second squeeze would)
    if bias is None or bias.shape != (weight.shape[1],):
        return (node, weight, None)
    return (node, weight, (add, bias, other))
