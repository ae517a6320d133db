"""fold-constants: structure (ONNX text) and numerics (onnxruntime) per case, plus guards."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

import onnxsqueeze
from onnxsqueeze.passes.fold_constants import FoldConstantsPass

from conftest import parse, run_ort


def _fold(text: str, **options) -> tuple[onnx.ModelProto, ir.Model, dict]:
    original = parse(text)
    model = ir.serde.deserialize_model(onnx.load_from_string(original.SerializeToString()))
    result = FoldConstantsPass(**options)(model)
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto)
    return original, model, result.stats


def _ops(graph) -> list[str]:
    return [n.op_type for n in graph]


def test_folds_constant_chain_and_keeps_runtime_part():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 3] x) => (float[2, 3] y) <float[3] a = {1, 2, 3}, float[3] b = {4, 5, 6}, int64[2] s = {1, 3}>
    {
      c = Add(a, b)
      d = Reshape(c, s)
      e = Sqrt(d)
      y = Mul(x, e)
    }
    """
    original, model, stats = _fold(text)
    assert _ops(model.graph) == ["Mul"]
    assert stats["values_folded"] == 1  # only the last constant (Sqrt) is still used
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    np.testing.assert_array_equal(
        run_ort(ir.serde.serialize_model(model), {"x": x})[0], run_ort(original, {"x": x})[0]
    )


def test_inflating_ops_are_not_folded():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1000, 1000] x) => (float[1000, 1000] y) <int64[2] shape = {1000, 1000}>
    {
      big = ConstantOfShape <value = float[1] {1.5}> (shape)
      y = Add(x, big)
    }
    """
    _, model, stats = _fold(text)
    assert _ops(model.graph) == ["ConstantOfShape", "Add"]
    assert stats["skipped_too_large"] == 1
    _, model, stats = _fold(text, max_eval_elements=1000)  # not even evaluated
    assert _ops(model.graph) == ["ConstantOfShape", "Add"] and stats["skipped_too_large"] == 0
    _, model, _ = _fold(text, max_growth_bytes=8_000_000)  # the user allows it
    assert _ops(model.graph) == ["Add"]


def test_a_fold_that_would_grow_the_file_is_left_alone():
    """ConstantOfShape zeros of 512 B from a 16 B shape: materialised, they would add bytes a
    lossless pass must not add; a small integer tensor (a shape a Reshape reads) still folds."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1, 128] x, float[2, 64] z) => (float[1, 128] y, float[128] r)
    <int64[2] shape = {1, 128}, int64[1] flat = {128}, int64[1] one = {1}>
    {
      zeros = ConstantOfShape <value = float[1] {0.5}> (shape)
      y = Add(x, zeros)
      target = Mul(flat, one)
      r = Reshape(z, target)
    }
    """
    original, model, stats = _fold(text)
    assert _ops(model.graph) == ["ConstantOfShape", "Add", "Reshape"]
    assert stats["values_folded"] == 1 and stats["skipped_too_large"] == 1
    feeds = {"x": np.ones((1, 128), np.float32), "z": np.ones((2, 64), np.float32)}
    proto = ir.serde.serialize_model(model)
    for a, b in zip(run_ort(proto, feeds), run_ort(original, feeds), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_lossless_run_never_returns_a_larger_model(tmp_path, monkeypatch):
    """Whatever a lossless pass does, the pipeline keeps the smaller of what it was given
    and what the passes made (here a fold allowed to grow the file by any amount)."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[64, 64] x) => (float[64, 64] y) <int64[2] shape = {64, 64}>
    {
      big = ConstantOfShape <value = float[1] {1.5}> (shape)
      y = Add(x, big)
    }
    """
    path = tmp_path / "m.onnx"
    onnx.save(parse(text), path)
    options = [("fold-constants", {"max_growth_bytes": 10**9})]
    report = onnxsqueeze.squeeze_file(path, tmp_path / "o.onnx", options)
    assert (tmp_path / "o.onnx").stat().st_size <= path.stat().st_size
    assert any("grow the model" in w for w in report.warnings)
    assert report.passes[0].status == "rolled-back"


def test_qdq_and_random_ops_are_never_folded():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[4] x) => (float[4] y, float[4] r)
    <float[4] w = {0.1, 0.2, 0.3, 0.4}, float scale = {0.01}, uint8 zp = {128}>
    {
      q = QuantizeLinear(w, scale, zp)
      dq = DequantizeLinear(q, scale, zp)
      y = Add(x, dq)
      r = RandomNormalLike(w)
    }
    """
    _, model, stats = _fold(text)
    assert _ops(model.graph) == ["QuantizeLinear", "DequantizeLinear", "Add", "RandomNormalLike"]
    assert stats["values_folded"] == 0


def test_folds_inside_if_bodies_with_outer_scope_constants():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (bool cond, float[2] x) => (float[2] y) <float[2] k = {2, 3}>
    {
      y = If (cond) <
        then_branch = t () => (float[2] t_out) { kk = Mul(k, k)  t_out = Add(x, kk) },
        else_branch = e () => (float[2] e_out) { e_out = Sub(x, k) }
      >
    }
    """
    original, model, stats = _fold(text)
    then_graph = next(iter(model.graph)).attributes["then_branch"].as_graph()
    assert _ops(then_graph) == ["Add"] and stats["values_folded"] == 1
    proto = ir.serde.serialize_model(model)
    for cond in (True, False):
        feeds = {"cond": np.array(cond), "x": np.array([1.0, -1.0], np.float32)}
        np.testing.assert_array_equal(run_ort(proto, feeds)[0], run_ort(original, feeds)[0])


def test_folds_in_functions_and_old_ir_as_constant_nodes():
    text = """
    <ir_version: 8, opset_import: ["" : 17, "local" : 1]>
    g (float[2] x) => (float[2] y) { y = local.AddTwo(x) }
    <domain: "local", opset_import: ["" : 17]>
    AddTwo (a) => (b) {
      one = Constant <value = float {1.0}> ()
      two = Add(one, one)
      b = Add(a, two)
    }
    """
    original, model, stats = _fold(text)
    body = next(iter(model.functions.values()))
    assert _ops(body) == ["Constant", "Add"] and stats["values_folded"] == 1
    x = np.array([1.0, 2.0], np.float32)
    np.testing.assert_array_equal(run_ort(ir.serde.serialize_model(model), {"x": x})[0], x + 2)
    old = """
    <ir_version: 3, opset_import: ["" : 8]>
    g (float[2] x) => (float[2] y) {
      a = Constant <value = float[2] {1, 2}> ()
      b = Mul(a, a)
      y = Add(x, b)
    }
    """
    _, model, _ = _fold(old)
    assert _ops(model.graph) == ["Constant", "Add"] and not model.graph.initializers


def test_graph_output_values_are_kept_and_pipeline_verifies():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2] x) => (float[2] y, float[2] c) <float[2] a = {1, 2}>
    { c = Neg(a)  y = Add(x, c) }
    """
    _, model, _ = _fold(text)
    assert "Neg" in _ops(model.graph)  # a graph output keeps its producer
    _, report = onnxsqueeze.squeeze(parse(text), passes=["fold-constants"])
    assert report.verification_status == "passed"


def test_folds_inside_an_if_nested_in_a_function_with_constant_nodes():
    """Graphs inside functions cannot see model initializers: folded values there must be
    Constant nodes, even for results large enough to be shared elsewhere."""
    values = ", ".join(["1.0"] * 600)
    text = f"""
    <ir_version: 8, opset_import: ["" : 17, "local" : 1]>
    g (bool c, float[600] x) => (float[600] y) {{ y = local.Pick(c, x) }}
    <domain: "local", opset_import: ["" : 17]>
    Pick (c, x) => (y) {{
      y = If (c) <
        then_branch = t () => (float[600] t_out) {{
          w = Constant <value = float[600] {{{values}}}> ()
          w2 = Add(w, w)
          t_out = Mul(x, w2)
        }},
        else_branch = e () => (float[600] e_out) {{ e_out = Neg(x) }}
      >
    }}
    """
    original, model, stats = _fold(text)
    assert stats["values_folded"] == 1 and not model.graph.initializers
    proto = ir.serde.serialize_model(model)
    x = np.linspace(-1, 1, 600).astype(np.float32)
    for c in (True, False):
        feeds = {"c": np.array(c), "x": x}
        np.testing.assert_array_equal(run_ort(proto, feeds)[0], run_ort(original, feeds)[0])


def test_castlike_of_a_constant_to_a_runtime_value_folds_like_a_cast():
    # what PyTorch's dynamo writes for a bias-free Conv: Expand(CastLike(0, x), [C])
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1, 2, 4, 4] x) => (float[1, 3, 4, 4] y) {
        zero = Constant <value = int64 {0}> ()
        shape = Constant <value = int64[1] {3}> ()
        z = CastLike (zero, x)
        b = Expand (z, shape)
        w = Constant <value = float[3, 2, 1, 1] {1, 2, 3, 4, 5, 6}> ()
        y = Conv (x, w, b)
    }"""
    original, model, _ = _fold(text)
    assert "CastLike" not in _ops(model.graph) and "Expand" not in _ops(model.graph)
    bias = next(n for n in model.graph if n.op_type == "Conv").inputs[2]
    assert bias.const_value is not None and bias.dtype == ir.DataType.FLOAT
    x = np.random.default_rng(0).standard_normal((1, 2, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(
        run_ort(ir.serde.serialize_model(model), {"x": x})[0],
        run_ort(original, {"x": x})[0],
        rtol=1e-6,
    )
