"""What a model file holds, read without its weights: ops, parameters by dtype and by op,
opsets, inputs and outputs with their dynamic dims, subgraphs, external data, and how far it is
quantized already. ``onnxsqueeze inspect`` prints it; a > 2 GB model's external data is only
stat()ed, never read (sizes come from the tensors' dims)."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxsqueeze.core.io import read_model_file

#: Ops that compute in integers or read packed low-bit weights: the model is quantized.
INTEGER_OPS = frozenset(
    {
        "MatMulInteger",
        "ConvInteger",
        "QLinearConv",
        "QLinearMatMul",
        "QLinearAdd",
        "QLinearMul",
        "QGemm",
        "DynamicQuantizeLinear",
        "DynamicQuantizeMatMul",
        "DynamicQuantizeLSTM",
        "MatMulIntegerToFloat",
        "MatMulNBits",
        "GatherBlockQuantized",
    }
)
_BITS = {
    onnx.TensorProto.INT4: 4,
    onnx.TensorProto.UINT4: 4,
    onnx.TensorProto.STRING: 0,
}


@dataclasses.dataclass
class Inventory:
    path: str
    file_bytes: int
    external_files: dict[str, int]  # file name -> bytes on disk
    ir_version: int
    producer: str
    opsets: dict[str, int]
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    ops: dict[str, int]  # "domain:Op" ("Op" for the default domain) -> count, subgraphs too
    nodes: int
    subgraphs: list[dict[str, Any]]
    functions: list[str]
    params_by_dtype: dict[str, dict[str, int]]  # dtype -> {"tensors", "elements", "bytes"}
    params_by_op: dict[str, int]  # consuming op -> bytes
    quantization: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def total_bytes(self) -> int:
        return self.file_bytes + sum(self.external_files.values())


def inventory(path: str | Path) -> Inventory:
    """The inventory of the model file at ``path`` (its weights left unread)."""
    path = Path(path)
    proto = read_model_file(path)
    graphs = list(graphs_with_place(proto.graph, "main"))
    ops: Counter = Counter()
    subgraphs = []
    for where, graph in graphs:
        for node in graph.node:
            ops[
                node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}:{node.op_type}"
            ] += 1
        if where != "main":
            subgraphs.append({"where": where, "nodes": len(graph.node)})
    for function in proto.functions:
        for node in function.node:
            ops[node.op_type] += 1
    tensors = list(_tensors(graphs))
    by_dtype: dict[str, dict[str, int]] = {}
    external: dict[str, int] = {}
    for tensor in tensors:
        name = onnx.TensorProto.DataType.Name(tensor.data_type).lower()
        entry = by_dtype.setdefault(name, {"tensors": 0, "elements": 0, "bytes": 0})
        elements = math.prod(tensor.dims)
        entry["tensors"] += 1
        entry["elements"] += elements
        entry["bytes"] += _nbytes(tensor, elements)
        for item in tensor.external_data:
            if item.key == "location" and item.value not in external:
                target = path.parent / item.value
                external[item.value] = target.stat().st_size if target.is_file() else 0
    return Inventory(
        path=str(path),
        file_bytes=path.stat().st_size,
        external_files=external,
        ir_version=proto.ir_version,
        producer=" ".join(p for p in (proto.producer_name, proto.producer_version) if p),
        opsets={o.domain or "ai.onnx": o.version for o in proto.opset_import},
        inputs=_values(proto.graph.input, {i.name for i in proto.graph.initializer}),
        outputs=_values(proto.graph.output, set()),
        ops=dict(ops.most_common()),
        nodes=sum(ops.values()),
        subgraphs=subgraphs,
        functions=[f"{f.domain}:{f.name}" if f.domain else f.name for f in proto.functions],
        params_by_dtype=dict(sorted(by_dtype.items(), key=lambda kv: -kv[1]["bytes"])),
        params_by_op=_bytes_by_consumer(graphs),
        quantization=_quantization(graphs, ops, by_dtype),
    )


def graphs_with_place(
    graph: onnx.GraphProto, where: str = "main"
) -> Iterator[tuple[str, onnx.GraphProto]]:
    """``graph`` and every If/Loop/Scan body in it, each with where it sits."""
    yield where, graph
    for node in graph.node:
        for attr in node.attribute:
            label = f"{node.op_type} '{node.name or node.output[0]}'.{attr.name}"
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from graphs_with_place(attr.g, label)
            for index, sub in enumerate(attr.graphs):
                yield from graphs_with_place(sub, f"{label}[{index}]")


def _tensors(graphs: list[tuple[str, onnx.GraphProto]]) -> Iterator[onnx.TensorProto]:
    for _, graph in graphs:
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield sparse.values
        for node in graph.node:
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.type == onnx.AttributeProto.TENSOR:
                        yield attr.t


def _nbytes(tensor: onnx.TensorProto, elements: int) -> int:
    bits = _BITS.get(tensor.data_type)
    if bits is None:
        try:
            itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
        except (KeyError, TypeError, ValueError):
            itemsize = 1
        return elements * itemsize
    if bits == 0:  # strings: what is stored
        return sum(len(s) for s in tensor.string_data)
    return (elements * bits + 7) // 8


def _values(values: Any, skip: set[str]) -> list[dict[str, Any]]:
    out = []
    for value in values:
        if value.name in skip:
            continue
        kind = value.type.WhichOneof("value")
        entry: dict[str, Any] = {"name": value.name, "type": kind or "unknown"}
        if kind == "tensor_type":
            tensor = value.type.tensor_type
            entry["type"] = onnx.TensorProto.DataType.Name(tensor.elem_type).lower()
            if tensor.HasField("shape"):
                entry["shape"] = [
                    d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                    for d in tensor.shape.dim
                ]
            else:
                entry["shape"] = None
            entry["dynamic"] = [d for d in entry["shape"] or [] if isinstance(d, str)]
        out.append(entry)
    return out


def _bytes_by_consumer(graphs: list[tuple[str, onnx.GraphProto]]) -> dict[str, int]:
    """Weight bytes by the op that reads them (a DequantizeLinear's weights by the op that
    reads its output: the op they are for)."""
    sizes: dict[str, int] = {}
    for _, graph in graphs:
        for tensor in graph.initializer:
            sizes[tensor.name] = _nbytes(tensor, math.prod(tensor.dims))
        for node in graph.node:
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.type == onnx.AttributeProto.TENSOR:
                        sizes[node.output[0]] = _nbytes(attr.t, math.prod(attr.t.dims))
    readers: dict[str, list[str]] = {}
    for _, graph in graphs:
        for node in graph.node:
            for name in node.input:
                readers.setdefault(name, []).append(node.op_type)
            if node.op_type in ("DequantizeLinear", "Cast", "Transpose") and node.input:
                readers.setdefault(node.input[0] + "#via", []).append(node.output[0])
    counts: Counter = Counter()
    for name, size in sizes.items():
        ops = readers.get(name, [])
        op = ops[0] if ops else "(unused)"
        if op in ("DequantizeLinear", "Cast", "Transpose"):
            via = readers.get(name + "#via", [])
            op = next(iter(readers.get(via[0], [])), op) if via else op
        counts[op] += size
    return dict(counts.most_common())


def _quantization(
    graphs: list[tuple[str, onnx.GraphProto]], ops: Counter, by_dtype: dict[str, dict[str, int]]
) -> dict[str, Any]:
    producers = {}
    for _, graph in graphs:
        for node in graph.node:
            for output in node.output:
                producers[output] = node.op_type
    pairs = sum(
        1
        for _, graph in graphs
        for node in graph.node
        if node.op_type == "DequantizeLinear" and producers.get(node.input[0]) == "QuantizeLinear"
    )
    integer = {op: n for op, n in ops.items() if op.split(":")[-1] in INTEGER_OPS}
    low_bit = sum(by_dtype.get(t, {}).get("bytes", 0) for t in ("int8", "uint8", "int4", "uint4"))
    total = sum(v["bytes"] for v in by_dtype.values()) or 1
    state = "float"
    if pairs or integer:
        activations = pairs or "DynamicQuantizeLinear" in integer
        state = "quantized (activations)" if activations else "quantized (weights)"
    elif ops.get("DequantizeLinear") or low_bit / total > 0.25:
        # int8 weights that a Cast/Mul or a DequantizeLinear turns back into float
        state = "quantized (weights)"
    return {
        "state": state,
        "qdq_pairs": pairs,
        "dequantize_nodes": ops.get("DequantizeLinear", 0),
        "integer_ops": integer,
        "low_bit_weight_share": round(low_bit / total, 4),
    }
