"""Removing channels from a model: the edits of ``prune.channels``' dependency graph applied.

Producers lose their filters (and bias), BatchNorm and per-channel constants their entries,
depthwise Convs their filters and group, Split/Slice/Reshape their sizes, bounds and shape
entries (a shape Concat several Reshapes share is copied per Reshape first), consumers their
input rows: cut, or re-solved by least squares on their input's Gram matrix (``prune.refit``)
with the removed channels' mean moved into a bias. Annotated shapes follow.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from onnxsqueeze.core.graphs import (
    add_constant,
    all_value_names,
    constant_array,
    drop_if_unused,
    unique_name,
    weight_as_kn,
    weight_from_kn,
)
from onnxsqueeze.prune.channel_graph import ChannelGraph, Edit
from onnxsqueeze.prune.refit import DAMPING, refit_rows

#: Edits in the order they apply: a consumer's refit needs all its outputs.
ORDER = {"in": 0, "out": 1, "depthwise": 2, "param": 3, "split": 4, "slice": 5, "shape": 6}


class Surgery:
    """Apply the edits the removal of ``removed`` channel roots implies. ``grams``: consumer
    node name -> its input's Gram matrix (with a ones column: a bias correction too), for
    the least-squares refit of its kept rows; ``refit`` off: rows are only cut."""

    def __init__(
        self,
        model: ir.Model,
        graph: ChannelGraph,
        removed: set[int],
        grams: Mapping[str, np.ndarray],
        *,
        refit: bool = True,
        damping: float = DAMPING,
    ) -> None:
        self.model, self.graph = model, graph
        self.grams, self.refit, self.damping = grams, refit, damping
        gone = np.array(sorted(removed), dtype=np.int64)
        self.keep = {name: ~np.isin(graph.roots(t.ids), gone) for name, t in graph.tracks.items()}
        #: (node, input index) -> the constant as it is being rewritten
        self.arrays: dict[tuple[ir.Node, int], np.ndarray] = {}
        #: (shared shape Concat, Reshape) -> that Reshape's own copy
        self.copies: dict[tuple[ir.Node, ir.Node], ir.Node] = {}
        #: consumer name -> where its bias correction went (node, input index, scale); None:
        #: refitted without a bias (it has nowhere to go)
        self.refitted: dict[str, tuple[ir.Node, int, float] | None] = {}

    def array(self, node: ir.Node, index: int) -> np.ndarray | None:
        key = (node, index)
        if key not in self.arrays:
            if len(node.inputs) <= index or node.inputs[index] is None:
                return None
            found = constant_array(node.inputs[index])
            if found is None:
                return None
            self.arrays[key] = np.array(found)
        return self.arrays[key]

    def run(self) -> None:
        for edit in sorted(self.graph.edits, key=lambda e: ORDER[e.kind]):
            mask = self.keep[edit.value]
            if mask.all():
                continue
            getattr(self, f"_{edit.kind}")(edit, mask)
        self._write()
        self._reshape()

    # ------------------------------------------------------------ edits
    def _in(self, edit: Edit, mask: np.ndarray) -> None:
        node = edit.node
        w = self.array(node, 1)
        kn = weight_as_kn(node, w)
        rows = np.repeat(mask, kn.shape[0] // len(mask))
        gram = self.grams.get(node.name) if self.refit else None
        if gram is not None and gram.shape[0] in (kn.shape[0], kn.shape[0] + 1):
            bias = self._bias_target(node, kn.shape[1])
            new, delta = refit_rows(kn, gram, rows, with_bias=bias is not None,
                                    damping=self.damping)  # fmt: skip
            self.refitted[node.name] = bias
            if delta is not None and bias is not None:
                target, index, scale = bias
                self.arrays[(target, index)] = (
                    self.array(target, index) + (delta * scale).astype(np.float32)
                ).astype(self.array(target, index).dtype)
        else:
            new = kn[rows]
        shape = list(w.shape)
        axis = _in_axis(node)
        shape[axis] = int(mask.sum()) * (shape[axis] // len(mask))
        self.arrays[(node, 1)] = weight_from_kn(node, new.astype(w.dtype), tuple(shape))

    def _bias_target(self, node: ir.Node, n: int) -> tuple[ir.Node, int, float] | None:
        """Where a consumer's bias correction goes: its own bias (made when absent), or for
        a MatMul the constant of the Add right after it; None: nowhere (no correction)."""
        if node.op_type in ("Conv", "Gemm"):
            if node.op_type == "Gemm":
                alpha = node.attributes.get("alpha")
                beta = node.attributes.get("beta")
                a = alpha.as_float() if alpha is not None else 1.0
                b = beta.as_float() if beta is not None else 1.0
                if b == 0:
                    return None
                scale = a / b
            else:
                scale = 1.0
            c = self.array(node, 2)
            if c is None:
                if len(node.inputs) > 2 and node.inputs[2] is not None:
                    return None  # a bias computed at run time
                self.arrays[(node, 2)] = np.zeros(n, np.float32)
            elif c.size == 1:
                self.arrays[(node, 2)] = np.full(n, c.reshape(-1)[0], c.dtype)
            elif c.shape[-1] != n or c.size != n:
                return None
            return node, 2, scale
        uses = list(node.outputs[0].uses())
        if len(uses) == 1 and uses[0][0].op_type == "Add":
            add, index = uses[0]
            other = 1 - index
            c = self.array(add, other)
            if c is not None and c.size == n and c.shape[-1] == n:
                return add, other, 1.0
        return None

    def _out(self, edit: Edit, mask: np.ndarray) -> None:
        node = edit.node
        w = self.array(node, 1)
        axis = 0 if node.op_type == "Conv" else 1
        if node.op_type == "Gemm":
            trans_b = node.attributes.get("transB")
            axis = 0 if trans_b is not None and trans_b.as_int() else 1
        self.arrays[(node, 1)] = np.compress(mask, w, axis=axis)
        bias = self.array(node, 2)
        if bias is not None and bias.size > 1:
            self.arrays[(node, 2)] = np.compress(mask, bias, axis=bias.ndim - 1)

    def _depthwise(self, edit: Edit, mask: np.ndarray) -> None:
        node = edit.node
        self.arrays[(node, 1)] = np.compress(mask, self.array(node, 1), axis=0)
        bias = self.array(node, 2)
        if bias is not None:
            self.arrays[(node, 2)] = np.compress(mask, bias, axis=0)
        node.attributes["group"] = ir.AttrInt64("group", int(mask.sum()))

    def _param(self, edit: Edit, mask: np.ndarray) -> None:
        array = self.array(edit.node, edit.index)
        self.arrays[(edit.node, edit.index)] = np.compress(mask, array, axis=edit.axis)

    def _split(self, edit: Edit, mask: np.ndarray) -> None:
        node = edit.node
        sizes = np.array([int(self.keep[o.name].sum()) for o in node.outputs], np.int64)
        if node.attributes.get("split") is not None:
            node.attributes["split"] = ir.AttrInt64s("split", sizes.tolist())
            return
        node.attributes.pop("num_outputs", None)
        self.arrays[(node, 1)] = sizes

    def _slice(self, edit: Edit, mask: np.ndarray) -> None:
        node, i = edit.node, edit.index
        c = len(mask)
        starts, ends = self.array(node, 1).copy(), self.array(node, 2).copy()
        lo, hi = (max(0, min(c, int(v) + c if v < 0 else int(v))) for v in (starts[i], ends[i]))
        starts[i], ends[i] = mask[:lo].sum(), mask[:hi].sum()
        self.arrays[(node, 1)], self.arrays[(node, 2)] = starts, ends

    def _shape(self, edit: Edit, mask: np.ndarray) -> None:
        node = edit.node
        if edit.reader is not None and len(node.outputs[0].uses()) > 1:
            node = self._own_concat(node, edit.reader)
        array = self.array(node, edit.index).copy()
        array[edit.axis] = int(mask.sum()) // edit.per
        self.arrays[(node, edit.index)] = array

    def _own_concat(self, concat: ir.Node, reader: ir.Node) -> ir.Node:
        """A copy of a shape Concat that several Reshapes read, for ``reader`` alone (each
        layer's heads are pruned on their own; exporters share one shape among all)."""
        key = (concat, reader)
        if key not in self.copies:
            copy = ir.node("Concat", inputs=list(concat.inputs),
                           attributes={"axis": concat.attributes["axis"].as_int()})  # fmt: skip
            copy.outputs[0].type = concat.outputs[0].type
            copy.outputs[0].shape = concat.outputs[0].shape
            copy.outputs[0].name = f"{concat.outputs[0].name}_{reader.name}"
            copy.name = f"{concat.name}_{reader.name}"
            self.model.graph.insert_before(reader, copy)
            reader.replace_input_with(1, copy.outputs[0])
            self.copies[key] = copy
        return self.copies[key]

    # ------------------------------------------------------------ writing back
    def _write(self) -> None:
        names = all_value_names(self.model)
        graph = self.model.graph
        for (node, index), array in self.arrays.items():
            old = node.inputs[index] if len(node.inputs) > index else None
            if old is not None and constant_array(old) is not None:
                same = constant_array(old)
                if same.shape == array.shape and np.array_equal(same, array):
                    continue
            base = old.name if old is not None and old.name else f"{node.name}_{index}"
            new = add_constant(self.model, graph, np.ascontiguousarray(array),
                               unique_name(names, f"{base}_pruned"), node)  # fmt: skip
            if len(node.inputs) <= index:
                node.resize_inputs(index + 1)
            node.replace_input_with(index, new)
            if old is not None:
                drop_if_unused(graph, old)

    def _reshape(self) -> None:
        """Annotated shapes of the values whose channels went follow them."""
        for name, track in self.graph.tracks.items():
            value, kept = track.value, int(self.keep[name].sum())
            if value.shape is None or len(value.shape) != track.rank or kept == len(track.ids):
                continue
            dims = list(value.shape.dims)
            dims[track.axis] = kept
            value.shape = ir.Shape(dims)


def _in_axis(node: ir.Node) -> int:
    """The axis of a layer's weight that its input rows index."""
    if node.op_type == "Conv":
        return 1
    trans_b = node.attributes.get("transB")
    return 1 if node.op_type == "Gemm" and trans_b is not None and trans_b.as_int() else 0
