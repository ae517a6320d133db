"""fold-shapes on PyTorch dynamo's views: a Flatten exported as Reshape(x, Concat(batch,
C)) with allowzero=1, its batch read through Shape -> Squeeze -> Reshape([1]), folds to a
constant target with -1 (0 would mean a zero-sized dim under allowzero)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import onnxsqueeze

from conftest import parse

REPO = Path(__file__).resolve().parents[2]

VIEW = """
<ir_version: 8, opset_import: ["" : 18]>
g (float[batch, 4, 2, 2] x) => (float[batch, 16] y) <int64[1] one = {1}, int64[1] rest = {16}>
{
  full = Shape <start = 0, end = 1> (x)
  size = Squeeze(full)
  size1 = Reshape(size, one)
  target = Concat <axis = 0> (size1, rest)
  y = Reshape <allowzero = 1> (x, target)
}
"""


def test_a_dynamo_flatten_folds_to_a_constant_target(tmp_path):
    path = tmp_path / "view.onnx"
    onnx.save(parse(VIEW), path)
    x = np.random.default_rng(0).standard_normal((3, 4, 2, 2)).astype(np.float32)
    report = onnxsqueeze.squeeze_file(path, tmp_path / "o.onnx", ["fold-shapes", "cleanup"])
    model = onnx.load(tmp_path / "o.onnx")
    assert [n.op_type for n in model.graph.node] == ["Reshape"]
    target = next(i for i in model.graph.initializer if i.name == model.graph.node[0].input[1])
    assert list(onnx.numpy_helper.to_array(target)) == [-1, 16]
    run = ort.InferenceSession(str(tmp_path / "o.onnx")).run(None, {"x": x})[0]
    np.testing.assert_array_equal(run, x.reshape(3, 16))
    assert report.verification_status == "passed"


def test_a_literal_zero_under_allowzero_stays_computed(tmp_path):
    text = VIEW.replace("rest = {16}", "rest = {0}").replace(
        "float[batch, 16] y", "float[batch, 0] y"
    )
    path = tmp_path / "zero.onnx"
    onnx.save(parse(text), path)
    onnxsqueeze.squeeze_file(path, tmp_path / "o.onnx", ["fold-shapes"], verify=False)
    ops = [n.op_type for n in onnx.load(tmp_path / "o.onnx").graph.node]
    assert "Concat" in ops  # a 0 here is a zero-sized dim, not "copy": not rewritten


def test_the_shipped_digits_cnn_ends_as_small_as_onnxslim(tmp_path):
    """onnxslim ends this model at 9 nodes; so does the lossless preset now."""
    out = tmp_path / "o.onnx"
    report = onnxsqueeze.squeeze_file(
        REPO / "models" / "digits_cnn.onnx", out, data=str(REPO / "models" / "digits_test.npz")
    )
    assert report.verification_status == "passed"
    assert [n.op_type for n in onnx.load(out).graph.node] == [
        "Conv", "Relu", "Conv", "Relu", "MaxPool", "Reshape", "Gemm", "Relu", "Gemm",
    ]  # fmt: skip
