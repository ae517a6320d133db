"""``calibrate``: activation statistics of a model on data, or a cache that covers them.

The library call behind ``onnxsqueeze.calibrate`` and ``--calib-cache``; the static
quantization stage calls it too, so calibration lives here, not in the API above it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from onnxsqueeze.calib.cache import Calibration
from onnxsqueeze.calib.choice import collected_with
from onnxsqueeze.calib.collector import CollectOptions, Collector
from onnxsqueeze.calib.observers import DEFAULT_BINS, HISTOGRAM_METHODS, METHODS
from onnxsqueeze.calib.tensors import feed_names, select_tensors
from onnxsqueeze.core.errors import CalibrationError, PipelineConfigError
from onnxsqueeze.core.io import load_model
from onnxsqueeze.core.progress import reporting
from onnxsqueeze.run import workers
from onnxsqueeze.run.feeds import iter_feeds
from onnxsqueeze.run.signature import input_specs


def calibrate(
    model: Any,
    data: Any,
    *,
    method: str = "entropy",
    samples: int | None = None,
    cache: str | os.PathLike | None = None,
    bins: int | None = None,
    op_types: Sequence[str] | None = None,
    providers: Sequence[str] | None = None,
    progress: Any = None,
) -> Calibration:
    """Calibration statistics of ``model``'s float activations on ``data``.

    Samples stream one at a time (memory does not grow with their number). With ``cache``,
    an existing cache file that covers the model is loaded instead of running inference, and
    a new one is written after collecting; one histogram serves every histogram method, so
    re-quantizing with percentile after entropy needs no new inference. ``bins`` defaults
    to the observers' DEFAULT_BINS (fine enough to match onnxruntime's percentile bins).
    Inside a pool of workers (``run.workers.using``), the samples are read and observed in
    shards there and merged: the same statistics.
    """
    method = collected_with(method)  # auto: histograms, which answer every method
    if method not in METHODS:
        raise PipelineConfigError(
            f"unknown calibration method '{method}' (known: {', '.join(METHODS)})"
        )
    loaded = load_model(model)
    options = CollectOptions(
        method=method,
        bins=bins or DEFAULT_BINS,
        op_types=tuple(op_types) if op_types else None,
        providers=tuple(providers or ("cpu",)),
    )
    if cache is not None and Path(cache).is_file():
        stored = Calibration.load(cache)
        missing = [t for t in select_tensors(loaded.model, options.op_types)[0] if t not in stored]
        if stored.inputs != feed_names(loaded.model) or missing:
            raise CalibrationError(
                f"{cache}: calibration cache does not match {loaded.label} "
                f"({len(missing)} tensors missing); delete it or give another path"
            )
        if method in HISTOGRAM_METHODS and any(
            o.kind != "histogram" for o in stored.observers.values()
        ):
            raise CalibrationError(
                f"{cache}: cache holds min/max statistics only; '{method}' needs histograms"
            )
        return stored
    if data is None:
        raise CalibrationError(f"{loaded.label}: calibration needs data (data=)")
    result, pool = None, workers.current()
    if pool is not None:
        steps = (lambda label, done, total: progress(done, total)) if progress else None
        with reporting(steps) if steps else contextlib.nullcontext():
            result = pool.calibrate(loaded.model, data, options, samples)
    if result is None:
        feeds = iter_feeds(data, input_specs(loaded.model), limit=samples)
        result = Collector(loaded.model, options).collect(feeds, total=samples, progress=progress)
    if cache is not None:
        result.save(cache)
    return result
