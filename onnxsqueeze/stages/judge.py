"""The judge every lossy stage measures its candidates with: the model before the change
runs once on the evaluation samples, and each candidate is run *as onnxruntime will run it*
(graph optimizations on, so the fusions that decide speed and numerics happen) and held
to the budget. What it measured of each candidate (worst cosine, changed top-1 answers)
stays at hand for the report and for ties between alternatives."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import onnx_ir as ir

from onnxsqueeze.core.io import initializer_bytes
from onnxsqueeze.run import workers
from onnxsqueeze.run.compare import Comparison, compare_runs, is_distribution
from onnxsqueeze.run.memory import give_back_after
from onnxsqueeze.run.session import Session
from onnxsqueeze.stages.budget import Budget


class Judge:
    """Runs candidates against ``model``'s outputs on ``feeds`` and checks ``budget``.

    Calling it returns ``(met, one-line summary)``; ``cosines`` and ``flips`` keep, by
    ``id`` of each judged model, its worst output cosine and the class outputs whose argmax
    it changed (name -> agreement)."""

    def __init__(
        self,
        model: ir.Model,
        feeds: Sequence[Mapping[str, Any]],
        budget: Budget,
        providers: Sequence[str],
    ) -> None:
        self.feeds = list(feeds)
        self.budget = budget
        self.providers = tuple(providers)
        self.reference = Session(model, self.providers).run_all(self.feeds)
        give_back_after(initializer_bytes(model))
        self.cosines: dict[int, float] = {}
        self.flips: dict[int, dict[str, float]] = {}

    def class_outputs(self) -> list[str]:
        """Outputs whose every reference sample is a probability distribution: a
        classifier's answers, which a class-agreement limit reads."""
        first = self.reference[0] if self.reference else {}
        return [name for name in first if all(is_distribution(r[name]) for r in self.reference)]

    def run(
        self,
        model: ir.Model,
        feeds: Sequence[Mapping[str, Any]] | None = None,
        optimize: bool = True,
    ) -> list[dict]:
        give_back_after(initializer_bytes(model))  # the last build's leftovers, first
        session = Session(model, self.providers, optimize=optimize)
        try:
            return session.run_all(feeds or self.feeds)
        finally:
            del session
            give_back_after(initializer_bytes(model))

    def run_many(
        self,
        models: Iterable[ir.Model],
        feeds: Sequence[Mapping[str, Any]] | None = None,
        optimize: bool = True,
    ) -> Iterator[list[dict]]:
        """Each model's outputs, in order, as it comes: on the run's pool of workers when
        there is one (``run.workers``; the same numbers), else here one after the other."""
        feeds = feeds or self.feeds
        pool = workers.current()
        if pool is not None and pool.size > 1:
            yield from pool.run_models(models, feeds, self.providers, optimize)
            return
        for model in models:
            yield self.run(model, feeds, optimize)

    def __call__(self, model: ir.Model) -> tuple[bool, str]:
        comparison, outputs = self.measure(model)
        return self.budget.check(comparison, self.reference, outputs)

    def verdicts(self, models: Sequence[ir.Model]) -> list[tuple[bool, str]]:
        """What calling the judge on each model says, their runs spread over the run's pool
        of workers when there is one (the bisection's look-ahead: stages.search)."""
        found = []
        for model, outputs in zip(models, self.run_many(models), strict=True):
            comparison = self._compared(model, outputs)
            found.append(self.budget.check(comparison, self.reference, outputs))
        return found

    def measure(self, model: ir.Model) -> tuple[Comparison, list[dict]]:
        """``model``'s outputs on the feeds and how they compare with the reference's."""
        outputs = self.run(model)
        return self._compared(model, outputs), outputs

    def _compared(self, model: ir.Model, outputs: list[dict]) -> Comparison:
        comparison = compare_runs(self.reference, outputs)
        self.cosines[id(model)] = comparison.min_cosine
        self.flips[id(model)] = {
            o.name: o.top1_agreement
            for o in comparison.outputs
            if o.distribution and o.top1_agreement is not None and o.top1_agreement < 1
        }
        return comparison
