"""quantize-lstm: LSTM with constant weights -> onnxruntime's ``com.microsoft.DynamicQuantizeLSTM``.

The recurrent and input weights become int8, one symmetric scale per gate row and direction
(7-bit where u8s8 kernels saturate, as for MatMul), stored transposed as the operator reads
them (``[directions, input, 4 * hidden]``); the activations are quantized at run time, as in
quantize-dynamic. A 2-layer bidirectional LSTM (hidden 256) ran 2.9x faster than float on this
project's CPU and stores its weights in a quarter of the bytes; weight-only int8 keeps the
float kernel. The operator exists in onnxruntime's CPU provider only, so the quantize stage
applies this pass for CPU targets. A weight read by several LSTMs is quantized once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from onnxsqueeze.core.graphs import (
    GraphLike,
    add_constant,
    all_value_names,
    constant_array,
    drop_if_unused,
    scopes,
    unique_name,
)
from onnxsqueeze.core.io import count_nodes
from onnxsqueeze.core.pass_base import SqueezePass, SqueezeResult
from onnxsqueeze.core.spill import after_each_field, forget_replaced
from onnxsqueeze.quant.qdq import saturating_u8s8_cpu
from onnxsqueeze.quant.qmath import quantize_per_channel

MS_DOMAIN = "com.microsoft"
#: LSTM's attributes the quantized operator takes (it has no ``layout``: batch-major is refused)
ATTRIBUTES = ("activation_alpha", "activation_beta", "activations", "clip", "direction")
ATTRIBUTES += ("hidden_size", "input_forget")


@dataclasses.dataclass(frozen=True)
class QuantizeLstmOptions:
    #: 7-bit weights; None: on CPUs whose u8s8 kernels saturate (AVX2 without VNNI).
    reduce_range: bool | None = None
    exclude_nodes: tuple[str, ...] = ()
    after_each: Callable[[ir.Model], None] | None = after_each_field()
    #: LSTMs with fewer weight elements stay float (run-time quantization costs more).
    min_elements: int = 1024


class QuantizeLstmPass(SqueezePass):
    """LSTM with constant float W and R -> DynamicQuantizeLSTM with int8 weights."""

    name = "quantize-lstm"
    summary = "LSTM -> onnxruntime's DynamicQuantizeLSTM (int8 weights, CPU provider)"
    lossless = False
    Options = QuantizeLstmOptions

    def call(self, model: ir.Model) -> SqueezeResult:
        opts: QuantizeLstmOptions = self.options
        self._model = model
        self._names = all_value_names(model)
        reduce = opts.reduce_range if opts.reduce_range is not None else saturating_u8s8_cpu()
        self._reduce = reduce
        quantized: list[str] = []
        skipped: dict[str, str] = {}
        for scope in list(scopes(model)):
            shared: dict[ir.Value, tuple[ir.Value, ir.Value, ir.Value]] = {}
            for node in list(scope):
                if node.op_type != "LSTM" or node.domain not in ("", "ai.onnx"):
                    continue
                weights = [v for v in node.inputs[1:3] if v is not None]
                reason = self._rewrite(scope, node, shared)
                if reason:
                    skipped[node.name or "LSTM"] = reason
                    continue
                quantized.append(node.name or "LSTM")
                forget_replaced(weights, streaming=opts.after_each is not None)
                if opts.after_each is not None:
                    opts.after_each(model)
        if quantized and MS_DOMAIN not in model.opset_imports:
            model.opset_imports[MS_DOMAIN] = 1
        stats = {
            "nodes_quantized": len(quantized),
            "quantized": quantized,
            "kept_float": skipped,
            "reduce_range": reduce,
            "nodes": count_nodes(model),
        }
        return SqueezeResult(model, modified=bool(quantized), stats=stats)

    def _rewrite(self, scope: GraphLike, node: ir.Node, shared: dict) -> str | None:
        opts: QuantizeLstmOptions = self.options
        if node.name and node.name in opts.exclude_nodes:
            return "excluded"
        layout = node.attributes.get("layout")
        if layout is not None and layout.as_int() != 0:
            return "batch-major LSTM (layout=1)"
        w, r = (constant_array(v) for v in node.inputs[1:3])
        if w is None or r is None or w.ndim != 3 or r.ndim != 3:
            return "weights not constant"
        if w.dtype != np.float32 or r.dtype != np.float32:
            return "weights not float32"
        if w.size + r.size < opts.min_elements:
            return f"weights below {opts.min_elements} elements"
        inputs = [self._quantized(scope, node, i, a, shared) for i, a in ((1, w), (2, r))]
        optional = [node.inputs[i] if len(node.inputs) > i else None for i in range(3, 8)]
        (wq, ws, wzp), (rq, rs, rzp) = inputs
        attributes = {k: a.value for k, a in node.attributes.items() if k in ATTRIBUTES}
        quantized = ir.node(
            "DynamicQuantizeLSTM",
            [node.inputs[0], wq, rq, *optional, ws, wzp, rs, rzp],
            attributes=attributes,
            domain=MS_DOMAIN,
            num_outputs=len(node.outputs),
            name=node.name,
        )
        scope.insert_before(node, quantized)
        for old, new in zip(node.outputs, quantized.outputs, strict=True):
            name, new.type, new.shape = old.name, old.type, old.shape
            old.replace_all_uses_with(new, replace_graph_outputs=True)
            old.name, new.name = None, name
        float_weights = node.inputs[1:3]
        scope.remove(node, safe=True)
        for value in float_weights:
            drop_if_unused(scope, value)
        return None

    def _quantized(
        self, scope: GraphLike, node: ir.Node, index: int, array: np.ndarray, shared: dict
    ):
        """W or R (``array``, input ``index``) as int8 ``[directions, rows, 4 * hidden]``
        with its scales and zero points (``[directions, 4 * hidden]``), once per weight."""
        value = node.inputs[index]
        if value not in shared:
            directions, gates, width = array.shape
            q, qp = quantize_per_channel(
                array.reshape(directions * gates, width), 0, "int8", self._reduce
            )
            base = value.name or "weight"
            arrays = (
                (np.ascontiguousarray(q.reshape(directions, gates, width).transpose(0, 2, 1)), ""),
                (np.asarray(qp.scale, np.float32).reshape(directions, gates), "_scale"),
                (qp.zero_point.reshape(directions, gates), "_zero_point"),
            )
            shared[value] = tuple(
                add_constant(
                    self._model, scope, a, unique_name(self._names, f"{base}_quantized{s}"), node
                )
                for a, s in arrays
            )
        return shared[value]
