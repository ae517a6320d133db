"""onnxruntime's n-bit weight kernels (``com.microsoft`` MatMulNBits, GatherBlockQuantized):
nodes that take a float MatMul's or Gather's place and keep 4- or 8-bit weights in memory,
which matters on GPUs and for models larger than RAM; on a small CPU they run slower than
float (see docs/benchmarks/weights.md)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxsqueeze.graphs import GraphLike, add_constant, drop_if_unused, unique_name
from onnxsqueeze.qmath import pack_matmul_nbits, pack_rows


def to_matmul_nbits(
    model: ir.Model,
    names: set[str],
    scope: GraphLike,
    node: ir.Node,
    q: np.ndarray,
    scales: np.ndarray,
    block: int,
    bits: int,
) -> int:
    """MatMul(x, W) -> MatMulNBits of W's [K, N] codes ``q`` and [blocks, N] ``scales``;
    returns the bytes stored."""
    k, n = q.shape
    packed = pack_matmul_nbits(q, block, bits)
    base = node.inputs[1].name or "weight"
    scale = np.ascontiguousarray(scales.T.reshape(-1))
    inputs = [
        node.inputs[0],
        add_constant(model, scope, packed, unique_name(names, base + "_nbits"), node),
        add_constant(model, scope, scale, unique_name(names, base + "_scale"), node),
    ]
    attributes = {"K": k, "N": n, "bits": bits, "block_size": block}
    nbits = ir.node("MatMulNBits", inputs, attributes=attributes, domain="com.microsoft")
    _replace(model, scope, node, nbits, node.inputs[1])
    return packed.nbytes + scales.nbytes


def to_gather_block_quantized(
    model: ir.Model,
    names: set[str],
    scope: GraphLike,
    node: ir.Node,
    q: np.ndarray,
    scales: np.ndarray,
    block: int,
    bits: int,
) -> int:
    """Gather(table, ids) -> GatherBlockQuantized of the table's [rows, cols] codes ``q`` and
    [rows, blocks] ``scales``: only the rows looked up are dequantized."""
    packed = pack_rows(q, bits)  # [rows, cols * bits / 8]
    base = node.inputs[0].name or "table"
    inputs = [
        add_constant(model, scope, packed, unique_name(names, base + "_nbits"), node),
        node.inputs[1],
        add_constant(
            model, scope, np.ascontiguousarray(scales), unique_name(names, base + "_scale"), node
        ),
    ]
    attributes = {"gather_axis": 0, "quantize_axis": 1, "block_size": block, "bits": bits}
    gather = ir.node("GatherBlockQuantized", inputs, attributes=attributes, domain="com.microsoft")
    _replace(model, scope, node, gather, node.inputs[0])
    return packed.nbytes + scales.nbytes


def _replace(model: ir.Model, scope: GraphLike, node: ir.Node, new_node: ir.Node, weight: ir.Value):
    """Put ``new_node`` in ``node``'s place (same output name) and drop the weight."""
    scope.insert_before(node, new_node)
    old = node.outputs[0]
    new = new_node.outputs[0]
    new.type, new.shape = old.type, old.shape
    name = old.name
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    scope.remove(node, safe=True)
    drop_if_unused(scope, weight)
    new.name = name
    model.opset_imports.setdefault("com.microsoft", 1)
