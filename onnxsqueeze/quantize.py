"""The quantize stage: quantize a (simplified) float model within an accuracy budget.

Static: calibrate the activations, insert QDQ everywhere it applies, and measure the result
against the float model on evaluation samples *as onnxruntime will run it* (graph
optimizations on, so the QDQ fusions that decide speed and numerics happen). If the budget
is not met, every candidate node is scored (``onnxsqueeze.sensitivity``) and the fewest most
damaging nodes are kept float, found by bisection over the ranking. Weight-only modes need no
calibration and are measured the same way. The record says what was chosen and why, node by
node.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import onnx_ir as ir

from onnxsqueeze import kept_float, weight_only
from onnxsqueeze.alternatives import NOT_SLOWER, check_latency
from onnxsqueeze.budget import DEFAULT_BUDGET, Budget
from onnxsqueeze.calib.choice import collected_with, ranked_ranges
from onnxsqueeze.calib.outlier_plan import describe
from onnxsqueeze.calib.peaks import OUTLIER_RATIO
from onnxsqueeze.errors import SqueezeError, UnsupportedModelError, first_line
from onnxsqueeze.graphs import opset_version, scopes
from onnxsqueeze.qdq import OWN_SCALE, WEIGHTED, nothing_quantized
from onnxsqueeze.verify import LOSSLESS_RTOL, compare_runs, is_distribution
from onnxsqueeze.weight_only import GPTQ_SAMPLES

logger = logging.getLogger(__name__)

MODES = ("static", "dynamic", "fp16", "weights-int8", "weights-int4")
#: auto: static with data, dynamic without; kept only if within budget and not slower.
CHOICES = ("auto", "none", *MODES)
#: After a slow draft, exact sensitivity (one model per node) only up to this many nodes.
QUICK_EXACT = 8
#: Nodes the budget search may keep float; data-movement ops follow their producer.
CANDIDATE_OPS = (*WEIGHTED, *sorted(OWN_SCALE))


@dataclasses.dataclass(frozen=True)
class QuantizeConfig:
    mode: str = "static"
    #: range method, or "auto": each tried on the fully quantized model (calib.choice)
    method: str = "auto"
    activations: str = "uint8"
    weights: str = "int8"
    per_channel: bool = True
    reduce_range: bool | None = None
    op_types: tuple[str, ...] | None = None
    exclude_nodes: tuple[str, ...] = ()
    exclude_ops: tuple[str, ...] = ()
    #: see InsertQdqOptions.elementwise
    elementwise: str = "linked"
    budget: Budget = DEFAULT_BUDGET
    providers: tuple[str, ...] = ("cpu",)
    #: exact (one model per candidate), local (two runs), local+exact (local ranking, then
    #: exact scores for its max_exact worst), auto (exact up to max_exact nodes, else local+exact).
    sensitivity: str = "auto"
    #: At 40, PP-OCR rec's 53 candidates were ranked local+exact and its damaging nodes
    #: hid among the 13 ranked by local score alone: 2 nodes quantized where exact scores
    #: (24 s either way) found 20 within the same budget.
    max_exact: int = 96
    sensitivity_samples: int = 4
    #: Time the result against the float model; with require_faster, a slower result is dropped.
    check_latency: bool = False
    require_faster: bool = False
    #: auto: the speed (vs float) an integer mode must reach to matter, NOT_SLOWER when None or
    #: enough to beat an alternative already found; a draft below it gets the quick search.
    worth_speed: float | None = None
    #: Calibration: at most this many samples of the data; a cache file to reuse / write.
    calib_samples: int | None = None
    calib_cache: str | None = None
    #: Samples of the data the budget is judged on.
    eval_samples: int = 32

    #: Weight-only storage (quantize-weights.format); auto: fold on the CPU, whose kernels
    #: take neither a DequantizeLinear'd weight nor MatMulNBits faster than float.
    weight_format: str = "auto"
    #: Dynamic with data, when the fully quantized model misses the budget: input channels
    #: whose calibration peak exceeds this many times the median channel's are computed in
    #: float (calib.peaks) before any node is kept float; 0 turns it off.
    outlier_ratio: float = OUTLIER_RATIO

    @property
    def weight_only(self) -> bool:
        return self.mode.startswith("weights-")


@dataclasses.dataclass
class QuantizeOutcome:
    model: ir.Model
    record: dict[str, Any]


def quantize_model(
    model: ir.Model,
    eval_feeds: Sequence[Mapping[str, Any]],
    config: QuantizeConfig,
    *,
    calibration: Any = None,
    calib_feeds: Iterable[Mapping[str, Any]] | None = None,
    calib_samples: int | None = None,
) -> QuantizeOutcome:
    """Quantize ``model`` (not modified) per ``config``; ``eval_feeds`` judge the budget."""
    if config.mode not in MODES:
        raise SqueezeError(f"unknown quantization mode '{config.mode}' (known: {', '.join(MODES)})")
    started = time.perf_counter()
    stage = _Stage(model.clone(), list(eval_feeds), config)
    outcome = stage.search(calibration, calib_feeds, calib_samples)
    if config.check_latency and outcome.record.get("applied"):
        check_latency(model, outcome, config, eval_feeds[0] if eval_feeds else None)
    outcome.record["seconds"] = round(time.perf_counter() - started, 3)
    return outcome


class _Stage:
    def __init__(self, model: ir.Model, feeds: list[dict], config: QuantizeConfig) -> None:
        from onnxsqueeze.runtime import Session

        self.model = model
        self.feeds = feeds
        self.config = config
        self.reference = Session(model, config.providers).run_all(feeds)
        self.record: dict[str, Any] = {"mode": config.mode, "budget_met": False, "applied": False}
        classes = [
            name
            for name in (self.reference[0] if self.reference else {})
            if all(is_distribution(r[name]) for r in self.reference)
        ]
        if classes:  # softmax-like outputs: what a class-agreement limit reads
            self.record["class_outputs"] = classes
        #: min output cosine of each judged candidate (auto prefers accuracy within noise)
        self.cosines: dict[int, float] = {}
        #: class-score outputs whose argmax the candidate changed: name -> agreement
        self.flips: dict[int, dict[str, float]] = {}
        #: weights quantized once for every candidate built (see qdq.quantized_weight)
        self.weight_memo: dict = {}
        #: the draft ran slower than the mode must end: a cheaper search (see _time_draft)
        self.quick = False
        #: the first searched range method's damage order, which fallbacks reuse (see search)
        self._order: list[str] | None = None
        #: dynamic: input name -> outlier channels to split, or factors to scale them by
        #: (see _find_outliers), and whether the candidates built do so
        self.outliers: dict[str, tuple[int, ...]] = {}
        self.outlier_scales: dict[str, Any] = {}
        self.split = False
        self._peak_data: tuple | None = None

    # -------------------------------------------------------------- measuring

    def run(
        self,
        model: ir.Model,
        feeds: Sequence[Mapping[str, Any]] | None = None,
        optimize: bool = True,
    ) -> list[dict]:
        from onnxsqueeze.runtime import Session

        return Session(model, self.config.providers, optimize=optimize).run_all(feeds or self.feeds)

    def judge(self, model: ir.Model) -> tuple[bool, str]:
        outputs = self.run(model)
        comparison = compare_runs(self.reference, outputs)
        self.cosines[id(model)] = comparison.min_cosine
        self.flips[id(model)] = {
            o.name: o.top1_agreement
            for o in comparison.outputs
            if o.distribution and o.top1_agreement is not None and o.top1_agreement < 1
        }
        return self.config.budget.check(comparison, self.reference, outputs)

    # -------------------------------------------------------------- weight-only

    @property
    def weight_only(self) -> bool:
        return self.config.weight_only

    def _weight_only_setup(self, calib_feeds, calib_samples) -> None:
        """Bits, block and form of the weights-* mode (``onnxsqueeze.weight_only``)."""
        c = self.config
        bits, form = weight_only.bits_and_format(c.mode, c.weight_format, c.providers)
        if form != "fold" and bits == 8 and opset_version(self.model) < 13:
            self._upgrade(13)  # per-channel DequantizeLinear (Conv filters, MatMul weights)
        self._weights = weight_only.weight_settings(
            self.model, bits, form, calib_feeds, calib_samples, c.providers
        )
        self.record["weight_format"] = form

    # -------------------------------------------------------------- static

    def search(self, calibration, calib_feeds, calib_samples) -> QuantizeOutcome:
        """Quantize every candidate (static, dynamic, fp16 or weight-only), then keep the
        most damaging float until the budget holds. Static: with each range method in turn
        (best fully quantized result first) until one meets the budget. A fallback method
        bisects the first method's damage order instead of scoring every node again: which
        nodes hurt depends on the node far more than on the range method, and a fallback
        that cannot meet the budget then costs one model, not one per node (PP-OCR det at a
        top-1 limit: 117 s to end float with four searches)."""
        config = self.config
        _name_nodes(self.model)
        self.ranges = {}
        if self.weight_only:
            self._weight_only_setup(calib_feeds, calib_samples)
        if config.mode == "dynamic" and calib_feeds is not None and config.outlier_ratio > 0:
            self._peak_data = (calib_feeds, calib_samples)  # read only if the budget needs it
        if config.mode == "static":
            if config.per_channel and opset_version(self.model) < 13:
                self._upgrade(13)
            draft, asked = self._draft()
            self._time_draft(draft)
            calibration = self._calibrate(calibration, calib_feeds, calib_samples, asked)
            self.record["calibration_samples"] = calibration.samples
            base, searched = self.record, []
            for method, ranges in self._ranked_ranges(calibration):
                self.ranges = ranges
                searched.append(method)
                self.record = {**base, "method": method}  # nothing left from the last try
                if len(searched) > 1:
                    self.record["methods_searched"] = list(searched)
                outcome = self._search(self._scored.pop(id(ranges), None))
                if outcome.record["budget_met"] or not outcome.record.get("candidates"):
                    break
            return outcome
        return self._search()

    def _search(self, judged: tuple | None = None) -> QuantizeOutcome:
        """The budget search; ``judged``: the fully quantized model already built and judged
        with these ranges (model, stats, ok, summary), so it is not built and run again."""
        from onnxsqueeze.runtime import crashes_onnxruntime

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
        if not ok and self._peak_data is not None:
            self._find_outliers(*self._peak_data)
            self._peak_data = None
        if not ok and (self.outliers or self.outlier_scales) and not self.split:
            # splitting or scaling the outlier channels costs a few small ops; a node kept
            # float costs its whole int8 speed-up, so this comes first (and only when needed)
            self.split = True
            candidate, stats = self.build(())
            ok, summary = self.judge(candidate)
            self.record.update(describe(self.outliers, self.outlier_scales))
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
            k, candidate, summary = self.bisect(order)
            ok = candidate is not None
            excluded = order[:k] if ok else list(order)
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
        int8: list[str] = []  # weights-int4's weights that went int8 for the budget
        if config.mode == "static":
            candidate = kept_float.fold_float_weights(self, candidate, excluded)
        elif self.weight_only and self._weights["bits"] == 4 and excluded:
            candidate, excluded, int8 = kept_float.int8_for_kept(
                self, candidate, excluded, self._weights
            )
        self.record["applied"] = True
        self.record["quantized"] = len(names) - len(excluded)
        if self.weight_only:
            kept = [n for n in names if n not in excluded and n not in int8]
            self.record["rounding"] = weight_only.rounding(self._weights, kept)
        self.record["min_cosine"] = self.cosines.get(id(candidate))
        if self.flips.get(id(candidate)):
            self.record["top1_agreement"] = self.flips[id(candidate)]
        return QuantizeOutcome(candidate, self.record)

    def _find_outliers(self, calib_feeds, calib_samples) -> None:
        """Each dynamic MatMul input's huge channels, kept out of its int8 range when the fully
        quantized model misses the budget: split, or scaled (calib.outlier_plan)."""
        from onnxsqueeze.calib.outlier_plan import find_outliers

        c, feeds = self.config, itertools.islice(calib_feeds, calib_samples or GPTQ_SAMPLES)
        found = find_outliers(self.model, feeds, c.outlier_ratio, c.reduce_range, c.providers)
        self.outliers, self.outlier_scales = found

    def _time_draft(self, draft: ir.Model) -> None:
        """When the mode must not be slower than float (auto), time its fully quantized
        draft first. A draft below the speed the mode must reach (float's, or enough to beat
        another mode) rarely ends faster, as the search keeps nodes float for accuracy, not
        speed; but it can (silero-vad's static drafts at 0.8x and ends at 1.2-1.4x, its slow
        node being the one the budget keeps float). So the search still runs, ranked by the
        cheap local scores instead of one model per node, and the final timing decides."""
        from onnxsqueeze.bench import compare_latency

        config = self.config
        if not (config.check_latency and config.require_faster) or self.weight_only:
            return
        feed = self.feeds[0] if self.feeds else None
        speed = compare_latency(self.model, draft, config.providers, feed)
        self.record["draft_speed"] = round(speed, 3)
        self.quick = speed < (config.worth_speed or NOT_SLOWER)

    def _calibrate(self, calibration, calib_feeds, calib_samples, asked: set[str]):
        if calibration is not None:
            return calibration
        if calib_feeds is None:
            raise SqueezeError("static quantization needs calibration data (--data)")
        from onnxsqueeze.calib.collector import CollectOptions, Collector

        options = CollectOptions(
            method=collected_with(self.config.method),
            providers=self.config.providers,
            only=frozenset(asked),
        )
        return Collector(self.model, options).collect(calib_feeds, total=calib_samples)

    def _ranked_ranges(self, calibration) -> list[tuple[str, dict]]:
        """The configured method's ranges; for "auto", every method's, the one whose fully
        quantized model measures best first (budget met, then top-1 agreement, then cosine):
        the best fully quantized result does not always leave the budget search the most
        (magika: percentile ranges measure best fully quantized, mse's meet the budget)."""
        #: the best-scored method's judged model, by id of its ranges (one model held, not
        #: four: the search of the first method reuses it; a fallback builds its own)
        self._scored: dict[int, tuple] = {}
        if self.config.method != "auto":
            return [(self.config.method, calibration.ranges(self.config.method))]
        best: list = [None]

        def score(ranges: dict) -> tuple[tuple, str]:
            self.ranges = ranges
            model, stats = self.build(())
            ok, summary = self.judge(model)
            top1 = min(self.flips[id(model)].values(), default=1.0)
            key = (ok, top1, self.cosines[id(model)])
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
        from onnxsqueeze.calib.tensors import RangesAsked

        self.ranges = asked = RangesAsked()
        try:
            draft, _ = self.build(())
        finally:
            self.ranges = {}
        return draft, asked.names

    def _upgrade(self, target: int) -> None:
        from onnxsqueeze.opsets import upgrade_opset

        try:
            upgraded = upgrade_opset(self.model, target)
            same = compare_runs(self.reference, self.run(upgraded, optimize=False))
        except (UnsupportedModelError, SqueezeError, Exception) as exc:  # noqa: BLE001
            self.record["opset"] = f"kept {opset_version(self.model)}: {first_line(exc)}"
            return
        if not same.within(LOSSLESS_RTOL):
            self.record["opset"] = f"kept {opset_version(self.model)}: upgrade changed outputs"
            return
        self.record["opset"] = f"{opset_version(self.model)} -> {target}"
        self.model = upgraded

    @property
    def candidates(self) -> dict[str, ir.Node]:
        if not hasattr(self, "_candidates") and self.config.mode == "fp16":
            self._candidates = {n.name: n for n in self.model.graph if n.name}
        if not hasattr(self, "_candidates") and self.weight_only:
            from onnxsqueeze.passes.quantize_weights import WEIGHT_OPS

            self._candidates = {
                n.name: n
                for scope in scopes(self.model)
                for n in scope
                if n.op_type in WEIGHT_OPS and n.name
            }
        if not hasattr(self, "_candidates"):
            ops = set(self.config.op_types or CANDIDATE_OPS) & set(CANDIDATE_OPS)
            self._candidates = {
                n.name: n
                for scope in scopes(self.model)
                for n in scope
                if n.op_type in ops and n.name
            }
        return self._candidates

    def build(self, excluded: Sequence[str]) -> tuple[ir.Model, dict[str, Any]]:
        from onnxsqueeze.passes.insert_qdq import DEFAULT_OPS, InsertQdqPass
        from onnxsqueeze.passes.quantize_dynamic import QuantizeDynamicPass

        config = self.config
        candidate = self.model.clone()
        if self.weight_only:
            from onnxsqueeze.passes.quantize_weights import QuantizeWeightsPass

            exclude = tuple(config.exclude_nodes) + tuple(excluded)
            result = QuantizeWeightsPass(**self._weights, exclude_nodes=exclude)(candidate)
            return candidate, result.stats
        if config.mode == "fp16":
            from onnxsqueeze.passes.convert_fp16 import ConvertFp16Pass

            result = ConvertFp16Pass(exclude_nodes=tuple(config.exclude_nodes) + tuple(excluded))(
                candidate
            )
            return candidate, {
                **result.stats,
                "quantized": result.stats["converted_nodes"],
                "kept_float": {},
            }
        if config.mode == "dynamic":
            result = QuantizeDynamicPass(
                per_channel=config.per_channel,
                reduce_range=config.reduce_range,
                exclude_nodes=tuple(config.exclude_nodes) + tuple(excluded),
                outliers=self.outliers if self.split else None,
                outlier_scales=self.outlier_scales if self.split else None,
                embedding_fold=set(config.providers) <= {"cpu"},
            )(candidate)
            return candidate, result.stats
        result = InsertQdqPass(
            ranges=self.ranges,
            weight_memo=self.weight_memo,
            activations=config.activations,
            weights=config.weights,
            per_channel=config.per_channel,
            reduce_range=config.reduce_range,
            op_types=tuple(config.op_types or DEFAULT_OPS),
            exclude_nodes=tuple(config.exclude_nodes) + tuple(excluded),
            exclude_ops=tuple(config.exclude_ops),
            elementwise=config.elementwise,
        )(candidate)
        return candidate, result.stats

    def scores(self, names: list[str], quantized: ir.Model) -> tuple[dict[str, float], list[str]]:
        """Each candidate's damage, and the order to keep them float in (worst first)."""
        from onnxsqueeze.sensitivity import exact_scores, local_scores

        config = self.config
        feeds = self.feeds[: config.sensitivity_samples]
        method = config.sensitivity
        if method == "auto":
            exact_up_to = QUICK_EXACT if self.quick else config.max_exact
            method = "exact" if len(names) <= exact_up_to else "local+exact"
            if self.quick and method != "exact":
                method = "local"  # a slow draft: see _time_draft
        self.record["sensitivity"] = method
        reference = self.reference[: len(feeds)]

        def exact(subset: list[str]) -> dict[str, float]:
            outside = [n for n in names if n not in subset]

            def only(excluded: Sequence[str]) -> ir.Model:
                return self.build([*excluded, *outside])[0]

            run = lambda m: self.run(m, feeds, optimize=False)  # noqa: E731
            return exact_scores(subset, only, run, reference)

        if method == "exact":
            scores = exact(names)
            return scores, sorted(names, key=lambda n: -scores[n])
        nodes = {n: self.candidates[n] for n in names}
        local = local_scores(self.model, quantized, nodes, feeds, config.providers)
        by_local = sorted(names, key=lambda n: -local[n])
        if method == "local":
            return local, by_local
        # the local ranking picks the suspects, exact scores order them; the rest follow
        suspects = exact(by_local[: config.max_exact])
        order = sorted(suspects, key=lambda n: -suspects[n]) + by_local[config.max_exact :]
        return {**local, **suspects}, order

    def bisect(self, order: list[str]) -> tuple[int, ir.Model | None, str]:
        """Fewest leading nodes of ``order`` to keep float so the budget holds (bisection:
        keeping more nodes float does not, in practice, make the error larger). At least the
        least damaging node must stay quantized, or there is nothing to ship."""
        last = len(order) - 1
        candidate, _ = self.build(order[:last])
        ok, summary = self.judge(candidate)
        tries = 1
        if not ok:
            self.record["budget_tries"] = tries
            return len(order), None, summary
        lo, hi, best = 0, last, (candidate, summary)  # lo fails, hi passes
        while hi - lo > 1:
            mid = (lo + hi) // 2
            candidate, _ = self.build(order[:mid])
            ok, summary = self.judge(candidate)
            tries += 1
            if ok:
                hi, best = mid, (candidate, summary)
            else:
                lo = mid
        self.record["budget_tries"] = tries
        return hi, best[0], best[1]


def _name_nodes(model: ir.Model) -> None:
    """Every node gets a name (exclusions and the report refer to nodes by name)."""
    taken = {n.name for scope in scopes(model) for n in scope if n.name}
    count = 0
    for scope in scopes(model):
        for node in scope:
            if not node.name:
                while f"{node.op_type}_{count}" in taken:
                    count += 1
                node.name = f"{node.op_type}_{count}"
                taken.add(node.name)
