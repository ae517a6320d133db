"""Optional extras (a framework, its converter, Ray): imported when a feature needs them,
with a one-line error naming the pip command when they are not installed."""

from __future__ import annotations

import importlib
from typing import Any

from onnxsqueeze.core.errors import MissingDependencyError


def require(module: str, extra: str, what: str) -> Any:
    """``module`` imported, or a one-line error naming the pip command."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependencyError(
            f"{what} needs {module.split('.')[0]}: pip install 'onnxsqueeze[{extra}]'"
        ) from None
