"""A model passed through unchanged is not written larger than it was given: no names on the
tensors of Constant nodes, no shape hints (value_info) the input file did not carry."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh

import onnxsqueeze

TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4] x) => (float[N, 2] y) {
    s = Constant <value = int64[2] {-1, 4}> ()
    r = Reshape (x, s)
    h = Relu (r)
    t = Constant <value = float[4, 2] {1, 2, 3, 4, 5, 6, 7, 8}> ()
    y = MatMul (h, t)
}
"""


def _squeezed(tmp_path, proto: onnx.ModelProto) -> tuple[onnx.ModelProto, int, int]:
    source, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(proto, source)
    data = [{"x": np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)}]
    onnxsqueeze.squeeze_file(source, out, passes=["cleanup"], data=data, quantize="none")
    return onnx.load(out), source.stat().st_size, out.stat().st_size


def test_a_model_without_shape_hints_gets_none(tmp_path):
    proto = onnx.parser.parse_model(TEXT)
    assert not proto.graph.value_info
    out, before, after = _squeezed(tmp_path, proto)
    assert not out.graph.value_info
    assert all(not a.t.name for n in out.graph.node for a in n.attribute if a.HasField("t"))
    assert after <= before


def test_a_model_with_shape_hints_keeps_them(tmp_path):
    proto = onnx.parser.parse_model(TEXT)
    proto.graph.value_info.append(oh.make_tensor_value_info("h", onnx.TensorProto.FLOAT, ["N", 4]))
    out, _, _ = _squeezed(tmp_path, proto)
    assert "h" in {v.name for v in out.graph.value_info}
