"""Keras' and TensorFlow's front door: ``from_keras(model or path, sample)``.

A Keras 3 model (or a ``.keras`` file, loaded in Keras' safe mode: no code in it runs) is
exported by Keras' own ``model.export(format="onnx")``, which goes through the backend's
exporter: torch.onnx with the torch backend, tf2onnx with TensorFlow's. Without TensorFlow
installed, Keras runs on the torch backend, so a ``.keras`` file needs only ``keras`` and
``torch``. A TensorFlow SavedModel folder goes through tf2onnx from its serving signature.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from onnxsqueeze.core.errors import ConversionError, first_line
from onnxsqueeze.core.optional import require
from onnxsqueeze.frameworks.door import (
    Export,
    as_proto,
    failure,
    squeeze_export,
    timed_export,
)


def keras_module() -> Any:
    """Keras, on the torch backend when TensorFlow is not installed (set before the first
    import: Keras reads KERAS_BACKEND once)."""
    if "keras" not in sys.modules and importlib.util.find_spec("tensorflow") is None:
        os.environ.setdefault("KERAS_BACKEND", "torch")
    return require("keras", "tf", "from_keras")


def from_keras(
    model_or_path: Any,
    sample: Any,
    *,
    data: Iterable[Any] | None = None,
    opset: int | None = None,
    **options: Any,
) -> tuple[Any, Any]:
    """Export a Keras model, a ``.keras`` file or a SavedModel folder and squeeze it;
    ``sample`` (and each of ``data``): an array, or a list of arrays for a model of several
    inputs; ``options``: ``squeeze``'s. Returns (onnx.ModelProto, Report) with the
    conversion judged against the Keras (or TensorFlow) model's own outputs."""
    samples = [_arrays(sample)] + [_arrays(d) for d in data or ()]
    export, predict = _exported(model_or_path, opset)
    feeds = [dict(zip(export.names[0], s, strict=True)) for s in samples]
    reference = [predict(feed) for feed in feeds]
    return as_proto(squeeze_export(export, feeds, reference, **options))


def file_export(path: str, kind: str) -> tuple[Export, Any, list[dict]]:
    """A ``.keras`` file or a SavedModel folder exported, with ``predict(feed)`` running the
    framework model (and no example inputs of its own)."""
    if kind == "tflite":
        export, run = _tflite(path)
        return export, _by_name(export, run), []
    export, predict = _exported(path, None)
    return export, predict, []


def _exported(model_or_path: Any, opset: int | None) -> tuple[Export, Any]:
    """The export and ``predict(feed) -> outputs by name`` of a Keras model or file, or a
    SavedModel folder."""
    if isinstance(model_or_path, (str, os.PathLike)) and Path(model_or_path).is_dir():
        export, run = _saved_model(Path(model_or_path), opset)
    else:
        export, run = _keras(model_or_path, opset)
    return export, _by_name(export, run)


def _by_name(export: Export, run: Any) -> Any:
    """``run(arrays in input order) -> arrays in output order`` as ``predict(feed) -> dict``."""
    inputs, outputs = export.names

    def predict(feed: dict) -> dict:
        return dict(zip(outputs, run([feed[n] for n in inputs]), strict=False))

    return predict


def _arrays(sample: Any) -> list[np.ndarray]:
    items = sample if isinstance(sample, (list, tuple)) else [sample]
    return [np.asarray(x) for x in items]


def _keras(model_or_path: Any, opset: int | None) -> tuple[Export, Any]:
    keras = keras_module()
    model = model_or_path
    if isinstance(model_or_path, (str, os.PathLike)):
        try:
            model = keras.saving.load_model(model_or_path)  # safe_mode: no lambdas run
        except Exception as exc:  # noqa: BLE001 - Keras' refusal, in one line
            raise ConversionError(
                f"{model_or_path}: Keras cannot load it: {first_line(exc)}"
            ) from None
    import onnx

    _build(keras, model)
    with tempfile.TemporaryDirectory(prefix="onnxsqueeze-keras-") as folder:
        target = os.path.join(folder, "model.onnx")
        kwargs = {"opset_version": opset} if opset else {}
        try:
            _, seconds = timed_export(lambda: model.export(target, format="onnx", verbose=False,
                                                           **kwargs))  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - the exporter's refusal, in one line
            raise ConversionError(f"keras export(format='onnx'): {failure(exc)}") from None
        proto = onnx.load(target)
    backend = keras.backend.backend()
    export = Export(proto, f"keras {keras.__version__} ({backend} backend)",
                    f"keras Model.export(format='onnx') via {backend}", seconds)  # fmt: skip

    def predict(arrays: list[np.ndarray]) -> list[np.ndarray]:
        result = model(arrays if len(arrays) > 1 else arrays[0], training=False)
        leaves = result if isinstance(result, (list, tuple)) else [result]
        return [np.asarray(keras.ops.convert_to_numpy(t)) for t in leaves]

    return export, predict


def _build(keras: Any, model: Any) -> None:
    """Keras exports only a model that was called once: call it on zeros of its input
    shapes (a dynamic dimension as 1)."""
    inputs = getattr(model, "inputs", None)
    if not inputs:
        return
    zeros = [np.zeros([d or 1 for d in t.shape], t.dtype or "float32") for t in inputs]
    model(zeros if len(zeros) > 1 else zeros[0], training=False)


def _saved_model(path: Path, opset: int | None) -> tuple[Export, Any]:
    tf = require("tensorflow", "tf", f"{path}: a SavedModel")
    tf2onnx = require("tf2onnx", "tf", f"{path}: a SavedModel")
    loaded = tf.saved_model.load(str(path))
    function = loaded.signatures.get("serving_default")
    if function is None:
        raise ConversionError(f"{path}: the SavedModel has no serving_default signature")
    names = sorted(function.structured_input_signature[1])
    specs = [function.structured_input_signature[1][n] for n in names]
    order = sorted(function.structured_outputs)

    def convert():
        signature = [
            tf.TensorSpec(s.shape, s.dtype, name=n) for n, s in zip(names, specs, strict=True)
        ]

        @tf.function(input_signature=signature)
        def serving(*xs):
            outputs = function(**dict(zip(names, xs, strict=True)))
            return [outputs[k] for k in order]

        model, _ = tf2onnx.convert.from_function(serving, input_signature=signature, opset=opset)
        return model

    try:
        proto, seconds = timed_export(convert)
    except Exception as exc:  # noqa: BLE001 - the converter's refusal, in one line
        raise ConversionError(f"tf2onnx: {path}: {failure(exc)}") from None
    export = Export(proto, f"tensorflow {tf.__version__}", f"tf2onnx {tf2onnx.__version__}",
                    seconds)  # fmt: skip

    def predict(arrays: list[np.ndarray]) -> list[np.ndarray]:
        result = function(**{n: tf.constant(a) for n, a in zip(names, arrays, strict=True)})
        return [result[k].numpy() for k in order]

    return export, predict


def _tflite(path: str) -> tuple[Export, Any]:
    """A ``.tflite`` flatbuffer through tf2onnx, run by TensorFlow Lite's interpreter."""
    tf = require("tensorflow", "tf", f"{path}: a .tflite model")
    tf2onnx = require("tf2onnx", "tf", f"{path}: a .tflite model")
    try:
        proto, seconds = timed_export(lambda: tf2onnx.convert.from_tflite(str(path))[0])
    except Exception as exc:  # noqa: BLE001 - the converter's refusal, in one line
        raise ConversionError(f"tf2onnx: {path}: {failure(exc)}") from None
    export = Export(proto, f"tensorflow lite {tf.__version__}", f"tf2onnx {tf2onnx.__version__}",
                    seconds)  # fmt: skip
    interpreter = tf.lite.Interpreter(model_path=str(path))
    by_name = {d["name"]: d for d in interpreter.get_input_details()}
    outputs = {d["name"]: d for d in interpreter.get_output_details()}
    names, order = export.names

    def run(arrays: list[np.ndarray]) -> list[np.ndarray]:
        for name, array in zip(names, arrays, strict=True):
            interpreter.resize_tensor_input(by_name[name]["index"], array.shape)
        interpreter.allocate_tensors()
        for name, array in zip(names, arrays, strict=True):
            interpreter.set_tensor(by_name[name]["index"], array)
        interpreter.invoke()
        return [interpreter.get_tensor(outputs[name]["index"]) for name in order]

    return export, run
