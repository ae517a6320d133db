"""Rank allocation: how many parameters each layer keeps so the whole model keeps a given
share at the least predicted error.

Each layer has a curve: whole (all K N parameters, no error), or factorized at rank r
(r (K + N) parameters, error e(r), known from its spectrum). Lowering a rank by one saves
K + N parameters and costs s_r^2, and singular values fall, so each curve is convex except
at its first step (whole -> the largest rank that pays), which saves a lump. The allocator
takes each curve's lower convex hull and spends parameters greedily, cheapest error per
parameter saved first, across all layers: optimal for convex curves, and the hull makes
the lump a fair step. A uniform rule (the same energy in every layer) is the baseline it
must beat: layers differ by orders of magnitude in how much their truncation hurts.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Callable, Sequence

from onnxsqueeze.lowrank.svd import pays


@dataclasses.dataclass(frozen=True)
class LayerCurve:
    """One factorizable layer: its shape, the error at each rank, and its weight in the sum
    of errors (1: every layer's relative output error counts alike)."""

    name: str
    k: int
    n: int
    error: Callable[[int], float]
    max_rank: int
    weight: float = 1.0

    @property
    def whole(self) -> int:
        return self.k * self.n

    def points(self, min_saving: float) -> list[tuple[int, int, float]]:
        """(rank, parameters saved, weighted error), whole first (rank 0 stands for it)."""
        top = min(self.max_rank, self.k * self.n // (self.k + self.n))
        while top >= 1 and not pays(self.k, self.n, top, min_saving):
            top -= 1
        points = [(0, 0, 0.0)]
        for rank in range(top, 0, -1):
            saved = self.whole - rank * (self.k + self.n)
            points.append((rank, saved, self.weight * self.error(rank)))
        return points


def allocate(
    layers: Sequence[LayerCurve], keep: float, *, min_saving: float = 0.1
) -> dict[str, int]:
    """Rank per layer (absent: stays whole) so the layers keep at most ``keep`` (0..1) of
    their parameters, at the least total weighted error the curves predict; if even every
    layer at rank 1 keeps more, every layer at rank 1."""
    need = (1.0 - keep) * sum(layer.whole for layer in layers)
    curves = [layer.points(min_saving) for layer in layers]  # parameters saved ascending
    hulls = [_hull(curve) for curve in curves]
    heap: list[tuple[float, int, int]] = []  # (error per parameter saved, layer, segment)
    for index in range(len(layers)):
        _push(heap, hulls, index, 0)
    saved, layer_saved, chosen = 0, [0] * len(layers), {}
    while heap and saved < need:
        _, index, segment = heapq.heappop(heap)
        low, high = hulls[index][segment][1], hulls[index][segment + 1][1]
        # the ranks inside the hull segment one at a time: the target is not overshot by a
        # whole segment
        for rank, gain, _ in curves[index]:
            if low < gain <= high:
                saved += gain - layer_saved[index]
                layer_saved[index] = gain
                chosen[layers[index].name] = rank
                if saved >= need:
                    break
        _push(heap, hulls, index, segment + 1)
    return _polish(layers, curves, chosen, saved - need + 1e-9 * max(need, 1.0))


def _polish(
    layers: Sequence[LayerCurve],
    curves: list[list[tuple[int, int, float]]],
    chosen: dict[str, int],
    spare: float,
) -> dict[str, int]:
    """The greedy walk is optimal on convex curves, but the first step of each (whole ->
    the largest rank that pays) is a lump, and the walk may stop past the target. Local
    moves mend both: a step back up paid from what was saved beyond the target, or one
    layer a step down to pay for another's step up, whichever removes the most error,
    until none does."""
    at = [0] * len(layers)  # index into each curve: 0 = whole
    for index, layer in enumerate(layers):
        if layer.name in chosen:
            at[index] = next(i for i, p in enumerate(curves[index]) if p[0] == chosen[layer.name])
    while True:
        ups = [(i, curves[i][at[i]], curves[i][at[i] - 1]) for i in range(len(layers)) if at[i]]
        downs = [
            (i, curves[i][at[i]], curves[i][at[i] + 1])
            for i in range(len(layers))
            if at[i] + 1 < len(curves[i])
        ]
        best = (0.0, None)
        for i, here, up in ups:
            cost, gain = here[1] - up[1], here[2] - up[2]
            if cost <= spare and gain > best[0]:
                best = (gain, ((i, -1),), cost)
            for j, there, down in downs:
                if j == i:
                    continue
                cost2 = cost - (down[1] - there[1])
                gain2 = gain - (down[2] - there[2])
                if cost2 <= spare and gain2 > best[0] + 1e-15:
                    best = (gain2, ((i, -1), (j, 1)), cost2)
        if best[1] is None:
            break
        for index, step in best[1]:
            at[index] += step
        spare -= best[2]
    return {
        layer.name: curves[index][at[index]][0] for index, layer in enumerate(layers) if at[index]
    }


def _push(heap: list, hulls: list, index: int, segment: int) -> None:
    hull = hulls[index]
    if segment + 1 < len(hull):
        (_, s0, e0), (_, s1, e1) = hull[segment], hull[segment + 1]
        heapq.heappush(heap, ((e1 - e0) / max(s1 - s0, 1), index, segment))


def _hull(points: list[tuple[int, int, float]]) -> list[tuple[int, int, float]]:
    """Lower convex hull of (saved, error) points, ordered by parameters saved."""
    hull: list[tuple[int, int, float]] = []
    for point in sorted(points, key=lambda p: p[1]):
        while len(hull) >= 2:
            (_, x0, y0), (_, x1, y1) = hull[-2], hull[-1]
            _, x2, y2 = point
            # drop the middle point when it lies above the segment from hull[-2] to point
            if (y1 - y0) * (x2 - x0) >= (y2 - y0) * (x1 - x0):
                hull.pop()
            else:
                break
        hull.append(point)
    return hull


def uniform_energy(
    layers: Sequence[tuple[str, int, int, Callable[[float], int]]],
    energy: float,
    *,
    min_saving: float = 0.1,
) -> dict[str, int]:
    """The baseline: every layer at the smallest rank that keeps ``energy`` of its spectrum,
    where that rank pays. ``layers``: (name, K, N, rank_for_energy)."""
    ranks = {}
    for name, k, n, rank_for in layers:
        rank = rank_for(energy)
        if pays(k, n, rank, min_saving):
            ranks[name] = rank
    return ranks
