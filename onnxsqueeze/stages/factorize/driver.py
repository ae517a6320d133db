"""The factorize stage as the API runs it after the lossless passes: the feeds that judge it
(the user's data or generated probes), calibration samples for data-aware SVD, and what the
report says (``report.factorization``, a warning when nothing was factorized or the result
is slower)."""

from __future__ import annotations

import dataclasses
from typing import Any

import onnx_ir as ir

from onnxsqueeze.core import progress
from onnxsqueeze.core.stats import model_stats
from onnxsqueeze.stages.factorize.config import GRAM_SAMPLES, FactorizeConfig
from onnxsqueeze.stages.factorize.stage import factorize_model
from onnxsqueeze.stages.samples import stage_samples


def run_factorize_stage(
    model: ir.Model,
    report: Any,
    config: FactorizeConfig,
    data: Any,
    shapes: Any,
    providers: Any,
    seed: int,
) -> ir.Model:
    """Factorize ``model`` per ``config``; the record goes to ``report.factorization``."""
    if providers:
        config = dataclasses.replace(config, providers=tuple(providers))
    fitted = config.calib_samples or GRAM_SAMPLES
    feeds, fit = stage_samples(model, data, shapes, seed, config.eval_samples, fitted)
    calib = fit if config.data_aware else None
    with progress.stage("factorize"):
        outcome = factorize_model(model, feeds, config, calib_feeds=calib)
    record = outcome.record
    record["judged_on"] = f"{len(feeds)} samples" + (
        "" if calib is None or calib is not feeds else ", the same the factors were fit to"
    )
    report.factorization = record
    if not record.get("applied"):
        report.warnings.append(f"factorization not applied ({record.get('reason')})")
        return model
    if record.get("slower"):
        report.warnings.append(
            f"the factorized model runs at {record['speed_vs_before']:.2f}x the speed before it"
        )
    report.after = model_stats(outcome.model).as_dict()
    report.verification = {"summary": f"factorize: {record['measured']}"}
    report.verification_status = "passed"
    if data is None and record.get("factorized"):
        report.warnings.append(
            "factorization judged on generated inputs: give data= for data-aware factors "
            "and a budget measured on real inputs"
        )
    return outcome.model
