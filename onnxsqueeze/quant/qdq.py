"""QDQ building blocks shared by the quantization passes: which ops quantize how, and how a
QuantizeLinear/DequantizeLinear pair or a dequantized constant is added to a graph.

The op roles follow what onnxruntime's QDQ fusions look for, because a QDQ model is only fast
when the execution provider turns ``DQ -> op -> Q`` into an integer kernel:

- weighted ops (Conv, ConvTranspose, MatMul, Gemm) become QLinearConv, QLinearMatMul /
  MatMulIntegerToFloat, QGemm: inputs and output quantized, weights per channel, bias int32;
- ops with their own output scale (Add, Mul, Concat, average pooling, Sigmoid, LeakyRelu,
  Softmax) become QLinear* kernels;
- data-movement ops (Reshape, Transpose, MaxPool, Resize, ...) run on the integers when their
  output shares their input's scale, so they are quantized only after a quantized producer;
- Relu and Clip right after a quantized op are absorbed into its output's range (onnxruntime
  drops them when the zero point sits at the bottom of the range).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_ir as ir

from onnxsqueeze.core.graphs import (
    GraphLike,
    add_constant,
    constant_array,
    drop_if_unused,
    scopes,
    unique_name,
)
from onnxsqueeze.core.inventory import INTEGER_OPS
from onnxsqueeze.quant.qmath import QRANGES, QParams, qparams, quantize_per_channel
from onnxsqueeze.run import cpu

#: op -> (weight input index, bias input index or None).
WEIGHTED = {"Conv": (1, 2), "ConvTranspose": (1, 2), "MatMul": (1, None), "Gemm": (1, 2)}
OWN_SCALE = frozenset(
    {
        "Add",
        "Mul",
        "Concat",
        "AveragePool",
        "GlobalAveragePool",
        "Sigmoid",
        "LeakyRelu",
        "Softmax",
    }
)
SAME_SCALE = frozenset(
    {
        "Reshape",
        "Transpose",
        "Squeeze",
        "Unsqueeze",
        "Flatten",
        "MaxPool",
        "GlobalMaxPool",
        "Resize",
        "Slice",
        "Gather",
        "Split",
        "Identity",
    }
)
FUSED_ACTIVATIONS = frozenset({"Relu", "Clip"})
ALL_OPS = frozenset(WEIGHTED) | OWN_SCALE | SAME_SCALE

ONNX_TYPES = {
    "uint8": ir.DataType.UINT8,
    "int8": ir.DataType.INT8,
    "uint16": ir.DataType.UINT16,
    "int16": ir.DataType.INT16,
}


def saturating_u8s8_cpu() -> bool:
    """True on CPUs whose u8 x s8 kernels saturate (``cpu.saturating_u8s8``): weights get 7
    bits there. The report names the choice; the result is meant for CPUs like this one."""
    return cpu.saturating_u8s8()


def weight_axis(node: ir.Node, weight: np.ndarray) -> int | None:
    """The weight axis that indexes output channels (None: per tensor only)."""
    op = node.op_type
    if op == "Conv":
        return 0
    if op == "ConvTranspose":
        group = node.attributes.get("group")
        return 1 if group is None or group.as_int() == 1 else None
    if op == "Gemm":
        trans_b = node.attributes.get("transB")
        return 0 if trans_b is not None and trans_b.as_int() else 1
    if op == "MatMul":
        return 1 if weight.ndim == 2 else None
    return None


class QdqBuilder:
    """Adds Q/DQ nodes and quantized constants to one model, with names unique model-wide."""

    def __init__(self, model: ir.Model, names: set[str], domain: str = "") -> None:
        self.model = model
        self.names = names
        #: "" (standard ops) or "com.microsoft" (16-bit Q/DQ before opset 21).
        self.domain = domain
        #: DequantizeLinear outputs of constants by what they dequantize (see ``shared``)
        self._shared: dict[tuple, ir.Value] = {}

    def constant(self, scope: GraphLike, array: np.ndarray, base: str, before: ir.Node) -> ir.Value:
        return add_constant(self.model, scope, array, unique_name(self.names, base), before)

    def dequantized(
        self,
        scope: GraphLike,
        q: np.ndarray,
        qp: QParams,
        axis: int | None,
        base: str,
        before: ir.Node,
        block_size: int = 0,
    ) -> ir.Value:
        """``DequantizeLinear(q, scale, zero_point)`` for a quantized constant (no zero point
        input when ``qp.zero_point`` is None: symmetric)."""
        inputs = [
            self.constant(scope, q, base + "_quantized", before),
            self._by_value(scope, np.asarray(qp.scale, np.float32), base + "_scale", before),
        ]
        if qp.zero_point is not None:
            zero = self._by_value(scope, np.asarray(qp.zero_point), base + "_zero_point", before)
            inputs.append(zero)
        attributes = {"axis": axis} if axis is not None and np.ndim(qp.scale) else {}
        if block_size:
            attributes["block_size"] = block_size
        dq = ir.node("DequantizeLinear", inputs, attributes=attributes, domain=self.domain)
        out = dq.outputs[0]
        out.name = unique_name(self.names, base + "_dequantized")
        out.type = ir.TensorType(ir.DataType.FLOAT)
        out.shape = ir.Shape(q.shape)
        scope.insert_before(before, dq)
        return out

    def shared(self, key: tuple, scope: GraphLike, q: np.ndarray, qp: QParams, axis: int | None,
               base: str, before: ir.Node) -> ir.Value:  # fmt: skip
        """``dequantized``, once per ``key`` (the float constant and what its codes depend on)
        and scope: a weight several nodes read (an unrolled RNN's) keeps one int8 copy, its
        DequantizeLinear placed before the first of them (nodes are visited in order)."""
        key = (id(scope), *key)
        if key not in self._shared:
            self._shared[key] = self.dequantized(scope, q, qp, axis, base, before)
        return self._shared[key]

    def _by_value(self, scope: GraphLike, array: np.ndarray, name: str, position: ir.Node):
        """One initializer per scale or zero point value (uint8 128 for most tensors; one
        scale through MaxPool and Reshape): a squeezed model squeezed again must find no
        duplicates left to merge. In a subgraph each pair keeps its own Constant (nodes
        there are placed in order)."""
        if scope is not self.model.graph:
            return self.constant(scope, array, name, position)
        key = ("by value", array.dtype.str, array.shape, array.tobytes())
        if key not in self._shared:
            self._shared[key] = self.constant(scope, array, name, position)
        return self._shared[key]

    def constant_operand(self, scope: GraphLike, node: ir.Node, index: int, dtype: str) -> None:
        """A constant operand of Add/Mul: quantized with its own exact range."""
        value = node.inputs[index]
        array = constant_array(value)
        if array is None or array.dtype != np.float32:
            return
        qp = qparams(float(array.min(initial=0)), float(array.max(initial=0)), dtype)
        shifted = np.round(array / qp.scale) + qp.zero_point.astype(np.float64)
        # asarray: a 0-d operand (a scalar Mul, as recent transformers export) rounds to a
        # NumPy scalar, not an array
        q = np.asarray(np.clip(shifted, *QRANGES[qp.dtype]), dtype=qp.zero_point.dtype)
        node.replace_input_with(
            index, self.dequantized(scope, q, qp, None, value.name or "const", node)
        )
        drop_if_unused(scope, value)

    def pair(
        self, scope: GraphLike, value: ir.Value, qp: QParams, anchor: ir.Node, after: bool
    ) -> ir.Value:
        """``DQ(Q(value))`` inserted after (or before) ``anchor``; returns the DQ output."""
        base = value.name or "tensor"
        position = anchor
        scale = self._by_value(scope, np.asarray(qp.scale, np.float32), base + "_scale", position)
        zero = self._by_value(scope, np.asarray(qp.zero_point), base + "_zero_point", position)
        q = ir.node("QuantizeLinear", [value, scale, zero], domain=self.domain)
        q.outputs[0].name = unique_name(self.names, base + "_quantized")
        q.outputs[0].type = ir.TensorType(ONNX_TYPES[qp.dtype])
        q.outputs[0].shape = value.shape
        dq = ir.node("DequantizeLinear", [q.outputs[0], scale, zero], domain=self.domain)
        dq.outputs[0].name = unique_name(self.names, base + "_dequantized")
        dq.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
        dq.outputs[0].shape = value.shape
        if after:
            scope.insert_after(anchor, [q, dq])
        else:
            scope.insert_before(anchor, [q, dq])
        return dq.outputs[0]


def quantized_weight(
    memo: dict | None,
    value: ir.Value,
    weight: np.ndarray,
    axis: int | None,
    dtype: str,
    reduce_range: bool,
) -> tuple[np.ndarray, QParams]:
    """quantize_per_channel, remembered in ``memo`` (when given) per initializer tensor and
    settings: the quantize stage builds dozens of candidates from clones of one model, which
    share its weight tensors. The tensor is kept in the memo so its id stays its own."""
    tensor = value.const_value
    if memo is None or tensor is None:
        return quantize_per_channel(weight, axis, dtype, reduce_range)
    key = (id(tensor), axis, dtype, reduce_range)
    if key not in memo:
        memo[key] = (tensor, quantize_per_channel(weight, axis, dtype, reduce_range))
    return memo[key][1]


def already_quantized(node: ir.Node) -> bool:
    """Whether ``node`` sits in an existing QDQ island (a model quantized by another tool):
    a second pair there would quantize the same tensor twice, costing accuracy for nothing."""
    reads_dq = any(
        v is not None and v.producer() is not None and v.producer().op_type == "DequantizeLinear"
        for v in node.inputs
    )
    feeds_q = any(u.op_type == "QuantizeLinear" for out in node.outputs for u, _ in out.uses())
    return reads_dq or feeds_q


def quantized_compute(model: ir.Model) -> dict[str, int]:
    """What shows that some tool (or an earlier squeeze) quantized ``model`` already, by
    kind: ops that compute in integers, QDQ pairs, and weights stored as integers that a
    DequantizeLinear or a Cast (the fold form) turns back into floats."""
    found: Counter[str] = Counter()
    for scope in scopes(model):
        for n in scope:
            if n.op_type in INTEGER_OPS or n.op_type in ("QuantizeLinear", "DequantizeLinear"):
                found[n.op_type] += 1
            elif n.op_type == "Cast" and _scaled_codes(n):
                found["integer weight cast to float"] += 1
    return dict(sorted(found.items()))


def _scaled_codes(cast: ir.Node) -> bool:
    """The fold form: an 8-bit (or packed 4-bit) constant of weight size cast to float and
    multiplied by constant scales (a uint8 mask cast for a Where is not that)."""
    tensor = cast.inputs[0].const_value if cast.inputs and cast.inputs[0] is not None else None
    if tensor is None or tensor.size < 1024:
        return False
    if tensor.dtype not in (ir.DataType.INT8, ir.DataType.UINT8):
        return False
    return any(
        use.op_type in ("Mul", "Sub") and any(constant_array(v) is not None for v in use.inputs)
        for use, _ in cast.outputs[0].uses()
    )


def nothing_quantized(kept_float: dict) -> str:
    """Why a pass quantized nothing: a model another tool quantized says so, not 'nothing'."""
    reasons = list(kept_float.values()) if isinstance(kept_float, dict) else []
    if reasons and all(str(r).startswith("already quantized") for r in reasons):
        return f"the model is already quantized ({len(reasons)} nodes in QDQ form)"
    return "no node could be quantized"


def first_reader(scope: GraphLike, value: ir.Value) -> ir.Node | None:
    """The earliest node of ``scope`` that reads ``value`` (where a pair for it must go)."""
    readers = {id(user) for user, _ in value.uses()}
    return next((node for node in scope if id(node) in readers), None)


def linked_nodes(nodes: list[ir.Node]) -> set[ir.Node]:
    """Weighted nodes plus the elementwise/pooling nodes that sit between quantized nodes
    (looking through data-movement ops and Relu/Clip), grown until nothing changes."""
    chosen = {n for n in nodes if n.op_type in WEIGHTED}
    pending = [n for n in nodes if n.op_type in OWN_SCALE]
    passthrough = SAME_SCALE | FUSED_ACTIVATIONS
    changed = True
    while changed:
        changed = False
        for node in pending:
            if node in chosen:
                continue
            if _reaches(node, chosen, passthrough, upstream=True) and _reaches(
                node, chosen, passthrough, upstream=False
            ):
                chosen.add(node)
                changed = True
    return chosen


def _reaches(node: ir.Node, chosen: set[ir.Node], passthrough, upstream: bool) -> bool:
    """Does a chosen node feed (upstream) or read (downstream) ``node`` directly or through
    ops that run on integers with their input's scale?"""
    stack, seen = [node], set()
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        if upstream:
            neighbours = [v.producer() for v in current.inputs if v is not None]
        else:
            neighbours = [user for out in current.outputs for user, _ in out.uses()]
        for other in neighbours:
            if other is None or other is node:
                continue
            if other in chosen:
                return True
            if other.op_type in passthrough:
                stack.append(other)
    return False


def hand_over_output(scope: GraphLike, value: ir.Value, dq: ir.Value, names: set[str]) -> None:
    """The dequantized tensor becomes the graph output, under the output's name."""
    name = value.name
    value.name = unique_name(names, f"{name}_float")
    dq.name = name
    for i, out in enumerate(scope.outputs):
        if out is value:
            scope.outputs[i] = dq
