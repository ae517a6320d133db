"""Per-group pruning ratios from measured sensitivity: the most multiply-adds saved for an
error allowance.

Each channel group has a few options (a ratio, the output error measured with only that
group pruned at it, the multiply-adds it saves). Errors of different groups are taken to add
up (noise-to-signal ratios of independent changes do, roughly), so the allocation is a
knapsack over the groups; it is solved greedily on each group's upper convex hull (saving
against error): the step with the most saving per unit of error first, while the allowance
lasts. The prune stage bisects the allowance against the real budget.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence

#: An option: (ratio, error alone, multiply-adds saved).
Option = tuple[float, float, float]


def hull(options: Sequence[Option]) -> list[Option]:
    """The options worth taking, in order: more saving than every cheaper one, on the upper
    convex hull from (0, 0, 0) (a step that saves less per unit of error than the next is
    never taken on its own)."""
    points = [(0.0, 0.0, 0.0)]
    for option in sorted(options, key=lambda o: (o[1], -o[2])):
        if option[2] <= points[-1][2]:
            continue
        while len(points) >= 2 and _slope(points[-2], points[-1]) <= _slope(points[-1], option):
            points.pop()
        points.append(option)
    return points[1:]


def _slope(a: Option, b: Option) -> float:
    rise, run = b[2] - a[2], b[1] - a[1]
    return rise / run if run > 1e-15 else float("inf")


def allocate(options: Mapping[str, Sequence[Option]], allowance: float) -> dict[str, float]:
    """Group -> ratio (groups not named stay whole): the greedy most-saving allocation whose
    summed errors stay within ``allowance``."""
    hulls = {name: hull(opts) for name, opts in options.items()}
    chosen: dict[str, int] = {}
    spent = 0.0
    heap: list[tuple[float, str]] = []
    for name, points in hulls.items():
        if points:
            heapq.heappush(heap, (-_slope((0.0, 0.0, 0.0), points[0]), name))
    while heap:
        _, name = heapq.heappop(heap)
        points = hulls[name]
        step = chosen.get(name, -1) + 1
        before = points[step - 1] if step > 0 else (0.0, 0.0, 0.0)
        cost = max(points[step][1] - before[1], 0.0)
        if spent + cost > allowance:
            continue  # this group's next step does not fit; cheaper steps of others may
        spent += cost
        chosen[name] = step
        if step + 1 < len(points):
            heapq.heappush(heap, (-_slope(points[step], points[step + 1]), name))
    return {name: hulls[name][step][0] for name, step in chosen.items()}
