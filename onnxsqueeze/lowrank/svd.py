"""Truncated SVD of a weight, plain or whitened by its input's Gram matrix.

A layer computes X @ W (W: K x N). Plain SVD keeps the rank-r W_r closest to W, which
minimises ||W - W_r||; trained weights are close to full rank, so that error lands on the
directions the data uses as much as on those it never excites. Whitened SVD (SVD-LLM's
truncation-aware whitening) minimises the layer's *output* error ||X W - X W_r|| instead:
with G = X^T X = L L^T (Cholesky, damped), ||X D||_F = ||L^T D||_F for any D, so the best
rank-r W_r is L^-T times the truncated SVD of L^T W, and dropping singular value s_i costs
exactly s_i^2 of the output error. That makes each layer's error at every rank known before
any model is built (``LowRank.error``), which is what the rank allocator spreads a budget
with. ``refit`` then re-solves the second factor by least squares on the undamped Gram
matrix (the damping and a Gram matrix summed from few samples bias the first solution).

Factors are balanced (sqrt of the singular values on each side), so both have the same
scale: they quantize alike if int8 follows.
"""

from __future__ import annotations

import numpy as np

#: Damping added to the Gram matrix's diagonal, as a fraction of its mean: keeps the Cholesky
#: factor well-conditioned where channels are (nearly) dead or collinear.
DAMPING = 0.01
#: Above this many rows and columns, and when fewer than half the singular values are
#: wanted, a randomized SVD (Halko et al.) finds the leading ones.
RANDOMIZED_ABOVE = 2048


class LowRank:
    """The (whitened) SVD of one K x N weight, from which factors of any rank follow.

    ``gram``: X^T X of the layer's input (K x K), or None for plain SVD. ``max_rank``: only
    the leading singular values up to this rank are needed (allows a randomized SVD of a
    large weight)."""

    def __init__(
        self,
        weight: np.ndarray,
        gram: np.ndarray | None = None,
        *,
        damping: float = DAMPING,
        max_rank: int | None = None,
        seed: int = 0,
    ) -> None:
        self.weight = np.asarray(weight, np.float64)
        k, n = self.weight.shape
        self.gram = None if gram is None else np.asarray(gram, np.float64)
        self.chol = None if self.gram is None else _cholesky(self.gram, damping)
        target = self.weight if self.chol is None else self.chol.T @ self.weight
        self.total = float(np.sum(target * target))
        full = min(k, n)
        if max_rank is not None and full > RANDOMIZED_ABOVE and 2 * max_rank < full:
            self.u, self.s, self.vt = randomized_svd(target, max_rank, seed=seed)
        else:
            self.u, self.s, self.vt = np.linalg.svd(target, full_matrices=False)
        cumulative = np.concatenate([[0.0], np.cumsum(self.s * self.s)])
        #: kept[r]: energy the rank-r truncation keeps (r = 0 .. len(s))
        self.kept = cumulative

    @property
    def shape(self) -> tuple[int, int]:
        return self.weight.shape  # type: ignore[return-value]

    @property
    def ranks(self) -> int:
        """The largest rank whose error is known."""
        return len(self.s)

    def error(self, rank: int) -> float:
        """Relative squared error of the rank-``rank`` truncation: of the output X W when
        whitened (||X W - X W_r||^2 / ||X W||^2, damping included), of W when plain."""
        if self.total <= 0:
            return 0.0
        rank = min(rank, self.ranks)
        return max(self.total - float(self.kept[rank]), 0.0) / self.total

    def rank_for_energy(self, energy: float) -> int:
        """Smallest rank that keeps ``energy`` (0..1) of the total."""
        if self.total <= 0:
            return 1
        need = energy * self.total
        return int(min(np.searchsorted(self.kept, need - 1e-12 * self.total), self.ranks)) or 1

    def factors(self, rank: int, *, refit: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """A (K x rank) and B (rank x N), A @ B the truncation; ``refit``: B re-solved by
        least squares for this A on the undamped Gram matrix (whitened only)."""
        rank = max(1, min(rank, self.ranks))
        root = np.sqrt(self.s[:rank])
        a = self.u[:, :rank] * root
        b = root[:, None] * self.vt[:rank]
        if self.chol is not None:
            a = np.linalg.solve(self.chol.T, a)  # L^-T U_r sqrt(S_r)
            if refit:
                b = refit_second(a, self.weight, self.gram)
        return a, b


def refit_second(a: np.ndarray, weight: np.ndarray, gram: np.ndarray) -> np.ndarray:
    """The B minimising ||X W - X A B||: (A^T G A)^-1 A^T G W, with a ridge of 1e-9 of the
    diagonal's scale (A^T G A is r x r and well-posed unless X never excites A)."""
    ga = gram @ a
    lhs = a.T @ ga
    ridge = 1e-9 * max(float(np.trace(lhs)) / lhs.shape[0], 1e-30)
    return np.linalg.solve(lhs + ridge * np.eye(lhs.shape[0]), ga.T @ weight)


def _cholesky(gram: np.ndarray, damping: float) -> np.ndarray:
    """Lower L with L L^T = G + lambda I, lambda = damping x the mean diagonal; more damping
    where the first try fails (a Gram matrix of few samples is singular)."""
    scale = float(np.mean(np.diag(gram))) or 1.0
    for factor in (damping, damping * 10, damping * 100, 1.0):
        try:
            return np.linalg.cholesky(gram + factor * scale * np.eye(gram.shape[0]))
        except np.linalg.LinAlgError:
            continue
    return np.linalg.cholesky(np.diag(np.maximum(np.diag(gram), scale)))


def randomized_svd(
    matrix: np.ndarray, rank: int, *, oversample: int = 10, iterations: int = 4, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The leading ``rank`` singular triplets by a randomized range finder with power
    iterations (Halko, Martinsson and Tropp 2011): a few products with the matrix instead of
    a full SVD of it."""
    rng = np.random.default_rng(seed)
    k = min(rank + oversample, min(matrix.shape))
    q, _ = np.linalg.qr(matrix @ rng.standard_normal((matrix.shape[1], k)))
    for _ in range(iterations):
        q, _ = np.linalg.qr(matrix.T @ q)
        q, _ = np.linalg.qr(matrix @ q)
    u, s, vt = np.linalg.svd(q.T @ matrix, full_matrices=False)
    return (q @ u)[:, :rank], s[:rank], vt[:rank]


def rank_for_ratio(k: int, n: int, ratio: float) -> int:
    """The largest rank whose factors hold at most ``ratio`` of the K x N parameters."""
    return int(ratio * k * n // (k + n))


def pays(k: int, n: int, rank: int, min_saving: float) -> bool:
    """Whether factors of ``rank`` save at least ``min_saving`` of the weight's parameters."""
    return rank >= 1 and rank * (k + n) <= (1.0 - min_saving) * k * n
