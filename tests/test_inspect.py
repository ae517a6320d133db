"""``onnxsqueeze inspect``: the model's facts without its weights, on every corpus model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxsqueeze.cli import main
from tests.conftest import require_corpus, weighted_model

import corpus


def _inspect(path: Path, tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "inspect.json"
    assert main(["inspect", str(path), "--json", str(out), "-q", *extra]) == 0
    report = json.loads(out.read_text())
    assert report["schema"] == "onnxsqueeze.inspect" and report["schema_version"] == 1
    return report


@pytest.mark.parametrize("entry", corpus.MODELS, ids=lambda e: e.name)
def test_inspect_every_corpus_model(entry, tmp_path):
    require_corpus(entry)
    report = _inspect(entry.path, tmp_path)
    proto = onnx.load(str(entry.path))
    assert report["nodes"] == sum(report["ops"].values()) >= len(proto.graph.node)
    weights = sum(d["bytes"] for d in report["params_by_dtype"].values())
    # from dims (initializers, Constant nodes, subgraphs): within what the file holds, most of it
    assert 0.5 * proto.ByteSize() < weights <= proto.ByteSize()
    assert [i["name"] for i in report["inputs"]] == [
        i.name for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}
    ]
    assert report["quantization"]["state"] == "float"
    assert report["squeeze"]["passes"][0] == "cleanup"


def test_inspect_reports_subgraphs_and_dynamic_dims(tmp_path):
    entry = corpus.get("silero_vad")
    require_corpus(entry)
    report = _inspect(entry.path, tmp_path)
    assert len(report["subgraphs"]) > 10 and report["subgraphs"][0]["where"].startswith("If ")
    assert any(i["dynamic"] for i in report["inputs"])


def test_inspect_a_large_external_data_model_reads_no_weights(tmp_path):
    """A 3 GiB tensor in a sparse external file: inspect takes its size from the dims, reads
    none of it, and names the data file."""
    rows = 3 * 2**30 // (4 * 1024)
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", rows])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 1024])
    weight = onnx.TensorProto(name="w", data_type=onnx.TensorProto.FLOAT, dims=[rows, 1024])
    weight.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", "big.data"), ("offset", "0"), ("length", str(rows * 4096))):
        weight.external_data.add(key=key, value=value)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [weight]
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    onnx.save(model, tmp_path / "big.onnx")
    with open(tmp_path / "big.data", "wb") as data:
        data.truncate(rows * 4096)  # sparse: no disk used, but reading it would take 3 GiB
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    report = _inspect(tmp_path / "big.onnx", tmp_path)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert report["params_by_dtype"]["float"]["bytes"] == rows * 4096
    assert report["external_files"] == {"big.data": rows * 4096}
    assert report["params_by_op"] == {"MatMul": rows * 4096}
    assert grown < 200 * 1024  # KiB: nowhere near the 3 GiB a read would take


def test_inspect_tells_quantized_models_apart(tmp_path):
    import onnxsqueeze

    weight = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    proto = weighted_model("MatMul", weight, ["n", 64])
    quantized = onnxsqueeze.squeeze(proto, quantize="dynamic", verify=False).model
    onnx.save(quantized, tmp_path / "q.onnx")
    report = _inspect(tmp_path / "q.onnx", tmp_path)
    assert report["quantization"]["state"] == "quantized (activations)"
    assert report["quantization"]["integer_ops"]["MatMulInteger"] == 1
    assert report["quantization"]["low_bit_weight_share"] > 0.5
    assert any("already quantized" in line for line in report["squeeze"]["notes"])
    # weight-only int8 stored to fold back at load (int8 + Cast + Mul, no Q/DQ op)
    folded = onnxsqueeze.squeeze(proto, quantize="weights-int8", verify=False).model
    onnx.save(folded, tmp_path / "w.onnx")
    report = _inspect(tmp_path / "w.onnx", tmp_path)
    assert report["quantization"]["state"] == "quantized (weights)"


def test_inspect_refuses_a_missing_or_broken_file_in_one_line(tmp_path, capsys):
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    for name, said in (("ghost.onnx", "file not found"), ("bad.onnx", "not a valid ONNX")):
        assert main(["inspect", str(tmp_path / name)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and said in err[0] and name in err[0]


def test_inspect_the_onnx_packages_test_models():
    """Every model of onnx's four backend test suites (old opsets, odd types, no names)."""
    from onnxsqueeze.core.inventory import inventory
    from onnxsqueeze.stages.preview import preview

    count = 0
    for case in corpus.onnx_test_cases():
        facts = inventory(case.model)
        proto = onnx.load(str(case.model))
        assert facts.nodes == sum(facts.ops.values()) >= len(proto.graph.node), case.name
        assert preview(proto, facts)["passes"], case.name
        count += 1
    assert count > 100
