"""How much each layer's own error costs at the model's outputs: the weights the allocator
sums layers' predicted errors with.

A whitened spectrum predicts a layer's *own* output error at every rank, but layers pass
their errors on unequally: MiniLM's attention output projections reach the embedding
through a residual stream and a LayerNorm, its feed-forward expansions through a GELU and
another projection. Each layer is truncated alone to the rank that keeps PROBE_ENERGY of
its spectrum and the model run end to end (the shared sensitivity measurement, one model
per layer); its weight is the output noise-to-signal ratio over the error it was predicted
to make. On MiniLM (tools/bench_factorize.py) the weighted allocation halves the held-out
output error of the unweighted one at 10-50 % of the parameters saved. Plain SVD's
prediction is of the weight's error, not the layer's output, so its ratio to the outputs'
depends on the rank; plain spectra are summed unweighted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxsqueeze.lowrank.svd import LowRank
from onnxsqueeze.stages.sensitivity import exact_scores

#: The spectrum share each layer keeps while its weight is measured (a predicted error of
#: 10 %: large enough to measure above float noise, small enough to stay near linear).
PROBE_ENERGY = 0.9
#: Weights are kept within this factor of their median: a layer whose probe barely moved
#: the outputs must not be truncated to rank 1 on the strength of one measurement.
SPREAD = 100.0


def propagation_weights(
    spectra: Mapping[str, LowRank],
    build: Callable[[Mapping[str, int]], ir.Model],
    runs: Callable[[Iterable[ir.Model]], Iterable[list[dict]]],
    reference: Sequence[Mapping[str, Any]],
) -> dict[str, float]:
    """Layer -> output error per unit of its own predicted error. ``build(ranks)``: the
    model with the layers of ``ranks`` truncated to those ranks; ``runs``: the outputs of
    such models, in order, on the samples ``reference`` holds the original's outputs for."""
    probes = {n: min(low.rank_for_energy(PROBE_ENERGY), low.ranks) for n, low in spectra.items()}
    names = list(probes)

    def only(kept: Sequence[str]) -> ir.Model:
        return build({n: r for n, r in probes.items() if n not in kept})

    scores = exact_scores(names, only, runs, reference)
    raw = {n: scores[n] / max(spectra[n].error(probes[n]), 1e-12) for n in names}
    finite = [v for v in raw.values() if np.isfinite(v) and v > 0]
    if not finite:
        return dict.fromkeys(names, 1.0)
    median = float(np.median(finite))
    low, high = median / SPREAD, median * SPREAD
    return {n: float(np.clip(v if np.isfinite(v) else high, low, high)) for n, v in raw.items()}
