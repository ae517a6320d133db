"""The latency gate: a lossy result ships only if it is not slower than the model before it
on the target execution provider. The timing itself is ``run.latency``'s (interleaved
rounds, medians, settled threads); this module holds the decisions every family makes
with it: the speed that counts as "not slower", the spread that counts as a tie, and
when a result can be known to run at the original's speed without timing it."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import onnx_ir as ir

from onnxsqueeze.run import latency as timing
from onnxsqueeze.stages.plan import Timing
from onnxsqueeze.stages.plan import current as current_plan

#: Measured speed ratios from here up count as "not slower": timing noise on an idle machine
#: (a model whose weights fold back to float at load measures 0.97-1.03x).
NOT_SLOWER = 0.97

#: Speeds within this ratio of each other are a tie: size, then accuracy decide. Timing noise
#: alone needs 0.90 (at 0.95, PP-OCR rec's static result with 2 of 53 nodes quantized, file
#: -0.2 %, beat weight-only int8, file -50 %, in one run of two). At 0.90, PP-OCR det's static
#: result (1.05-1.11x float, 0.38-0.48x the file) and weight-only int8 (1.00x, 0.27x) traded
#: places from run to run: a few per cent of speed is not worth a file 1.4-1.8x larger, so a
#: bigger file must be more than 15 % faster (MiniLM's dynamic int8 measures 1.26-1.39x).
SPEED_TIE = 0.85

#: What a result that runs the original's kernels is said to be measured on.
SAME_KERNELS = "the float graph once its weights fold at load"


@dataclasses.dataclass(frozen=True)
class Speed:
    #: Speed relative to the original (>1: faster).
    ratio: float
    #: How the ratio was known when it was not timed (None: timed).
    basis: str | None = None

    def slower(self, needed: float | None = None) -> bool:
        """Below ``needed`` (default NOT_SLOWER: anything below timing noise)."""
        return self.ratio < (needed or NOT_SLOWER)


def speed(
    original: ir.Model,
    candidate: ir.Model,
    providers: Sequence[str],
    feed: Mapping[str, Any] | None,
    *,
    may_run_same_kernels: bool = False,
) -> Speed:
    """``candidate``'s speed against ``original`` on ``feed`` (a real sample: generated
    inputs may take another branch or size). ``may_run_same_kernels``: a candidate whose
    weights fold back at load (weight-only fold form) runs the original's graph once
    onnxruntime has loaded it; when the loaded graphs hold the same kernels it is
    compared, not timed (no timing noise)."""
    plan = current_plan()
    key = plan.next_key() if plan is not None else ""
    known = plan.replayed(key) if plan is not None else None
    if known is not None:  # --replay: the recorded timing, not a new one
        plan.add(known, NOT_SLOWER)
        return Speed(known.ratio, known.basis)
    if may_run_same_kernels and timing.loaded_op_types(
        original, providers
    ) == timing.loaded_op_types(candidate, providers):
        measured = Speed(1.0, SAME_KERNELS)
    else:
        measured = Speed(timing.compare_latency(original, candidate, providers, feed))
    if plan is not None:
        plan.add(Timing(key, measured.ratio, measured.basis), NOT_SLOWER)
    return measured
