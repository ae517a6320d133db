"""Compare two models' outputs on the same feeds: max abs/rel error, cosine, SQNR, top-1.

``max_rel`` is the largest absolute difference divided by the largest magnitude of the
reference output: element-wise relative error explodes near zero and says little.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

#: A lossless pass may change outputs by at most this, relative to the output's scale.
LOSSLESS_RTOL = 1e-6


@dataclasses.dataclass
class OutputMetrics:
    """Error of one output over all probe samples (worst case for errors, mean for cosine)."""

    name: str
    max_abs: float = 0.0
    max_rel: float = 0.0
    cosine: float = 1.0
    sqnr_db: float = math.inf
    top1_agreement: float | None = None
    #: How many answers (argmax rows over all samples) top1_agreement was measured on.
    answers: int = 0
    #: Mean share of each row's 5 largest entries (last axis) that stay among its 5 largest.
    top5_agreement: float | None = None
    #: Every reference sample is a probability distribution over the last axis (softmax-like:
    #: class scores, where a changed argmax is a changed answer).
    distribution: bool | None = None
    exact: bool = True
    mismatch: str | None = None  # shape/dtype/structure difference
    #: Reference elements that can be compared (not NaN/inf): none means nothing was judged.
    finite: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            k: (None if isinstance(v, float) and math.isinf(v) else v)
            for k, v in dataclasses.asdict(self).items()
        }


@dataclasses.dataclass
class Comparison:
    """Per-output metrics of a candidate model against a reference on N samples."""

    outputs: list[OutputMetrics]
    samples: int

    def within(self, rtol: float = LOSSLESS_RTOL, floor: Mapping[str, float] | None = None) -> bool:
        """Every output within ``rtol`` of its scale, or within its absolute ``floor``."""
        return all(
            o.mismatch is None and (o.max_rel <= rtol or o.max_abs <= (floor or {}).get(o.name, -1))
            for o in self.outputs
        )

    @property
    def max_rel(self) -> float:
        return max((o.max_rel for o in self.outputs), default=0.0)

    @property
    def max_abs(self) -> float:
        return max((o.max_abs for o in self.outputs), default=0.0)

    @property
    def min_cosine(self) -> float:
        return min((o.cosine for o in self.outputs), default=1.0)

    def summary(self) -> str:
        bad = [o for o in self.outputs if o.mismatch]
        if bad:
            return f"{bad[0].name}: {bad[0].mismatch}"
        if all(o.exact for o in self.outputs):
            return f"identical on {self.samples} sample(s)"
        return (
            f"max_rel {self.max_rel:.2e}, max_abs {self.max_abs:.2e}, cosine {self.min_cosine:.6f}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "max_abs": self.max_abs,
            "max_rel": self.max_rel,
            "min_cosine": self.min_cosine,
            "outputs": [o.as_dict() for o in self.outputs],
        }


def compare_runs(
    reference: Sequence[Mapping[str, Any]], candidate: Sequence[Mapping[str, Any]]
) -> Comparison:
    """Compare outputs sample by sample; outputs are matched by name."""
    if len(reference) != len(candidate):
        raise ValueError("reference and candidate runs differ in sample count")
    names = list(reference[0]) if reference else []
    metrics = {n: OutputMetrics(n) for n in names}
    cos_sums = dict.fromkeys(names, 0.0)
    top1: dict[str, list[float]] = {n: [] for n in names}
    top5: dict[str, list[float]] = {n: [] for n in names}
    for ref, cand in zip(reference, candidate, strict=True):
        for name in names:
            m = metrics[name]
            if name not in cand:
                m.mismatch = "output missing"
                continue
            _accumulate(m, ref[name], cand[name], cos_sums, top1, top5)
    for name, m in metrics.items():
        m.cosine = cos_sums[name] / max(len(reference), 1) if m.mismatch is None else 0.0
        m.top1_agreement = float(np.mean(top1[name])) if top1[name] else None
        m.top5_agreement = float(np.mean(top5[name])) if top5[name] else None
    return Comparison(list(metrics.values()), len(reference))


def _tensor_like(x: Any) -> Any:
    """A map or sequence of maps with the same keys (ZipMap's per-class probabilities) as
    an array, one column per key in key order, so it is compared like a tensor (tolerance,
    cosine, top-1); anything else unchanged."""
    rows = [x] if isinstance(x, dict) else x
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        return x
    keys = sorted(rows[0])
    if any(sorted(r) != keys for r in rows):
        return x
    try:
        table = np.array([[r[k] for k in keys] for r in rows])
    except (TypeError, ValueError):
        return x
    if table.dtype.kind not in "fiu":
        return x
    return table[0] if isinstance(x, dict) else table


def _accumulate(
    m: OutputMetrics, a: Any, b: Any, cos_sums: dict, top1: dict, top5: dict | None = None
) -> None:
    a, b = _tensor_like(a), _tensor_like(b)
    if not isinstance(a, np.ndarray) or not isinstance(b, np.ndarray):
        # Sequences and maps (ai.onnx.ml ZipMap...) must match exactly.
        if repr(a) != repr(b):
            m.exact = False
            m.mismatch = "non-tensor output differs"
        cos_sums[m.name] += 1.0
        m.finite += 1
        return
    if a.shape != b.shape or a.dtype != b.dtype:
        m.mismatch = f"shape/dtype {a.dtype}{list(a.shape)} became {b.dtype}{list(b.shape)}"
        return
    if a.dtype.kind not in "fc":
        m.finite += a.size
        equal = bool(np.array_equal(a, b))
        m.exact &= equal
        if not equal:
            diff = (
                np.abs(a.astype(np.float64) - b.astype(np.float64))
                if a.dtype.kind in "iub"
                else None
            )
            m.max_abs = max(m.max_abs, float(diff.max()) if diff is not None else math.inf)
            m.max_rel = math.inf
        cos_sums[m.name] += 1.0 if equal else 0.0
        return
    a64 = a.astype(np.float64)
    b64 = b.astype(np.float64)
    both_nan = np.isnan(a64) & np.isnan(b64)
    same_inf = np.isinf(a64) & (a64 == b64)
    skip = both_nan | same_inf
    if not np.array_equal(a, b, equal_nan=True):
        m.exact = False
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.where(skip, 0.0, np.abs(a64 - b64))
    diff = np.where(np.isnan(diff), np.inf, diff)
    finite_ref = np.where(skip | ~np.isfinite(a64), 0.0, a64)
    m.finite += int(np.isfinite(a64).sum())
    max_abs = float(diff.max()) if diff.size else 0.0
    scale = float(np.abs(finite_ref).max()) if diff.size else 0.0
    m.max_abs = max(m.max_abs, max_abs)
    m.max_rel = max(
        m.max_rel, max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    )
    fb = np.where(skip | ~np.isfinite(b64), 0.0, b64).ravel()
    fa = finite_ref.ravel()
    # Scale both before dot products so outputs near float64's range cannot overflow.
    norm = max(float(np.abs(fa).max(initial=0.0)), float(np.abs(fb).max(initial=0.0))) or 1.0
    fa, fb = fa / norm, fb / norm
    na, nb = np.linalg.norm(fa), np.linalg.norm(fb)
    if na == 0 and nb == 0:
        cos_sums[m.name] += 1.0
    elif na and nb:
        cos_sums[m.name] += float(fa @ fb / (na * nb))
    noise = float(np.sum((fa - fb) ** 2))
    signal = float(np.sum(fa**2))
    sqnr = (
        math.inf if noise == 0 else (10 * math.log10(signal / noise) if signal > 0 else -math.inf)
    )
    m.sqnr_db = min(m.sqnr_db, sqnr)
    if a.ndim >= 1 and a.shape[-1] > 1:
        m.distribution = m.distribution is not False and is_distribution(a64)
        top1[m.name].append(float(np.mean(np.argmax(a, axis=-1) == np.argmax(b, axis=-1))))
        m.answers += int(np.prod(a.shape[:-1]))
        if (
            top5 is not None
            and a.shape[-1] > 5
            and np.isfinite(a64).all()
            and np.isfinite(b64).all()
        ):
            top5[m.name].append(top_k_agreement(a64, b64, 5))


def is_distribution(a: Any) -> bool:
    """A float tensor whose rows over the last axis are probability distributions."""
    if not isinstance(a, np.ndarray) or a.dtype.kind != "f" or a.ndim < 1 or a.shape[-1] < 2:
        return False
    if a.size == 0 or not np.all(np.isfinite(a)) or a.min() < 0 or a.max() > 1:
        return False
    return bool(np.allclose(a.sum(axis=-1), 1.0, atol=1e-3))


def top_k_agreement(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """Mean share of each row's ``k`` largest entries (last axis) of ``a`` that are among the
    ``k`` largest of ``b``: a retrieval or classification answer's top list kept."""
    rows_a = np.argpartition(-a.reshape(-1, a.shape[-1]), k - 1, axis=-1)[:, :k]
    rows_b = np.argpartition(-b.reshape(-1, b.shape[-1]), k - 1, axis=-1)[:, :k]
    shared = (rows_a[:, :, None] == rows_b[:, None, :]).sum(axis=(1, 2))
    return float(shared.mean()) / k
