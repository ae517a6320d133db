"""quantize-lstm: LSTM -> onnxruntime's DynamicQuantizeLSTM, int8 weights (one scale per
gate row and direction), outputs within int8 noise of float, a shared weight stored once."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx_ir as ir
import onnxruntime as ort
import pytest

from onnxsqueeze.passes.quantize_lstm import QuantizeLstmPass

HIDDEN, FEATURES, STEPS = 32, 24, 12
RNG = np.random.default_rng(5)


def _lstm_model(*, share: bool = False, layout: int = 0) -> onnx.ModelProto:
    """Two LSTMs in a row (the second bidirectional), with bias, initial state and lengths;
    ``share``: a third LSTM reads the first one's W and R."""
    d = 1
    w = (RNG.standard_normal((d, 4 * HIDDEN, FEATURES)) / 4).astype(np.float32)
    r = (RNG.standard_normal((d, 4 * HIDDEN, HIDDEN)) / 4).astype(np.float32)
    b = (RNG.standard_normal((d, 8 * HIDDEN)) / 4).astype(np.float32)
    w2 = (RNG.standard_normal((2, 4 * HIDDEN, HIDDEN)) / 4).astype(np.float32)
    r2 = (RNG.standard_normal((2, 4 * HIDDEN, HIDDEN)) / 4).astype(np.float32)
    h0 = np.zeros((1, 1, HIDDEN), np.float32)
    x_shape = [1, STEPS, FEATURES] if layout else [STEPS, 1, FEATURES]
    nodes = [
        oh.make_node(
            "LSTM",
            ["x", "w", "r", "b", "", "h0"],
            ["y1", "h1"],
            name="first",
            hidden_size=HIDDEN,
            layout=layout,
        ),  # fmt: skip
        oh.make_node("Squeeze", ["y1", "axis1"], ["s1"]),
        oh.make_node(
            "LSTM",
            ["s1", "w2", "r2", "", "lengths"],
            ["y2"],
            name="second",
            hidden_size=HIDDEN,
            direction="bidirectional",
        ),  # fmt: skip
    ]
    outputs = [oh.make_tensor_value_info("y2", onnx.TensorProto.FLOAT, ["t", "d", "b", "h"])]
    if share:
        nodes.append(
            oh.make_node("LSTM", ["x", "w", "r"], ["y3"], name="third", hidden_size=HIDDEN)
        )
        outputs.append(
            oh.make_tensor_value_info("y3", onnx.TensorProto.FLOAT, ["t", "d", "b", "h"])
        )
    if layout:
        nodes = nodes[:1]
        outputs = [oh.make_tensor_value_info("y1", onnx.TensorProto.FLOAT, ["t", "d", "b", "h"])]
    arrays = {"w": w, "r": r, "b": b, "h0": h0, "w2": w2, "r2": r2}
    arrays |= {"axis1": np.array([1], np.int64), "lengths": np.array([STEPS], np.int32)}
    graph = oh.make_graph(
        nodes,
        "lstm",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, x_shape)],
        outputs,
        [onnx.numpy_helper.from_array(a, n) for n, a in arrays.items()],
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def _run(proto: onnx.ModelProto, feed: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def _quantized(proto: onnx.ModelProto, **options) -> tuple[onnx.ModelProto, dict]:
    model = ir.serde.deserialize_model(proto)
    stats = QuantizeLstmPass(**options)(model).stats
    out = ir.serde.serialize_model(model)
    onnx.checker.check_model(out)
    return out, stats


def test_lstms_become_dynamic_quantized_lstms_within_int8_noise():
    proto = _lstm_model()
    feed = {"x": RNG.standard_normal((STEPS, 1, FEATURES)).astype(np.float32)}
    out, stats = _quantized(proto, reduce_range=False)
    assert stats["quantized"] == ["first", "second"]
    ops = [(n.domain, n.op_type) for n in out.graph.node]
    assert ("com.microsoft", "DynamicQuantizeLSTM") in ops and ("", "LSTM") not in ops
    assert {o.domain: o.version for o in out.opset_import}["com.microsoft"] == 1
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in out.graph.initializer}
    assert not {"w", "r", "w2", "r2"} & set(weights), "float W/R left beside the int8 ones"
    int8 = {n: a for n, a in weights.items() if a.dtype == np.int8 and a.ndim == 3}
    # stored transposed, as the operator reads them: [directions, rows, 4 * hidden]
    assert sorted(a.shape for a in int8.values()) == sorted(
        [(1, FEATURES, 4 * HIDDEN), (1, HIDDEN, 4 * HIDDEN)] + [(2, HIDDEN, 4 * HIDDEN)] * 2
    )
    (reference,), (got,) = _run(proto, feed), _run(out, feed)
    assert got.shape == reference.shape
    a, b = got.ravel().astype(np.float64), reference.ravel().astype(np.float64)
    cosine = a @ b / np.linalg.norm(a) / np.linalg.norm(b)
    error = np.abs(a - b).max() / np.abs(b).max()
    assert cosine > 0.999 and 0 < error < 0.06, (cosine, error)  # int8 noise, not identical


def test_a_weight_shared_by_two_lstms_is_quantized_once():
    out, stats = _quantized(_lstm_model(share=True))
    assert stats["quantized"] == ["first", "second", "third"]
    first, third = (n for n in out.graph.node if n.name in ("first", "third"))
    assert list(first.input[1:3]) == list(third.input[1:3])
    big = [t for t in out.graph.initializer if int(np.prod(t.dims)) >= 1024]
    assert len({t.raw_data for t in big}) == len(big), "a weight stored twice"


def test_batch_major_and_excluded_lstms_stay_float():
    _, stats = _quantized(_lstm_model(layout=1))
    assert stats["quantized"] == []
    assert stats["kept_float"] == {"first": "batch-major LSTM (layout=1)"}
    out, stats = _quantized(_lstm_model(), exclude_nodes=("second",))
    assert stats["quantized"] == ["first"] and stats["kept_float"] == {"second": "excluded"}
    assert [n.op_type for n in out.graph.node].count("LSTM") == 1


@pytest.mark.parametrize("reduce_range", [True, False])
def test_weights_use_seven_bits_where_asked(reduce_range):
    out, _ = _quantized(_lstm_model(), reduce_range=reduce_range)
    peak = max(
        np.abs(onnx.numpy_helper.to_array(t).astype(np.int32)).max()
        for t in out.graph.initializer
        if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 3
    )
    assert peak == (63 if reduce_range else 127)
