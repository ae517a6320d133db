"""Split or scale: how dynamic int8 keeps each input's outlier channels out of its range.

Dynamic int8 puts a whole MatMul input on one scale per run, and a few huge channels
(calib.peaks) leave the ordinary ones a handful of levels. Two cures, both exact in float:

- split: the int8 MatMul reads the input with those channels zeroed and their share is
  computed in float and added (passes/quantize_dynamic.py): accurate, but a Mul, a Gather, a
  small MatMul and an Add per input, which at MiniLM's 16-token sentences cost 0.13 ms
  (1.55x -> 1.39x fp32 speed);
- scale: the channels divided by s = their peak / the largest ordinary channel's peak and the
  weight rows multiplied by s (SmoothQuant on those channels alone): one Mul. Less accurate,
  as each scaled channel's rounding error reaches the output s times larger.

Each input gets the cheaper cure unless its output error, emulated in NumPy on calibration
activations for every MatMul that reads it (DynamicQuantizeLinear's per-run uint8 range,
per-column int8 weights), is over SCALE_ERROR x the split's. On MiniLM (18 channels, 11
inputs) the ratio is 1.2-1.9 after the LayerNorms and 2.2-4.8 after the GELUs: scaling the
7 LayerNorm outputs and splitting the 4 GELU outputs measured held-out cosine 0.9984 and
nearest-neighbour agreement 0.955 at 1.53x fp32 (all split: 0.9986, 0.96, 1.39x; all
scaled: 0.9976, 0.945, 1.54x).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxsqueeze.calib.gram import activations
from onnxsqueeze.calib.peaks import channel_peaks, outlier_channels
from onnxsqueeze.core.graphs import constant_array
from onnxsqueeze.quant.qdq import saturating_u8s8_cpu
from onnxsqueeze.quant.qmath import quantize_per_channel

#: Scale where its emulated output error is at most this many times the split's.
SCALE_ERROR = 2.0
#: Calibration samples the errors are emulated on (held in memory meanwhile).
PLAN_SAMPLES = 16


def find_outliers(
    model: ir.Model,
    feeds: Iterable[Mapping[str, Any]],
    ratio: float,
    reduce_range: bool | None = None,
    providers: Sequence[str] = ("cpu",),
) -> tuple[dict[str, tuple[int, ...]], dict[str, np.ndarray]]:
    """(input -> outlier channels to split, input -> factors to scale by): every input with
    outlier channels is in exactly one of them. ``reduce_range`` None: 7-bit weights where
    the CPU's u8s8 kernels saturate, as quantize-dynamic decides."""
    if reduce_range is None:
        reduce_range = saturating_u8s8_cpu()
    feeds = iter(feeds)
    head = list(itertools.islice(feeds, PLAN_SAMPLES))
    peaks = channel_peaks(model, itertools.chain(head, feeds), providers=providers)
    found = {n: outlier_channels(p, ratio) for n, p in peaks.items()}
    outliers = {n: c for n, c in found.items() if c}
    factors = {n: scale_factors(peaks[n], c) for n, c in outliers.items()}
    errors = emulated_errors(model, head, outliers, factors, reduce_range, providers)
    scaled = {n: factors[n] for n, (split, scale) in errors.items() if scale <= SCALE_ERROR * split}
    return {n: c for n, c in outliers.items() if n not in scaled}, scaled


def describe(
    outliers: Mapping[str, Sequence[int]], scaled: Mapping[str, np.ndarray]
) -> dict[str, Any]:
    """The report's view of a plan."""
    channels = sum(map(len, outliers.values())) + sum(int((f != 1).sum()) for f in scaled.values())
    return {
        "outlier_channels": channels,
        "outlier_inputs": f"{len(outliers)} split, {len(scaled)} scaled",
    }


def scale_factors(peaks: np.ndarray, channels: Sequence[int]) -> np.ndarray:
    """1 for ordinary channels; an outlier's peak over the largest ordinary peak for each
    outlier channel, which brings it into the ordinary range."""
    factors = np.ones(len(peaks), np.float32)
    ordinary = np.delete(peaks, list(channels))
    if ordinary.size and ordinary.max() > 0:
        factors[list(channels)] = np.maximum(peaks[list(channels)] / ordinary.max(), 1.0)
    return factors


def emulated_errors(
    model: ir.Model,
    feeds: Sequence[Mapping[str, Any]],
    outliers: Mapping[str, tuple[int, ...]],
    factors: Mapping[str, np.ndarray],
    reduce_range: bool,
    providers: Sequence[str] = ("cpu",),
) -> dict[str, tuple[float, float]]:
    """Input -> (split's, scale's) squared output error over the squared output, summed over
    the samples and over the MatMuls reading that input."""
    weights = _weights(model, set(outliers))
    sums = {n: np.zeros(3) for n in weights}  # signal, split error, scale error
    for sample in activations(model, feeds, list(weights), providers):
        for name, array in sample.items():
            rows = np.asarray(array, np.float64).reshape(-1, len(factors[name]))
            channels, s = list(outliers[name]), factors[name].astype(np.float64)
            inliers = rows.copy()
            inliers[:, channels] = 0
            for w in weights[name]:
                exact = rows @ w
                kept = w.copy()
                kept[channels] = 0
                split = (
                    _round_trip(inliers) @ _int8(kept, reduce_range)
                    + rows[:, channels] @ w[channels]
                )
                scale = _round_trip(rows / s) @ _int8(w * s[:, None], reduce_range)
                sums[name] += [
                    (exact**2).sum(),
                    ((split - exact) ** 2).sum(),
                    ((scale - exact) ** 2).sum(),
                ]
    return {n: (e[1] / max(e[0], 1e-30), e[2] / max(e[0], 1e-30)) for n, e in sums.items()}


def _weights(model: ir.Model, names: set[str]) -> dict[str, list[np.ndarray]]:
    """Input name -> the [K, N] float64 weights of the main-graph MatMul/Gemm nodes reading it."""
    found: dict[str, list[np.ndarray]] = {}
    for node in model.graph:
        if node.op_type not in ("MatMul", "Gemm") or len(node.inputs) < 2:
            continue
        x, weight = node.inputs[0], constant_array(node.inputs[1])
        if x is None or x.name not in names or weight is None or weight.ndim != 2:
            continue
        trans_b = node.attributes.get("transB")
        if node.op_type == "Gemm" and trans_b is not None and trans_b.as_int():
            weight = weight.T
        found.setdefault(x.name, []).append(np.asarray(weight, np.float64))
    return found


def _round_trip(x: np.ndarray) -> np.ndarray:
    """DynamicQuantizeLinear then back: uint8 over this run's range, which includes 0."""
    low, high = min(float(x.min(initial=0.0)), 0.0), max(float(x.max(initial=0.0)), 0.0)
    step = (high - low) / 255 or 1.0
    zero = np.clip(np.round(-low / step), 0, 255)
    return (np.clip(np.round(x / step) + zero, 0, 255) - zero) * step


def _int8(weight: np.ndarray, reduce_range: bool) -> np.ndarray:
    """The weight as the int8 MatMul sees it: per output column, symmetric."""
    q, params = quantize_per_channel(weight, 1, "int8", reduce_range)
    return q * np.asarray(params.scale, np.float64).reshape(1, -1)
