"""Channel importance and the consumer refit of structured pruning, on numpy arrays.

A consumer layer computes Y = X W (X: its input rows, channels or a Conv's patches; W: K x N).
Removing input rows S' leaves X_S W_S. Its loss on the data is what the channel contributes
to Y: with the input's Gram matrix G = X^T X, a row's share is about G_rr ||W_r||^2 (the
diagonal term; Wanda's measure lifted to channels). Without data, the magnitude ||W_r||^2.

The refit (He et al., "Channel Pruning for Accelerating Very Deep Neural Networks", 2017;
the ridge refit onnxsim's pruning uses) re-solves the kept rows so that they reconstruct the
original output on the calibration data: min ||X_S W' + 1 b' - X W||^2 + ridge ||W' - W_S||^2
(shrunk toward the kept rows as they were: with fewer samples than rows the data alone
would fit them exactly and generalise badly), which
needs only sums over the data, G_SS, G_S* (and the ones column's entries when G was gathered
with one, giving a bias correction b' for the mean the removed channels carried).
"""

from __future__ import annotations

import numpy as np

#: Ridge damping toward the kept weights, as a share of the kept channels' mean spread on the
#: data. Held-out output error of PP-OCR cls / the wide digits CNN with a quarter / half of
#: their channels removed, sequential refit, 32 calibration samples: 0.001: 0.151 / 0.00041,
#: 0.01: 0.110 / 0.00046, 0.1: 0.087 / 0.00069, 1: 0.107 / 0.0016.
DAMPING = 0.01


def row_energy(weight_kn: np.ndarray, gram: np.ndarray | None) -> np.ndarray:
    """Per input row of a K x N weight: how much of the layer's output it carries."""
    w = np.asarray(weight_kn, np.float64)
    norms = np.einsum("kn,kn->k", w, w)
    if gram is None:
        return norms
    k = w.shape[0]
    return norms * np.maximum(np.diag(gram)[:k], 0.0)


def refit_rows(
    weight_kn: np.ndarray,
    gram: np.ndarray,
    kept: np.ndarray,
    *,
    with_bias: bool,
    damping: float = DAMPING,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The kept rows' new weights (len(kept) x N) that best reproduce X W from the kept
    rows alone, and the bias correction (N,) when ``with_bias`` and ``gram`` has a ones
    column (K + 1 rows, its last). ``kept``: a boolean mask or indices over the K rows."""
    w = np.asarray(weight_kn, np.float64)
    k = w.shape[0]
    rows = np.flatnonzero(kept) if np.asarray(kept).dtype == bool else np.asarray(kept)
    ones = with_bias and gram.shape[0] == k + 1
    index = np.concatenate([rows, [k]]) if ones else rows
    a = gram[np.ix_(index, index)].copy()
    b = gram[np.ix_(index, np.arange(k))] @ w
    diag = np.arange(len(rows))
    second = np.diag(a)[: len(rows)]
    if ones and gram[k, k] > 0:  # damp by the spread of the channels, not their means
        count = gram[k, k]
        second = second - gram[rows, k] ** 2 / count
    scale = float(np.mean(np.maximum(second, 0.0))) if len(rows) else 0.0
    ridge = damping * scale if scale > 0 else damping
    a[diag, diag] += ridge
    b[diag] += ridge * w[rows]  # shrunk toward the weights as they were, not toward zero
    try:
        solved = np.linalg.solve(a, b)
    except np.linalg.LinAlgError:
        solved = np.linalg.lstsq(a, b, rcond=None)[0]
    if ones:
        return solved[:-1], solved[-1]
    return solved, None


def refit_cross(
    weight_kn: np.ndarray,
    gram: np.ndarray,
    cross: np.ndarray,
    prior: np.ndarray,
    *,
    with_bias: bool = True,
    damping: float = DAMPING,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The weights (K' x N) and bias correction (N,) that best reproduce X W from the rows
    X' that really reach the layer: min ||X' W' + 1 b - X W||^2 + ridge ||W' - prior||^2,
    from ``gram`` = [X' 1]^T [X' 1] and ``cross`` = [X' 1]^T X (``calib.gram.cross_grams``);
    ``prior``: the kept rows of W, what few samples should not pull the weights far from.
    Without ``with_bias`` (nowhere to put a bias) the ones column is left out."""
    k = gram.shape[0] - 1
    a = gram.copy()
    count = gram[k, k]
    spread = np.diag(gram)[:k] - (gram[:k, k] ** 2 / count if count > 0 else 0.0)
    scale = float(np.mean(np.maximum(spread, 0.0))) if k else 0.0
    index = np.arange(k)
    ridge = damping * scale if scale > 0 else damping
    a[index, index] += ridge
    b = cross @ np.asarray(weight_kn, np.float64)
    b[:k] += ridge * np.asarray(prior, np.float64)
    if not with_bias:
        a, b = a[:k, :k], b[:k]
    try:
        solved = np.linalg.solve(a, b)
    except np.linalg.LinAlgError:
        solved = np.linalg.lstsq(a, b, rcond=None)[0]
    return (solved[:-1], solved[-1]) if with_bias else (solved, None)
