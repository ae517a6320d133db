"""cleanup pass: structure (inline ONNX text) and numerics (onnxruntime) per rewrite."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

import onnxsqueeze
from onnxsqueeze.passes.cleanup import CleanupPass, dedup_initializers, tensor_digest

from conftest import parse, run_ort

MESSY = """
<ir_version: 8, opset_import: ["" : 17, "com.unused" : 1]>
messy (float[2, 3] x) => (float[2, 3] y)
<float[3] a = {1, 2, 3}, float[3] a_copy = {1, 2, 3}, float[3] unused = {7, 7, 7}>
{
  c = Constant <value = float[3] {0.5, 0.5, 0.5}> ()
  dead = Mul(x, unused)
  t = Add(x, a)
  u = Add(t, a_copy)
  y = Mul(u, c)
}
"""


def _x():
    return np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)


def test_cleanup_structure_and_numerics():
    original = parse(MESSY)
    model = ir.serde.deserialize_model(original)
    result = CleanupPass()(model)
    assert result.modified
    ops = [n.op_type for n in model.graph]
    assert ops == ["Add", "Add", "Mul"]  # dead Mul gone, Constant lifted
    assert set(model.graph.initializers) == {"a", "c"}  # duplicate merged, unused removed
    assert "com.unused" not in model.opset_imports
    stats = result.stats
    assert stats["constants_lifted"] == 1
    assert stats["duplicates_merged"] == 1
    assert stats["opsets_removed"] == 1
    assert stats["nodes_removed"] == 2
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto)
    np.testing.assert_array_equal(run_ort(proto, {"x": _x()})[0], run_ort(original, {"x": _x()})[0])


SUBGRAPH = """
<ir_version: 8, opset_import: ["" : 17]>
branchy (bool cond, float[2] x) => (float[2] y)
{
  y = If (cond) <
    then_branch = then_g () => (float[2] t_out) <float[2] t_unused = {9, 9}> {
      k = Constant <value = float[2] {2, 3}> ()
      t_out = Mul(x, k)
    },
    else_branch = else_g () => (float[2] e_out) {
      e_dead = Constant <value = float[2] {1, 1}> ()
      e_out = Neg(x)
    }
  >
}
"""


def test_cleanup_inside_if_bodies():
    original = parse(SUBGRAPH)
    model = ir.serde.deserialize_model(original)
    CleanupPass()(model)
    then_graph = next(iter(model.graph)).attributes["then_branch"].as_graph()
    else_graph = next(iter(model.graph)).attributes["else_branch"].as_graph()
    assert [n.op_type for n in then_graph] == ["Mul"]
    assert list(then_graph.initializers) == ["k"]  # lifted into the body; unused one dropped
    assert [n.op_type for n in else_graph] == ["Neg"]
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto)
    for cond in (True, False):
        feeds = {"cond": np.array(cond), "x": np.array([1.5, -2.0], np.float32)}
        np.testing.assert_array_equal(run_ort(proto, feeds)[0], run_ort(original, feeds)[0])


def test_old_ir_keeps_constants_as_nodes():
    text = (
        MESSY.replace("ir_version: 8", "ir_version: 3")
        .replace('"" : 17', '"" : 8')
        .replace(', "com.unused" : 1', "")
    )
    model = ir.serde.deserialize_model(onnx.parser.parse_model(text))
    result = CleanupPass()(model)
    assert result.stats["constants_lifted"] == 0
    assert "IR version 3" in result.stats["lift_skipped"]
    assert "Constant" in [n.op_type for n in model.graph]


def test_constant_that_is_a_graph_output_stays():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1] x) => (float[1] y, float[2] k) { k = Constant <value = float[2] {1, 2}> () y = Identity(x) }
    """
    model = ir.serde.deserialize_model(parse(text))
    CleanupPass()(model)
    assert [n.op_type for n in model.graph] == ["Constant", "Identity"]


def test_dedup_only_hashes_same_shape_groups_and_handles_strings():
    graph = ir.Graph([], [], nodes=[], name="g")
    for name, data in (("s1", ["a", "b"]), ("s2", ["a", "b"]), ("s3", ["ab", ""])):
        tensor = ir.StringTensor(np.array([d.encode() for d in data], dtype=object), name=name)
        graph.register_initializer(ir.Value(name=name, const_value=tensor))
    assert dedup_initializers(graph) == 1  # s2 merged into s1; s3 differs
    assert set(graph.initializers) == {"s1", "s3"}
    s1 = graph.initializers["s1"].const_value
    s3 = graph.initializers["s3"].const_value
    assert tensor_digest(s1) != tensor_digest(s3)  # length-prefixed: "a","b" != "ab",""


def test_dedup_tells_apart_tensors_alike_at_start_middle_and_end():
    """Same-shape weights are first compared on samples; a difference elsewhere still keeps
    them apart, and equal ones still merge."""
    graph = ir.Graph([], [], nodes=[], name="g")
    base = np.arange(4096, dtype=np.float32)
    other = base.copy()
    other[1000] = -1.0  # outside the sampled bytes
    for name, data in (("a", base), ("b", other), ("c", base.copy()), ("d", base[::-1].copy())):
        graph.register_initializer(ir.Value(name=name, const_value=ir.tensor(data, name=name)))
    assert dedup_initializers(graph) == 1  # c merged into a; b and d differ
    assert set(graph.initializers) == {"a", "b", "d"}


def test_options_switch_parts_off(mlp):
    _, report = onnxsqueeze.squeeze(
        parse(MESSY), passes=[("cleanup", {"lift_constants": False, "dedup_initializers": False})]
    )
    stats = report.passes[0].stats
    assert "constants_lifted" not in stats and "duplicates_merged" not in stats
    assert report.verification_status == "passed"


def test_strip_metadata_keeps_model_metadata():
    from onnxsqueeze.passes.strip_metadata import StripMetadataPass

    proto = parse(MESSY)
    node = proto.graph.node[1]
    node.doc_string = "exported from torch"
    onnx.helper.set_metadata_props(node, {"pkg.torch.onnx.stack_trace": "x" * 1000})
    onnx.helper.set_model_props(proto, {"labels": "cat,dog"})
    model = ir.serde.deserialize_model(proto)
    result = StripMetadataPass()(model)
    assert result.stats == {"metadata_entries_removed": 1, "doc_strings_removed": 1}
    out = ir.serde.serialize_model(model)
    assert not any(n.metadata_props or n.doc_string for n in out.graph.node)
    assert {p.key: p.value for p in out.metadata_props} == {"labels": "cat,dog"}
    assert len(out.SerializeToString()) < len(proto.SerializeToString()) - 1000
