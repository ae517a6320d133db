"""Calibration sharded over Ray workers, merged into what one process would have computed.

Each shard is one Ray task (retried if its worker dies): it opens the model once and plans
its runs on the data's first two samples, as one process does at its start (which
tensors, which sessions, how many samples one run stacks), so every shard decides alike.
From that plan each computes the same cut of the samples into contiguous shards whose
edges fall on whole stacks, and observes its own: its runs group samples exactly as one
process's would, which matters because a stacked run's values differ from single ones by a
few ulps and a histogram tells them apart (14 of PP-OCR det's 331 histograms). A shard
reads its samples itself from the data path (the driver reads none of them) and hands
back its observers; the driver merges them in shard order. Observers merge exactly
(min/max, and histograms on one power-of-two grid), so the ranges and histograms are the
ones a single process gets, bit for bit, for data of one input shape. (With mixed shapes a
process starts a new stack at each change of shape, which shards cannot see coming: the
statistics then differ by those few ulps, never by a sample.)

Tasks, not actors: Ray reuses its warm worker processes for tasks (the engine and
onnxruntime already imported), where each actor starts a process of its own, 2-3 s here.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Any

import onnx_ir as ir

from onnxsqueeze.calib.cache import Calibration
from onnxsqueeze.calib.collector import CollectOptions, Collector
from onnxsqueeze.core import progress
from onnxsqueeze.distributed.retries import RETRIES, failed, maybe_die, whereabouts
from onnxsqueeze.distributed.shipping import ShippedModel, Shipper, absolute, landed, shippable
from onnxsqueeze.run.feeds import count_samples, iter_feeds, load_feeds, part, reusable
from onnxsqueeze.run.signature import input_specs

logger = logging.getLogger(__name__)


#: The fewest samples a shard takes: a shard's plan costs a few runs of the model, and a
#: merge of every histogram (MiniLM's 96 samples took 3.0 s in two shards, 1.6 s in one).
MIN_SHARD = 64


def shards(samples: int, stack: int, count: int, index: int) -> tuple[int, int]:
    """Shard ``index`` of ``count`` contiguous (start, stop) ranges covering ``samples``,
    cut on multiples of ``stack`` and as even as whole stacks allow (possibly empty)."""
    stacks = -(-samples // stack)

    def cut(k: int) -> int:
        return min(samples, (stacks * k // count) * stack)

    return cut(index), cut(index + 1)


def sharded(
    pool: Any, model: ir.Model, source: Any, options: CollectOptions, samples: int | None
) -> Calibration | None:
    """The Calibration of ``model`` on the first ``samples`` of ``source``, in shards over
    ``pool``'s workers; None when splitting would not pay (fewer than two shards of
    MIN_SHARD samples, a pool of one) or the model cannot be shipped: the caller then
    calibrates here, with the same result."""
    source = absolute(reusable(source))
    total = count_samples(source)
    if samples is not None:
        total = min(total, samples)
    count = min(pool.size, total // MIN_SHARD)
    if count < 2 or not shippable(model):
        return None
    ray = pool.ray
    options = dataclasses.replace(options, threads=pool.threads)
    task = _task(ray)
    shipped = ray.put(Shipper(ray, pool.local, pool.count)(model))
    started = time.perf_counter()
    pending = {
        task.options(num_cpus=pool.threads, scheduling_strategy=pool.placed(i)).remote(
            shipped, options, source, total, i, count
        ): i
        for i in range(count)
    }
    done: dict[int, Calibration] = {}
    shard_sizes: dict[int, int] = {}
    stack = plan_s = 0.0
    try:
        finished = 0
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            index = pending.pop(ready[0])
            done[index], shard_sizes[index], stack, plan, where = ray.get(ready[0])
            plan_s = max(plan_s, plan)
            pool.seen(where)
            finished += shard_sizes[index]
            progress.step("calibrating", finished, total)
    except Exception as exc:
        raise failed("calibration", exc) from exc
    collected = time.perf_counter()
    parts = [done[i] for i in sorted(done) if shard_sizes[i]]
    merged = parts[0]
    for other in parts[1:]:
        merged.merge(other)
    pool.count("calibration_shards", len(parts))
    pool.record["calibration"] = {
        "samples": total,
        "shards": [shard_sizes[i] for i in sorted(shard_sizes)],
        "samples_per_run": int(stack),
        "slowest_plan_s": round(plan_s, 2),
        "shards_s": round(collected - started, 2),
        "merge_s": round(time.perf_counter() - collected, 3),
    }
    logger.info("calibration: %d samples in %d shards on Ray", total, len(parts))
    return merged


@functools.cache
def _task(ray: Any) -> Any:
    @ray.remote(max_retries=RETRIES)
    def calibrate_shard(
        shipped: ShippedModel,
        options: CollectOptions,
        source: Any,
        total: int,
        index: int,
        count: int,
    ) -> tuple[Calibration | None, int, int, float, tuple[int, str]]:
        """Shard ``index`` of ``count``: plan on the data's first two samples (as every
        shard does, so all decide alike), cut the shards on that plan's stacks, observe
        this one. Returns (calibration, samples, samples per run, plan seconds, whereabouts)."""
        maybe_die()
        started = time.perf_counter()
        collector = Collector(landed(shipped, ray), options)
        specs = input_specs(collector.model)
        stack = collector.plan(load_feeds(part(source, 0, min(2, total)), specs))
        planned = time.perf_counter() - started
        start, stop = shards(total, stack, count, index)
        if stop <= start:
            return None, 0, stack, planned, whereabouts()
        result = collector.collect(iter_feeds(part(source, start, stop), specs))
        return result, stop - start, stack, planned, whereabouts()

    return calibrate_shard
