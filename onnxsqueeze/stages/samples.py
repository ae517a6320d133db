"""The user's samples split between fitting a lossy change and judging it."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from onnxsqueeze.run.feeds import iter_feeds, load_feeds
from onnxsqueeze.run.probes import probe_feeds
from onnxsqueeze.run.signature import input_specs

#: With fewer samples than this, the same samples fit the change and judge the budget.
MIN_SPLIT = 16
#: The inputs a judge holds: at most this many bytes (its count is the stage's own limit).
JUDGED_BYTES = 128 << 20
#: Generated probes a judge runs at most: more samples resolve agreement limits on real
#: data, random inputs carry no answers worth resolving.
GENERATED = 32


def split_samples(model: ir.Model, data: Any, judged: int, fitted: int) -> tuple[list, list]:
    """(up to ``judged`` samples that judge the budget, up to ``fitted`` the change is fit
    to): every fourth sample judges, the others give the Gram matrices, so the budget is
    checked on samples the fit did not see (MiniLM, judged on the samples its factors were
    whitened by, shipped a model whose held-out cosine was 0.994 under a 0.997 budget).
    Below MIN_SPLIT samples both use all."""
    samples = load_feeds(data, input_specs(model), limit=judged + fitted)
    if len(samples) < MIN_SPLIT:
        return samples, samples
    judge = samples[::4][:judged]
    fit = [s for i, s in enumerate(samples) if i % 4][:fitted]
    return judge, fit


def stage_samples(
    model: ir.Model, data: Any, shapes: Any, seed: int, judged: int, fitted: int
) -> tuple[list, list | None]:
    """(samples that judge a stage, samples its change is fit to, None without data):
    generated probes when the user gave no data, else ``split_samples``."""
    if data is None:
        return probe_feeds(model, None, shapes, max(judged, 2), seed), None
    return split_samples(model, data, judged, fitted)


def judged_feeds(
    model: ir.Model, data: Any, shapes: Any, count: int, seed: int, max_bytes: int = JUDGED_BYTES
) -> list[dict]:
    """The samples a judge runs every candidate on: the first ``count`` of ``data`` whose
    inputs fit in ``max_bytes`` (at least one), read one at a time; without data, up to
    GENERATED generated probes (as many as before the limit was raised for real data). More samples resolve an agreement limit (96 magika files
    catch a 1 % flip rate that 32 pass), the byte cap keeps large inputs (PP-OCR det's
    pages, 4.9 MB each) from filling memory."""
    if data is None:
        count = min(count, GENERATED)
        return probe_feeds(model, None, shapes, max(count, 2), seed)[:count]
    feeds, size = [], 0
    for feed in iter_feeds(data, input_specs(model), limit=count):
        size += sum(np.asarray(v).nbytes for v in feed.values())
        if feeds and size > max_bytes:
            break
        feeds.append(feed)
    return feeds
