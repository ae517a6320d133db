"""How far a rate measured on few samples can be trusted: the Wilson score interval.

An agreement of 32/32 held-out answers does not show 99 % agreement: at 95 % confidence it
only shows 89 %. The Wilson interval stays inside [0, 1] and is sensible at 0 and n
disagreements, where the normal approximation collapses to a point.
"""

from __future__ import annotations

import math

#: Two-sided 95 % normal quantile.
Z95 = 1.959964


def wilson_interval(rate: float, count: int, z: float = Z95) -> tuple[float, float]:
    """(low, high) bounds of a proportion ``rate`` observed on ``count`` trials."""
    if count <= 0:
        return 0.0, 1.0
    z2 = z * z
    centre = (rate + z2 / (2 * count)) / (1 + z2 / count)
    spread = z * math.sqrt(rate * (1 - rate) / count + z2 / (4 * count * count)) / (1 + z2 / count)
    return max(0.0, centre - spread), min(1.0, centre + spread)


def answers_to_show(limit: float, z: float = Z95) -> int | None:
    """The fewest answers whose perfect agreement puts the interval's low bound at ``limit``
    or above: fewer cannot show the limit however good the model is (None: no count can)."""
    if limit >= 1:
        return None
    return math.ceil(z * z * limit / (1 - limit))
