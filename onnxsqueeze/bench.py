"""Latency of models on an execution provider: medians of interleaved runs, as ratios.

Machines are noisy, so two models are timed in alternating rounds in one window and compared
by the ratio of their medians; absolute times are only reported next to that ratio.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any

import onnx_ir as ir


def median_ms(session: Any, feed: Mapping[str, Any], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(feed)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def compare_latency(
    baseline: ir.Model,
    candidate: ir.Model,
    providers: Sequence[str],
    feed: Mapping[str, Any] | None = None,
    *,
    rounds: int = 5,
    runs: int = 10,
) -> float:
    """Speed of ``candidate`` relative to ``baseline`` (>1: faster), onnxruntime's default
    optimizations on, after warm-up; rounds alternate so drift hits both alike."""
    from onnxsqueeze.runtime import Session, input_specs, random_feeds

    if feed is None:
        feed = random_feeds(input_specs(baseline), count=1, seed=0)[0]
    sessions = [Session(m, providers, optimize=True) for m in (baseline, candidate)]
    for session in sessions:
        for _ in range(3):
            session.run(feed)
    base, cand = [], []
    for _ in range(rounds):
        base.append(median_ms(sessions[0], feed, runs))
        cand.append(median_ms(sessions[1], feed, runs))
    return statistics.median(base) / statistics.median(cand)
