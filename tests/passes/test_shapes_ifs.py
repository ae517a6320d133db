"""fold-shapes, inline-ifs, fuse-gemm and Slice elimination: structure + numerics."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxsqueeze.core.shape_values import ShapePropagator
from onnxsqueeze.passes.fold_shapes import FoldShapesPass
from onnxsqueeze.passes.fuse_gemm import FuseGemmPass
from onnxsqueeze.passes.inline_ifs import InlineIfsPass
from onnxsqueeze.passes.simplify_graph import SimplifyGraphPass

from conftest import parse, run_ort


def _apply(pass_cls, text: str):
    original = parse(text)
    model = ir.serde.deserialize_model(onnx.load_from_string(original.SerializeToString()))
    stats = pass_cls()(model).stats
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto)
    return original, proto, model, stats


def _same(original, proto, feeds, rtol=0.0):
    for a, b in zip(run_ort(original, feeds), run_ort(proto, feeds), strict=True):
        np.testing.assert_allclose(b, a, rtol=rtol, atol=rtol * float(np.abs(a).max()))


TRANSFORMER_RESHAPE = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[batch, seq, 384] x) => (float[batch, seq, 12, 32] y)
<int64[1] zero = {0}, int64[1] one = {1}, int64[1] heads = {12}, int64[1] dim = {32}, int64[1] two = {2}>
{
  s = Shape(x)
  b = Gather <axis = 0> (s, zero)
  q = Gather <axis = 0> (s, one)
  hidden = Gather <axis = 0> (s, two)
  target = Concat <axis = 0> (b, q, heads, dim)
  y = Reshape(x, target)
}
"""


def test_reshape_target_becomes_constant_with_copied_symbolic_dims():
    original, proto, model, stats = _apply(FoldShapesPass, TRANSFORMER_RESHAPE)
    assert [n.op_type for n in model.graph] == ["Reshape"]
    assert stats["reshape_targets_folded"] == 1
    target = next(iter(model.graph)).inputs[1].const_value.numpy().tolist()
    assert target == [0, 0, 12, 32]
    for shape in ((1, 5, 384), (3, 7, 384)):  # dynamic dims still work
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        _same(original, proto, {"x": x})


PADDLE_RESHAPE = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[batch, len, 120] h, float[batch, n, 360] x) => (float[batch, len, 3, 8, 15] y)
<int64[1] zero = {0}, int64[1] one = {1}, int64[1] two = {2}, int64[1] three = {3},
 int64[1] eight = {8}, int64[1] fifteen = {15}>
{
  s = Shape(h)
  s32 = Cast <to = 6> (s)
  l32 = Slice(s32, one, two, zero, one)
  l = Cast <to = 7> (l32)
  target = Concat <axis = 0> (zero, l, three, eight, fifteen)
  y = Reshape(x, target)
}
"""


def test_reshape_target_keeps_a_literal_zero_and_infers_the_other_dim():
    """paddle2onnx's attention reshape: [0, len, 3, 8, 15] with len read from another
    tensor's shape through int32 Casts (so its symbol is not x's) becomes [0, -1, 3, 8, 15]."""
    original, proto, model, stats = _apply(FoldShapesPass, PADDLE_RESHAPE)
    assert [n.op_type for n in model.graph] == ["Reshape"]
    assert stats["reshape_targets_folded"] == 1
    target = next(iter(model.graph)).inputs[1].const_value.numpy().tolist()
    assert target == [0, -1, 3, 8, 15]
    rng = np.random.default_rng(0)
    for batch, length in ((1, 5), (2, 40)):
        feed = {
            "h": rng.standard_normal((batch, length, 120)).astype(np.float32),
            "x": rng.standard_normal((batch, length, 360)).astype(np.float32),
        }
        _same(original, proto, feed)


def test_static_dims_fold_and_symbolic_stay():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[batch, 8] x) => (int64[1] n, int64[1] b)
    <int64[1] zero = {0}, int64[1] one = {1}>
    { s = Shape(x)  n = Gather(s, one)  b = Gather(s, zero)  }
    """
    model = ir.serde.deserialize_model(parse(text))
    from onnxsqueeze.core.shapes import inferred_shapes

    propagator = ShapePropagator()
    with inferred_shapes(model):
        for node in model.graph:
            propagator.visit(node)
    values = {v.name: propagator.values[v].entries for v in (model.graph.outputs)}
    assert values == {"n": [8], "b": ["batch"]}


def test_constant_if_is_inlined_and_reaches_nested_ifs():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2] x) => (float[2] y) <bool t = {1}, bool f = {0}>
    {
      y = If (t) <
        then_branch = a () => (float[2] a_out) <float[2] k = {2, 3}> {
          a_out = If (f) <
            then_branch = c () => (float[2] c_out) { c_out = Neg(x) },
            else_branch = d () => (float[2] d_out) { d_out = Mul(x, k) }
          >
        },
        else_branch = b () => (float[2] b_out) { b_out = Abs(x) }
      >
    }
    """
    original, proto, model, stats = _apply(InlineIfsPass, text)
    assert [n.op_type for n in model.graph] == ["Mul"] and stats["ifs_inlined"] == 2
    assert "k" in model.graph.initializers and model.graph.outputs[0].name == "y"
    _same(original, proto, {"x": np.array([1.5, -2.0], np.float32)})


def test_runtime_condition_is_left_alone():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (bool c, float[2] x) => (float[2] y)
    { y = If (c) < then_branch = a () => (float[2] o) { o = Neg(x) }, else_branch = b () => (float[2] p) { p = Abs(x) } > }
    """
    _, _, model, stats = _apply(InlineIfsPass, text)
    assert stats["ifs_inlined"] == 0 and [n.op_type for n in model.graph] == ["If"]


@pytest.mark.parametrize(
    "starts, ends, removed",
    [
        ("{0}", "{9223372036854775807}", True),
        ("{0}", "{4}", True),  # ends at the known dim
        ("{0}", "{-1}", False),  # all but the last: a peer removed this and changed outputs
        ("{1}", "{9223372036854775807}", False),
    ],
)
def test_full_slice_only_is_removed(starts, ends, removed):
    text = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[3, 4] x) => (float[?, ?] y) <int64[1] s = {starts}, int64[1] e = {ends}, int64[1] ax = {{1}}>
    {{ t = Slice(x, s, e, ax)  y = Relu(t) }}
    """
    original, proto, model, _ = _apply(SimplifyGraphPass, text)
    assert ("Slice" not in [n.op_type for n in model.graph]) is removed
    _same(original, proto, {"x": np.arange(12, dtype=np.float32).reshape(3, 4)})


def test_matmul_add_becomes_gemm_only_for_2d_inputs():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 3] x, float[2, 2, 3] z) => (float[2, 4] y, float[2, 2, 4] w)
    <float[3, 4] m = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}, float[4] b = {0.5, -1, 2, 0}>
    { p = MatMul(x, m)  y = Add(p, b)  q = MatMul(z, m)  w = Add(b, q) }
    """
    original, proto, model, stats = _apply(FuseGemmPass, text)
    assert stats["gemms_fused"] == 1
    assert sorted(n.op_type for n in model.graph) == ["Add", "Gemm", "MatMul"]
    rng = np.random.default_rng(0)
    feeds = {
        "x": rng.standard_normal((2, 3)).astype(np.float32),
        "z": rng.standard_normal((2, 2, 3)).astype(np.float32),
    }
    _same(original, proto, feeds, rtol=1e-6)
