"""How a weight-only quantized weight takes its float weight's place in the graph.

Two forms of the same codes and scales: ``DequantizeLinear`` (kept by onnxruntime for its QDQ
fusions and TensorRT-style weight-only kernels) or ``fold`` (``Cast -> Mul`` on constants,
which the runtime folds back to the float weight at load; see onnxsqueeze.quant.unpack).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from onnxsqueeze.core.graphs import GraphLike, drop_if_unused
from onnxsqueeze.quant.qdq import QdqBuilder
from onnxsqueeze.quant.qmath import QParams
from onnxsqueeze.quant.unpack import Unpacker, dq_layout, stored_bytes


@dataclasses.dataclass
class WeightStore:
    """Writes quantized weights into one model: ``fold`` or DequantizeLinear form, ``half``
    when the weight is float16 (the fold form casts the expanded weight back)."""

    model: ir.Model
    names: set[str]
    bits: int
    fold: bool
    half: bool = False

    def replace(
        self,
        scope: GraphLike,
        node: ir.Node,
        index: int,
        q: np.ndarray,
        scales: np.ndarray,
        attributes: dict,
        shape: tuple[int, ...] | None = None,
    ) -> tuple[int, int]:
        """Input ``index`` of ``node`` becomes DequantizeLinear(q, scales) with ``attributes``
        (axis, block_size), or its fold form reshaped to ``shape``; returns (bytes before,
        bytes after)."""
        bits = self.bits
        base = node.inputs[index].name or "weight"
        if self.fold:
            layout = dq_layout(q, scales, attributes)
            unpacker = Unpacker(self.model, self.names)
            out = unpacker.dequantized(scope, node, layout, bits, base, shape, self.half)
            stored = stored_bytes(layout.codes, bits)
        else:
            if bits == 4:
                import ml_dtypes

                q = q.astype(ml_dtypes.int4)
            out = QdqBuilder(self.model, self.names).dequantized(
                scope,
                np.ascontiguousarray(q),
                QParams(np.ascontiguousarray(scales), None, f"int{bits}"),
                attributes["axis"],
                base,
                node,
                attributes.get("block_size", 0),
            )
            stored = (q.size * bits + 7) // 8
        weight_value = node.inputs[index]
        before = weight_value.const_value.nbytes if weight_value.const_value else 0
        # every reader (a shared weight's, checked by the caller) reads the one copy
        weight_value.replace_all_uses_with(out)
        drop_if_unused(scope, weight_value)
        return before, stored + scales.nbytes
