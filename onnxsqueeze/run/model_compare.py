"""``onnxsqueeze compare original.onnx squeezed.onnx``: each output's error on the same inputs
and, per tensor, where in the graph the error appears (run.tensor_errors)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

from onnxsqueeze.core.errors import CalibrationDataError
from onnxsqueeze.core.io import load_model
from onnxsqueeze.run.compare import Comparison, compare_runs
from onnxsqueeze.run.probes import probe_feeds
from onnxsqueeze.run.session import Session
from onnxsqueeze.run.tensor_errors import TensorReport, tensor_errors

#: Samples compared when none are given: enough for a mean cosine and top-k, few enough to
#: keep every intermediate tensor of one sample in memory at a time.
DEFAULT_SAMPLES = 4


@dataclasses.dataclass
class ModelComparison:
    original: str
    candidate: str
    samples: int
    inputs: str  # "data" or "generated"
    outputs: Comparison
    tensors: TensorReport | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "original": self.original,
            "candidate": self.candidate,
            "samples": self.samples,
            "inputs": self.inputs,
            "outputs": self.outputs.as_dict()["outputs"],
            "per_tensor": self.tensors.as_dict() if self.tensors else None,
        }


def compare_models(
    original: str | os.PathLike,
    candidate: str | os.PathLike,
    *,
    data: Any = None,
    shapes: Any = None,
    samples: int = DEFAULT_SAMPLES,
    per_tensor: bool = False,
    providers: Sequence[str] | None = None,
) -> ModelComparison:
    reference = load_model(original, validate=False).model
    other = load_model(candidate, validate=False).model
    feeds = probe_feeds(reference, data, shapes, samples, seed=0)[:samples]
    missing = {v.name for v in reference.graph.inputs} - {v.name for v in other.graph.inputs}
    if missing:
        raise CalibrationDataError(
            f"{candidate}: has no input named {', '.join(sorted(missing))} (the models must "
            "share their inputs to be compared)"
        )
    ref_runs = Session(reference, providers, backend="auto").run_all(feeds)
    cand_runs = Session(other, providers, backend="auto").run_all(feeds)
    outputs = compare_runs(ref_runs, cand_runs)
    tensors = tensor_errors(reference, other, feeds, providers) if per_tensor else None
    return ModelComparison(
        str(original),
        str(candidate),
        len(feeds),
        "data" if data is not None else "generated",
        outputs,
        tensors,
    )
