"""Front doors from the frameworks: export a PyTorch, Keras/TensorFlow or scikit-learn model,
squeeze it, and judge both the export and the squeezed model against the framework model's
own outputs. Each framework is an optional extra, imported only when its door is used."""

from __future__ import annotations

from typing import Any

_DOORS = {
    "from_torch": "onnxsqueeze.frameworks.torch_door",
    "from_keras": "onnxsqueeze.frameworks.keras_door",
    "from_sklearn": "onnxsqueeze.frameworks.sklearn_door",
}

__all__ = list(_DOORS)


def __getattr__(name: str) -> Any:
    module = _DOORS.get(name)
    if module is None:
        raise AttributeError(f"module 'onnxsqueeze.frameworks' has no attribute '{name}'")
    import importlib

    return getattr(importlib.import_module(module), name)
