"""--quantize dynamic on a recurrent model: its LSTMs run onnxruntime's DynamicQuantizeLSTM
(int8 weights, 2.9x float's speed on a 2-layer bidirectional LSTM here) instead of keeping
float weights folded at load, within the budget like every other candidate node."""

from __future__ import annotations

import numpy as np
import onnx

import onnxsqueeze
from onnxsqueeze.stages.budget import Budget
from onnxsqueeze.stages.quantize import QuantizeConfig
from tests.passes.test_quantize_lstm import FEATURES, STEPS, _lstm_model


def _feeds(n: int = 16) -> list[dict]:
    rng = np.random.default_rng(4)
    return [{"x": rng.standard_normal((STEPS, 1, FEATURES)).astype(np.float32)} for _ in range(n)]


def test_dynamic_quantizes_lstms_and_the_file_shrinks_to_about_a_quarter(tmp_path):
    source, out = tmp_path / "lstm.onnx", tmp_path / "out.onnx"
    onnx.save(_lstm_model(), source)
    report = onnxsqueeze.squeeze_file(source, out, data=_feeds(), quantize="dynamic")
    q = report.quantization
    assert q["applied"] and q["budget_met"]
    assert {n["name"]: n["decision"] for n in q["nodes"]} == {
        "first": "quantized",
        "second": "quantized",
    }
    ops = [n.op_type for n in onnx.load(out).graph.node]
    assert ops.count("DynamicQuantizeLSTM") == 2 and "LSTM" not in ops
    assert report.file_bytes_after < 0.32 * report.file_bytes_before  # + float biases, scales


def test_an_lstm_the_budget_cannot_afford_stays_float(tmp_path):
    source, out = tmp_path / "lstm.onnx", tmp_path / "out.onnx"
    onnx.save(_lstm_model(), source)
    config = QuantizeConfig(mode="dynamic", budget=Budget(max_error=1e-6))  # int8 cannot hold it
    report = onnxsqueeze.squeeze_file(source, out, data=_feeds(), quantize=config, strict=False)
    ops = [n.op_type for n in onnx.load(out).graph.node]
    assert "DynamicQuantizeLSTM" not in ops and ops.count("LSTM") == 2
    assert not report.quantization["budget_met"]
