"""Shape and type inference for passes that need them, without leaving traces in the file.

onnx's inference (through onnx_ir's ShapeInferencePass, with data propagation) annotates
values; passes read ``value.shape``/``value.dtype``. Afterwards the annotations of values
that had none are removed again, so the output does not gain value_info it did not have.
"""

from __future__ import annotations

import collections
import contextlib
import logging
from collections.abc import Iterator

import onnx
import onnx_ir as ir

from onnxsqueeze.core.errors import first_line
from onnxsqueeze.core.io import drop_map_types, weightless

logger = logging.getLogger(__name__)


def _values(model: ir.Model) -> Iterator[ir.Value]:
    for graph in model.graphs():
        yield from _graph_values(graph)


def _forget_cleared_inputs(model: ir.Model) -> None:
    """onnx_ir's ShapeInferencePass lists every initializer as a graph input while onnx
    infers, then clears the list; the inputs' reference Counter keeps a zero entry for each
    value, so every weight seen then (a memory-mapped file's pages, a replaced float weight)
    stays alive after the graph drops it. Adding an empty Counter drops the zero entries."""
    counter = getattr(model.graph.inputs, "_ref_counter", None)
    if isinstance(counter, collections.Counter):
        counter += collections.Counter()


@contextlib.contextmanager
def inferred_shapes(model: ir.Model) -> Iterator[bool]:
    """Annotate shapes/dtypes for the duration of the block; yields whether inference ran."""
    from onnx_ir.passes.common import ShapeInferencePass

    saved = {value: (value.type, value.shape) for value in _values(model)}
    try:
        try:
            ShapeInferencePass(strict_mode=False, data_prop=True)(model)
        finally:
            _forget_cleared_inputs(model)
        ok = True
    except Exception:
        try:  # onnx_ir cannot read back map types (scikit-learn's ZipMap): without them
            _infer_without_maps(model)
            ok = True
        except Exception as exc:  # inference is a help, never a requirement
            logger.info("shape inference failed: %s", first_line(exc))
            ok = False
    try:
        yield ok
    finally:
        for value, (type_, shape) in saved.items():
            if value.is_graph_output() and type_ is None:
                continue  # became an output during the block (took over a name): keep its type
            value.type = type_
            value.shape = shape


def _infer_without_maps(model: ir.Model) -> None:
    """onnx's inference, its map-typed results dropped before onnx_ir reads them back, the
    rest merged by value name (weights stay out of the serialised copy)."""
    with weightless(model):
        proto = ir.serde.serialize_model(model)
    proto = onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=True)
    drop_map_types(proto.graph)
    inferred = ir.serde.deserialize_model(proto)
    for original, done in zip(model.graphs(), inferred.graphs(), strict=False):
        found = {v.name: v for v in _graph_values(done)}
        for value in _graph_values(original):
            twin = found.get(value.name)
            if twin is not None and twin.type is not None:
                value.type, value.shape = twin.type, twin.shape


def _graph_values(graph: ir.Graph) -> Iterator[ir.Value]:
    yield from graph.inputs
    for node in graph:
        yield from node.outputs


def static_shape(value: ir.Value | None) -> tuple[int, ...] | None:
    """The value's shape if every dim is a known integer."""
    if value is None or value.shape is None:
        return None
    dims = value.shape.dims
    if all(isinstance(d, int) and d >= 0 for d in dims):
        return tuple(dims)  # type: ignore[arg-type]
    return None


def rank(value: ir.Value | None) -> int | None:
    if value is None or value.shape is None:
        return None
    return len(value.shape)
