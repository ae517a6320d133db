"""From any framework: PyTorch, Keras/TensorFlow and scikit-learn models exported, squeezed,
and judged against the framework's own outputs on fresh inputs; an export that disagrees
with its framework model is caught by the conversion row; pickles are refused."""

from __future__ import annotations

import pickle

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxsqueeze
from onnxsqueeze.cli import main
from onnxsqueeze.core.errors import ConversionError, MissingDependencyError

RNG = np.random.default_rng(0)


def _run(proto: onnx.ModelProto, feeds: list[dict]) -> list[list[np.ndarray]]:
    onnx.checker.check_model(proto)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return [session.run(None, feed) for feed in feeds]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# ------------------------------------------------------------------ PyTorch

torch = pytest.importorskip("torch")


class ConvNet(torch.nn.Module):
    """Two Conv + BatchNorm + ReLU blocks and a linear classifier head."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
            torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.BatchNorm2d(64), torch.nn.ReLU(),
        )  # fmt: skip
        self.head = torch.nn.Linear(64, 10)
        for module in self.body:
            if isinstance(module, torch.nn.BatchNorm2d):  # statistics a trained net has
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        return self.head(self.body(x).mean((2, 3)))


class Block(torch.nn.Module):
    """A pre-norm transformer block: self-attention and an MLP, each behind a LayerNorm."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.norm1, self.norm2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        self.attention = torch.nn.MultiheadAttention(width, 4, batch_first=True)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(width, 4 * width), torch.nn.GELU(), torch.nn.Linear(4 * width, width)
        )

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attention(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


def _torch_samples(shape, count):
    return [
        (torch.from_numpy(RNG.standard_normal(shape).astype(np.float32)),) for _ in range(count)
    ]


@pytest.mark.parametrize("net", ["cnn", "block"])
def test_from_torch_agrees_with_the_module_on_fresh_inputs(net):
    torch.manual_seed(0)
    module = ConvNet() if net == "cnn" else Block()
    shape = (2, 3, 16, 16) if net == "cnn" else (2, 12, 64)
    dynamic = ({0: torch.export.Dim("batch")},)
    data = _torch_samples(shape, 24)
    proto, report = onnxsqueeze.from_torch(
        module, data[0], data=data[1:], dynamic_shapes=dynamic, quantize="auto"
    )
    conversion = report.conversion
    assert conversion["exporter"] == "torch.onnx.export(dynamo=True)" and conversion["holds"]
    assert conversion["exported_vs_framework"]["samples"] == 24
    assert "squeezed_vs_framework" in conversion
    assert report.to_table().startswith("conversion: torch ")
    fresh = _torch_samples((5,) + shape[1:], 8)  # another batch size: the axis stayed dynamic
    name = proto.graph.input[0].name
    outputs = _run(proto, [{name: x.numpy()} for (x,) in fresh])
    with torch.no_grad():
        for (x,), (y,) in zip(fresh, outputs, strict=True):
            assert _cosine(module(x).numpy(), y) >= 0.99


def test_a_pt2_program_through_the_cli(tmp_path, capsys):
    torch.manual_seed(0)
    module = ConvNet().eval()
    batch = torch.export.Dim("batch")
    example = (torch.randn(2, 3, 16, 16),)
    program = torch.export.export(module, example, dynamic_shapes=({0: batch},))
    path = tmp_path / "net.pt2"
    torch.export.save(program, path)
    data = tmp_path / "data"
    data.mkdir()
    name = "x"
    for index, (x,) in enumerate(_torch_samples((2, 3, 16, 16), 20)):
        np.savez(data / f"{index:02d}.npz", **{name: x.numpy()})
    out = tmp_path / "small.onnx"
    assert main([str(path), "-o", str(out), "--data", str(data)]) == 0
    table = capsys.readouterr().out
    assert "conversion: torch " in table and "exported vs torch" in table
    proto = onnx.load(out)
    fresh = _torch_samples((3, 3, 16, 16), 4)
    outputs = _run(proto, [{proto.graph.input[0].name: x.numpy()} for (x,) in fresh])
    with torch.no_grad():
        for (x,), (y,) in zip(fresh, outputs, strict=True):
            assert _cosine(module(x).numpy(), y) >= 0.99


def test_an_export_that_fixed_a_dynamic_dimension_is_caught():
    """Exported on batch 2 without dynamic_shapes, the ONNX model takes only batch 2; the
    module takes any: the conversion row names the sample and the cure."""
    module = ConvNet()
    first = _torch_samples((2, 3, 16, 16), 1)[0]
    other = _torch_samples((3, 3, 16, 16), 1)
    with pytest.raises(ConversionError, match="rejects sample 1 .* dynamic_shapes="):
        onnxsqueeze.from_torch(module, first, data=other)


class Branchy(torch.nn.Module):
    """A branch on the data: dynamo refuses it, TorchScript's tracer bakes in the branch the
    example took."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(8, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.linear(x) * 2
        return self.linear(x)


def test_a_traced_fallback_that_baked_in_a_branch_is_caught():
    positive, negative = torch.ones(2, 8), -torch.ones(2, 8)
    with pytest.raises(ConversionError) as caught:
        onnxsqueeze.from_torch(Branchy(), positive, data=[negative])
    message = str(caught.value)
    assert message.startswith("torch.onnx.export(dynamo=False): the exported ONNX model differs")
    assert "the dynamo exporter failed" in message and "\n" not in message


def test_an_export_whose_numbers_differ_is_caught():
    """The conversion row compares the export with the framework's outputs: a reference
    the export does not compute (here a framework model that scales its answer) is named."""
    from onnxsqueeze.frameworks.door import Export, squeeze_export

    module = ConvNet().eval()
    program = torch.onnx.export(module, _torch_samples((2, 3, 16, 16), 1)[0], dynamo=True)
    feeds = [
        {program.model.graph.inputs[0].name: x.numpy()}
        for (x,) in _torch_samples((2, 3, 16, 16), 4)
    ]
    output = program.model.graph.outputs[0].name
    with torch.no_grad():
        drifted = [
            {output: 1.05 * module(torch.from_numpy(f[next(iter(f))])).numpy()} for f in feeds
        ]
    export = Export(program.model, "torch (drifted)", "a test exporter", 0.0)
    with pytest.raises(ConversionError, match="differs from the torch .drifted. model"):
        squeeze_export(export, feeds, drifted)
    _, report = squeeze_export(export, feeds, drifted, strict=False)
    assert not report.conversion["holds"] and "DIFFERS" in report.to_table()
    from onnxsqueeze.pipeline.html import squeeze_page

    assert "<h2>Conversion</h2>" in squeeze_page(report)


# ------------------------------------------------------------------ Keras / TensorFlow


def _keras_cnn():
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((16, 16, 3)),
        keras.layers.Conv2D(16, 3, activation="relu"), keras.layers.BatchNormalization(),
        keras.layers.Conv2D(32, 3, activation="relu"), keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(10, activation="softmax"),
    ])  # fmt: skip


def test_from_keras_model_file_and_saved_model(tmp_path):
    model = _keras_cnn()
    samples = [RNG.standard_normal((4, 16, 16, 3)).astype(np.float32) for _ in range(24)]
    fresh = [RNG.standard_normal((3, 16, 16, 3)).astype(np.float32) for _ in range(6)]
    expected = [np.asarray(model(x, training=False)) for x in fresh]
    model.save(tmp_path / "cnn.keras")
    sources = [model, str(tmp_path / "cnn.keras")]
    tf = pytest.importorskip("tensorflow") if _has("tensorflow") else None
    if tf is not None:
        tf.saved_model.save(model, str(tmp_path / "saved"))
        sources.append(str(tmp_path / "saved"))
    for source in sources:
        proto, report = onnxsqueeze.from_keras(
            source, samples[0], data=samples[1:], quantize="auto"
        )
        assert report.conversion["holds"], report.conversion
        outputs = _run(proto, [{proto.graph.input[0].name: x} for x in fresh])
        agree = np.mean(
            [
                np.mean(e.argmax(-1) == y[0].argmax(-1))
                for e, y in zip(expected, outputs, strict=True)
            ]
        )
        assert agree >= 0.99
        assert min(_cosine(e, y[0]) for e, y in zip(expected, outputs, strict=True)) >= 0.99


def test_a_tflite_file_through_the_cli(tmp_path, capsys):
    tf = pytest.importorskip("tensorflow")
    model = _keras_cnn()
    model(np.zeros((1, 16, 16, 3), np.float32))
    path = tmp_path / "cnn.tflite"
    path.write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    out = tmp_path / "small.onnx"
    assert main([str(path), "-o", str(out)]) == 0
    table = capsys.readouterr().out
    assert "conversion: tensorflow lite" in table and "by tf2onnx" in table
    proto = onnx.load(out)
    fresh = [RNG.standard_normal((1, 16, 16, 3)).astype(np.float32) for _ in range(4)]
    outputs = _run(proto, [{proto.graph.input[0].name: x} for x in fresh])
    for x, (y,) in zip(fresh, outputs, strict=True):
        assert _cosine(np.asarray(model(x, training=False)), y) >= 0.99


def test_the_squeezed_model_is_judged_by_the_framework_budget():
    from onnxsqueeze.frameworks.reference import budget_miss
    from onnxsqueeze.stages.budget import DEFAULT_BUDGET

    close = {"outputs": {"y": {"max_rel": 1e-3, "cosine": 0.999}}}
    far = {"outputs": {"y": {"max_rel": 0.1, "cosine": 0.99},
                       "label": {"label_agreement": 1.0, "labels": 10}}}  # fmt: skip
    flips = {"outputs": {"label": {"label_agreement": 0.9, "labels": 10}}}
    assert budget_miss(close, DEFAULT_BUDGET) is None
    assert budget_miss(far, DEFAULT_BUDGET) == "y: cosine 0.99000 (min 0.997)"
    assert budget_miss(flips, DEFAULT_BUDGET) == "label: labels agree 90.00% (min 0.99)"


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# ------------------------------------------------------------------ scikit-learn


def _digits():
    sklearn = pytest.importorskip("sklearn.datasets")
    return sklearn.load_digits(return_X_y=True)


@pytest.mark.parametrize("kind", ["pipeline", "gradient-boosting", "lightgbm"])
def test_from_sklearn_labels_agree_on_fresh_rows(kind):
    from sklearn.ensemble import GradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, y = _digits()
    if kind == "pipeline":
        estimator = make_pipeline(StandardScaler(), LogisticRegression(max_iter=300))
    elif kind == "gradient-boosting":
        estimator = GradientBoostingClassifier(n_estimators=20, max_depth=3, random_state=0)
    else:
        lightgbm = pytest.importorskip("lightgbm")
        estimator = lightgbm.LGBMClassifier(n_estimators=20, verbose=-1, random_state=0)
    estimator.fit(X[:1200], y[:1200])
    proto, report = onnxsqueeze.from_sklearn(
        estimator, X[:400], data=[X[i : i + 50] for i in range(400, 1200, 50)], quantize="auto"
    )
    assert report.conversion["holds"]
    labels = report.conversion["squeezed_vs_framework"]["outputs"]["label"]
    assert labels["label_agreement"] >= 0.99
    fresh = X[1200:].astype(np.float32)
    (predicted, probabilities), = _run(proto, [{proto.graph.input[0].name: fresh}])  # fmt: skip
    assert np.mean(predicted == estimator.predict(fresh)) >= 0.99
    assert _cosine(probabilities, estimator.predict_proba(fresh)) >= 0.99


def test_a_missing_extra_is_one_line_naming_pip(monkeypatch):
    import importlib

    real = importlib.import_module

    def without_skl2onnx(name, *args, **kwargs):
        if name == "skl2onnx":
            raise ImportError("No module named 'skl2onnx'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", without_skl2onnx)
    from sklearn.linear_model import LinearRegression

    X, y = _digits()
    with pytest.raises(MissingDependencyError, match=r"pip install 'onnxsqueeze\[sklearn\]'"):
        onnxsqueeze.from_sklearn(LinearRegression().fit(X, y), X[:10])


# ------------------------------------------------------------------ files that run code


@pytest.mark.parametrize("kind", ["pickle", "state-dict"])
def test_pickles_are_refused_before_anything_runs(tmp_path, capsys, kind):
    path = tmp_path / ("model.pkl" if kind == "pickle" else "weights.pt")
    if kind == "pickle":
        path.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    else:
        torch.save(ConvNet().state_dict(), path)
    out = tmp_path / "o.onnx"
    assert main([str(path), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "runs code when it is loaded" in err and "torch.export.save" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()
