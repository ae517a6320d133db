"""``onnxsqueeze bench``: models side by side on execution providers, as a serving stack runs them.

Each model is loaded from its file (external data as deployed) into an onnxruntime session at
its default optimizations; per provider and batch size, the sessions are timed in interleaved
rounds (run.latency: one window, settled threads), so machine drift hits every model alike
and the ratios to the first model hold where absolute times wander. A provider that is not
installed, or that onnxruntime silently replaces by the CPU, is reported as such, not crashed on.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from onnxsqueeze.core.errors import CalibrationDataError, first_line
from onnxsqueeze.run.latency import interleaved_rounds
from onnxsqueeze.run.probes import check_overrides, random_feeds, shape_overrides
from onnxsqueeze.run.session import provider_name, short_name
from onnxsqueeze.run.session_cost import bench_session, prime, session_cost
from onnxsqueeze.run.signature import InputSpec, input_specs

#: Default number of interleaved rounds: the spread between their medians is reported, and
#: on this 2-core machine ten rounds kept MiniLM's p50 ratio within 3 % between two runs.
DEFAULT_ROUNDS = 10
#: Runs a round at least; fast models get about ROUND_S of runs (run.latency.runs_per_round).
#: At 10 runs a round (the latency gate's default) MiniLM's rounds spread by 45 % on this
#: 2-core machine; a quarter second of runs a round is what a stable median needs here.
DEFAULT_RUNS = 10
ROUND_S = 0.25


#: The columns a bench table shows after model, provider and batch (terminal and HTML alike).
FIGURES = (
    "p50 ms",
    "p90 ms",
    "p99 ms",
    "spread",
    "speed",
    "samples/s",
    "load ms",
    "RAM MiB",
    "GPU MiB",
    "file MiB",
)


@dataclasses.dataclass
class BenchResult:
    """One model on one provider at one batch size."""

    model: str
    provider: str
    batch: int | None
    status: str  # "ok", "unavailable" (provider not there), "failed" (load or run)
    reason: str | None = None
    size_bytes: int = 0
    create_ms: float | None = None
    memory_bytes: int | None = None  # host peak RSS the session added (load + warm-up)
    gpu_memory_bytes: int | None = None  # device memory the session added, where readable
    nodes_by_provider: dict[str, int] | None = None
    runs: int = 0
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    round_p50_ms: list[float] = dataclasses.field(default_factory=list)
    spread: float | None = None  # (slowest - fastest round median) / p50
    throughput: float | None = None  # samples a second at p50
    speedup: float | None = None  # the first model's p50 / this one's (> 1: faster)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class BenchReport:
    results: list[BenchResult]
    rounds: int
    threads: int | None
    machine: str
    warnings: list[str] = dataclasses.field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "rounds": self.rounds,
            "threads": self.threads,
            "machine": self.machine,
            "results": [r.as_dict() for r in self.results],
            "warnings": list(self.warnings),
        }


def bench(
    models: Sequence[str | os.PathLike],
    *,
    providers: Sequence[str] = ("cpu",),
    batches: Sequence[int | None] = (None,),
    shapes: Any = None,
    data: Any = None,
    threads: int | None = None,
    rounds: int = DEFAULT_ROUNDS,
    runs: int = DEFAULT_RUNS,
    measure_cost: bool = True,
    progress: Callable[[str, int, int], None] | None = None,
) -> BenchReport:
    """Time ``models`` on each provider and batch size (None: the batch the feeds have)."""
    from onnxsqueeze.run.cpu import describe

    names = [provider_name(p) for p in providers]
    paths = [Path(m) for m in models]
    opened = [_open(p) for p in paths]
    specs = [spec for spec, _ in opened]
    feeds = [_feeds(s, data, shapes, batches) for s in specs]
    results: list[BenchResult] = []
    warnings: list[str] = []
    for name in names:
        missing = _unavailable(name)
        for batch in batches:
            rows = [
                BenchResult(str(p), name, batch, "ok", size_bytes=size)
                for p, (_, size) in zip(paths, opened, strict=True)
            ]
            if missing:
                for row in rows:
                    row.status, row.reason = "unavailable", missing
            else:
                label = f"{short_name(name)} batch {batch or 'as given'}"
                _time_provider(
                    rows,
                    [f[batch] for f in feeds],
                    name,
                    threads,
                    rounds,
                    runs,
                    (lambda done, total, label=label: progress(label, done, total))
                    if progress
                    else None,
                    measure_cost,
                )
            _ratios(rows)
            results.extend(rows)
    for row in results:
        if row.status == "ok" and row.nodes_by_provider:
            elsewhere = {k: v for k, v in row.nodes_by_provider.items() if k != row.provider}
            # onnxruntime keeps shape arithmetic on the CPU on purpose: say so only when a
            # real share of the graph left the provider
            if sum(elsewhere.values()) > 0.1 * sum(row.nodes_by_provider.values()):
                moved = ", ".join(f"{v} on {short_name(k)}" for k, v in elsewhere.items())
                warnings.append(
                    f"{row.model} on {short_name(row.provider)}: {moved} (nodes onnxruntime "
                    f"could not place on {short_name(row.provider)}; data crosses between them)"
                )
    return BenchReport(results, rounds, threads, describe(), warnings)


def _open(path: Path) -> tuple[list[InputSpec], int]:
    """The model's signature and its bytes on disk with its external data (what a
    deployment ships), through the engine's loader: one-line errors for broken files,
    external data only from inside the model's folder; weights stay unread."""
    from onnxsqueeze.core.io import external_data_files, load_model

    model = load_model(path, validate=False).model
    size = path.stat().st_size + sum(f.stat().st_size for f in external_data_files(model))
    return input_specs(model), size


def _feeds(
    specs: list[InputSpec], data: Any, shapes: Any, batches: Sequence[int | None]
) -> dict[int | None, dict[str, np.ndarray]]:
    """One feed per batch size: the user's first samples stacked on axis 0 to the batch,
    or seeded random inputs whose batch axis (the first, when dynamic) is the batch."""
    fixed, dims = shape_overrides(shapes)
    check_overrides(specs, fixed, dims)
    samples = None
    if data is not None:
        from onnxsqueeze.run.feeds import load_feeds

        samples = load_feeds(data, specs, limit=max(b or 1 for b in batches))
    out: dict[int | None, dict[str, np.ndarray]] = {}
    for batch in batches:
        if samples is not None:
            out[batch] = _stacked(samples, specs, batch)
            continue
        sized = dict(fixed)
        if batch is not None:
            for spec in specs:
                if spec.name not in sized:
                    sized[spec.name] = _with_batch(spec, fixed, dims, batch)
        out[batch] = random_feeds(specs, count=1, seed=0, shapes=sized, dims=dims)[0]
    return out


def _with_batch(spec: InputSpec, fixed: Mapping, dims: Mapping, batch: int) -> tuple[int, ...]:
    from onnxsqueeze.run.probes import concrete_shape

    shape = list(concrete_shape(spec, fixed, dims))
    if spec.shape and isinstance(spec.shape[0], int) and spec.shape[0] >= 0:
        if spec.shape[0] != batch:
            raise CalibrationDataError(
                f"input '{spec.name}' has a fixed batch of {spec.shape[0]}; batch {batch} "
                "cannot be fed"
            )
    elif shape:
        shape[0] = batch
    return tuple(shape)


def _stacked(samples: list[Mapping[str, Any]], specs: list[InputSpec], batch: int | None) -> dict:
    """The first samples concatenated on axis 0 up to ``batch`` rows (cycled if too few;
    the first sample alone when their other dims differ: sentences of other lengths)."""
    if batch is None:
        return {k: np.asarray(v) for k, v in samples[0].items()}
    out = {}
    for spec in specs:
        arrays = [np.asarray(s[spec.name]) for s in samples]
        if any(a.shape[1:] != arrays[0].shape[1:] for a in arrays):
            arrays = arrays[:1]
        if not arrays[0].ndim:
            raise CalibrationDataError(f"input '{spec.name}' is a scalar; it has no batch axis")
        rows = np.concatenate(arrays, axis=0)
        reps = math.ceil(batch / rows.shape[0])
        out[spec.name] = np.ascontiguousarray(np.concatenate([rows] * reps, axis=0)[:batch])
    return out


def _unavailable(provider: str) -> str | None:
    """Why ``provider`` cannot run here (None: it can)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if provider not in available:
        return f"not in this onnxruntime build (has {', '.join(short_name(a) for a in available)})"
    return None


def _placement(session: Any) -> dict[str, int] | None:
    """Nodes per provider onnxruntime assigned (None where it cannot say)."""
    try:
        info = session.get_provider_graph_assignment_info()
    except Exception:
        return None
    counts: Counter = Counter()
    for subgraph in info:
        counts[subgraph.ep_name] += len(subgraph.get_nodes())
    return dict(counts)


def _time_provider(
    rows: list[BenchResult],
    feeds: list[dict],
    provider: str,
    threads: int | None,
    rounds: int,
    runs: int,
    progress: Callable[[int, int], None] | None,
    measure_cost: bool,
) -> None:
    """Create each model's session (its cost measured apart, see run.session_cost), then
    time them all interleaved."""
    cannot = prime(provider, threads)
    if cannot:
        for row in rows:
            row.status, row.reason = "unavailable", cannot
        return
    runners, live_feeds, live_rows = [], [], []
    for row, feed in zip(rows, feeds, strict=True):
        try:
            session = bench_session(Path(row.model), provider, threads)
            if provider not in session.get_providers():
                row.status = "unavailable"
                row.reason = f"onnxruntime fell back to {', '.join(session.get_providers())}"
                continue
            run = _runner(session)
            run(feed)
        except Exception as exc:
            row.status, row.reason = "failed", first_line(exc)
            continue
        row.nodes_by_provider = _placement(session)
        if measure_cost:
            cost = session_cost(Path(row.model), provider, threads, feed)
            if "error" in cost:
                row.reason = f"load time and memory not measured: {cost['error']}"
            row.create_ms = cost.get("create_ms")
            row.memory_bytes = cost.get("memory_bytes")
            row.gpu_memory_bytes = cost.get("gpu_memory_bytes")
        runners.append(run)
        live_feeds.append(feed)
        live_rows.append(row)
    if not runners:
        return
    try:
        times = interleaved_rounds(
            runners, live_feeds, rounds=rounds, runs=runs, round_s=ROUND_S, progress=progress
        )
    except Exception as exc:
        for row in live_rows:
            row.status, row.reason = "failed", first_line(exc)
        return
    for row, per_round in zip(live_rows, times, strict=True):
        _summarize(row, per_round)


def _runner(session: Any) -> Callable[[Mapping[str, Any]], Any]:
    def run(feed: Mapping[str, Any]) -> Any:
        return session.run(None, dict(feed))

    return run


def _summarize(row: BenchResult, per_round: list[list[float]]) -> None:
    every = np.array([t for r in per_round for t in r])
    row.runs = int(every.size)
    row.p50_ms, row.p90_ms, row.p99_ms = (float(np.percentile(every, q)) for q in (50, 90, 99))
    row.round_p50_ms = [statistics.median(r) for r in per_round]
    row.spread = (max(row.round_p50_ms) - min(row.round_p50_ms)) / row.p50_ms
    row.throughput = (row.batch or 1) * 1000 / row.p50_ms


def _ratios(rows: list[BenchResult]) -> None:
    base = rows[0].p50_ms if rows and rows[0].status == "ok" else None
    for row in rows:
        if base and row.p50_ms:
            row.speedup = base / row.p50_ms
