"""quantize-dynamic: int8 weights, activations quantized at run time (no calibration data).

Embedding tables (Gather on a constant 2-D table) become int8 rows, one scale per row, dequantized
after the lookup, or (``embedding_fold``, the CPU's) expanded to float at load. Each MatMul (and
plain Gemm) with a constant weight becomes ``DynamicQuantizeLinear(x) -> MatMulInteger -> Cast ->
Mul(x_scale * w_scale)`` (+ ``Add(bias)``), fused by onnxruntime into DynamicQuantizeMatMul: the
activation range is each run's own min/max (no calibration). Weights are per output column,
symmetric (7-bit where u8s8 kernels saturate); one DynamicQuantizeLinear serves every MatMul
reading the same tensor (Q, K and V); a weight read by several nodes is quantized once.

``outliers`` (input -> channels, from calib.peaks) keeps huge input channels out of the
run-time range: the MatMul reads the input with them zeroed (``Mul`` by a 0/1 mask) and
their share, ``Gather(x, channels) @ W[channels]``, is added in float after the bias (one
channel at 16x otherwise leaves the others 1/16 of the levels; LLM.int8()'s decomposition).
``outlier_scales`` divides them into range instead (SmoothQuant on those channels alone): one
``Mul``, no float share, a little less accurate (calib.outlier_plan chooses). A partial
product keeps no name of the float model's (``_inliers``): tensors are matched by name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

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
from onnxsqueeze.core.spill import after_each_field, forget_replaced
from onnxsqueeze.quant.qdq import saturating_u8s8_cpu
from onnxsqueeze.quant.qmath import quantize_per_channel
from onnxsqueeze.quant.weight_store import WeightStore

FLOAT = ir.DataType.FLOAT


@dataclasses.dataclass(frozen=True)
class QuantizeDynamicOptions:
    op_types: tuple[str, ...] = ("MatMul", "Gemm", "Gather")
    per_channel: bool = True
    #: 7-bit weights; None: on CPUs whose u8s8 kernels saturate (AVX2 without VNNI).
    reduce_range: bool | None = None
    exclude_nodes: tuple[str, ...] = ()
    after_each: Callable[[ir.Model], None] | None = after_each_field()
    #: Weights with fewer elements stay float (their run-time quantization costs more).
    min_elements: int = 1024
    #: Input value name -> channels (last axis) whose share is computed in float.
    outliers: Mapping[str, tuple[int, ...]] | None = None
    #: Input -> per-channel s: the MatMul reads x / s, weight rows times s (beats outliers).
    outlier_scales: Mapping[str, np.ndarray] | None = None
    #: Tables folded back to float at load (quant.unpack): float Gather, float memory. False:
    #: int8 rows gathered, then scaled (int8 memory; MiniLM 1.57 vs 1.49 ms a sentence).
    embedding_fold: bool = False


class QuantizeDynamicPass(SqueezePass):
    """MatMul/Gemm with constant weights -> dynamic int8 (DynamicQuantizeLinear + MatMulInteger)."""

    name = "quantize-dynamic"
    summary = "int8 weights, activations quantized at run time (MatMulInteger; no calibration)"
    lossless = False
    Options = QuantizeDynamicOptions

    def call(self, model: ir.Model) -> SqueezeResult:
        opts: QuantizeDynamicOptions = self.options
        if opset_version(model) < 11:
            raise ValueError("quantize-dynamic needs opset >= 11 (DynamicQuantizeLinear)")
        self._model = model
        self._names = all_value_names(model)
        self._reduce = opts.reduce_range if opts.reduce_range is not None else saturating_u8s8_cpu()
        self._quantized: list[str] = []
        self._skipped: dict[str, str] = {}
        self._splits: dict[tuple, tuple[ir.Value, ir.Value]] = {}  # (x, channels) -> (x', x[c])
        for scope in list(scopes(model)):
            shared: dict[tuple, tuple[ir.Value, ir.Value, ir.Value]] = {}
            for node in list(scope):
                if node.op_type in opts.op_types and node.domain in ("", "ai.onnx"):
                    weights = [v for v in node.inputs if v and v.const_value is not None]
                    reason = self._rewrite(scope, node, shared)
                    if reason:
                        self._skipped[node.name or node.op_type] = reason
                    else:
                        self._quantized.append(node.name or node.op_type)
                        forget_replaced(weights, streaming=opts.after_each is not None)
                        if opts.after_each is not None:
                            opts.after_each(model)
        stats = {
            "nodes_quantized": len(self._quantized),
            "quantized": self._quantized,
            "kept_float": {k: v for k, v in self._skipped.items() if v != "not a weighted MatMul"},
            "reduce_range": self._reduce,
            "nodes": count_nodes(model),
        }
        return SqueezeResult(model, modified=bool(self._quantized), stats=stats)

    def _rewrite(self, scope: GraphLike, node: ir.Node, shared: dict) -> str | None:
        opts: QuantizeDynamicOptions = self.options
        if node.name and node.name in opts.exclude_nodes:
            return "excluded"
        if node.op_type == "Gather":
            return self._gather(scope, node)
        if len(node.inputs) < 2 or node.inputs[0] is None:
            return "not a weighted MatMul"
        weight = constant_array(node.inputs[1])
        x = node.inputs[0]
        if weight is None or weight.ndim != 2 or weight.dtype != np.float32:
            return "not a weighted MatMul"
        if x.dtype not in (FLOAT, None) or constant_array(x) is not None:
            return "not a weighted MatMul"
        if weight.size < opts.min_elements:
            return f"weight below {opts.min_elements} elements"
        bias, flipped = None, False
        if node.op_type == "Gemm":
            attrs = {k: a.value for k, a in node.attributes.items()}
            if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0:
                return "Gemm with transA or alpha"
            if attrs.get("transB", 0):
                weight, flipped = weight.T, True
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                bias = constant_array(node.inputs[2])
                if bias is None or attrs.get("beta", 1.0) != 1.0:
                    return "Gemm bias not constant or beta != 1"
        channels = tuple((opts.outliers or {}).get(x.name or "", ()))
        if channels and max(channels) >= weight.shape[0]:
            channels = ()
        factors = (opts.outlier_scales or {}).get(x.name or "")
        if factors is not None and len(factors) == weight.shape[0]:
            channels = ()
            weight = (weight * factors[:, None]).astype(np.float32)
        else:
            factors = None
        side_weight = weight[list(channels)] if channels else None
        if channels:
            weight = weight.copy()
            weight[list(channels)] = 0  # their inputs are zero: rows free for the scale
        base = node.inputs[1].name or "weight"
        wkey = (node.inputs[1], flipped, channels, None if factors is None else x)
        if wkey not in shared:
            q, qp = quantize_per_channel(
                weight, 1 if opts.per_channel else None, "int8", self._reduce
            )
            shared[wkey] = [self._const(scope, np.ascontiguousarray(a), base + suffix, node)
                            for a, suffix in ((q, "_quantized"), (qp.zero_point, "_zero_point"),
                                              (np.asarray(qp.scale, np.float32), "_scale"))]  # fmt: skip
        wq, wzp, ws = shared[wkey]
        key = (x, channels, factors is not None)
        if key not in shared:
            clean = self._split(scope, x, channels, weight.shape[0], node, factors)
            shared[key] = self._dynamic_quantize(scope, clean, node)
        xq, xs, xzp = shared[key]
        mmi = ir.node("MatMulInteger", [xq, wq, xzp, wzp])
        cast = ir.node("Cast", [mmi.outputs[0]], attributes={"to": FLOAT.value})
        scale = ir.node("Mul", [xs, ws])
        out = ir.node("Mul", [cast.outputs[0], scale.outputs[0]])
        new_nodes = [mmi, cast, scale, out]
        result = out.outputs[0]
        if bias is not None:
            if ("bias", node.inputs[2]) not in shared:
                b = self._const(scope, bias.reshape(-1).astype(np.float32), base + "_bias", node)
                shared[("bias", node.inputs[2])] = b
            b = shared[("bias", node.inputs[2])]
            add = ir.node("Add", [result, b])
            new_nodes.append(add)
            result = add.outputs[0]
        self._replace(scope, node, new_nodes, result, base)
        if side_weight is not None:
            self._add_outlier_share(scope, result, self._splits[key][1], side_weight, base)
        return None

    def _split(self, scope: GraphLike, x: ir.Value, channels: tuple[int, ...], width: int,
               before: ir.Node, factors: np.ndarray | None = None) -> ir.Value:  # fmt: skip
        """``x`` with ``channels`` zeroed or divided by ``factors`` (what the int8 MatMul
        reads), once per input; split channels' values go to ``_splits`` (the float share)."""
        if not channels and factors is None:
            return x
        key = (x, channels, factors is not None)
        if key not in self._splits:
            mask = (
                np.ones(width, np.float32) if factors is None else (1 / factors).astype(np.float32)
            )
            mask[list(channels)] = 0  # no channels when scaling
            base = x.name or "x"
            suffix = "_outlier_scale" if factors is not None else "_outlier_mask"
            clean = ir.node("Mul", [x, self._const(scope, mask, base + suffix, before)])
            clean.outputs[0].name = unique_name(self._names, base + "_inliers")
            clean.outputs[0].type, clean.outputs[0].shape = x.type, x.shape
            new_nodes, picked = [clean], None
            if channels:
                index = self._const(scope, np.array(channels, np.int64), base + "_outliers", before)
                gather = ir.node("Gather", [x, index], attributes={"axis": -1})
                gather.outputs[0].name = unique_name(self._names, base + "_outlier_values")
                new_nodes.append(gather)
                picked = gather.outputs[0]
            scope.insert_before(before, new_nodes)
            self._splits[key] = (clean.outputs[0], picked)
        return self._splits[key][0]

    def _add_outlier_share(
        self, scope: GraphLike, result: ir.Value, picked: ir.Value, side_weight, base: str
    ) -> None:
        """``result + picked @ side_weight``, after the bias Add that follows ``result`` if
        there is one, so onnxruntime still fuses the bias into its DynamicQuantizeMatMul."""
        target = result
        users = list(result.uses())
        if len(users) == 1:
            user = users[0].node
            other = [v for v in user.inputs if v is not result]
            if (
                user.op_type == "Add"
                and user.domain in ("", "ai.onnx")
                and user.graph is scope
                and len(other) == 1
                and constant_array(other[0]) is not None
            ):
                target = user.outputs[0]
        after = target.producer()
        rows = self._const(scope, np.ascontiguousarray(side_weight), base + "_outlier_rows", after)
        share = ir.node("MatMul", [picked, rows])
        total = ir.node("Add", [share.outputs[0], share.outputs[0]])
        share.outputs[0].name = unique_name(self._names, base + "_outlier_share")
        scope.insert_after(after, [share, total])
        name = target.name
        target.replace_all_uses_with(total.outputs[0], replace_graph_outputs=True)
        total.replace_input_with(0, target)
        target.name = unique_name(self._names, f"{name}_inliers")
        if target is not result and not result.is_graph_output() and result.name:
            result.name = unique_name(self._names, f"{result.name}_inliers")
        total.outputs[0].name = name
        total.outputs[0].type, total.outputs[0].shape = target.type, target.shape

    def _gather(self, scope: GraphLike, node: ir.Node) -> str | None:
        """An embedding table: int8 rows gathered, then scaled by their row scales (only the
        looked-up rows are dequantized), or the whole table in the fold form."""
        table = constant_array(node.inputs[0])
        axis = node.attributes.get("axis")
        if table is None or table.ndim != 2 or table.dtype != np.float32:
            return "not a weighted MatMul"
        if axis is not None and axis.as_int() != 0:
            return "not a weighted MatMul"
        if table.size < self.options.min_elements:
            return f"table below {self.options.min_elements} elements"
        if read_elsewhere(node.inputs[0], node):
            return "table shared with other readers"
        q, qp = quantize_per_channel(table, 0, "int8")  # rows: lookups never saturate
        if self.options.embedding_fold:
            store = WeightStore(self._model, self._names, 8, fold=True)
            store.replace(scope, node, 0, q, qp.scale.reshape(-1), {"axis": 0})
            return None
        base = node.inputs[0].name or "table"
        q_value = self._const(scope, q, base + "_quantized", node)
        scales = self._const(scope, qp.scale.reshape(-1, 1), base + "_scale", node)
        rows = ir.node("Gather", [q_value, node.inputs[1]], attributes={"axis": 0})
        cast = ir.node("Cast", [rows.outputs[0]], attributes={"to": FLOAT.value})
        row_scales = ir.node("Gather", [scales, node.inputs[1]], attributes={"axis": 0})
        out = ir.node("Mul", [cast.outputs[0], row_scales.outputs[0]])
        self._replace(scope, node, [rows, cast, row_scales, out], out.outputs[0], base)
        return None

    def _replace(self, scope, node: ir.Node, new_nodes, result: ir.Value, base: str) -> None:
        """Put ``new_nodes`` in ``node``'s place; ``result`` takes over its output (and name),
        and the float weights it read go once nothing else reads them."""
        for n in new_nodes:
            n.outputs[0].name = unique_name(self._names, f"{node.name or base}_{n.op_type}")
        scope.insert_before(node, new_nodes)
        old = node.outputs[0]
        result.type, result.shape = ir.TensorType(FLOAT), old.shape
        weights = [v for v in node.inputs if v is not None and constant_array(v) is not None]
        name = old.name
        old.replace_all_uses_with(result, replace_graph_outputs=True)
        scope.remove(node, safe=True)
        result.name = name
        for value in weights:
            drop_if_unused(scope, value)

    def _dynamic_quantize(self, scope: GraphLike, x: ir.Value, before: ir.Node):
        dql = ir.node("DynamicQuantizeLinear", [x], num_outputs=3)
        base = x.name or "x"
        for out, suffix in zip(dql.outputs, ("_quantized", "_scale", "_zero_point"), strict=True):
            out.name = unique_name(self._names, base + suffix)
        producer = x.producer()
        if producer is not None and producer.graph is scope:
            scope.insert_after(producer, dql)
        else:
            scope.insert_before(before, dql)
        return tuple(dql.outputs)

    def _const(self, scope: GraphLike, array: np.ndarray, base: str, before: ir.Node) -> ir.Value:
        return add_constant(self._model, scope, array, unique_name(self._names, base), before)
