"""The path README examples used before the engine moved into rooms: ``Budget`` now lives in
``onnxsqueeze.stages.budget`` (also ``onnxsqueeze.Budget``). Kept so that code written
against the old path keeps working."""

from onnxsqueeze.stages.budget import DEFAULT_BUDGET, Budget

__all__ = ["DEFAULT_BUDGET", "Budget"]
