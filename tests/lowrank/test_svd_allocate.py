"""Low-rank numerics: plain and whitened truncated SVD against their definitions, the
predicted error against the measured one, the least-squares refit, the randomized SVD, and
the rank allocator on curves with a known answer."""

from __future__ import annotations

import numpy as np
import pytest

from onnxsqueeze.lowrank.allocate import LayerCurve, allocate, uniform_energy
from onnxsqueeze.lowrank.svd import LowRank, pays, randomized_svd, rank_for_ratio

RNG = np.random.default_rng(3)


def _inputs(rows: int, k: int) -> np.ndarray:
    """Activations whose channels differ in scale by 100x, as real ones do."""
    return RNG.standard_normal((rows, k)) * np.logspace(-1, 1, k)


def test_plain_factors_are_the_best_truncation_and_their_error_is_predicted():
    w = RNG.standard_normal((48, 32))
    low = LowRank(w)
    a, b = low.factors(8)
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    np.testing.assert_allclose(a @ b, (u[:, :8] * s[:8]) @ vt[:8], atol=1e-10)
    measured = np.sum((w - a @ b) ** 2) / np.sum(w**2)
    assert low.error(8) == pytest.approx(measured, rel=1e-9)
    assert a.shape == (48, 8) and b.shape == (8, 32)
    # balanced: both factors carry sqrt of the singular values
    np.testing.assert_allclose(np.linalg.norm(a, axis=0), np.linalg.norm(b, axis=1), rtol=1e-9)


def test_whitened_factors_cut_the_output_error_and_predict_it():
    k, n, rank = 64, 48, 12
    x = _inputs(2000, k)
    w = RNG.standard_normal((k, n))
    gram = x.T @ x
    whitened = LowRank(w, gram, damping=1e-9)
    a, b = whitened.factors(rank)
    out_error = np.sum((x @ w - x @ a @ b) ** 2) / np.sum((x @ w) ** 2)
    assert whitened.error(rank) == pytest.approx(out_error, rel=1e-6)
    pa, pb = LowRank(w).factors(rank)
    plain_error = np.sum((x @ w - x @ pa @ pb) ** 2) / np.sum((x @ w) ** 2)
    assert out_error < plain_error / 2, (out_error, plain_error)


def test_refit_recovers_what_heavy_damping_costs():
    k, n, rank = 64, 48, 12
    x = _inputs(2000, k)
    w = RNG.standard_normal((k, n))
    damped = LowRank(w, x.T @ x, damping=1.0)

    def error(a, b):
        return np.sum((x @ w - x @ a @ b) ** 2)

    assert error(*damped.factors(rank, refit=True)) < 0.9 * error(*damped.factors(rank))


def test_randomized_svd_finds_the_leading_singular_values():
    m = RNG.standard_normal((600, 20)) @ RNG.standard_normal((20, 400))
    m += 0.01 * RNG.standard_normal(m.shape)
    u, s, vt = randomized_svd(m, 10)
    exact = np.linalg.svd(m, compute_uv=False)[:10]
    np.testing.assert_allclose(s, exact, rtol=1e-6)
    assert u.shape == (600, 10) and vt.shape == (10, 400)


def test_rank_for_energy_ratio_and_pays():
    low = LowRank(np.diag([4.0, 2.0, 1.0, 0.5]))
    assert (
        low.rank_for_energy(16 / 21.25) == 1
        and low.rank_for_energy(0.98) == 3
        and low.rank_for_energy(0.99) == 4
    )
    assert rank_for_ratio(100, 100, 0.5) == 25 and pays(100, 100, 25, 0.5)
    assert not pays(100, 100, 26, 0.5) and not pays(100, 100, 0, 0.0)


def _curve(name: str, spectrum: np.ndarray) -> LayerCurve:
    energy = np.concatenate([[0.0], np.cumsum(spectrum**2)])
    total = energy[-1]
    n = len(spectrum)
    return LayerCurve(name, n, n, lambda r: (total - energy[r]) / total, n)


def test_the_allocator_factorizes_the_layer_whose_truncation_is_cheap():
    """Two 64 x 64 layers, one with a spectrum that falls 10x every 4 values (rank 8 keeps
    it almost whole), one flat (every value dropped costs the same): keeping 60 % of the
    parameters, the steep one goes to a low rank and the flat one stays whole."""
    steep = _curve("steep", 10.0 ** (-np.arange(64) / 4))
    flat = _curve("flat", np.ones(64))
    ranks = allocate([steep, flat], keep=0.6)
    assert set(ranks) == {"steep"} and ranks["steep"] <= 12, ranks
    kept = ranks["steep"] * 128 + 64 * 64
    assert kept <= 0.6 * 2 * 64 * 64


def test_the_allocator_is_never_worse_than_a_uniform_energy_threshold():
    """On random decaying spectra: at the parameters a uniform energy threshold keeps, the
    allocator's total predicted error is at most the uniform rule's."""
    layers, spectra = [], {}
    for index in range(6):
        decay = RNG.uniform(0.5, 20)
        spectrum = np.exp(-np.arange(96) / decay) * RNG.uniform(0.5, 2)
        spectra[f"l{index}"] = spectrum
        layers.append(_curve(f"l{index}", spectrum))
    by_name = {layer.name: layer for layer in layers}

    def rank_for(spectrum):
        energy = np.cumsum(spectrum**2) / np.sum(spectrum**2)
        return lambda e: int(np.searchsorted(energy, e - 1e-12) + 1)

    for threshold in (0.9, 0.99, 0.999):
        uniform = uniform_energy([(n, 96, 96, rank_for(s)) for n, s in spectra.items()], threshold)
        params = sum(uniform.get(n, 0) * 192 or 96 * 96 for n in spectra)
        error = sum(by_name[n].error(r) for n, r in uniform.items())
        ranks = allocate(layers, keep=params / (6 * 96 * 96))
        ours = sum(ranks.get(n, 0) * 192 or 96 * 96 for n in spectra)
        assert ours <= params
        assert sum(by_name[n].error(r) for n, r in ranks.items()) <= error + 1e-12
