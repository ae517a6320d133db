"""Small graph helpers shared by passes: scopes to walk, what is constant, how to add one.

Passes rewrite through onnx_ir; these helpers only answer the questions every pass asks
(is this value a known constant? where do I put a new one?) so the answers agree.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx_ir as ir

GraphLike = ir.Graph | ir.Function

#: Ops whose result is not a function of their inputs, or that must survive as written.
NEVER_FOLD = frozenset(
    {
        "RandomNormal",
        "RandomNormalLike",
        "RandomUniform",
        "RandomUniformLike",
        "Multinomial",
        "Bernoulli",
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "If",
        "Loop",
        "Scan",
        "SequenceConstruct",
        "SequenceEmpty",
        "Optional",
    }
)


def scopes(model: ir.Model) -> Iterator[GraphLike]:
    """The main graph, every subgraph (If/Loop/Scan bodies) and model-local functions."""
    yield from model.graphs()
    for function in model.functions.values():
        yield function
        for node in ir.traversal.RecursiveGraphIterator(function):
            for attr in node.attributes.values():
                if attr.is_ref():
                    continue
                if attr.type == ir.AttributeType.GRAPH:
                    yield from _subgraphs(attr.as_graph())
                elif attr.type == ir.AttributeType.GRAPHS:
                    for graph in attr.as_graphs():
                        yield from _subgraphs(graph)


def _subgraphs(graph: ir.Graph) -> Iterator[ir.Graph]:
    yield graph
    for node in graph:
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                yield from _subgraphs(attr.as_graph())
            elif attr.type == ir.AttributeType.GRAPHS:
                for sub in attr.as_graphs():
                    yield from _subgraphs(sub)


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's array if it is a fixed constant (initializer not overridable, or Constant)."""
    if value is None:
        return None
    if value.const_value is not None:
        if value.is_graph_input():
            return None  # an initializer listed as input can be overridden at run time
        if value.const_value.dtype == ir.DataType.STRING:
            return None
        try:
            return value.const_value.numpy()
        except Exception:
            return None
    producer = value.producer()
    if (
        producer is not None
        and producer.op_type == "Constant"
        and producer.domain in ("", "ai.onnx")
    ):
        return constant_node_array(producer)
    return None


def float_weight(value: ir.Value | None) -> np.ndarray | None:
    """A float32 or float16 constant as float32: an fp16 model's weights round the same way,
    and its dequantized weights are cast back to float16."""
    array = constant_array(value)
    if array is None or array.dtype not in (np.float32, np.float16):
        return None
    return array.astype(np.float32, copy=False)


def constant_node_array(node: ir.Node) -> np.ndarray | None:
    if len(node.attributes) != 1:
        return None
    name, attr = next(iter(node.attributes.items()))
    if attr.is_ref():
        return None
    try:
        if name == "value":
            tensor = attr.as_tensor()
            return None if tensor.dtype == ir.DataType.STRING else tensor.numpy()
        if name == "value_int":
            return np.array(attr.as_int(), dtype=np.int64)
        if name == "value_ints":
            return np.array(list(attr.as_ints()), dtype=np.int64)
        if name == "value_float":
            return np.array(attr.as_float(), dtype=np.float32)
        if name == "value_floats":
            return np.array(list(attr.as_floats()), dtype=np.float32)
    except Exception:
        return None
    return None


def is_constant(value: ir.Value | None) -> bool:
    """True for a fixed constant; False for runtime values. ``None`` (omitted input) counts."""
    if value is None:
        return True
    if value.const_value is not None:
        return not value.is_graph_input()
    producer = value.producer()
    return (
        producer is not None
        and producer.op_type == "Constant"
        and producer.domain in ("", "ai.onnx")
    )


def add_constant(
    model: ir.Model,
    scope: GraphLike,
    array: np.ndarray | ir.TensorProtocol,
    name: str,
    before: ir.Node,
) -> ir.Value:
    """A new constant value in ``scope``: an initializer where allowed, else a Constant node.

    Functions (and graphs nested in them) cannot hold or see model initializers, and IR < 4
    graphs need every initializer listed as an input (which would make it overridable), so
    those get a Constant node inserted before ``before`` instead.
    """
    if isinstance(array, np.ndarray):
        tensor = ir.tensor(array, name=name)
    else:  # a tensor made elsewhere (a lazy one, computed when the model is written)
        tensor = array
        tensor.name = name
    if in_main_tree(model, scope) and (model.ir_version or 0) >= 4:
        value = ir.Value(
            name=name, shape=tensor.shape, type=ir.TensorType(tensor.dtype), const_value=tensor
        )
        scope.register_initializer(value)
        return value
    node = ir.node("Constant", inputs=[], attributes={"value": tensor}, num_outputs=1)
    node.outputs[0].name = name
    node.outputs[0].type = ir.TensorType(tensor.dtype)
    node.outputs[0].shape = tensor.shape
    scope.insert_before(before, node)
    return node.outputs[0]


def in_main_tree(model: ir.Model, scope: GraphLike) -> bool:
    """Is ``scope`` the main graph or a subgraph of it (not part of a function)?"""
    return isinstance(scope, ir.Graph) and any(graph is scope for graph in model.graphs())


def unique_name(model_names: set[str], base: str) -> str:
    """A value name not yet used anywhere in the model (names are global across scopes)."""
    name = base or "const"
    index = 0
    while name in model_names:
        index += 1
        name = f"{base}_{index}"
    model_names.add(name)
    return name


def all_value_names(model: ir.Model) -> set[str]:
    names: set[str] = set()
    for scope in scopes(model):
        names.update(v.name for v in scope.inputs if v.name)
        if isinstance(scope, ir.Graph):
            names.update(scope.initializers)
        for node in scope:
            names.update(v.name for v in node.outputs if v.name)
    return names


def opset_version(model: ir.Model, domain: str = "") -> int:
    return model.opset_imports.get(domain, model.opset_imports.get("ai.onnx", 1))


def replace_value(old: ir.Value, new: ir.Value, *, take_name: bool = False) -> bool:
    """Make every reader of ``old`` read ``new``; False if that would change the interface.

    A graph output keeps its name (callers fetch outputs by name): ``new`` takes it over,
    which is only possible when ``new`` is a plain node output of the same graph.
    ``take_name``: ``new`` takes ``old``'s name anyway (a fusion, whose ``new`` now computes
    what ``old`` did: tools that match tensors by name, ``onnxsqueeze compare`` among them,
    must not find the fused value under the name of the partial one it was).
    """
    if not old.is_graph_output():
        old.replace_all_uses_with(new)
        producer = new.producer()
        if take_name and old.name and producer is not None and not new.is_graph_output():
            name = old.name
            old.name = f"{name}__replaced"
            new.name = name
        return True
    producer = new.producer()
    if (
        producer is None
        or new.is_graph_output()
        or new.is_graph_input()
        or producer.graph is None
        or producer.graph is not (old.producer().graph if old.producer() else None)
    ):
        return False
    name = old.name
    old.name = f"{name}__replaced"
    new.name = name
    if new.type is None:
        new.type = old.type
    if new.shape is None:
        new.shape = old.shape
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    return True


def read_elsewhere(value: ir.Value, node: ir.Node) -> bool:
    """Whether a node other than ``node`` reads ``value``: a shared weight's float copy
    would stay, so quantizing it for ``node`` alone saves nothing."""
    return any(user is not node for user, _ in value.uses())


def drop_if_unused(scope: GraphLike, value: ir.Value) -> None:
    """Remove a constant nothing reads any more (a replaced float weight), so the file shrinks."""
    if value.uses() or value.is_graph_output() or value.is_graph_input():
        return
    # A weight read inside a subgraph may be an initializer of an enclosing graph.
    owner = value.graph if value.graph is not None else scope
    if isinstance(owner, ir.Graph) and owner.initializers.get(value.name or "") is value:
        del owner.initializers[value.name]
        return
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant":
        producer.graph.remove(producer, safe=True)


def name_nodes(model: ir.Model) -> None:
    """Every node gets a name (exclusions and the report refer to nodes by name)."""
    taken = {n.name for scope in scopes(model) for n in scope if n.name}
    count = 0
    for scope in scopes(model):
        for node in scope:
            if not node.name:
                while f"{node.op_type}_{count}" in taken:
                    count += 1
                node.name = f"{node.op_type}_{count}"
                taken.add(node.name)


def weight_as_kn(node: ir.Node, weight: np.ndarray) -> np.ndarray | None:
    """A MatMul/Gemm/Conv (group 1) weight as X @ W multiplies it: K input rows by N
    outputs (a Gemm weight with transB transposed, a Conv filter [N, C, k...] as its
    C k... patch rows); None for other layouts. A view, not a copy."""
    if node.op_type == "Conv":
        group = node.attributes.get("group")
        if weight.ndim < 3 or (group is not None and group.as_int() != 1):
            return None
        return weight.reshape(weight.shape[0], -1).T
    if weight.ndim != 2 or node.op_type not in ("MatMul", "Gemm"):
        return None
    trans_b = node.attributes.get("transB")
    return (
        weight.T if node.op_type == "Gemm" and trans_b is not None and trans_b.as_int() else weight
    )


def weight_from_kn(node: ir.Node, kn: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``weight_as_kn``'s inverse: a K x N array back in the layout ``node`` reads."""
    if node.op_type == "Conv":
        return np.ascontiguousarray(kn.T).reshape(shape)
    trans_b = node.attributes.get("transB")
    if node.op_type == "Gemm" and trans_b is not None and trans_b.as_int():
        return np.ascontiguousarray(kn.T)
    return kn
