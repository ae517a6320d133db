"""Which quantized alternatives auto tries, and which one ships: each one's speed measured
against float on the target, the fastest kept, and among those within timing noise of it the
smallest, then the most accurate."""

from __future__ import annotations

import dataclasses
from typing import Any

import onnx_ir as ir

from onnxsqueeze.core.errors import SqueezeError
from onnxsqueeze.core.io import initializer_bytes, serialized_bytes
from onnxsqueeze.stages import latency_gate
from onnxsqueeze.stages.latency_gate import SPEED_TIE
from onnxsqueeze.stages.quantize.config import CHOICES, QuantizeConfig, QuantizeOutcome


def check_latency(
    original: ir.Model, outcome: QuantizeOutcome, config: QuantizeConfig, feed: Any
) -> None:
    """Record the outcome's speed against float (the latency gate); with require_faster, a
    slower one is not applied. Timed on a real sample: generated inputs may take another
    branch or size. A model whose weights fold back to float at load runs the float graph:
    compared, not timed."""
    measured = latency_gate.speed(
        original,
        outcome.model,
        config.providers,
        feed,
        may_run_same_kernels=outcome.record.get("weight_format") == "fold",
    )
    outcome.record["speed_vs_float"] = round(measured.ratio, 3)
    if measured.basis:
        outcome.record["speed_basis"] = measured.basis
        return
    if measured.slower():
        outcome.record["slower"] = True
        if config.require_faster:
            outcome.record["applied"] = False
            outcome.record["reason"] = (
                f"quantized model runs at {measured.ratio:.2f}x float speed; kept float"
            )
            outcome.model = original


def pick(applied: list[QuantizeOutcome]) -> QuantizeOutcome:
    """The fastest alternative; among those within timing noise of it, the smallest file (both
    already meet the budget, and size is what was asked for), then the more accurate."""
    fastest = max(o.record.get("speed_vs_float") or 0.0 for o in applied)
    close = [o for o in applied if (o.record.get("speed_vs_float") or 0.0) >= SPEED_TIE * fastest]
    for o in close:
        o.record["weight_bytes"] = initializer_bytes(o.model)
    return min(close, key=lambda o: (o.record["weight_bytes"], -(o.record.get("min_cosine") or 0)))


def not_smaller(model: ir.Model, outcomes: list[QuantizeOutcome], auto: bool, report: Any) -> None:
    """A quantized model whose file is no smaller than float's: weights too small to pay for
    their Q/DQ nodes and scales (a 2 KB Conv3d net came out 1.6x larger). auto does not ship
    it; an explicit mode does, and says so."""
    applied = [o for o in outcomes if o.record.get("applied")]
    before = serialized_bytes(model) if applied else 0
    for outcome in applied:
        after = serialized_bytes(outcome.model)
        if after < before:
            continue
        message = f"the quantized model is not smaller than float ({after} vs {before} bytes)"
        if auto:
            outcome.record.update(applied=False, reason=message)
            outcome.model = model
        else:
            report.warnings.append(f"{outcome.record['mode']}: {message}")


def resolve_configs(quantize: Any, has_data: bool) -> list[QuantizeConfig]:
    """The configurations to try, from a mode name or a config (mode may be auto).

    auto tries weight-only int8, static (with data) and dynamic, each within the budget and
    not slower than float, and keeps the faster (when their speeds are within 15 %, the
    smaller, then the more accurate); no configuration means lossless only. Weight-only int8
    stored to fold at load runs at float speed, so it is what auto ships when integer kernels
    do not pay on the target (convolution nets on CPUs without VNNI); an integer mode whose
    fully quantized draft could not beat what is already found gets a quick search.
    """
    config = quantize if isinstance(quantize, QuantizeConfig) else None
    mode = config.mode if config is not None else str(quantize)
    if mode not in CHOICES:
        raise SqueezeError(f"unknown quantization mode '{mode}' (known: {', '.join(CHOICES)})")
    if mode == "none":
        return []
    config = config or QuantizeConfig()
    if mode == "auto":
        # weight-only first: its speed (float's, weights folded at load) tells the integer
        # modes how fast their drafts must be to be worth a search (see worth_speed)
        modes = ["weights-int8", "static", "dynamic"] if has_data else ["weights-int8", "dynamic"]
        return [
            dataclasses.replace(config, mode=m, check_latency=True, require_faster=True)
            for m in modes
        ]
    return [dataclasses.replace(config, mode=mode)]
