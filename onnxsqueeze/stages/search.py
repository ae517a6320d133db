"""The search every lossy family shares: the fewest nodes to leave untouched for the budget.

A family (quantization now; factorization and pruning next) proposes candidate nodes and
can build the model with every candidate changed except a given few (``Family``). The
search ranks the candidates by the damage each does alone (``rank``: exact, one model per
node; local, the error each adds to its own output in two runs; or local then exact for
the worst), then bisects that ranking for the fewest most damaging nodes to keep so that
the whole model meets the budget as onnxruntime runs it (``fewest_kept``). Keeping more
nodes untouched does not, in practice, make the error larger, which is what lets a
bisection stand in for trying every subset.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import onnx_ir as ir

from onnxsqueeze.core import progress
from onnxsqueeze.run import workers
from onnxsqueeze.stages.judge import Judge
from onnxsqueeze.stages.sensitivity import exact_scores, local_scores

#: When the change is already too slow to be worth it (the latency gate's draft timing),
#: exact sensitivity (one model per node) only up to this many nodes; local scores beyond.
QUICK_EXACT = 8


logger = logging.getLogger(__name__)


class Family(Protocol):
    """What a lossy family gives the search."""

    #: The model before the family's change.
    model: ir.Model

    @property
    def candidates(self) -> Mapping[str, ir.Node]:
        """The nodes the family may change, by name."""
        ...

    def build(self, kept: Sequence[str]) -> ir.Model:
        """A new model with every candidate changed except ``kept`` (and those the family
        cannot change)."""
        ...


@dataclasses.dataclass(frozen=True)
class SensitivityOptions:
    """How candidates are ranked: ``exact`` (one model per candidate), ``local`` (two runs),
    ``local+exact`` (local ranking, then exact scores for its ``max_exact`` worst), ``auto``
    (exact up to ``max_exact`` nodes, else local+exact), on the first ``samples`` feeds."""

    method: str = "auto"
    max_exact: int = 96
    samples: int = 4


@dataclasses.dataclass
class Ranking:
    #: Damage of each candidate (output noise-to-signal ratio, or local relative error).
    scores: dict[str, float]
    #: The order to keep candidates untouched in: most damaging first.
    order: list[str]
    #: The method that ranked them (auto resolved).
    method: str


def rank(
    family: Family,
    names: Sequence[str],
    changed: ir.Model,
    judge: Judge,
    options: SensitivityOptions,
    *,
    quick: bool = False,
) -> Ranking:
    """Rank ``names`` (candidates ``changed`` changes) by the damage each does alone.
    ``quick``: the change is too slow to matter already, so spend two runs, not one model
    per node, beyond QUICK_EXACT candidates."""
    names = list(names)
    feeds = judge.feeds[: options.samples]
    method = options.method
    if method == "auto":
        exact_up_to = QUICK_EXACT if quick else options.max_exact
        method = "exact" if len(names) <= exact_up_to else "local+exact"
        if quick and method != "exact":
            method = "local"
    reference = judge.reference[: len(feeds)]

    def exact(subset: list[str]) -> dict[str, float]:
        outside = [n for n in names if n not in subset]

        def only(kept: Sequence[str]) -> ir.Model:
            return family.build([*kept, *outside])

        runs = lambda models: judge.run_many(models, feeds, optimize=False)  # noqa: E731
        return exact_scores(subset, only, runs, reference)

    if method == "exact":
        scores = exact(names)
        return Ranking(scores, sorted(names, key=lambda n: -scores[n]), method)
    nodes = {n: family.candidates[n] for n in names}
    local = local_scores(family.model, changed, nodes, feeds, judge.providers)
    by_local = sorted(names, key=lambda n: -local[n])
    if method == "local":
        return Ranking(local, by_local, method)
    # the local ranking picks the suspects, exact scores order them; the rest follow
    suspects = exact(by_local[: options.max_exact])
    order = sorted(suspects, key=lambda n: -suspects[n]) + by_local[options.max_exact :]
    return Ranking({**local, **suspects}, order, method)


@dataclasses.dataclass
class Kept:
    #: How many leading nodes of the order stay untouched.
    count: int
    #: The model that meets the budget with them untouched; None when none does.
    model: ir.Model | None
    #: What the judge measured on ``model`` (or on the last model tried, when None).
    summary: str
    #: Models built and judged.
    tries: int


def fewest_kept(
    order: Sequence[str],
    build: Callable[[Sequence[str]], ir.Model],
    judge: Callable[[ir.Model], tuple[bool, str]],
    *,
    none_kept_fails: bool = True,
) -> Kept:
    """Fewest leading nodes of ``order`` to keep untouched so the budget holds, by
    bisection; at least the last node stays changed, or there is nothing to ship.

    ``none_kept_fails``: the fully changed model was judged already and missed the budget
    (the stage's first measurement), so the search first checks that keeping all but the
    last node is enough, then bisects between the two. Otherwise nothing is known of the
    fully changed model and the bisection starts in the middle of the whole range.

    With a pool of workers (and a Judge), each step also judges the steps that may come
    next (``_Trials``): the same decisions from the same measurements, in fewer rounds."""
    trials = _Trials(order, build, judge)
    last = len(order) - 1
    if not none_kept_fails:
        found: int | None = None
        lo, hi, summary = 0, len(order), ""
        while lo < hi:
            mid = (lo + hi) // 2
            ahead = _ahead(lo, hi, lambda lo, mid, hi: ((lo, mid), (mid + 1, hi)), trials.width)
            _, ok, summary = trials.judged(mid, ahead)
            progress.step("budget search", trials.tries, _bisections(len(order)))
            if ok:
                found, hi = mid, mid
                trials.forget_above(hi)
            else:
                lo = mid + 1
        if found is None:
            return Kept(len(order), None, summary, trials.tries)
        model, _, summary = trials.judged(found)
        return Kept(found, model, summary, trials.tries)
    _, ok, summary = trials.judged(last)
    if not ok:
        return Kept(len(order), None, summary, trials.tries)
    lo, hi = 0, last  # lo fails, hi passes
    while hi - lo > 1:
        mid = (lo + hi) // 2
        ahead = _ahead(lo, hi, lambda lo, mid, hi: ((lo, mid), (mid, hi)), trials.width, 1)
        _, ok, summary = trials.judged(mid, ahead)
        progress.step("budget search", trials.tries, _bisections(len(order)) + 1)
        if ok:
            hi = mid
            trials.forget_above(hi)
        else:
            lo = mid
    model, _, summary = trials.judged(hi)
    logger.info(
        "budget search: %d of %d nodes kept unchanged (%d tries): %s",
        hi,
        len(order),
        trials.tries,
        summary,
    )
    return Kept(hi, model, summary, trials.tries)


class _Trials:
    """The judged prefixes of a bisection: count kept -> (model, met, summary).

    Alone, one model at a time. With a pool of workers and a Judge that can take several
    models at once (``verdicts``), a step's model is judged together with the models of the
    steps that may follow it (up to the pool's size), so the next step often finds its
    verdict waiting. Every verdict is the one the step would have measured itself, so the
    search decides exactly as it does alone; ``tries`` counts the steps the search took,
    as alone, and the pool's record counts the look-ahead models. Only models that may
    still be the answer are held (passing, at most the search's passing bound): a large
    model's candidates are not kept step after step."""

    def __init__(self, order: Sequence[str], build: Callable, judge: Callable) -> None:
        self.order, self.build, self.judge = order, build, judge
        pool = workers.current()
        many = getattr(judge, "verdicts", None)
        self.width = pool.size if pool is not None and many is not None else 1
        self.pool = pool
        self.seen: dict[int, tuple[ir.Model | None, bool, str]] = {}
        self.stepped: set[int] = set()  # the steps the search took (tries)

    @property
    def tries(self) -> int:
        return len(self.stepped)

    def judged(self, count: int, ahead: Sequence[int] = ()) -> tuple[ir.Model | None, bool, str]:
        """The verdict on keeping ``count`` nodes, judging ``ahead`` alongside if new."""
        self.stepped.add(count)
        if count in self.seen:
            return self.seen[count]
        wanted = [count, *[k for k in ahead if k not in self.seen and k != count]]
        wanted = wanted[: self.width]
        models = [self.build(self.order[:k]) for k in wanted]
        if len(models) == 1:
            verdicts = [self.judge(models[0])]
        else:
            verdicts = self.judge.verdicts(models)
            self.pool.count("look_ahead_models", len(models) - 1)
        for k, model, (ok, summary) in zip(wanted, models, verdicts, strict=True):
            self.seen[k] = (model if ok else None, ok, summary)
        return self.seen[count]

    def forget_above(self, bound: int) -> None:
        """The search's answer is at most ``bound`` now: models above it can go."""
        for k, (model, ok, summary) in self.seen.items():
            if k > bound and model is not None:
                self.seen[k] = (None, ok, summary)


def _ahead(lo: int, hi: int, split: Callable, width: int, gap: int = 0) -> list[int]:
    """The steps a bisection may take after probing the middle of (lo, hi), nearest first,
    as many as fill ``width`` models: the decision tree below this step, level by level.
    ``split(lo, mid, hi)`` gives the two ranges the step leaves (met, missed); a range is
    still searched while hi - lo > gap."""
    found: list[int] = []
    level = [(lo, hi)]
    while level and len(found) < width:
        below = []
        for a, b in level:
            for c, d in split(a, (a + b) // 2, b):
                if d - c > gap:
                    found.append((c + d) // 2)
                    below.append((c, d))
        level = below
    return found[: max(0, width - 1)]


def _bisections(count: int) -> int:
    """Judgements a bisection over ``count`` nodes takes at most."""
    return max(1, count.bit_length())
