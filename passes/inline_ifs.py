"""inline-ifs: an If whose condition is a known constant becomes the nodes of its branch.

Exported models branch on facts fixed at export (input rank, a flag); once shapes are
folded those conditions are constants, and the taken branch's nodes move into the
enclosing graph. Branch initializers move with them; If outputs keep their names.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from onnxsqueeze.core.graphs import GraphLike, constant_array, replace_value, scopes
from onnxsqueeze.core.io import count_nodes
from onnxsqueeze.core.pass_base import SqueezePass, SqueezeResult


class InlineIfsPass(SqueezePass):
    """Replace If nodes with constant conditions by the branch they always take."""

    name = "inline-ifs"
    summary = "replace If nodes whose condition is constant by the taken branch"
    lossless = True

    def call(self, model: ir.Model) -> SqueezeResult:
        nodes_before = count_nodes(model)
        inlined = inline_constant_ifs(model)
        if inlined:
            RemoveUnusedNodesPass()(model)
        stats = {"ifs_inlined": inlined, "nodes_removed": nodes_before - count_nodes(model)}
        return SqueezeResult(model, modified=bool(inlined), stats=stats)


def inline_constant_ifs(model: ir.Model) -> int:
    """Inline every If with a constant condition, repeatedly (inlined bodies hold more Ifs)."""
    total = 0
    while True:
        count = 0
        for scope in list(scopes(model)):
            for node in list(scope):
                if node.op_type == "If" and node.domain in ("", "ai.onnx") and _inline(scope, node):
                    count += 1
        total += count
        if not count:
            return total


def _inline(scope: GraphLike, node: ir.Node) -> bool:
    cond = constant_array(node.inputs[0])
    if cond is None or cond.size != 1 or node.graph is not scope:
        return False
    branch = node.attributes["then_branch" if bool(cond.reshape(())) else "else_branch"].as_graph()
    if len(branch.outputs) != len(node.outputs):
        return False
    if branch.initializers and not isinstance(scope, ir.Graph):
        return False  # functions cannot hold the branch's initializers
    for out, result in zip(node.outputs, branch.outputs, strict=True):
        # An If output that is a graph output can only be renamed onto a node of the branch.
        if out.is_graph_output() and (
            result.producer() is None or result.producer().graph is not branch
        ):
            return False
    for value in list(branch.initializers.values()):
        branch.initializers.pop(value.name)
        scope.register_initializer(value)
    for inner in list(branch):
        branch.remove(inner)
        scope.insert_before(node, inner)
    results = list(branch.outputs)
    branch.outputs.clear()
    for out, result in zip(node.outputs, results, strict=True):
        if not replace_value(out, result):
            raise RuntimeError(f"inline-ifs: cannot reconnect output {out.name}")
    return True
