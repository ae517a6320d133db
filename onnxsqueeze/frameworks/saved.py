"""A framework's saved model squeezed from the command line: ``onnxsqueeze model.pt2 -o
small.onnx`` (or a ``.keras`` file, a SavedModel folder, a ``.tflite`` file). The model is
exported, run by its framework on ``--data`` (or on the program's example inputs, or on
generated inputs shaped by ``--shape``), squeezed and written like an ONNX input would be."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from onnxsqueeze.core.io import save_model
from onnxsqueeze.frameworks.door import squeeze_export
from onnxsqueeze.run.feeds import load_feeds
from onnxsqueeze.run.probes import probe_feeds
from onnxsqueeze.run.signature import input_specs

#: Generated inputs a file is exported, judged and squeezed on when no --data is given.
GENERATED_SAMPLES = 32


def squeeze_saved(
    path: str, kind: str, output: str | os.PathLike, *, data: Any = None, shapes: Any = None,
    external_data: bool | None = None, **options: Any,
) -> Any:  # fmt: skip
    """Export the ``kind`` of saved model at ``path``, squeeze it and write ``output``
    atomically; the Report (with its ``conversion``)."""
    if kind == "pt2":
        from onnxsqueeze.frameworks.torch_door import program_export

        export, predict, examples = program_export(path)
    else:
        from onnxsqueeze.frameworks.keras_door import file_export

        export, predict, examples = file_export(path, kind)
    model = export.ir_model
    if data is not None:
        feeds = examples + load_feeds(data, input_specs(model))
    else:
        feeds = examples or probe_feeds(model, None, shapes, GENERATED_SAMPLES, 0)
    reference = [predict(feed) for feed in feeds]
    squeezed, report = squeeze_export(export, feeds, reference, shapes=shapes, **options)
    saved = save_model(squeezed, output, external_data=external_data)
    report.source = path
    report.output = str(saved)
    report.file_bytes_before = _bytes(Path(path))
    report.file_bytes_after = saved.stat().st_size + _bytes(saved.with_name(saved.name + ".data"))
    return report


def _bytes(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size if path.is_file() else 0
