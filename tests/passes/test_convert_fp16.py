"""convert-fp16: valid by construction (schema type variables), casts at float32 borders,
fixed-type inputs such as Resize's scales untouched, out-of-range weights kept float32."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxsqueeze.passes.convert_fp16 import ConvertFp16Pass

RNG = np.random.default_rng(5)

TEXT = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[1, 3, 8, 8] x) => (float[1, 4, 16, 16] y, float[1, 4] s) {
    c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
    r = Relu (c)
    scales = Constant <value = float[4] {1.0, 1.0, 2.0, 2.0}> ()
    y = Resize <mode = "nearest"> (r, , scales)
    m = ReduceMean <axes = [2, 3], keepdims = 0> (r)
    s = Mul (m, k)
}
"""


def _model(w_scale: float = 1.0) -> onnx.ModelProto:
    proto = onnx.parser.parse_model(TEXT)
    for name, array in (
        ("w", RNG.standard_normal((4, 3, 3, 3)).astype(np.float32) * w_scale),
        ("b", RNG.standard_normal(4).astype(np.float32)),
        ("k", RNG.standard_normal((1, 4)).astype(np.float32)),
    ):
        proto.graph.initializer.append(onnx.numpy_helper.from_array(array, name))
    onnx.checker.check_model(proto)
    return proto


def _convert(proto: onnx.ModelProto, **options) -> tuple[onnx.ModelProto, dict]:
    model = ir.serde.deserialize_model(proto)
    stats = ConvertFp16Pass(**options)(model).stats
    out = ir.serde.serialize_model(model)
    onnx.checker.check_model(out, full_check=True)
    return out, stats


def _run(proto: onnx.ModelProto, feed: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def test_fp16_graph_is_valid_and_close_with_float32_interface():
    proto = _model()
    out, stats = _convert(proto)
    inits = {t.name: t.data_type for t in out.graph.initializer}
    assert inits["w_fp16"] == onnx.TensorProto.FLOAT16 and "w" not in inits
    nodes = {n.op_type: n for n in out.graph.node}
    resize = nodes["Resize"]
    producers = {o: n for n in out.graph.node for o in n.output}
    scales = producers[resize.input[2]]
    # scales is tensor(float) in Resize's schema: its Constant stays float32
    assert (
        scales.op_type == "Constant" and scales.attribute[0].t.data_type == onnx.TensorProto.FLOAT
    )
    # ReduceMean is kept float32 by default (sums lose the most in 16 bits): a cast feeds it
    assert producers[nodes["ReduceMean"].input[0]].op_type == "Cast"
    assert [i.type.tensor_type.elem_type for i in out.graph.input] == [onnx.TensorProto.FLOAT]
    assert [o.name for o in out.graph.output] == ["y", "s"]
    assert stats["converted"] >= 3 and stats["casts"] >= 3
    feed = {"x": RNG.standard_normal((1, 3, 8, 8)).astype(np.float32)}
    for got, want in zip(_run(out, feed), _run(proto, feed), strict=True):
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=0, atol=0.01 * np.abs(want).max())


def test_weights_beyond_fp16_range_keep_their_node_float32():
    out, stats = _convert(_model(w_scale=1e6))
    conv = next(n for n in out.graph.node if n.op_type == "Conv")
    inits = {t.name: t.data_type for t in out.graph.initializer}
    assert inits[conv.input[1]] == onnx.TensorProto.FLOAT
    assert stats["clamped_weights"] == 0


def test_bfloat16_and_io_in_16_bits():
    out, _ = _convert(_model(), keep_io=False)
    assert out.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    bf, _ = _convert(_model(), dtype="bfloat16")
    types = {t.data_type for t in bf.graph.initializer}
    assert onnx.TensorProto.BFLOAT16 in types
    with pytest.raises(ValueError, match="dtype"):
        _convert(_model(), dtype="float8")
    assert collections.Counter(n.op_type for n in bf.graph.node)["Cast"] >= 2


TRANSPOSE_MATMUL = """
<ir_version: 8, opset_import: ["" : 17]>
tm (float[4, s, 8] x) => (float[s, 4, 8] y)
<float[8, 8] W = {1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0,
                  0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0,
                  0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1}>
{
  t = Transpose <perm = [1, 0, 2]> (x)
  y = MatMul (t, W)
}
"""


def test_a_16_bit_model_onnxruntime_crashes_on_is_reported_not_loaded(tmp_path):
    """onnxruntime 1.32 segfaults loading a float16 Transpose -> MatMul at its default
    optimizations (found on a PyTorch TransformerEncoder export). The fp16 stage loads its
    draft in a child process first: where it crashes, the stage reports why and keeps
    float32 instead of taking this process down; where it loads, fp16 applies."""
    import subprocess
    import sys

    import onnxsqueeze
    from onnxsqueeze.run.session import crashes_onnxruntime

    model = onnx.parser.parse_model(TRANSPOSE_MATMUL)
    assert crashes_onnxruntime(ir.serde.deserialize_model(model)) is None
    data = [
        {"x": np.random.default_rng(i).standard_normal((4, 3, 8)).astype(np.float32)}
        for i in range(4)
    ]
    result = onnxsqueeze.squeeze(model, data=data, quantize="fp16")
    record = result.report.quantization
    if record["applied"]:
        path = str(tmp_path / "fp16.onnx")
        onnx.save(result.model, path)
        code = f"import onnxruntime as o; o.InferenceSession({path!r}, providers=['CPUExecutionProvider'])"
        assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
    else:
        assert "onnxruntime crashed loading it (signal" in record["reason"], record
        assert result.model.graph.node[-1].op_type == "MatMul"  # float32, as given
        # the pass on its own (--passes convert-fp16) is rolled back the same way
        (step,) = onnxsqueeze.squeeze(model, passes=["convert-fp16"]).report.passes
        assert step.status == "rolled-back" and "crashed" in step.reason


def test_an_epsilon_below_float16_keeps_its_sign_not_zero():
    """BERT's LayerNorm epsilon (1e-12) flushed to 0 in float16: ``var + 0`` is not what was
    exported (a zero variance divides by zero), and a second squeeze simplified the Add away,
    so squeezing the fp16 output again changed it."""
    proto = onnx.parser.parse_model("""
<ir_version: 8, opset_import: ["" : 17]>
g (float[2, 8] x) => (float[2, 8] y) <float eps = {1e-12}, float[8] w = {1, -2, 3, -4, 1e-9, -1e-9, 0, 7}> {
    a = Add (x, eps)
    y = Mul (a, w)
}""")  # fmt: skip
    out, stats = _convert(proto)
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in out.graph.initializer}
    (eps,) = (a for n, a in weights.items() if n.startswith("eps"))
    (w,) = (a for n, a in weights.items() if n.startswith("w"))
    tiny = np.finfo(np.float16).smallest_subnormal
    assert eps.dtype == np.float16 and eps == tiny
    assert list(w[4:7]) == [tiny, -tiny, 0] and list(w[:4]) == [1, -2, 3, -4]
    assert stats["clamped_weights"] == 3
