"""Per-channel peaks of the activations that feed constant MatMul/Gemm weights, and the
outlier channels among them.

Dynamic int8 quantizes each MatMul input on one scale per run. Transformer activations carry
a few channels far larger than the rest (MiniLM: after the attention block's LayerNorm and
after GELU, 1-3 channels at 6-20x the median channel's peak), and that one scale then leaves
the ordinary channels a handful of levels. Computing those channels' share in float (see
passes/quantize_dynamic.py) restores the resolution at the cost of a small float MatMul.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxsqueeze.calib.gram import CONV_MARK, activations, weighted_inputs

#: A channel whose peak is this many times the median channel's is an outlier. Measured on
#: MiniLM (32 calibration sentences, 200 held out, budget cosine >= 0.997): at 6x, 18
#: channels, mean cosine 0.9936 -> 0.9986, nearest-neighbour agreement 0.875 -> 0.96, speed
#: (compare_latency) 1.60x -> 1.38x fp32; at 9x, 13 channels, 0.9982, 0.935, 1.44x.
OUTLIER_RATIO = 6.0
#: At most this many float channels per activation: more than a few are not outliers but a
#: wide distribution, and the float MatMul would stop being small.
MAX_OUTLIERS = 8


def channel_peaks(
    model: ir.Model,
    feeds: Iterable[Mapping[str, Any]],
    names: Sequence[str] | None = None,
    providers: Sequence[str] = ("cpu",),
) -> dict[str, np.ndarray]:
    """Max |x| over the samples of each channel (last axis) of each main-graph activation
    in ``names`` (default: every MatMul/Gemm weight's input)."""
    wanted = {n: k for n, k in weighted_inputs(model).items() if CONV_MARK not in n}
    if names is not None:
        wanted = {n: k for n, k in wanted.items() if n in set(names)}
    if not wanted:
        return {}
    peaks = {n: np.zeros(k) for n, k in wanted.items()}
    for values in activations(model, feeds, wanted, providers):
        for name, array in values.items():
            rows = np.abs(np.asarray(array, np.float32).reshape(-1, wanted[name]))
            if rows.size:
                np.maximum(peaks[name], np.nanmax(rows, axis=0), out=peaks[name])
    return {n: p for n, p in peaks.items() if np.any(p)}


def outlier_channels(
    peaks: np.ndarray, ratio: float = OUTLIER_RATIO, most: int = MAX_OUTLIERS
) -> tuple[int, ...]:
    """Channels whose peak exceeds ``ratio`` x the median channel's; none when more than
    ``most`` do (splitting some of them would leave the range as wide as before)."""
    median = float(np.median(peaks))
    if not np.isfinite(median) or median <= 0:
        return ()
    found = np.flatnonzero(peaks > ratio * median)
    return tuple(int(i) for i in found) if len(found) <= most else ()
