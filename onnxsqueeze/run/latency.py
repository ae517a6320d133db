"""Latency of models on an execution provider: medians of interleaved runs, as ratios.

Machines are noisy, so two models are timed in alternating rounds in one window and compared
by the ratio of their medians; absolute times are only reported next to that ratio.

Each round starts after a pause (``settle``): onnxruntime's idle worker threads keep spinning
for tens of milliseconds after a run (``allow_spinning``, its default), so a session timed
right after another one shares the cores with the other's spinners. Measured on PP-OCR det
(2 cores): the first three runs after a switch took 1.2-1.8x as long, which pulled the ratio
of rounds of 5 runs from 0.72 (each model timed alone) to 0.80-0.83.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from onnxsqueeze.core import progress
from onnxsqueeze.core.io import initializer_bytes
from onnxsqueeze.core.scratch import scratch_dir
from onnxsqueeze.core.spill import spill_if_active
from onnxsqueeze.run.memory import give_back, give_back_after
from onnxsqueeze.run.probes import random_feeds
from onnxsqueeze.run.session import Session, make_session, resolve_providers, session_options
from onnxsqueeze.run.signature import input_specs

#: Pause before a round of runs of another session than the last one timed: long enough for
#: onnxruntime's spinning workers to go to sleep (after 50 ms the first run was still 15 %
#: slow; after 200 ms, 4 %).
SETTLE_S = 0.15


def settle(session: Any, feed: Any, run: Any = None) -> None:
    """Let the previous session's worker threads stop spinning, then run ``session`` once
    untimed (its own workers awake, as in steady serving). ``run``: how to run it."""
    time.sleep(SETTLE_S)
    (run or session.run)(feed)


#: Timed runs per round are cut to about this many seconds (at least MIN_RUNS): a slow model
#: (magika on a 16 x 2 KiB batch, 0.22 s a run) took 27 s per comparison at 10 runs a round,
#: four comparisons per auto run; its per-run noise is small against its run time.
ROUND_BUDGET_S = 0.5
MIN_RUNS = 3
#: Fast models get more runs per round, about this many seconds' worth (at most MAX_RUNS):
#: at 10 runs a round, silero-vad (0.1 ms a run) measured anywhere from 0.86x to 1.18x in ten
#: comparisons of the same pair, and auto once shipped a 0.9x model as 1.14x; at 200 runs,
#: 0.92x to 0.98x.
FAST_ROUND_S = 0.02
MAX_RUNS = 200


def runs_per_round(slowest_s: float, runs: int, round_s: float | None = None) -> int:
    """Timed runs in a round for a model whose warm run takes ``slowest_s``: more for fast
    models (``round_s`` of runs, FAST_ROUND_S by default, at most MAX_RUNS), fewer for slow
    ones (ROUND_BUDGET_S, at least MIN_RUNS)."""
    slowest_s = max(slowest_s, 1e-6)
    fast = FAST_ROUND_S if round_s is None else round_s
    runs = max(runs, min(MAX_RUNS, int(fast / slowest_s)))
    return max(MIN_RUNS, min(runs, int(ROUND_BUDGET_S / slowest_s)))


def warm_up(run: Callable[[Any], Any], feed: Any, times: int = 3) -> float:
    """Run ``times`` times untimed for the caller (first-run allocations, lazy kernels);
    returns the seconds the last one took."""
    elapsed = 0.0
    for _ in range(times):
        start = time.perf_counter()
        run(feed)
        elapsed = time.perf_counter() - start
    return elapsed


def timed_runs(run: Callable[[Any], Any], feed: Any, runs: int) -> list[float]:
    """Milliseconds of ``runs`` runs, after ``settle``."""
    settle(None, feed, run)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run(feed)
        times.append((time.perf_counter() - start) * 1000)
    return times


def interleaved_rounds(
    runners: Sequence[Callable[[Any], Any]],
    feeds: Sequence[Any],
    *,
    rounds: int,
    runs: int,
    round_s: float | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[list[list[float]]]:
    """Times each runner on its feed in ``rounds`` alternating rounds (drift hits all of
    them alike) of the same number of runs, sized by the slowest warm runner. Returns, per
    runner, per round, the run times in milliseconds."""
    slowest = max(warm_up(run, feed) for run, feed in zip(runners, feeds, strict=True))
    count = runs_per_round(slowest, runs, round_s)
    times: list[list[list[float]]] = [[] for _ in runners]
    for round_index in range(rounds):
        for index, (run, feed) in enumerate(zip(runners, feeds, strict=True)):
            times[index].append(timed_runs(run, feed, count))
        if progress is not None:
            progress(round_index + 1, rounds)
    return times


def median_ms(session: Any, feed: Mapping[str, Any], runs: int) -> float:
    """Median of ``runs`` timed runs, after ``settle``."""
    return statistics.median(timed_runs(session.run, feed, runs))


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
    if feed is None:
        feed = random_feeds(input_specs(baseline), count=1, seed=0)[0]
    if initializer_bytes(baseline) + initializer_bytes(candidate) > INTERLEAVE_LIMIT:
        return _one_at_a_time(baseline, candidate, providers, feed, rounds, runs)
    sessions = [Session(m, providers, optimize=True) for m in (baseline, candidate)]
    base, cand = interleaved_rounds(
        [s.run for s in sessions],
        [feed, feed],
        rounds=rounds,
        runs=runs,
        progress=lambda done, total: progress.step("timing", done, total),
    )
    return statistics.median(map(statistics.median, base)) / statistics.median(
        map(statistics.median, cand)
    )


#: Above this many weight bytes in the two models together, they are timed one session at a
#: time (see _one_at_a_time): interleaving a 4 GB transformer with its int8 candidate held
#: both sessions, 1.79x the memory of the original's session alone.
INTERLEAVE_LIMIT = 1 << 30


def _one_at_a_time(
    baseline: ir.Model,
    candidate: ir.Model,
    providers: Sequence[str],
    feed: Mapping[str, Any],
    rounds: int,
    runs: int,
) -> float:
    """The baseline, the candidate, then the baseline again, each session released before the
    next is made: one model's memory at a time, and a drift that is linear over the three
    windows cancels (the baseline's figure is the mean of its two). The candidate's new
    weights wait in the run's spill file meanwhile: held in memory beside the original's
    session they took the default mode of a 1.3 GB model from 1.5 to 1.8 GiB."""

    def median_of(model: ir.Model) -> float:
        session = Session(model, providers, optimize=True)
        (times,) = interleaved_rounds([session.run], [feed], rounds=rounds, runs=runs)
        del session
        give_back()
        return statistics.median(t for r in times for t in r)

    spill_if_active(candidate)
    give_back()  # what only a cycle held (replaced tensors) goes before the first session
    before = median_of(baseline)
    measured = median_of(candidate)
    after = median_of(baseline)
    return (before + after) / 2 / measured


def loaded_op_types(model: ir.Model, providers: Sequence[str]) -> Counter:
    """Op types of the graph onnxruntime keeps after its load-time rewrites at the basic
    level (constant folding among them), main graph and subgraphs alike.

    Two models with the same counts run the same kernels on the same shapes: a weight-only
    model stored to fold at load (onnxsqueeze.quant.unpack) against its float original is compared
    this way, without timing noise."""
    import onnxruntime as ort

    with scratch_dir("loaded") as tmp:
        path = Path(tmp) / "loaded.onnx"
        options = session_options(True, None)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(path)
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", "loaded.data"
        )
        make_session(model, options, resolve_providers(providers)[0])
        proto = onnx.load(str(path), load_external_data=False)
    give_back_after(initializer_bytes(model))
    counts: Counter = Counter()
    graphs = [proto.graph]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            counts[(node.domain, node.op_type)] += 1
            graphs += [a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH]
            graphs += [g for a in node.attribute for g in a.graphs]
    return counts
