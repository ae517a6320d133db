"""simplify-graph and fuse-batchnorm: one ONNX-text case per rewrite, structure + numerics."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import onnxsqueeze
from onnxsqueeze.passes.fuse_batchnorm import FuseBatchnormPass
from onnxsqueeze.passes.simplify_graph import SimplifyGraphPass

from conftest import parse, run_ort


def _apply(pass_cls, text: str, **options):
    original = parse(text)
    model = ir.serde.deserialize_model(onnx.load_from_string(original.SerializeToString()))
    result = pass_cls(**options)(model)
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto)
    return original, proto, model, result.stats


def _same(original, proto, feeds, rtol=0.0):
    for a, b in zip(run_ort(original, feeds), run_ort(proto, feeds), strict=True):
        np.testing.assert_allclose(b, a, rtol=rtol, atol=rtol * float(np.abs(a).max()))


def _x(*shape):
    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize(
    "body, kept",
    [
        ("t = Identity(x)  y = Relu(t)", ["Relu"]),
        ("t, m = Dropout(x)  y = Relu(t)", ["Relu"]),
        ("t = Cast <to = 1> (x)  y = Relu(t)", ["Relu"]),
        ("t = Cast <to = 10> (x)  y = Cast <to = 1> (t)", ["Cast", "Cast"]),  # rounding: kept
        ("t = Add(x, zero)  y = Relu(t)", ["Relu"]),
        ("t = Mul(one, x)  y = Relu(t)", ["Relu"]),
        ("t = Div(x, one)  y = Relu(t)", ["Relu"]),
        ("t = Div(one, x)  y = Relu(t)", ["Div", "Relu"]),  # 1/x is not x
        ("t = Add(x, big_zero)  y = Relu(t)", ["Add", "Relu"]),  # broadcast grows the shape
        ("t = Reshape(x, same)  y = Relu(t)", ["Relu"]),
        ("a = Reshape(x, flat)  b = Reshape(a, same)  y = Relu(b)", ["Reshape", "Relu"]),
        (
            "a = Transpose <perm = [1, 0, 2]> (x)  y = Transpose <perm = [1, 0, 2]> (a)",
            ["Transpose"],
        ),
        (
            "a = Transpose <perm = [1, 2, 0]> (x)  y = Transpose <perm = [1, 2, 0]> (a)",
            ["Transpose"],
        ),
    ],
)
def test_simplify_rewrites(body, kept):
    text = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 3, 4] x) => (float[?, ?, ?] y)
    <float zero = {{0.0}}, float[1] one = {{1.0}}, float[5, 1, 1, 1] big_zero = {{0, 0, 0, 0, 0}},
     int64[3] same = {{2, 3, 4}}, int64[1] flat = {{24}}>
    {{ {body} }}
    """
    original, proto, model, _ = _apply(SimplifyGraphPass, text)
    assert [n.op_type for n in model.graph] == kept
    _same(original, proto, {"x": _x(2, 3, 4)})


def test_identity_returning_outer_scope_value_from_subgraph_is_kept():
    """A peer removed this Identity and left the branch returning an outer value directly."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (bool c, float[2] x) => (float[2] y)
    {
      y = If (c) <
        then_branch = t () => (float[2] t_out) { t_out = Identity(x) },
        else_branch = e () => (float[2] e_out) { e_out = Neg(x) }
      >
    }
    """
    original, proto, model, _ = _apply(SimplifyGraphPass, text)
    then_graph = next(iter(model.graph)).attributes["then_branch"].as_graph()
    assert [n.op_type for n in then_graph] == ["Identity"]
    for c in (True, False):
        _same(original, proto, {"c": np.array(c), "x": np.array([1.0, -2.0], np.float32)})


CONV_BN = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1, 3, 8, 8] x) => (float[1, 4, 6, 6] y)
<float[4, 3, 3, 3] w = {WEIGHTS}, float[4] gamma = {1.5, 0.5, 2, 1}, float[4] beta = {0.1, -0.2, 0.3, 0},
 float[4] mean = {0.2, 0.1, -0.3, 0.5}, float[4] var = {1.2, 0.8, 2.0, 0.5}, float[1, 4, 1, 1] bias = {1, 2, 3, 4},
 float[1] s = {0.5}>
{ BODY }
"""


@pytest.mark.parametrize(
    "body, key",
    [
        ("c = Conv(x, w)  y = BatchNormalization(c, gamma, beta, mean, var)", "batchnorms_fused"),
        ("c = Conv(x, w)  y = Add(bias, c)", "adds_fused"),
        ("c = Conv(x, w)  y = Mul(c, s)", "muls_fused"),
    ],
)
def test_fuse_into_conv(body, key):
    weights = ", ".join(f"{v:.4f}" for v in np.random.default_rng(1).standard_normal(108))
    text = CONV_BN.replace("WEIGHTS", weights).replace("BODY", body)
    original, proto, model, stats = _apply(FuseBatchnormPass, text)
    assert [n.op_type for n in model.graph] == ["Conv"] and stats[key] == 1
    _same(original, proto, {"x": _x(1, 3, 8, 8)}, rtol=1e-5)


_WEIGHTS_GROUPED = ", ".join(
    f"{v:.4f}" for v in np.random.default_rng(2).standard_normal(4 * 3 * 9)
)
GROUPED_CONV_TRANSPOSE = f"""
<ir_version: 8, opset_import: ["" : 17]>
g (float[1, 4, 5, 5] x) => (float[1, 6, 9, 9] y)
<float[4, 3, 3, 3] w = {{{_WEIGHTS_GROUPED}}}, float[1, 6, 1, 1] bias = {{1, 2, 3, 4, 5, 6}},
 float[6] gamma = {{1.5, 0.5, 2, 1, 0.7, 1.1}}, float[6] beta = {{0.1, -0.2, 0.3, 0, 1, 2}},
 float[6] mean = {{0.2, 0.1, -0.3, 0.5, 0, 1}}, float[6] var = {{1.2, 0.8, 2.0, 0.5, 1, 3}},
 float[6, 1, 1] s = {{0.5, 2, 3, 4, -1, 0.25}}>
{{
  c = ConvTranspose <group = 2, strides = [2, 2]> (x, w)
  a = Add(c, bias)
  b = BatchNormalization(a, gamma, beta, mean, var)
  y = Mul(b, s)
}}
"""


def test_fuse_into_grouped_conv_transpose():
    """Output channels of ConvTranspose sit on the weight's axis 1, per group."""
    original, proto, model, stats = _apply(FuseBatchnormPass, GROUPED_CONV_TRANSPOSE)
    assert [n.op_type for n in model.graph] == ["ConvTranspose"]
    assert (stats["adds_fused"], stats["batchnorms_fused"], stats["muls_fused"]) == (1, 1, 1)
    _same(original, proto, {"x": _x(1, 4, 5, 5)}, rtol=1e-5)


def test_fuse_only_the_named_nodes():
    """``nodes`` folds those affine nodes alone (one fold at a time is how
    tools/fusion_sensitivity.py measures each): the named Add goes into the bias, the
    BatchNormalization and Mul after it stay."""
    original = parse(GROUPED_CONV_TRANSPOSE)
    for node in original.graph.node:
        node.name = f"node_{node.output[0]}"
    model = ir.serde.deserialize_model(original)
    stats = FuseBatchnormPass(nodes=("node_a",))(model).stats
    assert (stats["adds_fused"], stats["batchnorms_fused"], stats["muls_fused"]) == (1, 0, 0)
    assert [n.op_type for n in model.graph] == ["ConvTranspose", "BatchNormalization", "Mul"]
    _same(original, ir.serde.serialize_model(model), {"x": _x(1, 4, 5, 5)}, rtol=1e-5)


def test_batchnorm_after_gemm_and_guards():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 3] x) => (float[2, 4] y, float[2, 4] z)
    <float[4, 3] b = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}, float[4] c = {1, 1, 1, 1},
     float[4] gamma = {1.5, 0.5, 2, 1}, float[4] beta = {0.1, -0.2, 0.3, 0},
     float[4] mean = {0.2, 0.1, -0.3, 0.5}, float[4] var = {1.2, 0.8, 2.0, 0.5}>
    {
      g1 = Gemm <transB = 1, alpha = 0.5, beta = 2.0> (x, b, c)
      y = BatchNormalization(g1, gamma, beta, mean, var)
      g2 = Gemm <transB = 1> (x, b, c)
      z = BatchNormalization(g2, gamma, beta, mean, var)
      w = Relu(g2)
    }
    """
    original, proto, model, stats = _apply(FuseBatchnormPass, text)
    assert stats["batchnorms_fused"] == 1  # g2 has a second reader: not fused
    assert [n.op_type for n in model.graph].count("BatchNormalization") == 1
    _same(original, proto, {"x": _x(2, 3)}, rtol=1e-5)


def test_pipeline_allows_fusion_its_own_tolerance():
    weights = ", ".join(f"{v:.4f}" for v in np.random.default_rng(1).standard_normal(108))
    text = CONV_BN.replace("WEIGHTS", weights).replace(
        "BODY", "c = Conv(x, w)  y = BatchNormalization(c, gamma, beta, mean, var)"
    )
    _, report = onnxsqueeze.squeeze(parse(text), passes=["fuse-batchnorm"])
    assert report.passes[0].status == "applied" and report.passes[0].tolerance == 1e-4
    assert report.verification_status == "passed"
    assert FuseBatchnormPass(rtol=1e-3).tolerance(1e-6) == 1e-3
    assert SimplifyGraphPass().tolerance(1e-6) == 1e-6  # exact rewrites keep the base


@pytest.mark.parametrize(
    "body, kept",
    [
        ("c = Conv(x, w)  y = BatchNormalization(c, gamma, beta, mean, var)", 2),  # scales w
        ("c = Conv(x, w)  d = Mul(c, s)  y = Add(d, bias)", 3),  # the Mul scales w
        ("c = Conv(x, w)  y = Add(c, bias)", 1),  # the Add becomes the bias: same rounding
        ("c = Conv(x, w, b)  y = Add(c, bias)", 2),  # bias + bias would round differently
    ],
)
def test_exact_preset_fuses_only_what_rounds_the_same(body, kept):
    weights = ", ".join(f"{v:.4f}" for v in np.random.default_rng(1).standard_normal(108))
    text = CONV_BN.replace("WEIGHTS", weights).replace("BODY", body)
    text = text.replace("float[1] s", "float[4] b = {0.1, 0.2, 0.3, 0.4}, float[1] s")
    original = parse(text)
    squeezed, report = onnxsqueeze.squeeze(original, preset="exact")
    assert not any(p.name == "fuse-gemm" for p in report.passes)
    assert len(squeezed.graph.node) == kept
    x = {"x": _x(1, 3, 8, 8)}
    np.testing.assert_array_equal(run_ort(squeezed, x)[0], run_ort(original, x)[0])
