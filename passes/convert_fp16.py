"""convert-fp16: float32 compute and weights to float16 (or bfloat16), valid by construction.

Each node either converts or stays float32; the decision follows the op's schema, so the
result is always a valid model: an input or output changes type only through a type variable
that allows the new type, and every slot sharing that variable changes with it (inputs typed
``tensor(float)`` outright, like Resize's ``scales`` that peers turned into fp16, never do).
Casts are inserted where a float16 value meets a float32 reader and back. Kept float32:
ops in ``keep_ops`` (numerically sensitive reductions and exponentials by default), ops
whose schema does not allow the type, nodes with a weight beyond float16's range (±65504),
nodes with subgraphs (If/Loop/Scan run float32 as a whole), and the graph's inputs and
outputs when ``keep_io``. Activations can still overflow: the quantize stage's budget (mode
``fp16``) measures that and keeps the nodes responsible in float32.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_ir as ir

from onnxsqueeze.core.graphs import (
    all_value_names,
    constant_array,
    drop_if_unused,
    opset_version,
    unique_name,
)
from onnxsqueeze.core.io import count_nodes
from onnxsqueeze.core.pass_base import SqueezePass, SqueezeResult
from onnxsqueeze.core.shapes import inferred_shapes

FLOAT = ir.DataType.FLOAT
TARGETS = {"float16": ir.DataType.FLOAT16, "bfloat16": ir.DataType.BFLOAT16}
#: Sums and exponentials of many terms lose the most in 16 bits (overflow past 65504).
SENSITIVE = (
    "ReduceSum", "ReduceMean", "ReduceL2", "ReduceLogSumExp", "ReduceSumSquare", "Exp", "Log",
    "Pow", "Softmax", "LogSoftmax", "LayerNormalization", "RandomNormal", "RandomUniform",
    "RandomNormalLike", "RandomUniformLike", "Range", "CumSum", "TopK",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class ConvertFp16Options:
    dtype: str = "float16"
    #: Graph inputs and outputs stay float32 (callers feed and read float32).
    keep_io: bool = True
    keep_ops: tuple[str, ...] = SENSITIVE
    exclude_nodes: tuple[str, ...] = ()


class ConvertFp16Pass(SqueezePass):
    """Float32 nodes and weights -> float16/bfloat16, with casts at the float32 boundaries."""

    name = "convert-fp16"
    summary = "float16/bfloat16 compute and weights; sensitive ops and graph I/O stay float32"
    lossless = False
    preflight = True
    Options = ConvertFp16Options

    def call(self, model: ir.Model) -> SqueezeResult:
        opts: ConvertFp16Options = self.options
        if opts.dtype not in TARGETS:
            raise ValueError(f"convert-fp16.dtype must be one of {', '.join(TARGETS)}")
        self._target = TARGETS[opts.dtype]
        self._opset = opset_version(model)
        self._names = all_value_names(model)
        self._stats = {"converted": 0, "kept_float32": 0, "casts": 0, "clamped_weights": 0}
        self._converted_names: list[str] = []
        graph = model.graph
        with inferred_shapes(model):
            dtypes = {v: v.dtype for node in graph for v in (*node.inputs, *node.outputs) if v}
            dtypes.update({v: v.dtype for v in graph.inputs})
        plans = {node: self._plan(node, dtypes) for node in graph}
        for node in graph:  # a constant turns 16-bit only if every reader takes it so
            readers = node.outputs[0].uses() if node.op_type == "Constant" else []
            if plans.get(node) and any(_needs_float(plans, u, i) for u, i in readers):
                plans[node] = None
        self._rewrite(graph, plans, dtypes)
        self._stats["nodes"] = count_nodes(model)
        stats = {**self._stats, "converted_nodes": self._converted_names}
        return SqueezeResult(model, modified=self._stats["converted"] > 0, stats=stats)

    def _plan(self, node: ir.Node, dtypes) -> tuple[set[int], set[int]] | None:
        """(input slots, output slots) that become 16-bit, or None if the node stays."""
        opts: ConvertFp16Options = self.options
        if node.op_type in opts.keep_ops or (node.name and node.name in opts.exclude_nodes):
            return None
        if node.domain not in ("", "ai.onnx") or any(
            a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
            for a in node.attributes.values()
        ):
            return None
        try:
            schema = onnx.defs.get_schema(node.op_type, self._opset, "")
        except Exception:
            return None
        allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
        wanted = "tensor(float16)" if self._target == ir.DataType.FLOAT16 else "tensor(bfloat16)"
        variables: dict[str, list[tuple[str, int]]] = {}
        for kind, formals, values in (
            ("in", schema.inputs, node.inputs),
            ("out", schema.outputs, node.outputs),
        ):
            for index in range(len(values)):
                formal = formals[min(index, len(formals) - 1)] if formals else None
                if formal is not None and formal.type_str in allowed:
                    variables.setdefault(formal.type_str, []).append((kind, index))
        ins: set[int] = set()
        outs: set[int] = set()
        for var, slots in variables.items():
            values = [(node.inputs if k == "in" else node.outputs)[i] for k, i in slots]
            types = {dtypes.get(v) for v in values if v is not None}
            if types != {FLOAT}:
                continue  # this variable is not float32 here (or unknown): leave it
            if wanted not in allowed[var]:
                return None  # float32 compute the op cannot do in 16 bits: keep the node
            for kind, index in slots:
                (ins if kind == "in" else outs).add(index)
        if self._target == ir.DataType.FLOAT16 and any(_beyond_fp16(node.inputs[i]) for i in ins):
            return None  # a weight float16 cannot hold: the node keeps float32
        if node.op_type == "Cast":  # it converts by itself: a Cast in front would be a second
            if dtypes.get(node.inputs[0]) in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16):
                return None  # a converted model's boundary (16-bit back to float32) stays
            ins = set()
        return (ins, outs) if (ins or outs) else None

    def _rewrite(self, graph: ir.Graph, plans, dtypes) -> None:
        target = self._target
        keep_io = self.options.keep_io
        converted: dict[ir.Value, ir.Value] = {}  # float32 value -> its 16-bit counterpart
        sixteen: set[ir.Value] = set()  # values that are 16-bit themselves now
        if not keep_io:
            for value in graph.inputs:
                if dtypes.get(value) == FLOAT and value.name not in graph.initializers:
                    value.type = ir.TensorType(target)
                    sixteen.add(value)
        for node in list(graph):
            plan = plans.get(node)
            if plan is None:
                self._stats["kept_float32"] += 1
                continue
            ins, outs = plan
            self._stats["converted"] += 1
            if node.name:
                self._converted_names.append(node.name)
            for index in ins:
                value = node.inputs[index]
                if value is None or value in sixteen:
                    continue
                if value not in converted:
                    converted[value] = self._to_16(graph, value, node)
                node.replace_input_with(index, converted[value])
            self._retype_attributes(node, outs)
            for index in outs:
                out = node.outputs[index]
                out.type = ir.TensorType(target)
                sixteen.add(out)
                float_readers = [(u, i) for u, i in out.uses() if _needs_float(plans, u, i)]
                if float_readers or (out.is_graph_output() and keep_io):
                    cast = self._cast(graph, out, FLOAT, after=node)
                    for user, i in float_readers:
                        user.replace_input_with(i, cast)
                    if out.is_graph_output() and keep_io:
                        name = out.name
                        out.name = unique_name(self._names, f"{name}_fp16")
                        cast.name = name
                        graph.outputs[list(graph.outputs).index(out)] = cast
        for value in converted:
            drop_if_unused(graph, value)

    def _retype_attributes(self, node: ir.Node, outs: set[int]) -> None:
        """Attributes that fix an output's type follow the output to 16 bits."""
        if 0 not in outs:
            return
        if node.op_type == "Cast":
            node.attributes["to"] = ir.AttrInt64("to", self._target.value)
        elif node.op_type == "EyeLike" and "dtype" in node.attributes:
            node.attributes["dtype"] = ir.AttrInt64("dtype", self._target.value)
        elif node.op_type in ("Constant", "ConstantOfShape"):
            attr = node.attributes.get("value")
            if attr is not None:
                array = attr.as_tensor().numpy().astype(np.float32)
            elif node.op_type == "ConstantOfShape":
                array = np.zeros((1,), np.float32)  # the default value is float32 zero
            else:
                return
            node.attributes["value"] = ir.AttrTensor("value", self._tensor(array))

    def _to_16(self, graph: ir.Graph, value: ir.Value, reader: ir.Node) -> ir.Value:
        array = constant_array(value)
        if array is not None and array.dtype == np.float32 and not value.is_graph_input():
            name = unique_name(self._names, f"{value.name or 'const'}_fp16")
            tensor = self._tensor(array, name)
            new = ir.Value(name=name, type=ir.TensorType(self._target), shape=value.shape,
                           const_value=tensor)  # fmt: skip
            graph.register_initializer(new)
            return new
        producer = value.producer()
        anchor = producer if producer is not None and producer.graph is graph else None
        if anchor is not None:
            return self._cast(graph, value, self._target, after=anchor)
        return self._cast(graph, value, self._target, before=reader)

    def _cast(self, graph, value, to, *, after=None, before=None) -> ir.Value:
        cast = ir.node("Cast", [value], attributes={"to": to.value})
        out = cast.outputs[0]
        out.name = unique_name(
            self._names, f"{value.name or 'value'}_{'fp32' if to == FLOAT else 'fp16'}"
        )
        out.type, out.shape = ir.TensorType(to), value.shape
        if after is not None:
            graph.insert_after(after, cast)
        else:
            graph.insert_before(before, cast)
        self._stats["casts"] += 1
        return out

    def _tensor(self, array: np.ndarray, name: str | None = None) -> ir.Tensor:
        if self._target == ir.DataType.FLOAT16:
            limit = float(np.finfo(np.float16).max)
            clipped = np.clip(array, -limit, limit)
            # nonzero values below the smallest subnormal (a LayerNorm's epsilon of 1e-12)
            # keep their sign at it rather than flush to 0: x + 0 is not what was exported,
            # and a second squeeze would simplify the Add away
            tiny = float(np.finfo(np.float16).smallest_subnormal)
            flushed = (clipped != 0) & (np.abs(clipped) < tiny / 2)
            clipped = np.where(flushed, np.copysign(tiny, clipped), clipped)
            self._stats["clamped_weights"] += int(np.count_nonzero(clipped != array))
            return ir.tensor(np.asarray(clipped, np.float32).astype(np.float16), name=name)
        import ml_dtypes

        return ir.tensor(array.astype(ml_dtypes.bfloat16), dtype=ir.DataType.BFLOAT16, name=name)


def _beyond_fp16(value: ir.Value | None) -> bool:
    array = constant_array(value)
    if array is None or array.dtype != np.float32 or not array.size:
        return False
    return float(np.abs(array).max()) > float(np.finfo(np.float16).max)


def _needs_float(plans, user: ir.Node, index: int) -> bool:
    """Does ``user`` read its input ``index`` as float32 (a kept node, or a slot whose type is
    not the converted variable, like Resize's scales)?"""
    plan = plans.get(user)
    return plan is None or index not in plan[0]
