"""Probe feeds from signatures, data loading/validation, and the comparison metrics."""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
import pytest

from onnxsqueeze.core.errors import CalibrationDataError, PipelineConfigError
from onnxsqueeze.run.compare import compare_runs
from onnxsqueeze.run.feeds import load_feeds
from onnxsqueeze.run.probes import parse_shape_overrides, random_feeds
from onnxsqueeze.run.session import Session
from onnxsqueeze.run.signature import input_specs

from conftest import parse

TYPED = """
<ir_version: 8, opset_import: ["" : 17]>
typed (float[batch, seq, 8] f, int64[batch, seq] ids, bool[batch] flag, float16[3] h, uint8[seq] u, double x64)
    => (float[batch, seq, 8] out)
{
  out = Identity(f)
}
"""


def test_random_feeds_honour_dtypes_and_shared_symbols():
    specs = input_specs(ir.serde.deserialize_model(parse(TYPED)))
    shapes, dims = parse_shape_overrides(["seq=7"])
    (feed,) = random_feeds(specs, count=1, dims=dims)
    assert feed["f"].shape == (1, 7, 8) and feed["f"].dtype == np.float32
    assert feed["ids"].shape == (1, 7) and feed["ids"].dtype == np.int64
    assert set(np.unique(feed["ids"])) <= {0, 1}
    assert feed["flag"].dtype == np.bool_ and feed["h"].dtype == np.float16
    assert feed["u"].shape == (7,) and feed["x64"].shape == ()
    again = random_feeds(specs, count=1, dims=dims)[0]
    np.testing.assert_array_equal(feed["f"], again["f"])  # seeded


def test_shape_overrides():
    shapes, dims = parse_shape_overrides(["input_ids:1x128", "batch=4", "s:scalar"])
    assert shapes == {"input_ids": (1, 128), "s": ()} and dims == {"batch": 4}
    with pytest.raises(PipelineConfigError, match="expected NAME:DxDxD"):
        parse_shape_overrides(["input_ids:1xbig"])


def test_load_feeds_from_npz_folder_and_iterable(tmp_path, mlp):
    specs = input_specs(ir.serde.deserialize_model(mlp))
    x = np.ones((2, 4), np.float64)  # float64 is cast to the model's float32
    np.savez(tmp_path / "one.npz", x=x, label=np.arange(2))
    (tmp_path / "folder").mkdir()
    for i in range(3):
        np.savez(tmp_path / "folder" / f"s{i}.npz", x=x * i)
    assert load_feeds(tmp_path / "one.npz", specs)[0]["x"].dtype == np.float32
    assert len(load_feeds(tmp_path / "folder", specs)) == 3
    assert len(load_feeds(tmp_path / "folder", specs, limit=2)) == 2
    assert len(load_feeds([{"x": x}, {"x": x}], specs)) == 2


@pytest.mark.parametrize(
    "source, message",
    [
        ("missing.npz", "not found"),
        ([{"y": np.ones((1, 4), np.float32)}], "missing input"),
        ([{"x": np.ones((1, 5), np.float32)}], "has shape"),
        ([{"x": np.ones((1, 4), np.int64)}], "the model expects float32"),
        ([42], "expected a mapping"),
        ([], "no samples"),
    ],
)
def test_bad_data_is_a_clear_error(tmp_path, mlp, source, message):
    specs = input_specs(ir.serde.deserialize_model(mlp))
    if isinstance(source, str):
        source = tmp_path / source
    with pytest.raises(CalibrationDataError, match=message):
        load_feeds(source, specs)


def test_session_runs_and_falls_back_to_cpu(mlp):
    session = Session(ir.serde.deserialize_model(mlp), ["cuda", "cpu"])
    assert session.providers[-1] == "CPUExecutionProvider"
    out = session.run({"x": np.zeros((1, 4), np.float32)})
    np.testing.assert_allclose(out["y"], [[0.5, -1, 2]])


def test_unknown_provider_is_a_usage_error(mlp):
    with pytest.raises(PipelineConfigError, match="unknown execution provider"):
        Session(ir.serde.deserialize_model(mlp), ["warp-drive"])


def test_compare_metrics():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4, 10)).astype(np.float32)
    same = compare_runs([{"o": a}], [{"o": a.copy()}])
    assert same.within() and same.outputs[0].exact and same.outputs[0].top1_agreement == 1.0
    noisy = a + np.float32(1e-3) * rng.standard_normal(a.shape).astype(np.float32)
    cmp = compare_runs([{"o": a}], [{"o": noisy}])
    m = cmp.outputs[0]
    assert not cmp.within(1e-6) and cmp.within(1e-2)
    assert m.max_abs == pytest.approx(float(np.abs(a - noisy).max()), rel=1e-5)
    assert m.max_rel == pytest.approx(m.max_abs / float(np.abs(a).max()), rel=1e-5)
    assert 0.999 < m.cosine < 1.0 and 40 < m.sqnr_db < 80
    shape = compare_runs([{"o": a}], [{"o": a[:2]}])
    assert not shape.within(1.0) and "shape" in shape.summary()


def test_compare_handles_nan_inf_and_integers():
    a = np.array([np.nan, np.inf, -np.inf, 1.0], np.float32)
    assert compare_runs([{"o": a}], [{"o": a.copy()}]).within()
    b = a.copy()
    b[3] = np.nan
    assert not compare_runs([{"o": a}], [{"o": b}]).within(1e9)
    ints = compare_runs([{"o": np.arange(4)}], [{"o": np.array([0, 1, 2, 5])}])
    assert not ints.within(1.0) and math.isinf(ints.outputs[0].max_rel)


def test_session_through_temporary_directory_for_external_weights(tmp_path, monkeypatch):
    """Models with external (or > 1.5 GB) weights reach onnxruntime via a temp folder."""
    import onnx

    import onnxsqueeze.run.session as runtime
    from onnxsqueeze.core.io import load_model

    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1, 64] x) => (float[1, 64] y) { y = MatMul(x, W) }
    """
    proto = onnx.parser.parse_model(text)
    w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    proto.graph.initializer.append(onnx.numpy_helper.from_array(w, "W"))
    in_memory = ir.serde.deserialize_model(onnx.load_from_string(proto.SerializeToString()))
    onnx.save(
        proto, tmp_path / "m.onnx", save_as_external_data=True, location="m.bin", size_threshold=0
    )
    external = load_model(tmp_path / "m.onnx").model
    x = np.ones((1, 64), np.float32)
    np.testing.assert_allclose(Session(external).run({"x": x})["y"], x @ w, rtol=1e-5)
    monkeypatch.setattr(runtime, "INLINE_SESSION_LIMIT", 0)  # as if the weights were > 2 GB
    np.testing.assert_allclose(Session(in_memory).run({"x": x})["y"], x @ w, rtol=1e-5)


#: Like silero-vad: the signal must be long enough (Reshape to rows of 64 here), and the
#: recurrent state's axis 1 is its batch (the Reshape only fits when that axis is 1).
PICKY = """
<ir_version: 8, opset_import: ["" : 17]>
picky (float[n, len] signal, float[2, b, 4] state) => (float[r, 64] rows, float[2, 4] s)
<int64[2] row_shape = {-1, 64}, int64[2] state_shape = {2, 4}>
{
  rows = Reshape(signal, row_shape)
  s = Reshape(state, state_shape)
}
"""


def test_probes_grow_until_the_original_accepts_them(tmp_path):
    """Random probes of the default size (32) fail; verification retries larger sizes,
    then the first input alone, says so, and the quantize stage uses the same shapes."""
    import onnx

    import onnxsqueeze

    proto = parse(PICKY)
    with pytest.raises(Exception, match="Reshape"):
        Session(ir.serde.deserialize_model(proto)).run_all(
            random_feeds(input_specs(ir.serde.deserialize_model(proto)))
        )
    result = onnxsqueeze.squeeze(proto, quantize="weights-int8")
    report = result.report
    assert report.verification_status == "passed"
    assert any("unsized dims are 128 on 'signal', 1 elsewhere" in w for w in report.warnings)
    assert not any("quantization" in w and "skipped" in w for w in report.warnings)
    onnx.checker.check_model(result.model)
    # Given shapes are kept, never guessed over: a wrong one stays a clear error.
    with pytest.raises(Exception, match="cannot verify"):
        onnxsqueeze.squeeze(proto, shapes={"signal": (1, 32), "state": (2, 1, 4)})


#: Like PyTorch's legacy TransformerEncoder export: the sequence axis is declared dynamic, but
#: a Reshape holds the traced length (12), so only that length runs.
TRACED = """
<ir_version: 8, opset_import: ["" : 17]>
traced (float[b, s, 4] x) => (float[12, 4] y)
<int64[2] traced_shape = {12, 4}>
{
  y = Reshape(x, traced_shape)
}
"""


def test_probes_try_the_sizes_the_graph_names_when_guessed_ones_fail():
    """32, 128 and 512 all fail; the graph's shape constants name 4 and 12, and 12 runs."""
    import onnxsqueeze
    from onnxsqueeze.run.probes import sizes_in_graph

    proto = parse(TRACED)
    model = ir.serde.deserialize_model(proto)
    assert sizes_in_graph(model) == [4, 12]
    assert sizes_in_graph(model, skip=(4,)) == [12]
    report = onnxsqueeze.squeeze(proto, quantize="none").report
    assert report.verification_status == "passed"
    assert any("unsized dims are 12" in w for w in report.warnings), report.warnings


def test_latency_rounds_start_after_the_other_sessions_threads_settle(mlp, monkeypatch):
    """Each timed round of compare_latency begins with a pause and an untimed run: without
    them the first runs after a switch share the cores with the other session's spinning
    onnxruntime workers (measured, see onnxsqueeze.run.latency)."""
    from onnxsqueeze.run import latency

    events: list[str] = []
    monkeypatch.setattr(latency.time, "sleep", lambda s: events.append(f"sleep {s}"))
    model = ir.serde.deserialize_model(mlp)
    speed = latency.compare_latency(model, model, ["cpu"], rounds=3, runs=4)
    assert speed > 0
    assert events == [f"sleep {latency.SETTLE_S}"] * 6
    assert latency.SETTLE_S >= 0.1


def test_runs_per_round_follow_the_models_run_time(mlp, monkeypatch):
    """Fast models get up to MAX_RUNS runs a round (ten were too few to tell 0.9x from 1.1x
    on a 0.1 ms model), slow ones are cut to ROUND_BUDGET_S of run time (never below
    MIN_RUNS)."""
    from onnxsqueeze.run import latency

    counted: list[int] = []
    monkeypatch.setattr(latency.time, "sleep", lambda s: None)
    monkeypatch.setattr(latency, "timed_runs", lambda r, f, runs: counted.append(runs) or [1.0])
    model = ir.serde.deserialize_model(mlp)
    latency.compare_latency(model, model, ["cpu"], rounds=2, runs=10)
    assert counted == [latency.MAX_RUNS] * 4  # a tiny model: as many runs as allowed
    monkeypatch.setattr(latency, "FAST_ROUND_S", 1e-9)
    counted.clear()
    latency.compare_latency(model, model, ["cpu"], rounds=2, runs=10)
    assert counted == [10] * 4  # no longer fast: the runs asked for
    monkeypatch.setattr(latency, "ROUND_BUDGET_S", 1e-9)
    counted.clear()
    latency.compare_latency(model, model, ["cpu"], rounds=2, runs=10)
    assert counted == [latency.MIN_RUNS] * 4


def test_large_models_are_timed_one_session_at_a_time(mlp, monkeypatch):
    """Above INTERLEAVE_LIMIT the baseline, the candidate and the baseline again are timed
    each in its own session, released before the next: never two in memory (a 4 GB model
    interleaved with its candidate held 1.79x the original's session)."""
    from onnxsqueeze.run import latency

    alive, most, made = [0], [0], []

    class Counted(latency.Session):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            alive[0] += 1
            most[0] = max(most[0], alive[0])
            made.append(self)
            made.pop()  # no reference kept

        def __del__(self):
            alive[0] -= 1

    monkeypatch.setattr(latency, "Session", Counted)
    monkeypatch.setattr(latency.time, "sleep", lambda s: None)
    model = ir.serde.deserialize_model(mlp)
    monkeypatch.setattr(latency, "INTERLEAVE_LIMIT", 0)
    assert latency.compare_latency(model, model, ["cpu"], rounds=2, runs=3) > 0
    assert most[0] == 1 and alive[0] == 0
    monkeypatch.setattr(latency, "INTERLEAVE_LIMIT", 1 << 40)
    latency.compare_latency(model, model, ["cpu"], rounds=2, runs=3)
    assert most[0] == 2  # small models: interleaved, both sessions at once


def test_one_at_a_time_puts_the_candidates_weights_on_disk_first(mlp, tmp_path, monkeypatch):
    """The candidate's in-memory weights wait in the run's spill file before the baseline's
    session is made (held beside it, a 1.3 GB model's int8 candidate cost 0.33 GiB more than
    the original's session); it still runs, with the same numbers."""
    from onnxsqueeze.core.spill import Spill, spilling
    from onnxsqueeze.run import latency

    baseline = ir.serde.deserialize_model(mlp)
    candidate = ir.serde.deserialize_model(mlp)
    for value in candidate.graph.initializers.values():  # as a pass makes them: in memory
        value.const_value = ir.Tensor(value.const_value.numpy(), name=value.name)
    feed = random_feeds(input_specs(baseline), count=1, seed=0)[0]
    expected = Session(candidate).run(feed)
    kinds = []

    class Watched(latency.Session):
        def __init__(self, model, *args, **kwargs):
            kinds.append({type(v.const_value) for v in candidate.graph.initializers.values()})
            super().__init__(model, *args, **kwargs)

    monkeypatch.setattr(latency, "Session", Watched)
    monkeypatch.setattr(latency.time, "sleep", lambda s: None)
    monkeypatch.setattr(latency, "INTERLEAVE_LIMIT", 0)
    spill = Spill(tmp_path, min_bytes=1)
    with spilling(spill):
        assert latency.compare_latency(baseline, candidate, ["cpu"], feed, rounds=1, runs=3) > 0
        assert kinds[0] == {ir.LazyTensor}
        got = Session(candidate).run(feed)
    spill.close()
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value)
