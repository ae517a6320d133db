"""The prune stage as the API runs it after the lossless passes (and factorization): the
feeds that judge it (the user's data or generated probes), calibration samples for the refit,
and what the report says (``report.pruning``, a warning when nothing was pruned)."""

from __future__ import annotations

import dataclasses
from typing import Any

import onnx_ir as ir

from onnxsqueeze.core import progress
from onnxsqueeze.core.stats import model_stats
from onnxsqueeze.stages.prune.config import GRAM_SAMPLES, PruneConfig
from onnxsqueeze.stages.prune.stage import prune_model
from onnxsqueeze.stages.samples import stage_samples


def run_prune_stage(
    model: ir.Model,
    report: Any,
    config: PruneConfig,
    data: Any,
    shapes: Any,
    providers: Any,
    seed: int,
) -> ir.Model:
    """Prune ``model`` per ``config``; the record goes to ``report.pruning``."""
    if providers:
        config = dataclasses.replace(config, providers=tuple(providers))
    fitted = config.calib_samples or GRAM_SAMPLES
    feeds, calib = stage_samples(model, data, shapes, seed, config.eval_samples, fitted)
    with progress.stage("prune"):
        outcome = prune_model(model, feeds, config, calib_feeds=calib)
    record = outcome.record
    record["judged_on"] = f"{len(feeds)} samples" + (
        ", the same the refit was fit to" if calib is not None and calib is feeds else ""
    )
    report.pruning = record
    if not record.get("applied"):
        report.warnings.append(f"pruning not applied ({record.get('reason')})")
        return model
    report.after = model_stats(outcome.model).as_dict()
    report.verification = {"summary": f"prune: {record['measured']}"}
    report.verification_status = "passed"
    if data is None:
        report.warnings.append(
            "pruning judged on generated inputs and not refitted: give data= for the "
            "least-squares refit and a budget measured on real inputs"
        )
    return outcome.model
