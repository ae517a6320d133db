"""quantize-weights: DequantizeLinear (per channel, block-wise, int4) and MatMulNBits forms,
each checked against the float weight the quantized one stands for, in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import onnxsqueeze
from onnxsqueeze.passes.quantize_weights import QuantizeWeightsPass
from onnxsqueeze.quant.qmath import dequantize_weight, pack_matmul_nbits, quantize_weight

from conftest import run_ort, weighted_model

RNG = np.random.default_rng(0)
#: What rounding="auto" picks: scales searched for least squared error at 4 bits.
_ROUNDING = {4: "mse", 8: "rtn"}


def _model(op: str, weight: np.ndarray, opset: int, trans_b: bool = False) -> onnx.ModelProto:
    k = weight.shape[1] if trans_b else weight.shape[0]
    n = weight.shape[0] if trans_b else weight.shape[1]
    elem = onnx.helper.np_dtype_to_tensor_dtype(weight.dtype)
    x = onnx.helper.make_tensor_value_info("x", elem, [3, k])
    y = onnx.helper.make_tensor_value_info("y", elem, [3, n])
    attrs = {"transB": 1} if trans_b else {}
    node = onnx.helper.make_node(op, ["x", "w"], ["y"], **attrs)
    graph = onnx.helper.make_graph(
        [node], "g", [x], [y], [onnx.numpy_helper.from_array(weight, "w")]
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


def _run_unoptimized(proto: onnx.ModelProto, feeds: dict) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(None, feeds)[0]


def _gather_model(table: np.ndarray, opset: int) -> onnx.ModelProto:
    ids = onnx.helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4, table.shape[1]])
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Gather", ["table", "ids"], ["y"])],
        "g",
        [ids],
        [y],
        [onnx.numpy_helper.from_array(table, "table")],
    )
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    proto.ir_version = 10
    return proto


def _apply(proto: onnx.ModelProto, **options) -> tuple[onnx.ModelProto, dict]:
    model = ir.serde.deserialize_model(proto)
    result = QuantizeWeightsPass(**options)(model)
    out = ir.serde.serialize_model(model)
    onnx.checker.check_model(out)
    return out, result.stats


def test_quantize_weight_math_round_trips_within_half_a_step():
    w = RNG.standard_normal((100, 7)).astype(np.float32)
    for bits, block in ((8, 0), (4, 32), (4, 0)):
        q, s = quantize_weight(w, bits, block)
        back = dequantize_weight(q, s, block)
        step = np.repeat(s, block or 100, axis=0)[:100]
        assert np.all(np.abs(back - w) <= step / 2 + 1e-7)
        assert np.abs(q).max() <= 2 ** (bits - 1) - 1


@pytest.mark.parametrize(
    "op, opset, bits, block, trans_b",
    [
        ("MatMul", 17, 8, 0, False),  # per output channel, opset 13+
        ("Gemm", 17, 8, 0, True),
        ("MatMul", 21, 4, 32, False),  # int4 block-wise needs opset 21
        ("Gemm", 21, 8, 64, True),
    ],
)
def test_dequantize_linear_form_computes_with_the_dequantized_weight(
    op, opset, bits, block, trans_b
):
    weight = RNG.standard_normal((96, 80) if not trans_b else (80, 96)).astype(np.float32)
    out, stats = _apply(
        _model(op, weight, opset, trans_b),
        bits=bits,
        block_size=block,
        format="dq",
        min_elements=16,
    )
    ops = [n.op_type for n in out.graph.node]
    assert ops == ["DequantizeLinear", op] and stats["weights_quantized"] == 1
    assert stats["bytes_after"] < stats["bytes_before"] / (3.5 if bits == 8 else 6)
    assert [i.name for i in out.graph.initializer if i.name == "w"] == []  # float copy gone
    kn = weight.T if trans_b else weight
    q, s = quantize_weight(kn, bits, block, _ROUNDING[bits])
    x = {"x": RNG.standard_normal((3, 96)).astype(np.float32)}
    expected = x["x"] @ dequantize_weight(q, s, block)
    # The graph's meaning (no rewrites). onnxruntime's extended optimisations turn an int8
    # DQ weight + MatMul into dynamic quantization, which also rounds the activations.
    np.testing.assert_allclose(_run_unoptimized(out, x), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bits", [4, 8])
def test_matmul_nbits_form_on_older_opsets(bits):
    weight = RNG.standard_normal((100, 48)).astype(np.float32)  # K not a multiple of the block
    out, stats = _apply(
        _model("MatMul", weight, 17),
        bits=bits,
        block_size=32,
        min_elements=16,
        format="auto" if bits == 4 else "matmulnbits",
    )
    assert [n.op_type for n in out.graph.node] == ["MatMulNBits"]
    assert [o.name for o in out.graph.output] == ["y"]
    q, s = quantize_weight(weight, bits, 32, _ROUNDING[bits])
    assert pack_matmul_nbits(q, 32, bits).shape == (48, 4, 32 * bits // 8)
    x = {"x": RNG.standard_normal((3, 100)).astype(np.float32)}
    expected = x["x"] @ dequantize_weight(q, s, 32)
    np.testing.assert_allclose(run_ort(out, x)[0], expected, rtol=1e-4, atol=1e-3)


def test_small_shared_and_unsupported_weights_stay_float():
    weight = RNG.standard_normal((8, 8)).astype(np.float32)
    _, stats = _apply(_model("MatMul", weight, 17))  # 64 elements < min_elements
    assert stats["weights_quantized"] == 0
    big = RNG.standard_normal((96, 80)).astype(np.float32)
    _, stats = _apply(_model("Gemm", big, 17, trans_b=False), bits=4, format="auto")
    assert stats["weights_quantized"] == 0 and stats["skipped"] == 1  # no MatMulNBits for Gemm


def test_lossy_pass_in_the_pipeline_reports_its_error():
    weight = RNG.standard_normal((96, 80)).astype(np.float32)
    squeezed, report = onnxsqueeze.squeeze(
        _model("MatMul", weight, 17), passes=[("quantize-weights", {"min_elements": 16})]
    )
    assert report.passes[0].status == "applied" and not report.passes[0].lossless
    assert report.verification_status == "passed"
    assert 0 < report.verification["max_rel"] < 0.02
    assert squeezed.graph.node[0].op_type == "DequantizeLinear"


@pytest.mark.parametrize("opset, bits, block", [(17, 8, 0), (21, 4, 32)])
def test_embedding_table_of_a_gather(opset, bits, block):
    table = RNG.standard_normal((50, 96)).astype(np.float32)
    proto = _gather_model(table, opset)
    out, stats = _apply(proto, bits=bits, block_size=block, format="dq", min_elements=16)
    assert [n.op_type for n in out.graph.node] == ["DequantizeLinear", "Gather"]
    assert stats["weights_quantized"] == 1
    q, s = quantize_weight(table.T, bits, block, _ROUNDING[bits])
    rows = dequantize_weight(q, s, block).T  # the table the quantized one stands for
    feed = {"ids": np.array([0, 7, 49, 7], np.int64)}
    np.testing.assert_allclose(_run_unoptimized(out, feed), rows[feed["ids"]], rtol=1e-6)


@pytest.mark.parametrize("bits", [4, 8])
def test_table_as_gather_block_quantized(bits):
    """onnxruntime's GatherBlockQuantized reads the 4- or 8-bit rows directly and
    dequantizes only the rows looked up (no int4 DequantizeLinear before opset 21)."""
    table = RNG.standard_normal((50, 96)).astype(np.float32)
    out, stats = _apply(
        _gather_model(table, 17), bits=bits, block_size=32, min_elements=16, format="matmulnbits"
    )
    assert [n.op_type for n in out.graph.node] == ["GatherBlockQuantized"]
    assert stats["bytes_after"] < stats["bytes_before"] / (6 if bits == 4 else 3.5)
    q, s = quantize_weight(table.T, bits, 32, _ROUNDING[bits])
    rows = dequantize_weight(q, s, 32).T
    feed = {"ids": np.array([0, 7, 49, 7], np.int64)}
    np.testing.assert_allclose(run_ort(out, feed)[0], rows[feed["ids"]], rtol=1e-6)


def test_mse_scales_never_lose_to_max_scaling():
    w = RNG.standard_normal((256, 64)).astype(np.float32)
    errors = {}
    for rounding in ("rtn", "mse"):
        q, s = quantize_weight(w, 4, 32, rounding)
        per_block = (dequantize_weight(q, s, 32) - w) ** 2
        errors[rounding] = per_block.reshape(8, 32, 64).sum(axis=1)
    assert np.all(errors["mse"] <= errors["rtn"] * (1 + 1e-6))  # max scaling is a candidate
    assert errors["mse"].sum() < 0.92 * errors["rtn"].sum()


def test_gptq_with_calibration_grams_lowers_the_output_error():
    """Inputs that vary along few directions (as real activations do): GPTQ's error on
    x @ W is well below rounding each weight alone; the pass uses it where a Gram matrix
    is given."""
    from onnxsqueeze.calib.gram import gram_matrices

    k, n = 128, 48
    mix = RNG.standard_normal((16, k)) * np.linspace(0.05, 1.0, k)

    def sample() -> dict:
        x = RNG.standard_normal((3, 16)) @ mix + 0.05 * RNG.standard_normal((3, k))
        return {"x": x.astype(np.float32)}

    calib = [sample() for _ in range(100)]
    test = [sample() for _ in range(25)]
    weight = RNG.standard_normal((k, n)).astype(np.float32)
    proto = _model("MatMul", weight, 17)
    grams = gram_matrices(ir.serde.deserialize_model(proto), calib)
    assert set(grams) == {"x"} and grams["x"].shape == (k, k)
    errors = {}
    for label, options in (("mse", {}), ("gptq", {"grams": grams})):
        out, stats = _apply(proto, bits=4, block_size=32, min_elements=16, **options)
        assert stats["gptq"] == (1 if label == "gptq" else 0)
        got = np.concatenate([run_ort(out, f)[0] for f in test])
        want = np.concatenate([f["x"] @ weight for f in test])
        errors[label] = float(np.mean((got - want) ** 2))
    assert errors["gptq"] < 0.7 * errors["mse"], errors


def test_conv_filters_per_output_channel():
    """Conv weights: int8 per output channel through DequantizeLinear(axis 0); the conv
    computes with the dequantized filters."""
    filters = RNG.standard_normal((16, 8, 3, 3)).astype(np.float32)
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 8, 10, 10])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 16, 10, 10])
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])],
        "g",
        [x],
        [y],
        [onnx.numpy_helper.from_array(filters, "w")],
    )
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])
    proto.ir_version = 8
    out, stats = _apply(proto, bits=8, min_elements=16)
    assert [n.op_type for n in out.graph.node] == ["DequantizeLinear", "Conv"]
    assert stats["bytes_after"] < stats["bytes_before"] / 3.5
    q, s = quantize_weight(filters.reshape(16, -1).T, 8, 0)
    back = (q.T * s.reshape(16, 1)).reshape(filters.shape).astype(np.float32)
    dq_proto = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])],
            "g",
            [x],
            [y],
            [onnx.numpy_helper.from_array(back, "w")],
        ),
        opset_imports=[onnx.helper.make_opsetid("", 13)],
    )
    feed = {"x": RNG.standard_normal((1, 8, 10, 10)).astype(np.float32)}
    np.testing.assert_allclose(
        _run_unoptimized(out, feed), _run_unoptimized(dq_proto, feed), rtol=1e-5, atol=1e-5
    )
    proto.opset_import[0].version = 11  # no per-axis DequantizeLinear: stays float
    _, stats = _apply(proto, bits=8, min_elements=16)
    assert stats["weights_quantized"] == 0 and stats["skipped"] == 1


def test_outer_scope_weight_read_in_a_branch_is_dropped_once_quantized():
    """A weight stored in the main graph and read only inside an If branch: once the branch's
    MatMul reads the int8 copy, the float initializer must go, or the file grows (silero's
    if-less variant grew from 2.2 MB to 2.8 MB before this was fixed)."""
    weight = RNG.standard_normal((96, 80)).astype(np.float32)
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3, 96])
    c = onnx.helper.make_tensor_value_info("c", onnx.TensorProto.BOOL, [])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [3, 80])

    def branch(name: str, op: str) -> onnx.GraphProto:
        out = onnx.helper.make_tensor_value_info(name + "_y", onnx.TensorProto.FLOAT, [3, 80])
        node = (
            onnx.helper.make_node("MatMul", ["x", "w"], [name + "_y"])
            if op == "MatMul"
            else onnx.helper.make_node("Slice", ["z", "zero", "eighty", "one"], [name + "_y"])
        )
        return onnx.helper.make_graph([node], name, [], [out])

    consts = [
        onnx.numpy_helper.from_array(weight, "w"),
        onnx.numpy_helper.from_array(np.zeros((3, 96), np.float32), "z"),
        onnx.numpy_helper.from_array(np.array([0], np.int64), "zero"),
        onnx.numpy_helper.from_array(np.array([80], np.int64), "eighty"),
        onnx.numpy_helper.from_array(np.array([1], np.int64), "one"),
    ]
    node = onnx.helper.make_node(
        "If", ["c"], ["y"], then_branch=branch("then", "MatMul"), else_branch=branch("else", "")
    )
    graph = onnx.helper.make_graph([node], "g", [x, c], [y], consts)
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    proto.ir_version = 8
    out, stats = _apply(proto, bits=8, min_elements=16)
    assert stats["weights_quantized"] == 1
    assert "w" not in {i.name for i in out.graph.initializer}
    assert out.ByteSize() < proto.ByteSize() / 2
    feed = {"x": RNG.standard_normal((3, 96)).astype(np.float32), "c": np.array(True)}
    q, s = quantize_weight(weight, 8, 0)
    expected = feed["x"] @ dequantize_weight(q, s, 0)
    np.testing.assert_allclose(_run_unoptimized(out, feed), expected, rtol=1e-5, atol=1e-4)


def _recurrent(op: str, hidden: int = 32, size: int = 32) -> onnx.ModelProto:
    """x [T, 1, size] -> ``op`` (LSTM: 4 gates, GRU: 3) -> Y; W and R initializers."""
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh

    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((1, gates * hidden, size)) / np.sqrt(size)).astype(np.float32)
    r = rng.standard_normal((1, gates * hidden, hidden)) / np.sqrt(hidden)
    graph = h.make_graph(
        [h.make_node(op, ["x", "W", "R"], ["Y"], hidden_size=hidden)],
        "recurrent",
        [h.make_tensor_value_info("x", T.FLOAT, [10, 1, size])],
        [h.make_tensor_value_info("Y", T.FLOAT, [10, 1, 1, hidden])],
        [nh.from_array(w, "W"), nh.from_array((r * 1.5).astype(np.float32), "R")],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
def test_recurrent_input_and_recurrence_weights(op):
    """W and R each get int8 codes with a scale per row (gate x hidden unit), folded back at
    load; each keeps its own codes (a shared rounding memo once handed R the codes of W)."""
    model = _recurrent(op)
    feeds = [
        {"x": np.random.default_rng(i).standard_normal((10, 1, 32)).astype(np.float32)}
        for i in range(8)
    ]
    result = onnxsqueeze.squeeze(model, data=feeds, quantize="weights-int8")
    record = result.report.quantization
    assert record["applied"] and record["quantized"] == 1, record
    out = result.model
    onnx.checker.check_model(out)
    float_weights = [i for i in out.graph.initializer if i.data_type == onnx.TensorProto.FLOAT]
    assert all(np.prod(i.dims) < 4096 for i in float_weights)  # only the scales
    assert result.report.after["weight_bytes"] < 0.35 * result.report.before["weight_bytes"]
    for feed in feeds:
        (ours,), (ref,) = run_ort(out, feed), run_ort(model, feed)
        assert np.abs(ours - ref).max() < 0.05


@pytest.mark.parametrize("bits", [4, 8])
def test_float16_weights_fold_back_to_float16(bits):
    """An fp16 model's weights were skipped (float32 only): weight-only quantization now
    halves (int8) or quarters (int4) them, cast back to float16 after the fold-form Mul."""
    weight = RNG.standard_normal((64, 48)).astype(np.float16)
    proto = _model("MatMul", weight, 17)
    out, stats = _apply(proto, bits=bits, format="auto", min_elements=16)
    assert stats["weights_quantized"] == 1 and "w" not in {i.name for i in out.graph.initializer}
    assert stats["bytes_before"] == weight.nbytes
    assert stats["bytes_after"] < weight.nbytes / (1.8 if bits == 8 else 3.5)
    assert out.graph.node[-2].op_type == "Cast" and out.graph.node[-2].attribute[0].i == 10
    q, s = quantize_weight(weight.astype(np.float32), bits, 0, _ROUNDING[bits])
    feeds = {"x": RNG.standard_normal((3, 64)).astype(np.float16)}
    expected = feeds["x"].astype(np.float32) @ dequantize_weight(q, s, 0).astype(np.float16)
    np.testing.assert_allclose(run_ort(out, feeds)[0], expected, rtol=2e-2, atol=5e-2)
    # forms that need float32 scales (DequantizeLinear before opset 19, MatMulNBits) skip it
    _, stats = _apply(proto, bits=bits, format="dq", min_elements=16)
    assert stats["weights_quantized"] == 0


@pytest.mark.parametrize(
    "op, weight_shape, x_shape, attrs",
    [
        ("ConvTranspose", (8, 16, 3, 3), [1, 8, 6, 6], {"strides": [2, 2]}),
        ("Einsum", (4, 32, 24), [5, 4, 32], {"equation": "bhd,hde->bhe"}),
    ],
)
def test_conv_transpose_filters_and_einsum_operands_fold(op, weight_shape, x_shape, attrs):
    """Decoders' ConvTranspose filters and an Einsum's constant operand stayed float (not in
    the op list); in the fold form any constant weight can be stored as codes, a scale per
    row of its first axis."""
    weight = RNG.standard_normal(weight_shape).astype(np.float32)
    proto = weighted_model(op, weight, x_shape, opset=17, **attrs)
    out, stats = _apply(proto, bits=8, format="fold", min_elements=16)
    assert stats["weights_quantized"] == 1 and stats["bytes_after"] < weight.nbytes / 3.5
    assert "w" not in {i.name for i in out.graph.initializer}
    rows = weight.reshape(weight_shape[0], -1).T
    q, s = quantize_weight(rows, 8, 0, "rtn")
    expected_weight = dequantize_weight(q, s, 0).T.reshape(weight_shape)
    reference = weighted_model(op, expected_weight, x_shape, opset=17, **attrs)
    feeds = {"x": RNG.standard_normal(x_shape).astype(np.float32)}
    np.testing.assert_allclose(
        run_ort(out, feeds)[0], run_ort(reference, feeds)[0], rtol=1e-5, atol=1e-5
    )
    _, stats = _apply(proto, bits=8, format="dq", min_elements=16)  # fold form only
    assert stats["weights_quantized"] == 0


def _attention(weight: np.ndarray, bias: np.ndarray) -> onnx.ModelProto:
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 5, 64])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 5, 64])
    node = onnx.helper.make_node(
        "Attention", ["x", "w", "b"], ["y"], domain="com.microsoft", num_heads=4
    )
    inits = [onnx.numpy_helper.from_array(weight, "w"), onnx.numpy_helper.from_array(bias, "b")]
    graph = onnx.helper.make_graph([node], "g", [x], [y], inits)
    opsets = [onnx.helper.make_opsetid("", 17), onnx.helper.make_opsetid("com.microsoft", 1)]
    proto = onnx.helper.make_model(graph, opset_imports=opsets)
    proto.ir_version = 8
    return proto


def test_onnxruntime_contrib_attention_weights_fold():
    """An onnxruntime-optimized transformer keeps its packed QKV weights in com.microsoft
    Attention nodes, which weight-only quantization skipped (default-domain ops only)."""
    weight = RNG.standard_normal((64, 192)).astype(np.float32) / 8
    bias = RNG.standard_normal(192).astype(np.float32) / 8
    proto = _attention(weight, bias)
    out, stats = _apply(proto, bits=8, format="auto", min_elements=16)
    assert stats["weights_quantized"] == 1 and "w" not in {i.name for i in out.graph.initializer}
    q, s = quantize_weight(weight, 8, 0, "rtn")
    feeds = {"x": RNG.standard_normal((2, 5, 64)).astype(np.float32)}
    expected = run_ort(_attention(dequantize_weight(q, s, 0), bias), feeds)[0]
    np.testing.assert_allclose(run_ort(out, feeds)[0], expected, rtol=1e-4, atol=1e-4)
