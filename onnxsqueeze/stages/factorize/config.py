"""What the factorize stage is asked to do (``FactorizeConfig``) and what it hands back."""

from __future__ import annotations

import dataclasses
from typing import Any

import onnx_ir as ir

from onnxsqueeze.core.errors import PipelineConfigError
from onnxsqueeze.lowrank.svd import DAMPING
from onnxsqueeze.stages.budget import DEFAULT_BUDGET, Budget
from onnxsqueeze.stages.search import SensitivityOptions

#: Gram matrices are summed over at most this many calibration samples.
GRAM_SAMPLES = 128


@dataclasses.dataclass(frozen=True)
class FactorizeConfig:
    """``mode``: "auto" (the fewest parameters the budget allows, shipped only if not slower
    than the model before it) or a ratio in (0, 1): the share of the factorizable layers'
    parameters to keep, the budget then deciding which layers stay whole."""

    mode: str | float = "auto"
    budget: Budget = DEFAULT_BUDGET
    providers: tuple[str, ...] = ("cpu",)
    #: A layer is factorized only where its factors save at least this share of it.
    min_saving: float = 0.1
    #: Weights with fewer elements stay whole.
    min_elements: int = 4096
    damping: float = DAMPING
    #: see factorize-svd's refit (off: it overfits few samples)
    refit: bool = False
    #: Whiten by the calibration data's Gram matrices (data-aware SVD) when data is given.
    data_aware: bool = True
    exclude_nodes: tuple[str, ...] = ()
    eval_samples: int = 32
    calib_samples: int | None = None
    sensitivity: SensitivityOptions = SensitivityOptions()
    #: auto: bisection steps over the share of parameters kept.
    search_steps: int = 7
    #: auto searches within this share of the budget's room for error (Budget.share): the
    #: bisection lands on the edge of what the judged samples allow, and unseen samples fall
    #: on both sides of that edge (PP-OCR rec judged at class agreement 0.99 gave 0.980 on
    #: held-out lines).
    auto_margin: float = 0.5
    #: Time the result against the model before it; auto requires it not slower.
    check_latency: bool = True

    def __post_init__(self) -> None:
        if self.mode != "auto" and not (
            isinstance(self.mode, (int, float)) and 0 < float(self.mode) < 1
        ):
            raise PipelineConfigError(
                f"factorize= must be off, auto or a share of parameters to keep in (0, 1), "
                f"got {self.mode!r}"
            )

    @property
    def auto(self) -> bool:
        return self.mode == "auto"


def factorize_config(value: Any, budget: Budget = DEFAULT_BUDGET) -> FactorizeConfig | None:
    """A config from what the API or CLI was given: None/"off", "auto", a ratio (number or
    text), or a FactorizeConfig; ``budget`` for the first three."""
    if value is None or isinstance(value, FactorizeConfig):
        return value
    if isinstance(value, str):
        if value in ("off", "none", ""):
            return None
        if value == "auto":
            return FactorizeConfig(budget=budget)
        try:
            value = float(value)
        except ValueError:
            raise PipelineConfigError(
                f"factorize= must be off, auto or a share of parameters to keep, got {value!r}"
            ) from None
    return FactorizeConfig(mode=float(value), budget=budget)


@dataclasses.dataclass
class FactorizeOutcome:
    """A factorized model (or the model as it was) and the record of how it was decided."""

    model: ir.Model
    record: dict[str, Any]
