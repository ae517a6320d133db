"""--quantize dynamic covers MatMul/Gemm and tables; the Conv filters and LSTM weights it
leaves float go int8 in the fold form where the budget holds (a conv + LSTM recogniser was
left at 0.99x its file, as a user who asked for dynamic does not expect)."""

from __future__ import annotations

import numpy as np
import pytest

import onnxsqueeze

torch = pytest.importorskip("torch")


class ConvLstm(torch.nn.Module):
    """A text-line recogniser's shape: convolutions, a bidirectional LSTM, a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.cnn = torch.nn.Sequential(
            torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d((2, 1)),
            torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d((4, 1)),
        )  # fmt: skip
        self.rnn = torch.nn.LSTM(64 * 2, 128, bidirectional=True, batch_first=True)
        self.fc = torch.nn.Linear(256, 20)

    def forward(self, x):
        f = self.cnn(x)
        n, c, h, w = f.shape
        y, _ = self.rnn(f.permute(0, 3, 1, 2).reshape(n, w, c * h))
        return self.fc(y).softmax(-1)


def test_dynamic_leaves_no_large_float_weight(tmp_path):
    torch.manual_seed(0)
    source = tmp_path / "crnn.onnx"
    x = torch.randn(1, 1, 16, 24)
    torch.onnx.export(ConvLstm().eval(), (x,), str(source), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"])  # fmt: skip
    rng = np.random.default_rng(0)
    data = [{"x": rng.standard_normal((1, 1, 16, 24)).astype(np.float32)} for _ in range(32)]
    out = tmp_path / "dynamic.onnx"
    report = onnxsqueeze.squeeze_file(source, out, data=data, quantize="dynamic")
    assert report.quantization["applied"] and report.held_out["met"]
    assert report.quantization["float_weights"].endswith("int8 (fold)")
    assert out.stat().st_size <= 0.3 * source.stat().st_size
