"""Which channels can go together: a dependency graph of channels on the ONNX graph.

Torch-Pruning's DepGraph (Fang et al., CVPR 2023) groups the parameters that must be cut
together across a network; this does the same on an ONNX graph, at the level of single
channels. Every output channel of a prunable layer (Conv with group 1, MatMul/Gemm with a
constant 2-D weight) gets an id; the ids travel with the values along their channel axis:

- unchanged through elementwise ops, BatchNormalization/InstanceNormalization, pooling,
  Resize and Pad that leave the channel axis alone, and depthwise Convs (one filter per
  channel: the filter goes with its channel);
- re-placed by Transpose, Reshape/Flatten/Squeeze/Unsqueeze that keep the channel axis whole,
  and reductions over other axes;
- concatenated by Concat on the channel axis, cut by Split/Slice on it;
- tied where two tracked tensors meet elementwise (a residual Add, a squeeze-excitation
  Mul): channel c of one is channel c of the other, so both producers lose it together
  (union-find over ids);
- consumed by the next Conv/MatMul/Gemm, which loses the matching input rows.

Anything else that reads a tracked tensor (a graph output, a Reshape that mixes the channel
axis into other dims, a Softmax or LayerNormalization over it, an unknown or custom op, a
subgraph) blocks the ids it reads, with the reason: removing them would change what that
reader computes. The analysis records every edit removing an id implies (``Edit``, in
``prune.channel_graph``); ``prune.surgery`` applies them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from onnxsqueeze.core.graphs import constant_array, read_elsewhere
from onnxsqueeze.prune.channel_graph import ChannelGraph, Edit, Track

#: Ops that act per element (with broadcasting): channel ids pass, tracked operands tie.
ELEMENTWISE = frozenset(
    {
        "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu", "Where",
        "Clip", "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu",
        "Selu", "Celu", "Softplus", "Softsign", "Erf", "Exp", "Log", "Sqrt", "Abs", "Neg",
        "Identity", "Dropout", "Cast", "Floor", "Ceil", "Round", "Reciprocal", "Sin", "Cos",
        "Gelu", "Mish", "ThresholdedRelu", "Sign", "Equal", "Greater", "Less", "GreaterOrEqual",
        "LessOrEqual", "Not", "And", "Or", "Xor", "Shrink", "IsNaN", "IsInf",
    }
)  # fmt: skip
POOLS = frozenset(
    {"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"}
)
NORMS = frozenset({"BatchNormalization", "InstanceNormalization"})
REDUCES = frozenset(
    {
        "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
        "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare",
    }
)  # fmt: skip


def analyze(model: ir.Model, *, heads: bool = True) -> ChannelGraph:
    """The channel dependency graph of ``model``'s main graph. Shapes must be annotated
    (``core.shapes.inferred_shapes``) for ranks and static dims. ``heads``: follow Reshapes
    that split channels into attention heads (heads pruned whole); else they block."""
    return _Analysis(model, heads).run()


class _Analysis:
    def __init__(self, model: ir.Model, heads: bool = True) -> None:
        self.model = model
        self.heads = heads
        self.g = ChannelGraph()
        self.opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))

    def run(self) -> ChannelGraph:
        g = self.g
        main = self.model.graph
        for node in main:
            if node.name:
                g.nodes[node.name] = node
            if node.domain not in ("", "ai.onnx"):
                self._block_inputs(node, f"custom op {node.op_type}")
                continue
            layer = node.op_type in ("Conv", "MatMul", "Gemm")
            if not layer and not any(self._track(v) is not None for v in node.inputs):
                continue  # nothing of ours passes here
            handler = getattr(self, f"_op_{node.op_type}", None)
            if handler is None:
                if node.op_type in ELEMENTWISE:
                    handler = self._elementwise
                elif node.op_type in POOLS:
                    handler = self._pool
                elif node.op_type in NORMS:
                    handler = self._norm
                elif node.op_type in REDUCES:
                    handler = self._reduce
            if handler is None or handler(node) is False:
                self._block_inputs(node, f"{node.op_type} {node.name}")
        for name, track in list(g.tracks.items()):
            value = track.value
            if value.is_graph_output():
                g.block(track.ids, f"graph output {name}")
            for user, _ in value.uses():
                if user.graph is not main:
                    g.block(track.ids, f"read inside a subgraph or function ({user.op_type})")
        return g

    # ------------------------------------------------------------ helpers
    def _track(self, value: ir.Value | None) -> Track | None:
        return self.g.tracks.get(value.name) if value is not None and value.name else None

    def _set(self, value: ir.Value, axis: int, rank: int, ids: np.ndarray) -> None:
        if value.name:
            self.g.tracks[value.name] = Track(value, axis, rank, ids)

    def _block_inputs(self, node: ir.Node, reason: str) -> None:
        for value in node.inputs:
            track = self._track(value)
            if track is not None:
                self.g.block(track.ids, reason)

    def _rank(self, value: ir.Value | None) -> int | None:
        if value is None:
            return None
        track = self._track(value)
        if track is not None:
            return track.rank
        array = constant_array(value)
        if array is not None:
            return array.ndim
        return len(value.shape) if value.shape is not None else None

    def _dim(self, value: ir.Value, axis: int) -> int | None:
        array = constant_array(value)
        if array is not None:
            return int(array.shape[axis])
        if value.shape is None:
            return None
        d = value.shape[axis]
        return d if isinstance(d, int) else None

    def _ints(self, node: ir.Node, attr: str, index: int) -> list[int] | None:
        """An int list from attribute ``attr``, else from constant input ``index``."""
        a = node.attributes.get(attr)
        if a is not None:
            return list(a.as_ints())
        if len(node.inputs) > index and node.inputs[index] is not None:
            array = constant_array(node.inputs[index])
            return None if array is None else [int(v) for v in array.reshape(-1)]
        return None

    def _attr(self, node: ir.Node, name: str, default: int) -> int:
        a = node.attributes.get(name)
        return a.as_int() if a is not None else default

    def _first_tracked(self, node: ir.Node) -> Track | None:
        """Input 0's track when no other input is tracked (shapes, scales, pads...); None
        otherwise (the caller then blocks them all)."""
        tracks = [self._track(v) for v in node.inputs]
        if not tracks or any(t is not None for t in tracks[1:]):
            return None
        return tracks[0]

    def _pass(self, node: ir.Node, track: Track, axis: int | None = None, rank: int | None = None):
        self._set(node.outputs[0], track.axis if axis is None else axis,
                  track.rank if rank is None else rank, track.ids)  # fmt: skip

    # ------------------------------------------------------------ layers
    def _weight(self, node: ir.Node, index: int = 1) -> np.ndarray | None:
        if len(node.inputs) <= index or node.inputs[index] is None:
            return None
        w = constant_array(node.inputs[index])
        if w is None or w.dtype.kind != "f" or read_elsewhere(node.inputs[index], node):
            return None
        return w

    def _bias_ok(self, node: ir.Node, index: int) -> bool:
        if len(node.inputs) <= index or node.inputs[index] is None:
            return True
        return constant_array(node.inputs[index]) is not None and not read_elsewhere(
            node.inputs[index], node
        )

    def _layer(self, node: ir.Node, k_axis: int, k: int, out_rank: int | None, n: int) -> bool:
        """Consumer of its tracked input on ``k_axis`` (k rows), producer of ``n`` channels on
        the last axis of an ``out_rank`` output (axis 1 for Conv)."""
        g = self.g
        x = node.inputs[0]
        track = self._track(x)
        if any(self._track(v) is not None for v in node.inputs[1:]):
            return False
        if track is not None:
            if track.axis != k_axis or len(track.ids) != k:
                g.block(track.ids, f"{node.op_type} {node.name} reads them on another axis")
            else:
                g.edits.append(Edit("in", node, x.name))
                g.consumers[node.name] = x.name
        bias = 2
        if out_rank is not None and self._bias_ok(node, bias) and node.name:
            out = node.outputs[0]
            axis = 1 if node.op_type == "Conv" else out_rank - 1
            self._set(out, axis, out_rank, g.new(n))
            g.edits.append(Edit("out", node, out.name))
            g.producers[node.name] = out.name
        return True

    def _op_Conv(self, node: ir.Node) -> bool:
        w = self._weight(node)
        if w is None or w.ndim < 3 or self._attr(node, "group", 1) != 1:
            return self._depthwise(node, w)
        return self._layer(node, 1, w.shape[1], w.ndim, w.shape[0])

    def _depthwise(self, node: ir.Node, w: np.ndarray | None) -> bool:
        group = self._attr(node, "group", 1)
        track = self._first_tracked(node)
        if w is None or track is None or group == 1:
            return False
        if w.shape[1] != 1 or w.shape[0] != group or len(track.ids) != group or track.axis != 1:
            return False
        if not self._bias_ok(node, 2):
            return False
        self.g.edits.append(Edit("depthwise", node, node.inputs[0].name))
        self._pass(node, track)
        return True

    def _op_MatMul(self, node: ir.Node) -> bool:
        a, b = (self._track(v) for v in node.inputs[:2])
        if a is not None and b is not None:  # attention: heads on a batch axis of both
            if a.rank != b.rank or a.axis != b.axis or a.axis >= a.rank - 2:
                return False
            if len(a.ids) != len(b.ids):
                return False
            self.g.tie(a.ids, b.ids)
            self._pass(node, a)
            return True
        w = self._weight(node)
        rank = self._rank(node.inputs[0])
        if w is None or w.ndim != 2 or rank is None or rank < 2:
            return False
        if constant_array(node.inputs[0]) is not None:
            return False
        return self._layer(node, rank - 1, w.shape[0], rank, w.shape[1])

    def _op_Gemm(self, node: ir.Node) -> bool:
        w = self._weight(node)
        if w is None or w.ndim != 2 or constant_array(node.inputs[0]) is not None:
            return False
        trans_b = self._attr(node, "transB", 0)
        k, n = (w.shape[1], w.shape[0]) if trans_b else w.shape
        c = constant_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] else None
        if c is not None and c.ndim == 2 and c.shape[0] != 1:
            return self._layer(node, 0 if self._attr(node, "transA", 0) else 1, k, None, n)
        return self._layer(node, 0 if self._attr(node, "transA", 0) else 1, k, 2, n)

    # ------------------------------------------------------------ channel-wise ops
    def _elementwise(self, node: ir.Node) -> bool:
        g = self.g
        inputs = [v for v in node.inputs if v is not None]
        if not inputs:
            return True
        ranks = [self._rank(v) for v in inputs]
        tracks = [self._track(v) for v in inputs]
        tracked = [t for t in tracks if t is not None]
        if not tracked:
            return True
        if any(r is None for r in ranks):
            return False
        out_rank = max(ranks)  # type: ignore[type-var]
        neg = {t.axis - t.rank for t in tracked}
        lengths = {len(t.ids) for t in tracked}
        if len(neg) != 1 or len(lengths) != 1:
            return False
        (a,), (c,) = neg, lengths
        for value, rank_, track in zip(inputs, ranks, tracks, strict=True):
            if track is not None or rank_ < -a:  # type: ignore[operator]
                continue
            d = self._dim(value, a)
            if d == 1:
                continue
            if d != c or constant_array(value) is None:
                return False
            g.edits.append(Edit("param", node, tracked[0].value.name, _index(node, value),
                                rank_ + a))  # type: ignore[operator]  # fmt: skip
        for t in tracked[1:]:
            g.tie(tracked[0].ids, t.ids)
        self._pass(node, tracked[0], out_rank + a, out_rank)
        return not (node.op_type == "Dropout" and len(node.outputs) > 1 and node.outputs[1].uses())

    def _norm(self, node: ir.Node) -> bool:
        track = self._first_tracked(node)
        if track is None or track.axis != 1:
            return False
        for index in range(1, len(node.inputs)):
            value = node.inputs[index]
            array = constant_array(value) if value is not None else None
            if array is None or array.shape != (len(track.ids),):
                return False
            self.g.edits.append(Edit("param", node, node.inputs[0].name, index, 0))
        if any(o.uses() for o in node.outputs[1:]):
            return False
        self._pass(node, track)
        return True

    def _pool(self, node: ir.Node) -> bool:
        track = self._first_tracked(node)
        if track is None or track.axis != 1 or any(o.uses() for o in node.outputs[1:]):
            return False
        self._pass(node, track)
        return True

    def _op_Resize(self, node: ir.Node) -> bool:
        track = self._first_tracked(node)
        if track is None or node.attributes.get("axes") is not None:
            return False
        scale_index, size_index = (1, None) if self.opset < 11 else (2, 3)
        if size_index is not None and len(node.inputs) > size_index and node.inputs[size_index]:
            sizes = self._ints(node, "", size_index)
            if sizes is None or len(sizes) != track.rank:
                return False
            self.g.edits.append(Edit("shape", node, node.inputs[0].name, size_index, track.axis))
        elif len(node.inputs) > scale_index and node.inputs[scale_index] is not None:
            scales = constant_array(node.inputs[scale_index])
            if scales is None or scales.size != track.rank or scales[track.axis] != 1:
                return False
        self._pass(node, track)
        return True

    _op_Upsample = _op_Resize

    def _op_Pad(self, node: ir.Node) -> bool:
        track = self._first_tracked(node)
        if track is None or (len(node.inputs) > 3 and node.inputs[3] is not None):
            return False
        pads = self._ints(node, "pads", 1)
        if pads is None or len(pads) != 2 * track.rank:
            return False
        if pads[track.axis] or pads[track.axis + track.rank]:
            return False
        self._pass(node, track)
        return True

    def _op_Transpose(self, node: ir.Node) -> bool:
        track = self._first_tracked(node)
        if track is None:
            return False
        perm = self._ints(node, "perm", 99) or list(range(track.rank))[::-1]
        self._pass(node, track, perm.index(track.axis))
        return True

    def _op_Concat(self, node: ir.Node) -> bool:
        g = self.g
        tracks = [self._track(v) for v in node.inputs]
        tracked = [t for t in tracks if t is not None]
        rank = tracked[0].rank
        axis = self._attr(node, "axis", 0) % rank
        if any(t.rank != rank or t.axis != tracked[0].axis for t in tracked):
            return False
        if axis != tracked[0].axis:  # channels side by side: concatenated along another axis
            if len(tracked) != len(tracks) or len({len(t.ids) for t in tracked}) != 1:
                return False
            for t in tracked[1:]:
                g.tie(tracked[0].ids, t.ids)
            self._pass(node, tracked[0])
            return True
        parts = []
        for value, track in zip(node.inputs, tracks, strict=True):
            if track is not None:
                parts.append(track.ids)
                continue
            d = self._dim(value, axis)
            if d is None:
                return False
            fresh = g.new(d)
            g.block(fresh, f"Concat {node.name} with a tensor no layer produces")
            parts.append(fresh)
        self._set(node.outputs[0], axis, rank, np.concatenate(parts))
        return True

    def _op_Split(self, node: ir.Node) -> bool:
        track = self._first_tracked(node)
        if track is None:
            return False
        axis = self._attr(node, "axis", 0) % track.rank
        if axis != track.axis:
            for out in node.outputs:
                self._set(out, track.axis, track.rank, track.ids)
            return True
        sizes = self._ints(node, "split", 1)
        c, parts = len(track.ids), len(node.outputs)
        if sizes is None:
            if c % parts:
                return False
            sizes = [c // parts] * parts
        if sum(sizes) != c or len(sizes) != parts:
            return False
        offsets = np.cumsum([0, *sizes])
        for out, lo, hi in zip(node.outputs, offsets[:-1], offsets[1:], strict=True):
            self._set(out, axis, track.rank, track.ids[lo:hi])
        self.g.edits.append(Edit("split", node, node.inputs[0].name))
        return True

    def _op_Slice(self, node: ir.Node) -> bool:
        track = self._first_tracked(node)
        if track is None or self.opset < 10:
            return False
        starts, ends = self._ints(node, "", 1), self._ints(node, "", 2)
        axes = self._ints(node, "", 3) or list(range(len(starts or [])))
        steps = self._ints(node, "", 4) or [1] * len(axes)
        if starts is None or ends is None:
            return False
        axes = [a % track.rank for a in axes]
        if track.axis not in axes:
            self._pass(node, track)
            return True
        i = axes.index(track.axis)
        c = len(track.ids)
        lo, hi = (max(0, min(c, v + c if v < 0 else v)) for v in (starts[i], ends[i]))
        if steps[i] != 1 or hi <= lo:
            return False
        self._set(node.outputs[0], track.axis, track.rank, track.ids[lo:hi])
        self.g.edits.append(Edit("slice", node, node.inputs[0].name, i))
        return True

    def _op_Flatten(self, node: ir.Node) -> bool:
        track = self._first_tracked(node)
        x = node.inputs[0]
        if track is None or x.shape is None:
            return False
        a = self._attr(node, "axis", 1) % max(track.rank, 1)
        span = range(a, track.rank) if track.axis >= a else range(a)
        if any(x.shape[i] != 1 for i in span if i != track.axis):
            return False
        self._pass(node, track, 1 if track.axis >= a else 0, 2)
        return True

    def _op_Reshape(self, node: ir.Node) -> bool:
        track, out = self._first_tracked(node), node.outputs[0]
        if track is None or node.inputs[0].shape is None or out.shape is None:
            return False
        entries = self._shape_entries(node.inputs[1], node)
        if entries is None:
            return False
        before, after = list(node.inputs[0].shape.dims), list(out.shape.dims)
        c = len(track.ids)
        for j, d in enumerate(after):
            if d != c or j >= len(entries):
                continue
            if _squeezed(before[: track.axis]) == _squeezed(after[:j]) and _squeezed(
                before[track.axis + 1 :]
            ) == _squeezed(after[j + 1 :]):
                entry, edit = entries[j]
                if entry == 0 and j == track.axis or entry == -1:
                    pass
                elif entry == c and edit is not None:
                    self.g.edits.append(dataclasses.replace(edit, value=node.inputs[0].name))
                else:
                    return False
                self._pass(node, track, j, len(after))
                return True
        if not self.heads:
            return False
        return self._heads(node, track, before, after, entries)

    def _heads(self, node: ir.Node, track: Track, before: list, after: list, entries) -> bool:
        """A Reshape that splits the channel axis into (heads, head size), or merges them
        back: a head's channels go together (tied), and the heads axis is tracked in their
        place, so attention heads are pruned whole (MiniLM's [B, S, 384] -> [B, S, 12, 32])."""
        a = track.axis
        if len(after) == len(before) + 1:  # split: C -> (H, D)
            h, d = after[a : a + 2] if a + 2 <= len(after) else (None, None)
            if not (isinstance(h, int) and isinstance(d, int) and h * d == len(track.ids)):
                return False
            if before[:a] != after[:a] or before[a + 1 :] != after[a + 2 :]:
                return False
            entry, edit = entries[a] if a < len(entries) else (None, None)
            if entry == h and edit is not None:
                self.g.edits.append(dataclasses.replace(edit, value=node.inputs[0].name, per=d))
            elif entry != -1:
                return False
            if entries[a + 1][0] not in (d, -1) or (entries[a + 1][0] == -1 and entry == -1):
                return False
            heads = track.ids.reshape(h, d)
            for column in range(1, d):
                self.g.tie(heads[:, 0], heads[:, column])
            self._set(node.outputs[0], a, len(after), heads[:, 0].copy())
            return True
        if len(after) == len(before) - 1 and a + 1 < len(before):  # merge: (H, D) -> C
            h, d = before[a], before[a + 1]
            if not (isinstance(d, int) and h == len(track.ids) and after[a] == h * d):
                return False
            if before[:a] != after[:a] or before[a + 2 :] != after[a + 1 :]:
                return False
            entry, edit = entries[a] if a < len(entries) else (None, None)
            fresh = self.g.new(h * d)
            if entry == h * d and edit is not None:
                self.g.edits.append(dataclasses.replace(edit, value=node.outputs[0].name))
            elif entry != -1:
                return False
            self.g.tie(np.repeat(track.ids, d), fresh)
            self._set(node.outputs[0], a, len(after), fresh)
            return True
        return False

    def _shape_entries(self, value: ir.Value | None, reader: ir.Node):
        """A Reshape's target shape as (entry, how to rewrite it) per position: a constant, or
        a Concat of pieces (a runtime batch size next to constant dims, as exporters write
        ``x.view(x.size(0), -1)``); a runtime entry is None. None when unknown."""
        array = constant_array(value) if value is not None else None
        if array is not None:
            return [(int(v), Edit("shape", reader, "", 1, i)) for i, v in enumerate(array)]
        concat = value.producer() if value is not None else None
        if concat is None or concat.op_type != "Concat":
            return None
        if any(user.op_type != "Reshape" or index != 1 for user, index in value.uses()):
            return None  # shared only by Reshapes (each gets its own copy when rewritten)
        entries: list = []
        for index, piece in enumerate(concat.inputs):
            part = constant_array(piece)
            if part is not None:
                entries += [(int(v), Edit("shape", concat, "", index, i, reader=reader))
                            for i, v in enumerate(part.reshape(-1))]  # fmt: skip
                continue
            if piece is None or piece.shape is None or not isinstance(piece.shape[0], int):
                return None
            entries += [(None, None)] * piece.shape[0]
        return entries

    def _op_Squeeze(self, node: ir.Node) -> bool:
        track = self._first_tracked(node)
        axes = self._ints(node, "axes", 1)
        if track is None or axes is None:
            return False
        axes = [a % track.rank for a in axes]
        if track.axis in axes:
            return False
        shift = sum(a < track.axis for a in axes)
        self._pass(node, track, track.axis - shift, track.rank - len(axes))
        return True

    def _op_Unsqueeze(self, node: ir.Node) -> bool:
        track = self._first_tracked(node)
        axes = self._ints(node, "axes", 1)
        if track is None or axes is None:
            return False
        rank = track.rank + len(axes)
        inserted = {a % rank for a in axes}
        kept = [i for i in range(rank) if i not in inserted]
        self._pass(node, track, kept[track.axis], rank)
        return True

    def _reduce(self, node: ir.Node) -> bool:
        track = self._first_tracked(node)
        axes = self._ints(node, "axes", 1)
        if track is None or not axes:
            return False
        axes = [a % track.rank for a in axes]
        if track.axis in axes:
            return False
        if self._attr(node, "keepdims", 1):
            self._pass(node, track)
        else:
            shift = sum(a < track.axis for a in axes)
            self._pass(node, track, track.axis - shift, track.rank - len(axes))
        return True

    def _softmax_like(self, node: ir.Node) -> bool:
        track = self._first_tracked(node)
        if track is None:
            return False
        default = -1 if self.opset >= 13 else 1
        axis = self._attr(node, "axis", default) % track.rank
        if track.axis == axis or (self.opset < 13 and track.axis >= axis):
            return False
        self._pass(node, track)
        return True

    _op_Softmax = _op_LogSoftmax = _softmax_like

    def _op_LayerNormalization(self, node: ir.Node) -> bool:
        track = self._first_tracked(node)
        if track is None:
            return False
        axis = self._attr(node, "axis", -1) % track.rank
        if track.axis >= axis or any(o.uses() for o in node.outputs[1:]):
            return False
        self._pass(node, track)
        return True


def _index(node: ir.Node, value: ir.Value) -> int:
    return next(i for i, v in enumerate(node.inputs) if v is value)


def _squeezed(dims: Sequence) -> list:
    """Dims without the 1s (where a Reshape may add or drop them freely)."""
    return [d for d in dims if d != 1]
