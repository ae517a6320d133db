"""The library API converters call: same kind out as in, input untouched, no disk."""

from __future__ import annotations

import inspect

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import onnxsqueeze
from onnxsqueeze.pipeline.report import Report

from conftest import run_ort


def test_proto_in_proto_out_and_input_untouched(mlp):
    before = mlp.SerializeToString()
    model, report = onnxsqueeze.squeeze(mlp)
    assert isinstance(model, onnx.ModelProto) and isinstance(report, Report)
    assert mlp.SerializeToString() == before
    onnx.checker.check_model(model)
    assert report.verification_status == "passed"


def test_ir_in_ir_out_and_bytes_in_bytes_out(mlp):
    model = ir.serde.deserialize_model(mlp)
    nodes_before = len(model.graph)
    out, _ = onnxsqueeze.squeeze(model)
    assert isinstance(out, ir.Model) and out is not model and len(model.graph) == nodes_before
    data, _ = onnxsqueeze.squeeze(mlp.SerializeToString())
    assert isinstance(data, bytes)
    onnx.checker.check_model(onnx.load_from_string(data))


def test_report_json_roundtrip(mlp):
    import json

    _, report = onnxsqueeze.squeeze(mlp)
    data = json.loads(report.to_json())
    assert data["passes"][0]["name"] == "cleanup" and data["before"]["nodes"] == 2


def test_torch_converter_in_memory(tmp_path, monkeypatch):
    """A converter's use: torch.onnx.export to an in-memory ModelProto, squeezed without disk."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    monkeypatch.chdir(tmp_path)

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3)
            self.fc = torch.nn.Linear(8, 4)

        def forward(self, x):
            return self.fc(self.conv(x).relu().mean((2, 3)))

    torch.manual_seed(0)
    net = Net().eval()
    x = torch.randn(2, 3, 16, 16)
    program = torch.onnx.export(net, (x,), dynamo=True, optimize=False)
    proto = program.model_proto
    squeezed, report = onnxsqueeze.squeeze(
        proto, data=[{program.model_proto.graph.input[0].name: x.numpy()}]
    )
    assert isinstance(squeezed, onnx.ModelProto)
    assert report.verification_status == "passed"
    assert list(tmp_path.iterdir()) == []  # nothing written
    name = squeezed.graph.input[0].name
    got = run_ort(squeezed, {name: x.numpy()})[0]
    np.testing.assert_allclose(got, net(x).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_graphsurgeon_graph_in_graph_out(mlp):
    gs = pytest.importorskip("onnx_graphsurgeon")
    graph = gs.import_onnx(mlp)
    out, report = onnxsqueeze.squeeze(graph, passes=["cleanup"])
    assert isinstance(out, gs.Graph)
    assert report.verification_status == "passed"
    assert [n.op for n in out.nodes] == ["MatMul", "Add"]


def test_squeeze_file_reports_sizes(tmp_path, mlp_path):
    report = onnxsqueeze.squeeze_file(mlp_path, tmp_path / "out.onnx")
    assert report.file_bytes_before == mlp_path.stat().st_size
    assert report.file_bytes_after == (tmp_path / "out.onnx").stat().st_size
    assert report.output == str(tmp_path / "out.onnx")


def test_the_config_and_budget_are_reachable_by_every_documented_path():
    """README examples before the engine moved into rooms named onnxsqueeze.quantize and
    onnxsqueeze.budget; those paths keep working next to the new ones."""
    import onnxsqueeze.budget
    import onnxsqueeze.quantize
    from onnxsqueeze.stages.budget import Budget
    from onnxsqueeze.stages.quantize import QuantizeConfig

    assert onnxsqueeze.QuantizeConfig is onnxsqueeze.quantize.QuantizeConfig is QuantizeConfig
    assert onnxsqueeze.Budget is onnxsqueeze.budget.Budget is Budget
    config = onnxsqueeze.quantize.QuantizeConfig(
        mode="dynamic", budget=onnxsqueeze.budget.Budget(min_cosine=0.99)
    )
    assert config.budget.min_cosine == 0.99
    # the API's calibrate is the engine's, with a pool of workers around it when asked
    import onnxsqueeze.calib.calibrate as engine

    assert onnxsqueeze.calibrate.__module__ == "onnxsqueeze.api"
    assert set(inspect.signature(engine.calibrate).parameters) - {"model", "data"} <= {
        "method",
        "samples",
        "cache",
        "bins",
        "op_types",
        "providers",
        "progress",
    }
