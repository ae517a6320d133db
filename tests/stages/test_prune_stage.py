"""The prune stage: --prune values, auto removes the channels a wide MLP does not need (the
refit keeps its outputs), channels=R keeps whole the groups whose pruning breaks the budget
(the shared search), sparsity under the budget, the chain with quantization, the CLI."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest

import onnxsqueeze
from onnxsqueeze.core.errors import PipelineConfigError
from onnxsqueeze.stages.budget import Budget
from onnxsqueeze.stages.prune import PruneConfig, prune_config

from conftest import parse_with, run_ort

RNG = np.random.default_rng(6)
D, H = 16, 256


def _wide_mlp(rank: int = 4) -> onnx.ModelProto:
    """x [B, 16] -> Relu(x W1 + b1) [B, 256] -> W2 -> y [B, 16], its 256 hidden units
    combinations of ``rank`` directions: most of them are redundant."""
    basis = RNG.standard_normal((D, rank))
    w1 = (basis @ RNG.standard_normal((rank, H))).astype(np.float32)
    b1 = RNG.standard_normal(H).astype(np.float32)
    w2 = (RNG.standard_normal((H, D)) / np.sqrt(H)).astype(np.float32)
    proto = parse_with(
        f"""<ir_version: 8, opset_import: ["" : 17]>
        g (float[B, {D}] x) => (float[B, {D}] y) {{
            m = MatMul (x, w1)
            a = Add (m, b1)
            h = Relu (a)
            y = MatMul (h, w2)
        }}""",
        {"w1": w1, "b1": b1, "w2": w2},
    )
    for index, node in enumerate(n for n in proto.graph.node if n.op_type == "MatMul"):
        node.name = f"layer{index}"
    return proto


def _data(count: int = 64) -> list[dict]:
    return [{"x": RNG.standard_normal((8, D)).astype(np.float32)} for _ in range(count)]


@pytest.mark.parametrize(
    ("text", "kind", "amount", "pattern"),
    [("auto", "auto", 0.0, ""), ("channels=0.25", "channels", 0.25, ""),
     ("sparsity=0.5", "sparsity", 0.5, ""), ("2:4", "n:m", 0.0, "2:4")],
)  # fmt: skip
def test_prune_values(text, kind, amount, pattern):
    config = prune_config(text)
    assert (config.kind, config.amount, config.pattern) == (kind, amount, pattern)
    assert prune_config("off") is None


@pytest.mark.parametrize("text", ["channels=1.5", "sparsity", "4:2", "heads=0.5", "lots"])
def test_bad_prune_values_are_config_errors(text):
    with pytest.raises(PipelineConfigError, match="prune="):
        prune_config(text)


def test_auto_removes_redundant_hidden_units_and_the_refit_keeps_the_outputs():
    proto = _wide_mlp()
    data = _data()
    # the latency gate is the machine's (a 256-wide MLP times within noise): not judged here
    auto = PruneConfig(check_latency=False)
    small, report = onnxsqueeze.squeeze(proto, data=data, prune=auto, quantize="none")
    record = report.pruning
    assert record["applied"] and record["data_aware"], record.get("reason")
    assert record["macs_after"] <= record["macs_before"] / 2
    (group,) = [c for c in record["clusters"] if c["removed"]]
    assert group["channels"] == H and group["removed"] >= H // 2
    w1 = next(t for t in small.graph.initializer if t.dims[0] == D and len(t.dims) == 2)
    assert w1.dims[1] == H - group["removed"]
    onnx.checker.check_model(small, full_check=True)
    x = np.concatenate([d["x"] for d in _data(8)])
    want, got = run_ort(proto, {"x": x})[0], run_ort(small, {"x": x})[0]
    cosine = np.sum(want * got) / np.linalg.norm(want) / np.linalg.norm(got)
    assert cosine > 0.997


def test_a_ratio_that_misses_the_budget_keeps_the_group_that_hurts_most_whole():
    # two wide hidden layers (redundant: the refit recovers them) around a 16-wide middle
    # (layer1's outputs: half of them gone loses half of what reaches layer2)
    proto = _wide_mlp()
    w3 = RNG.standard_normal((D, H)).astype(np.float32)
    w4 = (RNG.standard_normal((H, D)) / np.sqrt(H)).astype(np.float32)
    graph = proto.graph
    graph.output[0].name = "y0"
    graph.node[-1].output[0] = "y0"
    graph.node.extend(
        [
            onnx.helper.make_node("MatMul", ["y0", "w3"], ["m3"], name="layer2"),
            onnx.helper.make_node("Relu", ["m3"], ["h3"]),
            onnx.helper.make_node("MatMul", ["h3", "w4"], ["y"], name="layer3"),
        ]
    )
    graph.output[0].name = "y"
    graph.initializer.extend(
        [onnx.numpy_helper.from_array(w3, "w3"), onnx.numpy_helper.from_array(w4, "w4")]
    )
    config = PruneConfig(kind="channels", amount=0.5, check_latency=False)
    _, report = onnxsqueeze.squeeze(proto, data=_data(), prune=config, quantize="none")
    record = report.pruning
    assert record["applied"], record.get("reason")
    decisions = [(c["name"], c["decision"]) for c in record["clusters"]]
    # the first hidden layer (fused with its bias into a Gemm by the lossless passes) pruned
    assert decisions[0][1] == "pruned" and ("layer1", "whole (budget)") in decisions


def test_sparsity_under_the_budget_reports_the_zeros():
    proto = _wide_mlp()
    # 50 % of a 16-wide MLP's weights cost it cosine 0.92: room enough below it for any draw
    config = PruneConfig(kind="sparsity", amount=0.5, budget=Budget(min_cosine=0.85))
    _, report = onnxsqueeze.squeeze(proto, data=_data(), prune=config, quantize="none")
    record = report.pruning
    assert record["applied"] and record["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert {layer["decision"] for layer in record["layers"]} == {"pruned"}


def test_prune_then_quantize_chain_under_one_budget():
    proto = _wide_mlp()
    auto = PruneConfig(check_latency=False)
    _, report = onnxsqueeze.squeeze(proto, data=_data(), prune=auto, quantize="weights-int8")
    assert report.pruning["applied"]
    # half of 0.997's room for the pruning, half of that again for auto's margin
    assert "min 0.99925" in report.pruning["measured"]
    if report.quantization["applied"]:
        assert report.verification["summary"].startswith("prune + weights-int8")


@pytest.mark.parametrize("value", ["channels=2", "sometimes"])
def test_cli_rejects_a_bad_prune_value(tmp_path, value):
    src = tmp_path / "m.onnx"
    onnx.save(_wide_mlp(), src)
    proc = subprocess.run(
        [sys.executable, "-m", "onnxsqueeze", str(src), "-o", str(tmp_path / "o.onnx"),
         "--prune", value],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode != 0 and "--prune" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "o.onnx").exists()
