"""fuse-gemm: MatMul of a 2-D input by a constant matrix, then Add of a constant row, is Gemm.

One node instead of two, and onnxruntime adds the bias inside the GEMM kernel. The sum is
the same but may round differently, so the pass carries a fusion tolerance like
fuse-batchnorm.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from onnxsqueeze.core.graphs import constant_array, replace_value, scopes
from onnxsqueeze.core.io import count_nodes
from onnxsqueeze.core.pass_base import SqueezePass, SqueezeResult
from onnxsqueeze.core.shapes import inferred_shapes, rank


@dataclasses.dataclass(frozen=True)
class FuseGemmOptions:
    rtol: float = 1e-4


class FuseGemmPass(SqueezePass):
    """MatMul(2-D, constant) + Add(constant bias) -> Gemm."""

    name = "fuse-gemm"
    summary = "fuse MatMul(2-D x, constant W) + Add(constant bias) into one Gemm"
    lossless = True
    Options = FuseGemmOptions

    def call(self, model: ir.Model) -> SqueezeResult:
        nodes_before = count_nodes(model)
        fused = 0
        if not any(_candidate(n) for scope in scopes(model) for n in scope):
            return SqueezeResult(model, modified=False, stats={})  # spare the shape inference
        with inferred_shapes(model):
            for scope in list(scopes(model)):
                for node in list(scope):
                    fused += _fuse(node)
        if fused:
            RemoveUnusedNodesPass()(model)
        stats = {"gemms_fused": fused, "nodes_removed": nodes_before - count_nodes(model)}
        return SqueezeResult(model, modified=bool(fused), stats=stats)


def _candidate(add: ir.Node) -> bool:
    """Add of a constant to a MatMul by a constant matrix (before knowing ranks)."""
    if add.op_type != "Add" or len(add.inputs) != 2:
        return False
    for index in (0, 1):
        producer = add.inputs[index].producer() if add.inputs[index] is not None else None
        if (
            producer is not None
            and producer.op_type == "MatMul"
            and constant_array(add.inputs[1 - index]) is not None
            and constant_array(producer.inputs[1]) is not None
        ):
            return True
    return False


def _fuse(add: ir.Node) -> bool:
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.inputs) != 2:
        return False
    for index in (0, 1):
        product, bias_value = add.inputs[index], add.inputs[1 - index]
        matmul = product.producer() if product is not None else None
        if matmul is None or matmul.op_type != "MatMul" or matmul.domain not in ("", "ai.onnx"):
            continue
        if matmul.graph is not add.graph or len(product.uses()) != 1 or product.is_graph_output():
            continue
        weight = constant_array(matmul.inputs[1])
        bias = constant_array(bias_value)
        if weight is None or bias is None or weight.ndim != 2 or rank(matmul.inputs[0]) != 2:
            continue
        if (
            bias.shape not in ((weight.shape[1],), (1, weight.shape[1]))
            or bias.dtype != weight.dtype
        ):
            continue
        gemm = ir.node(
            "Gemm", inputs=[matmul.inputs[0], matmul.inputs[1], bias_value], num_outputs=1
        )
        add.graph.insert_before(add, gemm)
        gemm.outputs[0].type = add.outputs[0].type or product.type
        if replace_value(add.outputs[0], gemm.outputs[0], take_name=True):
            return True
        add.graph.remove(gemm, safe=True)
    return False
