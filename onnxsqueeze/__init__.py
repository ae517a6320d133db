"""onnxsqueeze: a framework-neutral ONNX model compressor that verifies what it does.

The public API is imported lazily so that ``import onnxsqueeze`` (and ``onnxsqueeze --help``)
stays fast: onnx, onnx_ir and onnxruntime load only when a model is touched.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "squeeze": "onnxsqueeze.api",
    "squeeze_file": "onnxsqueeze.api",
    "calibrate": "onnxsqueeze.api",
    "Squeezed": "onnxsqueeze.api",
    "Report": "onnxsqueeze.pipeline.report",
    "QuantizeConfig": "onnxsqueeze.stages.quantize",
    "Budget": "onnxsqueeze.stages.budget",
    "load_model": "onnxsqueeze.core.io",
    "save_model": "onnxsqueeze.core.io",
    "SqueezeError": "onnxsqueeze.core.errors",
    "from_torch": "onnxsqueeze.frameworks.torch_door",
    "from_keras": "onnxsqueeze.frameworks.keras_door",
    "from_sklearn": "onnxsqueeze.frameworks.sklearn_door",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'onnxsqueeze' has no attribute '{name}'")
    import importlib

    return getattr(importlib.import_module(module), name)
