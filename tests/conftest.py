"""Shared fixtures: small ONNX-text models and access to the corpus manifest."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import onnx
import onnx.parser
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "models"))

MLP_TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
mlp (float[N, 4] x) => (float[N, 3] y) <float[4, 3] W = {1,2,3,4,5,6,7,8,9,10,11,12}, float[3] b = {0.5, -1, 2}>
{
  h = MatMul(x, W)
  y = Add(h, b)
}
"""


def parse(text: str) -> onnx.ModelProto:
    model = onnx.parser.parse_model(text)
    onnx.checker.check_model(model)
    return model


@pytest.fixture
def mlp() -> onnx.ModelProto:
    return parse(MLP_TEXT)


@pytest.fixture
def mlp_path(tmp_path: Path, mlp: onnx.ModelProto) -> Path:
    path = tmp_path / "mlp.onnx"
    onnx.save(mlp, path)
    return path


def parse_with(text: str, arrays: dict) -> onnx.ModelProto:
    """A model from ONNX text with ``arrays`` (name -> array) added as its initializers."""
    import onnx.numpy_helper

    proto = onnx.parser.parse_model(text)
    for name, array in arrays.items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(array, name))
    return proto


def apply_pass(pass_class, proto: onnx.ModelProto, **options) -> tuple[onnx.ModelProto, dict]:
    """``pass_class(**options)`` on a copy of ``proto`` (min_elements 0 unless given, where
    the pass has one): the
    checker-valid result and the pass's stats."""
    import dataclasses

    import onnx_ir as ir

    model = ir.serde.deserialize_model(proto)
    fields = {f.name for f in dataclasses.fields(pass_class.Options)}
    defaults = {"min_elements": 0} if "min_elements" in fields else {}
    result = pass_class(**{**defaults, **options})(model)
    out = ir.serde.serialize_model(model)
    onnx.checker.check_model(out, full_check=True)
    return out, result.stats


def run_ort(model: onnx.ModelProto | str | Path, feeds: dict) -> list:
    import onnxruntime as ort

    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, feeds)


def weighted_model(
    op: str, weight, x_shape: list[int], opset: int = 13, ir_version: int = 8, **attrs
) -> onnx.ModelProto:
    """``y = op(x, w)`` with the constant weight ``w`` (a Gather reads it as its table, with
    int64 ids ``x``); shapes inferred."""
    import onnx.numpy_helper

    gather = op == "Gather"
    x_type = onnx.TensorProto.INT64 if gather else onnx.TensorProto.FLOAT
    x = onnx.helper.make_tensor_value_info("x", x_type, x_shape)
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    node = onnx.helper.make_node(op, ["w", "x"] if gather else ["x", "w"], ["y"], **attrs)
    weights = [onnx.numpy_helper.from_array(weight, "w")]
    graph = onnx.helper.make_graph([node], "g", [x], [y], weights)
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    proto.ir_version = ir_version
    return onnx.shape_inference.infer_shapes(proto, strict_mode=True)


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The edge-case suite's folder (tests/edges/harness.py): a small model, its data and a
    file outside it; the current directory set to it."""
    from edges.harness import make_workspace

    made = make_workspace(tmp_path)
    monkeypatch.chdir(made.root)
    return made


def require_corpus(entry) -> None:
    """Skip a test whose corpus model is not built, or fail it where the corpus must be there
    (ONNXSQUEEZE_REQUIRE_CORPUS=1: CI and tools/test.sh, which build it first)."""
    if entry.available():
        return
    message = f"corpus model {entry.name} not built (python models/build_corpus.py)"
    if os.environ.get("ONNXSQUEEZE_REQUIRE_CORPUS") == "1":
        pytest.fail(message)
    pytest.skip(message)


# ---------------------------------------------------------------- the Ray tests' models and data

DIGITS = REPO / "models" / "digits_cnn.onnx"


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory) -> Path:
    """160 real digit images, one per .npz, as a user's calibration folder."""
    import numpy as np

    images = np.load(REPO / "models" / "digits_test.npz")["image"]
    folder = tmp_path_factory.mktemp("digits")
    for i in range(160):
        np.savez(folder / f"{i:04d}.npz", image=images[i : i + 1])
    return folder


@pytest.fixture(scope="module")
def digits_external(tmp_path_factory) -> Path:
    """The digits CNN with every weight in an external data file."""
    path = tmp_path_factory.mktemp("external") / "digits.onnx"
    onnx.save(
        onnx.load(DIGITS), path, save_as_external_data=True, location="digits.onnx.data",
        size_threshold=0,
    )  # fmt: skip
    return path
