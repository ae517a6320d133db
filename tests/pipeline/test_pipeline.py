"""Pass registry, option coercion, per-pass verification and rollback."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import pytest

import onnxsqueeze
from onnxsqueeze.core.errors import PipelineConfigError, VerificationError
from onnxsqueeze.core.pass_base import SqueezePass, SqueezeResult
from onnxsqueeze.pipeline.presets import builtin_registry
from onnxsqueeze.pipeline.registry import PassRegistry


class PerturbWeightsPass(SqueezePass):
    """Deliberately wrong: claims to be lossless but adds 1 to every float weight."""

    name = "perturb-weights"
    summary = "test only"
    lossless = True

    def call(self, model: ir.Model) -> SqueezeResult:
        for value in model.graph.initializers.values():
            array = value.const_value.numpy()
            if array.dtype.kind == "f":
                value.const_value = ir.Tensor(array + 1, name=value.name)
        return SqueezeResult(model, modified=True, stats={"weights_changed": 1})


class CrashingPass(SqueezePass):
    name = "crash"
    summary = "test only"

    def call(self, model: ir.Model) -> SqueezeResult:
        model.graph.remove(next(iter(model.graph)), safe=False)  # half-done edit, then fail
        raise RuntimeError("boom")


class DanglingPass(SqueezePass):
    """Leaves a graph onnx.checker rejects (a node reads an undefined value)."""

    name = "dangle"
    summary = "test only"

    def call(self, model: ir.Model) -> SqueezeResult:
        node = next(iter(model.graph))
        node.replace_input_with(0, ir.Value(name="undefined_value"))
        return SqueezeResult(model, modified=True)


@dataclasses.dataclass(frozen=True)
class _Opts:
    level: int = 1
    enabled: bool = True
    ratio: float = 0.5


class OptionsPass(SqueezePass):
    name = "with-options"
    summary = "test only"
    Options = _Opts

    def call(self, model: ir.Model) -> SqueezeResult:
        return SqueezeResult(model, modified=False)


def _registry(*classes) -> PassRegistry:
    registry = builtin_registry()
    for cls in classes:
        registry.register(cls)
    return registry


@pytest.mark.parametrize("bad_pass", [PerturbWeightsPass, CrashingPass, DanglingPass])
def test_bad_pass_is_rolled_back_and_reported(mlp, bad_pass):
    registry = _registry(bad_pass)
    model, report = onnxsqueeze.squeeze(mlp, passes=[bad_pass.name, "cleanup"], registry=registry)
    record = report.passes[0]
    assert record.name == bad_pass.name
    assert record.status in ("rolled-back", "failed")
    assert record.reason
    assert report.passes[1].status in ("applied", "unchanged")
    assert report.verification_status == "passed"
    # The returned model equals the original numerically (the bad change was undone).
    from conftest import run_ort

    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    np.testing.assert_array_equal(run_ort(model, {"x": x})[0], run_ort(mlp, {"x": x})[0])
    assert "rolled" in report.to_table() or "failed" in report.to_table()


def test_rollback_reason_names_the_error(mlp):
    _, report = onnxsqueeze.squeeze(
        mlp, passes=["perturb-weights"], registry=_registry(PerturbWeightsPass)
    )
    assert report.passes[0].status == "rolled-back"
    assert "changed outputs beyond tolerance" in report.passes[0].reason
    assert report.passes[0].verification["max_rel"] > 1e-3


def test_registry_errors_and_options():
    registry = _registry(OptionsPass)
    with pytest.raises(PipelineConfigError, match="unknown pass 'nope'.*cleanup"):
        registry.build(["nope"])
    with pytest.raises(PipelineConfigError, match="no option 'colour'"):
        registry.create("with-options", {"colour": "red"})
    with pytest.raises(PipelineConfigError, match="expects int"):
        registry.create("with-options", {"level": "high"})
    made = registry.create("with-options", {"level": "3", "enabled": "no", "ratio": "0.25"})
    assert made.options == _Opts(level=3, enabled=False, ratio=0.25)
    assert made.describe() == "with-options(level=3, enabled=False, ratio=0.25)"
    with pytest.raises(PipelineConfigError, match="duplicate"):
        registry.register(OptionsPass)


def test_presets_expand_and_registries_are_independent():
    registry = builtin_registry()
    built = registry.build(["lossless"])
    assert [p.name for p in built] == [n for n, _ in registry.preset("lossless").passes]
    assert all(p.lossless for p in built) and built[0].name == "cleanup"
    other = builtin_registry()
    other.register(OptionsPass)
    with pytest.raises(PipelineConfigError):
        registry.get("with-options")
    with pytest.raises(PipelineConfigError, match="unknown preset"):
        registry.preset("fastest")


def test_shape_override_that_contradicts_the_model(mlp):
    with pytest.raises(PipelineConfigError, match="shapes= for .x.*does not fit"):
        onnxsqueeze.squeeze(mlp, shapes=["x:2x5"])


def test_verification_needs_a_runnable_original():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4] x, int64[2] shape) => (float[A, B] y) { y = Reshape(x, shape) }
    """
    import onnx.parser

    model = onnx.parser.parse_model(text)
    # Random {0,1} shape values cannot reshape 4*N elements: verification cannot run.
    with pytest.raises(VerificationError, match="fails on the probe feeds"):
        onnxsqueeze.squeeze(model)
    # With real data it works.
    feeds = [{"x": np.ones((2, 4), np.float32), "shape": np.array([4, 2], np.int64)}]
    _, report = onnxsqueeze.squeeze(model, data=feeds)
    assert report.verification_status == "passed"


def test_no_verify_reports_it(mlp):
    _, report = onnxsqueeze.squeeze(mlp, verify=False)
    assert report.verification_status == "skipped"
    assert any("verification disabled" in w for w in report.warnings)


@dataclasses.dataclass(frozen=True)
class _NudgeOpts:
    factor: float = 1.0 + 1e-6
    rtol: float | None = 1e-4  # None: an exact pass


class NudgeWeightsPass(SqueezePass):
    """Scales one weight, as a fusion that reassociates float math would move it."""

    name = "nudge"
    summary = "test only"
    Options = _NudgeOpts

    def call(self, model: ir.Model) -> SqueezeResult:
        value = model.graph.initializers["w"]
        value.const_value = ir.Tensor(value.const_value.numpy() * self.options.factor, name="w")
        return SqueezeResult(model, modified=True)


#: Two equal products subtracted: the output is 0, its scale is pure rounding noise.
CANCELS = """
<ir_version: 8, opset_import: ["" : 17]>
cancels (float[2, 4] x) => (float[2, 3] y)
<float[4, 3] w = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12},
 float[4, 3] v = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}>
{
  a = MatMul(x, w)
  b = MatMul(x, v)
  y = Sub(a, b)
}
"""


@pytest.mark.parametrize(
    ("options", "applied"),
    [
        ({}, True),  # reassociating, change far below the floor
        ({"rtol": None}, False),  # exact passes get no floor
        ({"factor": 1.5}, False),  # a real change, far above the floor
    ],
)
def test_noise_floor_only_admits_reassociation_at_rounding_scale(monkeypatch, options, applied):
    """Where an output is ~0 on the probe feeds, a fusion's relative change is unbounded;
    a reassociating pass is then held to what onnxruntime's own optimizer moves it."""
    from onnxsqueeze.pipeline.verified import Pipeline

    from conftest import parse

    monkeypatch.setattr(Pipeline, "_runtime_noise", lambda self: {"y": 1e-4})
    _, report = onnxsqueeze.squeeze(
        parse(CANCELS),
        passes=[("nudge", options)],
        registry=_registry(NudgeWeightsPass),
    )
    record = report.passes[0]
    assert (record.status == "applied") is applied, record.reason
    assert report.verification_status == "passed"
    if applied:
        assert record.verification["max_rel"] > 1e-4  # the relative bar alone would refuse
        assert "optimizer" in record.verification["summary"]


def test_runtime_noise_measures_onnxruntime_optimizations():
    """The floor comes from running the original with onnxruntime's optimizations on the
    probe feeds: one finite amount per output, measured only when asked for."""
    from onnxsqueeze.pipeline.verified import Pipeline

    from conftest import parse

    rng = np.random.default_rng(0)
    model = ir.from_proto(parse(CANCELS))
    feeds = [{"x": rng.standard_normal((2, 4)).astype(np.float32)}]
    pipeline = Pipeline([NudgeWeightsPass(factor=1.0)], feeds=feeds)  # may reassociate
    _, report = pipeline.run(model)
    assert pipeline._noise is None  # the relative bar held: no floor was needed
    noise = pipeline._runtime_noise()
    assert set(noise) == {"y"} and 0 <= noise["y"] < 1e-3
    assert report.verification_status == "passed"
