"""Progress of long steps (calibration, sensitivity, the budget search, timing rounds) for
whoever asked to see it: the CLI draws a bar, a library caller passes nothing and pays nothing.

The callback travels in a context variable rather than through every stage's arguments: it is
presentation, not part of what a stage computes, and a context variable is per thread and per
task, so two squeezes in one process never draw on each other's bar.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar

Callback = Callable[[str, int, "int | None"], None]

_CALLBACK: ContextVar[Callback | None] = ContextVar("onnxsqueeze_progress", default=None)
_STAGE: ContextVar[str] = ContextVar("onnxsqueeze_progress_stage", default="")


@contextlib.contextmanager
def reporting(callback: Callback | None) -> Iterator[None]:
    """Steps inside the block go to ``callback(label, done, total)``."""
    token = _CALLBACK.set(callback)
    try:
        yield
    finally:
        _CALLBACK.reset(token)


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Steps inside the block are labelled ``name: step``."""
    token = _STAGE.set(name)
    try:
        yield
    finally:
        _STAGE.reset(token)


def step(label: str, done: int, total: int | None = None) -> None:
    callback = _CALLBACK.get()
    if callback is not None:
        prefix = _STAGE.get()
        callback(f"{prefix}: {label}" if prefix else label, done, total)


def current_stage() -> str:
    """The stage the running step belongs to ("quantize static"; "" outside any)."""
    return _STAGE.get()
