"""Candidate models measured on workers: each is run on the judge's feeds as a Ray task.

The driver builds the candidates one by one (graph work, in order) and ships each as it is
built, so the workers run one while the next is built; at most ``size + 1`` are in flight.
A model travels as ``shipping.Shipper`` sends it: its graph, each weight already in a file
as where it lies, each other distinct tensor once through Ray's object store (the
candidates of one search share most weights: the float ones, and the rounded ones the
family keeps between builds). The feeds go there once per search. Results come back in
order; a model that cannot be shipped (external weights in a subgraph, > 1.5 GB of weights
that must stay in its graph) is run here in its turn. Sessions are made as this process
makes them (``shipping.open_session``), so the outputs are the same.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import onnx_ir as ir

from onnxsqueeze.distributed.retries import RETRIES, failed, maybe_die, whereabouts
from onnxsqueeze.distributed.shipping import ShippedModel, Shipper, open_session, shippable
from onnxsqueeze.run.session import Session


def run_models(
    pool: Any,
    models: Iterable[ir.Model],
    feeds: Sequence[Mapping[str, Any]],
    providers: Sequence[str],
    optimize: bool,
) -> Iterator[list[dict[str, Any]]]:
    """Each model's outputs on ``feeds``, in order (see the module docstring)."""
    ray = pool.ray
    task = _task(ray).options(num_cpus=pool.threads)
    shared = ray.put([dict(feed) for feed in feeds])
    shipper = Shipper(ray, pool.local, pool.count)
    pending: collections.deque = collections.deque()

    def ship(model: ir.Model) -> Any:
        pool.count("models_run")
        shipped = shipper(model)
        # the graph apart and the references in a list: wrapped in one object, they made
        # the driver and each worker hold 0.45 GiB more on MiniLM's search
        return task.remote(
            shipped.graph, [shipped.weights], shipped.parts, shared, tuple(providers), optimize
        )

    def result(entry: Any) -> list[dict[str, Any]]:
        if isinstance(entry, ir.Model):
            return Session(entry, providers, optimize=optimize).run_all(feeds)
        try:
            outputs, where = ray.get(entry)
        except Exception as exc:
            raise failed("measuring a candidate model", exc) from exc
        pool.seen(where)
        return outputs

    for model in models:
        pending.append(ship(model) if shippable(model) else model)
        del model
        while len(pending) > pool.size:
            yield result(pending.popleft())
    while pending:
        yield result(pending.popleft())


def warm_up(pool: Any) -> None:
    """Start every worker's process and its imports now, without waiting: the first real
    task then finds onnxruntime and the Numba kernels loaded."""
    remote = _warm(pool.ray).options(num_cpus=pool.threads)
    pool.warming = [remote.remote() for _ in range(pool.size)]


@functools.cache
def _task(ray: Any) -> Any:
    @ray.remote(max_retries=RETRIES)
    def run_model(
        graph: bytes, weights: list, parts: bool, feeds: list, providers: tuple, optimize: bool
    ):
        maybe_die()
        shipped = ShippedModel(graph, weights[0], parts)
        # onnxruntime's default threads, as the driver's sessions: another count rounds
        # convolutions differently (1e-9 relative on PP-OCR det), and could flip a near tie
        session = open_session(shipped, ray, providers, optimize)
        return session.run_all(feeds), whereabouts()

    return run_model


@functools.cache
def _warm(ray: Any) -> Any:
    @ray.remote
    def warm() -> bool:
        import numpy as np
        import onnxruntime  # noqa: F401

        import onnxsqueeze.calib.collector  # noqa: F401
        from onnxsqueeze.calib.observers import observer_for

        observer_for("percentile").update(np.zeros(4, np.float32))  # loads the kernels
        return True

    return warm
