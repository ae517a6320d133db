"""onnxruntime's n-bit weight kernels (``com.microsoft`` MatMulNBits, GatherBlockQuantized):
nodes that take a float MatMul's or Gather's place and keep 4- or 8-bit weights in memory,
which matters on GPUs and for models larger than RAM; on a small CPU they run slower than
float (see docs/benchmarks/weights.md)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxsqueeze.core.graphs import GraphLike, add_constant, drop_if_unused, unique_name
from onnxsqueeze.quant.qmath import pack_matmul_nbits, pack_rows


class NBitsBuilder:
    """Replaces nodes of one model by n-bit kernels of ``bits`` in blocks of ``block``."""

    def __init__(self, model: ir.Model, names: set[str], bits: int, block: int) -> None:
        self.model, self.names, self.bits, self.block = model, names, bits, block

    def matmul(self, scope: GraphLike, node: ir.Node, q: np.ndarray, scales: np.ndarray) -> int:
        """MatMul(x, W) -> MatMulNBits of W's [K, N] codes ``q`` and [blocks, N] ``scales``;
        returns the bytes stored."""
        k, n = q.shape
        packed = pack_matmul_nbits(q, self.block, self.bits)
        base = node.inputs[1].name or "weight"
        inputs = [
            node.inputs[0],
            self._const(scope, packed, base + "_nbits", node),
            self._const(scope, np.ascontiguousarray(scales.T.reshape(-1)), base + "_scale", node),
        ]
        attributes = {"K": k, "N": n, "bits": self.bits, "block_size": self.block}
        self._replace(scope, node, "MatMulNBits", inputs, attributes, node.inputs[1])
        return packed.nbytes + scales.nbytes

    def gather(self, scope: GraphLike, node: ir.Node, q: np.ndarray, scales: np.ndarray) -> int:
        """Gather(table, ids) -> GatherBlockQuantized of the table's [rows, cols] codes ``q``
        and [rows, blocks] ``scales``: only the rows looked up are dequantized."""
        packed = pack_rows(q, self.bits)  # [rows, cols * bits / 8]
        base = node.inputs[0].name or "table"
        inputs = [
            self._const(scope, packed, base + "_nbits", node),
            node.inputs[1],
            self._const(scope, np.ascontiguousarray(scales), base + "_scale", node),
        ]
        attributes = {"gather_axis": 0, "quantize_axis": 1, "block_size": self.block}
        attributes["bits"] = self.bits
        self._replace(scope, node, "GatherBlockQuantized", inputs, attributes, node.inputs[0])
        return packed.nbytes + scales.nbytes

    def _const(self, scope: GraphLike, array: np.ndarray, base: str, before: ir.Node) -> ir.Value:
        return add_constant(self.model, scope, array, unique_name(self.names, base), before)

    def _replace(self, scope, node, op_type, inputs, attributes, weight: ir.Value) -> None:
        """A ``com.microsoft`` node in ``node``'s place (same output name); the weight goes."""
        new_node = ir.node(op_type, inputs, attributes=attributes, domain="com.microsoft")
        scope.insert_before(node, new_node)
        old = node.outputs[0]
        new = new_node.outputs[0]
        new.type, new.shape = old.type, old.shape
        name = old.name
        old.replace_all_uses_with(new, replace_graph_outputs=True)
        scope.remove(node, safe=True)
        drop_if_unused(scope, weight)
        new.name = name
        self.model.opset_imports.setdefault("com.microsoft", 1)
