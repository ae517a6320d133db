"""Which range method a model gets: each one tried on the fully quantized model.

No range method wins everywhere. On the corpus, entropy (KL) ranges left PP-OCR cls at
output cosine 0.747 fully quantized and PP-OCR rec at 0.842, where min/max ranges gave 0.995
and 0.987: KL clips the long tails that hard-swish and residual sums carry, and those tails
matter there. One histogram collection answers every method, so trying each costs a build
and an evaluation of the quantized model, not a new calibration.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from onnxsqueeze.core.errors import CalibrationError

#: Methods "auto" tries, in this order (the first of equal scores wins).
AUTO_METHODS = ("minmax", "percentile", "entropy", "mse")
#: What "auto" collects: a histogram serves every method.
AUTO_COLLECTS = "entropy"


def collected_with(method: str) -> str:
    """The observer kind a range method needs collected."""
    return AUTO_COLLECTS if method == "auto" else method


def ranked_ranges(
    calibration: Any, score: Callable[[dict], tuple[tuple, str]]
) -> tuple[list[tuple[str, dict]], dict[str, str]]:
    """Each method's (name, ranges), best ``score`` first, and each one's summary.
    ``score(ranges)`` returns a sortable key (higher is better) and a summary for the
    report; equal keys keep AUTO_METHODS order. Methods the calibration cannot answer (a
    min/max-only cache) are left out."""
    scored: list[tuple[tuple, int, str, dict]] = []
    tried: dict[str, str] = {}
    for index, method in enumerate(AUTO_METHODS):
        try:
            ranges = calibration.ranges(method)
        except CalibrationError:
            continue
        key, tried[method] = score(ranges)
        scored.append((key, -index, method, ranges))
    if not scored:
        raise CalibrationError("the calibration answers no range method")
    scored.sort(key=lambda item: item[:2], reverse=True)
    return [(method, ranges) for _, _, method, ranges in scored], tried
