"""Several calibration samples in one onnxruntime run, where that gives the same statistics.

One run over a stack of samples (concatenated along axis 0) costs much less than a run per
sample when samples are small: fewer kernel calls, larger GEMMs, and one observer update per
tensor instead of one per sample. Min/max and histograms only count values, so they do not
care which run a value came from. Stacking is valid only where the model treats axis 0 as
independent samples, which an export with a hard-coded batch of 1 or a Reshape across the
batch does not; so the collector checks it once on two samples: every calibrated tensor's
extremes and every model output must be the same stacked as one sample at a time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

#: Activation bytes one stacked run may hold (the model's tensors for all its samples).
STACK_BYTES = 256 << 20
#: At most this many samples per run: beyond it runs are as efficient as they get (MiniLM,
#: 128 sentences: 8, 16 and 32 per run take the same time), and a calibration of 16 samples
#: then holds as much as one of 10,000 (peak memory stays flat in the sample count).
MAX_STACK = 16

#: Extremes that agree this closely (relative to the tensor's magnitude) are the same
#: values computed in a different order: a batch of 2 takes other GEMM kernels than a batch
#: of 1 (measured on pairs of corpus samples: at most 5.5e-7 on PP-OCR det, 2e-7 on MiniLM,
#: 0 on PP-OCR cls). Ill-conditioned ops amplify that, and then stacking is refused: magika's
#: LayerNorm of near-constant rows moves by 2e-4 to 1.6e-3 stacked (its sums of squares by
#: 0.5 % over 256 samples), which shifts a 99.999th percentile by 10+ bins of a 2048-bin
#: histogram. The bound sits well below a bin (1/4096 of the range) and well above the
#: reordering noise, so statistics stacked are those of one run per sample to within a bin.
RTOL = 1e-5

Feed = Mapping[str, Any]


def signature(feed: Feed) -> tuple | None:
    """What samples must share to stack: input names, dtypes and every dim but the first."""
    items = []
    for name in sorted(feed):
        array = feed[name]
        if not isinstance(array, np.ndarray) or array.ndim == 0:
            return None
        items.append((name, array.dtype.str, array.shape[1:]))
    return tuple(items)


def batch_axis_is_free(model: ir.Model, names: Sequence[str]) -> bool:
    """Every fed input leaves its first dim open (a symbol or unknown), as a batch is."""
    inputs = {v.name: v for v in model.graph.inputs}
    for name in names:
        value = inputs.get(name)
        if value is None or value.shape is None:
            continue
        first = value.shape[0] if len(value.shape) else 1
        if isinstance(first, int) and first >= 0:  # exporters write -1 for "any"
            return False
    return True


def stack(feeds: Sequence[Feed]) -> dict[str, np.ndarray]:
    return {name: np.concatenate([f[name] for f in feeds], axis=0) for name in feeds[0]}


def stack_size(sample_bytes: int, exposed_bytes: int, max_exposed_bytes: int) -> int:
    """Samples per run: bounded by STACK_BYTES of activations, by the exposure bound of one
    run, and by MAX_STACK."""
    by_activations = STACK_BYTES // max(sample_bytes, 1)
    by_exposure = max_exposed_bytes // max(exposed_bytes, 1)
    return int(max(1, min(MAX_STACK, by_activations, by_exposure)))


def extremes(array: Any) -> tuple[float, float]:
    """Finite min and max of a tensor ((inf, -inf) when it has none)."""
    values = np.asarray(array, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    if not values.size:
        return math.inf, -math.inf
    return float(values.min()), float(values.max())


def disagreement(
    singles: Sequence[tuple[dict[str, tuple[float, float]], dict[str, Any]]],
    stacked: tuple[dict[str, tuple[float, float]], dict[str, Any]],
) -> str | None:
    """Why the stacked run's statistics differ from the single runs', or None.

    Each run is (extremes by tensor, model outputs by name).
    """
    ranges, outputs = stacked
    for name, (lo, hi) in ranges.items():
        single_lo = min(s[0][name][0] for s in singles)
        single_hi = max(s[0][name][1] for s in singles)
        magnitude = max(
            [abs(v) for v in (lo, hi, single_lo, single_hi) if math.isfinite(v)], default=0.0
        )
        if not (_close(lo, single_lo, magnitude) and _close(hi, single_hi, magnitude)):
            return f"tensor '{name}' ranges [{lo:.6g}, {hi:.6g}] stacked, [{single_lo:.6g}, {single_hi:.6g}] alone"
    for name, value in outputs.items():
        parts = [s[1][name] for s in singles]
        if not all(isinstance(p, np.ndarray) and p.ndim for p in (value, *parts)):
            return f"output '{name}' is not a tensor with a batch axis"
        joined = np.concatenate(parts, axis=0)
        if joined.shape != value.shape:
            return f"output '{name}' is {list(value.shape)} stacked, {list(joined.shape)} joined"
        if joined.dtype.kind in "fc":
            scale = float(np.abs(joined[np.isfinite(joined)]).max(initial=0.0))
            if not np.allclose(value, joined, rtol=RTOL, atol=RTOL * scale, equal_nan=True):
                return f"output '{name}' differs stacked"
        elif not np.array_equal(value, joined):
            return f"output '{name}' differs stacked"
    return None


def _close(a: float, b: float, magnitude: float) -> bool:
    if not (math.isfinite(a) and math.isfinite(b)):
        return a == b
    return abs(a - b) <= RTOL * magnitude
