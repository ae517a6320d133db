"""The squeeze summary a person reads first: sizes by dtype and op counts before/after, the
quantization choice and why; per-pass rows only when verbose."""

from __future__ import annotations

import numpy as np

import onnxsqueeze
from onnxsqueeze.pipeline.report import PassRecord, Report
from tests.conftest import weighted_model


def test_summary_names_the_new_ops_and_weight_types():
    weight = np.random.default_rng(0).standard_normal((256, 128)).astype(np.float32)
    proto = weighted_model("MatMul", weight, ["n", 256])
    report = onnxsqueeze.squeeze(proto, quantize="dynamic").report
    text = report.to_table()
    lines = text.splitlines()
    op_line = next(line for line in lines if line.startswith("MatMulInteger"))
    assert op_line.split()[1:] == ["-", "1"]
    assert any(line.startswith("weights int8") for line in lines)
    assert any(
        line.startswith("weights float") and line.rstrip().endswith("%") and "-9" in line
        for line in lines
    )
    assert "quantization: dynamic" in text
    assert "status" not in text.splitlines()[0]  # no per-pass table by default
    verbose = report.to_table(verbose=True)
    assert verbose.splitlines()[0].split() == ["pass", "status", "time", "changes"]
    assert "cleanup" in verbose


def test_summary_says_why_a_quantization_mode_was_chosen():
    report = Report(
        before={"nodes": 3, "ops": {"MatMul": 1}},
        after={"nodes": 5, "ops": {"MatMul": 1}},
        quantization={
            "mode": "dynamic",
            "applied": True,
            "speed_vs_float": 1.3,
            "measured": "cosine 0.999",
            "alternatives": [
                {"mode": "static", "applied": True, "speed_vs_float": 1.4, "measured": "c 0.99"},
                {"mode": "dynamic", "applied": True, "speed_vs_float": 1.3},
                {"mode": "weights-int8", "applied": False, "reason": "slower than float"},
            ],
        },
        passes=[PassRecord("fuse-gemm", True, status="rolled-back", reason="moved outputs")],
    )
    text = report.to_table()
    assert "within 15 % of the fastest and smaller" in text
    assert "static 1.40x (c 0.99)" in text and "weights-int8: slower than float" in text
    assert "rolled back: fuse-gemm (moved outputs)" in text
    assert "op " not in text  # no op changed: no op table
