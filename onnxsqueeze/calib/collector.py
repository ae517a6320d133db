"""Stream calibration samples through onnxruntime and update one observer per tensor.

The tensors are exposed as extra outputs of an in-memory copy of the model (nothing is
written next to the user's files). When exposing all of them at once would hold more than
``max_exposed_bytes`` per run (estimated from shapes inferred at the first sample's input
sizes), they are split into groups and each group gets its own session: every tensor still
sees every sample, at the price of one extra run per group. Each sample is released as soon
as its outputs have updated the observers, so memory does not grow with the sample count.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxsqueeze.calib import stacking
from onnxsqueeze.calib.cache import Calibration
from onnxsqueeze.calib.expose import branch_chain, expose
from onnxsqueeze.calib.observers import DEFAULT_BINS, HISTOGRAM_METHODS, Observer, observer_for
from onnxsqueeze.errors import CalibrationDataError, CalibrationError
from onnxsqueeze.graphs import all_value_names
from onnxsqueeze.shapes import inferred_shapes, static_shape

logger = logging.getLogger(__name__)

MIN_SUFFIX, MAX_SUFFIX, SIZE_SUFFIX = "::onnxsqueeze.min", "::onnxsqueeze.max", "::onnxsqueeze.size"
FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)
#: Below this many values per sample, threads cost more than they save.
PARALLEL_ELEMENTS = 1 << 20
#: Default bound on the intermediate tensors one run may hand back (bytes).
MAX_EXPOSED_BYTES = 1 << 30
#: Ops whose output holds exactly the values of their first input, rearranged: its
#: statistics are a copy of the input's, so it is neither exposed nor observed.
SAME_VALUES_OPS = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity"})

Progress = Callable[[int, int | None], None]


@dataclasses.dataclass(frozen=True)
class CollectOptions:
    method: str = "entropy"
    bins: int = DEFAULT_BINS
    op_types: tuple[str, ...] | None = None
    providers: tuple[str, ...] = ("cpu",)
    max_exposed_bytes: int = MAX_EXPOSED_BYTES
    #: Several samples per onnxruntime run where that gives the same statistics (see
    #: calib.stacking). None: for histogram methods only, so min/max ranges stay exactly
    #: those of one run per sample (onnxruntime's calibrators), bit for bit.
    stack: bool | None = None


def select_tensors(
    model: ir.Model, op_types: Sequence[str] | None = None
) -> tuple[list[str], dict[str, str]]:
    """Float activations worth calibrating (main graph), and the ones left out with why."""
    with inferred_shapes(model):
        return _select(model, op_types)


def _select(model: ir.Model, op_types: Sequence[str] | None) -> tuple[list[str], dict[str, str]]:
    """As select_tensors, on a model whose types are already inferred.

    Constants are weights, not activations. Values inside If branches are brought out
    through their Ifs (``expose``); values inside Loop/Scan bodies cannot be, so they are
    reported rather than silently ignored.
    """
    chosen: dict[str, None] = {}
    skipped: dict[str, str] = {}
    graph = model.graph
    for value in graph.inputs:
        constant = value.const_value is not None or value.name in graph.initializers
        if not constant and value.dtype in FLOAT_TYPES and not op_types:
            chosen[value.name] = None
    for node in graph:
        if op_types and node.op_type not in op_types:
            continue
        for value in (*node.inputs, *node.outputs):
            if value is None or not value.name or value.name in chosen:
                continue
            if value.const_value is not None or value.name in graph.initializers:
                continue
            producer = value.producer()
            if producer is not None and producer.op_type == "Constant":
                continue
            if value.dtype in FLOAT_TYPES:
                chosen[value.name] = None
            elif value.dtype is None:
                skipped[value.name] = "type unknown after shape inference"
    branches = branch_chain(model)
    for sub in model.graphs():
        if sub is graph:
            continue
        for node in sub:
            for value in node.outputs:
                if not value.name:
                    continue
                if sub not in branches:
                    skipped[value.name] = "inside a Loop/Scan body (per-iteration values)"
                elif (
                    op_types
                    and node.op_type not in op_types
                    and not any(user.op_type in op_types for user, _ in value.uses())
                ):
                    continue
                elif value.dtype in FLOAT_TYPES and node.op_type != "Constant":
                    chosen[value.name] = None
                elif value.dtype is None:
                    skipped[value.name] = "type unknown after shape inference"
    return list(chosen), skipped


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

    def new_observer(self) -> Observer:
        return observer_for(self.options.method, self.options.bins)

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
        pending: list[Mapping[str, np.ndarray]] = []
        for feed in feeds:
            if self._sessions is None:
                self._prepare(feed)
            if not done and not pending:
                result.skipped.update(self.skipped)
                for name in self.tensors:
                    if name not in observers:
                        observers[name] = self.new_observer()
                self._stack = self._stack_size(feed, observers)
            if pending and (
                len(pending) >= self._stack
                or stacking.signature(feed) != stacking.signature(pending[0])
            ):
                done += self._observe(pending, observers)
                pending = []
                if progress is not None:
                    progress(done, total)
            pending.append(feed)
        if pending:
            done += self._observe(pending, observers)
            if progress is not None:
                progress(done, total)
        for alias, source in self._aliases.items():
            observers[alias] = copy.deepcopy(observers[source])
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        if done == 0:
            raise CalibrationDataError("calibration data holds no samples")
        result.samples += done
        return result

    def _observe(
        self, feeds: list[Mapping[str, np.ndarray]], observers: Mapping[str, Observer]
    ) -> int:
        """Update the observers with samples of one signature: stacked into one run once
        stacking has been shown to give the same statistics, else one run each."""
        if len(feeds) > 1 and self._stacks_agree is None:
            self._stacks_agree = self._check_stacking(feeds[:2])
        if len(feeds) > 1 and not self._stacks_agree:
            self._stack = 1
            for feed in feeds:
                self._observe([feed], observers)
            return len(feeds)
        feed = feeds[0] if len(feeds) == 1 else stacking.stack(feeds)
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
        return len(feeds)

    def _stack_size(self, feed: Mapping[str, np.ndarray], observers: Mapping[str, Observer]) -> int:
        """How many samples one run may take (1: stacking cannot apply to this model)."""
        wanted = self.options.stack
        if wanted is None:
            wanted = self.options.method in HISTOGRAM_METHODS
        if (
            not wanted
            or stacking.signature(feed) is None
            or not stacking.batch_axis_is_free(self.model, list(feed))
            or any(getattr(o, "averaging", None) for o in observers.values())
        ):
            return 1
        known = [size for size in self._sizes.values() if size is not None]
        fallback = max(known, default=0)
        sample = sum(size or fallback for size in self._sizes.values())
        exposed = max(
            (
                sum(self._sizes.get(n) or fallback for n in full)
                for _, full, _ in self._sessions or []
            ),
            default=0,
        )
        return stacking.stack_size(sample, exposed, self.options.max_exposed_bytes)

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
        if sum(sizes.values()) < PARALLEL_ELEMENTS or (os.cpu_count() or 1) < 2:
            for name in names:
                observers[name].update(outputs[name])
            return
        workers = os.cpu_count() or 1
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
            if not self._given:
                self.tensors, self.skipped = _select(clone, self.options.op_types)
            produced = _produced(clone)
            self._types = {n: produced[n].type for n in self.tensors if n in produced}
            self._sizes = {n: _nbytes(produced[n]) for n in self._types}
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
        from onnxsqueeze.runtime import Session

        clone = self.model.clone()
        produced = _produced(clone)
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

    def _groups(self, names: list[str], sizes: Mapping[str, int | None]) -> list[list[str]]:
        known = [s for s in sizes.values() if s is not None]
        fallback = max(known) if known else 0
        budget = self.options.max_exposed_bytes
        groups: list[list[str]] = [[]]
        used = 0
        for name in names:
            size = sizes.get(name) or fallback
            if groups[-1] and used + size > budget:
                groups.append([])
                used = 0
            groups[-1].append(name)
            used += size
        return [g for g in groups if g]


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


def same_values(model: ir.Model, names: set[str]) -> dict[str, str]:
    """Tensors among ``names`` whose values are those of another tensor among them
    (Reshape/Transpose/... chains in the main graph), mapped to that tensor."""
    aliases: dict[str, str] = {}
    for node in model.graph:  # topological: a chain resolves to its first tensor
        if node.op_type not in SAME_VALUES_OPS or not node.inputs or node.inputs[0] is None:
            continue
        out, source = node.outputs[0].name, node.inputs[0].name
        source = aliases.get(source, source)
        if out in names and source in names and out != source:
            aliases[out] = source
    return aliases


def _produced(model: ir.Model) -> dict[str, ir.Value]:
    """Node outputs by name in the main graph and in If branches reachable through Ifs."""
    graphs = [model.graph, *branch_chain(model)]
    return {v.name: v for graph in graphs for node in graph for v in node.outputs if v.name}


def _nbytes(value: ir.Value) -> int | None:
    shape = static_shape(value)
    if shape is None or value.dtype is None:
        return None
    return int(np.prod(shape, dtype=np.int64)) * value.dtype.itemsize


def feed_names(model: ir.Model) -> list[str]:
    """Graph inputs a caller feeds (an initializer listed as input has its default)."""
    return [v.name for v in model.graph.inputs if v.name not in model.graph.initializers]
