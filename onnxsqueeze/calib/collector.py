"""Stream calibration samples through onnxruntime and update one observer per tensor.

The tensors are exposed as extra outputs of an in-memory copy of the model (nothing is
written next to the user's files). When exposing all of them at once would hold more than
``max_exposed_bytes`` per run (estimated from shapes inferred at the first sample's input
sizes), they are split into groups and each group gets its own session: every tensor still
sees every sample, at the price of one extra run per group. Samples of one shape may share a
run (``stacking``). A run's outputs are released once they have updated the observers, so
memory does not grow with the sample count. Which tensors are observed: ``calib.tensors``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxsqueeze.calib import stacking
from onnxsqueeze.calib.cache import Calibration
from onnxsqueeze.calib.expose import branch_chain, expose
from onnxsqueeze.calib.observers import DEFAULT_BINS, HISTOGRAM_METHODS, Observer, observer_for
from onnxsqueeze.calib.tensors import (
    feed_names,
    produced_values,
    same_values,
    select_inferred,
    static_nbytes,
)
from onnxsqueeze.core.errors import CalibrationDataError, CalibrationError
from onnxsqueeze.core.graphs import all_value_names
from onnxsqueeze.core.shapes import inferred_shapes
from onnxsqueeze.run.session import Session, onnxruntime_float_types

logger = logging.getLogger(__name__)

MIN_SUFFIX, MAX_SUFFIX, SIZE_SUFFIX = "::onnxsqueeze.min", "::onnxsqueeze.max", "::onnxsqueeze.size"
#: Below this many values per sample, threads cost more than they save.
PARALLEL_ELEMENTS = 1 << 20
#: Default bound on the intermediate tensors one run may hand back (bytes).
MAX_EXPOSED_BYTES = 1 << 30

Progress = Callable[[int, int | None], None]


@dataclasses.dataclass(frozen=True)
class CollectOptions:
    method: str = "entropy"
    bins: int = DEFAULT_BINS
    op_types: tuple[str, ...] | None = None
    providers: tuple[str, ...] = ("cpu",)
    max_exposed_bytes: int = MAX_EXPOSED_BYTES
    #: Observe only these among the selected tensors (what a quantizer will read; see
    #: tensors.RangesAsked). None: every selected tensor.
    only: frozenset[str] | None = None
    #: Several samples per onnxruntime run where that gives the same statistics (see
    #: calib.stacking). None: for histogram methods only, so min/max ranges stay exactly
    #: those of one run per sample (onnxruntime's calibrators), bit for bit.
    stack: bool | None = None
    #: Threads the histogram updates may use (None: one per core). A worker of a pool that
    #: shares the machine takes its share. onnxruntime keeps its default thread count
    #: wherever it runs: its convolutions round differently with another (1e-9 relative on
    #: PP-OCR det), and a worker's statistics must be this process's.
    threads: int | None = None


class Collector:
    """Runs samples through the model and keeps the observers of the selected tensors."""

    def __init__(
        self,
        model: ir.Model,
        options: CollectOptions | None = None,
        *,
        tensors: Sequence[str] | None = None,
    ) -> None:
        self.model = model
        self.options = options or CollectOptions()
        #: Chosen at the first sample (one shape inference at its sizes serves the choice,
        #: the size estimates and the exposed outputs' types), unless given here.
        self.tensors: list[str] = list(tensors) if tensors is not None else []
        self._given = tensors is not None
        self.skipped: dict[str, str] = {}
        self.inputs = feed_names(model)
        self._sessions: list[tuple[Any, list[str], list[str]]] | None = None
        self._aliases: dict[str, str] = {}
        self._pool: ThreadPoolExecutor | None = None
        #: Samples per run, chosen at the first sample; whether stacking was checked to
        #: give the same statistics (None: not checked yet).
        self._stack = 1
        self._stacks_agree: bool | None = None
        self._planned = False

    def new_observer(self) -> Observer:
        return observer_for(self.options.method, self.options.bins)

    def plan(self, first: Sequence[Mapping[str, np.ndarray]]) -> int:
        """Prepare on the data's first samples as ``collect`` would at its start: the
        tensors, the sessions, and how many samples one run takes (stacking checked on the
        first two). Returns that count. Shards of one dataset planned on the same first
        samples stack alike, so their runs group as one process's would: stacked runs give
        values a few ulps from single ones, which a histogram bin edge can tell apart."""
        if not first:
            raise CalibrationDataError("calibration data holds no samples")
        self._prepare(first[0])
        observers = {name: self.new_observer() for name in self.tensors}
        self._stack = self._stack_size(first[0], observers)
        if (
            self._stack > 1
            and len(first) > 1
            and stacking.signature(first[1]) == stacking.signature(first[0])
        ):
            self._stacks_agree = self._check_stacking(list(first[:2]))
            if not self._stacks_agree:
                self._stack = 1
        self._planned = True
        return self._stack

    def collect(
        self,
        feeds: Iterable[Mapping[str, np.ndarray]],
        *,
        into: Calibration | None = None,
        total: int | None = None,
        progress: Progress | None = None,
    ) -> Calibration:
        """Update (or start) a Calibration with every sample of ``feeds``."""
        result = into or Calibration(inputs=self.inputs)
        observers = result.observers
        done = 0
        try:
            for feed, count in self._runs(feeds, result):
                self._observe(feed, observers)
                done += count
                if progress is not None:
                    progress(done, total)
        finally:
            if self._pool is not None:
                self._pool.shutdown()
                self._pool = None
        for alias, source in self._aliases.items():
            observers[alias] = copy.deepcopy(observers[source])
        if done == 0:
            raise CalibrationDataError("calibration data holds no samples")
        result.samples += done
        return result

    def _runs(
        self, feeds: Iterable[Mapping[str, np.ndarray]], result: Calibration
    ) -> Iterator[tuple[Mapping[str, np.ndarray], int]]:
        """The feed of each onnxruntime run and its sample count: samples of one signature
        stacked (once stacking has been shown to give the same statistics), else one each."""
        pending: list[Mapping[str, np.ndarray]] = []
        first = True
        for feed in feeds:
            if self._sessions is None:
                self._prepare(feed)
            if first:
                first = False
                result.skipped.update(self.skipped)
                for name in self.tensors:
                    if name not in result.observers:
                        result.observers[name] = self.new_observer()
                if not self._planned:
                    self._stack = self._stack_size(feed, result.observers)
            if pending and (
                len(pending) >= self._stack
                or stacking.signature(feed) != stacking.signature(pending[0])
            ):
                yield from self._stacked(pending)
                pending = []
            pending.append(feed)
        if pending:
            yield from self._stacked(pending)

    def _stacked(
        self, feeds: list[Mapping[str, np.ndarray]]
    ) -> Iterator[tuple[Mapping[str, np.ndarray], int]]:
        if len(feeds) > 1 and self._stacks_agree is None:
            self._stacks_agree = self._check_stacking(feeds[:2])
        if len(feeds) == 1 or not self._stacks_agree:
            self._stack = 1
            yield from ((feed, 1) for feed in feeds)
        else:
            yield stacking.stack(feeds), len(feeds)

    def _observe(self, feed: Mapping[str, np.ndarray], observers: Mapping[str, Observer]) -> None:
        """One run per tensor group, each group's outputs released before the next group
        runs (what bounds memory when the tensors are split into groups)."""
        for name, array in feed.items():
            if name in self.inputs and name in observers:
                observers[name].update(array)
        for session, full, reduced in list(self._sessions or []):
            outputs = session.run(feed)
            self._update(observers, full, outputs)
            flagged = self._update_reduced(observers, reduced, outputs)
            del outputs
            if flagged:
                self._expose_fully(flagged, feed, observers)

    def _stack_size(self, feed: Mapping[str, np.ndarray], observers: Mapping[str, Observer]) -> int:
        """How many samples one run may take (1: stacking cannot apply to this model)."""
        sample = sum(self._sizes.values())
        exposed = max(
            (sum(self._sizes.get(n, 0) for n in full) for _, full, _ in self._sessions or []),
            default=0,
        )
        wanted = self.options.stack
        if wanted is None:
            wanted = self.options.method in HISTOGRAM_METHODS
        stack = 1
        if (
            wanted
            and stacking.signature(feed) is not None
            and stacking.batch_axis_is_free(self.model, list(feed))
            and not any(getattr(o, "averaging", None) for o in observers.values())
        ):
            stack = stacking.stack_size(sample, exposed, self.options.max_exposed_bytes)
        return stack

    def _check_stacking(self, feeds: list[Mapping[str, np.ndarray]]) -> bool:
        """Run two samples alone and stacked; stacking holds if nothing differs."""
        singles = [self._extremes(feed) for feed in feeds]
        reason = stacking.disagreement(singles, self._extremes(stacking.stack(feeds)))
        if reason:
            logger.info("calibration: one sample per run (stacking changes values: %s)", reason)
        return reason is None

    def _extremes(
        self, feed: Mapping[str, np.ndarray]
    ) -> tuple[dict[str, tuple[float, float]], dict[str, Any]]:
        """Every calibrated tensor's finite extremes and the model outputs for one feed."""
        ranges: dict[str, tuple[float, float]] = {}
        outputs: dict[str, Any] = {}
        wanted = {v.name for v in self.model.graph.outputs}
        for session, full, reduced in self._sessions or []:
            results = session.run(feed)
            for name in full:
                ranges[name] = stacking.extremes(results[name])
            for name in reduced:
                ranges[name] = (
                    float(results[name + MIN_SUFFIX]),
                    float(results[name + MAX_SUFFIX]),
                )
            outputs.update({k: v for k, v in results.items() if k in wanted})
        return ranges, outputs

    def _update(
        self, observers: Mapping[str, Observer], names: Sequence[str], outputs: Mapping[str, Any]
    ) -> None:
        """Histogram updates of one sample, in threads when there is enough data: the
        kernels release the GIL and each observer is touched by one thread only."""
        sizes = {name: np.size(outputs[name]) for name in names}
        workers = self.options.threads or os.cpu_count() or 1
        if sum(sizes.values()) < PARALLEL_ELEMENTS or workers < 2:
            for name in names:
                observers[name].update(outputs[name])
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=workers)
        # One task per worker (a task per tensor costs more in locks than it saves),
        # tensors dealt out biggest first to the least loaded worker.
        shares: list[list[str]] = [[] for _ in range(workers)]
        loads = [0] * workers
        for name in sorted(names, key=lambda n: -sizes[n]):
            least = loads.index(min(loads))
            shares[least].append(name)
            loads[least] += sizes[name]

        def run(share: list[str]) -> None:
            for name in share:
                observers[name].update(outputs[name])

        list(self._pool.map(run, shares))

    # ------------------------------------------------------------------ sessions

    def _prepare(self, feed: Mapping[str, np.ndarray]) -> None:
        """Choose tensors, learn their types and sizes at this sample's input sizes (one
        shape inference), and make the sessions."""
        clone = self.model.clone()
        for value in clone.graph.inputs:
            if value.name in feed:
                value.shape = ir.Shape(np.shape(feed[value.name]))
        with inferred_shapes(clone):
            _type_from_onnxruntime(clone)
            if not self._given:
                self.tensors, self.skipped = select_inferred(clone, self.options.op_types)
            only = self.options.only
            if only is not None:
                self.tensors = [n for n in self.tensors if n in only]
                self.skipped = {n: why for n, why in self.skipped.items() if n in only}
            produced = produced_values(clone)
            self._types = {n: produced[n].type for n in self.tensors if n in produced}
            sizes = {n: static_nbytes(produced[n]) for n in self._types}
            # a tensor of unknown size is budgeted as the largest known one
            largest = max((b for b in sizes.values() if b is not None), default=0)
            self._sizes = {n: largest if b is None else b for n, b in sizes.items()}
            self._nested = {n for n in self._types if produced[n].graph is not clone.graph}
        unknown = [n for n in self.tensors if n not in produced and n not in self.inputs]
        if unknown:
            raise CalibrationError(f"no such tensor in the main graph: {', '.join(unknown[:5])}")
        untyped = [n for n, t in self._types.items() if t is None]
        if untyped:
            raise CalibrationError(f"tensor '{untyped[0]}': element type unknown, cannot expose it")
        self._present = [v.name for v in clone.graph.outputs if v.name in self._types]
        self._aliases = {
            alias: source
            for alias, source in same_values(clone, set(self.tensors)).items()
            if alias not in self._present
        }
        computed = [
            n
            for n in self.tensors
            if n in self._types and n not in self._present and n not in self._aliases
        ]
        if self.options.method == "minmax":
            # values of If branches come out whole: a branch not taken gives an empty tensor
            self._reduced = [n for n in computed if n not in self._nested]
            self._full = [n for n in computed if n in self._nested]
        else:
            self._reduced, self._full = [], computed
        self._sessions = self._make_sessions()

    def _make_sessions(self) -> list[tuple[Any, list[str], list[str]]]:
        groups = self._groups(self._full, self._sizes)
        if len(groups) > 1:
            logger.info(
                "calibration: %d tensors in %d groups (one run each per sample) to stay under %d MB",
                len(self._full),
                len(groups),
                self.options.max_exposed_bytes >> 20,
            )
        groups = groups or [[]]
        sessions = []
        for index, names in enumerate(groups):
            reduced = self._reduced if index == 0 else []
            sessions.append((self._session(names, reduced), list(names), list(reduced)))
        # tensors that are already model outputs come with every session's results
        sessions[0][1].extend(self._present)
        return sessions

    def _session(self, full: Sequence[str], reduced: Sequence[str]) -> Any:
        """A session on a copy of the model that returns ``full`` tensors whole and, for
        ``reduced`` ones, only ReduceMin/ReduceMax/Size (what min/max calibration needs,
        computed inside onnxruntime instead of copying the tensor out)."""
        clone = self.model.clone()
        produced = produced_values(clone)
        chain = branch_chain(clone)
        names = all_value_names(clone)
        renamed = {}
        for name in full:
            value = produced[name]
            value.type, value.shape = self._types[name], None  # outputs need a type only
            if value.graph is clone.graph:
                clone.graph.outputs.append(value)
            else:
                renamed[expose(clone, value, chain, names)] = name
        for name in reduced:
            value = produced[name]
            for op, key in (
                ("ReduceMin", MIN_SUFFIX),
                ("ReduceMax", MAX_SUFFIX),
                ("Size", SIZE_SUFFIX),
            ):
                attributes = {"keepdims": 0} if op != "Size" else {}
                node = ir.node(op, [value], attributes=attributes, name=name + key)
                out = node.outputs[0]
                out.name = name + key
                dtype = ir.DataType.INT64 if op == "Size" else self._types[name].dtype
                out.type, out.shape = ir.TensorType(dtype), ir.Shape([])
                clone.graph.append(node)
                clone.graph.outputs.append(out)
        try:
            # Unoptimised with prepacked weights, as onnxruntime's calibrators run:
            # fusions would give each group's session different values for a tensor.
            # No spinning: idle onnxruntime threads would take the cores the histogram
            # updates run on between two samples.
            return _Renamed(
                Session(
                    clone,
                    self.options.providers,
                    prepack=True,
                    config={"session.intra_op.allow_spinning": "0"},
                ),
                renamed,
            )
        except Exception as exc:
            raise CalibrationError(f"cannot run the model for calibration: {exc}") from exc

    @staticmethod
    def _update_reduced(
        observers: Mapping[str, Observer], names: Sequence[str], outputs: Mapping[str, Any]
    ) -> list[str]:
        """Fold per-sample extremes in; return tensors whose extremes were not finite."""
        flagged = []
        for name in names:
            size = int(outputs[name + SIZE_SUFFIX])
            if size == 0:
                continue
            lo, hi = float(outputs[name + MIN_SUFFIX]), float(outputs[name + MAX_SUFFIX])
            if math.isfinite(lo) and math.isfinite(hi):
                observers[name].update_extremes(lo, hi, size)  # type: ignore[attr-defined]
            else:
                flagged.append(name)
        return flagged

    def _expose_fully(
        self, names: list[str], feed: Mapping[str, np.ndarray], observers: Mapping[str, Observer]
    ) -> None:
        """NaN/inf showed up in these tensors (attention masks): from now on they come out
        whole, so the kernel can count them and keep the finite range; this sample is
        re-run for them."""
        logger.info("calibration: %d tensors hold NaN/inf; exposing them whole", len(names))
        outputs = self._session(names, []).run(feed)
        for name in names:
            observers[name].update(outputs[name])
        self._reduced = [n for n in self._reduced if n not in names]
        self._full = self._full + names
        self._sessions = self._make_sessions()

    def _groups(self, names: list[str], sizes: Mapping[str, int]) -> list[list[str]]:
        budget = self.options.max_exposed_bytes
        groups: list[list[str]] = [[]]
        used = 0
        for name in names:
            size = sizes.get(name, 0)
            if groups[-1] and used + size > budget:
                groups.append([])
                used = 0
            groups[-1].append(name)
            used += size
        return [g for g in groups if g]


def _type_from_onnxruntime(model: ir.Model) -> None:
    """Main-graph values onnx's inference could not type get onnxruntime's float types, so
    the outputs of contrib and ai.onnx.ml ops (an onnxruntime-optimized BERT's
    SkipLayerNormalization, a scikit-learn Scaler) are calibrated like any other."""
    untyped = {v.name: v for node in model.graph for v in node.outputs if v.name and not v.type}
    if untyped:
        for name, dtype in onnxruntime_float_types(model, list(untyped)).items():
            untyped[name].type = ir.TensorType(dtype)


class _Renamed:
    """A session whose exposed branch values are returned under their own names."""

    def __init__(self, session: Any, renamed: Mapping[str, str]) -> None:
        self.session = session
        self.renamed = dict(renamed)

    def run(self, feed: Mapping[str, Any]) -> dict[str, Any]:
        outputs = self.session.run(feed)
        for exposed, name in self.renamed.items():
            outputs[name] = outputs.pop(exposed)
        return outputs
