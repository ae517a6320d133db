"""The accuracy budget checked on samples the search never saw.

The samples that choose the ranges, rank the sensitive nodes and decide what stays float
flatter the result they chose: magika's default, judged on its 128 calibration files, kept
98.3 % of its labels on other files under a 99 % budget. So the data is split (seeded,
deterministic) into a search part and a held-out part, or the user gives a held-out set;
the lossy stages see only the search part, and their result ships only if the budget holds
on the held-out part too. When it does not, the search runs again with its limits moved by
the gap it showed between the two (``tighten``), a bounded number of times; if no try holds,
the model ships without its lossy changes and the report says so. Agreement rates come with
their 95 % interval, and a warning says when the held-out part is too small to show the
limit at all.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxsqueeze.core import progress
from onnxsqueeze.run.compare import Comparison
from onnxsqueeze.run.confidence import answers_to_show, wilson_interval
from onnxsqueeze.run.feeds import Subset, count_samples, load_feeds, reusable
from onnxsqueeze.run.probes import probe_feeds
from onnxsqueeze.run.signature import input_specs
from onnxsqueeze.stages.budget import Budget
from onnxsqueeze.stages.chain import lossy_configs, run_lossy_stages
from onnxsqueeze.stages.judge import Judge
from onnxsqueeze.stages.samples import GENERATED, judged_feeds

#: Share of the data held out by default.
HOLDOUT = 0.25
#: The fewest samples held out, and the fewest left to the search: with less data than both,
#: nothing is held out and the report says the budget was checked on the search data only.
MIN_HELD = 8
MIN_SEARCH = 8
#: Searches run again with a tightened budget at most this many times.
TIGHTENINGS = 2
#: A tightened search aims this much inside what the held-out gap alone asks for.
SAFETY = 0.8
#: The held-out samples judged: at most this many, and this many bytes of inputs.
MAX_JUDGED = 128
MAX_JUDGED_BYTES = 256 << 20
OFF = "none: holdout is off"
NOTHING = "nothing lossy"


@dataclasses.dataclass
class Split:
    """The data the search reads (None: generated probes) and the held-out feeds."""

    search: Any
    held: list[dict] | None
    search_count: int
    held_count: int
    #: where the held-out samples come from, or why there are none
    how: str
    #: what a held-out count counts: samples, or rows of the one sample given
    units: str = "samples"


def split_data(
    model: ir.Model, data: Any, eval_data: Any, fraction: float, seed: int, shapes: Any,
    probes: int,
) -> Split:  # fmt: skip
    """The search part and the held-out feeds of ``data`` (``eval_data`` when given); no
    data: the search's generated probes, and others of the next seed held out."""
    specs = input_specs(model)
    if eval_data is not None:
        eval_data = reusable(eval_data)
        held = judged_feeds(model, eval_data, None, MAX_JUDGED, seed, MAX_JUDGED_BYTES)
        searched = count_samples(data) if data is not None else 0
        return Split(data, held, searched, count_samples(eval_data), "the eval data")
    if fraction <= 0:
        return Split(data, None, 0, 0, OFF)
    if data is None:
        held = probe_feeds(model, None, shapes, probes, seed + 1)
        return Split(None, held, probes, len(held), f"generated inputs (seed {seed + 1})")
    data = reusable(data)
    total = count_samples(data)
    if total == 1:
        rows = _split_rows(load_feeds(data, specs), fraction, seed)
        if rows is not None:
            return rows
    count = max(MIN_HELD, round(total * fraction))
    if total - count < MIN_SEARCH:
        return Split(data, None, total, 0, f"none: {total} sample(s) are too few to hold "
                     f"{MIN_HELD} out and search on {MIN_SEARCH}; give eval data")  # fmt: skip
    chosen = frozenset(int(i) for i in np.random.default_rng(seed).choice(total, count, False))
    held = judged_feeds(model, Subset(data, chosen), None, MAX_JUDGED, seed, MAX_JUDGED_BYTES)
    how = f"{count} of {total} samples, drawn with seed {seed}"
    return Split(Subset(data, chosen, keep=False), held, total - count, count, how)


def _split_rows(feeds: list[dict], fraction: float, seed: int) -> Split | None:
    """One sample holding a batch (an .npz of 360 digits): its rows split instead, when every
    input has the same first axis."""
    sizes = {np.asarray(v).shape[0] if np.ndim(v) else 0 for v in feeds[0].values()}
    total = sizes.pop() if len(sizes) == 1 else 0
    count = max(MIN_HELD, round(total * fraction))
    if total - count < MIN_SEARCH:
        return None
    held = np.zeros(total, bool)
    held[np.random.default_rng(seed).choice(total, count, False)] = True
    search = {k: np.asarray(v)[~held] for k, v in feeds[0].items()}
    kept = {k: np.asarray(v)[held] for k, v in feeds[0].items()}
    how = f"{count} of the {total} rows of the one sample, drawn with seed {seed}"
    return Split([search], [kept], total - count, count, how, units="rows")


def judged_held_out(
    model: ir.Model,
    report: Any,
    run_stages: Callable[[Any, Budget | None], ir.Model],
    split: Split,
    budget: Budget,
    providers: tuple[str, ...],
    search_feeds: Callable[[], list[dict]],
) -> ir.Model:
    """``run_stages(report, budget)`` (None: as asked) on the search part, its result held to
    ``budget`` on the held-out feeds; tightened and run again while it misses (see module)."""
    if split.held is None:
        model = run_stages(report, None)
        report.held_out = {"how": split.how, "checked": False}
        if _shipped(report) != NOTHING and split.how != OFF:  # not when turned off
            report.warnings.append(
                f"the budget was checked on the search data only ({split.how.split(': ', 1)[-1]})"
            )
        return model
    base = copy.deepcopy(report)
    record: dict[str, Any] = {
        "how": split.how,
        "search_samples": split.search_count,
        "held_out_samples": split.held_count,
        "judged": split.held_count if split.units == "rows" else len(split.held),
        "units": split.units,
        "attempts": [],
    }
    judges: list[Judge] = []
    current, fraction, trial = None, 1.0, report
    for attempt in range(TIGHTENINGS + 1):
        trial = copy.deepcopy(base)
        label = f"tightened budget {attempt}"
        with progress.stage(label) if attempt else contextlib.nullcontext():
            result = run_stages(trial, current)
        if result is model:
            record["attempts"].append({"budget": (current or budget).describe(), "met": None,
                                       "held_out": "nothing lossy shipped"})  # fmt: skip
            if attempt:
                trial.warnings.append(
                    f"the budget tightened for held-out data ({current.describe()}) leaves "
                    "nothing lossy to ship"
                )
            break
        if not judges:  # the references run once, after the first result needs them
            judges = [Judge(model, split.held, budget, providers),
                      Judge(model, search_feeds(), budget, providers)]  # fmt: skip
        (held, held_out), (searched, search_out) = map(lambda j: j.measure(result), judges)
        ok, held_summary = budget.check(held, judges[0].reference, held_out)
        search_summary = budget.check(searched, judges[1].reference, search_out)[1]
        record["attempts"].append({"budget": (current or budget).describe(), "met": ok,
                                   "shipped": _shipped(trial), "search": search_summary,
                                   "held_out": held_summary})  # fmt: skip
        if ok:
            record.update(met=True, confidence=_confidence(held, budget))
            _adopt(report, trial, record)
            _say_confidence(report, record["confidence"], split.held_count)
            return result
        if attempt and record["attempts"][-2]["held_out"] == held_summary:
            break  # the tightened search chose the same: tightening further changes nothing
        fraction = min(fraction, _ratio(budget, searched, held)) * SAFETY
        current = dataclasses.replace(budget.share(fraction), tightened=True)
    if record["attempts"][-1]["met"] is None:  # the last try shipped nothing lossy
        record["met"] = None
        _adopt(report, trial, record)
        return model
    record["met"] = False
    _adopt(report, trial, record)
    _undo(report, base, record["attempts"][-1]["held_out"], len(record["attempts"]))
    return model


def _ratio(budget: Budget, searched: Comparison, held: Comparison) -> float:
    """How much of its room for error the held-out data used per unit the search data used,
    inverted, on the limits the held-out data missed: the share of the budget a search must
    aim for so that the held-out result lands inside the limit. An agreement the search saw
    perfect counts as half an answer wrong (it cannot be told from 1 - 1/2n)."""
    ratios = []
    if budget.min_cosine is not None and held.min_cosine < budget.min_cosine:
        ratios.append(max(1 - searched.min_cosine, 1e-9) / max(1 - held.min_cosine, 1e-9))
    for limit, classes in ((budget.min_top1_agreement, False), (budget.min_class_agreement, True)):
        low_held = _agreement(held, classes)
        if limit is None or low_held is None or low_held[0] >= limit:
            continue
        low_search = _agreement(searched, classes) or (1.0, 1)
        used = max(1 - low_search[0], 0.5 / max(low_search[1], 1))
        ratios.append(used / max(1 - low_held[0], 1e-9))
    if budget.max_error is not None and held.max_abs > budget.max_error:
        ratios.append(searched.max_abs / held.max_abs)
    return min(ratios, default=0.5)  # a user metric missed: half the room, for want of a gap


def _agreement(comparison: Comparison, classes: bool) -> tuple[float, int] | None:
    """The lowest top-1 agreement (of class outputs only, with ``classes``) and its answers."""
    rates = [
        (o.top1_agreement, o.answers)
        for o in comparison.outputs
        if o.top1_agreement is not None and (o.distribution or not classes)
    ]
    return min(rates) if rates else None


def _confidence(held: Comparison, budget: Budget) -> dict[str, Any]:
    """Each agreement the budget limits, with its 95 % interval on the held-out answers."""
    limit = budget.min_class_agreement or budget.min_top1_agreement
    out = {}
    for o in held.outputs:
        if o.top1_agreement is None or limit is None:
            continue
        if budget.min_top1_agreement is None and not o.distribution:
            continue
        low, high = wilson_interval(o.top1_agreement, o.answers)
        out[o.name] = {"agreement": o.top1_agreement, "answers": o.answers,
                       "low": round(low, 4), "high": round(high, 4), "limit": limit}  # fmt: skip
    return out


def _say_confidence(report: Any, confidence: dict, samples: int) -> None:
    """A limit the held-out answers are too few to show, said once per output."""
    for name, c in confidence.items():
        if c["low"] < c["limit"]:
            need = answers_to_show(c["limit"])
            report.warnings.append(
                f"output '{name}': {c['agreement']:.1%} of {c['answers']} held-out answers "
                f"agree (from {samples} samples; 95 % interval {c['low']:.1%}-{c['high']:.1%}): "
                f"too few to show the {c['limit']:g} limit"
                + (f" (that takes about {need} answers)" if need else "")
            )


def _adopt(report: Any, trial: Any, record: dict) -> None:
    """The trial's report becomes the run's, with the held-out record."""
    report.__dict__.update(trial.__dict__)
    report.held_out = record


def _undo(report: Any, base: Any, summary: str, tries: int) -> None:
    """Every try missed the budget on held-out data: the lossy changes are dropped."""
    for field in ("factorization", "pruning", "quantization"):
        record = getattr(report, field, None)
        if record and record.get("applied"):
            setattr(report, field, {**record, "applied": False,
                                    "reason": f"misses the budget on held-out data ({summary})"})  # fmt: skip
    report.after, report.verification = base.after, base.verification
    report.verification_status = base.verification_status
    report.warnings.append(
        f"the lossy changes missed the budget on held-out data in {tries} search(es), the "
        f"later ones tightened ({summary}); shipped without them"
    )


def _shipped(report: Any) -> str:
    """What a try shipped, in a few words ("weights-int8, 3 of 3"), or NOTHING."""
    said = []
    for field, what in (("factorization", "factorized"), ("pruning", "pruned")):
        if (getattr(report, field) or {}).get("applied"):
            said.append(what)
    q = report.quantization or {}
    if q.get("applied"):
        said.append(f"{q.get('mode')}, {q.get('quantized', '?')} of {q.get('candidates', '?')}")
    return "; ".join(said) or NOTHING


def run_checked_stages(
    model: ir.Model, report: Any, *, quantize: Any, factorize: Any, prune: Any, data: Any,
    eval_data: Any, holdout: float, shapes: Any, providers: Any, seed: int,
) -> ir.Model:  # fmt: skip
    """The lossy stages asked for (``stages.chain``) on the search part of ``data``, held to
    their budget on the held-out part (or ``eval_data``); ``model`` as it is when none is."""
    configs = [c for c in lossy_configs(quantize, factorize, prune) if c is not None]
    if not configs:
        return model
    budget = configs[0].budget
    samples = getattr(configs[0], "eval_samples", 32)
    split = split_data(model, data, eval_data, holdout, seed, shapes, min(samples, GENERATED))

    def run_stages(trial: Any, tightened: Budget | None) -> ir.Model:
        return run_lossy_stages(model, trial, factorize, quantize, split.search, shapes,
                                providers, seed, prune, budget=tightened)  # fmt: skip

    def search_feeds() -> list[dict]:
        return judged_feeds(model, split.search, shapes, samples, seed)

    judging = tuple(providers or ("cpu",))
    return judged_held_out(model, report, run_stages, split, budget, judging, search_feeds)
