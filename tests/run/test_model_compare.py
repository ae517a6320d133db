"""``onnxsqueeze compare``: output errors, and per tensor where the error appears."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxsqueeze.cli import main
from onnxsqueeze.run.model_compare import compare_models
from tests.conftest import parse_with, require_corpus

import corpus

CHAIN = """
<ir_version: 8, opset_import: ["" : 17]>
chain (float[N, 16] x) => (float[N, 8] y) <float[16, 32] w1, float[32, 8] w2, float[8] b>
{
  h = MatMul(x, w1)
  r = Relu(h)
  m = MatMul(r, w2)
  y = Add(m, b)
}
"""


def _chain(tmp_path: Path) -> tuple[Path, Path]:
    """The chain, and a copy with a bad node injected after the Relu (its output keeps 'r')."""
    rng = np.random.default_rng(0)
    arrays = {
        "w1": rng.standard_normal((16, 32)).astype(np.float32),
        "w2": rng.standard_normal((32, 8)).astype(np.float32),
        "b": rng.standard_normal(8).astype(np.float32),
    }
    good = parse_with(CHAIN, arrays)
    bad = onnx.ModelProto()
    bad.CopyFrom(good)
    relu = next(n for n in bad.graph.node if n.op_type == "Relu")
    relu.output[0] = "r_raw"
    bad.graph.initializer.append(onnx.numpy_helper.from_array(np.float32(1.5), "k"))
    bad.graph.node.insert(2, onnx.helper.make_node("Mul", ["r_raw", "k"], ["r"]))
    onnx.checker.check_model(bad)
    paths = tmp_path / "good.onnx", tmp_path / "bad.onnx"
    onnx.save(good, paths[0])
    onnx.save(bad, paths[1])
    return paths


def test_per_tensor_names_the_injected_bad_node(tmp_path):
    good, bad = _chain(tmp_path)
    result = compare_models(good, bad, per_tensor=True)
    rows = {t.name: t for t in result.tensors.tensors}
    assert rows["h"].rel_rms == 0 and not rows["h"].is_jump()
    assert result.tensors.first_jump.name == "r" and rows["r"].op == "Relu"
    assert rows["r"].rel_rms == pytest.approx(0.5, rel=1e-5) and rows["r"].inherited == 0
    assert rows["m"].inherited == rows["r"].rel_rms and not rows["m"].is_jump()
    assert result.outputs.outputs[0].cosine > 0.99  # a scale: the direction stays
    same = compare_models(good, good, per_tensor=True)
    assert same.tensors.first_jump is None and all(t.rel_rms == 0 for t in same.tensors.tensors)


def test_cli_compare_prints_the_first_jump_and_writes_json(tmp_path, capsys):
    good, bad = _chain(tmp_path)
    out = tmp_path / "compare.json"
    assert main(["compare", str(good), str(bad), "--per-tensor", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "first jump: 'r' (Relu" in text and "<< first jump" in text
    report = json.loads(out.read_text())
    assert report["schema"] == "onnxsqueeze.compare"
    assert report["per_tensor"]["first_jump"] == "r"
    assert report["outputs"][0]["name"] == "y" and report["outputs"][0]["sqnr_db"] > 0


def test_compare_refuses_models_without_the_same_inputs(tmp_path, capsys):
    good, _ = _chain(tmp_path)
    other = tmp_path / "other.onnx"
    proto = onnx.load(good)
    proto.graph.input[0].name = "z"
    proto.graph.node[0].input[0] = "z"
    onnx.save(proto, other)
    assert main(["compare", str(good), str(other)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no input named x" in err[0]


def test_per_tensor_on_a_statically_quantized_corpus_model(tmp_path):
    """PP-OCR's text-direction classifier quantized statically (Q/DQ): the first tensor whose
    error jumps is named, matched tensors get their error after the Q/DQ pair too."""
    entry = corpus.get("ppocr_cls")
    require_corpus(entry)
    out = tmp_path / "cls_int8.onnx"
    code = main(
        [str(entry.path), "-o", str(out), "--data", str(entry.probe_dir), "--quantize", "static"]
        + ["--max-error", "1", "--min-cosine", "0", "-q"]
    )
    assert code == 0
    result = compare_models(entry.path, out, data=entry.probe_dir, per_tensor=True)
    report = result.tensors
    assert report.first_jump is not None
    first = report.first_jump
    assert first.rel_rms > 1e-3 and first.inherited * 10 < first.rel_rms
    before = [t for t in report.tensors if t.index < first.index]
    assert all(t.rel_rms <= 1e-3 for t in before)
    assert sum(t.after_qdq is not None for t in report.tensors) >= 10
    assert len(report.tensors) > 50
    assert result.outputs.outputs[0].top1_agreement is not None
