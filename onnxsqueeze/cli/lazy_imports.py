"""Defer heavy imports that a command line run rarely needs.

onnx_ir imports sympy at module load (0.4 s here, a third of a small model's run) for
symbolic shape arithmetic that squeezing never does: ``onnx_ir._symbolic_shapes`` reads
``sympy.Max`` at import time. The CLI owns its process, so it puts stand-ins for both in
``sys.modules``: the real module is imported on the first attribute that the stand-in lacks,
if ever. (``importlib.util.LazyLoader`` does not help: ``import x`` reads ``x.__spec__``,
which loads it.) Library callers are left alone: their process may rely on import side
effects we cannot see.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Any

#: Deferred in this order; each is skipped when already imported or not installed.
HEAVY = ("onnx_ir._symbolic_shapes", "sympy")


class _Deferred(types.ModuleType):
    """Stands in for a module until one of its attributes is read."""

    def __getattr__(self, attribute: str) -> Any:
        if sys.modules.get(self.__name__) is self:
            del sys.modules[self.__name__]
        real = importlib.import_module(self.__name__)
        self.__dict__.update(real.__dict__)
        return getattr(real, attribute)


def defer(module_name: str) -> bool:
    """Put a stand-in for ``module_name`` in sys.modules; False if imported or not found."""
    if module_name in sys.modules or not _installed(module_name):
        return False
    stand_in = _Deferred(module_name)
    stand_in.__spec__ = None  # the import system checks __spec__; it must not load here
    sys.modules[module_name] = stand_in
    return True


def defer_heavy_imports() -> None:
    for name in HEAVY:
        defer(name)


def _installed(module_name: str) -> bool:
    """Whether the module exists, found without importing its package."""
    package, _, tail = module_name.partition(".")
    spec = importlib.util.find_spec(package)
    if spec is None:
        return False
    if not tail:
        return True
    if "." in tail or not spec.submodule_search_locations:
        return False
    from pathlib import Path

    return any(Path(d, tail + ".py").is_file() for d in spec.submodule_search_locations)
