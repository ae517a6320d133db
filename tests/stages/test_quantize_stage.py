"""The quantize stage: the accuracy budget keeps the damaging node float, modes, API and CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import onnxsqueeze
from onnxsqueeze.core.errors import CalibrationDataError, VerificationError
from onnxsqueeze.stages.budget import Budget
from onnxsqueeze.stages.quantize import QuantizeConfig, quantize_model

from conftest import parse_with, run_ort

RNG = np.random.default_rng(7)
DIGITS = Path(__file__).resolve().parents[2] / "models" / "digits_cnn.onnx"

SENSITIVE = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[4, 32] x) => (float[4, 32] y) {
    h = MatMul (x, w1)
    r = Relu (h)
    m = MatMul (r, w2)
    y = Add (m, c)
}
"""


def _sensitive_model() -> ir.Model:
    """Two ordinary MatMuls, then an Add of a constant with one huge element: quantizing the
    Add (its constant and output on one uint8 scale) wipes out every ordinary value."""
    proto = onnx.parser.parse_model(SENSITIVE)
    c = RNG.standard_normal(32).astype(np.float32) * 0.1
    c[3] = 2000.0
    for name, array in (
        ("w1", RNG.standard_normal((32, 32)).astype(np.float32) / 6),
        ("w2", RNG.standard_normal((32, 32)).astype(np.float32) / 6),
        ("c", c),
    ):
        proto.graph.initializer.append(onnx.numpy_helper.from_array(array, name))
    onnx.checker.check_model(proto)
    return ir.serde.deserialize_model(proto)


def _feeds(n: int) -> list[dict]:
    return [{"x": RNG.standard_normal((4, 32)).astype(np.float32)} for _ in range(n)]


def test_budget_keeps_the_sensitive_node_float_and_holds():
    model = _sensitive_model()
    config = QuantizeConfig(
        method="minmax", budget=Budget(max_error=1.0), sensitivity="exact", elementwise="all"
    )
    outcome = quantize_model(model, _feeds(8), config, calib_feeds=_feeds(64))
    record = outcome.record
    assert record["applied"] and record["budget_met"]
    assert "limit 1" in record["all_quantized"]  # everything quantized failed the budget
    decisions = {n["op"] + ":" + n["name"]: n["decision"] for n in record["nodes"]}
    floats = [k for k, v in decisions.items() if v != "quantized"]
    assert floats == [k for k in decisions if k.startswith("Add")], decisions
    ops = [n.op_type for n in outcome.model.graph]
    assert ops.count("QuantizeLinear") >= 2
    # measured again, independently: the budget holds on new samples
    from onnxsqueeze.run.session import Session

    feeds = _feeds(8)
    want = Session(model).run_all(feeds)
    got = Session(outcome.model, optimize=True).run_all(feeds)
    from onnxsqueeze.run.compare import compare_runs

    assert compare_runs(want, got).max_abs < 1.0
    assert all(n["score"] is not None for n in record["nodes"])


OUTLIER_INPUT = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[4, 32] x) => (float[4, 32] y) {
    h = MatMul (x, w1)
    r = Relu (h)
    y = MatMul (r, w2)
}
"""


def test_local_sensitivity_finds_the_node_whose_input_has_outliers():
    """Feature 3 of x is huge and w1 ignores it: quantizing x on one scale wipes out the
    features that matter, so MatMul_0 adds most of the error and must stay float."""
    proto = onnx.parser.parse_model(OUTLIER_INPUT)
    w1 = RNG.standard_normal((32, 32)).astype(np.float32) / 6
    w1[3] = 0
    for name, array in (("w1", w1), ("w2", RNG.standard_normal((32, 32)).astype(np.float32) / 6)):
        proto.graph.initializer.append(onnx.numpy_helper.from_array(array, name))
    model = ir.serde.deserialize_model(proto)

    def feeds(n):
        out = _feeds(n)
        for f in out:
            f["x"][:, 3] = 3000.0
        return out

    config = QuantizeConfig(method="minmax", budget=Budget(min_cosine=0.999), sensitivity="local")
    outcome = quantize_model(model, feeds(8), config, calib_feeds=feeds(64))
    record = outcome.record
    assert record["applied"] and record["budget_met"], record
    assert record["sensitivity"] == "local"
    decisions = {n["name"]: n["decision"] for n in record["nodes"]}
    assert decisions == {"MatMul_0": "float (budget)", "MatMul_1": "quantized"}


def test_budget_that_cannot_be_met_leaves_the_model_float():
    model = _sensitive_model()
    config = QuantizeConfig(method="minmax", budget=Budget(max_error=1e-9), elementwise="all")
    outcome = quantize_model(model, _feeds(4), config, calib_feeds=_feeds(8))
    assert not outcome.record["applied"]
    assert "budget not met" in outcome.record["reason"]
    assert not any(n.op_type == "QuantizeLinear" for n in outcome.model.graph)


def test_api_weight_only_mode_and_report_record():
    proto = onnx.parser.parse_model(
        """<ir_version: 8, opset_import: ["" : 13]>
        g (float[2, 128] x) => (float[2, 64] y) { y = MatMul (x, w) }"""
    )
    w = RNG.standard_normal((128, 64)).astype(np.float32)
    proto.graph.initializer.append(onnx.numpy_helper.from_array(w, "w"))
    small, report = onnxsqueeze.squeeze(
        proto, quantize=QuantizeConfig(mode="weights-int8", budget=Budget(min_cosine=0.99))
    )
    assert isinstance(small, onnx.ModelProto)
    assert report.quantization["applied"], report.quantization
    assert "cosine" in report.quantization["measured"]
    # On the CPU the int8 codes are stored to fold back to float at load (float kernels).
    assert report.quantization["weight_format"] == "fold"
    assert [n.op_type for n in small.graph.node] == ["Cast", "Mul", "MatMul"]
    assert "quantization: weights-int8" in report.to_table()
    config = QuantizeConfig(mode="weights-int8", weight_format="dq", budget=Budget(min_cosine=0.99))
    small, report = onnxsqueeze.squeeze(proto, quantize=config)
    assert [n.op_type for n in small.graph.node] == ["DequantizeLinear", "MatMul"]


def test_weights_int4_with_data_rounds_by_gptq_and_is_more_accurate():
    """With --data the int4 stage sums each MatMul input's Gram matrix over the samples
    and rounds by GPTQ; on inputs that vary along few directions the output moves less
    than with the data-free mse rounding of the same model."""
    proto = onnx.parser.parse_model(
        """<ir_version: 8, opset_import: ["" : 13]>
        g (float[3, 128] x) => (float[3, 64] y) { y = MatMul (x, w) }"""
    )
    proto.graph.initializer.append(
        onnx.numpy_helper.from_array(RNG.standard_normal((128, 64)).astype(np.float32), "w")
    )
    mix = RNG.standard_normal((12, 128))

    def sample() -> dict:
        x = RNG.standard_normal((3, 12)) @ mix + 0.05 * RNG.standard_normal((3, 128))
        return {"x": x.astype(np.float32)}

    data = [sample() for _ in range(64)]
    held_out = [sample() for _ in range(16)]
    w = onnx.numpy_helper.to_array(proto.graph.initializer[0])
    config = QuantizeConfig(mode="weights-int4", budget=Budget(min_cosine=0.9))
    records, errors = {}, {}
    for label, given in (("gptq", data), ("mse", None)):
        small, report = onnxsqueeze.squeeze(proto, data=given, quantize=config)
        records[label] = report.quantization
        assert report.quantization["applied"], report.quantization
        got = np.concatenate([run_ort(small, f)[0] for f in held_out])
        want = np.concatenate([f["x"] @ w for f in held_out])
        errors[label] = float(np.mean((got - want) ** 2))
    assert records["gptq"]["rounding"] == "gptq (1 weights)"
    assert records["mse"]["rounding"] == "mse"
    assert errors["gptq"] < 0.6 * errors["mse"], errors


def test_weights_int8_upgrades_an_old_opset_for_per_channel_filters():
    """PP-OCR is opset 11: per-channel DequantizeLinear needs 13, so the stage upgrades the
    model first (checking outputs are unchanged) and the Conv filters become int8."""
    proto = onnx.parser.parse_model(
        """<ir_version: 7, opset_import: ["" : 11]>
        g (float[1, 16, 12, 12] x) => (float[1, 64, 12, 12] y) {
            y = Conv <pads = [1, 1, 1, 1]> (x, w)
        }"""
    )
    w = RNG.standard_normal((64, 16, 3, 3)).astype(np.float32)
    proto.graph.initializer.append(onnx.numpy_helper.from_array(w, "w"))
    budget = Budget(min_cosine=0.99)
    config = QuantizeConfig(mode="weights-int8", weight_format="dq", budget=budget)
    small, report = onnxsqueeze.squeeze(proto, quantize=config)
    record = report.quantization
    assert record["applied"] and record["opset"] == "11 -> 13", record
    assert record["rounding"] == "rtn"
    assert [n.op_type for n in small.graph.node] == ["DequantizeLinear", "Conv"]
    # the load-time form needs no upgrade
    small, report = onnxsqueeze.squeeze(proto, quantize=QuantizeConfig(mode="weights-int8"))
    assert report.quantization["applied"] and "opset" not in report.quantization
    assert small.opset_import[0].version == 11
    assert [n.op_type for n in small.graph.node] == ["Cast", "Mul", "Conv"]


def test_weights_int4_gives_the_most_damaging_weight_int8_for_the_budget():
    """Weight-only modes go through the same search as static: when int4 everywhere misses
    the budget, the weight whose int4 copy hurts most is set apart; int4 then gives it int8
    rather than float when the budget still holds (2x its int4 bytes, not 8x)."""
    rng = np.random.default_rng(3)
    proto = onnx.parser.parse_model(
        """<ir_version: 8, opset_import: ["" : 13]>
        g (float[4, 128] x) => (float[4, 128] y) { h = MatMul (x, w1)  y = MatMul (h, w2) }"""
    )
    w1 = rng.standard_normal((128, 128)).astype(np.float32) / 11
    w2 = (rng.standard_normal((128, 128)) / 11).astype(np.float32)
    w2[::32, :] = 40.0 * np.sign(rng.standard_normal((4, 128)))  # an outlier row per block
    for name, array in (("w1", w1), ("w2", w2)):
        proto.graph.initializer.append(onnx.numpy_helper.from_array(array, name))
    data = [{"x": rng.standard_normal((4, 128)).astype(np.float32)} for _ in range(16)]
    config = QuantizeConfig(mode="weights-int4", budget=Budget(min_cosine=0.9995))
    small, report = onnxsqueeze.squeeze(proto, data=data, quantize=config)
    record = report.quantization
    assert record["applied"] and record["budget_met"], record
    assert float(record["all_quantized"].split()[1]) < 0.9995  # int4 everywhere misses it
    decisions = {n["name"]: (n["decision"], n["score"]) for n in record["nodes"]}
    int8 = [name for name, (decision, _) in decisions.items() if decision == "int8 (budget)"]
    assert len(int8) == 1 and record["int8_for_budget"] == 1
    assert decisions[int8[0]][1] == max(score for _, score in decisions.values())
    assert record["kept_float"] == {}
    assert record["rounding"] == "gptq (1 weights)"  # the int4 weight, not the int8 one
    assert float(record["measured"].split()[1]) >= 0.9995
    # no product reads a float weight: int4 and int8 codes (MatMulNBits, the CPU default)
    weights = [n.input[1] for n in small.graph.node if n.op_type in ("MatMul", "MatMulNBits")]
    floats = {i.name for i in small.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    assert len(weights) == 2 and not any(w in floats for w in weights)
    bits = sorted(
        next(a.i for a in n.attribute if a.name == "bits")
        for n in small.graph.node
        if n.op_type == "MatMulNBits"
    )
    assert bits == [4, 8], bits  # one int4 weight, the damaging one int8
    held_out = {"x": rng.standard_normal((4, 128)).astype(np.float32)}
    want = held_out["x"] @ w1 @ w2
    got = run_ort(small, held_out)[0]
    cosine = float(np.sum(got * want) / np.linalg.norm(got) / np.linalg.norm(want))
    assert cosine > 0.999


def test_int8_for_kept_bisects_for_the_fewest_float_weights():
    """kept_float.int8_for_kept on a stub stage whose budget holds only while m1 (the most
    damaging) stays float: m2 and m3 go int8, m1 stays float; a budget nothing meets leaves
    the model as it was."""
    from types import SimpleNamespace

    from onnxsqueeze.stages.quantize.kept_float import int8_for_kept

    rng = np.random.default_rng(5)
    proto = onnx.parser.parse_model(
        """<ir_version: 8, opset_import: ["" : 13]>
        g (float[2, 64] x) => (float[2, 64] y) {
            a = MatMul (x, w1)  b = MatMul (a, w2)  y = MatMul (b, w3)
        }"""
    )
    for index, node in enumerate(proto.graph.node, 1):
        node.name = f"m{index}"
        weight = rng.standard_normal((64, 64)).astype(np.float32)
        proto.graph.initializer.append(onnx.numpy_helper.from_array(weight, f"w{index}"))
    model = ir.serde.deserialize_model(proto)
    settings = {"bits": 4, "block_size": 32, "format": "fold", "memo": {}, "min_elements": 0}
    kept = ["m1", "m2", "m3"]

    def float_weights(candidate) -> set:
        floats = {
            v.name
            for v in candidate.graph.initializers.values()
            if v.const_value is not None and v.const_value.dtype == ir.DataType.FLOAT
        }
        return {
            n.name for n in candidate.graph if n.op_type == "MatMul" and n.inputs[1].name in floats
        }

    def stage(judge):
        record = {
            "nodes": [{"name": n, "decision": "float (budget)"} for n in kept],
            "kept_float": dict.fromkeys(kept, "budget"),
        }
        candidates = {n.name: n for n in model.graph}
        config = SimpleNamespace(exclude_nodes=())
        return SimpleNamespace(candidates=candidates, config=config, judge=judge, record=record)

    fussy = stage(lambda m: ("m1" in float_weights(m), "cosine 1.0 (min 0.9)"))
    shipped, still_float, int8 = int8_for_kept(fussy, model, kept, settings)
    assert still_float == ["m1"] and int8 == ["m2", "m3"] and float_weights(shipped) == {"m1"}
    assert fussy.record["kept_float"] == {"m1": "budget"}
    assert [n["decision"] for n in fussy.record["nodes"]] == [
        "float (budget)",
        "int8 (budget)",
        "int8 (budget)",
    ]
    assert float_weights(model) == {"m1", "m2", "m3"}  # the candidate itself is untouched
    never = stage(lambda m: (False, "cosine 0.5 (min 0.9)"))
    shipped, still_float, int8 = int8_for_kept(never, model, kept, settings)
    assert shipped is model and still_float == kept and int8 == []
    assert "int8_for_budget" not in never.record


def test_unknown_mode_is_a_clear_error():
    with pytest.raises(onnxsqueeze.SqueezeError, match="unknown quantization mode"):
        onnxsqueeze.squeeze(ir.serde.serialize_model(_sensitive_model()), quantize="int3")


def test_cli_static_quantization_reports_its_choice(tmp_path):
    from onnxsqueeze.cli import main

    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    data = DIGITS.with_name("digits_test.npz")
    code = main(
        [
            str(DIGITS),
            "-o",
            str(out),
            "--data",
            str(data),
            "--quantize",
            "static",
            "--report",
            str(report),
            "-q",
        ]
    )
    assert code == 0
    record = json.loads(report.read_text())["quantization"]
    assert record["mode"] == "static" and record["budget_met"]
    assert record["applied"]  # explicit mode: kept even if not faster (auto would check)
    model = onnx.load(out)
    onnx.checker.check_model(model)
    assert sum(n.op_type == "QuantizeLinear" for n in model.graph.node) >= 2


def test_static_calibrates_only_what_insert_qdq_reads(monkeypatch):
    """The stage observes the activations insert-qdq asks ranges for (the MatMul output
    that Relu follows is fused, never read) and quantizes exactly as with every tensor
    calibrated."""
    from onnxsqueeze.calib.collector import Collector

    observed: list[list[str]] = []
    collect = Collector.collect

    def spy(self, *args, **kwargs):
        result = collect(self, *args, **kwargs)
        observed.append(sorted(result.observers))
        return result

    monkeypatch.setattr(Collector, "collect", spy)
    model, calib = _sensitive_model(), _feeds(16)
    config = QuantizeConfig(method="minmax", budget=Budget(max_error=1e9), elementwise="all")
    lean = quantize_model(model, _feeds(4), config, calib_feeds=calib)
    everything = onnxsqueeze.calibrate(ir.serde.serialize_model(model), calib, method="minmax")
    full = quantize_model(model, _feeds(4), config, calibration=everything)
    assert "h" not in observed[0] and {"x", "r", "m"} <= set(observed[0])
    assert set(observed[0]) < set(everything.observers)
    assert lean.record["quantized"] == full.record["quantized"] >= 3
    lean_proto = ir.serde.serialize_model(lean.model)
    assert (
        lean_proto.SerializeToString() == ir.serde.serialize_model(full.model).SerializeToString()
    )


def test_cli_static_without_data_fails_cleanly(tmp_path, capsys):
    from onnxsqueeze.cli import main

    out = tmp_path / "q.onnx"
    code = main([str(DIGITS), "-o", str(out), "--quantize", "static"])
    assert code == 2 and not out.exists()  # a usage error, before any work
    err = capsys.readouterr().err
    assert "needs calibration data" in err and "Traceback" not in err


def test_fp16_mode_through_the_api_meets_the_budget():
    proto = onnx.load(DIGITS)
    data = dict(np.load(DIGITS.with_name("digits_test.npz")))
    small, report = onnxsqueeze.squeeze(proto, data=[data], quantize="fp16")
    assert report.quantization["applied"], report.quantization
    assert report.quantization["mode"] == "fp16"
    types = {t.data_type for t in small.graph.initializer}
    assert onnx.TensorProto.FLOAT16 in types
    onnx.checker.check_model(small)


def test_top1_budget_on_too_few_samples_is_flagged():
    from onnxsqueeze.stages.budget import Budget

    data = dict(np.load(DIGITS.with_name("digits_test.npz")))
    config = QuantizeConfig(mode="dynamic", budget=Budget(min_top1_agreement=0.99))
    _, report = onnxsqueeze.squeeze(onnx.load(DIGITS), data=[data], quantize=config)
    assert any("judged on 1 samples" in w for w in report.warnings), report.warnings


def _near_tie_classifier() -> tuple[onnx.ModelProto, list[dict]]:
    """Two classes nearly tie on every sample: int8 weights flip the top class on about half
    of them while the probabilities keep a cosine near 1."""
    rng = np.random.default_rng(5)
    proto = onnx.parser.parse_model(
        """<ir_version: 8, opset_import: ["" : 13]>
        g (float[1, 64] x) => (float[1, 4] y) { h = MatMul (x, w)  y = Softmax <axis = -1> (h) }"""
    )
    w = rng.standard_normal((64, 4))
    w[:, 2:] *= 0.1
    proto.graph.initializer.append(onnx.numpy_helper.from_array(w.astype(np.float32), "w"))
    tie = (w[:, 0] - w[:, 1]) / np.linalg.norm(w[:, 0] - w[:, 1])
    lead = (w[:, 0] + w[:, 1]) / np.linalg.norm(w[:, 0] + w[:, 1])

    def sample() -> dict:
        x = rng.standard_normal(64) + 3 * lead  # classes 0 and 1 on top...
        x += (rng.choice([-1.0, 1.0]) * 1e-4 - x @ tie) * tie  # ...tied up to a hair
        return {"x": x[None].astype(np.float32)}

    return proto, [sample() for _ in range(32)]


def test_the_default_budget_keeps_a_classifiers_answers():
    """The default budget holds softmax-like outputs to 99 % top-1 agreement too: a cosine
    near 1 does not let int8 change half of a classifier's answers."""
    proto, data = _near_tie_classifier()
    small, report = onnxsqueeze.squeeze(proto, data=data, quantize="weights-int8")
    record = report.quantization
    assert not record["applied"], record
    assert "class agreement" in record["reason"], record
    assert [n.op_type for n in small.graph.node] == ["MatMul", "Softmax"]


def test_a_class_limit_judged_on_few_samples_is_flagged():
    """Eight samples cannot resolve 99 % agreement (one flip costs 12.5 %): when the default
    budget's class limit passes on so few, the report says so."""
    rng = np.random.default_rng(1)
    proto = onnx.parser.parse_model(
        """<ir_version: 8, opset_import: ["" : 13]>
        g (float[1, 64] x) => (float[1, 4] y) { h = MatMul (x, w)  y = Softmax <axis = -1> (h) }"""
    )
    w = rng.standard_normal((64, 4)).astype(np.float32)
    proto.graph.initializer.append(onnx.numpy_helper.from_array(w, "w"))
    data = [{"x": rng.standard_normal((1, 64)).astype(np.float32)} for _ in range(8)]
    _, report = onnxsqueeze.squeeze(proto, data=data, quantize="weights-int8")
    assert report.quantization["applied"] and report.quantization["class_outputs"] == ["y"]
    assert any("class-agreement limit (0.99) is judged on 8" in w for w in report.warnings)


def test_changed_answers_of_a_classifier_are_reported_even_within_the_budget():
    """A budget the user set without a top-1 limit ships the flips, and the report names
    the output and how often its answer changed."""
    proto, data = _near_tie_classifier()
    config = QuantizeConfig(mode="weights-int8", budget=Budget(min_cosine=0.99))
    small, report = onnxsqueeze.squeeze(proto, data=data, quantize=config)
    record = report.quantization
    assert record["applied"] and record["min_cosine"] > 0.99, record
    assert 0.2 < record["top1_agreement"]["y"] < 0.9
    assert any("top class of output 'y'" in w for w in report.warnings), report.warnings


def test_only_probability_outputs_count_as_class_scores():
    from onnxsqueeze.run.compare import compare_runs

    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.5, 0.4]], np.float32)
    swapped = np.array([[0.2, 0.7, 0.1], [0.1, 0.5, 0.4]], np.float32)  # first answer changed
    embedding = np.array([[0.3, -0.2, 0.9]], np.float32)
    comparison = compare_runs([{"p": probs, "e": embedding}], [{"p": swapped, "e": -embedding}])
    by_name = {o.name: o for o in comparison.outputs}
    assert by_name["p"].distribution and by_name["p"].top1_agreement == 0.5
    assert by_name["e"].distribution is False
    # the class limit reads class-score outputs only: an embedding's argmax is no answer
    limit = Budget(min_class_agreement=0.99)
    met, summary = limit.check(comparison, [], [])
    assert not met and "class agreement 0.5000" in summary
    only_embedding = compare_runs([{"e": embedding}], [{"e": embedding[:, ::-1].copy()}])
    assert limit.check(only_embedding, [], [])[0]


def _one_matmul() -> tuple[onnx.ModelProto, list[dict]]:
    """One MatMul with a real weight, and 16 samples for it."""
    proto = onnx.parser.parse_model(
        """<ir_version: 8, opset_import: ["" : 13]>
        g (float[4, 128] x) => (float[4, 64] y) { y = MatMul (x, w) }"""
    )
    w = RNG.standard_normal((128, 64)).astype(np.float32)
    proto.graph.initializer.append(onnx.numpy_helper.from_array(w, "w"))
    return proto, [{"x": RNG.standard_normal((4, 128)).astype(np.float32)} for _ in range(16)]


def test_require_faster_falls_back_to_the_faster_format(monkeypatch):
    """Static int8 measured slower than float (forced here: timing is the machine's) with
    --require-faster: the stage ships the same weights as weight-only int8 stored to fold at
    load, which runs the float kernels, and says what it fell back from."""
    import onnxsqueeze.run.latency

    monkeypatch.setattr(onnxsqueeze.run.latency, "compare_latency", lambda *a, **k: 0.5)
    proto, data = _one_matmul()
    config = QuantizeConfig(mode="static", check_latency=True, require_faster=True)
    small, report = onnxsqueeze.squeeze(proto, data=data, quantize=config)
    record = report.quantization
    assert record["mode"] == "weights-int8" and record["applied"], record
    assert record["fallback_from"].startswith("static (quantized model runs at 0.50x")
    assert record["speed_basis"].startswith("the float graph")
    assert [n.op_type for n in small.graph.node] == ["Cast", "Mul", "MatMul"]


@pytest.mark.parametrize("speed, worth", [(0.5, None), (1.02, 1.05)])
def test_a_slow_draft_gets_the_quick_search(monkeypatch, speed, worth):
    """auto times the fully quantized draft before calibrating: below float speed, or below
    what it needs to beat another mode, the search ranks nodes by local scores instead of
    one model per node (exact only up to QUICK_EXACT nodes, set to 1 here); the final
    timing still decides. An explicit mode (no latency check) searches exactly."""
    import onnxsqueeze.run.latency
    import onnxsqueeze.stages.search

    monkeypatch.setattr(onnxsqueeze.run.latency, "compare_latency", lambda *a, **k: speed)
    monkeypatch.setattr(onnxsqueeze.stages.search, "QUICK_EXACT", 1)
    model, calib = _sensitive_model(), _feeds(16)
    budget = Budget(max_error=1.0)
    auto = QuantizeConfig(
        method="minmax",
        budget=budget,
        elementwise="all",
        check_latency=True,
        require_faster=True,
        worth_speed=worth,
    )
    record = quantize_model(model, _feeds(8), auto, calib_feeds=calib).record
    assert record["draft_speed"] == speed and record["sensitivity"] == "local"
    explicit = QuantizeConfig(method="minmax", budget=budget, elementwise="all")
    record = quantize_model(model, _feeds(8), explicit, calib_feeds=calib).record
    assert "draft_speed" not in record and record["sensitivity"] == "exact"


def _loop_rnn(width: int = 32, steps: int = 5) -> onnx.ModelProto:
    """h <- Tanh(MatMul(h, W) + x), ``steps`` times in a Loop; W is an outer-scope weight."""
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh

    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
    row = [1, width]
    body = h.make_graph(
        [
            h.make_node("Identity", ["c"], ["cout"]),
            h.make_node("MatMul", ["hin", "W"], ["m"]),
            h.make_node("Add", ["m", "x"], ["a"]),
            h.make_node("Tanh", ["a"], ["hout"]),
        ],
        "step",
        [
            h.make_tensor_value_info("i", T.INT64, []),
            h.make_tensor_value_info("c", T.BOOL, []),
            h.make_tensor_value_info("hin", T.FLOAT, row),
        ],
        [
            h.make_tensor_value_info("cout", T.BOOL, []),
            h.make_tensor_value_info("hout", T.FLOAT, row),
        ],
    )
    graph = h.make_graph(
        [h.make_node("Loop", ["trip", "cond", "h0"], ["h"], body=body)],
        "rnn",
        [h.make_tensor_value_info("x", T.FLOAT, row), h.make_tensor_value_info("h0", T.FLOAT, row)],
        [h.make_tensor_value_info("h", T.FLOAT, row)],
        [
            nh.from_array(weight, "W"),
            nh.from_array(np.array(steps, np.int64), "trip"),
            nh.from_array(np.array(True), "cond"),
        ],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def test_static_quantization_inside_a_loop_body():
    """The MatMul inside the Loop is calibrated on every iteration (its carried input
    included) and quantized there; the result loads in onnxruntime and meets the budget."""
    model = _loop_rnn()
    rng = np.random.default_rng(1)
    data = [
        {k: rng.standard_normal((1, 32)).astype(np.float32) for k in ("x", "h0")} for _ in range(16)
    ]
    result = onnxsqueeze.squeeze(model, data=data, quantize="static")
    record = result.report.quantization
    assert record["applied"] and record["quantized"] == 1, record
    loop = next(n for n in result.model.graph.node if n.op_type == "Loop")
    body_ops = [n.op_type for n in loop.attribute[0].g.node]
    assert "QuantizeLinear" in body_ops and "MatMul" in body_ops
    onnx.checker.check_model(result.model)
    for feed in data[:4]:
        (ours,) = run_ort(result.model, feed)
        (ref,) = run_ort(model, feed)
        cosine = float((ours * ref).sum() / np.linalg.norm(ours) / np.linalg.norm(ref))
        assert cosine > 0.99


@pytest.mark.parametrize(
    "static_speed, shipped", [(1.07, "weights-int8"), (1.12, "weights-int8"), (1.20, "static")]
)
def test_auto_ships_a_faster_but_larger_result_only_beyond_timing_noise(static_speed, shipped):
    """A static result with a larger file that times 7 % faster than weight-only int8 is
    noise, 12 % (PP-OCR det) is not worth the bytes: the smaller file ships. 20 % wins."""
    from onnxsqueeze.stages.quantize import QuantizeOutcome
    from onnxsqueeze.stages.quantize.alternatives import pick

    small = ir.serde.deserialize_model(onnx.parser.parse_model(SMALL_WEIGHTS))
    large = ir.serde.deserialize_model(onnx.parser.parse_model(LARGE_WEIGHTS))
    outcomes = [
        QuantizeOutcome(small, {"mode": "weights-int8", "speed_vs_float": 1.0}),
        QuantizeOutcome(large, {"mode": "static", "speed_vs_float": static_speed}),
    ]
    assert pick(outcomes).record["mode"] == shipped


SMALL_WEIGHTS = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1, 2] x) => (float[1, 2] y) <int8[2, 2] w = {1, 2, 3, 4}> { y = Identity(x) }
"""
LARGE_WEIGHTS = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1, 2] x) => (float[1, 2] y) <float[2, 2] w = {1, 2, 3, 4}> { y = Identity(x) }
"""


def test_a_model_quantized_already_is_not_quantized_twice(tmp_path):
    """A QDQ model (from any tool) quantized again got a second pair on every tensor: the same
    values rounded twice, cosine 0.975 on a ResNet block. Its QDQ nodes are now left alone."""
    from onnxsqueeze.cli import main

    data = DIGITS.with_name("digits_test.npz")
    first, second, report = tmp_path / "q1.onnx", tmp_path / "q2.onnx", tmp_path / "r.json"
    args = ["--data", str(data), "--quantize", "static", "-q"]
    assert main([str(DIGITS), "-o", str(first), *args]) == 0
    assert main([str(first), "-o", str(second), "--report", str(report), *args]) == 0
    record = json.loads(report.read_text())["quantization"]
    assert not record["applied"]
    assert record["reason"].startswith("the model is already quantized")
    pairs = [
        sum(n.op_type == "QuantizeLinear" for n in onnx.load(p).graph.node) for p in (first, second)
    ]
    assert pairs[1] == pairs[0] > 0


@pytest.mark.parametrize(
    "flag, value", [("--max-error", "-1"), ("--min-cosine", "2"), ("--min-top1-agreement", "1.5")]
)
def test_a_budget_no_result_can_meet_is_a_usage_error(tmp_path, capsys, flag, value):
    from onnxsqueeze.cli import main

    out = tmp_path / "q.onnx"
    assert main([str(DIGITS), "-o", str(out), flag, value, "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"onnxsqueeze: error: argument {flag}") and len(err.splitlines()) == 1
    assert not out.exists()


def test_data_whose_outputs_are_all_nan_cannot_judge_a_budget(tmp_path):
    """All-NaN samples made every comparison vacuous (NaN == NaN): a weight-only draft whose
    GPTQ rounding had turned NaN into int8 garbage passed as 'cosine 1.00000' and shipped.
    Such data is refused where it is read; a model whose outputs are all NaN on finite
    inputs (here: x * inf - x * inf) cannot be verified at all."""
    data = tmp_path / "nan.npz"
    np.savez(data, image=np.full((4, 1, 8, 8), np.nan, np.float32))
    with pytest.raises(CalibrationDataError, match="only NaN/inf"):
        onnxsqueeze.squeeze(onnx.load(DIGITS), data=str(data), quantize="weights-int8")
    nan_out = onnx.parser.parse_model("""
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4] x) => (float[N, 4] y) <float i = {inf}> {
    a = Mul (x, i)
    y = Sub (a, a)
}""")  # fmt: skip
    with pytest.raises(VerificationError, match="NaN/inf on every probe"):
        onnxsqueeze.squeeze(nan_out, quantize="weights-int8")


def test_gptq_falls_back_to_plain_rounding_on_a_non_finite_gram():
    from onnxsqueeze.quant.gptq import WeightRounder

    weight = RNG.standard_normal((16, 8)).astype(np.float32)
    gram = np.full((16, 16), np.nan)
    rounder = WeightRounder(grams={"x": gram})
    q, scales = rounder.round("n", "x", weight, 8, 0)
    assert rounder.gptq == 0 and np.isfinite(scales).all()
    assert np.abs(q.astype(np.float32) * scales - weight).max() <= scales.max() / 2 + 1e-6


CONTRIB_THEN_MATMUL = """
<ir_version: 8, opset_import: ["" : 17, "com.microsoft" : 1]>
g (float[4, 64] x) => (float[4, 64] y) {
    h = MatMul (x, w1)
    a = com.microsoft.Gelu (h)
    y = MatMul (a, w2)
}
"""


def test_outputs_of_ops_onnx_cannot_type_are_calibrated():
    """onnx's inference gives no type to com.microsoft outputs (an onnxruntime-optimized
    BERT's SkipLayerNormalization) or ai.onnx.ml ones (scikit-learn's Scaler), so they were
    never calibrated and the MatMul reading them stayed float; onnxruntime now types them."""
    proto = onnx.parser.parse_model(CONTRIB_THEN_MATMUL)
    for name in ("w1", "w2"):
        weight = RNG.standard_normal((64, 64)).astype(np.float32) / 8
        proto.graph.initializer.append(onnx.numpy_helper.from_array(weight, name))
    data = [{"x": RNG.standard_normal((4, 64)).astype(np.float32)} for _ in range(16)]
    config = QuantizeConfig(mode="static", budget=Budget(min_cosine=0.95))
    squeezed = onnxsqueeze.squeeze(proto, data=data, quantize=config)
    record = squeezed.report.quantization
    assert record["applied"] and record["quantized"] == 2, record.get("kept_float")
    readers = [n.op_type for n in squeezed.model.graph.node if "a" in n.input]
    assert readers == ["QuantizeLinear"]  # the Gelu output is quantized for the MatMul


TINY_CONV = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1, 2, 8, 8] x) => (float[1, 4, 8, 8] y) {
    c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
    y = Relu (c)
}
"""


def test_a_quantized_model_larger_than_float_is_not_shipped_by_auto_and_flagged_otherwise():
    """Weights this small cannot pay for their Q/DQ nodes and scales: static made a 2 KB
    Conv3d net 1.6x larger, silently."""
    proto = onnx.parser.parse_model(TINY_CONV)
    for name, shape in (("w", (4, 2, 3, 3)), ("b", (4,))):
        array = RNG.standard_normal(shape).astype(np.float32)
        proto.graph.initializer.append(onnx.numpy_helper.from_array(array, name))
    data = [{"x": RNG.standard_normal((1, 2, 8, 8)).astype(np.float32)} for _ in range(8)]
    explicit = onnxsqueeze.squeeze(proto, data=data, quantize="static")
    assert explicit.report.quantization["applied"]
    assert any("not smaller than float" in w for w in explicit.report.warnings)
    # auto (where timing may drop it first for being slower): the size check alone
    from onnxsqueeze.pipeline.report import Report
    from onnxsqueeze.stages.quantize import QuantizeOutcome
    from onnxsqueeze.stages.quantize.alternatives import not_smaller

    float_model = ir.serde.deserialize_model(proto)
    outcome = QuantizeOutcome(
        ir.serde.deserialize_model(explicit.model), {"mode": "static", "applied": True}
    )
    report = Report()
    not_smaller(float_model, [outcome], True, report)
    assert not outcome.record["applied"] and "not smaller than float" in outcome.record["reason"]
    assert outcome.model is float_model and report.warnings == []


TAIL = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[16, 64] x) => (float[16, 16] y) {
    y = MatMul (x, w)
}
"""


def _tail_model_and_feeds(n: int, seed: int) -> tuple[ir.Model, list[dict]]:
    """A MatMul whose input's rare large values (0.5 %) carry much of the output: entropy's
    KL search clips that tail (output cosine 0.995 here), min/max ranges keep it (0.9997)."""
    rng = np.random.default_rng(seed)
    proto = onnx.parser.parse_model(TAIL)
    weight = rng.standard_normal((64, 16)).astype(np.float32) / 8
    proto.graph.initializer.append(onnx.numpy_helper.from_array(weight, "w"))
    feeds = []
    for _ in range(n):
        x = rng.standard_normal((16, 64)).astype(np.float32) * 0.05
        x[rng.random((16, 64)) < 0.005] = 40.0
        feeds.append({"x": x})
    return ir.serde.deserialize_model(proto), feeds


def test_auto_range_method_keeps_the_one_whose_quantized_model_measures_best():
    """The default range method tries each method on the fully quantized model: entropy
    clips this activation's tail (cosine below the budget), so another one is chosen and
    the node is quantized within the budget."""
    model, feeds = _tail_model_and_feeds(48, seed=7)
    budget = Budget(min_cosine=0.999)
    config = QuantizeConfig(method="entropy", budget=budget)
    entropy = quantize_model(model, feeds[:8], config, calib_feeds=feeds)
    assert entropy.record["method"] == "entropy"
    assert not entropy.record["budget_met"]  # nothing but the MatMul to keep float
    outcome = quantize_model(model, feeds[:8], QuantizeConfig(budget=budget), calib_feeds=feeds)
    record = outcome.record
    assert set(record["methods_tried"]) == {"minmax", "percentile", "entropy", "mse"}
    assert record["method"] != "entropy"
    assert record["applied"] and record["budget_met"] and record["quantized"] == 1
    quantized, original = (ir.serde.serialize_model(m) for m in (outcome.model, model))
    for feed in feeds[:8]:
        a, b = run_ort(quantized, feed)[0].ravel(), run_ort(original, feed)[0].ravel()
        assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) > 0.999


def test_auto_range_method_skips_what_a_minmax_cache_cannot_answer():
    from onnxsqueeze.calib.cache import Calibration
    from onnxsqueeze.calib.choice import ranked_ranges
    from onnxsqueeze.calib.observers import MinMaxObserver

    observer = MinMaxObserver()
    observer.update(np.array([-1.0, 3.0], np.float32))
    calibration = Calibration({"t": observer}, inputs=["x"])
    ranked, tried = ranked_ranges(calibration, lambda r: ((1,), "scored"))
    assert [method for method, _ in ranked] == ["minmax"] and list(tried) == ["minmax"]
    assert ranked[0][1]["t"] == pytest.approx((-1.0, 3.0))


def _first_search_misses(monkeypatch) -> list[str]:
    """Make the first range method's search miss the budget; returns the methods searched."""
    from onnxsqueeze.stages.quantize import stage as q

    searched: list[str] = []
    real = q.QuantizeStage._search

    def search(self, judged=None):
        searched.append(self.record["method"])
        outcome = real(self, judged)
        if len(searched) == 1:
            self.record.update(budget_met=False, applied=False, reason="missed")
            return q.QuantizeOutcome(self.model, self.record)
        return outcome

    monkeypatch.setattr(q.QuantizeStage, "_search", search)
    return searched


def test_a_range_method_whose_search_misses_the_budget_gives_way_to_the_next(monkeypatch):
    """The method whose fully quantized model measures best does not always leave the
    search something within the budget (magika: percentile ranges measure best, mse's
    meet the budget); the next method is searched then, and the record is that search's
    alone."""
    model, feeds = _tail_model_and_feeds(16, seed=3)
    searched = _first_search_misses(monkeypatch)
    outcome = quantize_model(model, feeds[:4], QuantizeConfig(), calib_feeds=feeds)
    record = outcome.record
    assert len(searched) == 2 and record["methods_searched"] == searched
    assert record["method"] == searched[1] and record["budget_met"] and record["applied"]
    assert "reason" not in record


def test_a_fallback_range_method_reuses_the_first_searchs_damage_order(monkeypatch):
    """Scoring every node again for each fallback method multiplied the search time (PP-OCR
    det: 117 s to end float); the fallback bisects the order the first search measured."""
    from onnxsqueeze.stages.quantize import stage as q

    searched, scored = _first_search_misses(monkeypatch), []
    real_scores = q.QuantizeStage.scores

    def scores(self, names, quantized):
        scored.append(self.record["method"])
        return real_scores(self, names, quantized)

    monkeypatch.setattr(q.QuantizeStage, "scores", scores)
    config = QuantizeConfig(budget=Budget(max_error=1.0), sensitivity="exact", elementwise="all")
    outcome = quantize_model(_sensitive_model(), _feeds(8), config, calib_feeds=_feeds(64))
    record = outcome.record
    assert len(searched) == 2 and scored == searched[:1]
    assert record["sensitivity"] == f"order of {searched[0]}"
    assert record["applied"] and record["budget_met"]
    floats = [n["op"] for n in record["nodes"] if n["decision"] != "quantized"]
    assert floats == ["Add"]


def test_dynamic_keeps_outlier_channels_out_of_the_int8_range_when_the_budget_needs_it(
    monkeypatch,
):
    """With calibration data, dynamic finds the input channel 40x the others. Plain dynamic
    int8 meets a loose budget and stays as it is (the float share costs speed); a tight one
    it misses is met by computing that channel's share in float, with both MatMuls still
    int8, where without it (ratio 0) a whole MatMul stays float."""
    rng = np.random.default_rng(11)
    weights = {n: rng.standard_normal((32, 32)).astype(np.float32) / 6 for n in ("w1", "w2")}
    model = ir.serde.deserialize_model(parse_with(OUTLIER_INPUT, weights))

    def feeds(n):
        out = [{"x": rng.standard_normal((4, 32)).astype(np.float32)} for _ in range(n)]
        for f in out:
            f["x"][:, 7] *= 40
        return out

    def run(cosine, ratio):
        config = QuantizeConfig(
            mode="dynamic", budget=Budget(min_cosine=cosine), outlier_ratio=ratio
        )
        return quantize_model(model, feeds(8), config, calib_feeds=feeds(32)).record

    from onnxsqueeze.calib import outlier_plan

    collected = []
    real = outlier_plan.channel_peaks
    monkeypatch.setattr(
        outlier_plan, "channel_peaks", lambda *a, **k: collected.append(1) or real(*a, **k)
    )
    loose = run(0.5, 9.0)
    assert loose["budget_met"] and loose["quantized"] == 2 and "outlier_channels" not in loose
    assert not collected  # the data is read for peaks only when the budget needs them
    plain_error = 1 - loose["min_cosine"]
    tight = 1 - plain_error / 3  # plain dynamic misses it
    split = run(tight, 9.0)
    assert collected == [1]
    assert split["budget_met"] and split["quantized"] == 2 and split["outlier_channels"] == 1
    assert split["outlier_inputs"] == "1 split, 0 scaled"  # 40x: scaling would not do
    assert 1 - split["min_cosine"] < plain_error / 3
    off = run(tight, 0.0)
    assert "outlier_channels" not in off
    assert not off["budget_met"] or off["quantized"] < 2


def test_a_negative_outlier_ratio_is_a_usage_error(tmp_path, capsys):
    from onnxsqueeze.cli import main

    out = tmp_path / "q.onnx"
    assert main([str(DIGITS), "-o", str(out), "--outlier-ratio", "-1", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--outlier-ratio" in err and len(err.splitlines()) == 1
    assert not out.exists()


FOLDABLE = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[4, 64] x) => (float[4, 64] y) {
    h = MatMul (x, w1)
    r = Relu (h)
    y = Gemm (r, w2, b)
}
"""


def _foldable_model(outlier: float = 0.0) -> ir.Model:
    """Static quantizes the MatMul only (op_types); the Gemm stays float. With ``outlier``,
    w2's row 5 holds it: r[5] is always 0 (w1's column 5 is), so float ignores the row,
    but int8 per output channel puts every other weight of the Gemm at 0."""
    proto = onnx.parser.parse_model(FOLDABLE)
    w1 = RNG.standard_normal((64, 64)).astype(np.float32) / 8
    w1[:, 5] = 0.0
    w2 = RNG.standard_normal((64, 64)).astype(np.float32) / 8
    w2[5, :] = outlier or w2[5, :]
    b = RNG.standard_normal(64).astype(np.float32)
    for name, array in (("w1", w1), ("w2", w2), ("b", b)):
        proto.graph.initializer.append(onnx.numpy_helper.from_array(array, name))
    return ir.serde.deserialize_model(proto)


def _gemm_weight(model: ir.Model) -> str:
    gemm = next(n for n in model.graph if n.op_type == "Gemm")
    producer = gemm.inputs[1].producer()
    return "float" if producer is None else producer.op_type  # fold form: Mul of a Cast


@pytest.mark.parametrize(
    "outlier, exclude, weight",
    [(0.0, (), "Mul"), (0.0, ("Gemm",), "float"), (1e4, (), "float")],
)
def test_nodes_left_float_get_folded_int8_weights_when_the_budget_allows(outlier, exclude, weight):
    """Static's float nodes store int8 weights that fold back at load (a quarter of the
    bytes), unless the user excluded them or the rounding breaks the budget."""
    config = QuantizeConfig(
        method="minmax", op_types=("MatMul",), exclude_ops=exclude, budget=Budget(min_cosine=0.99)
    )
    model = _foldable_model(outlier)
    reference = ir.serde.serialize_model(model)
    outcome = quantize_model(model, _feeds64(8), config, calib_feeds=_feeds64(32))
    record = outcome.record
    assert record["applied"] and record["quantized"] == 1, record
    assert _gemm_weight(outcome.model) == weight, record
    if weight == "Mul":
        assert record["float_weights"] == "1 int8 (fold)"
    elif not exclude:  # tried, and the budget said no
        assert record["float_weights"].startswith("float (cosine"), record
    else:
        assert "float_weights" not in record
    proto = ir.serde.serialize_model(outcome.model)
    onnx.checker.check_model(proto)
    for feed in _feeds64(4):
        a, b = run_ort(reference, feed)[0], run_ort(proto, feed)[0]
        assert float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b)) > 0.98


def _feeds64(n: int) -> list[dict]:
    return [{"x": RNG.standard_normal((4, 64)).astype(np.float32)} for _ in range(n)]
