"""The path README examples used before the engine moved into rooms: ``QuantizeConfig`` and
``quantize_model`` now live in ``onnxsqueeze.stages.quantize`` (also ``onnxsqueeze.QuantizeConfig``).
Kept so that code written against the old path keeps working."""

from onnxsqueeze.stages.quantize import (
    CHOICES,
    MODES,
    QuantizeConfig,
    QuantizeOutcome,
    quantize_model,
)

__all__ = ["CHOICES", "MODES", "QuantizeConfig", "QuantizeOutcome", "quantize_model"]
