"""Where a run's independent measurements go: this process, or a pool of workers.

Two parts of a lossy run are many independent pieces of work: calibration (samples whose
statistics merge) and the budget search's sensitivity scores (one candidate model per node).
A pool (``onnxsqueeze.distributed``: Ray) takes them; without one they run here, one after
the other. The stages ask ``current()``; the API sets the pool for the length of a run with
``using()``. It travels in a context variable, like progress, because it is where work
runs, not what is computed: a stage gives the same answer with or without it, and two runs
in two threads never share a pool by accident.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from typing import Any, Protocol

import onnx_ir as ir

from onnxsqueeze.core.errors import PipelineConfigError


class Workers(Protocol):
    """A pool the stages hand independent work to; results come back in order and equal
    what this process would compute."""

    #: How many pieces of work run at once.
    size: int

    def run_models(
        self,
        models: Iterable[ir.Model],
        feeds: Sequence[Mapping[str, Any]],
        providers: Sequence[str],
        optimize: bool,
    ) -> Iterator[list[dict[str, Any]]] | None:
        """Each model's outputs on ``feeds``, in order; None when the pool cannot take these
        models (the caller runs them itself)."""
        ...

    def calibrate(
        self, model: ir.Model, source: Any, options: Any, samples: int | None
    ) -> Any | None:
        """The Calibration of ``model`` on the first ``samples`` of ``source`` (a data path,
        a part of one, or a list of feeds) under CollectOptions ``options``, in shards; None
        when the pool cannot shard this source."""
        ...


def check_size(workers: Any) -> None:
    """``workers=``/``--workers`` is a whole number of at least one (or None)."""
    if workers is not None and (
        isinstance(workers, bool) or not isinstance(workers, int) or workers < 1
    ):
        raise PipelineConfigError(f"workers= must be a whole number >= 1, got {workers!r}")


_CURRENT: ContextVar[Workers | None] = ContextVar("onnxsqueeze_workers", default=None)


def current() -> Workers | None:
    """The pool of the running squeeze, or None (work runs in this process)."""
    return _CURRENT.get()


@contextlib.contextmanager
def using(workers: Workers | None) -> Iterator[None]:
    """Independent work inside the block goes to ``workers`` (None: this process)."""
    token = _CURRENT.set(workers)
    try:
        yield
    finally:
        _CURRENT.reset(token)
