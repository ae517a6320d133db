"""How much output error each quantized node causes: the ranking the accuracy budget uses.

Two measurements, both on calibration-style samples and as noise-to-signal ratios (NSR =
||quantized - float||^2 / ||float||^2, so errors of different outputs compare):

- ``exact``: a model with only that node quantized, run end to end; its output NSR. One
  model per node, so used when there are few candidates (magika, silero, small CNNs).
- ``local``: one run of the fully quantized model and one of the float model with every
  candidate's input and output exposed; a node's score is the relative error of its output
  minus the largest relative error of its inputs, i.e. the error it adds itself. Relative
  error is L1 (sum |q - f| / sum |f|) here, so one huge element cannot hide the damage done
  to all the ordinary ones. Two runs for any model size.
  Only main-graph tensors can be exposed; nodes inside If/Loop bodies score 0 (ranked last).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxsqueeze.core import progress
from onnxsqueeze.core.graphs import is_constant
from onnxsqueeze.core.io import initializer_bytes
from onnxsqueeze.core.spill import SpilledMemo
from onnxsqueeze.run.compare import compare_runs
from onnxsqueeze.run.memory import give_back_after
from onnxsqueeze.run.session import Session

logger = logging.getLogger(__name__)


def output_nsr(
    reference: Sequence[Mapping[str, Any]], candidate: Sequence[Mapping[str, Any]]
) -> float:
    """The worst output's noise-to-signal ratio (from its SQNR over the samples)."""
    comparison = compare_runs(reference, candidate)
    worst = 0.0
    for out in comparison.outputs:
        if out.mismatch:
            return float("inf")
        if out.sqnr_db != float("inf"):
            worst = max(worst, 10 ** (-out.sqnr_db / 10))
    return worst


def exact_scores(
    candidates: Sequence[str],
    build: Callable[[Sequence[str]], ir.Model],
    runs: Callable[[Iterable[ir.Model]], Iterable[list[dict]]],
    reference: Sequence[Mapping[str, Any]],
) -> dict[str, float]:
    """Output NSR with only each candidate quantized (every other candidate excluded).
    ``runs`` takes the candidates' models as they are built and gives back their outputs
    in order (one after the other here, or on a pool's workers: see Judge.run_many)."""
    names = list(candidates)
    models = (build([c for c in names if c != name]) for name in names)
    scores = {}
    for index, (name, outputs) in enumerate(zip(names, runs(models), strict=True)):
        scores[name] = output_nsr(reference, outputs)
        progress.step("sensitivity", index + 1, len(names))
    return scores


def local_scores(
    float_model: ir.Model,
    quantized: ir.Model,
    candidates: Mapping[str, ir.Node],
    feeds: Sequence[Mapping[str, Any]],
    providers: Sequence[str],
) -> dict[str, float]:
    """Error each candidate adds to its own output (see module docstring)."""
    graph_values = {v.name: v for n in float_model.graph for v in n.outputs if v.name}
    io: dict[str, tuple[list[str], str]] = {}
    for name, node in candidates.items():
        out = node.outputs[0].name if node.outputs else None
        if node.graph is not float_model.graph or out not in graph_values:
            continue
        ins = [
            v.name
            for v in node.inputs
            if v is not None and not is_constant(v) and v.name in graph_values
        ]
        io[name] = (ins, out)
    wanted = sorted({t for ins, out in io.values() for t in (*ins, out)})
    # the float run's activations wait on disk in a file run (SpilledMemo), one sample read
    # back at a time beside the quantized run's: held whole, a 1.3 GB transformer's 32
    # samples took 0.45 GiB beside the float session
    f_runs = SpilledMemo(min_bytes=0)
    for index, f in enumerate(_run_exposed(float_model, wanted, feeds, providers)):
        f_runs[index] = tuple(f.get(t) for t in wanted)
    sums = np.zeros((len(wanted), 2))
    for index, q in enumerate(_run_exposed(quantized, wanted, feeds, providers)):
        for row, (tensor, a) in enumerate(zip(wanted, f_runs[index], strict=True)):
            b = q.get(tensor)
            if a is None or b is None or a.shape != b.shape:
                continue
            a, b = a.astype(np.float64), b.astype(np.float64)
            finite = np.isfinite(a) & np.isfinite(b)
            sums[row] += (np.sum(np.abs(a - b)[finite]), np.sum(np.abs(a[finite])))
    nsr = {t: float(n / s) if s > 0 else 0.0 for t, (n, s) in zip(wanted, sums, strict=True)}
    scores = dict.fromkeys(candidates, 0.0)
    for name, (ins, out) in io.items():
        before = max((nsr.get(t, 0.0) for t in ins), default=0.0)
        scores[name] = max(nsr.get(out, 0.0) - before, 0.0)
    return scores


def _run_exposed(
    model: ir.Model, names: Sequence[str], feeds: Sequence[Mapping[str, Any]], providers
) -> Iterator[dict[str, np.ndarray]]:
    """Run a copy of ``model`` whose outputs also include ``names`` (main-graph values), a
    sample at a time."""
    exposed = model.clone()
    graph = exposed.graph
    present = {o.name for o in graph.outputs}
    values = {v.name: v for n in graph for v in n.outputs if v.name}
    for name in names:
        value = values.get(name)
        if value is None or name in present:
            continue
        if value.type is None:  # every exposed tensor is a quantizable (float) activation
            value.type = ir.TensorType(ir.DataType.FLOAT)
        graph.outputs.append(value)
        present.add(name)
    give_back_after(initializer_bytes(model))  # what the last candidate left, first
    session = Session(exposed, providers)
    for feed in feeds:
        yield session.run(feed)
    del session
    give_back_after(initializer_bytes(model))
