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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from onnxsqueeze.core.scratch import scratch_dir
from onnxsqueeze.run.probes import random_feeds
from onnxsqueeze.run.session import Session, make_session, resolve_providers, session_options
from onnxsqueeze.run.signature import input_specs

#: Pause before a round of runs of another session than the last one timed: long enough for
#: onnxruntime's spinning workers to go to sleep (after 50 ms the first run was still 15 %
#: slow; after 200 ms, 4 %).
SETTLE_S = 0.15


def settle(session: Any, feed: Mapping[str, Any], run: Any = None) -> None:
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


def median_ms(session: Any, feed: Mapping[str, Any], runs: int) -> float:
    """Median of ``runs`` timed runs, after ``settle``."""
    settle(session, feed)
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
    if feed is None:
        feed = random_feeds(input_specs(baseline), count=1, seed=0)[0]
    sessions = [Session(m, providers, optimize=True) for m in (baseline, candidate)]
    slowest = 0.0  # of the warm runs (the third of each session)
    for session in sessions:
        for _ in range(3):
            start = time.perf_counter()
            session.run(feed)
        slowest = max(slowest, time.perf_counter() - start)
    slowest = max(slowest, 1e-6)
    runs = max(runs, min(MAX_RUNS, int(FAST_ROUND_S / slowest)))
    runs = max(MIN_RUNS, min(runs, int(ROUND_BUDGET_S / slowest)))
    base, cand = [], []
    for _ in range(rounds):
        base.append(median_ms(sessions[0], feed, runs))
        cand.append(median_ms(sessions[1], feed, runs))
    return statistics.median(base) / statistics.median(cand)


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
    counts: Counter = Counter()
    graphs = [proto.graph]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            counts[(node.domain, node.op_type)] += 1
            graphs += [a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH]
            graphs += [g for a in node.attribute for g in a.graphs]
    return counts
