"""merge-matmuls: parallel MatMuls (+ bias Adds) on one input become one MatMul and a Split."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxsqueeze.passes.merge_matmuls import MergeMatmulsPass

from conftest import parse_with, run_ort

RNG = np.random.default_rng(7)

#: Q/K/V-like: three projections of one input, each with its bias; v is also a graph output.
QKV = """
<ir_version: 8, opset_import: ["" : {opset}]>
g (float[2, 5, 16] x) => (float[2, 5, 8] q, float[2, 5, 8] k, float[2, 5, 4] v, float[2, 5, 8] s)
{{
    qm = MatMul (x, wq)
    q = Add (qm, bq)
    km = MatMul (x, wk)
    k = Add (bk, km)
    vm = MatMul (x, wv)
    v = Add (vm, bv)
    s = Mul (q, k)
}}
"""

#: No biases; one product is a graph output and also read by a Relu.
PLAIN = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[3, 16] x) => (float[3, 8] a, float[3, 8] r, float[3, 6] b)
{
    a = MatMul (x, wa)
    r = Relu (a)
    b = MatMul (x, wb)
}
"""

#: Left alone: a weight shared with another reader, a group mixing bias and no bias, a lone
#: MatMul on another input.
LOOKALIKES = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[3, 16] x, float[3, 16] y) => (float[3, 8] a, float[3, 8] b, float[3, 8] c, float[3, 8] d)
{
    a = MatMul (x, w1)
    b = MatMul (y, w1)
    pm = MatMul (y, w2)
    c = Add (pm, b2)
    d = MatMul (y, w3)
}
"""


def _model(text: str, shapes: dict[str, tuple[int, ...]]) -> onnx.ModelProto:
    arrays = {n: RNG.standard_normal(shape).astype(np.float32) for n, shape in shapes.items()}
    return parse_with(text, arrays)


def _apply(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    model = ir.serde.deserialize_model(proto)
    stats = MergeMatmulsPass()(model).stats
    out = ir.serde.serialize_model(model)
    onnx.checker.check_model(out)
    return out, stats


def _identical(a: onnx.ModelProto, b: onnx.ModelProto, feeds: dict) -> None:
    """Same outputs, same names, bit for bit (each element is the same dot product)."""
    assert [o.name for o in a.graph.output] == [o.name for o in b.graph.output]
    for x, y in zip(run_ort(a, feeds), run_ort(b, feeds), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("opset", [11, 13])
def test_projections_of_one_input_become_one_matmul_add_and_split(opset):
    shapes = {"wq": (16, 8), "wk": (16, 8), "wv": (16, 4), "bq": (8,), "bk": (8,), "bv": (4,)}
    proto = _model(QKV.format(opset=opset), shapes)
    out, stats = _apply(proto)
    assert stats["groups_merged"] == 1 and stats["nodes_removed"] == 3
    ops = collections.Counter(n.op_type for n in out.graph.node)
    assert ops == {"MatMul": 1, "Add": 1, "Split": 1, "Mul": 1}
    split = next(n for n in out.graph.node if n.op_type == "Split")
    assert list(split.output) == ["q", "k", "v"]
    assert (len(split.input) == 2) == (opset >= 13)  # sizes as input, else an attribute
    assert not {"wq", "wk", "wv", "bq", "bk", "bv"} & {i.name for i in out.graph.initializer}
    _identical(proto, out, {"x": RNG.standard_normal((2, 5, 16)).astype(np.float32)})


def test_products_without_bias_merge_and_keep_their_readers_and_output_names():
    proto = _model(PLAIN, {"wa": (16, 8), "wb": (16, 6)})
    out, stats = _apply(proto)
    assert stats["groups_merged"] == 1
    ops = collections.Counter(n.op_type for n in out.graph.node)
    assert ops == {"MatMul": 1, "Split": 1, "Relu": 1}
    _identical(proto, out, {"x": RNG.standard_normal((3, 16)).astype(np.float32)})


def test_shared_weights_mixed_bias_groups_and_lone_matmuls_stay():
    proto = _model(LOOKALIKES, {"w1": (16, 8), "w2": (16, 8), "w3": (16, 8), "b2": (8,)})
    out, stats = _apply(proto)
    assert stats["groups_merged"] == 0
    assert [n.op_type for n in out.graph.node] == [n.op_type for n in proto.graph.node]


def test_a_bias_other_nodes_read_still_counts_as_the_projections_bias():
    """Equal biases (zeros) that a cleanup merged into one initializer used to count as no
    bias: a Q/K/V group whose K has none stayed apart on the first squeeze and, once the
    cleanup had merged Q's and V's zero biases, merged on the second (Whisper's encoder). A
    shared bias is a bias: both squeezes see the same group."""
    shapes = {"wq": (16, 8), "wk": (16, 8), "wv": (16, 8), "b": (8,)}
    shared = QKV.format(opset=13).replace("bq", "b").replace("bk", "b").replace("bv", "b")
    proto = _model(shared.replace("float[2, 5, 4] v", "float[2, 5, 8] v"), shapes)
    out, stats = _apply(proto)
    assert stats["groups_merged"] == 1
    assert collections.Counter(n.op_type for n in out.graph.node)["Add"] == 1
    _identical(proto, out, {"x": RNG.standard_normal((2, 5, 16)).astype(np.float32)})
    mixed = shared.replace("k = Add (b, km)", "k = Identity (km)").replace(
        "s = Mul (q, k)", "s = Mul (q, b)"
    )
    proto = _model(mixed.replace("float[2, 5, 4] v", "float[2, 5, 8] v"), shapes)
    out, stats = _apply(proto)
    assert stats["groups_merged"] == 0  # K without a bias: the group mixes, shared bias or not
