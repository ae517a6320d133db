"""PyTorch's front door: ``from_torch(module, args)`` and ``torch.export.save``d ``.pt2`` files.

The dynamo exporter (``torch.onnx.export(..., dynamo=True)``) hands over an onnx_ir model,
which goes into the engine without a serialisation round trip; the TorchScript exporter is
the fallback when dynamo fails, and the report says so. The module itself runs the sample
and every data sample, so the export and the squeezed model are both judged against it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from onnxsqueeze.core.errors import ConversionError, first_line
from onnxsqueeze.core.optional import require
from onnxsqueeze.frameworks.door import Export, as_proto, squeeze_export, timed_export

FIXED_DIM_HINT = (
    "an exporter fixes every dimension it is not told is dynamic: pass dynamic_shapes= "
    "(torch.export.Dim) for the ones your inputs vary"
)


def from_torch(
    module: Any,
    args: Any,
    *,
    kwargs: Mapping[str, Any] | None = None,
    dynamic_shapes: Any = None,
    data: Iterable[Any] | None = None,
    opset: int | None = None,
    **options: Any,
) -> tuple[Any, Any]:
    """Export ``module`` on ``args`` (a tensor or a tuple of them) and squeeze it; ``data``:
    more inputs of the same form as ``args``, run through the module as well; ``options``:
    ``squeeze``'s. Returns (onnx.ModelProto, Report) whose ``conversion`` judges the export
    and the squeezed model against the module's own outputs."""
    torch = require("torch", "torch", "from_torch")
    args = args if isinstance(args, tuple) else (args,)
    kwargs = dict(kwargs or {})
    module.eval()
    export = _export(torch, module, args, kwargs, dynamic_shapes, opset)
    samples = [(args, kwargs)] + [(_args(d), kwargs) for d in data or ()]
    feeds, reference = _references(torch, module, export, samples)
    return as_proto(squeeze_export(export, feeds, reference, **options))


def program_export(path: str) -> tuple[Export, Any, list[dict]]:
    """A ``torch.export.save``d program (its JSON graph and raw weights; the example inputs
    are read by torch's weights-only loader) exported; with a ``predict(feed)`` that runs
    the program, and its example inputs as feeds."""
    torch = require("torch", "torch", f"{path}: a .pt2 program")
    try:
        program = torch.export.load(path)
    except Exception as exc:  # noqa: BLE001 - torch's refusal, in one line
        raise ConversionError(
            f"{path}: torch.export.load cannot read it: {first_line(exc)}"
        ) from None
    args, kwargs = program.example_inputs or ((), {})
    export = _export(torch, program, tuple(args), dict(kwargs), None, None)
    inputs, outputs = export.names
    module = program.module()

    def predict(feed: Mapping[str, Any]) -> dict:
        tensors = tuple(torch.from_numpy(np.asarray(feed[n])) for n in inputs)
        return _outputs(torch, module, tensors, {}, outputs)

    examples = []
    if program.example_inputs is not None:
        examples, _ = _references(torch, module, export, [(tuple(args), dict(kwargs))])
    return export, predict, examples


def _outputs(torch, module, args: tuple, kwargs: dict, names: list[str]) -> dict:
    """The module's output tensors on one sample, by the exported model's output names."""
    with torch.no_grad():
        leaves = _tensors(torch, module(*args, **kwargs))
    return {n: t.detach().cpu().numpy() for n, t in zip(names, leaves, strict=False)}


def _tensors(torch, result: Any) -> list:
    return [t for t in torch.utils._pytree.tree_leaves(result) if isinstance(t, torch.Tensor)]


def _export(torch, module, args, kwargs, dynamic_shapes, opset) -> Export:
    notes: list[str] = []
    version = f"torch {torch.__version__.split('+')[0]}"

    def dynamo():
        with _quiet():
            program = torch.onnx.export(module, args, kwargs=kwargs, dynamic_shapes=dynamic_shapes,
                                        dynamo=True, opset_version=opset, verbose=False)  # fmt: skip
        return program.model

    try:
        model, seconds = timed_export(dynamo)
        exporter = "torch.onnx.export(dynamo=True)"
    except Exception as exc:  # noqa: BLE001 - any failure of dynamo is the fallback's cue
        if isinstance(module, torch.export.ExportedProgram):
            raise ConversionError(f"torch.onnx.export: {first_line(exc, 300)}") from None
        notes.append(f"the dynamo exporter failed ({first_line(exc, 200)}); exported with the "
                     "TorchScript exporter")  # fmt: skip
        model, seconds = timed_export(lambda: _torchscript(torch, module, args, kwargs,
                                                           dynamic_shapes, opset))  # fmt: skip
        exporter = "torch.onnx.export(dynamo=False)"
    return Export(model, version, exporter, seconds, notes, hint=FIXED_DIM_HINT)


def _torchscript(torch, module, args, kwargs, dynamic_shapes, opset) -> Any:
    import onnx

    names = [f"input_{i}" for i in range(len(args))]
    axes = {}
    if isinstance(dynamic_shapes, (tuple, list)):
        for name, spec in zip(names, dynamic_shapes, strict=False):
            if isinstance(spec, Mapping):
                axes[name] = {int(d): f"{name}_{d}" for d in spec}
    buffer = io.BytesIO()
    with _quiet():
        torch.onnx.export(module, args + ((kwargs,) if kwargs else ()), buffer, dynamo=False,
                          input_names=names, dynamic_axes=axes or None,
                          opset_version=opset or 17)  # fmt: skip
    return onnx.load_from_string(buffer.getvalue())


def _references(torch, module, export: Export, samples) -> tuple[list[dict], list[dict]]:
    """Feeds by the ONNX model's input names and the module's outputs by its output names."""
    inputs, outputs = export.names
    feeds, reference = [], []
    for args, kwargs in samples:
        tensors = _tensors(torch, (args, kwargs))
        if len(tensors) != len(inputs):
            raise ConversionError(
                f"the exported model takes {len(inputs)} input(s) ({', '.join(inputs)}), "
                f"the sample gives {len(tensors)} tensor(s)"
            )
        feeds.append({n: t.detach().cpu().numpy() for n, t in zip(inputs, tensors, strict=True)})
        reference.append(_outputs(torch, module, args, kwargs, outputs))
    return feeds, reference


def _args(sample: Any) -> tuple:
    return sample if isinstance(sample, tuple) else (sample,)


@contextlib.contextmanager
def _quiet():
    """The exporters' progress lines and warnings stay off the user's terminal."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)
