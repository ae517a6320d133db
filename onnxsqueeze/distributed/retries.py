"""When a worker dies (and what a worker tells about itself): Ray retries its work (``RETRIES`` times: a task is run again, an
actor is restarted and its call repeated); past that the run fails with one line saying
what could not be done, and writes nothing.

``ONNXSQUEEZE_FAULT_ONCE`` injects such a death for the tests: set to a file path before
the cluster starts (its workers inherit the environment), the first piece of work that
finds the file missing creates it and kills its own process, as an out-of-memory kill
would. Unset, it does nothing.
"""

from __future__ import annotations

import os

from onnxsqueeze.core.errors import SqueezeError, first_line

RETRIES = 2
FAULT_ONCE = "ONNXSQUEEZE_FAULT_ONCE"


def maybe_die() -> None:
    marker = os.environ.get(FAULT_ONCE)
    if not marker:
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    os._exit(17)


def whereabouts() -> tuple[int, str]:
    """This worker process's peak resident memory so far (bytes) and its Ray node, for
    the report."""
    import resource

    import ray

    node = ray.get_runtime_context().get_node_id()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, node


def failed(what: str, exc: BaseException) -> SqueezeError:
    """A worker's error as the run reports it. An error the engine raised in the worker
    keeps its class (Ray's error derives from it); a death past the retries says so."""
    if isinstance(exc, SqueezeError):
        return exc
    cause = getattr(exc, "cause", None)
    if isinstance(cause, SqueezeError):
        return cause
    return SqueezeError(f"{what} failed on a Ray worker after {RETRIES} retries: {first_line(exc)}")
