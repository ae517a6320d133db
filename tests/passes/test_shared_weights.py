"""A weight several nodes read (an RNN unrolled into one Gemm per time step) is quantized
once, every reader reading its one copy: no mode duplicates a weight, and the file shrinks."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh
import pytest

import onnxsqueeze

WIDTH, STEPS = 256, 8


def _unrolled(path, op: str = "Gemm") -> None:
    """h_t = tanh(h_{t-1} W^T + b) for STEPS steps, W and b shared by every step."""
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32)
    bias = (0.1 * rng.standard_normal(WIDTH)).astype(np.float32)
    nodes, previous = [], "x"
    for step in range(STEPS):
        if op == "Gemm":
            nodes.append(oh.make_node("Gemm", [previous, "W", "b"], [f"g{step}"], transB=1))
        else:
            nodes.append(oh.make_node("MatMul", [previous, "W"], [f"m{step}"]))
            nodes.append(oh.make_node("Add", [f"m{step}", "b"], [f"g{step}"]))
        nodes.append(oh.make_node("Tanh", [f"g{step}"], [f"h{step}"]))
        previous = f"h{step}"
    graph = oh.make_graph(
        nodes, "unrolled",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", WIDTH])],
        [oh.make_tensor_value_info(previous, onnx.TensorProto.FLOAT, ["n", WIDTH])],
        [nh.from_array(weight, "W"), nh.from_array(bias, "b")],
    )  # fmt: skip
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)


def _data() -> list[dict]:
    rng = np.random.default_rng(1)
    return [{"x": rng.standard_normal((4, WIDTH)).astype(np.float32)} for _ in range(32)]


@pytest.mark.parametrize("op", ["Gemm", "MatMul"])
@pytest.mark.parametrize("mode", ["dynamic", "static", "weights-int8", "weights-int4", "fp16"])
def test_no_mode_duplicates_a_shared_weight(tmp_path, mode, op):
    source, out = tmp_path / "rnn.onnx", tmp_path / "out.onnx"
    _unrolled(source, op)
    report = onnxsqueeze.squeeze_file(source, out, data=_data(), quantize=mode, strict=False)
    model = onnx.load(out)
    big = [i.name for i in model.graph.initializer if np.prod(i.dims) >= WIDTH * WIDTH // 2]
    assert len(big) <= 1, (mode, big)  # one copy of W (float, fp16, int8 or packed int4)
    if report.quantization["applied"]:
        assert out.stat().st_size < source.stat().st_size, mode
        if mode in ("dynamic", "static"):  # every step's node quantized, reading one copy
            assert report.quantization["quantized"] == STEPS


def test_dynamic_on_an_unrolled_rnn_is_a_quarter_of_it(tmp_path):
    source, out = tmp_path / "rnn.onnx", tmp_path / "out.onnx"
    _unrolled(source)
    report = onnxsqueeze.squeeze_file(source, out, data=_data(), quantize="dynamic")
    assert report.quantization["applied"]
    assert out.stat().st_size < 0.3 * source.stat().st_size
