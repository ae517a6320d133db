"""fuse-activations: hard-sigmoid / hard-swish written in elementwise ops, structure + numerics."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxsqueeze.passes.fuse_activations import FuseActivationsPass

from conftest import parse, run_ort

HEAD = """
<ir_version: 8, opset_import: ["" : {opset}]>
g (float[2, 3, 8] x) => (float y)
<float[1] three = {{3.0}}, float[1] zero = {{0.0}}, float[1] six = {{6.0}},
 float sixth = {{0.16666667}}, float tenth = {{0.1}}, float[1, 1, 1, 1] deep = {{3.0}},
 float[8] row = {{3, 3, 3, 3, 3, 3, 3, 3}}>
"""


def _apply(body: str, opset: int = 13):
    original = parse(HEAD.format(opset=opset) + "{" + body + "}")
    model = ir.serde.deserialize_model(onnx.load_from_string(original.SerializeToString()))
    stats = FuseActivationsPass()(model).stats
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto)
    return original, proto, model, stats


def _x() -> np.ndarray:
    # values on both sides of the clip bounds (-3 and 3) and between them
    return np.random.default_rng(0).uniform(-6, 6, (2, 3, 8)).astype(np.float32)


def _close(original, proto):
    feeds = {"x": _x()}
    for a, b in zip(run_ort(original, feeds), run_ort(proto, feeds), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "body, ops",
    [
        # hard-swish as Paddle writes it: Mul before the Div
        (
            "a = Add(x, three)  c = Clip(a, zero, six)  m = Mul(x, c)  y = Div(m, six)",
            ["HardSigmoid", "Mul"],
        ),
        # operands the other way round, and a multiply by 1/6 instead of the Div
        (
            "a = Add(three, x)  c = Clip(a, zero, six)  m = Mul(c, x)  y = Mul(sixth, m)",
            ["HardSigmoid", "Mul"],
        ),
        # hard-sigmoid alone
        ("a = Add(x, three)  c = Clip(a, zero, six)  y = Div(c, six)", ["HardSigmoid"]),
        # hard-swish written as x * hard-sigmoid: the hard-sigmoid part fuses, the Mul stays
        (
            "a = Add(x, three)  c = Clip(a, zero, six)  h = Div(c, six)  y = Mul(x, h)",
            ["HardSigmoid", "Mul"],
        ),
        # ReLU6 written as Min/Max or Relu + Min by converters instead of a Clip
        (
            "a = Add(x, three)  b = Max(a, zero)  c = Min(b, six)  m = Mul(x, c)  y = Div(m, six)",
            ["HardSigmoid", "Mul"],
        ),
        (
            "a = Add(x, three)  b = Min(six, a)  c = Max(b, zero)  m = Mul(c, x)  y = Div(m, six)",
            ["HardSigmoid", "Mul"],
        ),
        ("a = Add(x, three)  b = Relu(a)  c = Min(b, six)  y = Mul(c, sixth)", ["HardSigmoid"]),
        # no shift: Clip(x, 0, 6) / 6 is a hard-sigmoid with beta 0
        ("c = Clip(x, zero, six)  y = Div(c, six)", ["HardSigmoid"]),
    ],
)
def test_patterns_become_hard_sigmoid(body, ops):
    original, proto, model, stats = _apply(body)
    assert sorted(n.op_type for n in model.graph) == sorted(ops)
    hard = next(n for n in model.graph if n.op_type == "HardSigmoid")
    assert hard.attributes["alpha"].as_float() == pytest.approx(1 / 6)
    _close(original, proto)
    assert stats["nodes_removed"] == len(original.graph.node) - len(ops)


def test_clip_bounds_as_attributes_before_opset_11():
    body = "a = Add(x, three)  c = Clip <min = 0.0, max = 6.0> (a)  m = Mul(x, c)  y = Div(m, six)"
    original, proto, model, stats = _apply(body, opset=10)
    assert [n.op_type for n in model.graph] == ["HardSigmoid", "Mul"]
    assert stats["hard_swishes"] == 1
    _close(original, proto)


@pytest.mark.parametrize(
    "body, why",
    [
        (
            "a = Add(x, three)  c = Clip(a, zero, six)  y = Div(c, six)  z = Relu(c)  w = Add(y, z)",
            "the Clip's output is read elsewhere",
        ),
        ("a = Add(x, three)  c = Clip(a, zero, six)  y = Mul(c, tenth)", "0.1 is not 1/6"),
        ("a = Add(x, three)  c = Clip(a, three, six)  y = Div(c, six)", "lower bound is not 0"),
        (
            "a = Add(x, three)  b = Max(a, zero)  c = Max(b, six)  y = Div(c, six)",
            "Max of Max is no clamp",
        ),
        (
            "t = Relu(x)  a = Add(t, three)  c = Clip(a, zero, six)  m = Mul(x, c)  y = Div(m, six)",
            "the Mul reads another tensor than the Add",
        ),
    ],
)
def test_lookalikes_are_left_alone(body, why):
    original, proto, model, stats = _apply(body)
    assert not any(n.op_type == "HardSigmoid" for n in model.graph), why
    assert stats.get("nodes_removed", 0) == 0
    _close(original, proto)


@pytest.mark.parametrize("shift", ["deep", "row"])
def test_an_add_that_broadcasts_stays_out_of_the_hard_sigmoid(shift):
    """A shift of more dims than x (the Add grows the shape) or not one value is not a
    HardSigmoid's beta: the Clip and Div still fuse, over the Add's output."""
    original, proto, model, stats = _apply(
        f"a = Add(x, {shift})  c = Clip(a, zero, six)  y = Div(c, six)"
    )
    assert [n.op_type for n in model.graph] == ["Add", "HardSigmoid"]
    hard = list(model.graph)[1]
    assert hard.inputs[0].producer().op_type == "Add"
    assert hard.attributes["beta"].as_float() == 0.0
    _close(original, proto)


def test_graph_output_keeps_its_name_and_subgraphs_are_fused():
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (bool b, float[2, 3, 8] x) => (float[2, 3, 8] y)
    <float[1] three = {3.0}, float[1] zero = {0.0}, float[1] six = {6.0}>
    {
      y = If (b) <
        then_branch = t () => (float[2, 3, 8] t_out) {
          a = Add(x, three)  c = Clip(a, zero, six)  m = Mul(x, c)  t_out = Div(m, six)
        },
        else_branch = e () => (float[2, 3, 8] e_out) { e_out = Neg(x) }
      >
    }
    """
    original = parse(text)
    model = ir.serde.deserialize_model(onnx.load_from_string(original.SerializeToString()))
    assert FuseActivationsPass()(model).stats["hard_swishes"] == 1
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto)
    branch = proto.graph.node[0].attribute[0].g
    assert [n.op_type for n in branch.node] == ["HardSigmoid", "Mul"]
    assert branch.output[0].name == "t_out"
    feeds = {"b": np.array(True), "x": _x()}
    np.testing.assert_allclose(run_ort(proto, feeds)[0], run_ort(original, feeds)[0], atol=1e-6)
