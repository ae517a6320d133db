"""quantize-dynamic: MatMul/Gemm -> DynamicQuantizeLinear + MatMulInteger (fused by
onnxruntime), embedding tables -> int8 rows scaled after the lookup."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir

from onnxsqueeze.passes.quantize_dynamic import QuantizeDynamicPass

RNG = np.random.default_rng(3)

TEXT = """
<ir_version: 8, opset_import: ["" : 13]>
g (int64[2, 5] ids) => (float[2, 5, 32] y, float[2, 5, 48] z) {
    e = Gather (table, ids)
    q = MatMul (e, wq)
    k = MatMul (e, wk)
    y = Relu (q)
    f = Reshape (k, shape)
    g2 = Gemm <transB = 1> (f, wg, bias)
    z = Reshape (g2, shape2)
}
"""


def _model():
    proto = onnx.parser.parse_model(TEXT)
    arrays = {
        "table": RNG.standard_normal((100, 64)).astype(np.float32),
        "wq": RNG.standard_normal((64, 32)).astype(np.float32) / 8,
        "wk": RNG.standard_normal((64, 32)).astype(np.float32) / 8,
        "wg": RNG.standard_normal((48, 32)).astype(np.float32) / 6,
        "bias": RNG.standard_normal(48).astype(np.float32),
        "shape": np.array([10, 32], np.int64),
        "shape2": np.array([2, 5, 48], np.int64),
    }
    for name, array in arrays.items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(array, name))
    onnx.checker.check_model(proto)
    return proto


def _run(proto, feed, level="disable"):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if level == "disable":
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(None, feed)


def test_structure_numerics_and_fusion(tmp_path):
    proto = _model()
    model = ir.serde.deserialize_model(proto)
    stats = QuantizeDynamicPass(min_elements=256)(model).stats
    out = ir.serde.serialize_model(model)
    onnx.checker.check_model(out)
    ops = collections.Counter(n.op_type for n in out.graph.node)
    assert ops["MatMulInteger"] == 3 and ops["MatMul"] == 0 and ops["Gemm"] == 0
    assert ops["DynamicQuantizeLinear"] == 2  # q and k share the one on e
    assert stats["nodes_quantized"] == 4  # Gather, two MatMuls, Gemm
    floats = {t.name for t in out.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    assert not floats & {"table", "wq", "wk", "wg"}
    assert [o.name for o in out.graph.output] == ["y", "z"]
    feed = {"ids": RNG.integers(0, 100, (2, 5)).astype(np.int64)}
    for got, want in zip(_run(out, feed, "all"), _run(proto, feed), strict=True):
        assert np.abs(got - want).max() < 0.03 * np.abs(want).max()
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    ort.InferenceSession(out.SerializeToString(), options, providers=["CPUExecutionProvider"])
    fused = collections.Counter(
        n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node
    )
    # a private DynamicQuantizeLinear fuses whole; a shared one stays and its readers fuse
    assert fused["DynamicQuantizeMatMul"] + fused["MatMulIntegerToFloat"] == 3
    assert fused["MatMulInteger"] == 0 and fused["DynamicQuantizeLinear"] == 1


def test_gathered_rows_equal_the_dequantized_table():
    from onnxsqueeze.qmath import quantize_per_channel

    proto = _model()
    model = ir.serde.deserialize_model(proto)
    QuantizeDynamicPass(op_types=("Gather",), min_elements=256)(model)
    q, qp = quantize_per_channel(onnx.numpy_helper.to_array(proto.graph.initializer[0]), 0)
    table = q.astype(np.float32) * qp.scale[:, None]
    ids = RNG.integers(0, 100, (2, 5)).astype(np.int64)
    reference = proto.__class__()
    reference.CopyFrom(proto)
    reference.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(table, "table"))
    got = _run(ir.serde.serialize_model(model), {"ids": ids})
    want = _run(reference, {"ids": ids})
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_excluded_and_small_weights_stay_float():
    model = ir.serde.deserialize_model(_model())
    stats = QuantizeDynamicPass(exclude_nodes=("",), min_elements=10_000)(model).stats
    assert stats["nodes_quantized"] == 0
    assert all("below" in reason for reason in stats["kept_float"].values())
