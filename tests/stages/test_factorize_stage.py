"""The factorize stage: auto finds the fewest parameters within the budget, a ratio that
misses it keeps the layers that hurt most whole (the shared search), the record lists every
layer, it chains with quantization under one budget, and the CLI takes --factorize."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest

import onnxsqueeze
from onnxsqueeze.stages.budget import Budget
from onnxsqueeze.stages.factorize import FactorizeConfig

from conftest import parse_with, run_ort

RNG = np.random.default_rng(5)
D = 96


def _mlp(spectra: list[np.ndarray]) -> onnx.ModelProto:
    """x -> Relu(x W1) -> ... -> W_last, each W with the singular values given."""
    arrays, lines, prev = {}, [], "x"
    for index, spectrum in enumerate(spectra):
        u, _ = np.linalg.qr(RNG.standard_normal((D, D)))
        v, _ = np.linalg.qr(RNG.standard_normal((D, D)))
        arrays[f"w{index}"] = ((u * spectrum) @ v.T).astype(np.float32)
        out = "y" if index == len(spectra) - 1 else f"h{index}"
        if index == len(spectra) - 1:
            lines.append(f"{out} = MatMul ({prev}, w{index})")
        else:
            lines.append(f"m{index} = MatMul ({prev}, w{index})")
            lines.append(f"{out} = Relu (m{index})")
        prev = out
    proto = parse_with(
        f"""<ir_version: 8, opset_import: ["" : 17]>
        g (float[B, {D}] x) => (float[B, {D}] y) {{ {" ".join(lines)} }}""",
        arrays,
    )
    for index, node in enumerate(n for n in proto.graph.node if n.op_type == "MatMul"):
        node.name = f"layer{index}"
    return proto


def _data(count: int = 24) -> list[dict]:
    return [{"x": RNG.standard_normal((8, D)).astype(np.float32)} for _ in range(count)]


STEEP = 10.0 ** (-np.arange(D) / 6)  # rank ~12 holds it
FLAT = np.ones(D)


def test_auto_factorizes_an_overparameterised_mlp_within_the_budget():
    proto = _mlp([STEEP, STEEP, STEEP])
    data = _data()
    # the latency gate is the machine's (a 96-wide MLP times within noise): not judged here
    auto = FactorizeConfig(check_latency=False)
    small, report = onnxsqueeze.squeeze(proto, data=data, factorize=auto, quantize="none")
    record = report.factorization
    assert record["applied"] and record["budget_met"] and record["whitened"], record
    assert record["params_after"] < 0.4 * record["params_before"]
    assert {layer["decision"] for layer in record["layers"]} == {"factorized"}
    for layer in record["layers"]:
        assert layer["rank"] < D // 2 and layer["params_after"] == layer["rank"] * 2 * D
        # the spectrum's prediction is what the layer's real input measures through it
        assert layer["predicted_error"] <= 0.01
        assert 0.5 * layer["predicted_error"] <= layer["measured_error"]
        assert layer["measured_error"] <= 1.5 * layer["predicted_error"]
    assert record["keeps_tried"] and record["weight_bytes_saved"] > 0.6
    # of 24 samples 8 are held out (stages.held_out); of the 16 searched every 4th judges,
    # the others fit the factors
    assert record["judged_on"] == "4 samples"
    assert report.held_out["held_out_samples"] == 8 and report.held_out["met"]
    assert record["min_cosine"] >= 0.997
    cosines = []
    for feed in _data(8):  # samples neither the factors nor the budget saw
        want, got = run_ort(proto, feed)[0], run_ort(small, feed)[0]
        cosines.append(np.sum(want * got) / np.linalg.norm(want) / np.linalg.norm(got))
    assert np.mean(cosines) >= 0.99
    assert sum(1 for n in small.graph.node if n.op_type == "MatMul") == 6


def test_a_ratio_that_misses_the_budget_keeps_the_layer_that_hurts_most_whole():
    """Keeping 30 % of the parameters forces both layers low; the flat one's truncation
    breaks the budget (its input is white noise, so whitening cannot help it), so the
    search keeps it whole and ships the steep one factorized."""
    proto = _mlp([FLAT, STEEP])
    config = FactorizeConfig(mode=0.3, budget=Budget(min_cosine=0.98), check_latency=False)
    _, report = onnxsqueeze.squeeze(proto, data=_data(), factorize=config, quantize="none")
    record = report.factorization
    assert record["applied"] and record["all_factorized"] and record["sensitivity"] == "exact"
    decisions = {layer["name"]: layer["decision"] for layer in record["layers"]}
    assert decisions == {"layer0": "whole (budget)", "layer1": "factorized"}, decisions
    scores = {layer["name"]: layer["score"] for layer in record["layers"]}
    assert scores["layer0"] > scores["layer1"]


def test_nothing_within_the_budget_is_said_and_the_model_stays():
    proto = _mlp([FLAT, FLAT])
    small, report = onnxsqueeze.squeeze(
        proto, data=_data(), factorize=FactorizeConfig(budget=Budget(min_cosine=0.9999))
    )
    record = report.factorization
    assert not record["applied"] and "no share of parameters met the budget" in record["reason"]
    assert any(w.startswith("factorization not applied") for w in report.warnings)


def test_factorize_then_quantize_under_one_budget():
    """Both stages run, each judged on half the room for error, and the chain is checked
    against the original with the whole budget."""
    proto = _mlp([STEEP, STEEP])
    # the latency gate off: a small MLP's timing decided the test once in a full run
    auto = FactorizeConfig(check_latency=False)
    _, report = onnxsqueeze.squeeze(proto, data=_data(), factorize=auto, quantize="weights-int8")
    assert report.factorization["applied"] and report.quantization["applied"]
    assert report.verification["summary"].startswith("factorize + weights-int8: cosine")
    # half of 0.997's room for the chain's first stage, half of that for auto's margin
    assert "min 0.99925" in report.factorization["measured"]


@pytest.mark.parametrize("value", ["0", "1.5", "sometimes"])
def test_cli_rejects_a_bad_factorize_value(tmp_path, value):
    from conftest import MLP_TEXT, parse

    src = tmp_path / "m.onnx"
    onnx.save(parse(MLP_TEXT), src)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "onnxsqueeze",
            str(src),
            "-o",
            str(tmp_path / "o.onnx"),
            "--factorize",
            value,
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "--factorize" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "o.onnx").exists()
