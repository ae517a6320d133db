"""The lossy stages in order under one accuracy budget: factorize, then quantize the result.

Each stage judges against the model before it; when both run, each gets half the room for
error (``Budget.share``), so that their independent errors add up to about the whole, and
the chain is then checked against the model before both with the whole budget. A chain
that misses it ships the factorized model alone (it met its share) and says so.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import onnx_ir as ir

from onnxsqueeze.core.io import model_stats
from onnxsqueeze.run.probes import probe_feeds
from onnxsqueeze.stages.factorize import factorize_config, run_factorize_stage
from onnxsqueeze.stages.judge import Judge
from onnxsqueeze.stages.quantize import QuantizeConfig, run_quantize_stage

#: Share of the budget's room for error each of two chained stages gets.
CHAIN_SHARE = 0.5


def run_lossy_stages(
    model: ir.Model,
    report: Any,
    factorize: Any,
    quantize: Any,
    data: Any,
    shapes: Any,
    providers: Any,
    seed: int,
) -> ir.Model:
    """``factorize`` (None/"off", "auto", a ratio or a FactorizeConfig), then ``quantize``
    (None, a mode name or a QuantizeConfig) on the simplified ``model``."""
    qconfig = _quantize_config(quantize)
    budget = qconfig.budget if qconfig is not None else QuantizeConfig().budget
    fconfig = factorize_config(factorize, budget)
    if fconfig is None:
        if quantize is None:
            return model
        return run_quantize_stage(model, report, quantize, data, shapes, providers, seed)
    if qconfig is not None:
        fconfig = dataclasses.replace(fconfig, budget=fconfig.budget.share(CHAIN_SHARE))
    factorized = run_factorize_stage(model, report, fconfig, data, shapes, providers, seed)
    if qconfig is None:
        return factorized
    if factorized is model:  # nothing factorized: quantization gets the whole budget
        return run_quantize_stage(model, report, quantize, data, shapes, providers, seed)
    half = dataclasses.replace(qconfig, budget=qconfig.budget.share(CHAIN_SHARE))
    result = run_quantize_stage(factorized, report, half, data, shapes, providers, seed)
    if result is factorized:
        return factorized
    feeds = probe_feeds(model, data, shapes, max(qconfig.eval_samples, 2), seed)
    judge = Judge(
        model, feeds[: qconfig.eval_samples], qconfig.budget, tuple(providers or qconfig.providers)
    )
    ok, summary = judge(result)
    report.verification = {"summary": f"factorize + {report.quantization['mode']}: {summary}"}
    if ok:
        return result
    report.warnings.append(
        f"factorized and quantized model misses the budget against the original ({summary}); "
        "shipped the factorized model without quantization"
    )
    report.quantization = {**report.quantization, "applied": False, "reason": summary}
    report.after = model_stats(factorized).as_dict()
    return factorized


def _quantize_config(quantize: Any) -> QuantizeConfig | None:
    """The quantize request as a config; None when nothing is to be quantized."""
    if quantize is None:
        return None
    if isinstance(quantize, QuantizeConfig):
        return None if quantize.mode == "none" else quantize
    mode = str(quantize)
    return None if mode == "none" else QuantizeConfig(mode=mode)
