"""Observers: constant-size statistics of one tensor, updated batch by batch.

Each has ``update(array)``, ``merge(other)``, ``range(...)``, ``qparams(...)`` and a
``state()``/``from_state()`` pair for the calibration cache. Memory is a few scalars
(min/max) or one fixed-size histogram, whatever the number of samples, which is what lets
onnxruntime's calibrators' 11-154 MB per sample become a constant here.

Non-finite values (the -inf of attention masks, a NaN from a broken input) are counted, not
binned; a range is computed from the finite values, and ``nonfinite`` tells the caller so a
report can name the tensor. A tensor with no finite value raises CalibrationError.
"""

from __future__ import annotations

import abc
import math
from typing import Any, ClassVar

import numpy as np

from onnxsqueeze.calib import kernels
from onnxsqueeze.core.errors import CalibrationError
from onnxsqueeze.quant.qmath import QParams, qparams

#: Calibration methods a histogram answers (minmax needs no histogram).
HISTOGRAM_METHODS = ("percentile", "entropy", "mse")
METHODS = ("minmax", *HISTOGRAM_METHODS)
#: 8192 bins over [-t, t) with t < 2 max|x|: a bin is narrower than onnxruntime's (2048 bins
#: of |x| up to max|x|), so a percentile lands within one of its bins.
DEFAULT_BINS = 8192


def _flat(array: Any) -> np.ndarray:
    a = np.asarray(array)
    if a.dtype not in (np.float32, np.float64):
        a = a.astype(np.float32)
    return a.reshape(-1)


def _power_of_two_above(value: float) -> float:
    """Smallest power of two strictly greater than ``value`` (> 0)."""
    if value <= 0:
        return math.ldexp(1.0, -126)
    _, exponent = math.frexp(value)  # value = m * 2**e with 0.5 <= m < 1
    return math.ldexp(1.0, exponent)


class Observer(abc.ABC):
    """Base: the counters every observer keeps."""

    kind: ClassVar[str] = ""

    def __init__(self) -> None:
        self.lo = math.inf
        self.hi = -math.inf
        self.finite = 0
        self.nan = 0
        self.pos_inf = 0
        self.neg_inf = 0
        self.batches = 0

    @property
    def nonfinite(self) -> int:
        return self.nan + self.pos_inf + self.neg_inf

    def _merge_counters(self, other: Observer) -> None:
        if type(other) is not type(self):
            raise CalibrationError(f"cannot merge a {other.kind} observer into a {self.kind} one")
        self.lo, self.hi = min(self.lo, other.lo), max(self.hi, other.hi)
        self.finite += other.finite
        self.nan += other.nan
        self.pos_inf += other.pos_inf
        self.neg_inf += other.neg_inf
        self.batches += other.batches

    def _check(self, name: str = "tensor") -> None:
        if self.finite == 0:
            seen = (
                f"{self.nan} NaN, {self.pos_inf} +inf, {self.neg_inf} -inf"
                if self.nonfinite
                else "no data"
            )
            raise CalibrationError(f"{name}: no finite value to calibrate on ({seen})")

    @abc.abstractmethod
    def update(self, array: Any) -> None:
        """Fold one batch of values in."""

    @abc.abstractmethod
    def range(self, method: str = "minmax", **options: Any) -> tuple[Any, Any]:
        """The calibrated (lo, hi)."""

    def _count_nonfinite(self, stats: np.ndarray) -> int:
        """Add a kernel's NaN/inf counts; return how many finite values it saw."""
        self.nan += int(stats[kernels.NAN])
        self.pos_inf += int(stats[kernels.POS_INF])
        self.neg_inf += int(stats[kernels.NEG_INF])
        return int(stats[kernels.FINITE])

    def qparams(
        self, dtype: str = "uint8", symmetric: bool = False, method: str = "minmax", **options: Any
    ) -> QParams:
        lo, hi = self.range(method, symmetric=symmetric, **options)
        return qparams(lo, hi, dtype, symmetric)

    def _counter_state(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "lo": self.lo,
            "hi": self.hi,
            "finite": self.finite,
            "nan": self.nan,
            "pos_inf": self.pos_inf,
            "neg_inf": self.neg_inf,
            "batches": self.batches,
        }

    def _load_counters(self, state: dict[str, Any]) -> None:
        self.lo, self.hi = float(state["lo"]), float(state["hi"])
        for key in ("finite", "nan", "pos_inf", "neg_inf", "batches"):
            setattr(self, key, int(state[key]))


class MinMaxObserver(Observer):
    """Running min/max (onnxruntime's MinMax), optionally a moving average of per-batch
    extremes (``averaging`` = its averaging_constant; that variant depends on batch order,
    so merging two of them averages them weighted by batch count)."""

    kind = "minmax"

    def __init__(self, averaging: float | None = None) -> None:
        super().__init__()
        self.averaging = averaging
        self._stats = np.empty(kernels.N_STATS)

    def update(self, array: Any) -> None:
        flat = _flat(array)
        kernels.extremes(flat, self._stats)
        s = self._stats
        finite = self._count_nonfinite(s)
        if finite:
            self.update_extremes(float(s[kernels.MIN]), float(s[kernels.MAX]), finite)

    def update_extremes(self, lo: float, hi: float, count: int) -> None:
        """A batch's finite min/max computed elsewhere (ReduceMin/ReduceMax in the graph)."""
        self.finite += count
        if self.averaging is not None and self.batches:
            c = self.averaging
            self.lo += c * (lo - self.lo)
            self.hi += c * (hi - self.hi)
        else:
            self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
        self.batches += 1

    def merge(self, other: MinMaxObserver) -> MinMaxObserver:
        if self.averaging is not None and self.batches and other.batches:
            lo, hi = self.lo, self.hi
            n, m = self.batches, other.batches
            self._merge_counters(other)
            self.lo = (lo * n + other.lo * m) / (n + m)
            self.hi = (hi * n + other.hi * m) / (n + m)
            return self
        self._merge_counters(other)
        return self

    def range(self, method: str = "minmax", **options: Any) -> tuple[float, float]:
        if method != "minmax":
            raise CalibrationError(f"a min/max observer cannot give a {method} range")
        self._check(options.get("name", "tensor"))
        if options.get("symmetric"):
            bound = max(-self.lo, self.hi)
            return -bound, bound
        return self.lo, self.hi

    def state(self) -> dict[str, Any]:
        return {
            **self._counter_state(),
            "averaging": -1.0 if self.averaging is None else self.averaging,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> MinMaxObserver:
        averaging = float(state["averaging"])
        obs = cls(None if averaging < 0 else averaging)
        obs._load_counters(state)
        return obs


class HistogramObserver(Observer):
    """Histogram on a canonical power-of-two grid (see kernels), plus exact min/max.

    One collection answers every method: minmax, percentile, entropy (TensorRT KL search)
    and mse, so re-quantizing with another method needs no new inference.
    """

    kind = "histogram"

    def __init__(self, bins: int = DEFAULT_BINS) -> None:
        super().__init__()
        if bins < 16 or bins & (bins - 1):
            raise CalibrationError(f"histogram bins must be a power of two >= 16, got {bins}")
        self.counts = np.zeros(bins, np.int64)
        self.t = 0.0
        self._stats = np.empty(kernels.N_STATS)

    @property
    def bins(self) -> int:
        return self.counts.shape[0]

    def update(self, array: Any) -> None:
        flat = _flat(array)
        s = self._stats
        kernels.extremes(flat, s)
        finite = self._count_nonfinite(s)
        if finite == 0:
            return
        self.finite += finite
        self.lo, self.hi = min(self.lo, float(s[kernels.MIN])), max(self.hi, float(s[kernels.MAX]))
        self.batches += 1
        # the grid grows over the batch's extremes before it is binned, so every finite
        # value lands inside it
        self._grow(_power_of_two_above(max(-self.lo, self.hi)))
        kernels.count(flat, self.counts, self.t)

    def _grow(self, t: float) -> None:
        if t <= self.t:
            return
        if self.t > 0:
            factor = min(round(t / self.t), self.bins)
            self.counts = kernels.regrid(self.counts, factor)
        self.t = t

    def merge(self, other: HistogramObserver) -> HistogramObserver:
        if other.bins != self.bins:
            raise CalibrationError(f"cannot merge histograms of {other.bins} and {self.bins} bins")
        self._merge_counters(other)
        theirs = other.counts
        if other.t < self.t and other.t > 0:
            theirs = kernels.regrid(theirs, min(round(self.t / other.t), self.bins))
        elif other.t > self.t:
            self._grow(other.t)
        self.counts = self.counts + theirs
        return self

    # ------------------------------------------------------------------ ranges

    def range(
        self,
        method: str = "minmax",
        *,
        symmetric: bool = False,
        percentile: float = 99.999,
        quantized_bins: int = 128,
        entropy_bins: int = 2048,
        levels: int = 256,
        name: str = "tensor",
    ) -> tuple[float, float]:
        self._check(name)
        if method == "minmax":
            lo, hi = self.lo, self.hi
        elif method == "percentile":
            lo, hi = self._percentile(percentile, symmetric)
        elif method == "entropy":
            lo, hi = self._entropy(quantized_bins, entropy_bins)
        elif method == "mse":
            lo, hi = self._mse(levels, symmetric)
        else:
            raise CalibrationError(
                f"unknown calibration method {method!r} (known: {', '.join(METHODS)})"
            )
        lo, hi = max(lo, self.lo), min(hi, self.hi)
        if symmetric:
            bound = max(-lo, hi)
            return -bound, bound
        return lo, hi

    def _percentile(self, percentile: float, symmetric: bool) -> tuple[float, float]:
        if not 0 < percentile <= 100:
            raise CalibrationError(f"percentile must be in (0, 100], got {percentile}")
        width = 2 * self.t / self.bins
        half = self.bins // 2
        if symmetric:
            folded = self.counts[half:] + self.counts[:half][::-1]
            bound = _quantile(folded, percentile / 100.0, 0.0, width)
            return -bound, bound
        cut = (100.0 - percentile) / 200.0
        return (
            _quantile(self.counts, cut, -self.t, width),
            _quantile(self.counts, 1.0 - cut, -self.t, width),
        )

    def entropy_histogram(self, entropy_bins: int = 2048) -> tuple[np.ndarray, float]:
        """The histogram the KL search runs on: cropped to the occupied bins around 0 and
        merged (exactly, pairs of bins) down to at most ``entropy_bins``. Returns
        (counts, half-width)."""
        half = self.bins // 2
        occupied = np.flatnonzero(self.counts)
        reach = int(max(half - occupied[0], occupied[-1] + 1 - half)) if occupied.size else 1
        reach = 1 << max(reach - 1, 0).bit_length()  # a power of two, so merging stays exact
        counts = self.counts[half - reach : half + reach]
        while counts.shape[0] > entropy_bins:
            counts = counts.reshape(-1, 2).sum(axis=1)
        return counts, self.t * reach / half

    def _entropy(self, quantized_bins: int, entropy_bins: int) -> tuple[float, float]:
        counts, t = self.entropy_histogram(entropy_bins)
        if counts.shape[0] // 2 < quantized_bins // 2:
            return self.lo, self.hi  # fewer bins than quantization levels: nothing to clip
        return entropy_threshold(counts, t, quantized_bins)

    def _mse(self, levels: int, symmetric: bool) -> tuple[float, float]:
        lo, hi = min(self.lo, 0.0), max(self.hi, 0.0)
        if symmetric:
            bound = max(-lo, hi)
            lo, hi = -bound, bound
        counts = self.counts.astype(np.float64)
        best, best_err = (lo, hi), math.inf
        for fraction in np.linspace(0.05, 1.0, 96):
            err = kernels.quantization_mse(counts, self.t, lo * fraction, hi * fraction, levels)
            if err < best_err:
                best, best_err = (lo * fraction, hi * fraction), err
        return best

    def state(self) -> dict[str, Any]:
        return {**self._counter_state(), "t": self.t, "counts": self.counts}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> HistogramObserver:
        counts = np.asarray(state["counts"], np.int64)
        obs = cls(counts.shape[0])
        obs._load_counters(state)
        obs.counts, obs.t = counts.copy(), float(state["t"])
        return obs


class PerChannelMinMaxObserver(Observer):
    """Min/max per channel along ``axis`` (weights, or activations quantized per channel)."""

    kind = "minmax-per-channel"

    def __init__(self, axis: int = 1) -> None:
        super().__init__()
        self.axis = axis
        self.channel_lo: np.ndarray | None = None
        self.channel_hi: np.ndarray | None = None

    def update(self, array: Any) -> None:
        a = np.asarray(array)
        if a.dtype not in (np.float32, np.float64):
            a = a.astype(np.float32)
        axis = self.axis % a.ndim
        channels = a.shape[axis]
        if self.channel_lo is None:
            self.channel_lo = np.full(channels, np.inf)
            self.channel_hi = np.full(channels, -np.inf)
        elif self.channel_lo.shape[0] != channels:
            raise CalibrationError(
                f"per-channel observer saw {channels} channels after {self.channel_lo.shape[0]}"
            )
        outer = int(np.prod(a.shape[:axis]))
        view = np.ascontiguousarray(a).reshape(outer, channels, -1)
        kernels.minmax_per_channel(view, self.channel_lo, self.channel_hi)
        finite = np.isfinite(self.channel_lo)
        if finite.any():
            self.lo = min(self.lo, float(self.channel_lo[finite].min()))
            self.hi = max(self.hi, float(self.channel_hi[finite].max()))
            self.finite = 1
        self.batches += 1

    def merge(self, other: PerChannelMinMaxObserver) -> PerChannelMinMaxObserver:
        self._merge_counters(other)
        if other.channel_lo is not None:
            if self.channel_lo is None:
                self.channel_lo, self.channel_hi = other.channel_lo.copy(), other.channel_hi.copy()
            else:
                self.channel_lo = np.minimum(self.channel_lo, other.channel_lo)
                self.channel_hi = np.maximum(self.channel_hi, other.channel_hi)
        self.finite = min(self.finite, 1)
        return self

    def range(self, method: str = "minmax", **options: Any) -> tuple[np.ndarray, np.ndarray]:
        if method != "minmax" or self.channel_lo is None:
            raise CalibrationError("a per-channel observer gives min/max ranges after an update")
        lo, hi = self.channel_lo.copy(), self.channel_hi.copy()
        empty = ~np.isfinite(lo)
        lo[empty], hi[empty] = 0.0, 0.0
        if options.get("symmetric"):
            bound = np.maximum(-lo, hi)
            return -bound, bound
        return lo, hi

    def state(self) -> dict[str, Any]:
        return {
            **self._counter_state(),
            "axis": self.axis,
            "channel_lo": self.channel_lo if self.channel_lo is not None else np.zeros(0),
            "channel_hi": self.channel_hi if self.channel_hi is not None else np.zeros(0),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> PerChannelMinMaxObserver:
        obs = cls(int(state["axis"]))
        obs._load_counters(state)
        lo = np.asarray(state["channel_lo"], np.float64)
        if lo.size:
            obs.channel_lo, obs.channel_hi = (
                lo.copy(),
                np.asarray(state["channel_hi"], np.float64).copy(),
            )
        return obs


OBSERVERS: dict[str, type[Observer]] = {
    cls.kind: cls for cls in (MinMaxObserver, HistogramObserver, PerChannelMinMaxObserver)
}


def observer_for(method: str, bins: int = DEFAULT_BINS) -> Observer:
    """The observer a calibration method needs (a histogram serves every histogram method)."""
    if method == "minmax":
        return MinMaxObserver()
    if method in HISTOGRAM_METHODS:
        return HistogramObserver(bins)
    raise CalibrationError(f"unknown calibration method {method!r} (known: {', '.join(METHODS)})")


def from_state(state: dict[str, Any]) -> Observer:
    kind = str(state["kind"])
    if kind not in OBSERVERS:
        raise CalibrationError(f"unknown observer kind {kind!r} in calibration cache")
    return OBSERVERS[kind].from_state(state)  # type: ignore[attr-defined]


def entropy_threshold(
    counts: np.ndarray, t: float, quantized_bins: int = 128
) -> tuple[float, float]:
    """The TensorRT KL-divergence range on a signed histogram of [-t, t) (even bin count)."""
    divergences = kernels.kl_divergences(counts.astype(np.float64), quantized_bins)
    i = int(np.argmin(divergences)) + quantized_bins // 2
    mid = counts.shape[0] // 2
    width = 2 * t / counts.shape[0]
    return -t + (mid - i) * width, -t + min(mid + i + 1, counts.shape[0]) * width


def _quantile(counts: np.ndarray, fraction: float, start: float, width: float) -> float:
    """Lower edge of the bin in which the cumulative mass reaches ``fraction``.

    The same rule as onnxruntime's percentile calibrator, so the two agree to within one
    of the wider of the two bins; a fraction of 1 (percentile 100) is the top edge of the
    last occupied bin, which the caller clips to the observed maximum."""
    cdf = np.cumsum(counts, dtype=np.int64)
    total = int(cdf[-1])
    if fraction >= 1.0:
        k = int(np.flatnonzero(counts)[-1]) + 1
    else:
        k = int(np.searchsorted(cdf, fraction * total, side="left"))
    return start + min(k, counts.shape[0]) * width
