"""The prune stage: channels (or weights) removed within the accuracy budget.

Structured (``auto``, ``channels=R``): the candidates are the channel clusters of
``prune.channels`` (producers whose channels are tied); a build removes ``ratio`` of every
cluster's free channels except in ``kept`` clusters, the consumers refitted on the
calibration data. ``channels=R`` builds R everywhere and, if that misses the budget, the
shared search (``stages.search``) keeps whole the clusters whose pruning hurts most. ``auto``
does the same for a ladder of ratios (largest first; one sensitivity ranking serves them
all), keeps the result with the fewest multiply-adds that also holds on every sample, and
ships it only if it runs faster than the model before it: channels are pruned for speed.

Unstructured (``sparsity=S``, ``N:M``): the candidates are the layers prune-weights zeroes;
the same search keeps the most damaging dense. The record lists every cluster or layer:
channels (or weights) before and after, decision, why channels could not go.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import onnx_ir as ir

from onnxsqueeze.calib.gram import gram_matrices
from onnxsqueeze.core.flops import total_macs
from onnxsqueeze.core.graphs import name_nodes
from onnxsqueeze.core.stats import model_stats
from onnxsqueeze.passes.prune_channels import PruneChannelsPass
from onnxsqueeze.passes.prune_weights import PruneWeightsPass
from onnxsqueeze.prune.allocate import allocate
from onnxsqueeze.stages import latency_gate
from onnxsqueeze.stages.judge import Judge
from onnxsqueeze.stages.prune.config import GRAM_SAMPLES, PruneConfig, PruneOutcome
from onnxsqueeze.stages.search import fewest_kept, rank
from onnxsqueeze.stages.sensitivity import output_nsr

#: auto ships channel pruning only this much faster than the model before it: beyond timing
#: noise (latency_gate.NOT_SLOWER counts 0.97 as a tie), since speed is what it is for.
MIN_SPEEDUP = 1.05
#: auto's refinement of the allocation builds at most this many models.
MAX_REFINE = 16
#: A group's sensitivity stops at the first ratio whose error alone is past this NSR.
MAX_NSR = 0.5


class ChannelFamily:
    """Channel clusters as a family of the shared search (a cluster is named after its
    first producer, the node the candidates map gives)."""

    def __init__(self, model: ir.Model, config: PruneConfig, grams: Mapping | None) -> None:
        self.model, self.config, self.grams = model, config, grams
        self.ratio = 0.5
        probe = model.clone()
        stats = self._pass(probe, None).stats
        nodes = {node.name: node for node in model.graph}
        self._candidates = {c["name"]: nodes[c["name"]] for c in stats["clusters"] if c["removed"]}
        self.clusters = stats["clusters"]

    @property
    def candidates(self) -> dict[str, ir.Node]:
        return self._candidates

    def _pass(self, model: ir.Model, ratios: Mapping[str, float] | None, feeds=None):
        c = self.config
        return PruneChannelsPass(
            ratio=self.ratio, ratios=ratios, grams=self.grams, refit=c.refit,
            multiple=c.multiple, exclude_nodes=c.exclude_nodes, feeds=feeds, heads=c.heads,
        )(model)  # fmt: skip

    def ratios(self, kept: Sequence[str]) -> dict[str, float]:
        """Every candidate at the family's ratio but ``kept``."""
        return {name: self.ratio for name in self._candidates if name not in kept}

    def build(self, kept: Sequence[str]) -> ir.Model:
        return self.build_ratios(self.ratios(kept))[0]

    def build_ratios(
        self, ratios: Mapping[str, float], feeds: Sequence[Mapping[str, Any]] | None = None
    ) -> tuple[ir.Model, dict[str, Any]]:
        """A model with each named cluster at its own ratio (the others whole); with
        ``feeds``, refitted sequentially on them (see prune-channels)."""
        model = self.model.clone()
        return model, self._pass(model, dict(ratios), feeds).stats


class WeightsFamily:
    """Layers prune-weights zeroes, as a family of the shared search."""

    def __init__(self, model: ir.Model, config: PruneConfig, grams: Mapping | None) -> None:
        self.model, self.config, self.grams = model, config, grams
        _, stats = self.build_with_stats(())
        nodes = {node.name: node for node in model.graph}
        self._candidates = {name: nodes[name] for name in stats["pruned"] if name in nodes}

    @property
    def candidates(self) -> dict[str, ir.Node]:
        return self._candidates

    def build(self, kept: Sequence[str]) -> ir.Model:
        return self.build_with_stats(kept)[0]

    def build_with_stats(self, kept: Sequence[str]) -> tuple[ir.Model, dict[str, Any]]:
        c = self.config
        model = self.model.clone()
        result = PruneWeightsPass(
            sparsity=c.amount if c.kind == "sparsity" else 0.5,
            pattern=c.pattern if c.kind == "n:m" else "unstructured",
            grams=self.grams, exclude_nodes=(*c.exclude_nodes, *kept),
            embeddings=True,  # tables too: the budget, not a default, keeps them dense
        )(model)  # fmt: skip
        return model, result.stats


def prune_model(
    model: ir.Model,
    eval_feeds: Sequence[Mapping[str, Any]],
    config: PruneConfig,
    *,
    calib_feeds: Iterable[Mapping[str, Any]] | None = None,
) -> PruneOutcome:
    """Prune ``model`` (not modified) per ``config``; ``eval_feeds`` judge the budget,
    ``calib_feeds`` give the Gram matrices of the refit (and of Wanda's importance)."""
    started = time.perf_counter()
    outcome = PruneStage(model.clone(), list(eval_feeds), config).run(calib_feeds)
    outcome.record["seconds"] = round(time.perf_counter() - started, 3)
    return outcome


class PruneStage:
    def __init__(self, model: ir.Model, feeds: list[dict], config: PruneConfig) -> None:
        name_nodes(model)
        self.model, self.config = model, config
        self.judge = Judge(model, feeds, config.budget, config.providers)
        self.fit_feeds: list[dict] = []
        self.feed = feeds[0] if feeds else None
        self.record: dict[str, Any] = {"mode": config.mode, "applied": False, "budget_met": False}

    def run(self, calib_feeds: Iterable[Mapping[str, Any]] | None) -> PruneOutcome:
        c = self.config
        grams = None
        if calib_feeds is not None:
            self.fit_feeds = list(itertools.islice(calib_feeds, c.calib_samples or GRAM_SAMPLES))
            grams = gram_matrices(
                self.model, self.fit_feeds, providers=c.providers, ones=c.structured
            )
        self.record["data_aware"] = bool(grams)
        self.record["macs_before"] = total_macs(self.model, self.feed)
        if c.structured:
            family = ChannelFamily(self.model, c, grams)
            self.record["clusters_prunable"] = len(family.candidates)
            if not family.candidates:
                return self._done(None, "no channel cluster may lose channels", family)
            if c.kind == "channels":
                family.ratio = c.amount
                return self._fixed(family)
            return self._auto(family)
        family = WeightsFamily(self.model, c, grams)
        if not family.candidates:
            return self._done(None, "no Conv/MatMul/Gemm weight large enough to prune", family)
        return self._fixed(family)

    def _fixed(self, family) -> PruneOutcome:
        model = family.build(())
        ok, summary = self.judge(model)
        self.record["all_pruned"] = summary
        kept: list[str] = []
        if not ok:
            ranking = rank(
                family, list(family.candidates), model, self.judge, self.config.sensitivity
            )
            self.record["sensitivity"] = ranking.method
            found = fewest_kept(ranking.order, family.build, self.judge)
            self.record["budget_tries"] = found.tries
            if found.model is None:
                self.record["measured"] = found.summary
                return self._done(
                    None, f"budget not met even with all but one whole ({found.summary})", family
                )
            kept, model, summary = ranking.order[: found.count], found.model, found.summary
        return self._ship(model, summary, kept, family)

    def _auto(self, family: ChannelFamily) -> PruneOutcome:
        """Per-group ratios: each group's error and saving measured alone at every ratio,
        then a bisection over the error allowance the allocation (``prune.allocate``) may
        spend, judged against the budget as onnxruntime runs the model."""
        c = self.config
        self.judge.budget = c.budget.share(c.auto_margin)
        self.record["searched_within"] = f"{c.auto_margin:g} of the budget's room for error"
        options = self._sensitivity(family)
        errors = [e for opts in options.values() for _, e, _ in opts if e > 0]
        if not options or not errors:
            return self._done(None, "no group saves multiply-adds", family)
        low = math.log(min(errors) / 10)
        high = math.log(sum(max(e for _, e, _ in opts) for opts in options.values() if opts))
        found: list[tuple[int, dict[str, float], ir.Model, str]] = []
        tried: list[dict[str, Any]] = []
        met: dict[tuple, bool] = {}
        for _ in range(c.search_steps):
            middle = (low + high) / 2
            ratios = allocate(options, math.exp(middle))
            if not ratios:  # nothing fits this allowance
                low = middle
                continue
            key = tuple(sorted(ratios.items()))
            if key not in met:
                model, _ = family.build_ratios(ratios)
                ok, summary = self.judge(model)
                met[key] = ok
                entry = {"allowance": round(math.exp(middle), 6), "groups": len(ratios),
                         "met": ok, "measured": summary}  # fmt: skip
                if ok:
                    entry["macs"] = total_macs(model, self.feed)
                    found.append((entry["macs"], ratios, model, summary))
                tried.append(entry)
            if met[key]:
                low = middle
            else:
                high = middle
        self.record["allowances_tried"] = tried
        if not found:
            last = tried[-1]["measured"] if tried else "no allocation fits"
            return self._done(None, f"no allocation met the budget ({last})", family)
        confirm = self._confirm_judge()
        choice = self._confirmed(confirm, sorted(found, key=lambda f: f[0]))
        if choice is None:
            return self._done(None, self.record["confirmed"], family)
        _, ratios, model, summary = self._refined(family, options, choice, confirm)
        self.record["ratios"] = ratios
        return self._ship(model, summary, ratios, family)

    def _sensitivity(self, family: ChannelFamily) -> dict[str, list[tuple[float, float, float]]]:
        """Group -> (ratio, output noise-to-signal ratio, multiply-adds saved) with only that
        group pruned, on the first sensitivity samples; a group's larger ratios are skipped
        once its error is past any budget (MAX_NSR)."""
        c = self.config
        feeds = self.judge.feeds[: c.sensitivity.samples]
        reference = self.judge.reference[: len(feeds)]
        before = self.record["macs_before"]
        options: dict[str, list[tuple[float, float, float]]] = {}
        for name in family.candidates:
            options[name] = []
            for ratio in sorted(c.ratios):
                model, _ = family.build_ratios({name: ratio})
                error = output_nsr(reference, self.judge.run(model, feeds, optimize=False))
                saved = before - total_macs(model, self.feed)
                options[name].append((ratio, error, float(saved)))
                if error > MAX_NSR:
                    break
        self.record["sensitivity"] = {
            name: [[r, round(e, 6), int(s)] for r, e, s in opts] for name, opts in options.items()
        }
        return options

    def _refined(self, family: ChannelFamily, options, choice: tuple, confirm) -> tuple:
        """The allocation assumes errors add up, which leaves room (or not) in practice: each
        group's next larger ratio is tried on the chosen model, the most saving per unit of
        its measured error first, kept where the budget (and the confirming judge) still
        holds; at most MAX_REFINE builds."""
        macs, ratios, model, summary = choice
        ratios = dict(ratios)
        heap: list[tuple[float, str, int]] = []

        def push(name: str) -> None:
            opts = options[name]
            now = next((i for i, o in enumerate(opts) if o[0] == ratios.get(name)), -1)
            if now + 1 < len(opts):
                base = opts[now] if now >= 0 else (0.0, 0.0, 0.0)
                step = opts[now + 1]
                gain = (step[2] - base[2]) / max(step[1] - base[1], 1e-12)
                heapq.heappush(heap, (-gain, name, now + 1))

        for name in options:
            push(name)
        tries = 0
        while heap and tries < MAX_REFINE:
            _, name, index = heapq.heappop(heap)
            trial = {**ratios, name: options[name][index][0]}
            candidate, _ = family.build_ratios(trial)
            tries += 1
            ok, text = self.judge(candidate)
            if ok and confirm is not None:
                ok = confirm(candidate)[0]
            if ok:
                ratios, model, summary = trial, candidate, text
                push(name)
        self.record["refine_tries"] = tries
        return total_macs(model, self.feed), ratios, model, summary

    def _sequential(self, family: ChannelFamily, ratios, model: ir.Model, summary: str):
        """The chosen ratios, refitted sequentially (each consumer from what really reaches
        it: two runs of the calibration samples per layer, so only for the shipped model);
        kept if it meets the budget on the judged samples with a better worst cosine."""
        if not self.fit_feeds or not self.config.refit or not family.grams:
            return model, summary, family.build_ratios(ratios)[1]
        started = time.perf_counter()
        refitted, stats = family.build_ratios(ratios, self.fit_feeds)
        ok, text = self.judge(refitted)
        gain = self.judge.cosines[id(refitted)] - self.judge.cosines.get(id(model), -1.0)
        self.record["sequential_refit"] = {
            "seconds": round(time.perf_counter() - started, 2),
            "measured": text,
            "kept": ok and gain >= 0,
        }
        if ok and gain >= 0:
            return refitted, text, stats
        return model, summary, family.build_ratios(ratios)[1]

    def _confirm_judge(self) -> Judge | None:
        """A judge on every sample (those the refit was fit to too) with the stage's whole
        budget: the search ends on the edge of what its judged samples allow within the
        margin; the choice must at least meet the budget on everything seen."""
        fit = [f for f in self.fit_feeds if not any(f is j for j in self.judge.feeds)]
        if not fit:
            return None
        feeds = [*self.judge.feeds, *fit]
        return Judge(self.model, feeds, self.config.budget, self.config.providers)

    def _confirmed(self, judge: Judge | None, found: list[tuple]) -> tuple | None:
        """The fewest multiply-adds whose model the confirming judge accepts."""
        if judge is None:
            return found[0]
        summary = ""
        for choice in found:
            ok, summary = judge(choice[2])
            if ok:
                self.record["confirmed"] = f"on all {len(judge.feeds)} samples: {summary}"
                return choice
        self.record["confirmed"] = (
            f"no result that met the budget on {len(self.judge.feeds)} judged samples holds on "
            f"all {len(judge.feeds)} ({summary})"
        )
        return None

    def _ship(self, model: ir.Model, summary: str, kept, family) -> PruneOutcome:
        """``kept``: the candidates left whole (or, for auto, each cluster's ratio)."""
        c = self.config
        self.record.update(budget_met=True, measured=summary)
        if isinstance(family, ChannelFamily):
            ratios = kept if isinstance(kept, dict) else family.ratios(kept)
            kept = [n for n in family.candidates if not ratios.get(n)]
            model, summary, stats = self._sequential(family, ratios, model, summary)
            self.record["measured"] = summary
        else:
            _, stats = family.build_with_stats(kept)
        self._describe(stats, kept)
        self.record["macs_after"] = total_macs(model, self.feed)
        if c.check_latency:
            speed = latency_gate.speed(self.model, model, c.providers, self.feed)
            self.record["speed_vs_before"] = round(speed.ratio, 3)
            if c.structured and speed.ratio < MIN_SPEEDUP:
                self.record["not_faster"] = True
                if c.kind == "auto":
                    return self._done(
                        None,
                        f"pruned model runs at {speed.ratio:.2f}x the speed before it: "
                        f"not {MIN_SPEEDUP:.2f}x faster, not worth its error",
                        family,
                    )
        before = model_stats(self.model).weight_bytes
        after = model_stats(model).weight_bytes
        self.record["weight_bytes_saved"] = round(1 - after / before, 4) if before else 0.0
        self.record["applied"] = True
        self.record["min_cosine"] = self.judge.cosines.get(id(model))
        return PruneOutcome(model, self.record)

    def _describe(self, stats: dict[str, Any], kept: list[str]) -> None:
        if self.config.structured:
            clusters = []
            measured = self.record.get("sensitivity")  # auto's per-group measurements
            measured = measured if isinstance(measured, dict) else {}
            ratios = self.record.get("ratios", {})
            for entry in stats["clusters"]:
                entry = dict(entry)
                if entry["name"] in kept:
                    entry["decision"] = "whole (budget)"
                ratio = ratios.get(entry["name"])
                found = [m for m in measured.get(entry["name"], []) if m[0] == ratio]
                if found:  # what that group's ratio did alone: output NSR, multiply-adds saved
                    entry.update(ratio=ratio, error_alone=found[0][1], macs_saved=found[0][2])
                clusters.append(entry)
            self.record["clusters"] = clusters
            self.record["channels_removed"] = stats["channels_removed"]
            return
        layers = []
        for layer in stats["layers"]:
            layers.append({**layer, "decision": "pruned"})
        for name in kept:
            layers.append({"name": name, "decision": "dense (budget)"})
        self.record.update(layers=layers, sparsity=stats["sparsity"], zeros=stats["zeros"])

    def _done(self, model: ir.Model | None, reason: str, family=None) -> PruneOutcome:
        self.record["reason"] = reason
        if family is not None and isinstance(family, ChannelFamily):
            self.record.setdefault("clusters", family.clusters)
        return PruneOutcome(model or self.model, self.record)
