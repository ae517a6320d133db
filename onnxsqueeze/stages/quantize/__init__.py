"""Quantization under the accuracy budget: the configuration (``config``), its candidates and
builds as a family of the shared search (``family``), one configuration's search
(``stage``), what becomes of the weights the budget kept float (``kept_float``), the
weight-only settings (``weight_only``), auto's alternatives (``alternatives``) and the stage
as the API runs it (``driver``)."""

from onnxsqueeze.stages.quantize.config import CHOICES, MODES, QuantizeConfig, QuantizeOutcome
from onnxsqueeze.stages.quantize.driver import run_quantize_stage
from onnxsqueeze.stages.quantize.stage import quantize_model

__all__ = [
    "CHOICES",
    "MODES",
    "QuantizeConfig",
    "QuantizeOutcome",
    "quantize_model",
    "run_quantize_stage",
]
