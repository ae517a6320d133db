"""Quantization arithmetic shared by calibration and the quantization passes.

Follows the ONNX QuantizeLinear definition (y = saturate(round(x / scale) + zero_point),
round half to even), with the range widened to contain 0 so that zero, the padding value of
every Conv and the masked value of attention, is exactly representable.
"""

from __future__ import annotations

import dataclasses

import numpy as np

#: (qmin, qmax) per integer type name.
QRANGES = {
    "uint8": (0, 255),
    "int8": (-128, 127),
    "uint16": (0, 65535),
    "int16": (-32768, 32767),
    "int4": (-8, 7),
    "uint4": (0, 15),
}


@dataclasses.dataclass(frozen=True)
class QParams:
    """Scale and zero point (scalars, or arrays along a channel axis)."""

    scale: np.ndarray
    zero_point: np.ndarray
    dtype: str


def qparams(
    lo: float | np.ndarray, hi: float | np.ndarray, dtype: str = "uint8", symmetric: bool = False
) -> QParams:
    """Scale/zero point mapping [lo, hi] (widened to contain 0) onto ``dtype``'s range.

    Symmetric: zero point at the middle of the type (0 for signed types) and the scale set
    by max(|lo|, |hi|). A zero-width range gets scale 1 so no division by zero follows.
    """
    if dtype not in QRANGES:
        raise ValueError(f"unsupported quantized type {dtype!r} (known: {', '.join(QRANGES)})")
    qmin, qmax = QRANGES[dtype]
    lo = np.minimum(np.asarray(lo, np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, np.float64), 0.0)
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
        raise ValueError("quantization range must be finite")
    if symmetric:
        bound = np.maximum(-lo, hi)
        if qmin < 0:
            scale = bound / min(-qmin, qmax)  # int8: ±127 (-128 unused, as ORT and TensorRT)
            zero = np.zeros_like(scale)
        else:
            scale = 2 * bound / (qmax - qmin)
            zero = np.full_like(scale, (qmax + qmin + 1) // 2)
    else:
        scale = (hi - lo) / (qmax - qmin)
        safe = np.where(scale > 0, scale, 1.0)
        zero = np.clip(np.round(qmin - lo / safe), qmin, qmax)
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    np_dtype = dtype if dtype not in ("int4", "uint4") else ("int8" if qmin < 0 else "uint8")
    return QParams(scale, zero.astype(np_dtype), dtype)


#: How weight scales are chosen: rtn = the block's max |w|; mse = the clip ratio (then a
#: least-squares refit of the scale) that minimises the block's squared error.
ROUNDINGS = ("rtn", "mse")
#: Clip ratios the mse search tries (of the block's max |w|).
CLIP_RATIOS = np.linspace(0.5, 1.0, 26)


def quantize_weight(
    weight: np.ndarray, bits: int, block_size: int = 0, rounding: str = "rtn"
) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric quantization of a [K, N] weight along K, per block of ``block_size``
    rows (0: one block, i.e. per output channel). Returns (q as int8 values in
    [-(2^(bits-1) - 1), 2^(bits-1) - 1], scales [n_blocks, N] float32).

    Symmetric because zero must stay exactly zero and kernels (MLAS, MatMulNBits) are
    fastest without zero points; the rows padding the last block are not stored. ``mse``
    matters at 4 bits, where max-scaling wastes levels on one outlier: on MiniLM int4
    (block 32) it moves embedding cosine from 0.959 to 0.968.
    """
    if weight.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {weight.shape}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"unknown rounding {rounding!r} (known: {', '.join(ROUNDINGS)})")
    k, n = weight.shape
    width = max(1, CHUNK_ELEMENTS // max(k, 1))
    if n > width:  # columns are independent: a few float64 copies of a chunk, not the weight
        parts = [_quantize_columns(weight[:, i : i + width], bits, block_size, rounding)
                 for i in range(0, n, width)]  # fmt: skip
        return np.concatenate([p[0] for p in parts], 1), np.concatenate([p[1] for p in parts], 1)
    return _quantize_columns(weight, bits, block_size, rounding)


#: Elements of a weight quantized at once (the float64 temporaries of a 44 MB weight held
#: a 4 GB model's streaming quantization above 0.5 GB).
CHUNK_ELEMENTS = 1 << 21


def _quantize_columns(
    weight: np.ndarray, bits: int, block_size: int, rounding: str
) -> tuple[np.ndarray, np.ndarray]:
    k, n = weight.shape
    size = block_size or k
    blocks = -(-k // size)
    padded = np.zeros((blocks * size, n), np.float64)
    padded[:k] = weight
    grouped = padded.reshape(blocks, size, n)
    scales = block_scales(grouped, bits, rounding)
    qmax = 2 ** (bits - 1) - 1
    q = np.clip(np.round(grouped / scales[:, None, :].astype(np.float64)), -qmax, qmax)
    return q.reshape(blocks * size, n)[:k].astype(np.int8), scales


def block_scales(grouped: np.ndarray, bits: int, rounding: str = "rtn") -> np.ndarray:
    """Scales [blocks, N] of a [blocks, size, N] weight (float32, never 0)."""
    qmax = 2 ** (bits - 1) - 1
    amax = np.abs(grouped).max(axis=1)
    if rounding != "mse":
        scales = amax / qmax
        return np.where(scales > 0, scales, 1.0).astype(np.float32)
    # Column chunks that stay in cache: the search makes ~80 passes over its chunk (an
    # embedding table has millions of columns).
    out = np.empty(amax.shape, np.float32)
    step = max(1, SEARCH_CHUNK // max(grouped.shape[0] * grouped.shape[1], 1))
    for start in range(0, grouped.shape[2], step):
        part = grouped[:, :, start : start + step].astype(np.float32)
        out[:, start : start + step] = _mse_scales(part, amax[:, start : start + step], qmax)
    return out


#: Elements of a weight the mse search works on at once.
SEARCH_CHUNK = 1 << 16


def _mse_scales(grouped: np.ndarray, amax: np.ndarray, qmax: int) -> np.ndarray:
    """Per (block, column): the clip ratio, or its least-squares refit, with the least
    squared error; max scaling (ratio 1) is a candidate, so this never loses to rtn."""
    amax = amax.astype(np.float32)
    scales = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
    best = np.full(amax.shape, np.inf, np.float32)

    def consider(scale: np.ndarray, q: np.ndarray) -> None:
        nonlocal best, scales
        err = np.square(q * scale[:, None, :] - grouped).sum(axis=1)
        better = err < best
        best = np.where(better, err, best)
        scales = np.where(better, scale, scales)

    for ratio in CLIP_RATIOS[::-1]:
        trial = np.where(amax > 0, amax * np.float32(ratio / qmax), 1.0).astype(np.float32)
        q = np.clip(np.rint(grouped / trial[:, None, :]), -qmax, qmax)
        consider(trial, q)
        qq = (q * q).sum(axis=1)
        refit = np.where(qq > 0, (q * grouped).sum(axis=1) / np.maximum(qq, 1e-30), trial)
        refit = np.where(refit > 0, refit, 1.0).astype(np.float32)
        consider(refit, np.clip(np.rint(grouped / refit[:, None, :]), -qmax, qmax))
    return scales


def dequantize_weight(q: np.ndarray, scales: np.ndarray, block_size: int = 0) -> np.ndarray:
    """Float weight the quantized one stands for (the reference tests compare against)."""
    size = block_size or q.shape[0]
    rows = np.repeat(scales, size, axis=0)[: q.shape[0]]
    return (q.astype(np.float32) * rows).astype(np.float32)


def pack_matmul_nbits(q: np.ndarray, block_size: int, bits: int = 4) -> np.ndarray:
    """onnxruntime's MatMulNBits layout: [N, n_blocks, block_size * bits / 8] uint8 of W^T
    (see ``pack_rows``); the rows padding the last block hold the zero point."""
    k, n = q.shape
    blocks = -(-k // block_size)
    padded = np.zeros((blocks * block_size, n), np.int8)
    padded[:k] = q
    return pack_rows(padded.T.reshape(n, blocks, block_size), bits)


def pack_rows(q: np.ndarray, bits: int) -> np.ndarray:
    """onnxruntime's n-bit storage of signed values along the last axis: offset by
    2^(bits-1) (its default zero point) into uint8; 4 bits go two per byte, low nibble
    first (MatMulNBits, GatherBlockQuantized)."""
    u = (q.astype(np.int16) + (1 << (bits - 1))).astype(np.uint8)
    if bits == 8:
        return np.ascontiguousarray(u)
    return np.ascontiguousarray(u[..., 0::2] | (u[..., 1::2] << 4))


def quantize_per_channel(
    weight: np.ndarray, axis: int | None, dtype: str = "int8", reduce_range: bool = False
) -> tuple[np.ndarray, QParams]:
    """Symmetric weight quantization, one scale per slice along ``axis`` (None: per tensor).

    ``reduce_range`` keeps int8 weights in [-63, 63] (7 bits): on AVX2 without VNNI the u8 x s8
    kernels add pairs of products in int16 (VPMADDUBSW) and full-range weights can saturate.
    """
    w = np.asarray(weight, np.float64)
    if axis is None:
        bound = np.abs(w).max(initial=0.0)
    else:
        axis = axis % w.ndim
        others = tuple(i for i in range(w.ndim) if i != axis)
        bound = np.abs(w).max(axis=others, initial=0.0)
    qmin, qmax = QRANGES[dtype]
    limit = min(-qmin, qmax) if qmin < 0 else (qmax - qmin) // 2
    if reduce_range:
        limit = limit // 2
    scale = np.where(bound > 0, bound / limit, 1.0).astype(np.float32)
    shaped = scale if axis is None else np.expand_dims(scale, others)
    q = np.clip(np.round(w / shaped.astype(np.float64)), -limit, limit)
    zero = np.zeros_like(scale, dtype=np.int8 if qmin < 0 else np.uint8)
    if qmin >= 0:  # unsigned weights: zero point at the middle of the type
        zero = np.full_like(scale, (qmax + qmin + 1) // 2, dtype=np.uint8)
        q = q + zero if axis is None else q + np.expand_dims(zero, others)
    np_dtype = {"int8": np.int8, "uint8": np.uint8, "int16": np.int16, "uint16": np.uint16}[dtype]
    return q.astype(np_dtype), QParams(scale, zero.astype(np_dtype), dtype)


def quantize_bias(bias: np.ndarray, scale: np.ndarray) -> np.ndarray | None:
    """int32 bias on the accumulator's scale (input scale x weight scale), as QLinear kernels
    add it; None when a value would not fit in int32 (the bias then stays float)."""
    q = np.round(np.asarray(bias, np.float64) / np.asarray(scale, np.float64))
    if np.any(np.abs(q) > 2**31 - 1):
        return None
    return q.astype(np.int32)
