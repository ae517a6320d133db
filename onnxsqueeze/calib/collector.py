"""Stream calibration samples through onnxruntime and update one observer per tensor.

The tensors are exposed as extra outputs of an in-memory copy of the model (nothing is
written next to the user's files). When exposing all of them at once would hold more than
``max_exposed_bytes`` per run (estimated from shapes inferred at the first sample's input
sizes), they are split into groups and each group gets its own session: every tensor still
sees every sample, at the price of one extra run per group. Each sample is released as soon
as its outputs have updated the observers, so memory does not grow with the sample count.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxsqueeze.calib.cache import Calibration
from onnxsqueeze.calib.observers import Observer, observer_for
from onnxsqueeze.errors import CalibrationDataError, CalibrationError
from onnxsqueeze.shapes import inferred_shapes

logger = logging.getLogger(__name__)

FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)
#: Default bound on the intermediate tensors one run may hand back (bytes).
MAX_EXPOSED_BYTES = 1 << 30

Progress = Callable[[int, int | None], None]


@dataclasses.dataclass(frozen=True)
class CollectOptions:
    method: str = "entropy"
    bins: int = 4096
    op_types: tuple[str, ...] | None = None
    providers: tuple[str, ...] = ("cpu",)
    max_exposed_bytes: int = MAX_EXPOSED_BYTES


def select_tensors(
    model: ir.Model, op_types: Sequence[str] | None = None
) -> tuple[list[str], dict[str, str]]:
    """Float activations worth calibrating (main graph), and the ones left out with why.

    Constants are weights, not activations; values inside If/Loop/Scan bodies cannot be
    exposed as model outputs, so they are reported rather than silently ignored.
    """
    chosen: dict[str, None] = {}
    skipped: dict[str, str] = {}
    graph = model.graph
    with inferred_shapes(model):
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
        for sub in model.graphs():
            if sub is graph:
                continue
            for node in sub:
                for value in node.outputs:
                    if value.name:
                        skipped[value.name] = "inside a subgraph (If/Loop/Scan body)"
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
        if tensors is None:
            self.tensors, self.skipped = select_tensors(model, self.options.op_types)
        else:
            self.tensors, self.skipped = list(tensors), {}
        self.inputs = [v.name for v in model.graph.inputs if v.name not in model.graph.initializers]
        self._sessions: list[tuple[Any, list[str]]] | None = None

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
        result = into or Calibration(inputs=self.inputs, skipped=self.skipped)
        for name in self.tensors:
            if name not in result.observers:
                result.observers[name] = self.new_observer()
        observers = result.observers
        input_names = set(self.inputs)
        done = 0
        for feed in feeds:
            if self._sessions is None:
                self._sessions = self._build_sessions(feed)
            for name, array in feed.items():
                if name in input_names and name in observers:
                    observers[name].update(array)
            for session, names in self._sessions:
                outputs = session.run(feed)
                for name in names:
                    observers[name].update(outputs[name])
                del outputs
            done += 1
            if progress is not None:
                progress(done, total)
        if done == 0:
            raise CalibrationDataError("calibration data holds no samples")
        result.samples += done
        return result

    # ------------------------------------------------------------------ sessions

    def _build_sessions(self, feed: Mapping[str, np.ndarray]) -> list[tuple[Any, list[str]]]:
        from onnxsqueeze.runtime import Session

        exposed = [n for n in self.tensors if n not in self.inputs]
        groups = self._groups(exposed, feed)
        if len(groups) > 1:
            logger.info(
                "calibration: %d tensors in %d groups (one run each per sample) to stay under %d MB",
                len(exposed),
                len(groups),
                self.options.max_exposed_bytes >> 20,
            )
        sessions = []
        for names in groups:
            try:
                # Unoptimised with prepacked weights, as onnxruntime's calibrators run:
                # fusions would give each group's session different values for a tensor.
                session = Session(
                    _with_outputs(self.model, names), self.options.providers, prepack=True
                )
            except Exception as exc:
                raise CalibrationError(f"cannot run the model for calibration: {exc}") from exc
            sessions.append((session, names))
        return sessions

    def _groups(self, names: list[str], feed: Mapping[str, np.ndarray]) -> list[list[str]]:
        sizes = _estimated_bytes(self.model, names, feed)
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


def _with_outputs(model: ir.Model, names: Sequence[str]) -> ir.Model:
    """A copy of the model that also returns ``names`` (tensors are shared, not copied)."""
    clone = model.clone()
    wanted = set(names)
    present = {v.name for v in clone.graph.outputs}
    values = {}
    with inferred_shapes(clone):  # values that become outputs keep their inferred types
        for node in clone.graph:
            for value in node.outputs:
                if value.name in wanted and value.name not in present:
                    values[value.name] = value
        for name in names:
            if name in values:
                clone.graph.outputs.append(values[name])
    for value in values.values():
        if value.type is None:
            raise CalibrationError(f"tensor '{value.name}': element type unknown, cannot expose it")
    return clone


def _estimated_bytes(
    model: ir.Model, names: Sequence[str], feed: Mapping[str, np.ndarray]
) -> dict[str, int | None]:
    """Bytes of each tensor at this sample's input sizes (None where shapes stay unknown)."""
    clone = model.clone()
    for value in clone.graph.inputs:
        if value.name in feed:
            value.shape = ir.Shape(np.asarray(feed[value.name]).shape)
    wanted = set(names)
    sizes: dict[str, int | None] = {}
    with inferred_shapes(clone):
        for node in clone.graph:
            for value in node.outputs:
                if value.name not in wanted:
                    continue
                dims = value.shape.dims if value.shape is not None else None
                if dims is None or not all(isinstance(d, int) for d in dims) or value.dtype is None:
                    sizes[value.name] = None
                else:
                    sizes[value.name] = int(np.prod(dims, dtype=np.int64)) * value.dtype.itemsize
    return sizes
