"""Weights stored as int8/int4 codes and expanded to float by plain ONNX ops at load time.

A ``DequantizeLinear`` on a constant is kept by onnxruntime for its QDQ fusions, and when no
integer kernel takes it (a weight-only model: activations float) the CPU dequantizes the
weight on every run (MiniLM int8: 0.35x fp32 speed). ``Cast -> Mul`` of the same codes and
scales computes the same float32 values, ``(q - zero point) * scale``, but every input is a
constant, so onnxruntime's constant folding (and any other runtime's) turns it back into the
float weight when the session is created: the file is 4x (int8) or 8x (int4) smaller and the
model runs at float speed, with float-sized memory at run time.

int4 codes go two per byte: the first half of the flattened codes in the low nibbles, the
second half in the high ones, unpacked with float ops only (Cast, Mul by 1/16, Floor, Sub,
Concat: all exact on integers below 256), so any opset from 6 on can hold them.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import onnx_ir as ir

from onnxsqueeze.core.graphs import GraphLike, add_constant, unique_name

#: The oldest default-domain opset whose Reshape takes its shape as an input.
MIN_OPSET = 6
#: Slice with starts/ends/axes as inputs (a partial last block is sliced off).
SLICE_OPSET = 10


def can_unpack(q: np.ndarray, bits: int) -> bool:
    """int4 codes pair up across the two halves of the flattened weight."""
    return bits == 8 or q.size % 2 == 0


def stored_bytes(q: np.ndarray, bits: int) -> int:
    return q.size if bits == 8 else q.size // 2


class Layout(NamedTuple):
    """How codes are stored and scaled: ``codes`` zero-padded to whole blocks, ``scales``
    broadcasting against ``codes`` viewed as ``view``, and ``trim`` = (axis, length) to slice
    the padding off after scaling."""

    codes: np.ndarray
    scales: np.ndarray
    view: tuple[int, ...] | None
    trim: tuple[int, int] | None


def dq_layout(q: np.ndarray, scales: np.ndarray, attributes: dict) -> Layout:
    """The fold layout of DequantizeLinear(q, scales) with its ``axis`` / ``block_size``."""
    axis = attributes["axis"] % q.ndim
    block = attributes.get("block_size", 0)
    if not block:
        shape = [1] * q.ndim
        shape[axis] = q.shape[axis]
        return Layout(q, scales.reshape(shape), None, None)
    length = q.shape[axis]
    blocks = -(-length // block)
    codes, trim = q, None
    if length % block:  # DequantizeLinear pads the last block implicitly; Mul needs it stored
        pad = [(0, 0)] * q.ndim
        pad[axis] = (0, blocks * block - length)
        codes, trim = np.pad(q, pad), (axis, length)
    view = (*q.shape[:axis], blocks, block, *q.shape[axis + 1 :])
    return Layout(codes, np.expand_dims(scales, axis + 1), view, trim)


class Unpacker:
    """Adds load-time dequantization subgraphs to one model."""

    def __init__(self, model: ir.Model, names: set[str]) -> None:
        self._model = model
        self._names = names

    def dequantized(
        self,
        scope: GraphLike,
        before: ir.Node,
        layout: Layout,
        bits: int,
        base: str,
        shape: tuple[int, ...] | None = None,
        half: bool = False,
    ) -> ir.Value:
        """Float32 value of ``layout``'s codes times scales, padding sliced off, reshaped to
        ``shape`` (default: the unpadded codes'), computed before ``before``; ``half``: cast
        to float16 at the end (the weight of a float16 model)."""
        q = layout.codes
        if not can_unpack(q, bits):
            raise ValueError(f"{q.size} int4 codes cannot be paired into bytes")
        self._scope, self._before, self._base = scope, before, base
        if bits == 8:
            codes = self._op("Cast", [self._const(q.astype(np.int8), "_quantized")], to=1)
        else:
            codes = self._unpack_int4(q)
        if bits == 4 or layout.view is not None:
            viewed = np.array(layout.view or q.shape, np.int64)
            codes = self._op("Reshape", [codes, self._const(viewed, "_view")])
        scale = self._const(np.ascontiguousarray(layout.scales, dtype=np.float32), "_scale")
        out = self._op("Mul", [codes, scale])
        current = tuple(layout.view or q.shape)
        natural = tuple(q.shape)
        if layout.trim is not None:  # back to the padded codes' shape, then the padding off
            axis, length = layout.trim
            bounds = [self._const(np.array([v], np.int64), "_slice") for v in (0, length, axis)]
            out = self._op("Slice", [self._reshape(out, q.shape), *bounds])
            natural = current = (*q.shape[:axis], length, *q.shape[axis + 1 :])
        target = tuple(shape or natural)
        if target != current:
            out = self._reshape(out, target)
        if half:
            out = self._op("Cast", [out], to=int(ir.DataType.FLOAT16))
            out.type = ir.TensorType(ir.DataType.FLOAT16)
        out.shape = ir.Shape(target)
        return out

    def _reshape(self, value: ir.Value, shape: tuple[int, ...]) -> ir.Value:
        return self._op("Reshape", [value, self._const(np.array(shape, np.int64), "_shape")])

    def _unpack_int4(self, q: np.ndarray) -> ir.Value:
        """Flat float codes in [-8, 7] from two-per-byte storage."""
        u = (q.reshape(-1).astype(np.int16) + 8).astype(np.uint8)
        half = u.size // 2
        packed = self._const(u[:half] | (u[half:] << 4), "_int4")
        as_float = self._op("Cast", [packed], to=1)
        sixteenth = self._const(np.array(1 / 16, np.float32), "_sixteenth")
        high = self._op("Floor", [self._op("Mul", [as_float, sixteenth])])
        sixteen = self._const(np.array(16, np.float32), "_sixteen")
        low = self._op("Sub", [as_float, self._op("Mul", [high, sixteen])])
        codes = self._op("Concat", [low, high], axis=0)
        return self._op("Sub", [codes, self._const(np.array(8, np.float32), "_zero_point")])

    def _const(self, array: np.ndarray, suffix: str) -> ir.Value:
        name = unique_name(self._names, self._base + suffix)
        return add_constant(self._model, self._scope, array, name, self._before)

    def _op(self, op_type: str, inputs: list[ir.Value], **attributes) -> ir.Value:
        node = ir.node(op_type, inputs, attributes=attributes)
        out = node.outputs[0]
        out.name = unique_name(self._names, f"{self._base}_{op_type.lower()}")
        out.type = ir.TensorType(ir.DataType.FLOAT)
        self._scope.insert_before(self._before, node)
        return out
