"""The accuracy budget a lossy result must meet, measured on the user's data.

A budget holds only the limits the user set; an unset limit is not checked. A user metric
(API only) receives the float model's and the candidate's outputs on the evaluation samples
and returns a score, higher is better (for example task accuracy).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from onnxsqueeze.core.errors import PipelineConfigError
from onnxsqueeze.run.compare import Comparison

Outputs = Sequence[Mapping[str, Any]]


@dataclasses.dataclass(frozen=True)
class Budget:
    #: Largest absolute difference allowed on any output element.
    max_error: float | None = None
    #: Smallest mean cosine (per sample, then averaged) allowed on any output.
    min_cosine: float | None = None
    #: Smallest share of samples whose argmax (last axis) agrees, on outputs with classes.
    min_top1_agreement: float | None = None
    #: As min_top1_agreement, on outputs whose every reference sample is a probability
    #: distribution over its last axis (softmax class scores) only: a classifier's answers.
    #: The default budget sets it, because a cosine near 1 can hide changed answers where
    #: the top two classes are close.
    min_class_agreement: float | None = None
    metric: Callable[[Outputs, Outputs], float] | None = None
    min_metric: float | None = None
    #: Set by the held-out check on the limits it moved inward (stages.held_out): the search
    #: data need not resolve them, the held-out data judges the result.
    tightened: bool = False

    def __post_init__(self) -> None:
        """A limit no result can meet (a cosine above 1) is a typo, not a budget."""
        bounds = {
            "max_error": (0.0, math.inf),
            "min_cosine": (-1.0, 1.0),
            "min_top1_agreement": (0.0, 1.0),
            "min_class_agreement": (0.0, 1.0),
        }
        for name, (low, high) in bounds.items():
            value = getattr(self, name)
            if value is not None and not low <= value <= high:
                raise PipelineConfigError(
                    f"budget {name.replace('_', '-')} must be in [{low:g}, {high:g}], got {value:g}"
                )

    def is_set(self) -> bool:
        return any(
            v is not None
            for v in (
                self.max_error,
                self.min_cosine,
                self.min_top1_agreement,
                self.min_class_agreement,
                self.min_metric,
            )
        )

    def share(self, fraction: float) -> Budget:
        """This budget with ``fraction`` of its room for error: a stage of a chain of lossy
        stages gets a share, so that independent errors of all of them add up to about the
        whole (cosine and agreement limits scale their distance from 1). A user metric keeps
        its limit: only the chain's final check can hold it."""

        def closer(limit: float | None) -> float | None:
            return None if limit is None else 1.0 - (1.0 - limit) * fraction

        return dataclasses.replace(
            self,
            max_error=None if self.max_error is None else self.max_error * fraction,
            min_cosine=closer(self.min_cosine),
            min_top1_agreement=closer(self.min_top1_agreement),
            min_class_agreement=closer(self.min_class_agreement),
        )

    def describe(self) -> str:
        """The limits in words ("cosine >= 0.997, class agreement >= 0.99")."""
        limits = [
            ("max error <=", self.max_error),
            ("cosine >=", self.min_cosine),
            ("top-1 agreement >=", self.min_top1_agreement),
            ("class agreement >=", self.min_class_agreement),
            ("metric >=", self.min_metric if self.metric is not None else None),
        ]
        return ", ".join(f"{what} {value:.6g}" for what, value in limits if value is not None)

    def check(
        self, comparison: Comparison, reference: Outputs, candidate: Outputs
    ) -> tuple[bool, str]:
        """(met, one-line summary of what was measured against which limit)."""
        if comparison.outputs and not any(o.finite for o in comparison.outputs):
            return False, "the original's outputs on these samples are all NaN/inf: no budget holds"
        parts: list[str] = []
        ok = not any(o.mismatch for o in comparison.outputs)
        if self.max_error is not None:
            ok &= comparison.max_abs <= self.max_error
            parts.append(f"max error {comparison.max_abs:.3g} (limit {self.max_error:g})")
        if self.min_cosine is not None:
            ok &= comparison.min_cosine >= self.min_cosine
            parts.append(f"cosine {comparison.min_cosine:.5f} (min {self.min_cosine:g})")
        if self.min_top1_agreement is not None:
            top1 = [o.top1_agreement for o in comparison.outputs if o.top1_agreement is not None]
            value = min(top1) if top1 else 1.0
            ok &= value >= self.min_top1_agreement
            parts.append(f"top-1 agreement {value:.4f} (min {self.min_top1_agreement:g})")
        if self.min_class_agreement is not None:
            classes = [
                o.top1_agreement
                for o in comparison.outputs
                if o.distribution and o.top1_agreement is not None
            ]
            if classes:
                ok &= min(classes) >= self.min_class_agreement
                parts.append(
                    f"class agreement {min(classes):.4f} (min {self.min_class_agreement:g})"
                )
        if self.metric is not None and self.min_metric is not None:
            score = float(self.metric(reference, candidate))
            ok &= score >= self.min_metric
            parts.append(f"metric {score:.4g} (min {self.min_metric:g})")
        if not parts:
            parts.append(comparison.summary())
        return bool(ok), ", ".join(parts)


#: What ``onnxsqueeze model.onnx -o small.onnx`` holds a quantized model to.
#: Classifiers also keep 99 % of their answers. Cosine 0.99 (an 8 degree turn) was the
#: default first: it let MiniLM's embeddings keep only 87.5 % of their nearest neighbours and
#: PP-OCR det's static int8 lose 1.5 points of mask F1; at 0.997 both hold, and no other
#: corpus model's default choice changed.
DEFAULT_BUDGET = Budget(min_cosine=0.997, min_class_agreement=0.99)
