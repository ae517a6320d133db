"""Partial values of shape tensors: what is known of a Shape→Gather→Concat chain.

A shape tensor (int, rank 0 or 1) is tracked as a list of entries, each an ``int`` (known),
a ``str`` (a symbolic dim such as ``batch``: unknown, but equal wherever the same symbol
appears) or ``None`` (unknown). Propagation follows the ops exported models build shapes
with; when every entry of a value is an int, that value is a constant the folder can
materialise. Nothing here rewrites the graph.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from onnxsqueeze.core.graphs import constant_array

Entry = int | str | None


@dataclasses.dataclass
class ShapeValue:
    entries: list[Entry]
    scalar: bool = False

    @property
    def known(self) -> bool:
        return all(isinstance(e, int) for e in self.entries)

    def array(self, dtype: np.dtype) -> np.ndarray:
        data = np.array(self.entries, dtype=dtype)
        return data.reshape(()) if self.scalar else data


_MAX_LEN = 64  # longer int vectors are data, not shapes


def _ints(value: ir.Value | None) -> ShapeValue | None:
    array = constant_array(value)
    if array is None or array.dtype.kind not in "iub" or array.ndim > 1 or array.size > _MAX_LEN:
        return None
    return ShapeValue([int(v) for v in array.reshape(-1)], scalar=array.ndim == 0)


class ShapePropagator:
    """Computes ShapeValues for a scope in order; ``values`` maps value -> ShapeValue."""

    def __init__(self) -> None:
        self.values: dict[ir.Value, ShapeValue] = {}
        self._rules: dict[str, Callable[[ir.Node], ShapeValue | None]] = {
            "Shape": self._shape,
            "Size": self._size,
            "Gather": self._gather,
            "Slice": self._slice,
            "Concat": self._concat,
            "Unsqueeze": self._unsqueeze,
            "Squeeze": self._squeeze,
            "Reshape": self._reshape,
            "Cast": self._cast,
            "Identity": lambda n: self.get(n.inputs[0]),
            "Add": lambda n: self._binary(n, lambda a, b: a + b),
            "Sub": lambda n: self._binary(n, lambda a, b: a - b),
            "Mul": lambda n: self._binary(n, lambda a, b: a * b),
            "Div": lambda n: self._binary(n, lambda a, b: int(a / b) if b else None),
            "Equal": lambda n: self._binary(n, lambda a, b: int(a == b), bool_out=True),
        }

    def get(self, value: ir.Value | None) -> ShapeValue | None:
        if value is None:
            return None
        if value in self.values:
            return self.values[value]
        return _ints(value)

    def visit(self, node: ir.Node) -> None:
        if node.domain not in ("", "ai.onnx") or not node.outputs:
            return
        rule = self._rules.get(node.op_type)
        if rule is None:
            return
        try:
            result = rule(node)
        except (ValueError, IndexError, TypeError, KeyError):
            result = None
        if result is not None and len(result.entries) <= _MAX_LEN:
            self.values[node.outputs[0]] = result

    # ------------------------------------------------------------------ rules

    def _shape(self, node: ir.Node) -> ShapeValue | None:
        source = node.inputs[0]
        if source is None or source.shape is None:
            return None
        dims: list[Entry] = [
            d if isinstance(d, int) else (d.value if d.value else None) for d in source.shape.dims
        ]
        start = node.attributes["start"].as_int() if "start" in node.attributes else 0
        end = node.attributes["end"].as_int() if "end" in node.attributes else len(dims)
        return ShapeValue(dims[slice(start, end)])

    def _size(self, node: ir.Node) -> ShapeValue | None:
        source = node.inputs[0]
        if (
            source is None
            or source.shape is None
            or not all(isinstance(d, int) for d in source.shape.dims)
        ):
            return None
        return ShapeValue([int(np.prod(source.shape.dims))], scalar=True)

    def _gather(self, node: ir.Node) -> ShapeValue | None:
        data, indices = self.get(node.inputs[0]), _ints(node.inputs[1])
        axis = node.attributes["axis"].as_int() if "axis" in node.attributes else 0
        if data is None or indices is None or data.scalar or axis != 0:
            return None
        picked = [data.entries[i] for i in indices.entries]
        return ShapeValue(picked, scalar=indices.scalar)

    def _slice(self, node: ir.Node) -> ShapeValue | None:
        data = self.get(node.inputs[0])
        if data is None or data.scalar:
            return None
        if "starts" in node.attributes:  # opset < 10
            starts = list(node.attributes["starts"].as_ints())
            ends = list(node.attributes["ends"].as_ints())
            axes = list(node.attributes["axes"].as_ints()) if "axes" in node.attributes else [0]
            steps = [1]
        else:
            parts = [_ints(v) if i < len(node.inputs) else None for i, v in enumerate(node.inputs)]
            if parts[1] is None or parts[2] is None:
                return None
            starts, ends = parts[1].entries, parts[2].entries
            axes = parts[3].entries if len(parts) > 3 and parts[3] is not None else [0]
            steps = parts[4].entries if len(parts) > 4 and parts[4] is not None else [1]
        if axes not in ([0], [-1]) or len(starts) != 1:
            return None
        return ShapeValue(data.entries[slice(starts[0], ends[0], steps[0])])

    def _concat(self, node: ir.Node) -> ShapeValue | None:
        axis = node.attributes["axis"].as_int() if "axis" in node.attributes else 0
        parts = [self.get(v) for v in node.inputs]
        if axis not in (0, -1) or any(p is None or p.scalar for p in parts):
            return None
        return ShapeValue([e for p in parts for e in p.entries])

    def _unsqueeze(self, node: ir.Node) -> ShapeValue | None:
        data = self.get(node.inputs[0])
        return ShapeValue(list(data.entries)) if data is not None and data.scalar else None

    def _squeeze(self, node: ir.Node) -> ShapeValue | None:
        data = self.get(node.inputs[0])
        if data is None or data.scalar or len(data.entries) != 1:
            return None
        return ShapeValue(list(data.entries), scalar=True)

    def _reshape(self, node: ir.Node) -> ShapeValue | None:
        """A shape value reshaped to one axis ([1] or [-1]: PyTorch's dynamo exports a size
        so before a Concat) or to a scalar ([]) keeps its entries."""
        data = self.get(node.inputs[0])
        target = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
        if data is None or target is None or target.ndim != 1 or len(target) > 1:
            return None
        if len(target) == 0:
            return ShapeValue(list(data.entries), scalar=True) if len(data.entries) == 1 else None
        if int(target[0]) in (-1, len(data.entries)):
            return ShapeValue(list(data.entries))
        return None

    def _cast(self, node: ir.Node) -> ShapeValue | None:
        to = node.attributes.get("to")
        data = self.get(node.inputs[0])
        if data is None or to is None or to.as_int() not in (6, 7, 9):  # int32, int64, bool
            return None
        if to.as_int() == 9:
            return ShapeValue(
                [bool(e) if isinstance(e, int) else None for e in data.entries], data.scalar
            )
        return ShapeValue(list(data.entries), data.scalar)

    def _binary(
        self, node: ir.Node, op: Callable[[int, int], int | None], bool_out: bool = False
    ) -> ShapeValue | None:
        a, b = self.get(node.inputs[0]), self.get(node.inputs[1])
        if a is None or b is None:
            return None
        n = max(len(a.entries), len(b.entries))
        if len(a.entries) not in (1, n) or len(b.entries) not in (1, n):
            return None
        out: list[Entry] = []
        for i in range(n):
            x = a.entries[i if len(a.entries) > 1 else 0]
            y = b.entries[i if len(b.entries) > 1 else 0]
            if isinstance(x, int) and isinstance(y, int):
                out.append(op(x, y))
            elif bool_out and isinstance(x, str) and x == y:
                out.append(1)  # the same symbol is the same size
            else:
                out.append(None)
        return ShapeValue(out, scalar=a.scalar and b.scalar)
