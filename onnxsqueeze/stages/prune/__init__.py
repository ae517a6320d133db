"""Pruning under the accuracy budget: the configuration (``config``), the stage with its
families for the shared search (``stage``), and the stage as the API runs it (``driver``)."""

from onnxsqueeze.stages.prune.config import PruneConfig, PruneOutcome, prune_config
from onnxsqueeze.stages.prune.driver import run_prune_stage
from onnxsqueeze.stages.prune.stage import prune_model

__all__ = ["PruneConfig", "PruneOutcome", "prune_config", "prune_model", "run_prune_stage"]
