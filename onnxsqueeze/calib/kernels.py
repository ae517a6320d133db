"""Numba kernels behind the observers: one pass over a flat view, no temporary arrays.

Histograms live on a canonical grid: B bins over [-t, t) where t is a power of two strictly
above every finite |x| seen. Bin of x is floor(x * B / 2t) + B/2, exact (a product by a
power of two), so the histogram of a data set does not depend on how it was split into
batches, and doubling t merges bins 2k, 2k+1 exactly (no count is lost or moved).

Nothing here imports onnx or onnx_ir: the kernels are plain numeric code. Numba itself is
imported when a kernel first runs (``njit`` below): importing it costs 0.2 s (with llvmlite),
which most command-line runs, that calibrate nothing, should not pay.
"""

from __future__ import annotations

import functools
import math
import os
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

#: Kernels to compile, in definition order (callees before their jitted callers).
_KERNELS: dict[str, dict[str, Any]] = {}
_COMPILING = threading.Lock()  # the entropy search runs kernels from several threads


def njit(**options: Any) -> Callable[[Callable], Callable]:
    """``numba.njit(**options)``, applied the first time any kernel of this module runs:
    then every kernel is compiled (from numba's on-disk cache) and replaces its stand-in in
    the module, so jitted callers find jitted callees and later calls go straight to the
    compiled code."""

    def mark(function: Callable) -> Callable:
        _KERNELS[function.__name__] = options

        @functools.wraps(function)
        def stand_in(*args: Any) -> Any:
            _compile()
            return globals()[function.__name__](*args)

        stand_in.py_func = function  # type: ignore[attr-defined]
        return stand_in

    return mark


def cache_dir() -> str:
    """Where numba's compiled kernels are cached: the user's cache folder, never the installed
    package (numba's default is a ``__pycache__`` beside this file; a later ``pip install -e``
    leaves that folder behind in site-packages, where Python imports it as an empty namespace
    package that shadows the editable install)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "onnxsqueeze", "numba")


def _compile() -> None:
    import numba  # heavy: see the module docstring

    if not numba.config.CACHE_DIR:  # the user's NUMBA_CACHE_DIR wins
        numba.config.CACHE_DIR = cache_dir()
    numba_njit = numba.njit
    module = globals()
    with _COMPILING:
        for name, options in _KERNELS.items():
            if not hasattr(module[name], "signatures"):  # still the stand-in
                module[name] = numba_njit(**options)(module[name].py_func)


#: Indices into the stats vector that ``extremes`` fills.
MIN, MAX, NAN, POS_INF, NEG_INF, FINITE = range(6)
N_STATS = 6


#: Elements per block in ``count``: its index buffer stays in L1 cache.
BLOCK = 2048
#: ``count`` keeps 32-bit local counts and flushes them before they could overflow.
FLUSH = 1 << 30
#: float32 bin arithmetic is exact only while the grid's scale is a normal float32.
_F32_SCALES = (2.0**-125, 2.0**126)


def extremes(flat: np.ndarray, stats: np.ndarray) -> None:
    """Finite min/max and non-finite counts of ``flat`` into ``stats`` (MIN..FINITE).

    NumPy's min and max are SIMD loops (about 0.2 ns per value each here, against 1.5 for a
    select-based loop, which LLVM does not vectorise without fast-math). They propagate NaN
    and return inf, so a finite answer from both proves every value finite; anything else
    takes the exact count in ``minmax``.
    """
    if flat.size:
        lo, hi = flat.min(), flat.max()
        if math.isfinite(lo) and math.isfinite(hi):
            stats[MIN], stats[MAX] = lo, hi
            stats[NAN] = stats[POS_INF] = stats[NEG_INF] = 0
            stats[FINITE] = flat.size
            return
    minmax(flat, stats)


def count(flat: np.ndarray, counts: np.ndarray, t: float) -> None:
    """Add the histogram counts of the values of ``flat`` with |x| < t (NaN, inf and
    anything beyond are left out: the caller grows t over the finite extremes first).

    On float32 data the bin arithmetic runs in float32 (eight values per AVX2 instruction
    instead of four): x * bins / 2t is a product by a power of two, so it is exact whenever
    that scale is a normal float32, and floor() of it is the same bin float64 would give.
    """
    scale = counts.shape[0] / (2.0 * t)
    dtype = flat.dtype if _F32_SCALES[0] < scale < _F32_SCALES[1] else np.float64
    half = counts.shape[0] // 2
    with np.errstate(over="ignore"):  # t = 2**128 is inf in float32: still right for float32 data
        params = np.array([scale, t, half, half - 1], dtype)
    _count(flat, counts, params)


@njit(cache=True, nogil=True)
def _count(flat, counts, params):  # pragma: no cover - compiled
    """``count``'s loop. Per block of BLOCK values, a branch-free loop (vectorised) turns
    values into bins, anything not finite-and-inside (|NaN| < t and |inf| < t are false)
    into a spare bin; a second loop increments two interleaved sets of 32-bit local counts,
    so runs of one bin (ReLU zeros) do not wait on their own last store.

    A tiny negative x whose scaled value underflows to -0 would floor into bin ``half``; it
    is put back into ``half - 1``.
    """
    bins = counts.shape[0]
    scale, t, half, below = params[0], params[1], params[2], params[3]
    zero = scale - scale
    stride = bins + 1
    spare = np.int32(bins)
    index = np.empty(BLOCK, np.int32)
    local = np.zeros(2 * stride, np.uint32)
    n = flat.shape[0]
    pending = 0
    for start in range(0, n, BLOCK):
        size = min(BLOCK, n - start)
        for j in range(size):
            x = flat[start + j] + zero  # float64 parameters promote float32 data
            k = np.floor(x * scale) + half  # small integers: exact in float32
            k = min(k, below) if x < 0 else k
            index[j] = np.int32(k) if abs(x) < t else spare
        j = 0
        while j + 1 < size:
            local[index[j]] += np.uint32(1)
            local[stride + index[j + 1]] += np.uint32(1)
            j += 2
        if j < size:
            local[index[j]] += np.uint32(1)
        pending += size
        if pending >= FLUSH:
            for j in range(bins):
                counts[j] += local[j] + local[stride + j]
                local[j] = 0
                local[stride + j] = 0
            pending = 0
    for j in range(bins):
        counts[j] += local[j] + local[stride + j]


@njit(cache=True, nogil=True)
def minmax(flat, stats):  # pragma: no cover - compiled
    """Finite min/max and exact NaN/+inf/-inf counts, for data that holds non-finite values
    (``extremes`` takes the fast path otherwise)."""
    lo = math.inf
    hi = -math.inf
    misses = 0
    n = flat.shape[0]
    for i in range(n):
        x = float(flat[i])
        finite = abs(x) < math.inf
        lo = min(lo, x if finite else lo)
        hi = max(hi, x if finite else hi)
        misses += 0 if finite else 1
    nan = 0
    pos_inf = 0
    if misses:
        for i in range(n):
            x = float(flat[i])
            if x != x:
                nan += 1
            elif x == math.inf:
                pos_inf += 1
    stats[MIN] = lo
    stats[MAX] = hi
    stats[NAN] = nan
    stats[POS_INF] = pos_inf
    stats[NEG_INF] = misses - nan - pos_inf
    stats[FINITE] = n - misses


@njit(cache=True, nogil=True)
def regrid(counts, factor):  # pragma: no cover - compiled
    """Counts of the same data on a grid ``factor`` (a power of two) times wider."""
    bins = counts.shape[0]
    half = bins // 2
    out = np.zeros_like(counts)
    for j in range(bins):
        if counts[j]:
            out[(j - half) // factor + half] += counts[j]
    return out


@njit(cache=True, nogil=True)
def minmax_per_channel(view, lo, hi):  # pragma: no cover - compiled
    """Running min/max per channel of a (outer, channels, inner) view; NaN/Inf skipped."""
    outer, channels, inner = view.shape
    for a in range(outer):
        for c in range(channels):
            for b in range(inner):
                x = float(view[a, c, b])
                if x != x or x == math.inf or x == -math.inf:
                    continue
                if x < lo[c]:
                    lo[c] = x
                if x > hi[c]:
                    hi[c] = x


@njit(cache=True, nogil=True, inline="always")
def _reference_bin(hist, start, j, size, left, right):  # pragma: no cover - compiled
    """Bin j of P, the candidate's slice with the outliers folded into its end bins."""
    value = hist[start + j]
    if j == 0:
        value += left
    if j == size - 1:
        value += right
    return value


@njit(cache=True, nogil=True)
def kl_divergences(hist, quantized_bins):  # pragma: no cover - compiled
    """KL(P || Q) for every candidate threshold of the TensorRT entropy calibration.

    ``hist`` is a signed histogram with an even bin count whose middle edge is 0. Candidate
    i keeps bins [mid - i, mid + i + 1) (outliers folded into the end bins) as P, and Q is
    P's slice merged into ``quantized_bins`` bins and spread evenly over the bins where P is
    non-zero. Both are smoothed (zeros get eps = 1e-4, taken evenly off the non-zero
    entries, as TensorRT and MXNet do), normalised and compared. Returns one divergence per
    i in [quantized_bins // 2, bins // 2]; inf where smoothing is impossible.

    Smoothing moves no mass (eps * zeros = take * nonzeros), so the sums are known and each
    candidate costs two passes over its slice with no allocation.
    """
    eps = 1e-4
    bins = hist.shape[0]
    mid = bins // 2
    first = quantized_bins // 2
    out = np.empty(mid - first + 1)
    prefix = np.zeros(bins + 1)
    for j in range(bins):
        prefix[j + 1] = prefix[j] + hist[j]
    total_all = prefix[bins]
    amount = np.empty(quantized_bins)
    nonzero = np.empty(quantized_bins, np.int64)
    for i in range(first, mid + 1):
        start = mid - i
        stop = min(mid + i + 1, bins)
        size = stop - start
        merged = size // quantized_bins
        left = prefix[start]
        right = total_all - prefix[stop]
        p_zeros = 0
        p_min = math.inf
        for k in range(quantized_bins):
            lo = k * merged
            hi = size if k == quantized_bins - 1 else lo + merged
            amount[k] = prefix[start + hi] - prefix[start + lo]
            count = 0
            for j in range(lo, hi):
                pj = _reference_bin(hist, start, j, size, left, right)
                if pj != 0:
                    count += 1
                    p_min = min(p_min, pj)
            nonzero[k] = count
            p_zeros += (hi - lo) - count
        p_nonzero = size - p_zeros
        q_zeros = p_zeros
        q_min = math.inf
        for k in range(quantized_bins):
            if nonzero[k]:
                share = amount[k] / nonzero[k]
                if share == 0:
                    q_zeros += nonzero[k]
                else:
                    q_min = min(q_min, share)
        q_nonzero = size - q_zeros
        if p_nonzero == 0 or q_nonzero == 0:
            out[i - first] = math.inf
            continue
        p_take = eps * p_zeros / p_nonzero
        q_take = eps * q_zeros / q_nonzero
        if p_min - p_take <= 0 or q_min - q_take <= 0:
            out[i - first] = math.inf
            continue
        p_sum = total_all
        q_sum = 0.0
        for k in range(quantized_bins):
            if nonzero[k]:
                q_sum += amount[k]
        div = 0.0
        for k in range(quantized_bins):
            lo = k * merged
            hi = size if k == quantized_bins - 1 else lo + merged
            share = amount[k] / nonzero[k] if nonzero[k] else 0.0
            for j in range(lo, hi):
                pj = _reference_bin(hist, start, j, size, left, right)
                if pj != 0:
                    a = (pj - p_take) / p_sum
                    qj = share - q_take if share != 0 else eps
                else:
                    a = eps / p_sum
                    qj = eps
                div += a * math.log(a / (qj / q_sum))
        out[i - first] = div
    return out


@njit(cache=True, nogil=True)
def quantization_mse(hist, t, lo, hi, levels):  # pragma: no cover - compiled
    """Expected squared error of quantizing the histogram's data to ``levels`` steps on
    [lo, hi] (values outside clip), taking each bin's count at its centre."""
    bins = hist.shape[0]
    width = 2.0 * t / bins
    step = (hi - lo) / (levels - 1)
    if step <= 0:
        return math.inf
    err = 0.0
    for j in range(bins):
        c = hist[j]
        if c == 0:
            continue
        x = -t + (j + 0.5) * width
        y = min(max(x, lo), hi)
        y = lo + round((y - lo) / step) * step
        err += c * (x - y) * (x - y)
    return err
