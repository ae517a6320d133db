"""Which quantized alternatives auto tries, and which one ships: each one's speed measured
against float on the target, the fastest kept, and among those within timing noise of it the
smallest, then the most accurate."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import onnx_ir as ir

if TYPE_CHECKING:
    from onnxsqueeze.quantize import QuantizeConfig, QuantizeOutcome


def check_latency(
    original: ir.Model, outcome: QuantizeOutcome, config: QuantizeConfig, feed: Any
) -> None:
    """Record the outcome's speed against float; with require_faster, a slower one is not
    applied. Timed on a real sample: generated inputs may take another branch or size. A model
    whose weights fold back to float at load runs the float graph: compared, not timed."""
    from onnxsqueeze.bench import compare_latency, loaded_op_types

    if outcome.record.get("weight_format") == "fold" and loaded_op_types(
        original, config.providers
    ) == loaded_op_types(outcome.model, config.providers):
        outcome.record["speed_vs_float"] = 1.0
        outcome.record["speed_basis"] = "the float graph once its weights fold at load"
        return
    speed = compare_latency(original, outcome.model, config.providers, feed)
    outcome.record["speed_vs_float"] = round(speed, 3)
    if speed < NOT_SLOWER:
        outcome.record["slower"] = True
        if config.require_faster:
            outcome.record["applied"] = False
            outcome.record["reason"] = (
                f"quantized model runs at {speed:.2f}x float speed; kept float"
            )
            outcome.model = original


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


def pick(applied: list[QuantizeOutcome]) -> QuantizeOutcome:
    """The fastest alternative; among those within timing noise of it, the smallest file (both
    already meet the budget, and size is what was asked for), then the more accurate."""
    from onnxsqueeze.io import initializer_bytes

    fastest = max(o.record.get("speed_vs_float") or 0.0 for o in applied)
    close = [o for o in applied if (o.record.get("speed_vs_float") or 0.0) >= SPEED_TIE * fastest]
    for o in close:
        o.record["weight_bytes"] = initializer_bytes(o.model)
    return min(close, key=lambda o: (o.record["weight_bytes"], -(o.record.get("min_cosine") or 0)))


def not_smaller(model: ir.Model, outcomes: list[QuantizeOutcome], auto: bool, report: Any) -> None:
    """A quantized model whose file is no smaller than float's: weights too small to pay for
    their Q/DQ nodes and scales (a 2 KB Conv3d net came out 1.6x larger). auto does not ship
    it; an explicit mode does, and says so."""
    from onnxsqueeze.io import serialized_bytes

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
    from onnxsqueeze.errors import SqueezeError
    from onnxsqueeze.quantize import CHOICES, QuantizeConfig

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
