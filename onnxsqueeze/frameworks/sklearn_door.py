"""scikit-learn's front door: ``from_sklearn(estimator, X)`` through skl2onnx.

Pipelines, linear models and tree ensembles convert with skl2onnx; XGBoost and LightGBM
models with onnxmltools when it is installed. Classifiers export their probabilities as a
tensor (no ZipMap), so labels and probabilities are judged separately: labels by how many
agree with ``estimator.predict``, probabilities against ``predict_proba``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from onnxsqueeze.core.errors import ConversionError
from onnxsqueeze.core.optional import require
from onnxsqueeze.frameworks.door import (
    Export,
    as_proto,
    failure,
    squeeze_export,
    timed_export,
)

#: Booster families onnxmltools converts, by the module their estimator class comes from.
BOOSTERS = {"xgboost": "convert_xgboost", "lightgbm": "convert_lightgbm"}


def from_sklearn(
    estimator: Any,
    X: Any,
    *,
    data: Iterable[Any] | None = None,
    opset: int | None = None,
    **options: Any,
) -> tuple[Any, Any]:
    """Convert a fitted ``estimator`` (or Pipeline) for inputs like ``X`` and squeeze it;
    ``data``: more arrays like ``X``, predicted by the estimator too; ``options``:
    ``squeeze``'s. Returns (onnx.ModelProto, Report) with the conversion judged against
    ``estimator.predict`` (and ``predict_proba``)."""
    sklearn = require("sklearn", "sklearn", "from_sklearn")
    X = _matrix(X)
    export = _convert(sklearn, estimator, X, opset)
    (name,), outputs = export.names
    samples = [X] + [_matrix(d) for d in data or ()]
    feeds = [{name: x} for x in samples]
    reference = [_predictions(estimator, x, outputs, export.model) for x in samples]
    return as_proto(squeeze_export(export, feeds, reference, **options))


def _matrix(X: Any) -> np.ndarray:
    """Rows of float32 features (the converters' input type)."""
    array = np.asarray(X)
    if array.ndim != 2 or array.dtype.kind not in "fiub":
        raise ConversionError(f"X must be a 2-D numeric array of samples, got {array.dtype}"
                              f"{list(array.shape)}")  # fmt: skip
    return np.ascontiguousarray(array, dtype=np.float32)


def _convert(sklearn: Any, estimator: Any, X: np.ndarray, opset: int | None) -> Export:
    final = estimator.steps[-1][1] if hasattr(estimator, "steps") else estimator
    family = type(final).__module__.split(".")[0]
    if family in BOOSTERS and final is estimator:
        onnxmltools = require("onnxmltools", "sklearn", f"converting a {family} model")
        from onnxmltools.convert.common.data_types import FloatTensorType

        types = [("X", FloatTensorType([None, X.shape[1]]))]
        convert = getattr(onnxmltools, BOOSTERS[family])
        exporter = f"onnxmltools.{BOOSTERS[family]} {onnxmltools.__version__}"
        extra = {"zipmap": False} if family == "lightgbm" else {}  # probabilities as a tensor
        run = lambda: convert(estimator, initial_types=types, target_opset=opset, **extra)  # noqa: E731
    else:
        skl2onnx = require("skl2onnx", "sklearn", "from_sklearn")
        from skl2onnx.common.data_types import FloatTensorType

        types = [("X", FloatTensorType([None, X.shape[1]]))]
        exporter = f"skl2onnx.to_onnx {skl2onnx.__version__}"
        extra = {id(final): {"zipmap": False}} if hasattr(final, "predict_proba") else None
        run = lambda: skl2onnx.to_onnx(estimator, initial_types=types,  # noqa: E731
                                       target_opset=opset, options=extra)  # fmt: skip
    try:
        model, seconds = timed_export(run)
    except Exception as exc:  # noqa: BLE001 - the converter's refusal, said in one line
        raise ConversionError(f"{exporter}: cannot convert {type(estimator).__name__}: "
                              f"{failure(exc)}") from None  # fmt: skip
    return Export(model, f"scikit-learn {sklearn.__version__}", exporter, seconds)


def _predictions(estimator: Any, X: np.ndarray, outputs: list[str], model: Any) -> dict:
    """The estimator's answers by the ONNX outputs they correspond to: labels (predict)
    first, then probabilities (predict_proba) for a classifier; shaped like the outputs."""
    answers = [np.asarray(estimator.predict(X))]
    if len(outputs) > 1 and hasattr(estimator, "predict_proba"):
        answers.append(np.asarray(estimator.predict_proba(X)))
    shapes = {o.name: o.type.tensor_type for o in model.graph.output}
    out = {}
    for name, value in zip(outputs, answers, strict=False):
        rank = len(shapes[name].shape.dim)
        value = value.reshape(len(X), -1) if rank == 2 else value.reshape(len(X))
        if shapes[name].elem_type == 1:  # FLOAT: the converter computes in float32
            value = value.astype(np.float32)
        elif value.dtype.kind in "iub":
            value = value.astype(np.int64)
        out[name] = value
    return out
