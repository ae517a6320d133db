"""The shape of an onnxsqueeze pass: an onnx_ir in-place pass with typed options and stats.

Three additions to ``ir.passes.InPlacePass`` that the pipeline needs: a kebab-case ``name``
and one-line ``summary`` (for ``--list-passes``), a frozen ``Options`` dataclass (so a
pipeline can be built from strings and shown back), and ``lossless`` (lossless passes are
verified against float tolerance and rolled back when they change outputs). It lives with
the model, below the passes, so that a pass imports nothing above it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import onnx_ir as ir


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """Options of a pass that takes none."""


@dataclasses.dataclass
class SqueezeResult(ir.passes.PassResult):
    """A pass result plus ``stats``: what the pass changed, for the report."""

    stats: dict[str, Any] = dataclasses.field(default_factory=dict)


class SqueezePass(ir.passes.InPlacePass):
    """Base of onnxsqueeze passes. Subclasses set the class attributes and ``call``."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    lossless: ClassVar[bool] = True
    #: Its output is loaded in a child process before this one (runtime.crashes_onnxruntime):
    #: graphs onnxruntime's optimizers meet rarely, which may crash it rather than raise.
    preflight: ClassVar[bool] = False
    Options: ClassVar[type] = NoOptions

    def __init__(self, options: Any = None, **overrides: Any) -> None:
        super().__init__()
        if options is None:
            options = self.Options()
        if overrides:
            options = dataclasses.replace(options, **overrides)
        self.options = options

    def tolerance(self, default: float) -> float:
        """Relative output change this pass may cause; exact rewrites keep the pipeline's.

        Passes that reassociate float arithmetic (fusions) declare an ``rtol`` option.
        """
        rtol = getattr(self.options, "rtol", None)
        return max(default, rtol) if rtol is not None else default

    def describe(self) -> str:
        """``name`` plus the options that differ from the defaults."""
        default = self.Options()
        changed = [
            f"{f.name}={getattr(self.options, f.name)!r}"
            for f in dataclasses.fields(self.options)
            if getattr(self.options, f.name) != getattr(default, f.name)
            and not f.metadata.get("hidden")
        ]
        return f"{self.name}({', '.join(changed)})" if changed else self.name
