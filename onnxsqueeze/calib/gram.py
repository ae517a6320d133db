"""Gram matrices X^T X of the activations that feed constant MatMul/Gemm/Conv weights.

GPTQ needs, per weight, how its input channels co-vary on real data; that is a K x K
matrix summed over every row of every sample, so memory stays constant in the sample
count, as for the observers. Only main-graph inputs are gathered, and only up to
MAX_CHANNELS (a 8192 x 8192 float64 matrix is 512 MB). A Conv's rows are its input patches
(im2col, K = channels x kernel), at most CONV_ROWS evenly spaced positions per sample: a
detection map has 10^5 positions, and the Gram matrix converges long before.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import onnx_ir as ir

from onnxsqueeze.core.graphs import constant_array
from onnxsqueeze.core.shapes import inferred_shapes
from onnxsqueeze.run.session import Session

MAX_CHANNELS = 4096
#: Activation rows gathered before they are folded into the sum.
POOL_ROWS = 1024
#: Patches of one Conv input per sample, at most.
CONV_ROWS = 2048
CONV_MARK = "#conv"


class Geometry(NamedTuple):
    channels: int
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    pads: tuple[int, ...]
    dilations: tuple[int, ...]

    @property
    def k(self) -> int:
        """Length of one patch: the filters' input channels x kernel."""
        return self.channels * int(np.prod(self.kernel))


def conv_geometry(node: ir.Node) -> Geometry | None:
    """How a plain Conv (group 1, explicit pads, constant filters) cuts its input."""
    if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return None
    attrs = {k: a.value for k, a in node.attributes.items()}
    weight = constant_array(node.inputs[1])
    if weight is None or weight.ndim < 3 or attrs.get("group", 1) != 1:
        return None
    if attrs.get("auto_pad", "NOTSET") != "NOTSET":
        return None
    spatial = weight.ndim - 2
    return Geometry(
        weight.shape[1],
        tuple(weight.shape[2:]),
        tuple(attrs.get("strides", [1] * spatial)),
        tuple(attrs.get("pads", [0] * 2 * spatial)),
        tuple(attrs.get("dilations", [1] * spatial)),
    )


def conv_key(node: ir.Node, geometry: Geometry | None = None) -> str | None:
    """The Gram matrix key of a plain Conv: its input and the patch geometry (two Convs
    reading one tensor may cut different patches)."""
    geometry = geometry or conv_geometry(node)
    if geometry is None or node.inputs[0] is None or not node.inputs[0].name:
        return None
    return f"{node.inputs[0].name}{CONV_MARK}{tuple(geometry)}"


def gram_key(node: ir.Node) -> str | None:
    """The key ``gram_matrices`` stores the Gram matrix of ``node``'s input under: the input's
    name for MatMul/Gemm (none for Gemm with transA, whose rows are not samples), the patch
    key for a plain Conv. The passes that read Gram matrices look them up by this."""
    if node.op_type == "Conv":
        return conv_key(node)
    trans_a = node.attributes.get("transA")
    x = node.inputs[0] if node.inputs else None
    if x is None or not x.name or (trans_a is not None and trans_a.as_int()):
        return None
    return x.name


def input_of(key: str) -> str:
    """The activation a Gram key reads (a Conv's key also names its patch geometry)."""
    return key.split(CONV_MARK)[0]


def _patches(x: np.ndarray, geometry: Geometry) -> np.ndarray:
    """[rows, C * prod(kernel)] input patches in the filters' (c, k...) order, at most
    CONV_ROWS of them, evenly spaced."""
    _, kernel, strides, pads, dilations = geometry
    spatial = len(kernel)
    x = np.pad(x, [(0, 0), (0, 0), *zip(pads[:spatial], pads[spatial:], strict=True)])
    span = [(k - 1) * d + 1 for k, d in zip(kernel, dilations, strict=True)]
    view = np.lib.stride_tricks.sliding_window_view(x, span, axis=tuple(range(2, 2 + spatial)))
    view = view[(slice(None), slice(None), *(slice(None, None, s) for s in strides))]
    view = view[(Ellipsis, *(slice(None, None, d) for d in dilations))]
    # [N, C, out..., k...] -> [N, out..., C, k...]
    order = (0, *range(2, 2 + spatial), 1, *range(2 + spatial, 2 + 2 * spatial))
    rows = view.transpose(order).reshape(-1, x.shape[1] * int(np.prod(kernel)))
    step = -(-rows.shape[0] // CONV_ROWS)
    return np.asarray(rows[::step], np.float64)


def weighted_inputs(model: ir.Model) -> dict[str, int]:
    """Key -> K for each main-graph MatMul/Gemm with a constant 2-D weight (key: the
    activation's name; Gemm only without transA, whose rows are then samples) and each plain
    Conv (key: ``conv_key``)."""
    return {key: k for key, (k, _) in _sources(model).items()}


def _sources(model: ir.Model) -> dict[str, tuple[int, Geometry | None]]:
    """``weighted_inputs`` with each Conv's patch geometry (None: the activation's own rows);
    every weight is read once."""
    found: dict[str, tuple[int, Geometry | None]] = {}
    for node in model.graph:
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "Conv":
            geometry = conv_geometry(node)
            key = conv_key(node, geometry) if geometry is not None else None
            if key and constant_array(node.inputs[0]) is None and geometry.k <= MAX_CHANNELS:
                found[key] = (geometry.k, geometry)
            continue
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        if len(node.inputs) < 2 or node.inputs[0] is None or node.inputs[1] is None:
            continue
        if gram_key(node) is None:
            continue
        weight = constant_array(node.inputs[1])
        x = node.inputs[0]
        if weight is None or weight.ndim != 2 or constant_array(x) is not None:
            continue
        trans_b = node.attributes.get("transB")
        k = weight.shape[1] if trans_b is not None and trans_b.as_int() else weight.shape[0]
        if k <= MAX_CHANNELS:
            found[x.name] = (k, None)
    return found


def activations(
    model: ir.Model,
    feeds: Iterable[Mapping[str, Any]],
    names: Iterable[str],
    providers: Sequence[str] = ("cpu",),
) -> Iterator[dict[str, np.ndarray]]:
    """Per sample, the main-graph values ``names`` (graph inputs straight from the feed,
    the others from one run of a copy of ``model`` that also outputs them)."""
    names = set(names)
    clone = model.clone()
    graph_inputs = {v.name for v in clone.graph.inputs}
    produced = {v.name: v for node in clone.graph for v in node.outputs}
    present = {v.name for v in clone.graph.outputs}
    with inferred_shapes(clone):
        for name in sorted(names):
            if name in produced and name not in present:
                value = produced[name]
                if value.type is None:
                    value.type = ir.TensorType(ir.DataType.FLOAT)
                value.shape = None
                clone.graph.outputs.append(value)
    session = Session(clone, providers)
    for feed in feeds:
        outputs = session.run(feed)
        found = {n: feed.get(n) if n in graph_inputs else outputs.get(n) for n in names}
        yield {n: a for n, a in found.items() if a is not None}


def gram_matrices(
    model: ir.Model,
    feeds: Iterable[Mapping[str, Any]],
    names: Sequence[str] | None = None,
    providers: Sequence[str] = ("cpu",),
    *,
    ones: bool = False,
) -> dict[str, np.ndarray]:
    """Sum over the samples of X^T X (float64, K x K) for each activation in ``names``
    (default: every ``weighted_inputs``), X = the activation with its last axis as channels.
    ``ones``: X gets a last column of ones, so the matrix (K + 1 square) also holds each
    channel's sum and the row count (what a refit with a bias term needs)."""
    sources = _sources(model)
    wanted = {key: k for key, (k, _) in sources.items()}
    if names is not None:
        wanted = {n: k for n, k in wanted.items() if n in set(names)}
    if not wanted:
        return {}
    geometries = {key: sources[key][1] for key in wanted if sources[key][1] is not None}
    extra = 1 if ones else 0
    grams = {n: np.zeros((k + extra, k + extra)) for n, k in wanted.items()}
    # Rows are pooled before each product: a sentence has a dozen rows, and a product per
    # sample would read and write the whole K x K sum for each (MiniLM: 36 s -> 2 s).
    pending: dict[str, list[np.ndarray]] = {n: [] for n in wanted}
    pooled = dict.fromkeys(wanted, 0)

    def flush(name: str) -> None:
        if pending[name]:
            x = np.concatenate(pending[name])
            grams[name] += x.T @ x
            pending[name], pooled[name] = [], 0

    sample_values = activations(model, feeds, {input_of(key) for key in wanted}, providers)
    for values in sample_values:
        for name, k in wanted.items():
            array = values.get(input_of(name))
            if array is None:
                continue
            if name in geometries:
                rows = _patches(np.asarray(array), geometries[name])
            else:
                rows = np.asarray(array, np.float64).reshape(-1, k)
            if ones:
                rows = np.hstack([rows, np.ones((rows.shape[0], 1))])
            pending[name].append(rows)
            pooled[name] += rows.shape[0]
            if pooled[name] >= POOL_ROWS:
                flush(name)
    for name in wanted:
        flush(name)
    return {n: g for n, g in grams.items() if np.any(g)}


def layer_rows(node: ir.Node, array: np.ndarray) -> np.ndarray | None:
    """A layer's input as the rows its weight multiplies (float64): a plain Conv's patches
    (``CONV_ROWS`` evenly spaced), a MatMul/Gemm input's last axis; None for other layers."""
    geometry = conv_geometry(node)
    if geometry is not None:
        return _patches(np.asarray(array), geometry)
    weight = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if node.op_type not in ("MatMul", "Gemm") or weight is None or weight.ndim != 2:
        return None
    if gram_key(node) is None:
        return None
    trans_b = node.attributes.get("transB")
    k = (
        weight.shape[1]
        if node.op_type == "Gemm" and trans_b and trans_b.as_int()
        else weight.shape[0]
    )
    return np.asarray(array, np.float64).reshape(-1, k)


def cross_grams(
    original: ir.Model,
    changed: ir.Model,
    feeds: Iterable[Mapping[str, Any]],
    layers: Sequence[str],
    providers: Sequence[str] = ("cpu",),
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """For each layer (a node name in both models whose input was changed upstream):
    ([X' 1]^T [X' 1], [X' 1]^T X) summed over the samples, X' its input rows in
    ``changed``, X in ``original`` (same positions). What a refit of the layer needs to
    reproduce the original's output from what really reaches it after upstream changes."""
    found_o = {n.name: n for n in original.graph if n.name in set(layers)}
    found_c = {n.name: n for n in changed.graph if n.name in found_o}
    names = [n for n in layers if n in found_c and found_c[n].inputs[0] is not None]
    sums: dict[str, list[np.ndarray]] = {}
    values_o = activations(original, feeds, {found_o[n].inputs[0].name for n in names}, providers)
    for sample_o, sample_c in zip(
        values_o,
        activations(changed, feeds, {found_c[n].inputs[0].name for n in names}, providers),
        strict=True,
    ):
        for name in names:
            x_o = sample_o.get(found_o[name].inputs[0].name)
            x_c = sample_c.get(found_c[name].inputs[0].name)
            if x_o is None or x_c is None:
                continue
            rows_o, rows_c = layer_rows(found_o[name], x_o), layer_rows(found_c[name], x_c)
            if rows_o is None or rows_c is None or len(rows_o) != len(rows_c):
                continue
            rows_c = np.hstack([rows_c, np.ones((rows_c.shape[0], 1))])
            if name not in sums:
                sums[name] = [rows_c.T @ rows_c, rows_c.T @ rows_o]
            else:
                sums[name][0] += rows_c.T @ rows_c
                sums[name][1] += rows_c.T @ rows_o
    return {name: (a, b) for name, (a, b) in sums.items()}
