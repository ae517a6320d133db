"""What the quantize stage is asked to do (``QuantizeConfig``) and what it hands back
(``QuantizeOutcome``): the public face of ``onnxsqueeze.stages.quantize``."""

from __future__ import annotations

import dataclasses
from typing import Any

import onnx_ir as ir

from onnxsqueeze.calib.peaks import OUTLIER_RATIO
from onnxsqueeze.quant.qdq import OWN_SCALE, WEIGHTED
from onnxsqueeze.stages.budget import DEFAULT_BUDGET, Budget
from onnxsqueeze.stages.search import SensitivityOptions

MODES = ("static", "dynamic", "fp16", "weights-int8", "weights-int4")
#: auto: static with data, dynamic without; kept only if within budget and not slower.
CHOICES = ("auto", "none", *MODES)
#: Nodes the budget search may keep float; data-movement ops follow their producer.
CANDIDATE_OPS = (*WEIGHTED, *sorted(OWN_SCALE), "LSTM")  # LSTM: dynamic's DynamicQuantizeLSTM


@dataclasses.dataclass(frozen=True)
class QuantizeConfig:
    """What the quantize stage does and the budget it holds the result to."""

    mode: str = "static"
    #: range method, or "auto": each tried on the fully quantized model (calib.choice)
    method: str = "auto"
    activations: str = "uint8"
    weights: str = "int8"
    per_channel: bool = True
    reduce_range: bool | None = None
    op_types: tuple[str, ...] | None = None
    exclude_nodes: tuple[str, ...] = ()
    exclude_ops: tuple[str, ...] = ()
    #: see InsertQdqOptions.elementwise
    elementwise: str = "linked"
    budget: Budget = DEFAULT_BUDGET
    providers: tuple[str, ...] = ("cpu",)
    #: exact (one model per candidate), local (two runs), local+exact (local ranking, then
    #: exact scores for its max_exact worst), auto (exact up to max_exact nodes, else local+exact).
    sensitivity: str = "auto"
    #: At 40, PP-OCR rec's 53 candidates were ranked local+exact and its damaging nodes
    #: hid among the 13 ranked by local score alone: 2 nodes quantized where exact scores
    #: (24 s either way) found 20 within the same budget.
    max_exact: int = 96
    sensitivity_samples: int = 4
    #: Time the result against the float model; with require_faster, a slower result is dropped.
    check_latency: bool = False
    require_faster: bool = False
    #: auto: the speed (vs float) an integer mode must reach to matter, NOT_SLOWER when None or
    #: enough to beat an alternative already found; a draft below it gets the quick search.
    worth_speed: float | None = None
    #: Calibration: at most this many samples of the data; a cache file to reuse / write.
    calib_samples: int | None = None
    calib_cache: str | None = None
    #: Samples of the data the budget is judged on, at most (and at most
    #: stages.samples.JUDGED_BYTES of inputs): 32 let magika's static result pass with a 1 %
    #: flip rate on other files under a 99 % limit (128: one disagreement is 0.8 %).
    eval_samples: int = 128

    #: Weight-only storage (quantize-weights.format); auto: fold on the CPU, whose kernels
    #: take neither a DequantizeLinear'd weight nor MatMulNBits faster than float.
    weight_format: str = "auto"
    #: Dynamic with data, when the fully quantized model misses the budget: input channels
    #: whose calibration peak exceeds this many times the median channel's are computed in
    #: float (calib.peaks) before any node is kept float; 0 turns it off.
    outlier_ratio: float = OUTLIER_RATIO

    @property
    def weight_only(self) -> bool:
        return self.mode.startswith("weights-")

    @property
    def ranking(self) -> SensitivityOptions:
        """How the shared search ranks this stage's candidates."""
        return SensitivityOptions(self.sensitivity, self.max_exact, self.sensitivity_samples)


@dataclasses.dataclass
class QuantizeOutcome:
    """A quantized model (or the model as it was) and the record of how it was decided."""

    model: ir.Model
    record: dict[str, Any]
