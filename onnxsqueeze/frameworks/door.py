"""What every front door shares once its framework has exported the model: the exported
ONNX model checked against the framework's outputs (the conversion row), squeezed like any
ONNX model, and the squeezed model checked against the framework's outputs too, so a user
sees which step moved the numbers."""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Mapping, Sequence
from typing import Any

import onnx
import onnx_ir as ir

from onnxsqueeze.api import squeeze
from onnxsqueeze.core.errors import ConversionError, first_line
from onnxsqueeze.frameworks.reference import against_framework, budget_miss, conversion_holds
from onnxsqueeze.run.session import Session
from onnxsqueeze.run.signature import input_specs
from onnxsqueeze.stages.budget import DEFAULT_BUDGET


@dataclasses.dataclass
class Export:
    """An exported model and how it was made."""

    model: Any  # onnx.ModelProto or onnx_ir.Model
    framework: str  # "torch 2.13.0"
    exporter: str  # "torch.onnx.export(dynamo=True)"
    seconds: float
    notes: list[str] = dataclasses.field(default_factory=list)
    #: what to tell a user whose inputs the export rejects (a fixed dimension, say)
    hint: str = ""

    @functools.cached_property
    def ir_model(self) -> ir.Model:
        """The export as the engine holds it (converted from a ModelProto once)."""
        return self.model if isinstance(self.model, ir.Model) else ir.from_proto(self.model)

    @functools.cached_property
    def names(self) -> tuple[list[str], list[str]]:
        """(inputs a caller feeds, outputs), in the exported model's order."""
        outputs = [v.name or "" for v in self.ir_model.graph.outputs]
        return [spec.name for spec in input_specs(self.ir_model)], outputs


def failure(exc: BaseException) -> str:
    """What a converter's exception says, with the error underneath it first when there is
    one (skl2onnx wraps a one-line TypeError in a dump of every node attribute)."""
    cause = exc.__cause__ or exc.__context__
    if cause is not None:
        return f"{type(cause).__name__}: {first_line(cause, 200)}"
    return first_line(exc, 300)


def timed_export(export: Any) -> tuple[Any, float]:
    """``export()`` and the seconds it took."""
    started = time.perf_counter()
    result = export()
    return result, time.perf_counter() - started


def as_proto(squeezed: tuple[ir.Model, Any]) -> tuple[onnx.ModelProto, Any]:
    """What a front door hands back: (ModelProto, Report)."""
    model, report = squeezed
    return ir.to_proto(model), report


def squeeze_export(
    export: Export,
    feeds: Sequence[Mapping[str, Any]],
    reference: Sequence[Mapping[str, Any]],
    *,
    strict: bool = True,
    providers: Sequence[str] | None = None,
    **options: Any,
) -> tuple[ir.Model, Any]:
    """The exported model checked on ``feeds`` against the framework's ``reference``
    outputs, squeezed (``squeeze``'s ``options``, ``data=feeds`` unless given), and the
    squeezed model checked against the framework too; (onnx_ir model, Report)."""
    model = export.ir_model
    exported = _run(model, feeds, providers, export)
    conversion = against_framework(reference, exported)
    record: dict[str, Any] = {
        "framework": export.framework,
        "exporter": export.exporter,
        "opset": model.opset_imports.get("", None),
        "seconds": round(export.seconds, 3),
        "notes": list(export.notes),
        "samples": len(feeds),
        "exported_vs_framework": conversion,
        "holds": conversion_holds(conversion),
    }
    if not record["holds"] and strict:
        notes = "".join(f"; {note}" for note in export.notes)
        raise ConversionError(
            f"{export.exporter}: the exported ONNX model differs from the {export.framework} "
            f"model on the same inputs ({conversion['summary']}){notes}"
        )
    options.setdefault("data", list(feeds))
    small, report = squeeze(model, providers=providers, strict=strict, **options)
    record["squeezed_vs_framework"] = against_framework(reference, _run(small, feeds, providers))
    report.conversion = record
    quantize = options.get("quantize")
    miss = budget_miss(record["squeezed_vs_framework"], getattr(quantize, "budget", DEFAULT_BUDGET))
    if miss:
        report.warnings.append(f"against the {export.framework} model's outputs the squeezed "
                               f"model misses the budget ({miss})")  # fmt: skip
    if not record["holds"]:
        report.warnings.insert(
            0, f"the exported ONNX model differs from the {export.framework} model "
            f"({conversion['summary']})",
        )  # fmt: skip
    report.warnings[:0] = export.notes
    return small, report


def _run(model: ir.Model, feeds: Sequence[Mapping[str, Any]], providers: Any,
         export: Export | None = None) -> list[dict]:  # fmt: skip
    """Outputs of ``model`` on every feed; an export that rejects an input the framework
    model took is a conversion error naming the sample."""
    session = Session(model, providers)
    outputs = []
    for index, feed in enumerate(feeds):
        try:
            outputs.extend(session.run_all([feed]))
        except Exception as exc:  # noqa: BLE001 - any refusal of an input is the export's
            if export is None:
                raise
            shapes = ", ".join(f"{k} {list(getattr(v, 'shape', []))}" for k, v in feed.items())
            raise ConversionError(
                f"{export.exporter}: the exported ONNX model rejects sample {index} ({shapes}) "
                f"that the {export.framework} model takes: {first_line(exc, 200)}"
                + (f" ({export.hint})" if export.hint else "")
            ) from None
    return outputs
