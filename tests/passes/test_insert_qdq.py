"""insert-qdq: placement per op pattern (structure), numerics against a NumPy fake-quant
reference and against float, and the fusions onnxruntime must find in the result."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxsqueeze.passes.insert_qdq import InsertQdqPass
from onnxsqueeze.quant.qmath import qparams, quantize_per_channel

RNG = np.random.default_rng(1)


def _parse(text: str, **weights: np.ndarray) -> onnx.ModelProto:
    model = onnx.parser.parse_model(text)
    for name, array in weights.items():
        model.graph.initializer.append(onnx.numpy_helper.from_array(array, name))
    onnx.checker.check_model(model)
    return model


def _ranges(proto: onnx.ModelProto, feeds: list[dict]) -> dict[str, tuple[float, float]]:
    """Exact min/max of every float tensor on ``feeds`` (what MinMax calibration gives)."""
    import onnxruntime as ort

    exposed = onnx.ModelProto()
    exposed.CopyFrom(proto)
    names = [o for n in exposed.graph.node for o in n.output]
    known = {o.name for o in exposed.graph.output}
    for name in names:
        if name not in known:
            exposed.graph.output.append(onnx.ValueInfoProto(name=name))
    session = ort.InferenceSession(exposed.SerializeToString(), providers=["CPUExecutionProvider"])
    out_names = [o.name for o in session.get_outputs()]
    lo: dict[str, float] = {}
    hi: dict[str, float] = {}
    for feed in feeds:
        values = dict(zip(out_names, session.run(None, feed), strict=True))
        values.update(feed)
        for name, v in values.items():
            if v.dtype == np.float32:
                lo[name] = min(lo.get(name, np.inf), float(v.min()))
                hi[name] = max(hi.get(name, -np.inf), float(v.max()))
    return {k: (lo[k], hi[k]) for k in lo}


def _quantize(proto: onnx.ModelProto, ranges, **options) -> tuple[onnx.ModelProto, dict]:
    model = ir.serde.deserialize_model(proto)
    result = InsertQdqPass(ranges=ranges, **options)(model)
    out = ir.serde.serialize_model(model)
    onnx.checker.check_model(out)
    return out, result.stats


def _run(proto: onnx.ModelProto, feed: dict, optimize: bool = False) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(None, feed)


def _optimized_ops(proto: onnx.ModelProto, tmp_path) -> collections.Counter:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return collections.Counter(
        n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node
    )


def _fake_quant(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    qp = qparams(lo, hi, "uint8")
    q = np.clip(np.round(x / qp.scale) + qp.zero_point.astype(np.float32), 0, 255)
    return ((q - qp.zero_point.astype(np.float32)) * qp.scale).astype(np.float32)


CONV_RELU = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[1, 3, 8, 8] x) => (float[1, 4, 8, 8] y) {
    c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
    y = Relu (c)
}
"""


def test_conv_relu_becomes_one_qlinearconv_with_int32_bias(tmp_path):
    w = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)
    b = RNG.standard_normal(4).astype(np.float32)
    proto = _parse(CONV_RELU, w=w, b=b)
    feeds = [{"x": RNG.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(4)]
    ranges = _ranges(proto, feeds)
    out, stats = _quantize(proto, ranges, reduce_range=False)
    types = {t.name: t.data_type for t in out.graph.initializer}
    assert (
        types[next(n for n in types if n.startswith("b_") and "quantized" in n)]
        == onnx.TensorProto.INT32
    )
    assert (
        types[next(n for n in types if n.startswith("w_") and "quantized" in n)]
        == onnx.TensorProto.INT8
    )
    assert "w" not in types and "b" not in types  # float weights are gone
    ops = collections.Counter(n.op_type for n in out.graph.node)
    # one pair on x, one on y (Relu folded into the range: no pair between Conv and Relu)
    assert ops["QuantizeLinear"] == 2 and ops["DequantizeLinear"] == 4
    assert stats["nodes_quantized"] == 2 and stats["per_channel"]
    assert _optimized_ops(out, tmp_path)["QLinearConv"] == 1
    # numerics: the unoptimized graph equals a NumPy fake-quant reference exactly in structure
    import onnxruntime as ort  # noqa: F401

    qw, wqp = quantize_per_channel(w, 0)
    wd = qw.astype(np.float32) * wqp.scale[:, None, None, None]
    feed = feeds[0]
    xq = _fake_quant(feed["x"], *ranges["x"])
    ref_model = _parse(CONV_RELU, w=wd, b=b)
    reference = _fake_quant(_run(ref_model, {"x": xq})[0], *ranges["y"])
    got = _run(out, feed)[0]
    step = qparams(*ranges["y"], "uint8").scale
    assert np.abs(got - reference).max() <= step * 1.01  # int32 bias rounding: < 1 step
    float_out = _run(proto, feed)[0]
    fused, _ = _quantize(proto, ranges)  # 7-bit weights where u8s8 kernels saturate
    assert (
        np.abs(_run(fused, feed, optimize=True)[0] - float_out).max()
        < 0.1 * np.abs(float_out).max()
    )


def test_full_range_weights_saturate_where_reduce_range_is_chosen():
    """The reason for reduce_range=None (auto): on AVX2 without VNNI, full-range int8
    weights make QLinearMatMul saturate; 7-bit weights do not."""
    from onnxsqueeze.quant.qdq import saturating_u8s8_cpu

    if not saturating_u8s8_cpu():
        pytest.skip("this CPU's u8s8 kernels do not saturate")
    worst = {False: 0.0, True: 0.0}
    for seed in range(10):
        rng = np.random.default_rng(seed)
        w = rng.standard_normal((16, 8)).astype(np.float32)
        proto = _parse(MATMUL_ADD, w=w, bias=rng.standard_normal(8).astype(np.float32))
        feeds = [
            {k: rng.standard_normal((2, 16)).astype(np.float32) for k in "xz"} for _ in range(4)
        ]
        ranges = _ranges(proto, feeds)
        want = _run(proto, feeds[0])[0]
        for reduce in worst:
            out, _ = _quantize(proto, ranges, reduce_range=reduce)
            got = _run(out, feeds[0], optimize=True)[0]
            worst[reduce] = max(worst[reduce], float(np.abs(got - want).max()))
    assert worst[True] < 0.3 < worst[False]


MATMUL_ADD = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[2, 16] x, float[2, 16] z) => (float[2, 8] y, float[2, 16] s) {
    m = MatMul (x, w)
    y = Add (m, bias)
    t = Transpose <perm = [1, 0]> (x)
    u = Transpose <perm = [1, 0]> (t)
    s = Add (u, z)
}
"""


def test_matmul_add_transpose_patterns_and_graph_output_name_kept(tmp_path):
    w = RNG.standard_normal((16, 8)).astype(np.float32)
    bias = RNG.standard_normal(8).astype(np.float32)
    proto = _parse(MATMUL_ADD, w=w, bias=bias)
    feeds = [
        {k: RNG.standard_normal((2, 16)).astype(np.float32) for k in ("x", "z")} for _ in range(4)
    ]
    ranges = _ranges(proto, feeds)
    out, stats = _quantize(proto, ranges, elementwise="all")
    assert [o.name for o in out.graph.output] == ["y", "s"]
    producers = {o: n.op_type for n in out.graph.node for o in n.output}
    assert producers["y"] == "DequantizeLinear" and producers["s"] == "DequantizeLinear"
    # the Transposes follow x's pair: they read a dequantized tensor and share its scale
    transposes = [n for n in out.graph.node if n.op_type == "Transpose"]
    assert all(producers[n.input[0]] == "DequantizeLinear" for n in transposes)
    assert stats["nodes_quantized"] == 5
    ops = _optimized_ops(out, tmp_path)
    assert ops["QLinearMatMul"] == 1 and ops["QLinearAdd"] >= 1
    for got, want in zip(_run(out, feeds[0], True), _run(proto, feeds[0]), strict=True):
        assert np.abs(got - want).max() < 0.05 * np.abs(want).max()


def test_linked_elementwise_ops_only_join_int8_regions():
    """By default an Add is quantized only between quantized ops: here both Adds feed graph
    outputs, so int8 would only add a Q/DQ pair each."""
    w = RNG.standard_normal((16, 8)).astype(np.float32)
    proto = _parse(MATMUL_ADD, w=w, bias=RNG.standard_normal(8).astype(np.float32))
    feeds = [{k: RNG.standard_normal((2, 16)).astype(np.float32) for k in ("x", "z")}]
    out, stats = _quantize(proto, _ranges(proto, feeds))
    assert stats["elementwise_outside_int8_regions"] == 2
    adds = [n for n in out.graph.node if n.op_type == "Add"]
    producers = {o: n.op_type for n in out.graph.node for o in n.output}
    assert all(producers.get(i) != "DequantizeLinear" for n in adds for i in n.input if i == "z")


def test_node_without_range_and_excluded_nodes_stay_float():
    w = RNG.standard_normal((16, 8)).astype(np.float32)
    bias = RNG.standard_normal(8).astype(np.float32)
    proto = _parse(MATMUL_ADD, w=w, bias=bias)
    feeds = [{k: RNG.standard_normal((2, 16)).astype(np.float32) for k in ("x", "z")}]
    ranges = _ranges(proto, feeds)
    del ranges["z"]
    out, stats = _quantize(proto, ranges, exclude_ops=("MatMul",), elementwise="all")
    assert "no calibrated range for input 'z'" in " ".join(stats["kept_float"].values())
    assert (
        stats["kept_float"].get("MatMul") == "excluded"
        or "excluded" in stats["kept_float"].values()
    )
    assert any(t.name == "w" for t in out.graph.initializer)  # the excluded MatMul's weight stays


def test_per_tensor_below_opset_13_and_int16_uses_contrib_domain():
    text = CONV_RELU.replace('"" : 13', '"" : 11')
    w = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)
    proto = _parse(text, w=w, b=np.zeros(4, np.float32))
    feeds = [{"x": RNG.standard_normal((1, 3, 8, 8)).astype(np.float32)}]
    ranges = _ranges(proto, feeds)
    out, stats = _quantize(proto, ranges)
    assert not stats["per_channel"]
    assert all("axis" not in [a.name for a in n.attribute] for n in out.graph.node)
    out16, _ = _quantize(proto, ranges, activations="int16")
    domains = {n.domain for n in out16.graph.node if n.op_type == "QuantizeLinear"}
    assert domains == {"com.microsoft"}
    got = _run(out16, feeds[0])[0]
    want = _run(proto, feeds[0])[0]
    assert np.abs(got - want).max() < 0.02 * np.abs(want).max()  # 16-bit: near float


def test_bad_options_raise():
    proto = _parse(CONV_RELU, w=np.ones((4, 3, 3, 3), np.float32), b=np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="activations"):
        _quantize(proto, {}, activations="int4")


def test_weight_memo_quantizes_each_weight_once_across_clones(monkeypatch):
    """The quantize stage builds many candidates from clones of one model: with a memo, a
    weight is quantized once and every build gives the same model as without it."""
    import onnxsqueeze.quant.qdq

    w = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)
    b = RNG.standard_normal(4).astype(np.float32)
    proto = _parse(CONV_RELU, w=w, b=b)
    ranges = _ranges(proto, [{"x": RNG.standard_normal((1, 3, 8, 8)).astype(np.float32)}])
    plain, _ = _quantize(proto, ranges)
    calls = []
    real = onnxsqueeze.quant.qdq.quantize_per_channel
    monkeypatch.setattr(
        onnxsqueeze.quant.qdq,
        "quantize_per_channel",
        lambda *a, **k: calls.append(1) or real(*a, **k),
    )
    model, memo = ir.serde.deserialize_model(proto), {}
    builds = []
    for _ in range(3):
        clone = model.clone()
        InsertQdqPass(ranges=ranges, weight_memo=memo)(clone)
        builds.append(ir.serde.serialize_model(clone).SerializeToString())
    assert calls == [1] and len(memo) == 1
    assert builds[0] == builds[1] == builds[2] == plain.SerializeToString()


def test_a_scalar_constant_operand_is_quantized_as_a_0d_tensor():
    """A 0-d constant of a Mul (recent transformers export BERT's attention scale so) rounded
    to a NumPy scalar, and the pass died on it: 'numpy.uint8' object has no attribute 'name'."""
    proto = _parse(
        """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2, 16] x) => (float[2, 8] y) {
    m = MatMul (x, w)
    y = Mul (m, half)
}""",
        w=RNG.standard_normal((16, 8)).astype(np.float32),
        half=np.array(0.5, np.float32),
    )
    feeds = [{"x": RNG.standard_normal((2, 16)).astype(np.float32)} for _ in range(4)]
    out, stats = _quantize(proto, _ranges(proto, feeds), elementwise="all")
    scalar = [t for t in out.graph.initializer if t.name.startswith("half")]
    assert scalar and all(list(t.dims) == [] for t in scalar)
    assert stats["nodes_quantized"] == 2
    (got,), (want,) = _run(out, feeds[0]), _run(proto, feeds[0])
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()
