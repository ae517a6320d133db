"""The library entry point converters call: ``squeeze(model, ...)`` on an in-memory model.

It hands back the kind of object it was given (ModelProto in, ModelProto out; onnx_ir.Model
in, onnx_ir.Model out) with a Report, never touches the caller's object, and never writes a
file unless ``squeeze_file`` is asked to.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from onnxsqueeze.calib.cache import Calibration
from onnxsqueeze.calib.calibrate import calibrate as calibrate_here
from onnxsqueeze.core.errors import AccuracyBudgetError, PipelineConfigError
from onnxsqueeze.core.io import (
    convert_back,
    external_data_files,
    load_model,
    release_weights,
    save_model,
)
from onnxsqueeze.core.scratch import remove_stale, scratch_dir
from onnxsqueeze.core.spill import Spill, spilling
from onnxsqueeze.pipeline.presets import builtin_registry
from onnxsqueeze.pipeline.report import Report
from onnxsqueeze.pipeline.verified import Pipeline, VerifyOptions
from onnxsqueeze.run.probes import DEFAULT_PROBE_SAMPLES, probe_feeds, retry_shapes
from onnxsqueeze.run.workers import check_size, using
from onnxsqueeze.stages.factorize import factorize_config
from onnxsqueeze.stages.held_out import HOLDOUT, run_checked_stages
from onnxsqueeze.stages.plan import NOISE, Plan, load_replay, recording
from onnxsqueeze.stages.prune import prune_config
from onnxsqueeze.stages.quantize import QuantizeConfig
from onnxsqueeze.stages.quantize.unverified import quantize_unverified

__all__ = ["Squeezed", "calibrate", "squeeze", "squeeze_file"]


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
    factorize: Any = None,
    prune: Any = None,
    replay: Any = None,
    eval_data: Any = None,
    holdout: float = HOLDOUT,
    workers: int | None = None,
    ray_address: str | None = None,
    base_dir: str | os.PathLike | None = None,
) -> Squeezed:
    """Run passes (names, ``(name, options)`` pairs or pass objects; default: ``preset``).

    ``data`` (npz path, folder, or iterable of feed dicts) drives verification; without it
    seeded random feeds shaped by the signature and ``shapes`` are used. With ``strict``, a
    final model whose outputs drift beyond the lossless tolerance raises AccuracyBudgetError.

    ``quantize`` (a mode name such as ``"static"``/``"auto"``, or a ``QuantizeConfig``; see
    ``onnxsqueeze.stages.quantize``) quantizes the simplified model within its accuracy budget,
    calibrating on ``data``; the report's ``quantization`` says what was chosen and why.

    ``factorize`` (``"auto"``, a share of parameters to keep such as ``0.5``, or a
    ``FactorizeConfig``; see ``onnxsqueeze.stages.factorize``) replaces MatMul/Gemm weights
    by low-rank factors first, whitened by ``data`` when given; ``report.factorization``
    lists every layer.

    ``prune`` (``"auto"``, ``"channels=0.5"``, ``"sparsity=0.5"``, ``"2:4"`` or a
    ``PruneConfig``; see ``onnxsqueeze.stages.prune``) removes channels (or zeroes weights)
    after factorization, the consumers refitted on ``data``; ``report.pruning`` lists every
    channel group or layer.

    ``replay`` (a plan or report JSON path, or its mapping): the timing decisions of an
    earlier run (``report.timings``), used instead of timing again, so the same data gives the
    same bytes (see ``onnxsqueeze.stages.plan``).

    ``holdout``: the share of ``data`` (seeded by ``seed``) the lossy stages never see, on
    which their result must meet the budget too (0: none); ``eval_data`` (same forms as
    ``data``): a separate held-out set instead. ``report.held_out`` has both sides' figures
    (see ``onnxsqueeze.stages.held_out``).

    ``workers``: spread calibration (in shards) and the budget search's candidate models
    over a local Ray cluster of that many CPUs started for the run; ``ray_address``: over
    the Ray cluster there instead (the ``[ray]`` extra; see ``onnxsqueeze.distributed``).
    The result is the same as in one process; ``report.workers`` says what ran where.

    ``base_dir``: the folder an in-memory model's external data files are in (without it
    such a model is refused: its locations would be read from the current directory);
    locations outside that folder are always refused.
    """

    if not isinstance(strict, bool):
        raise PipelineConfigError(f"strict= must be True or False, got {strict!r}")
    if base_dir is not None and not isinstance(base_dir, (str, os.PathLike)):
        raise PipelineConfigError(f"base_dir= must be a folder path, got {base_dir!r}")
    loaded = load_model(model, base_dir=None if base_dir is None else str(base_dir))
    working = dataclasses.replace(loaded, model=loaded.model.clone())
    options = dict(
        preset=preset, data=data, shapes=shapes, providers=providers, verify=verify,
        registry=registry, probe_samples=probe_samples, seed=seed, quantize=quantize,
        factorize=factorize, prune=prune, replay=replay, eval_data=eval_data, holdout=holdout,
        workers=workers, ray_address=ray_address,
    )  # fmt: skip
    result, report = _run(working, passes, **options)
    report.source = loaded.label
    if strict and report.verification_status == "failed":
        raise AccuracyBudgetError(
            f"{loaded.label}: squeezed model differs from the original ({report.verification['summary']})"
        )
    return Squeezed(convert_back(result, loaded.kind), report)


def calibrate(
    model: Any,
    data: Any,
    *,
    workers: int | None = None,
    ray_address: str | None = None,
    **options: Any,
) -> Calibration:
    """Activation statistics of ``model`` on ``data``: ``onnxsqueeze.calib.calibrate``'s
    options (method, samples, cache, bins, op_types, providers, progress), its samples read
    and observed in shards on a Ray pool with ``workers`` / ``ray_address`` (as in
    ``squeeze``): the same statistics, bit for bit, for data of one input shape."""
    with _pool(workers, ray_address, True) as pool, using(pool):
        return calibrate_here(model, data, **options)


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

    loaded = load_model(source)
    report_source = loaded.label
    strict = kwargs.pop("strict", True)
    with scratch_dir("spill") as folder:
        spill = Spill(folder)
        try:
            with spilling(spill):
                model, report = _run(loaded, passes, **_run_kwargs(kwargs), spill=spill)
            report.source = report_source
            if strict and report.verification_status == "failed":
                raise AccuracyBudgetError(
                    f"{report_source}: squeezed model differs from the original "
                    f"({report.verification['summary']})"
                )
            protected = set() if overwrite_input else loaded.protected_paths()
            saved = save_model(
                model, output, external_data=external_data, protected=protected,
                value_info=loaded.value_info,
            )  # fmt: skip
        finally:
            spill.close()
    report.output = str(saved)
    report.file_bytes_before = _file_bytes(Path(source), external_data_files(loaded.model))
    report.file_bytes_after = _file_bytes(saved, {saved.with_name(saved.name + ".data")})
    release_weights(model)
    release_weights(loaded.model)
    return report


def _run_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``squeeze_file``'s keyword arguments with ``squeeze``'s defaults for the others."""
    parameters = inspect.signature(squeeze).parameters.values()
    defaults = {p.name: p.default for p in parameters if p.kind is p.KEYWORD_ONLY}
    defaults.pop("strict")
    defaults.pop("base_dir")
    unknown = set(kwargs) - set(defaults)
    if unknown:
        raise TypeError(f"unexpected argument(s): {', '.join(sorted(unknown))}")
    return {**defaults, **kwargs}


def _run(loaded, passes, *, workers, ray_address, **options):
    """The pipeline, then the lossy stages, on ``loaded.model`` (a LoadedModel), on a pool
    of workers when asked (``options``: ``_run_here``'s)."""
    lossy = options["verify"] and any(
        x is not None and str(getattr(x, "mode", x)) != "none"
        for x in (options["quantize"], options["factorize"], options["prune"])
    )
    with _pool(workers, ray_address, lossy) as pool, using(pool):
        model, report = _run_here(loaded, passes, **options)
        if pool is not None:
            report.workers = dict(pool.record)
    if (workers is not None or ray_address is not None) and pool is None:
        report.warnings.append(
            "workers: nothing to spread (only the lossy stages' calibration and candidate "
            "models run on workers); ran in this process"
        )
    return model, report


@contextlib.contextmanager
def _pool(workers: Any, ray_address: Any, lossy: bool) -> Iterator[Any]:
    """The run's Ray pool when asked for and there is lossy work for it, else None."""
    if ray_address is not None and not isinstance(ray_address, str):
        raise PipelineConfigError(f"ray_address= must be an address string, got {ray_address!r}")
    check_size(workers)
    if (workers is None and ray_address is None) or not lossy:
        yield None
        return
    from onnxsqueeze.distributed import pool

    with pool(workers, ray_address) as running:
        yield running


def _run_here(
    loaded,
    passes,
    *,
    preset,
    data,
    shapes,
    providers,
    verify,
    registry,
    probe_samples,
    seed,
    quantize,
    factorize,
    prune,
    replay,
    eval_data,
    holdout,
    spill=None,
):
    """``_run`` in this process (the lossy stages may still hand work to the pool);
    ``spill`` (a core.spill.Spill) takes an unverified quantization's new weights out of
    memory."""

    model = loaded.model
    remove_stale()  # scratch copies of runs that were killed
    passes, providers = _checked(passes, preset, providers, verify, probe_samples, seed)
    _check_holdout(holdout)
    plan = Plan(load_replay(replay))
    registry = registry or builtin_registry()
    pass_objects = registry.build(passes if passes is not None else [preset])
    feeds = probe_feeds(model, data, shapes, probe_samples, seed) if verify else None
    probe_shapes: list[Any] = [shapes]

    def retries():  # the shapes the original accepts also size the quantize stage's probes
        if data is None:
            for label, resolved in retry_shapes(model, shapes):
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
    for stage, config in (("factorization", factorize_config(factorize)),
                          ("pruning", prune_config(prune))):  # fmt: skip
        if config is not None and not verify:
            raise PipelineConfigError(
                f"{stage} measures the result on data; it cannot run without verification "
                "(drop verify=False)"
            )
    if quantize is not None and not verify:
        mode = quantize.mode if isinstance(quantize, QuantizeConfig) else str(quantize)
        if mode == "auto":
            report.warnings.append("quantization skipped: verification is disabled")
        elif mode != "none":
            model = quantize_unverified(model, quantize, report, spill)
        return model, report
    with recording(plan):
        model = run_checked_stages(
            model, report, quantize=quantize, factorize=factorize, prune=prune, data=data,
            eval_data=eval_data, holdout=holdout, shapes=probe_shapes[0], providers=providers,
            seed=seed,
        )  # fmt: skip
    _say_timings(plan, report)
    return model, report


def _say_timings(plan: Plan, report: Report) -> None:
    """The run's timing decisions into the report (the plan ``--plan`` writes), and the ones
    a rerun could take the other way."""
    report.timings = plan.as_list()
    if plan.missing:
        report.warnings.append(
            f"replay: {len(plan.missing)} timing(s) the plan does not hold were measured "
            f"({', '.join(plan.missing[:3])}): the run took another path than the plan's"
        )
    near = [t.key for t in plan.timings if t.near_line and not t.replayed]
    if near:
        report.warnings.append(
            f"timing decision(s) within {NOISE:.0%} of the not-slower line ({', '.join(near)}): "
            "a rerun may decide otherwise; replay=/--replay with this run's plan pins them"
        )


#: The most generated probe samples a run takes (each is run through every model checked).
MAX_PROBE_SAMPLES = 1024


def _checked(passes, preset, providers, verify, probe_samples, seed) -> tuple[Any, Any]:
    """The arguments' kinds, checked where a mistake would otherwise surface deep inside (an
    AttributeError) or be read another way (``passes="cleanup"`` as the passes c, l, e...);
    returns passes and providers with a comma-separated string read as its names."""
    if isinstance(passes, str):
        passes = [name.strip() for name in passes.split(",") if name.strip()]
        if not passes:
            raise PipelineConfigError("passes= names no pass")
    elif passes is not None:
        if not isinstance(passes, Sequence):
            raise PipelineConfigError(f"passes= must be a list of pass names, got {passes!r}")
        for spec in passes:
            if isinstance(spec, tuple) and not (
                len(spec) == 2 and isinstance(spec[0], str) and isinstance(spec[1], Mapping)
            ):
                raise PipelineConfigError(f"passes=: {spec!r} is not a (name, options dict) pair")
    if not isinstance(preset, str):
        raise PipelineConfigError(f"preset= must be a preset name, got {preset!r}")
    if isinstance(providers, str):
        providers = [p.strip() for p in providers.split(",") if p.strip()]
    if providers is not None and (
        not isinstance(providers, Sequence)
        or not providers
        or not all(isinstance(p, str) for p in providers)
    ):
        raise PipelineConfigError(
            f"providers= must name execution providers, e.g. ['cpu'], got {providers!r}"
        )
    if not isinstance(verify, bool):
        raise PipelineConfigError(f"verify= must be True or False, got {verify!r}")
    for name, value, low, high in (
        ("probe_samples", probe_samples, 1, MAX_PROBE_SAMPLES),
        ("seed", seed, 0, 2**63 - 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise PipelineConfigError(
                f"{name}= must be a whole number from {low} to {high}, got {value!r}"
            )
    return passes, providers


def _check_holdout(holdout: Any) -> None:
    """A share of the data: 0 (none held out) up to below 1 (something left to search on)."""
    if isinstance(holdout, bool) or not isinstance(holdout, (int, float)) or not 0 <= holdout < 1:
        raise PipelineConfigError(
            f"holdout= must be a share of the data in [0, 1), got {holdout!r}"
        )


def _file_bytes(path: Path, data_files: set[Path]) -> int:
    """Size on disk of a model file plus its external data files."""
    return path.stat().st_size + sum(f.stat().st_size for f in data_files if f.is_file())
