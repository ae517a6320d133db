"""Candidate models measured on workers: each is run on the judge's feeds as a Ray task.

The driver builds the candidates one by one (graph work, in order) and ships each as it is
built, so the workers run one while the next is built; at most ``size + 1`` are in flight.
A model travels as its graph without weights plus one object reference per weight: the
candidates of one search share most weights (the float ones, and the rounded ones the
family keeps between builds), and each distinct tensor goes to Ray's object store once,
where workers read it in place (shared memory on one machine). The feeds go there once per
search. Results come back in order; a model that cannot be shipped (external weights,
> 1.5 GB) is run here in its turn. Sessions are made exactly as this process makes them
(``Session.from_parts``), so the outputs are the same.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxsqueeze.distributed.retries import RETRIES, failed, maybe_die, peak_rss
from onnxsqueeze.distributed.shipping import shippable
from onnxsqueeze.run.session import Session, graph_and_weights


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
    stored: dict[int, tuple[Any, Any]] = {}  # id(tensor) -> (tensor, its object ref)
    pending: collections.deque = collections.deque()

    def ship(model: ir.Model) -> Any:
        graph, detached = graph_and_weights(model)
        refs = {}
        for name, tensor in detached.items():
            if id(tensor) not in stored:  # kept with its tensor, so the id stays its own
                stored[id(tensor)] = (tensor, ray.put(np.ascontiguousarray(tensor.numpy())))
            refs[name] = stored[id(tensor)][1]
        pool.count("models_run")
        return task.remote(graph, [refs], shared, tuple(providers), optimize)

    def result(entry: Any) -> list[dict[str, Any]]:
        if isinstance(entry, ir.Model):
            return Session(entry, providers, optimize=optimize).run_all(feeds)
        try:
            outputs, rss = ray.get(entry)
        except Exception as exc:
            raise failed("measuring a candidate model", exc) from exc
        pool.seen(rss)
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
    def run_model(graph: bytes, refs: list, feeds: list, providers: tuple, optimize: bool):
        maybe_die()
        weights = dict(zip(refs[0], ray.get(list(refs[0].values())), strict=True))
        # onnxruntime's default threads, as the driver's sessions: another count rounds
        # convolutions differently (1e-9 relative on PP-OCR det), and could flip a near tie
        session = Session.from_parts(graph, weights, providers, optimize=optimize)
        return session.run_all(feeds), peak_rss()

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
