"""The quantize stage as the API runs it after the lossless passes: which configurations
(auto tries several), the feeds that judge them, calibration data or cache, the choice among
the outcomes, and what the report says about it. One configuration's search: ``stage``."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import onnx_ir as ir

from onnxsqueeze.calib.calibrate import calibrate
from onnxsqueeze.calib.choice import collected_with
from onnxsqueeze.core import progress
from onnxsqueeze.core.errors import CalibrationError, RuntimeSessionError, UnsupportedModelError
from onnxsqueeze.core.graphs import scopes
from onnxsqueeze.core.spill import spill_if_active
from onnxsqueeze.core.stats import model_stats
from onnxsqueeze.quant.qdq import quantized_compute
from onnxsqueeze.run.feeds import iter_feeds
from onnxsqueeze.run.signature import input_specs
from onnxsqueeze.stages.budget import Budget
from onnxsqueeze.stages.latency_gate import SPEED_TIE
from onnxsqueeze.stages.quantize.alternatives import not_smaller, pick, resolve_configs
from onnxsqueeze.stages.quantize.config import QuantizeConfig, QuantizeOutcome
from onnxsqueeze.stages.quantize.stage import quantize_model
from onnxsqueeze.stages.samples import judged_feeds

logger = logging.getLogger(__name__)

#: Model metadata a quantized output carries: the mode that spent its accuracy budget.
SQUEEZED = "onnxsqueeze.quantization"


def _warn_unmatched_exclusions(model: ir.Model, config: QuantizeConfig, report: Any) -> None:
    """Node names and op types to keep float that the model does not have: a misspelt name
    would otherwise keep nothing float without a word."""
    nodes = [n for scope in scopes(model) for n in scope]
    for what, asked, present in (
        ("node", config.exclude_nodes, {n.name for n in nodes}),
        ("op type", config.exclude_ops, {n.op_type for n in nodes}),
    ):
        missing = [name for name in asked if name not in present]
        if missing:
            report.warnings.append(
                f"kept float as asked, but the model has no {what} {', '.join(map(repr, missing))}"
            )


def run_quantize_stage(
    model: ir.Model, report: Any, quantize: Any, data: Any, shapes: Any, providers: Any, seed: int
) -> ir.Model:
    """The stage as the API runs it after the lossless passes: feeds from ``data`` (or
    generated), the record in ``report.quantization``, the verdict in the report."""
    configs = resolve_configs(quantize, data is not None)
    if not configs:
        return model
    auto = len(configs) > 1 or (
        (quantize.mode if isinstance(quantize, QuantizeConfig) else str(quantize)) == "auto"
    )
    found = _quantized_already(model, auto)
    if found:
        # a budget is spent against the float model: a second search judged against a
        # quantized reference would quantize what the first kept float on purpose. auto's
        # choice is made for a float model, so it leaves any quantized model alone; an
        # explicit mode still quantizes what another tool left float
        mode = "auto" if auto else configs[0].mode
        report.quantization = {"mode": mode, "applied": False, "budget_met": False}
        report.quantization["reason"] = f"the model is already quantized ({found})"
        report.warnings.append(
            f"quantization not applied: the model is already quantized ({found}); "
            + ("auto does not quantize it again" if auto else "it is not quantized twice")
        )
        return model
    if providers:
        configs = [dataclasses.replace(c, providers=tuple(providers)) for c in configs]
    if configs[0].mode == "static" and data is None:
        raise CalibrationError("static quantization needs calibration data (data=)")
    feeds = judged_feeds(model, data, shapes, configs[0].eval_samples, seed)
    budget = configs[0].budget
    _warn_if_unresolvable("top-1 budget", budget.min_top1_agreement, feeds, report, budget)
    _warn_unmatched_exclusions(model, configs[0], report)
    outcomes: list[QuantizeOutcome] = []
    for config in configs:
        speeds = [o.record.get("speed_vs_float") or 0.0 for o in outcomes if o.record["applied"]]
        if auto and speeds:
            config = dataclasses.replace(config, worth_speed=max(speeds) / SPEED_TIE)
        try:
            with progress.stage(f"quantize {config.mode}"):
                outcomes.append(_run_config(model, config, data, feeds))
            _say(outcomes[-1].record)
            # kept aside while the next one is tried and the result is checked: on disk
            spill_if_active(outcomes[-1].model)
        except (RuntimeSessionError, UnsupportedModelError) as exc:
            if not auto:
                raise
            report.warnings.append(f"quantization ({config.mode}) skipped: {exc}")
    if not outcomes:
        return model
    slow = outcomes[0].record
    if not auto and slow.get("slower") and not slow.get("applied") and not configs[0].weight_only:
        # --require-faster on an integer-kernel mode that runs slower here: the faster format
        # for the same weights is weight-only int8 stored to fold at load (float kernels).
        fallback = dataclasses.replace(configs[0], mode="weights-int8")
        outcome = _run_config(model, fallback, data, feeds)
        outcome.record["fallback_from"] = f"{slow['mode']} ({slow.get('reason')})"
        outcomes.append(outcome)
    not_smaller(model, outcomes, auto, report)
    applied = [o for o in outcomes if o.record.get("applied")]
    best = pick(applied) if applied else outcomes[0]
    if len(outcomes) > 1:
        best.record["alternatives"] = [
            {
                k: o.record.get(k)
                for k in ("mode", "applied", "measured", "speed_vs_float", "reason")
            }
            for o in outcomes
        ]
    report.quantization = best.record
    mode = best.record["mode"]
    if len(outcomes) > 1:
        logger.info("quantize: ships %s", mode if best.record.get("applied") else "nothing")
    if not best.record.get("applied"):
        reasons = "; ".join(f"{o.record['mode']}: {o.record.get('reason', '?')}" for o in outcomes)
        report.warnings.append(f"quantization not applied ({reasons})")
        return model
    if best.record.get("class_outputs"):
        limit = configs[0].budget.min_class_agreement
        _warn_if_unresolvable("class-agreement limit", limit, feeds, report, budget)
    flips = best.record.get("top1_agreement") or {}
    if flips and configs[0].budget.min_top1_agreement is None:
        for name, agreement in flips.items():
            report.warnings.append(
                f"{mode} changes the top class of output '{name}' on {1 - agreement:.1%} of "
                f"{len(feeds)} evaluation samples (within the budget); "
                "--min-top1-agreement 1 keeps every answer"
            )
    best.model.metadata_props[SQUEEZED] = mode  # what _quantized_already reads next time
    report.after = model_stats(best.model).as_dict()
    report.verification = {"summary": f"{mode}: {best.record['measured']}"}
    report.verification_status = "passed"
    return best.model


def _quantized_already(model: ir.Model, auto: bool) -> str:
    """Why ``model`` must not be quantized again ("" when it may): onnxsqueeze quantized it
    (any mode), or, for auto, it holds quantized ops or weights from any tool."""
    if model.metadata_props.get(SQUEEZED):
        return (
            f"by onnxsqueeze: {model.metadata_props[SQUEEZED]}, within a budget on its float model"
        )
    ops = quantized_compute(model) if auto else {}
    return ", ".join(f"{n} {op}" for op, n in ops.items())


def _warn_if_unresolvable(
    what: str, limit: float | None, feeds: list, report: Any, budget: Budget
) -> None:
    """An agreement limit that one disagreement on these few samples already breaks."""
    if budget.tightened:  # moved inward by the held-out check, which judges the result
        return
    if limit is not None and limit > 0 and len(feeds) * (1 - limit) < 1:
        report.warnings.append(
            f"the {what} ({limit:g}) is judged on {len(feeds)} samples, where one "
            f"disagreement already costs {1 / len(feeds):.1%}: give more data to resolve it"
        )


def _run_config(model: ir.Model, config: QuantizeConfig, data: Any, feeds: list) -> QuantizeOutcome:
    calibration = calib_feeds = None
    if (config.mode.startswith("weights-") or config.mode == "dynamic") and data is not None:
        calib_feeds = iter_feeds(data, input_specs(model), limit=config.calib_samples)
    elif config.mode == "static":
        if config.calib_cache:
            calibration = calibrate(
                model,
                data,
                method=collected_with(config.method),
                samples=config.calib_samples,
                cache=config.calib_cache,
                providers=config.providers,
            )
        else:
            calib_feeds = iter_feeds(data, input_specs(model), limit=config.calib_samples)
    return quantize_model(
        model,
        feeds,
        config,
        calibration=calibration,
        calib_feeds=calib_feeds,
        calib_samples=config.calib_samples,
        calib_data=data,
    )


def _say(record: dict) -> None:
    """One alternative's outcome, for ``-v``: what was measured and decided."""
    if record.get("applied"):
        logger.info(
            "quantize %s: %s of %s nodes, %s float speed, %s",
            record.get("mode"),
            record.get("quantized", "?"),
            record.get("candidates", "?"),
            f"{record['speed_vs_float']:.2f}x" if record.get("speed_vs_float") else "untimed",
            record.get("measured", ""),
        )
    else:
        logger.info("quantize %s: not applied (%s)", record.get("mode"), record.get("reason"))
