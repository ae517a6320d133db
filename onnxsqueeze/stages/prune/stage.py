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

import itertools
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import onnx_ir as ir

from onnxsqueeze.calib.gram import gram_matrices
from onnxsqueeze.core.flops import total_macs
from onnxsqueeze.core.graphs import name_nodes
from onnxsqueeze.core.io import model_stats
from onnxsqueeze.passes.prune_channels import PruneChannelsPass
from onnxsqueeze.passes.prune_weights import PruneWeightsPass
from onnxsqueeze.stages import latency_gate
from onnxsqueeze.stages.judge import Judge
from onnxsqueeze.stages.prune.config import GRAM_SAMPLES, PruneConfig, PruneOutcome
from onnxsqueeze.stages.search import fewest_kept, rank

#: auto's per-cluster refinement builds at most this many models.
MAX_REFINE = 24


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

    def _pass(self, model: ir.Model, ratios: Mapping[str, float] | None):
        c = self.config
        return PruneChannelsPass(
            ratio=self.ratio, ratios=ratios, grams=self.grams, refit=c.refit,
            multiple=c.multiple, exclude_nodes=c.exclude_nodes,
        )(model)  # fmt: skip

    def ratios(self, kept: Sequence[str]) -> dict[str, float]:
        """Every candidate at the family's ratio but ``kept``."""
        return {name: self.ratio for name in self._candidates if name not in kept}

    def build(self, kept: Sequence[str]) -> ir.Model:
        return self.build_ratios(self.ratios(kept))[0]

    def build_ratios(self, ratios: Mapping[str, float]) -> tuple[ir.Model, dict[str, Any]]:
        """A model with each named cluster at its own ratio (the others whole)."""
        model = self.model.clone()
        return model, self._pass(model, dict(ratios)).stats


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
        c = self.config
        self.judge.budget = c.budget.share(c.auto_margin)
        self.record["searched_within"] = f"{c.auto_margin:g} of the budget's room for error"
        found: list[tuple[int, dict[str, float], ir.Model, str]] = []
        tried, order = [], None
        ladder = sorted(c.ratios, reverse=True)
        for ratio in ladder:
            family.ratio = ratio
            model = family.build(())
            ok, summary = self.judge(model)
            kept: list[str] = []
            if not ok:
                if order is None:
                    ranking = rank(
                        family, list(family.candidates), model, self.judge, c.sensitivity
                    )
                    order, self.record["sensitivity"] = ranking.order, ranking.method
                search = fewest_kept(order, family.build, self.judge)
                ok, kept, model, summary = (
                    search.model is not None,
                    order[: search.count],
                    search.model,
                    search.summary,
                )
            entry = {"ratio": ratio, "met": ok, "kept_whole": len(kept), "measured": summary}
            if ok:
                macs = total_macs(model, self.feed)
                entry["macs"] = macs
                found.append((macs, family.ratios(kept), model, summary))
            tried.append(entry)
            if ok and not kept:
                break  # every cluster at this ratio: smaller ratios only cost more
        self.record["ratios_tried"] = tried
        if not found:
            return self._done(None, f"no ratio met the budget ({tried[-1]['measured']})", family)
        confirm = self._confirm_judge()
        choice = self._confirmed(confirm, sorted(found, key=lambda f: f[0]))
        if choice is None:
            return self._done(None, self.record["confirmed"], family)
        choice = self._refined(family, choice, ladder, confirm)
        _, ratios, model, summary = choice
        self.record["ratios"] = ratios
        return self._ship(model, summary, ratios, family)

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

    def _refined(self, family: ChannelFamily, choice: tuple, ladder: list[float], confirm):
        """Clusters the ladder left below the top ratio (or whole) try each larger ratio,
        one cluster at a time, least damaging first: per-cluster ratios the budget allows,
        not one ratio for all (at most MAX_REFINE builds)."""
        macs, ratios, model, summary = choice
        tries = 0
        for name in family.candidates:
            for ratio in ladder:
                if ratio <= ratios.get(name, 0.0) or tries >= MAX_REFINE:
                    break
                trial = {**ratios, name: ratio}
                candidate, _ = family.build_ratios(trial)
                tries += 1
                ok, text = self.judge(candidate)
                if ok and confirm is not None:
                    ok = confirm(candidate)[0]
                if ok:
                    ratios, model, summary = trial, candidate, text
                    break
        self.record["refine_tries"] = tries
        return total_macs(model, self.feed), ratios, model, summary

    def _ship(self, model: ir.Model, summary: str, kept, family) -> PruneOutcome:
        """``kept``: the candidates left whole (or, for auto, each cluster's ratio)."""
        c = self.config
        self.record.update(budget_met=True, measured=summary)
        if isinstance(kept, dict):
            ratios, kept = kept, [n for n in family.candidates if not kept.get(n)]
            _, stats = family.build_ratios(ratios)
        elif isinstance(family, ChannelFamily):
            _, stats = family.build_ratios(family.ratios(kept))
        else:
            _, stats = family.build_with_stats(kept)
        self._describe(stats, kept)
        self.record["macs_after"] = total_macs(model, self.feed)
        if c.check_latency:
            speed = latency_gate.speed(self.model, model, c.providers, self.feed)
            self.record["speed_vs_before"] = round(speed.ratio, 3)
            if c.structured and speed.ratio < 1 / latency_gate.SPEED_TIE:
                self.record["not_faster"] = True
                if c.kind == "auto":
                    return self._done(
                        None,
                        f"pruned model runs at {speed.ratio:.2f}x the speed before it: "
                        f"not {1 / latency_gate.SPEED_TIE:.2f}x faster, not worth its error",
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
            for entry in stats["clusters"]:
                entry = dict(entry)
                if entry["name"] in kept:
                    entry["decision"] = "whole (budget)"
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
