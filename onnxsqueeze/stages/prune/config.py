"""What the prune stage is asked to do (``PruneConfig``) and what it hands back."""

from __future__ import annotations

import dataclasses
from typing import Any

import onnx_ir as ir

from onnxsqueeze.core.errors import PipelineConfigError
from onnxsqueeze.stages.budget import DEFAULT_BUDGET, Budget
from onnxsqueeze.stages.search import SensitivityOptions

#: Gram matrices (refit, Wanda) are summed over at most this many calibration samples.
GRAM_SAMPLES = 128
#: Channel ratios auto measures each group at (share of its free channels removed).
AUTO_RATIOS = (0.875, 0.75, 0.5, 0.25)
USAGE = "prune= must be off, auto, channels=R, sparsity=S or N:M (e.g. 2:4)"


@dataclasses.dataclass(frozen=True)
class PruneConfig:
    """``kind``: "auto" (structured: as many channels as the budget allows, shipped only if
    faster), "channels" (each cluster loses ``amount`` of its free channels, the budget
    deciding which clusters stay whole), "sparsity" (``amount`` of each layer's weights
    zeroed) or "n:m" (``pattern``)."""

    kind: str = "auto"
    amount: float = 0.0
    pattern: str = ""
    budget: Budget = DEFAULT_BUDGET
    providers: tuple[str, ...] = ("cpu",)
    #: Least-squares refit of the consumers of removed channels (with data).
    refit: bool = True
    #: Kept channel counts rounded up to this multiple (CPU kernels' blocks).
    multiple: int = 8
    #: Attention heads may go (whole), see prune-channels.
    heads: bool = True
    exclude_nodes: tuple[str, ...] = ()
    eval_samples: int = 32
    calib_samples: int | None = None
    sensitivity: SensitivityOptions = SensitivityOptions(method="exact", max_exact=256)
    #: auto: the ratios each group is measured at, bisection steps over the error allowance,
    #: and the share of the budget's room for error searched within (the rest is margin
    #: for samples the search did not see, as for factorization).
    ratios: tuple[float, ...] = AUTO_RATIOS
    search_steps: int = 8
    auto_margin: float = 0.5
    check_latency: bool = True

    def __post_init__(self) -> None:
        if self.kind not in ("auto", "channels", "sparsity", "n:m"):
            raise PipelineConfigError(f"{USAGE}, got kind {self.kind!r}")
        if self.kind in ("channels", "sparsity") and not 0 < self.amount < 1:
            raise PipelineConfigError(f"{USAGE}: {self.kind} must be in (0, 1), got {self.amount}")

    @property
    def mode(self) -> str:
        if self.kind in ("channels", "sparsity"):
            return f"{self.kind}={self.amount:g}"
        return self.pattern if self.kind == "n:m" else self.kind

    @property
    def structured(self) -> bool:
        return self.kind in ("auto", "channels")


def prune_config(value: Any, budget: Budget = DEFAULT_BUDGET) -> PruneConfig | None:
    """A config from what the API or CLI was given: None/"off", "auto", "channels=R",
    "sparsity=S", "N:M", or a PruneConfig; ``budget`` for the text forms."""
    if value is None or isinstance(value, PruneConfig):
        return value
    text = str(value).strip().lower()
    if text in ("off", "none", ""):
        return None
    if text == "auto":
        return PruneConfig(budget=budget)
    if ":" in text:
        n, _, m = text.partition(":")
        if not (n.isdigit() and m.isdigit() and 0 < int(n) < int(m)):
            raise PipelineConfigError(f"{USAGE}, got {value!r}")
        return PruneConfig(kind="n:m", pattern=text, budget=budget)
    kind, _, amount = text.partition("=")
    if kind not in ("channels", "sparsity"):
        raise PipelineConfigError(f"{USAGE}, got {value!r}")
    try:
        share = float(amount)
    except ValueError:
        raise PipelineConfigError(f"{USAGE}, got {value!r}") from None
    return PruneConfig(kind=kind, amount=share, budget=budget)


@dataclasses.dataclass
class PruneOutcome:
    """A pruned model (or the model as it was) and the record of how it was decided."""

    model: ir.Model
    record: dict[str, Any]
