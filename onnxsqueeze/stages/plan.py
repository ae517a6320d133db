"""A run's timing decisions as a replayable plan.

Everything a squeeze decides follows from the model, the data and the budget, except what it
decides by timing: which quantize mode is fastest, whether a result is slower than float,
whether a draft is worth a full search. Those measurements move from run to run on a noisy
machine (MiniLM's default once shipped 0.254x of the file, once 0.34x). Every timing goes
through the latency gate, which records it here under a key made of the stage and its order
in that stage ("quantize static #1"); ``--plan FILE`` writes them, and ``--replay FILE`` makes
the gate return them instead of measuring (like TensorRT's timing cache), so the same data
gives the same bytes. A replayed run that reaches a timing the plan does not hold measures it
and says so. A decision taken on a ratio within timing noise of the not-slower line is marked
``near_line``: the one most likely to go the other way in a rerun.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections import Counter
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from onnxsqueeze.core import progress
from onnxsqueeze.core.errors import PipelineConfigError

#: A timing this close (relative) to the not-slower line could fall on either side in a rerun.
NOISE = 0.05


@dataclasses.dataclass
class Timing:
    key: str
    ratio: float
    basis: str | None = None  # how it was known without timing it (same kernels)
    replayed: bool = False
    near_line: bool = False

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Plan:
    """The timings of one run, and those a replay hands back."""

    def __init__(self, replay: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        self.timings: list[Timing] = []
        self.missing: list[str] = []  # keys a replay had to measure
        self._replay = dict(replay or {})
        self._seen: Counter = Counter()

    def next_key(self) -> str:
        label = progress.current_stage() or "squeeze"
        self._seen[label] += 1
        return f"{label} #{self._seen[label]}"

    def replayed(self, key: str) -> Timing | None:
        entry = self._replay.get(key)
        if entry is None:
            if self._replay:
                self.missing.append(key)
            return None
        return Timing(key, float(entry["ratio"]), entry.get("basis"), replayed=True)

    def add(self, timing: Timing, line: float) -> None:
        timing.near_line = timing.basis is None and abs(timing.ratio / line - 1) < NOISE
        self.timings.append(timing)

    def as_list(self) -> list[dict[str, Any]]:
        return [t.as_dict() for t in self.timings]


_PLAN: ContextVar[Plan | None] = ContextVar("onnxsqueeze_plan", default=None)


@contextlib.contextmanager
def recording(plan: Plan) -> Iterator[Plan]:
    token = _PLAN.set(plan)
    try:
        yield plan
    finally:
        _PLAN.reset(token)


def current() -> Plan | None:
    return _PLAN.get()


def load_replay(source: Any) -> dict[str, dict[str, Any]] | None:
    """A plan to replay: a path to a plan or report JSON, or its already-read mapping."""
    if source is None:
        return None
    label = "replay="
    if isinstance(source, (str, Path)):
        label = str(source)
        try:
            text = Path(source).read_bytes()
        except OSError as exc:
            raise PipelineConfigError(f"{label}: cannot read the plan ({exc.strerror})") from None
        try:
            source = json.loads(text)
        except ValueError:
            raise PipelineConfigError(f"{label}: not a plan (not JSON)") from None
    timings = source.get("timings") if isinstance(source, Mapping) else None
    if not isinstance(timings, list) or not all(
        isinstance(t, Mapping) and isinstance(t.get("key"), str) and _number(t.get("ratio"))
        for t in timings
    ):
        raise PipelineConfigError(
            f"{label}: not a plan (expected a 'timings' list of key/ratio entries, as --plan "
            "writes)"
        )
    return {t["key"]: dict(t) for t in timings}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def differences(
    previous: Mapping[str, Mapping[str, Any]],
    timings: list[dict[str, Any]],
    *,
    line: float,
    tie: float,
) -> list[str]:
    """The timing decisions of this run that an earlier plan took otherwise: a timing only
    one of them made (the runs went different ways), one on the other side of the not-slower
    ``line``, or one that moved by more than the ``tie`` margin between alternatives."""
    now = {t["key"]: t for t in timings}
    said = []
    for key in dict.fromkeys([*previous, *now]):
        if key not in now or key not in previous:
            where = "only in the earlier plan" if key not in now else "only in this run"
            said.append(f"{key}: {where}")
            continue
        before, after = float(previous[key]["ratio"]), float(now[key]["ratio"])
        crossed = (before < line) != (after < line)
        moved = min(before, after) / max(before, after) < tie
        if crossed or moved:
            said.append(f"{key}: {before:.2f}x there, {after:.2f}x here")
    return said
