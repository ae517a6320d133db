"""quantize-weights' ``fold`` form: int8/int4 codes expanded by plain ops that onnxruntime
constant-folds when the session is created, so the model is small on disk and runs on the
float kernels (onnxsqueeze.quant.unpack)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from onnxsqueeze.passes.quantize_weights import QuantizeWeightsPass
from onnxsqueeze.quant.qmath import dequantize_weight, quantize_weight

from conftest import weighted_model

RNG = np.random.default_rng(7)
_ROUNDING = {4: "mse", 8: "rtn"}
FOLD_OPS = {"Cast", "Mul", "Floor", "Sub", "Concat", "Reshape", "Slice"}


def _model(op: str, weight: np.ndarray, opset: int, x_shape: list[int], **attrs):
    return weighted_model(op, weight, x_shape, opset, ir_version=7, **attrs)


def _fold(proto: onnx.ModelProto, bits: int, block: int) -> tuple[onnx.ModelProto, dict]:
    model = ir.serde.deserialize_model(proto)
    options = dict(bits=bits, block_size=block, format="fold", min_elements=16)
    stats = QuantizeWeightsPass(**options)(model).stats
    out = ir.serde.serialize_model(model)
    onnx.checker.check_model(out, full_check=True)
    return out, stats


def _session(proto: onnx.ModelProto, level, path=None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    if path is not None:
        options.optimized_model_filepath = str(path)
    return ort.InferenceSession(
        proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def _check_folded_at_load(proto: onnx.ModelProto, op: str, feed: dict, tmp_path) -> np.ndarray:
    """The graph's own meaning, and what onnxruntime runs after loading it: the weight's
    decompression ops are gone (constant-folded), the op is left with a float weight."""
    plain = _session(proto, ort.GraphOptimizationLevel.ORT_DISABLE_ALL).run(None, feed)[0]
    path = tmp_path / "optimized.onnx"
    loaded = _session(proto, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, path)
    np.testing.assert_array_equal(loaded.run(None, feed)[0], plain)
    optimized = onnx.load(str(path))
    assert [n.op_type for n in optimized.graph.node] == [op]
    return plain


@pytest.mark.parametrize("opset", [11, 17])
@pytest.mark.parametrize(
    "op, bits, block, trans_b",
    [
        ("MatMul", 8, 0, False),
        ("MatMul", 4, 32, False),
        ("Gemm", 8, 0, True),
        ("Gemm", 4, 32, True),
        ("MatMul", 4, 0, False),
    ],
)
def test_matmul_weights_fold_to_the_dequantized_weight(op, bits, block, trans_b, opset, tmp_path):
    shape = (80, 96) if trans_b else (96, 80)
    weight = RNG.standard_normal(shape).astype(np.float32)
    attrs = {"transB": 1} if trans_b else {}
    out, stats = _fold(_model(op, weight, opset, [3, 96], **attrs), bits, block)
    assert {n.op_type for n in out.graph.node} <= FOLD_OPS | {op}
    assert "DequantizeLinear" not in {n.op_type for n in out.graph.node}
    assert stats["weights_quantized"] == 1 and "w" not in {i.name for i in out.graph.initializer}
    assert stats["bytes_after"] < stats["bytes_before"] / (3.5 if bits == 8 else 6)
    stored = sum(onnx.numpy_helper.to_array(i).nbytes for i in out.graph.initializer)
    assert stored < weight.nbytes / (3.3 if bits == 8 else 5.5)  # shapes and scalars included
    kn = weight.T if trans_b else weight
    q, s = quantize_weight(kn, bits, block, _ROUNDING[bits])
    x = {"x": RNG.standard_normal((3, 96)).astype(np.float32)}
    got = _check_folded_at_load(out, op, x, tmp_path)
    np.testing.assert_allclose(got, x["x"] @ dequantize_weight(q, s, block), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "bits, block, channels", [(8, 0, 32), (4, 0, 32), (4, 32, 32), (4, 32, 24)]
)
def test_conv_filters_fold_at_any_opset(bits, block, channels, tmp_path):
    """Per output channel, or per block of 32 along channels x kernel (int4 Conv filters as
    DequantizeLinear need opset 21, and blocks there would cut along channels only)."""
    weight = RNG.standard_normal((16, channels, 3, 3)).astype(np.float32)  # 24: K = 216
    out, stats = _fold(_model("Conv", weight, 11, [1, channels, 10, 10]), bits, block)
    assert stats["weights_quantized"] == 1
    m = weight.shape[0]
    q, s = quantize_weight(weight.reshape(m, -1).T, bits, block, _ROUNDING[bits])
    expected_w = dequantize_weight(q, s, block).T.reshape(weight.shape)
    x = {"x": RNG.standard_normal((1, channels, 10, 10)).astype(np.float32)}
    got = _check_folded_at_load(out, "Conv", x, tmp_path)
    reference = _model("Conv", expected_w, 11, [1, channels, 10, 10])
    want = _session(reference, ort.GraphOptimizationLevel.ORT_DISABLE_ALL).run(None, x)[0]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bits, block", [(8, 0), (4, 32)])
def test_gather_table_folds_row_wise(bits, block, tmp_path):
    table = RNG.standard_normal((50, 96)).astype(np.float32)
    out, stats = _fold(_model("Gather", table, 13, [4]), bits, block)
    assert stats["weights_quantized"] == 1
    q, s = quantize_weight(table.T, bits, block, _ROUNDING[bits])
    rows = dequantize_weight(q, s, block).T
    feed = {"x": np.array([0, 7, 49, 7], np.int64)}
    got = _check_folded_at_load(out, "Gather", feed, tmp_path)
    np.testing.assert_array_equal(got, rows[feed["x"]])


def test_a_partial_last_block_is_padded_and_sliced_off(tmp_path):
    """K = 100 with blocks of 32: the codes are stored padded to 128 rows and the padding is
    sliced off after scaling (Slice with inputs: opset 10); older opsets keep the weight
    float, as they do an odd number of int4 codes, which cannot pair into bytes."""
    weight = RNG.standard_normal((100, 48)).astype(np.float32)
    out, stats = _fold(_model("MatMul", weight, 17, [3, 100]), 4, 32)
    assert stats["weights_quantized"] == 1 and "Slice" in {n.op_type for n in out.graph.node}
    q, s = quantize_weight(weight, 4, 32, "mse")
    x = {"x": RNG.standard_normal((3, 100)).astype(np.float32)}
    got = _check_folded_at_load(out, "MatMul", x, tmp_path)
    np.testing.assert_allclose(got, x["x"] @ dequantize_weight(q, s, 32), rtol=1e-5, atol=1e-5)
    _, stats = _fold(_model("MatMul", weight, 9, [3, 100]), 4, 32)
    assert stats["weights_quantized"] == 0 and stats["skipped"] == 1
    odd = RNG.standard_normal((7, 5, 3, 3)).astype(np.float32)  # 315 codes
    _, stats = _fold(_model("Conv", odd, 17, [1, 5, 6, 6]), 4, 0)
    assert stats["weights_quantized"] == 0 and stats["skipped"] == 1


def test_a_folded_model_loads_to_the_float_graph():
    """What the stage's latency check relies on instead of timing: after onnxruntime's
    load-time folding the fold form has the float model's kernels; DequantizeLinear keeps
    its own node and is timed."""
    from onnxsqueeze.run.latency import loaded_op_types

    weight = RNG.standard_normal((96, 80)).astype(np.float32)
    proto = _model("MatMul", weight, 17, [3, 96])
    folded, _ = _fold(proto, 4, 32)
    as_dq = ir.serde.deserialize_model(proto)
    QuantizeWeightsPass(bits=8, format="dq", min_elements=16)(as_dq)
    float_ops = loaded_op_types(ir.serde.deserialize_model(proto), ["cpu"])
    assert float_ops == {("", "MatMul"): 1}
    assert loaded_op_types(ir.serde.deserialize_model(folded), ["cpu"]) == float_ops
    assert loaded_op_types(as_dq, ["cpu"]) != float_ops


@pytest.mark.parametrize("bits", [8, 4])
def test_squeezing_a_folded_model_again_keeps_it_compressed(bits):
    """fold-constants' size guard: expanding the codes would grow the file 4-8x."""
    import onnxsqueeze

    weight = RNG.standard_normal((256, 512)).astype(np.float32)  # 512 KB float
    folded, _ = _fold(_model("MatMul", weight, 17, [3, 256]), bits, 32 if bits == 4 else 0)
    again, report = onnxsqueeze.squeeze(folded)
    assert report.verification_status == "passed"
    stored = sum(onnx.numpy_helper.to_array(i).nbytes for i in again.graph.initializer)
    assert stored < weight.nbytes / (3.3 if bits == 8 else 5.5)
    assert "Cast" in {n.op_type for n in again.graph.node}
