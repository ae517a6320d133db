"""--plan / --replay: a run's timing decisions written, and replayed instead of timing again,
so the same data gives the same bytes; a decision within noise of its line is said."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxsqueeze
from onnxsqueeze.cli import main
from onnxsqueeze.core.errors import PipelineConfigError
from onnxsqueeze.run import latency
from tests.conftest import weighted_model


@pytest.fixture
def model_and_data(tmp_path: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((128, 64)).astype(np.float32)
    path = tmp_path / "m.onnx"
    onnx.save(weighted_model("MatMul", weight, ["n", 128]), path)
    data = tmp_path / "data.npz"
    np.savez(data, x=rng.standard_normal((16, 128)).astype(np.float32))
    return path, data


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_replay_gives_the_same_bytes_without_timing(model_and_data, tmp_path, monkeypatch):
    model, data = model_and_data
    first = onnxsqueeze.squeeze_file(model, tmp_path / "a.onnx", data=data, quantize="auto")
    assert first.timings and all(not t["replayed"] for t in first.timings)

    def no_timing(*args, **kwargs):
        raise AssertionError("a replayed run timed a model")

    monkeypatch.setattr(latency, "compare_latency", no_timing)
    monkeypatch.setattr(latency, "loaded_op_types", no_timing)
    again = onnxsqueeze.squeeze_file(
        model, tmp_path / "b.onnx", data=data, quantize="auto", replay={"timings": first.timings}
    )
    assert _digest(tmp_path / "a.onnx") == _digest(tmp_path / "b.onnx")
    assert [t["key"] for t in again.timings] == [t["key"] for t in first.timings]
    assert all(t["replayed"] for t in again.timings)
    assert again.quantization["mode"] == first.quantization["mode"]


def test_the_plan_decides_and_a_path_it_lacks_is_said(model_and_data, tmp_path, monkeypatch):
    """Timings that say every integer mode is slower make auto ship weight-only int8 (or
    nothing), whatever this machine would measure; an empty plan's timings are measured and
    the report says the run left the plan."""
    model, data = model_and_data
    monkeypatch.setattr(latency, "compare_latency", lambda *a, **k: 2.0)
    fast = onnxsqueeze.squeeze_file(model, tmp_path / "a.onnx", data=data, quantize="auto")
    assert fast.quantization["mode"] in ("static", "dynamic")
    slow = [{**t, "ratio": 0.5} if t["basis"] is None else t for t in fast.timings]
    replayed = onnxsqueeze.squeeze_file(
        model, tmp_path / "b.onnx", data=data, quantize="auto", replay={"timings": slow}
    )
    assert replayed.quantization["mode"] == "weights-int8"
    lacking = onnxsqueeze.squeeze_file(
        model, tmp_path / "c.onnx", data=data, quantize="auto", replay={"timings": slow[:1]}
    )
    assert any("the plan does not hold" in w for w in lacking.warnings)


def test_a_decision_within_noise_of_the_line_is_said(model_and_data, tmp_path, monkeypatch):
    model, data = model_and_data
    monkeypatch.setattr(latency, "compare_latency", lambda *a, **k: 0.97)
    report = onnxsqueeze.squeeze_file(model, tmp_path / "a.onnx", data=data, quantize="auto")
    assert any(t["near_line"] for t in report.timings)
    assert any("a rerun may decide otherwise" in w for w in report.warnings)


def test_cli_plan_then_replay(model_and_data, tmp_path, capsys):
    model, data = model_and_data
    plan = tmp_path / "plan.json"
    base = [str(model), "--data", str(data), "-q"]
    assert main([*base, "-o", str(tmp_path / "a.onnx"), "--plan", str(plan)]) == 0
    written = json.loads(plan.read_text())
    assert written["schema"] == "onnxsqueeze.plan" and written["timings"]
    assert main([*base, "-o", str(tmp_path / "b.onnx"), "--replay", str(plan)]) == 0
    assert _digest(tmp_path / "a.onnx") == _digest(tmp_path / "b.onnx")
    capsys.readouterr()
    assert main([*base, "-o", str(plan), "--replay", str(plan)]) == 1  # would overwrite it
    assert "the --replay plan" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text('{"timings": [{"key": "x"}]}')
    assert main([*base, "-o", str(tmp_path / "c.onnx"), "--replay", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a plan" in err[0]
    assert not (tmp_path / "c.onnx").exists()


def test_api_refuses_what_is_not_a_plan(model_and_data):
    model, _ = model_and_data
    for bad in ({"timings": "x"}, {"nothing": []}, "/nonexistent/plan.json"):
        with pytest.raises(PipelineConfigError, match="plan"):
            onnxsqueeze.squeeze(str(model), replay=bad)


def test_plan_onto_an_earlier_plan_names_the_timing_that_differed(
    model_and_data, tmp_path, monkeypatch, capsys
):
    """Two runs whose timings differ (here: static measured 2.0x, then 0.5x) ship different
    bytes; the second, writing its --plan over the first's, says which decision moved."""
    model, data = model_and_data
    plan = tmp_path / "plan.json"
    base = [str(model), "--data", str(data), "--plan", str(plan)]
    monkeypatch.setattr(latency, "compare_latency", lambda *a, **k: 2.0)
    assert main([*base, "-o", str(tmp_path / "a.onnx"), "-q"]) == 0
    assert "moved since" not in capsys.readouterr().err
    monkeypatch.setattr(latency, "compare_latency", lambda *a, **k: 0.5)
    report = tmp_path / "r.json"
    assert main([*base, "-o", str(tmp_path / "b.onnx"), "--report", str(report), "-q"]) == 0
    err = capsys.readouterr().err
    assert "timings moved since" in err and "2.00x there, 0.50x here" in err
    assert any("moved since" in w for w in json.loads(report.read_text())["warnings"])
    assert _digest(tmp_path / "a.onnx") != _digest(tmp_path / "b.onnx")


def test_auto_keeps_the_alternatives_it_set_aside_on_disk(tmp_path, monkeypatch):
    """squeeze_file's auto run moves each tried alternative's new weights to its spill file
    (a 4 GB model's int8 alternative held 1 GB while the next was judged); the output is the
    same bytes as with the alternatives in memory."""
    from onnxsqueeze.core import spill as spill_module

    rng = np.random.default_rng(1)
    weight = rng.standard_normal((2048, 1024)).astype(np.float32)  # int8: 2 MiB, spilled
    model = tmp_path / "m.onnx"
    onnx.save(weighted_model("MatMul", weight, ["n", 2048]), model)
    data = tmp_path / "data.npz"
    np.savez(data, x=rng.standard_normal((8, 2048)).astype(np.float32))
    monkeypatch.setattr(latency, "compare_latency", lambda *a, **k: 1.5)
    spilled: list[int] = []
    original = spill_module.Spill.__call__

    def counting(self, model):
        original(self, model)
        spilled.append(self.spilled)

    monkeypatch.setattr(spill_module.Spill, "__call__", counting)
    onnxsqueeze.squeeze_file(model, tmp_path / "a.onnx", data=data, quantize="auto")
    assert spilled and max(spilled) >= 2 * 1024 * 1024  # the int8 weights went to disk
    monkeypatch.setattr(spill_module, "spill_if_active", lambda model: None)
    import onnxsqueeze.stages.quantize.driver as driver

    monkeypatch.setattr(driver, "spill_if_active", lambda model: None)
    onnxsqueeze.squeeze_file(model, tmp_path / "b.onnx", data=data, quantize="auto")
    assert _digest(tmp_path / "a.onnx") == _digest(tmp_path / "b.onnx")
