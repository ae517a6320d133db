"""The budget bisection with a pool of workers judges the steps that may come next beside
the current one; it must take the same decisions, and report the same tries, as alone."""

from __future__ import annotations

import pytest

from onnxsqueeze.run.workers import using
from onnxsqueeze.stages.search import fewest_kept


class FakePool:
    def __init__(self, size: int) -> None:
        self.size = size
        self.record: dict[str, int] = {}

    def count(self, key: str, amount: int = 1) -> None:
        self.record[key] = self.record.get(key, 0) + amount


class ThresholdJudge:
    """Passes when at least ``needed`` nodes are kept (the build hands over the count);
    ``verdicts`` is what a Judge does with a pool; every judged count is logged."""

    def __init__(self, needed: int) -> None:
        self.needed = needed
        self.judged: list[int] = []

    def __call__(self, kept: int) -> tuple[bool, str]:
        self.judged.append(kept)
        return kept >= self.needed, f"kept {kept}"

    def verdicts(self, models: list[int]) -> list[tuple[bool, str]]:
        return [self(m) for m in models]


def build(prefix) -> int:
    return len(prefix)


@pytest.mark.parametrize("size", [2, 3, 4])
@pytest.mark.parametrize("none_kept_fails", [True, False])
def test_look_ahead_takes_the_decisions_of_the_plain_bisection(size, none_kept_fails):
    for nodes in (1, 2, 5, 17, 42):
        order = [f"n{i}" for i in range(nodes)]
        for needed in range(nodes + 2):
            alone_judge = ThresholdJudge(needed)
            alone = fewest_kept(order, build, alone_judge, none_kept_fails=none_kept_fails)
            pool, judge = FakePool(size), ThresholdJudge(needed)
            with using(pool):
                spread = fewest_kept(order, build, judge, none_kept_fails=none_kept_fails)
            assert (spread.count, spread.model, spread.summary, spread.tries) == (
                alone.count,
                alone.model,
                alone.summary,
                alone.tries,
            ), (nodes, needed)
            # every step alone was judged with the pool too, plus the look-ahead
            assert set(alone_judge.judged) <= set(judge.judged)
            assert len(judge.judged) == len(set(judge.judged))  # nothing judged twice
            assert len(judge.judged) - len(alone_judge.judged) <= pool.record.get(
                "look_ahead_models", 0
            )


def test_look_ahead_saves_rounds_on_a_long_order():
    order = [f"n{i}" for i in range(64)]
    rounds = []
    judge = ThresholdJudge(23)
    real = judge.verdicts

    def counted(models):
        rounds.append(len(models))
        return real(models)

    judge.verdicts = counted
    with using(FakePool(3)):
        kept = fewest_kept(order, build, judge)
    alone = fewest_kept(order, build, ThresholdJudge(23))
    assert kept.count == alone.count == 23
    assert len(rounds) + (len(judge.judged) - sum(rounds)) < alone.tries
