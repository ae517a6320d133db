"""The lossy stages in order under one accuracy budget: factorize, prune, then quantize.

Each stage judges against the model before it; when several run, each gets an equal share
of the room for error (``Budget.share``), so that their independent errors add up to about
the whole, and the chain is then checked against the model before all of them with the
whole budget. A chain that misses it drops its last changes (quantization first) until it
meets it, and says so.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import onnx_ir as ir

from onnxsqueeze.core.stats import model_stats
from onnxsqueeze.stages.budget import Budget
from onnxsqueeze.stages.factorize import factorize_config, run_factorize_stage
from onnxsqueeze.stages.judge import Judge
from onnxsqueeze.stages.prune import prune_config, run_prune_stage
from onnxsqueeze.stages.quantize import QuantizeConfig, run_quantize_stage
from onnxsqueeze.stages.samples import judged_feeds


def run_lossy_stages(
    model: ir.Model,
    report: Any,
    factorize: Any,
    quantize: Any,
    data: Any,
    shapes: Any,
    providers: Any,
    seed: int,
    prune: Any = None,
    budget: Budget | None = None,
) -> ir.Model:
    """``factorize`` (None/"off", "auto", a ratio or a FactorizeConfig), ``prune`` (None/
    "off", "auto", "channels=R", "sparsity=S", "N:M" or a PruneConfig), then ``quantize``
    (None, a mode name or a QuantizeConfig) on the simplified ``model``. ``budget``, when
    given, replaces every stage's (the held-out check's tightened budget)."""
    qconfig, fconfig, pconfig = lossy_configs(quantize, factorize, prune, budget)
    budget = qconfig.budget if qconfig is not None else QuantizeConfig().budget
    stages: list[tuple[str, Any, Callable]] = []
    if fconfig is not None:
        stages.append(("factorize", fconfig, run_factorize_stage))
    if pconfig is not None:
        stages.append(("prune", pconfig, run_prune_stage))
    if qconfig is not None:
        stages.append(("quantize", qconfig, run_quantize_stage))
    if not stages:
        return model
    if len(stages) == 1:
        _, config, run = stages[0]
        return run(model, report, config, data, shapes, providers, seed)
    share = 1 / len(stages)
    results = [("original", model)]
    for index, (name, config, run) in enumerate(stages):
        # the last stage gets the room the others left (all of it when they changed nothing)
        room = 1 - share * (len(results) - 1) if index == len(stages) - 1 else share
        shared = dataclasses.replace(config, budget=config.budget.share(room))
        changed = run(results[-1][1], report, shared, data, shapes, providers, seed)
        if changed is not results[-1][1]:
            results.append((name, changed))
    if len(results) <= 2:
        return results[-1][1]  # one stage changed the model, within its (smaller) share
    return _within_budget(model, report, results, budget, qconfig, data, shapes, providers, seed)


def _within_budget(model, report, results, budget: Budget, qconfig, data, shapes, providers,
                   seed) -> ir.Model:  # fmt: skip
    """The chained result if it meets the whole budget against the original; else the
    longest prefix of the chain that does."""
    eval_samples = qconfig.eval_samples if qconfig is not None else 32
    feeds = judged_feeds(model, data, shapes, eval_samples, seed)
    judge_providers = tuple(providers or ("cpu",))
    judge = Judge(model, feeds, budget, judge_providers)
    names = " + ".join(
        (report.quantization or {}).get("mode", name) if name == "quantize" else name
        for name, _ in results[1:]
    )
    while len(results) > 1:
        name, candidate = results[-1]
        ok, summary = judge(candidate)
        if ok:
            report.verification = {"summary": f"{names}: {summary}"}
            return candidate
        report.warnings.append(
            f"the chain up to {name} misses the budget against the original ({summary}); "
            f"shipped without {name}"
        )
        _undo(report, name, summary)
        results.pop()
        if len(results) == 2:
            break
    _, shipped = results[-1]
    report.after = model_stats(shipped).as_dict()
    return shipped


def _undo(report: Any, stage: str, summary: str) -> None:
    field = {"factorize": "factorization", "prune": "pruning", "quantize": "quantization"}[stage]
    record = getattr(report, field, None)
    if record is not None:
        setattr(report, field, {**record, "applied": False, "reason": summary})


def lossy_configs(quantize: Any, factorize: Any, prune: Any, budget: Budget | None = None):
    """(quantize, factorize, prune) configs, None for a stage not asked for; ``budget``, when
    given, replaces theirs."""
    qconfig = _quantize_config(quantize)
    whole = budget or (qconfig.budget if qconfig is not None else QuantizeConfig().budget)
    configs = [qconfig, factorize_config(factorize, whole), prune_config(prune, whole)]
    if budget is not None:
        configs = [c if c is None else dataclasses.replace(c, budget=budget) for c in configs]
    return tuple(configs)


def _quantize_config(quantize: Any) -> QuantizeConfig | None:
    """The quantize request as a config; None when nothing is to be quantized."""
    if quantize is None:
        return None
    if isinstance(quantize, QuantizeConfig):
        return None if quantize.mode == "none" else quantize
    mode = str(quantize)
    return None if mode == "none" else QuantizeConfig(mode=mode)
