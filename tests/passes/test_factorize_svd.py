"""factorize-svd: structure, onnxruntime numerics against NumPy, Gemm's attribute variants,
Constant-node weights, If/Loop bodies, what stays whole, and data-aware factors."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxsqueeze.passes.factorize_svd import FactorizeSvdPass

from conftest import apply_pass, parse_with, run_ort

RNG = np.random.default_rng(21)
K, N, R = 64, 48, 6


def _low_rank(k: int = K, n: int = N, rank: int = R) -> np.ndarray:
    """A weight of exactly ``rank``: its rank-``rank`` factors reproduce it."""
    return (RNG.standard_normal((k, rank)) @ RNG.standard_normal((rank, n))).astype(np.float32)


def _apply(proto: onnx.ModelProto, **options) -> tuple[onnx.ModelProto, dict]:
    return apply_pass(FactorizeSvdPass, proto, **options)


def test_matmul_becomes_two_thinner_matmuls_that_compute_the_same_on_a_low_rank_weight():
    w = _low_rank()
    proto = parse_with(
        f"""<ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 5, {K}] x) => (float[2, 5, {N}] y) {{ y = MatMul(x, w) }}""",
        {"w": w},
    )
    out, stats = _apply(proto, rank=R, min_saving=0.0)
    assert [n.op_type for n in out.graph.node] == ["MatMul", "MatMul"]
    assert out.graph.output[0].name == "y" and stats["factorized"] == [out.graph.node[1].name]
    shapes = sorted(tuple(t.dims) for t in out.graph.initializer)
    assert shapes == sorted([(K, R), (R, N)]) and stats["params_after"] == R * (K + N)
    x = RNG.standard_normal((2, 5, K)).astype(np.float32)
    np.testing.assert_allclose(run_ort(out, {"x": x})[0], x @ w, rtol=1e-4, atol=1e-4)


def test_a_truncated_rank_matches_numpys_truncated_svd():
    w = RNG.standard_normal((K, N)).astype(np.float32)
    proto = parse_with(
        f"""<ir_version: 8, opset_import: ["" : 17]>
        g (float[3, {K}] x) => (float[3, {N}] y) {{ y = MatMul(x, w) }}""",
        {"w": w},
    )
    out, stats = _apply(proto, rank=10, min_saving=0.0)
    u, s, vt = np.linalg.svd(w.astype(np.float64), full_matrices=False)
    truncated = (u[:, :10] * s[:10]) @ vt[:10]
    x = RNG.standard_normal((3, K)).astype(np.float32)
    np.testing.assert_allclose(run_ort(out, {"x": x})[0], x @ truncated, rtol=1e-4, atol=1e-4)
    (layer,) = stats["layers"]
    assert layer["predicted_error"] == pytest.approx(np.sum(s[10:] ** 2) / np.sum(s**2), rel=1e-6)


@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("bias", ["none", "row", "full"])
def test_gemm_keeps_its_transposes_alpha_beta_and_bias(trans_a, trans_b, bias):
    m = 4
    w = _low_rank()
    x_shape = [K, m] if trans_a else [m, K]
    w_stored = w.T.copy() if trans_b else w
    c = {"none": None, "row": RNG.standard_normal(N), "full": RNG.standard_normal((m, N))}[bias]
    arrays = {"w": w_stored} | ({} if c is None else {"c": c.astype(np.float32)})
    inputs = "x, w" if c is None else "x, w, c"
    proto = parse_with(
        f"""<ir_version: 8, opset_import: ["" : 13]>
        g (float{x_shape} x) => (float[{m}, {N}] y) {{
            y = Gemm <transA = {trans_a}, transB = {trans_b}, alpha = 0.5, beta = 2.0> ({inputs})
        }}""",
        arrays,
    )
    out, stats = _apply(proto, rank=R, min_saving=0.0)
    assert [n.op_type for n in out.graph.node] == ["Gemm", "Gemm"] and stats["factorized"]
    x = RNG.standard_normal(x_shape).astype(np.float32)
    want = 0.5 * ((x.T if trans_a else x) @ w) + (0 if c is None else 2.0 * c)
    np.testing.assert_allclose(run_ort(out, {"x": x})[0], want, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(run_ort(proto, {"x": x})[0], want, rtol=1e-4, atol=1e-3)


def test_constant_node_weights_and_subgraph_bodies():
    """A weight in a Constant node, inside an If's branch and a Loop's body."""
    w1, w2 = _low_rank(), _low_rank()

    def constant(name, w):
        values = ", ".join(f"{v:.9g}" for v in w.reshape(-1))
        return f"{name} = Constant <value = float[{K}, {N}] {{{values}}}> ()"

    text = f"""<ir_version: 8, opset_import: ["" : 17]>
    g (float[3, {K}] x, bool c) => (float[3, {N}] y, float[3, {N}] z) {{
        y = If (c) <
            then_branch = t () => (float[3, {N}] ty) {{ {constant("tw", w1)} ty = MatMul (x, tw) }},
            else_branch = e () => (float[3, {N}] ey) {{ {constant("ew", w2)} ey = MatMul (x, ew) }}
        >
        n = Constant <value = int64 {{2}}> ()
        cond = Constant <value = bool {{1}}> ()
        z0 = Mul (y, y)
        z = Loop (n, cond, z0) <body = b (int64 i, bool ci, float[3, {N}] acc)
            => (bool co, float[3, {N}] acc2) {{
            {constant("lw", w1)}
            co = Identity (ci)
            p = MatMul (x, lw)
            acc2 = Add (acc, p)
        }}>
    }}"""
    proto = onnx.parser.parse_model(text)
    for node in proto.graph.node:  # the pass names nothing: give the subgraph nodes names
        for attr in node.attribute:
            graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else []
            for graph in graphs:
                for index, inner in enumerate(graph.node):
                    inner.name = f"{graph.name}_{index}"
    out, stats = _apply(proto, rank=R, min_saving=0.0, min_elements=0)
    assert len(stats["factorized"]) == 3, stats["factorized"]
    x = RNG.standard_normal((3, K)).astype(np.float32)
    for flag, w in ((True, w1), (False, w2)):
        got = run_ort(out, {"x": x, "c": np.array(flag)})
        y = x @ w
        np.testing.assert_allclose(got[0], y, rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(got[1], y * y + 2 * (x @ w1), rtol=1e-4, atol=1e-2)


def test_what_stays_whole():
    """A weight another node also reads, a small weight, an excluded node, a rank whose
    factors would not save the margin, and a float16 weight."""
    shared, small, excluded, wide = _low_rank(), _low_rank(8, 8, 2), _low_rank(), _low_rank()
    half = _low_rank().astype(np.float16)
    proto = parse_with(
        f"""<ir_version: 8, opset_import: ["" : 17]>
        g (float[3, {K}] x, float[3, 8] s, float16[3, {K}] h)
          => (float[3, {N}] a, float[3, {N}] b, float[3, 8] c, float[3, {N}] d, float[3, {N}] e,
              float16[3, {N}] f) {{
            a = MatMul (x, shared)
            b = MatMul (x, shared)
            c = MatMul (s, small)
            d = MatMul (x, excluded)
            e = MatMul (x, wide)
            f = MatMul (h, half)
        }}""",
        {"shared": shared, "small": small, "excluded": excluded, "wide": wide, "half": half},
    )
    for index, node in enumerate(proto.graph.node):
        node.name = f"m{index}"
    out, stats = _apply(proto, rank=R, min_saving=0.0, exclude_nodes=("m3",), min_elements=100)
    assert stats["factorized"] == ["m4"]
    _, stats = _apply(proto, rank=27, min_saving=0.1)  # 27 * 112 > 0.9 * 64 * 48
    assert stats["factorized"] == []


def test_ranks_from_the_stage_override_the_rules():
    proto = parse_with(
        f"""<ir_version: 8, opset_import: ["" : 17]>
        g (float[3, {K}] x) => (float[3, {N}] y) {{ h = MatMul(x, w1) y = MatMul(x, w2) }}""",
        {"w1": _low_rank(), "w2": _low_rank()},
    )
    proto.graph.node[0].name, proto.graph.node[1].name = "m1", "m2"
    _, stats = _apply(proto, ranks={"m2": 4}, rank=R)
    assert stats["factorized"] == ["m2"] and stats["layers"][0]["rank"] == 4


def test_data_aware_factors_cut_the_output_error_on_that_data():
    """With the input's Gram matrix (channels 100x apart in scale, as real activations),
    the whitened factors' output error is far below plain SVD's at the same rank."""
    w = RNG.standard_normal((K, N)).astype(np.float32)
    x = (RNG.standard_normal((512, K)) * np.logspace(-1, 1, K)).astype(np.float32)
    proto = parse_with(
        f"""<ir_version: 8, opset_import: ["" : 17]>
        g (float[512, {K}] x) => (float[512, {N}] y) {{ y = MatMul(x, w) }}""",
        {"w": w},
    )
    proto.graph.node[0].name = "m"
    gram = x.astype(np.float64).T @ x.astype(np.float64)
    errors = {}
    for label, grams in (("plain", None), ("whitened", {"x": gram})):
        out, stats = _apply(proto, rank=12, min_saving=0.0, grams=grams)
        got = run_ort(out, {"x": x})[0]
        errors[label] = np.sum((got - x @ w) ** 2) / np.sum((x @ w) ** 2)
        assert stats["layers"][0]["whitened"] == (grams is not None)
    assert errors["whitened"] < errors["plain"] / 2, errors


@pytest.mark.parametrize("strides", [1, 2])
@pytest.mark.parametrize("bias", [False, True])
def test_a_pointwise_conv_becomes_two_pointwise_convs(strides, bias):
    """A 1x1 Conv of exactly low rank: two 1x1 Convs (strides on the first, the bias on the
    second) compute the same; a 3x3 or padded Conv stays whole."""
    w = _low_rank(K, N).T.reshape(N, K, 1, 1).copy()  # [out, in, 1, 1]
    arrays = {"w": w, "w3": RNG.standard_normal((N, K, 3, 3)).astype(np.float32)}
    inputs = "x, w"
    if bias:
        arrays["c"] = RNG.standard_normal(N).astype(np.float32)
        inputs = "x, w, c"
    size = 8 // strides
    proto = parse_with(
        f"""<ir_version: 8, opset_import: ["" : 17]>
        g (float[2, {K}, 8, 8] x) => (float[2, {N}, {size}, {size}] y, float[2, {N}, 8, 8] z) {{
            y = Conv <strides = [{strides}, {strides}]> ({inputs})
            z = Conv <pads = [1, 1, 1, 1]> (x, w3)
        }}""",
        arrays,
    )
    out, stats = _apply(proto, rank=R, min_saving=0.0)
    assert len(stats["factorized"]) == 1
    assert [n.op_type for n in out.graph.node] == ["Conv", "Conv", "Conv"]
    x = RNG.standard_normal((2, K, 8, 8)).astype(np.float32)
    for got, want in zip(run_ort(out, {"x": x}), run_ort(proto, {"x": x}), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)


def test_a_pointwise_conv_is_whitened_by_its_channel_gram():
    """Data-aware factors of a 1x1 Conv from its patch Gram matrix (calib.gram): lower output
    error than plain SVD on channels 100x apart in scale."""
    from onnxsqueeze.calib.gram import gram_matrices

    w = RNG.standard_normal((N, K, 1, 1)).astype(np.float32)
    proto = parse_with(
        f"""<ir_version: 8, opset_import: ["" : 17]>
        g (float[1, {K}, 6, 6] x) => (float[1, {N}, 6, 6] y) {{ y = Conv (x, w) }}""",
        {"w": w},
    )
    scale = np.logspace(-1, 1, K)[None, :, None, None]
    feeds = [
        {"x": (RNG.standard_normal((1, K, 6, 6)) * scale).astype(np.float32)} for _ in range(16)
    ]
    grams = gram_matrices(ir.serde.deserialize_model(proto), feeds)
    errors = {}
    for label, g in (("plain", None), ("whitened", grams)):
        out, stats = _apply(proto, rank=12, min_saving=0.0, grams=g)
        assert stats["layers"][0]["whitened"] == (g is not None)
        got = [run_ort(out, f)[0] for f in feeds]
        want = [run_ort(proto, f)[0] for f in feeds]
        errors[label] = sum(np.sum((a - b) ** 2) for a, b in zip(got, want, strict=True)) / sum(
            np.sum(b**2) for b in want
        )
    assert errors["whitened"] < errors["plain"] / 2, errors
