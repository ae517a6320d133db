"""The library entry point converters call: ``squeeze(model, ...)`` on an in-memory model.

It hands back the kind of object it was given (ModelProto in, ModelProto out; onnx_ir.Model
in, onnx_ir.Model out) with a Report, never touches the caller's object, and never writes a
file unless ``squeeze_file`` is asked to.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from onnxsqueeze.errors import AccuracyBudgetError
from onnxsqueeze.report import Report

DEFAULT_PROBE_SAMPLES = 2
MAX_DATA_PROBES = 8


class Squeezed(NamedTuple):
    """What ``squeeze`` returns: the model (same kind as given) and the run's report."""

    model: Any
    report: Report


def squeeze(
    model: Any,
    passes: Sequence[Any] | None = None,
    *,
    preset: str = "default",
    data: Any = None,
    shapes: Mapping[str, Sequence[int]] | Iterable[str] | None = None,
    providers: Sequence[str] | None = None,
    verify: bool = True,
    registry: Any = None,
    probe_samples: int = DEFAULT_PROBE_SAMPLES,
    seed: int = 0,
    strict: bool = True,
    quantize: Any = None,
) -> Squeezed:
    """Run passes (names, ``(name, options)`` pairs or pass objects; default: ``preset``).

    ``data`` (npz path, folder, or iterable of feed dicts) drives verification; without it
    seeded random feeds shaped by the signature and ``shapes`` are used. With ``strict``, a
    final model whose outputs drift beyond the lossless tolerance raises AccuracyBudgetError.

    ``quantize`` (a mode name such as ``"static"``/``"auto"``, or a ``QuantizeConfig``; see
    ``onnxsqueeze.quantize``) quantizes the simplified model within its accuracy budget,
    calibrating on ``data``; the report's ``quantization`` says what was chosen and why.
    """
    from onnxsqueeze.io import convert_back, load_model

    loaded = load_model(model)
    working = dataclasses.replace(loaded, model=loaded.model.clone())
    result, report = _run(
        working,
        passes,
        preset,
        data,
        shapes,
        providers,
        verify,
        registry,
        probe_samples,
        seed,
        quantize,
    )
    report.source = loaded.label
    if strict and report.verification_status == "failed":
        raise AccuracyBudgetError(
            f"{loaded.label}: squeezed model differs from the original ({report.verification['summary']})"
        )
    return Squeezed(convert_back(result, loaded.kind), report)


def squeeze_file(
    source: str | os.PathLike,
    output: str | os.PathLike,
    passes: Sequence[Any] | None = None,
    *,
    external_data: bool | None = None,
    overwrite_input: bool = False,
    **kwargs: Any,
) -> Report:
    """Load ``source``, squeeze it and save atomically to ``output``; return the report."""
    from onnxsqueeze.io import external_data_files, load_model, release_weights, save_model

    loaded = load_model(source)
    report_source = loaded.label
    strict = kwargs.pop("strict", True)
    model, report = _run(loaded, passes, **_run_kwargs(kwargs))
    report.source = report_source
    if strict and report.verification_status == "failed":
        raise AccuracyBudgetError(
            f"{report_source}: squeezed model differs from the original ({report.verification['summary']})"
        )
    protected = set() if overwrite_input else loaded.protected_paths()
    saved = save_model(model, output, external_data=external_data, protected=protected)
    report.output = str(saved)
    report.file_bytes_before = _file_bytes(Path(source), external_data_files(loaded.model))
    report.file_bytes_after = _file_bytes(saved, {saved.with_name(saved.name + ".data")})
    release_weights(model)
    release_weights(loaded.model)
    return report


def _run_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    defaults = {
        "preset": "default",
        "data": None,
        "shapes": None,
        "providers": None,
        "verify": True,
        "registry": None,
        "probe_samples": DEFAULT_PROBE_SAMPLES,
        "seed": 0,
        "quantize": None,
    }
    unknown = set(kwargs) - set(defaults)
    if unknown:
        raise TypeError(f"unexpected argument(s): {', '.join(sorted(unknown))}")
    return {**defaults, **kwargs}


def _run(
    loaded, passes, preset, data, shapes, providers, verify, registry, probe_samples, seed, quantize
):
    """The pipeline, then the quantize stage, on ``loaded.model`` (a LoadedModel)."""
    from onnxsqueeze.passes import builtin_registry
    from onnxsqueeze.pipeline import Pipeline, VerifyOptions

    model = loaded.model
    registry = registry or builtin_registry()
    pass_objects = registry.build(passes if passes is not None else [preset])
    feeds = probe_feeds(model, data, shapes, probe_samples, seed) if verify else None
    probe_shapes: list[Any] = [shapes]

    def retries():  # the shapes the original accepts also size the quantize stage's probes
        if data is None:
            for label, resolved in _retry_shapes(model, shapes):
                probe_shapes[0] = resolved
                yield label, probe_feeds(model, None, resolved, probe_samples, seed)

    pipeline = Pipeline(
        pass_objects,
        verify=VerifyOptions(enabled=verify, providers=tuple(providers or ("cpu",))),
        feeds=feeds,
        retry_feeds=retries(),
    )
    report = Report(warnings=[loaded.note] if loaded.note else [])
    model, report = pipeline.run(model, report, original=loaded.original)
    if quantize is not None and not verify:
        from onnxsqueeze.errors import PipelineConfigError
        from onnxsqueeze.quantize import QuantizeConfig

        mode = quantize.mode if isinstance(quantize, QuantizeConfig) else str(quantize)
        if mode not in ("auto", "none"):
            raise PipelineConfigError(
                f"quantization ({mode}) measures the result on data; it cannot run without "
                "verification (drop --no-verify)"
            )
        if mode == "auto":
            report.warnings.append("quantization skipped: verification is disabled")
        return model, report
    if quantize is not None:
        from onnxsqueeze.quantize_stage import run_quantize_stage

        model = run_quantize_stage(model, report, quantize, data, probe_shapes[0], providers, seed)
    return model, report


def probe_feeds(model, data, shapes, count: int, seed: int) -> list[dict]:
    """User data (up to MAX_DATA_PROBES samples) or seeded random feeds from the signature."""
    from onnxsqueeze.data import load_feeds
    from onnxsqueeze.runtime import input_specs, random_feeds

    specs = input_specs(model)
    if data is not None:
        return load_feeds(data, specs, limit=max(count, MAX_DATA_PROBES))
    fixed, dims = _shape_overrides(shapes)
    return random_feeds(specs, count=count, seed=seed, shapes=fixed, dims=dims)


def _shape_overrides(shapes) -> tuple[dict, dict]:
    from onnxsqueeze.runtime import parse_shape_overrides

    if isinstance(shapes, Mapping):
        return {k: tuple(v) for k, v in shapes.items()}, {}
    return parse_shape_overrides(shapes or [])


def _retry_shapes(model, shapes) -> Iterable[tuple[str, dict[str, tuple[int, ...]]]]:
    """Input shapes to try when the original rejects the default probes: the guessed dims
    (dynamic, not the batch, not given) larger, then sizes the graph's shape constants
    name, on every input, then on the first input only (the others' guessed dims 1: a
    recurrent state whose axis 1 is the batch)."""
    from onnxsqueeze.errors import CalibrationDataError
    from onnxsqueeze.runtime import (
        DEFAULT_DYNAMIC_DIM,
        PROBE_DIM_RETRIES,
        concrete_shape,
        input_specs,
        sizes_in_graph,
    )

    fixed, dims = _shape_overrides(shapes)
    specs = input_specs(model)
    try:
        if all(
            concrete_shape(s, fixed, dims, 1) == concrete_shape(s, fixed, dims, 2) for s in specs
        ):
            return
        tried = (1, DEFAULT_DYNAMIC_DIM, *PROBE_DIM_RETRIES)
        for size in (*PROBE_DIM_RETRIES, *sizes_in_graph(model, skip=tried)):
            yield (
                f"probe inputs whose unsized dims are {size}",
                {s.name: concrete_shape(s, fixed, dims, size) for s in specs},
            )
            if len(specs) > 1:
                first = {s.name: concrete_shape(s, fixed, dims, 1) for s in specs[1:]}
                first[specs[0].name] = concrete_shape(specs[0], fixed, dims, size)
                yield (
                    f"probe inputs whose unsized dims are {size} on '{specs[0].name}', 1 elsewhere",
                    first,
                )
    except CalibrationDataError:
        return


def _file_bytes(path: Path, data_files: set[Path]) -> int:
    """Size on disk of a model file plus its external data files."""
    return path.stat().st_size + sum(f.stat().st_size for f in data_files if f.is_file())


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
) -> Any:
    """Calibration statistics of ``model``'s float activations on ``data``.

    Samples stream one at a time (memory does not grow with their number). With ``cache``,
    an existing cache file that covers the model is loaded instead of running inference, and
    a new one is written after collecting; one histogram serves every histogram method, so
    re-quantizing with percentile after entropy needs no new inference. ``bins`` defaults
    to the observers' DEFAULT_BINS (fine enough to match onnxruntime's percentile bins).
    """
    from onnxsqueeze.calib.cache import Calibration
    from onnxsqueeze.calib.choice import collected_with
    from onnxsqueeze.calib.collector import CollectOptions, Collector
    from onnxsqueeze.calib.observers import DEFAULT_BINS, HISTOGRAM_METHODS, METHODS
    from onnxsqueeze.calib.tensors import feed_names, select_tensors
    from onnxsqueeze.data import iter_feeds
    from onnxsqueeze.errors import CalibrationError, PipelineConfigError
    from onnxsqueeze.io import load_model
    from onnxsqueeze.runtime import input_specs

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
        raise CalibrationError(f"{loaded.label}: calibration needs data (--data)")
    feeds = iter_feeds(data, input_specs(loaded.model), limit=samples)
    result = Collector(loaded.model, options).collect(feeds, total=samples, progress=progress)
    if cache is not None:
        result.save(cache)
    return result
