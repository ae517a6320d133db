"""The quantize stage: quantize a (simplified) float model within an accuracy budget.

Static: calibrate the activations, insert QDQ everywhere it applies, and measure the result
against the float model on evaluation samples as onnxruntime will run it (``stages.judge``).
If the budget is not met, the shared search (``stages.search``) ranks the candidate nodes
by their damage and keeps the fewest most damaging float. Dynamic, fp16 and weight-only
modes go through the same search. The record says what was chosen and why, node by node.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import onnx_ir as ir

from onnxsqueeze.calib.choice import collected_with, ranked_ranges
from onnxsqueeze.calib.collector import CollectOptions, Collector
from onnxsqueeze.calib.outlier_plan import describe, find_outliers
from onnxsqueeze.calib.tensors import RangesAsked
from onnxsqueeze.core import progress
from onnxsqueeze.core.errors import SqueezeError, UnsupportedModelError, first_line
from onnxsqueeze.core.graphs import name_nodes, opset_version
from onnxsqueeze.core.io import initializer_bytes
from onnxsqueeze.core.opsets import upgrade_opset
from onnxsqueeze.core.spill import spill_if_active
from onnxsqueeze.passes.cleanup import dedup_initializers
from onnxsqueeze.quant.qdq import nothing_quantized
from onnxsqueeze.run import workers
from onnxsqueeze.run.compare import LOSSLESS_RTOL, compare_runs
from onnxsqueeze.run.session import crashes_onnxruntime
from onnxsqueeze.stages import latency_gate
from onnxsqueeze.stages.judge import Judge
from onnxsqueeze.stages.quantize import kept_float, weight_only
from onnxsqueeze.stages.quantize.alternatives import check_latency
from onnxsqueeze.stages.quantize.config import MODES, QuantizeConfig, QuantizeOutcome
from onnxsqueeze.stages.quantize.family import QuantizeFamily
from onnxsqueeze.stages.search import fewest_kept, rank

logger = logging.getLogger(__name__)


def quantize_model(
    model: ir.Model,
    eval_feeds: Sequence[Mapping[str, Any]],
    config: QuantizeConfig,
    *,
    calibration: Any = None,
    calib_feeds: Iterable[Mapping[str, Any]] | None = None,
    calib_samples: int | None = None,
    calib_data: Any = None,
) -> QuantizeOutcome:
    """Quantize ``model`` (not modified) per ``config``; ``eval_feeds`` judge the budget.
    ``calib_data``: where ``calib_feeds`` come from, which a pool of workers reads in shards."""
    if config.mode not in MODES:
        raise SqueezeError(f"unknown quantization mode '{config.mode}' (known: {', '.join(MODES)})")
    started = time.perf_counter()
    stage = QuantizeStage(model.clone(), list(eval_feeds), config)
    stage.calib_data = calib_data
    outcome = stage.search(calibration, calib_feeds, calib_samples)
    # its memo of rounded weights (int8: a quarter of the float ones) must not sit beside
    # the float model's timing session
    del stage
    # the small constants each weight's rewrite adds (a fold form's Reshape shapes) once: a
    # second squeeze's cleanup would merge them otherwise, and change the file
    for graph in outcome.model.graphs() if outcome.record.get("applied") else ():
        dedup_initializers(graph)
    if config.check_latency and outcome.record.get("applied"):
        check_latency(model, outcome, config, eval_feeds[0] if eval_feeds else None)
    outcome.record["seconds"] = round(time.perf_counter() - started, 3)
    return outcome


class QuantizeStage:
    """One mode's quantization of one model: its family of candidates, the judge, and the
    record of what the search decided."""

    def __init__(self, model: ir.Model, feeds: list[dict], config: QuantizeConfig) -> None:
        self.family = QuantizeFamily(model, config)
        self.config = config
        self.judge = Judge(model, feeds, config.budget, config.providers)
        self.feeds = self.judge.feeds
        self.record: dict[str, Any] = {"mode": config.mode, "budget_met": False, "applied": False}
        classes = self.judge.class_outputs()
        if classes:  # softmax-like outputs: what a class-agreement limit reads
            self.record["class_outputs"] = classes
        #: the draft ran slower than the mode must end: a cheaper search (see _time_draft)
        self.quick = False
        #: the first searched range method's damage order, which fallbacks reuse (see search)
        self._order: list[str] | None = None
        self._peak_data: tuple | None = None
        #: the best-scored range method's judged model, by id of its ranges (see
        #: _ranked_ranges)
        self._scored: dict[int, tuple] = {}
        #: the calibration data as given (a path, a part of one, a list), for sharding
        self.calib_data: Any = None

    @property
    def model(self) -> ir.Model:
        return self.family.model

    @property
    def candidates(self) -> dict[str, ir.Node]:
        return self.family.candidates

    def build(self, excluded: Sequence[str]) -> tuple[ir.Model, dict[str, Any]]:
        return self.family.build_with_stats(excluded)

    # -------------------------------------------------------------- the search

    def search(self, calibration, calib_feeds, calib_samples) -> QuantizeOutcome:
        """Quantize every candidate (static, dynamic, fp16 or weight-only), then keep the
        most damaging float until the budget holds. Static: with each range method in turn
        (best fully quantized result first) until one meets the budget. A fallback method
        bisects the first method's damage order instead of scoring every node again: which
        nodes hurt depends on the node far more than on the range method, and a fallback
        that cannot meet the budget then costs one model, not one per node (PP-OCR det at a
        top-1 limit: 117 s to end float with four searches)."""
        config = self.config
        name_nodes(self.model)
        if config.weight_only:
            self._weight_only_setup(calib_feeds, calib_samples)
        if config.mode == "dynamic" and calib_feeds is not None and config.outlier_ratio > 0:
            self._peak_data = (calib_feeds, calib_samples)  # read only if the budget needs it
        if config.mode == "dynamic" and opset_version(self.model) < 11:
            self._upgrade(13)  # DynamicQuantizeLinear is opset 11
            if opset_version(self.family.model) < 11:
                raise UnsupportedModelError(
                    f"dynamic quantization needs opset >= 11 (DynamicQuantizeLinear), the model "
                    f"has {opset_version(self.model)} and was not upgraded ({self.record['opset']})"
                )
        if config.mode != "static":
            return self._search()
        if config.per_channel and opset_version(self.model) < 13:
            self._upgrade(13)
        draft, asked = self._draft()
        self._time_draft(draft)
        calibration = self._calibrate(calibration, calib_feeds, calib_samples, asked)
        self.record["calibration_samples"] = calibration.samples
        base, searched = self.record, []
        for method, ranges in self._ranked_ranges(calibration):
            self.family.ranges = ranges
            searched.append(method)
            self.record = {**base, "method": method}  # nothing left from the last try
            if len(searched) > 1:
                self.record["methods_searched"] = list(searched)
            outcome = self._search(self._scored.pop(id(ranges), None))
            if outcome.record["budget_met"] or not outcome.record.get("candidates"):
                break
        return outcome

    def _search(self, judged: tuple | None = None) -> QuantizeOutcome:
        """The budget search; ``judged``: the fully quantized model already built and judged
        with these ranges (model, stats, ok, summary), so it is not built and run again."""
        config = self.config
        candidate, stats = judged[:2] if judged else self.build(())
        names = [n for n in stats["quantized"] if n in self.candidates]
        self.record["candidates"] = len(names)
        crash = crashes_onnxruntime(candidate, config.providers) if config.mode == "fp16" else None
        if not names or crash:
            self.record["reason"] = crash or nothing_quantized(stats["kept_float"])
            self.record["kept_float"] = stats["kept_float"]
            return QuantizeOutcome(self.model, self.record)
        if config.mode == "dynamic":
            self._time_draft(candidate)
        ok, summary = judged[2:] if judged else self.judge(candidate)
        spill_if_active(candidate)  # held through the search: on disk, not beside each session
        if not ok and self._peak_data is not None:
            self._find_outliers(*self._peak_data)
            self._peak_data = None
        family = self.family
        if not ok and (family.outliers or family.outlier_scales) and not family.split:
            # splitting or scaling the outlier channels costs a few small ops; a node kept
            # float costs its whole int8 speed-up, so this comes first (and only when needed)
            family.split = True
            candidate, stats = self.build(())
            ok, summary = self.judge(candidate)
            self.record.update(describe(family.outliers, family.outlier_scales))
        self.record["all_quantized"] = summary
        scores: dict[str, float] = {}
        excluded: list[str] = []
        if not ok:
            order = self._order
            if order is None:
                scores, order = self.scores(names, candidate)
                self._order = order
            else:  # a fallback range method: see search
                self.record["sensitivity"] = f"order of {self.record['methods_searched'][0]}"
                order = [n for n in order if n in names] + [n for n in names if n not in order]
            kept = fewest_kept(order, self.family.build, self.judge)
            self.record["budget_tries"] = kept.tries
            candidate, summary, ok = kept.model, kept.summary, kept.model is not None
            excluded = order[: kept.count] if ok else list(order)
        self.record["budget_met"] = ok
        self.record["measured"] = summary
        self.record["nodes"] = [
            {
                "name": n,
                "op": self.candidates[n].op_type,
                "score": scores.get(n),
                "decision": "float (budget)" if n in excluded else "quantized",
            }
            for n in names
        ]
        self.record["kept_float"] = {**stats["kept_float"], **dict.fromkeys(excluded, "budget")}
        if not ok:
            self.record["reason"] = (
                f"budget not met even with every sensitive node float ({summary})"
            )
            return QuantizeOutcome(self.model, self.record)
        return self._ship(candidate, names, excluded)

    def _ship(self, candidate: ir.Model, names: list[str], excluded: list[str]) -> QuantizeOutcome:
        """What becomes of the weights the budget kept float (kept_float), and the record."""
        int8: list[str] = []  # weights-int4's weights that went int8 for the budget
        weights = self.family.weights
        if self.config.mode == "static" or (
            self.config.mode == "dynamic" and kept_float.mostly_float(self.model, candidate)
        ):
            candidate = kept_float.fold_float_weights(self, candidate, excluded)
        elif self.config.weight_only and weights["bits"] == 4 and excluded:
            candidate, excluded, int8 = kept_float.int8_for_kept(self, candidate, excluded, weights)
        self.record["applied"] = True
        self.record["quantized"] = len(names) - len(excluded)
        if self.config.weight_only:
            kept = [n for n in names if n not in excluded and n not in int8]
            self.record["rounding"] = weight_only.rounding(weights, kept)
        self.record["min_cosine"] = self.judge.cosines.get(id(candidate))
        if self.judge.flips.get(id(candidate)):
            self.record["top1_agreement"] = self.judge.flips[id(candidate)]
        return QuantizeOutcome(candidate, self.record)

    def scores(self, names: list[str], quantized: ir.Model) -> tuple[dict[str, float], list[str]]:
        """Each candidate's damage, and the order to keep them float in (worst first)."""
        ranking = rank(
            self.family, names, quantized, self.judge, self.config.ranking, quick=self.quick
        )
        self.record["sensitivity"] = ranking.method
        return ranking.scores, ranking.order

    # -------------------------------------------------------------- mode set-up

    def _weight_only_setup(self, calib_feeds, calib_samples) -> None:
        """Bits, block and form of the weights-* mode (``weight_only``)."""
        c = self.config
        weight_bytes = initializer_bytes(self.model)
        bits, form = weight_only.bits_and_format(c.mode, c.weight_format, c.providers, weight_bytes)
        if form != "fold" and bits == 8 and opset_version(self.model) < 13:
            self._upgrade(13)  # per-channel DequantizeLinear (Conv filters, MatMul weights)
        self.family.weights = weight_only.weight_settings(
            self.model, bits, form, calib_feeds, calib_samples, c.providers
        )
        self.record["weight_format"] = form

    def _find_outliers(self, calib_feeds, calib_samples) -> None:
        """Each dynamic MatMul input's huge channels, kept out of its int8 range when the fully
        quantized model misses the budget: split, or scaled (calib.outlier_plan)."""
        c = self.config
        feeds = itertools.islice(calib_feeds, calib_samples or weight_only.GPTQ_SAMPLES)
        found = find_outliers(self.model, feeds, c.outlier_ratio, c.reduce_range, c.providers)
        self.family.outliers, self.family.outlier_scales = found

    def _time_draft(self, draft: ir.Model) -> None:
        """When the mode must not be slower than float (auto), time its fully quantized
        draft first. A draft below the speed the mode must reach (float's, or enough to beat
        another mode) rarely ends faster, as the search keeps nodes float for accuracy, not
        speed; but it can (silero-vad's static drafts at 0.8x and ends at 1.2-1.4x, its slow
        node being the one the budget keeps float). So the search still runs, ranked by the
        cheap local scores instead of one model per node, and the final timing decides."""
        config = self.config
        if not (config.check_latency and config.require_faster) or config.weight_only:
            return
        feed = self.feeds[0] if self.feeds else None
        speed = latency_gate.speed(self.model, draft, config.providers, feed)
        self.record["draft_speed"] = round(speed.ratio, 3)
        self.quick = speed.slower(config.worth_speed)

    def _calibrate(self, calibration, calib_feeds, calib_samples, asked: set[str]):
        if calibration is not None:
            return calibration
        if calib_feeds is None:
            raise SqueezeError("static quantization needs calibration data (data=)")
        options = CollectOptions(
            method=collected_with(self.config.method),
            providers=self.config.providers,
            only=frozenset(asked),
        )
        pool = workers.current()
        if pool is not None and self.calib_data is not None:
            sharded = pool.calibrate(self.model, self.calib_data, options, calib_samples)
            if sharded is not None:
                return sharded
        return Collector(self.model, options).collect(
            calib_feeds,
            total=calib_samples,
            progress=lambda done, total: progress.step("calibrating", done, total),
        )

    def _ranked_ranges(self, calibration) -> list[tuple[str, dict]]:
        """The configured method's ranges; for "auto", every method's, the one whose fully
        quantized model measures best first (budget met, then top-1 agreement, then cosine):
        the best fully quantized result does not always leave the budget search the most
        (magika: percentile ranges measure best fully quantized, mse's meet the budget)."""
        self._scored = {}  # one judged model held, not four: the first search reuses it
        if self.config.method != "auto":
            return [(self.config.method, calibration.ranges(self.config.method))]
        best: list = [None]

        def score(ranges: dict) -> tuple[tuple, str]:
            self.family.ranges = ranges
            model, stats = self.build(())
            ok, summary = self.judge(model)
            top1 = min(self.judge.flips[id(model)].values(), default=1.0)
            key = (ok, top1, self.judge.cosines[id(model)])
            if best[0] is None or key > best[0]:  # ties: the earlier method ranks first
                best[0] = key
                self._scored = {id(ranges): (model, stats, ok, summary)}
            return key, summary

        ranked, self.record["methods_tried"] = ranked_ranges(calibration, score)
        return ranked

    def _draft(self) -> tuple[ir.Model, set[str]]:
        """The fully quantized model built against placeholder ranges, and the activations
        insert-qdq read a range for: calibration observes those alone (7-46 % of the float
        activations on the corpus), and the draft times like the real model would."""
        self.family.ranges = asked = RangesAsked()
        try:
            draft, _ = self.build(())
        finally:
            self.family.ranges = {}
        return draft, asked.names

    def _upgrade(self, target: int) -> None:
        try:
            upgraded = upgrade_opset(self.model, target)
            same = compare_runs(self.judge.reference, self.judge.run(upgraded, optimize=False))
        except (UnsupportedModelError, SqueezeError, Exception) as exc:  # noqa: BLE001
            self.record["opset"] = f"kept {opset_version(self.model)}: {first_line(exc)}"
            return
        if not same.within(LOSSLESS_RTOL):
            self.record["opset"] = f"kept {opset_version(self.model)}: upgrade changed outputs"
            return
        self.record["opset"] = f"{opset_version(self.model)} -> {target}"
        self.family.model = upgraded
