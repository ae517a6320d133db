"""Low-rank factorization under the accuracy budget: the configuration (``config``), the
stage with its family of layers for the shared search (``stage``), and the stage as the API
runs it (``driver``)."""

from onnxsqueeze.stages.factorize.config import (
    FactorizeConfig,
    FactorizeOutcome,
    factorize_config,
)
from onnxsqueeze.stages.factorize.driver import run_factorize_stage
from onnxsqueeze.stages.factorize.stage import factorize_model

__all__ = [
    "FactorizeConfig",
    "FactorizeOutcome",
    "factorize_config",
    "factorize_model",
    "run_factorize_stage",
]
