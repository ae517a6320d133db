"""insert-qdq: static quantization in QDQ form from calibrated activation ranges.

Every tensor read or written by a quantized node gets one ``QuantizeLinear -> DequantizeLinear``
pair (shared by its readers); weights become per-channel symmetric integers behind a
``DequantizeLinear``, biases int32 on the accumulator's scale. Which ops quantize how is in
``onnxsqueeze.quant.qdq``. Readers that stay float keep reading the float tensor unless its producer
is quantized (then they read the dequantized one, or the producer could not fuse).

The ranges come from calibration (``onnxsqueeze.calibrate``); a node whose activation has no
range (not calibrated, inside a body the collector could not reach) stays float and is listed
with the reason. Lossy: the quantize stage measures the error and keeps sensitive nodes float.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from onnxsqueeze.core.graphs import (
    GraphLike,
    all_value_names,
    constant_array,
    drop_if_unused,
    is_constant,
    opset_version,
    scopes,
)
from onnxsqueeze.core.io import count_nodes
from onnxsqueeze.core.pass_base import SqueezePass, SqueezeResult
from onnxsqueeze.core.shapes import inferred_shapes
from onnxsqueeze.quant.qdq import (
    ALL_OPS,
    FUSED_ACTIVATIONS,
    OWN_SCALE,
    SAME_SCALE,
    WEIGHTED,
    QdqBuilder,
    already_quantized,
    first_reader,
    hand_over_output,
    linked_nodes,
    quantized_weight,
    saturating_u8s8_cpu,
    weight_axis,
)
from onnxsqueeze.quant.qmath import QParams, qparams, quantize_bias

FLOAT = ir.DataType.FLOAT
DEFAULT_OPS = tuple(sorted(ALL_OPS - {"Softmax"}))


@dataclasses.dataclass(frozen=True)
class InsertQdqOptions:
    #: Activation ranges by tensor name (from ``Calibration.ranges``); hidden from reports.
    ranges: Mapping[str, tuple[float, float]] = dataclasses.field(
        default_factory=dict, metadata={"hidden": True}
    )
    #: Weights quantized once across clones of one model (qdq.quantized_weight); hidden.
    weight_memo: dict | None = dataclasses.field(default=None, metadata={"hidden": True})
    activations: str = "uint8"
    weights: str = "int8"
    per_channel: bool = True
    #: 7-bit weights; None: when uint8 activations meet a CPU whose u8s8 kernels saturate.
    reduce_range: bool | None = None
    op_types: tuple[str, ...] = DEFAULT_OPS
    exclude_nodes: tuple[str, ...] = ()
    exclude_ops: tuple[str, ...] = ()
    #: linked: Add/Mul/Concat/pooling/... only where they join int8 regions (a quantized op
    #: on an input side and on the output side), since elsewhere they only add Q/DQ work;
    #: all: every one of them.
    elementwise: str = "linked"


class InsertQdqPass(SqueezePass):
    """Static int8 (or int16) quantization of activations and weights in QDQ form."""

    name = "insert-qdq"
    summary = "static QDQ quantization from calibrated ranges (weights per channel, int32 bias)"
    lossless = False
    Options = InsertQdqOptions

    def call(self, model: ir.Model) -> SqueezeResult:
        opts: InsertQdqOptions = self.options
        if opts.activations not in ("uint8", "int8", "uint16", "int16"):
            raise ValueError(f"insert-qdq.activations: unsupported type {opts.activations!r}")
        if opts.weights not in ("int8", "uint8", "int16"):
            raise ValueError(f"insert-qdq.weights: unsupported type {opts.weights!r}")
        opset = opset_version(model)
        if opset < 10:
            raise ValueError(f"insert-qdq needs opset >= 10 (model has {opset}); upgrade it")
        wide = "16" in opts.activations or "16" in opts.weights
        domain = "com.microsoft" if wide and opset < 21 else ""
        if domain:
            model.opset_imports.setdefault(domain, 1)
        self._builder = QdqBuilder(model, all_value_names(model), domain)
        self._per_channel = opts.per_channel and (opset >= 13 or bool(domain))
        self._reduce = opts.reduce_range
        if self._reduce is None:
            self._reduce = (
                opts.activations == "uint8" and opts.weights == "int8" and saturating_u8s8_cpu()
            )
        self._excluded_ops = set(opts.exclude_ops)
        self._excluded_nodes = set(opts.exclude_nodes)
        self._stats = {"quantized": [], "float": {}, "pairs": 0, "weights": 0, "unlinked": 0}
        with inferred_shapes(model):
            for scope in list(scopes(model)):
                self._quantize_scope(scope)
        stats = {
            "nodes_quantized": len(self._stats["quantized"]),
            "qdq_pairs": self._stats["pairs"],
            "weights_quantized": self._stats["weights"],
            "kept_float": self._stats["float"],
            "elementwise_outside_int8_regions": self._stats["unlinked"],
            "quantized": self._stats["quantized"],
            "per_channel": self._per_channel,
            "reduce_range": self._reduce,
            "nodes": count_nodes(model),
        }
        return SqueezeResult(model, modified=bool(self._stats["quantized"]), stats=stats)

    def _wanted(self, node: ir.Node) -> bool:
        opts: InsertQdqOptions = self.options
        if node.domain not in ("", "ai.onnx") or node.op_type not in opts.op_types:
            return False
        if node.op_type in self._excluded_ops or (node.name and node.name in self._excluded_nodes):
            self._stats["float"][node.name or node.op_type] = "excluded"
            return False
        return True

    def _qparams(self, value: ir.Value) -> QParams | None:
        bounds = self.options.ranges.get(value.name or "")
        if bounds is None or not all(np.isfinite(bounds)):
            return None
        return qparams(bounds[0], bounds[1], self.options.activations)

    def _quantize_scope(self, scope: GraphLike) -> None:
        # tensor -> qparams of its pair; tensors whose producer is quantized (every reader
        # must read the dequantized value); (node, input index) slots to redirect.
        planned: dict[ir.Value, QParams] = {}
        owned: set[ir.Value] = set()
        slots: list[tuple[ir.Node, int, ir.Value]] = []
        wanted = [node for node in scope if self._wanted(node)]
        linked = linked_nodes(wanted) if self.options.elementwise == "linked" else None
        for node in wanted:
            label = node.name or node.op_type
            if linked is not None and node.op_type in OWN_SCALE and node not in linked:
                self._stats["unlinked"] += 1
                continue
            if any(not is_constant(v) and v.dtype not in (FLOAT, None) for v in node.inputs[:1]):
                continue  # integer data (Gather indices are input 1; input 0 decides)
            reason = self._plan_node(scope, node, planned, owned, slots)
            if reason and node.op_type in SAME_SCALE:
                continue  # followers: quantized only after a quantized producer, not a choice
            if reason:
                self._stats["float"][label] = reason
            else:
                self._stats["quantized"].append(label)
        for value, qp in planned.items():
            self._insert_pair(scope, value, qp, value in owned, slots)

    def _plan_node(self, scope, node, planned, owned, slots) -> str | None:
        op = node.op_type
        if op in SAME_SCALE:
            source = node.inputs[0] if node.inputs else None
            if source is None or source not in planned:
                return (
                    "input not quantized (data movement runs on integers only after a quantized op)"
                )
            outputs = [o for o in node.outputs if o.dtype in (FLOAT, None)]
            slots.append((node, 0, source))
            for out in outputs:
                planned[out] = planned[source]
                owned.add(out)
            return None
        if already_quantized(node):
            return "already quantized (reads a DequantizeLinear or feeds a QuantizeLinear)"
        weight_index, bias_index = WEIGHTED.get(op, (None, None))
        activations = []
        for index, value in enumerate(node.inputs):
            if value is None or index in (weight_index, bias_index) and is_constant(value):
                continue
            if op in ("Resize", "Clip") and index > 0:
                continue
            if is_constant(value):
                if constant_array(value) is None or op not in OWN_SCALE:
                    return "constant input that is not a weight"
                continue
            qp = planned.get(value) or self._qparams(value)
            if qp is None:
                return f"no calibrated range for input '{value.name}'"
            activations.append((index, value, qp))
        output, fused = self._output_of(node)
        out_qp = planned.get(output) or self._qparams(output) if output is not None else None
        if out_qp is None and op in OWN_SCALE:
            return f"no calibrated range for output '{output.name if output else '?'}'"
        weighted = weight_index is not None and is_constant(node.inputs[weight_index])
        if weighted and not self._quantize_weights(
            scope, node, weight_index, bias_index, activations
        ):
            return "weight or bias cannot be quantized (not a float constant / int32 overflow)"
        for index, value, qp in activations:
            planned.setdefault(value, qp)
            slots.append((node, index, value))
        for index, value in enumerate(node.inputs):
            if op in OWN_SCALE and index > 0 and is_constant(value) and value is not None:
                self._builder.constant_operand(scope, node, index, self.options.activations)
        if out_qp is not None:
            planned[output] = out_qp
            owned.add(output)
            if fused is not None:
                self._stats["quantized"].append(fused.name or fused.op_type)
        return None

    def _output_of(self, node: ir.Node) -> tuple[ir.Value | None, ir.Node | None]:
        """The tensor whose pair closes the node: its output, or the output of a Relu/Clip
        that is its only reader (folded into the range)."""
        out = node.outputs[0] if node.outputs else None
        if out is None or out.dtype not in (FLOAT, None):
            return None, None
        users = out.uses()
        if len(users) == 1 and not out.is_graph_output():
            user = users[0][0]
            if (
                user.op_type in FUSED_ACTIVATIONS
                and user.graph is node.graph
                and all(is_constant(v) for v in user.inputs[1:])
                and user.op_type in self.options.op_types + tuple(FUSED_ACTIVATIONS)
                and user.op_type not in self._excluded_ops
            ):
                return user.outputs[0], user
        return out, None

    # ------------------------------------------------------------------ rewriting

    def _quantize_weights(self, scope, node, weight_index, bias_index, activations) -> bool:
        opts: InsertQdqOptions = self.options
        weight_value = node.inputs[weight_index]
        weight = constant_array(weight_value)
        if weight is None or weight.dtype != np.float32 or weight.ndim < 2:
            return False
        axis = weight_axis(node, weight) if self._per_channel else None
        q, wqp = quantized_weight(
            opts.weight_memo, weight_value, weight, axis, opts.weights, self._reduce
        )
        bias_value = (
            node.inputs[bias_index] if bias_index and len(node.inputs) > bias_index else None
        )
        bias_q = None
        if bias_value is not None:
            bias = constant_array(bias_value)
            x_qp = next((qp for i, _, qp in activations if i == 0), None)
            channels = wqp.scale.size if np.ndim(wqp.scale) else None
            if bias is None or x_qp is None or (channels and bias.size != channels):
                return False
            if bias.ndim != 1 and bias.size != max(bias.shape):
                return False
            bias = bias.reshape(-1)
            bias_scale = (np.float32(x_qp.scale) * wqp.scale).astype(np.float32)
            bias_q = quantize_bias(bias, np.broadcast_to(bias_scale, bias.shape))
            if bias_q is None:
                return False
        base, builder = weight_value.name or "weight", self._builder
        dq = builder.shared((weight_value, axis), scope, q, wqp, axis, base, node)
        node.replace_input_with(weight_index, dq)
        drop_if_unused(scope, weight_value)
        if bias_q is not None:
            # per channel like the weight; one scalar where the weight has one (opset < 13);
            # shared by the nodes of a shared bias whose input scales agree
            bqp = QParams(bias_scale, np.zeros(bias_scale.shape, np.int32), "int32")
            key, bname = (bias_value, bias_scale.tobytes()), bias_value.name or "bias"
            dq = builder.shared(key, scope, bias_q, bqp, 0, bname, node)
            node.replace_input_with(bias_index, dq)
            drop_if_unused(scope, bias_value)
        self._stats["weights"] += 1
        return True

    def _insert_pair(self, scope, value, qp, owned: bool, slots) -> None:
        producer = value.producer()
        if producer is not None and producer.graph is scope:
            anchor, after = producer, True
        else:
            anchor, after = first_reader(scope, value), False
            if anchor is None:
                return
        dq = self._builder.pair(scope, value, qp, anchor, after)
        self._stats["pairs"] += 1
        q_node = dq.producer().inputs[0].producer()
        if owned:
            for user, index in list(value.uses()):
                if user is not q_node:
                    user.replace_input_with(index, dq)
            if value.is_graph_output():
                hand_over_output(scope, value, dq, self._builder.names)
            return
        for node, index, source in slots:
            if source is value and node.inputs[index] is value:
                node.replace_input_with(index, dq)
