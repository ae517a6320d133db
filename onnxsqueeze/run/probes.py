"""Probe feeds: the inputs every run is verified on. The user's data (a few samples of it), or
seeded random feeds shaped by the signature, ``--shape`` overrides, and when the original
rejects those, larger sizes and the sizes the graph's shape constants name."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxsqueeze.core.errors import CalibrationDataError, PipelineConfigError
from onnxsqueeze.core.graphs import constant_array, scopes
from onnxsqueeze.run.feeds import load_feeds
from onnxsqueeze.run.signature import InputSpec, input_specs

#: Probe samples generated when no data is given.
DEFAULT_PROBE_SAMPLES = 2
#: At most this many samples of the user's data are probes.
MAX_DATA_PROBES = 8
#: Size of a dynamic dimension nobody named (a multiple of 32 suits strided CNNs).
DEFAULT_DYNAMIC_DIM = 32
#: Larger sizes tried, in order, when the original model rejects probe feeds of the default
#: size (an audio model whose STFT pads by more than 32 samples, a CNN that downsamples 64x).
PROBE_DIM_RETRIES = (128, 512)
#: Then, at most this many sizes the graph itself names (see sizes_in_graph).
GRAPH_SIZE_RETRIES = 6
#: A generated probe input holds at most this many values (1 GiB of float32): a dim declared
#: as 10**6 x 10**6 needs real data or smaller sizes, not an out-of-memory kill.
MAX_PROBE_ELEMENTS = 2**28


_SHAPE_RE = re.compile(r"^(?P<name>[^:=]+)(?P<sep>[:=])(?P<dims>.+)$")


def parse_shape_overrides(
    items: Iterable[str],
) -> tuple[dict[str, tuple[int, ...]], dict[str, int]]:
    """``input:1x128`` fixes an input's shape; ``symbol=128`` fixes a named dynamic dim."""
    shapes: dict[str, tuple[int, ...]] = {}
    dims: dict[str, int] = {}
    for item in items:
        match = _SHAPE_RE.match(item.strip())
        try:
            if not match:
                raise ValueError
            if match["sep"] == ":":
                text = match["dims"].lower()
                shapes[match["name"]] = (
                    () if text in ("scalar", "()") else tuple(_size(d) for d in text.split("x"))
                )
            else:
                dims[match["name"]] = _size(match["dims"])
        except ValueError:
            raise PipelineConfigError(
                f"shapes= '{item}': expected NAME:DxDxD (e.g. input_ids:1x128) or SYMBOL=N "
                "(e.g. batch=1), sizes from 1"
            ) from None
    return shapes, dims


def _size(text: str) -> int:
    size = int(text)
    if size < 1:
        raise ValueError(text)
    return size


def check_overrides(
    specs: Sequence[InputSpec], shapes: Mapping[str, tuple[int, ...]], dims: Mapping[str, int]
) -> None:
    """Every shape names an input the model has, every symbol a dim its inputs declare:
    a misspelt name would otherwise be ignored without a word."""
    names = [s.name for s in specs]
    for name, shape in shapes.items():
        if name not in names:
            raise PipelineConfigError(
                f"shapes= names input '{name}', which the model does not have "
                f"(inputs: {', '.join(names) or 'none'})"
            )
        if any(not isinstance(d, int) or d < 1 for d in shape):
            raise PipelineConfigError(f"shapes= for '{name}': {shape}: sizes from 1")
    symbols = {d for s in specs for d in (s.shape or ()) if isinstance(d, str)}
    for symbol in dims:
        if symbol not in symbols:
            raise PipelineConfigError(
                f"shapes= names the dim '{symbol}', which no input declares "
                f"(dynamic dims: {', '.join(sorted(symbols)) or 'none'})"
            )


def concrete_shape(
    spec: InputSpec,
    shapes: Mapping[str, tuple[int, ...]],
    dims: Mapping[str, int],
    default_dim: int = DEFAULT_DYNAMIC_DIM,
) -> tuple[int, ...]:
    """Resolve every dynamic dim: user override, then symbol value, then a default."""
    if spec.name in shapes:
        shape = shapes[spec.name]
        if spec.shape is not None:
            bad = len(shape) != len(spec.shape) or any(
                isinstance(d, int) and d != s for d, s in zip(spec.shape, shape, strict=False)
            )
            if bad:
                raise PipelineConfigError(
                    f"shapes= for '{spec.name}': {list(shape)} does not fit the model's "
                    f"{list(spec.shape)}"
                )
        return shape
    if spec.shape is None:
        raise CalibrationDataError(
            f"input '{spec.name}' has unknown rank; give its shape with shapes="
        )
    out = []
    for axis, dim in enumerate(spec.shape):
        if isinstance(dim, int) and dim >= 0:
            out.append(dim)
        elif isinstance(dim, str) and dim in dims:
            out.append(dims[dim])
        elif axis == 0 or (isinstance(dim, str) and "batch" in dim.lower()):
            out.append(1)
        else:
            out.append(default_dim)
    return tuple(out)


def sizes_in_graph(model: ir.Model, skip: Iterable[int] = ()) -> list[int]:
    """Small integers the graph's shape arithmetic holds (short int64 constants, most
    frequent first): an exporter that traced a length into a Reshape (PyTorch's legacy
    TransformerEncoder export runs at its traced sequence length only) names it there."""
    counts: Counter[int] = Counter()
    values = [v for scope in scopes(model) for n in scope for v in n.inputs]
    for value in {id(v): v for v in values if v is not None}.values():
        array = constant_array(value)
        if array is not None and array.dtype == np.int64 and 0 < array.size <= 8:
            counts.update(int(x) for x in array.reshape(-1) if 2 <= x <= 8192)
    skipped = set(skip)
    ranked = sorted(counts, key=lambda size: (-counts[size], size))
    return [size for size in ranked if size not in skipped][:GRAPH_SIZE_RETRIES]


def random_feeds(
    specs: Sequence[InputSpec],
    *,
    count: int = 2,
    seed: int = 0,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    dims: Mapping[str, int] | None = None,
) -> list[dict[str, np.ndarray]]:
    """Seeded probe feeds that honour dtypes and dims (the same symbol gets the same size).

    Integers are drawn from {0, 1}: valid as indices, token types and masks in any model.
    """
    rng = np.random.default_rng(seed)
    resolved = {s.name: concrete_shape(s, shapes or {}, dims or {}) for s in specs}
    for name, shape in resolved.items():
        elements = math.prod(shape)
        if elements > MAX_PROBE_ELEMENTS:
            raise CalibrationDataError(
                f"input '{name}': a probe of shape {list(shape)} would hold {elements:.3g} "
                "values; give smaller sizes with shapes=, or real inputs with data="
            )
    feeds = []
    for _ in range(count):
        feed = {}
        for spec in specs:
            shape = resolved[spec.name]
            kind = spec.dtype.kind
            if kind == "f":
                arr = rng.standard_normal(shape).astype(spec.dtype)
            elif kind in "iu":
                arr = rng.integers(0, 2, size=shape).astype(spec.dtype)
            elif kind == "b":
                arr = rng.integers(0, 2, size=shape).astype(bool)
            elif kind == "O":
                arr = np.full(shape, "onnxsqueeze", dtype=object)
            else:
                raise CalibrationDataError(
                    f"input '{spec.name}': cannot generate {spec.dtype} probe data; pass data="
                )
            feed[spec.name] = arr
        feeds.append(feed)
    return feeds


def probe_feeds(model: ir.Model, data: Any, shapes: Any, count: int, seed: int) -> list[dict]:
    """User data (up to MAX_DATA_PROBES samples) or seeded random feeds from the signature."""
    specs = input_specs(model)
    fixed, dims = shape_overrides(shapes)
    check_overrides(specs, fixed, dims)
    if data is not None:
        return load_feeds(data, specs, limit=max(count, MAX_DATA_PROBES))
    return random_feeds(specs, count=count, seed=seed, shapes=fixed, dims=dims)


def shape_overrides(shapes: Any) -> tuple[dict, dict]:
    """``shapes`` as (input shapes, symbol sizes): a mapping of input shapes, or ``--shape``
    strings."""
    if isinstance(shapes, Mapping):
        try:
            return {str(k): tuple(int(d) for d in v) for k, v in shapes.items()}, {}
        except (TypeError, ValueError):
            raise PipelineConfigError(
                f"shapes= {dict(shapes)!r}: expected input name -> sequence of sizes"
            ) from None
    if isinstance(shapes, str):  # one spec, not its characters
        shapes = [shapes]
    if not all(isinstance(item, str) for item in shapes or []):
        raise PipelineConfigError(
            f"shapes= {shapes!r}: expected a mapping or 'NAME:1x128' / 'SYMBOL=N' strings"
        )
    return parse_shape_overrides(shapes or [])


def retry_shapes(model: ir.Model, shapes: Any) -> Iterable[tuple[str, dict[str, tuple[int, ...]]]]:
    """Input shapes to try when the original rejects the default probes: the guessed dims
    (dynamic, not the batch, not given) larger, then sizes the graph's shape constants
    name, on every input, then on the first input only (the others' guessed dims 1: a
    recurrent state whose axis 1 is the batch)."""
    fixed, dims = shape_overrides(shapes)
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
