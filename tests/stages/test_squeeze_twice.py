"""Squeezing a squeezed model again changes nothing, in every mode: what a run ships leaves
no duplicate constant, float weight or Cast chain for a second run to find."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxsqueeze
from tests.passes.test_quantize_lstm import FEATURES, STEPS, _lstm_model
from tests.passes.test_shared_weights import _data, _unrolled

REPO = Path(__file__).resolve().parents[2]
MODES = ["auto", "dynamic", "static", "weights-int8", "weights-int4", "fp16"]


def _graph(path: Path) -> tuple:
    model = onnx.load(path)
    nodes = [(n.op_type, tuple(n.input), tuple(n.output)) for n in model.graph.node]
    weights = sorted(
        (i.name, onnx.numpy_helper.to_array(i).tobytes()) for i in model.graph.initializer
    )
    return nodes, weights


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("model", ["digits", "unrolled-rnn", "lstm"])
def test_a_second_squeeze_changes_nothing(tmp_path, model, mode):
    if model == "digits":
        source, data = REPO / "models" / "digits_cnn.onnx", str(REPO / "models" / "digits_test.npz")
    elif model == "lstm":  # dynamic: DynamicQuantizeLSTM, found no LSTM left the second time
        source, rng = tmp_path / "lstm.onnx", np.random.default_rng(2)
        onnx.save(_lstm_model(), source)
        data = [
            {"x": rng.standard_normal((STEPS, 1, FEATURES)).astype(np.float32)} for _ in "x" * 16
        ]
    else:
        source, data = tmp_path / "rnn.onnx", _data()
        _unrolled(source)
    once, twice = tmp_path / "once.onnx", tmp_path / "twice.onnx"
    onnxsqueeze.squeeze_file(source, once, data=data, quantize=mode, strict=False)
    onnxsqueeze.squeeze_file(once, twice, data=data, quantize=mode, strict=False)
    assert _graph(twice) == _graph(once)
    assert twice.stat().st_size <= once.stat().st_size


@pytest.mark.parametrize("first", ["dynamic", "static", "weights-int8"])
def test_auto_leaves_a_quantized_model_as_it_is(tmp_path, first):
    """auto's choice is made for a float model: on a dynamic output it used to add weights-int8
    on the small weights dynamic leaves float on purpose (a 256-element head), and on a
    weights-int8 output to quantize the Convs its budget had kept float (MobileNetV2), each
    judged against a reference that was itself quantized. It ships the input's graph and
    says why."""
    source, data = tmp_path / "rnn.onnx", _data()
    _unrolled(source)
    once, twice = tmp_path / "once.onnx", tmp_path / "twice.onnx"
    onnxsqueeze.squeeze_file(source, once, data=data, quantize=first)
    report = onnxsqueeze.squeeze_file(once, twice, data=data, quantize="auto")
    assert not report.quantization["applied"]
    assert report.quantization["reason"].startswith("the model is already quantized (")
    assert any("auto does not quantize it again" in w for w in report.warnings)
    assert _graph(twice) == _graph(once)


@pytest.mark.parametrize("second", ["weights-int8", "dynamic", "static"])
def test_a_budget_spent_once_is_not_spent_again(tmp_path, second):
    """The first squeeze kept some nodes float because the budget, judged against the float
    model, needed them; a second explicit mode judged against the quantized output would
    quantize them anyway (MobileNetV2 under static did). The output says which mode spent the
    budget, and no later mode quantizes it again."""
    source = REPO / "models" / "digits_cnn.onnx"
    data = str(REPO / "models" / "digits_test.npz")
    once, twice = tmp_path / "once.onnx", tmp_path / "twice.onnx"
    onnxsqueeze.squeeze_file(source, once, data=data, quantize="weights-int8")
    marks = {p.key: p.value for p in onnx.load(once).metadata_props}
    assert marks["onnxsqueeze.quantization"] == "weights-int8"
    report = onnxsqueeze.squeeze_file(once, twice, data=data, quantize=second, strict=False)
    assert not report.quantization["applied"]
    assert "(by onnxsqueeze: weights-int8, within a budget" in report.quantization["reason"]
    assert _graph(twice) == _graph(once)
