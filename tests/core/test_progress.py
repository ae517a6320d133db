"""Progress of long steps reaches whoever asked (the CLI's bar), labelled by stage, and
nobody else."""

from __future__ import annotations

import numpy as np

import onnxsqueeze
from onnxsqueeze.core.progress import reporting, step
from tests.conftest import weighted_model


def test_a_squeeze_reports_calibration_timing_and_search_by_stage():
    rng = np.random.default_rng(0)
    proto = weighted_model("MatMul", rng.standard_normal((64, 32)).astype(np.float32), ["n", 64])
    data = [{"x": rng.standard_normal((4, 64)).astype(np.float32)} for _ in range(6)]
    seen: list[tuple[str, int, int | None]] = []
    with reporting(lambda label, done, total: seen.append((label, done, total))):
        onnxsqueeze.squeeze(proto, quantize="static", data=data)
    labels = {label for label, _, _ in seen}
    assert "quantize static: calibrating" in labels
    assert all(done >= 1 and (total is None or done <= total) for _, done, total in seen)
    seen.clear()
    onnxsqueeze.squeeze(proto, quantize="static", data=data)  # outside the block: nothing
    step("ignored", 1, 1)
    assert seen == []
