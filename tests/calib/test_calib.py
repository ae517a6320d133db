"""Calibration: observers (properties, NaN/Inf), kernels vs NumPy references, ORT agreement,
the collector on real models, the cache."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from onnxsqueeze.calib import kernels
from onnxsqueeze.calib.cache import Calibration
from onnxsqueeze.calib.collector import CollectOptions, Collector
from onnxsqueeze.calib.observers import (
    HistogramObserver,
    MinMaxObserver,
    PerChannelMinMaxObserver,
    entropy_threshold,
)
from onnxsqueeze.core.errors import CalibrationError

REPO = Path(__file__).resolve().parents[2]
DIGITS = REPO / "models" / "digits_cnn.onnx"

finite_arrays = hnp.arrays(
    np.float32,
    hnp.array_shapes(min_dims=1, max_dims=3, max_side=40),
    elements=st.floats(-1e6, 1e6, width=32, allow_subnormal=False),
)


def _hist(*chunks: np.ndarray, bins: int = 256) -> HistogramObserver:
    obs = HistogramObserver(bins)
    for chunk in chunks:
        obs.update(chunk)
    return obs


def _same_hist(a: HistogramObserver, b: HistogramObserver) -> None:
    assert a.t == b.t and (a.lo, a.hi, a.finite) == (b.lo, b.hi, b.finite)
    np.testing.assert_array_equal(a.counts, b.counts)


# ---------------------------------------------------------------------------- properties


@settings(max_examples=60, deadline=None)
@given(finite_arrays, finite_arrays)
def test_update_a_then_b_equals_merging_observers_of_a_and_b(a, b):
    _same_hist(_hist(a, b), _hist(a).merge(_hist(b)))
    _same_hist(_hist(a, b), _hist(b).merge(_hist(a)))
    mm = MinMaxObserver()
    mm.update(a)
    mm.update(b)
    other = MinMaxObserver()
    other.update(b)
    merged = MinMaxObserver()
    merged.update(a)
    merged.merge(other)
    assert mm.range() == merged.range()


@settings(max_examples=60, deadline=None)
@given(finite_arrays, st.integers(1, 7))
def test_histogram_does_not_depend_on_batch_split(data, pieces):
    flat = data.reshape(-1)
    whole = _hist(flat)
    split = _hist(*np.array_split(flat, pieces))
    _same_hist(whole, split)
    assert whole.counts.sum() == flat.size
    assert abs(whole.hi) < whole.t and abs(whole.lo) < whole.t


def test_histogram_counts_match_numpy_on_the_canonical_grid():
    data = np.random.default_rng(3).standard_normal(10_000).astype(np.float32) * 3
    obs = _hist(data[:100], data[100:] * 5, bins=512)  # the range grows after the first batch
    both = np.concatenate([data[:100], data[100:] * 5])
    expected, _ = np.histogram(both, bins=512, range=(-obs.t, obs.t))
    np.testing.assert_array_equal(obs.counts, expected)
    assert obs.t == 2.0 ** math.ceil(math.log2(np.abs(both).max() + 1e-30))


@pytest.mark.parametrize("scale", [1e-30, 1e-3, 1.0, 3e5, 1e37])
def test_float32_binning_is_the_exact_float64_grid(scale):
    """count() bins float32 data in float32 arithmetic; it must give the bins of exact
    (float64) arithmetic, also at bin edges, for tiny negatives, and at extreme scales."""
    rng = np.random.default_rng(5)
    bins = 1024
    data = rng.standard_normal(50_000) * scale
    t = 2.0 ** math.ceil(math.log2(np.abs(data).max() * 1.0001))
    edges = (np.arange(-bins // 2, bins // 2) * (2 * t / bins)).astype(np.float32)
    tiny = np.float32(np.nextafter(np.float32(0), np.float32(1)))
    data = np.concatenate(
        [data.astype(np.float32), edges, np.nextafter(edges, np.float32(-np.inf)), [-tiny, tiny]]
    ).astype(np.float32)
    data = data[np.abs(data.astype(np.float64)) < t]
    counts = np.zeros(bins, np.int64)
    kernels.count(data, counts, t)
    exact = np.floor(data.astype(np.float64) * (bins / (2 * t))).astype(np.int64) + bins // 2
    np.testing.assert_array_equal(counts, np.bincount(exact, minlength=bins))


@pytest.mark.parametrize("observer", [HistogramObserver, MinMaxObserver])
def test_nonfinite_values_are_counted_not_binned(observer):
    x = np.array([1.0, -2.0, np.nan, np.inf, -np.inf, -np.inf, 0.5], np.float32)
    obs = observer()
    obs.update(x)
    assert (obs.nan, obs.pos_inf, obs.neg_inf, obs.finite) == (1, 1, 2, 3)
    lo, hi = obs.range()
    assert (lo, hi) == (-2.0, 1.0)
    for method in ("percentile", "entropy", "mse") if observer is HistogramObserver else ():
        lo, hi = obs.range(method)
        assert math.isfinite(lo) and math.isfinite(hi)
    scale = obs.qparams("uint8").scale
    assert np.isfinite(scale).all() and (scale > 0).all()


def test_all_nonfinite_tensor_raises_a_clear_error():
    obs = HistogramObserver()
    obs.update(np.array([np.nan, -np.inf], np.float32))
    with pytest.raises(CalibrationError, match="mask: no finite value.*1 NaN.*1 -inf"):
        obs.range("entropy", name="mask")


def test_per_channel_minmax():
    x = np.random.default_rng(0).standard_normal((4, 3, 5, 5)).astype(np.float32)
    obs = PerChannelMinMaxObserver(axis=1)
    obs.update(x[:2])
    obs.update(x[2:])
    lo, hi = obs.range()
    np.testing.assert_array_equal(lo, x.min(axis=(0, 2, 3)))
    np.testing.assert_array_equal(hi, x.max(axis=(0, 2, 3)))
    assert obs.qparams("int8", symmetric=True).scale.shape == (3,)


# ---------------------------------------------------------------------------- kernels vs references


def _reference_kl(hist: np.ndarray, quantized_bins: int) -> np.ndarray:
    """Straightforward NumPy version of the TensorRT entropy search (smooth, then KL)."""

    def smooth(p):
        zeros = p == 0
        if zeros.all():
            return None
        take = 1e-4 * zeros.sum() / (~zeros).sum()
        out = np.where(zeros, 1e-4, p - take)
        return None if (out <= 0).any() else out

    mid = hist.size // 2
    result = []
    for i in range(quantized_bins // 2, mid + 1):
        start, stop = mid - i, min(mid + i + 1, hist.size)
        sliced = hist[start:stop].astype(np.float64)
        p = sliced.copy()
        p[0] += hist[:start].sum()
        p[-1] += hist[stop:].sum()
        merged = sliced.size // quantized_bins
        q = np.zeros_like(p)
        for k in range(quantized_bins):
            lo = k * merged
            hi = sliced.size if k == quantized_bins - 1 else lo + merged
            nonzero = p[lo:hi] != 0
            if nonzero.any():
                q[lo:hi][nonzero] = sliced[lo:hi].sum() / nonzero.sum()
        ps, qs = smooth(p), smooth(q)
        if ps is None or qs is None:
            result.append(np.inf)
            continue
        ps, qs = ps / ps.sum(), qs / qs.sum()
        result.append(float(np.sum(ps * np.log(ps / qs))))
    return np.array(result)


@pytest.mark.parametrize("seed", range(4))
def test_entropy_search_equals_numpy_reference(seed):
    rng = np.random.default_rng(seed)
    data = np.concatenate([rng.standard_normal(20_000), rng.laplace(size=500) * 6])
    if seed % 2:
        data = np.maximum(data, 0)  # after ReLU: half the histogram empty
    obs = _hist(data.astype(np.float32), bins=1024)
    counts, t = obs.entropy_histogram(512)
    ours = kernels.kl_divergences(counts.astype(np.float64), 64)
    ref = _reference_kl(counts, 64)
    np.testing.assert_allclose(ours, ref, rtol=1e-9)
    i = int(np.argmin(ref)) + 32
    width = 2 * t / counts.size
    expected = (-t + (counts.size // 2 - i) * width, -t + (counts.size // 2 + i + 1) * width)
    assert entropy_threshold(counts, t, 64) == pytest.approx(expected)


def test_entropy_histogram_merges_bins_exactly():
    obs = _hist(np.random.default_rng(0).standard_normal(5000).astype(np.float32), bins=4096)
    counts, t = obs.entropy_histogram(256)
    assert counts.size <= 256 and counts.sum() == 5000
    expected, _ = np.histogram(
        np.random.default_rng(0).standard_normal(5000).astype(np.float32),
        bins=counts.size,
        range=(-t, t),
    )
    np.testing.assert_array_equal(counts, expected)


# ---------------------------------------------------------------------------- vs onnxruntime


def _digits_batches(count: int = 12, size: int = 30) -> list[dict]:
    images = np.load(REPO / "models" / "digits_test.npz")["image"]
    return [{"image": images[i * size : (i + 1) * size]} for i in range(count)]


def _ort_ranges(
    tmp_path: Path, method: str, *, widths: dict | None = None, **extra
) -> dict[str, tuple[float, float]]:
    """onnxruntime's ranges on the digits batches; ``widths`` receives its histogram bin
    widths per tensor (histogram methods)."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    class Reader:
        def __init__(self):
            self.items = iter(_digits_batches())

        def get_next(self):
            return next(self.items, None)

    calibrator = create_calibrator(
        DIGITS,
        augmented_model_path=str(tmp_path / "augmented.onnx"),
        calibrate_method=getattr(CalibrationMethod, method),
        extra_options=extra,
    )
    calibrator.collect_data(Reader())
    data = calibrator.compute_data()
    if widths is not None:
        for name, histogram in calibrator.collector.histogram_dict.items():
            widths[name] = float(histogram[1][1] - histogram[1][0])
    return {
        k: tuple(float(np.asarray(r).reshape(-1)[0]) for r in v.range_value)
        for k, v in data.data.items()
    }


def _ours(method: str) -> Calibration:
    return Collector(ir.load(DIGITS), CollectOptions(method=method)).collect(_digits_batches())


def test_minmax_ranges_identical_to_onnxruntime(tmp_path):
    theirs = _ort_ranges(tmp_path, "MinMax")
    ours = _ours("minmax").ranges("minmax")
    shared = set(theirs) & set(ours)
    assert len(shared) >= len(theirs) - 1 and len(shared) >= 8
    for name in shared:
        assert ours[name] == theirs[name], name


@pytest.mark.parametrize("symmetric", [True, False])
def test_percentile_ranges_within_one_bin_of_onnxruntime(tmp_path, symmetric):
    """Within one of *their* bins: ours are narrower (8192 over [-t, t), t < 2 max|x|) and
    both take the lower edge of the bin where the cumulative mass reaches the percentile."""
    widths: dict[str, float] = {}
    theirs = _ort_ranges(
        tmp_path, "Percentile", widths=widths, num_bins=2048, percentile=99.9, symmetric=symmetric
    )
    calibration = _ours("percentile")
    shared = set(theirs) & set(calibration.observers)
    assert len(shared) >= 8
    for name in shared:
        obs = calibration.observers[name]
        assert 2 * obs.t / obs.bins <= widths[name] * (1 + 1e-6), name
        lo, hi = calibration.range(name, "percentile", percentile=99.9, symmetric=symmetric)
        their_lo, their_hi = theirs[name]
        if symmetric:  # ORT then clips each side to the observed min/max: compare bounds
            hi, their_hi = max(-lo, hi), max(-their_lo, their_hi)
            lo = their_lo = 0.0
        assert abs(hi - their_hi) <= widths[name] * (1 + 1e-6), name
        assert abs(lo - their_lo) <= widths[name] * (1 + 1e-6), name


# ---------------------------------------------------------------------------- collector and cache


def test_cache_round_trip_and_shards_merge_to_the_same_result(tmp_path):
    model = ir.load(DIGITS)
    batches = _digits_batches()
    whole = Collector(model, CollectOptions(method="entropy")).collect(batches)
    first = Collector(model, CollectOptions(method="entropy")).collect(batches[:5])
    second = Collector(model, CollectOptions(method="entropy")).collect(batches[5:])
    first.save(tmp_path / "a.npz")
    second.save(tmp_path / "b.npz")
    merged = Calibration.load(tmp_path / "a.npz").merge(Calibration.load(tmp_path / "b.npz"))
    assert merged.samples == whole.samples == len(batches)
    for method in ("minmax", "percentile", "entropy", "mse"):
        assert merged.ranges(method) == whole.ranges(method), method
    assert not list(tmp_path.glob(".onnxsqueeze-calib-*"))


def test_resume_collects_into_an_existing_calibration():
    model = ir.load(DIGITS)
    batches = _digits_batches()
    collector = Collector(model, CollectOptions(method="percentile"))
    partial = collector.collect(batches[:4])
    resumed = collector.collect(batches[4:], into=partial)
    assert resumed.samples == len(batches)
    assert resumed.ranges("percentile") == _ours("percentile").ranges("percentile")


def test_bad_cache_files_give_one_line_errors(tmp_path):
    with pytest.raises(CalibrationError, match="not found"):
        Calibration.load(tmp_path / "missing.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(CalibrationError, match="cannot read calibration cache"):
        Calibration.load(bad)


def test_tensor_groups_bound_what_one_run_exposes():
    model = ir.load(DIGITS)
    batches = _digits_batches(4)
    small = Collector(model, CollectOptions(method="percentile", max_exposed_bytes=4096))
    result = small.collect(batches)
    assert len(small._sessions) > 1
    whole = Collector(model, CollectOptions(method="percentile")).collect(batches)
    assert len(whole.observers) == len(result.observers)
    for name, obs in whole.observers.items():
        np.testing.assert_array_equal(obs.counts, result.observers[name].counts)


@pytest.mark.parametrize("method", ["minmax", "percentile"])
def test_rearranged_tensors_share_their_source_statistics_without_being_exposed(method):
    """Reshape/Transpose outputs hold their input's values: the collector copies the input's
    observer instead of copying the tensor out of onnxruntime and binning it again."""
    from conftest import parse

    model = ir.serde.deserialize_model(
        parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 6] x) => (float[3, 2, 2] y)
        <int64[3] shape = {2, 2, 3}>
        { a = Exp(x)  r = Reshape(a, shape)  t = Transpose<perm = [2, 0, 1]>(r)  y = Relu(t) }
        """)
    )
    rng = np.random.default_rng(0)
    batches = [{"x": rng.standard_normal((2, 6)).astype(np.float32)} for _ in range(3)]
    collector = Collector(model, CollectOptions(method=method))
    result = collector.collect(batches)
    assert collector._aliases == {"r": "a", "t": "a"}
    exposed = {name for session, *_ in collector._sessions for name in session.session.output_names}
    assert not any(name.startswith(("r", "t")) for name in exposed)
    values = np.concatenate([np.exp(b["x"]).ravel() for b in batches])
    for name in ("a", "r", "t"):
        obs = result.observers[name]
        assert obs.finite == values.size
        assert (obs.lo, obs.hi) == pytest.approx((values.min(), values.max()), rel=1e-6)
        if method == "percentile":
            np.testing.assert_array_equal(obs.counts, result.observers["a"].counts)
    assert result.observers["r"] is not result.observers["a"]


def test_minmax_in_graph_reductions_fall_back_to_whole_tensors_on_nonfinite_values():
    """Log(0) = -inf in one sample: the tensor is then exposed whole and the kernel keeps
    the finite range and counts the infinities (onnxruntime would give a -inf range)."""
    from conftest import parse

    model = ir.serde.deserialize_model(
        parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N] x) => (float[N] y)
        { l = Log(x)  y = Relu(l) }
        """)
    )
    batches = [
        {"x": np.array([1.0, 2.0, 4.0], np.float32)},
        {"x": np.array([0.0, 0.5, 8.0], np.float32)},
        {"x": np.array([0.25, 3.0], np.float32)},
    ]
    collector = Collector(model, CollectOptions(method="minmax"))
    result = collector.collect(batches)
    log = result.observers["l"]
    assert log.neg_inf == 1 and log.finite == 7
    assert log.range() == pytest.approx((math.log(0.25), math.log(8.0)))
    assert "l" in result.nonfinite() and "y" not in result.nonfinite()
    assert result.range("y") == pytest.approx((0.0, math.log(8.0)))
    assert result.observers["y"].finite == 8


def test_cli_calibrates_into_a_cache_and_reuses_it(tmp_path):
    from onnxsqueeze.cli import main

    cache, report = tmp_path / "calib.npz", tmp_path / "report.json"
    data = tmp_path / "data"
    data.mkdir()
    for i, batch in enumerate(_digits_batches(5)):
        np.savez(data / f"{i}.npz", **batch)
    args = [str(DIGITS), "--data", str(data), "--calib-cache", str(cache), "-q"]
    assert main([*args, "--calib-samples", "3", "--report", str(report)]) == 0
    import json

    first = json.loads(report.read_text())
    assert first["samples"] == 3 and first["method"] == "entropy" and len(first["ranges"]) >= 8
    assert main([str(DIGITS), "--calib-cache", str(cache), "--calib-method", "mse", "-q"]) == 0
    assert Calibration.load(cache).samples == 3  # reused, not recollected


def test_cli_calibration_errors_are_one_line(tmp_path, capsys):
    from onnxsqueeze.cli import main

    cache = tmp_path / "calib.npz"
    assert main([str(DIGITS), "--calib-cache", str(cache)]) == 1
    assert "calibration needs data" in capsys.readouterr().err
    (tmp_path / "junk.npz").write_bytes(b"junk")
    assert main([str(DIGITS), "--calib-cache", str(tmp_path / "junk.npz")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot read calibration cache" in err
    assert (
        main([str(DIGITS), "--data", "x.npz", "--calib-cache", str(cache), "--calib-samples", "0"])
        == 2
    )
    assert not cache.exists()


IF_MODEL = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[4] x, bool c) => (float[4] y) {
    y = If (c) <
        then_branch = t () => (float[4] ty) { ty = Mul (x, x) },
        else_branch = e () => (float[4] ey) { ey = Neg (x) }
    >
}
"""


def test_values_inside_if_branches_are_calibrated_through_the_if():
    """Each branch value is seen only on the samples that take its branch; the model the
    caller gave is not changed."""
    import onnx
    import onnx_ir as ir

    import onnxsqueeze

    model = ir.serde.deserialize_model(onnx.parser.parse_model(IF_MODEL))
    before = onnx.printer.to_text(ir.serde.serialize_model(model))
    feeds = [
        {"x": np.array([1, -2, 3, 0.5], np.float32), "c": np.array(True)},
        {"x": np.array([4, 1, -1, 2], np.float32), "c": np.array(False)},
    ]
    for method in ("minmax", "entropy"):
        result = onnxsqueeze.calibrate(model, feeds, method=method)
        assert result.range("ty") == pytest.approx((0.25, 9.0))  # x*x of the first sample
        assert result.range("ey") == pytest.approx((-4.0, 1.0))  # -x of the second
        assert not result.skipped
    assert onnx.printer.to_text(ir.serde.serialize_model(model)) == before


LOOP_MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
rnn (float[1, 2] x, float[1, 2] h0) => (float[1, 2] h, float[1, 8] acc, float[3, 1, 2] steps)
<float[2, 2] W = {1, -1, 0.5, 2}, int64 trip = {3}, bool cond = {1}>
{
  h, acc, steps = Loop (trip, cond, h0, x) <body = step (int64 i, bool c, float[1, 2] hin,
                                                         float[1, n] accin)
                                                     => (bool cout, float[1, 2] hout,
                                                         float[1, m] accout, float[1, 2] a) {
      cout = Identity (c)
      mm = MatMul (hin, W)
      a = Add (mm, x)
      hout = Tanh (a)
      accout = Concat <axis = 1> (accin, hout)
  }>
}
"""

SCAN_MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
scanned (float[1, 2] s0, float[4, 1, 2] xs) => (float[1, 2] s, float[4, 1, 2] ys)
<float[2, 2] W = {1, -1, 0.5, 2}>
{
  s, ys = Scan <num_scan_inputs = 1, scan_output_axes = [0], body = sb (float[1, 2] sin,
                                                                       float[1, 2] xt)
                                                                   => (float[1, 2] sout,
                                                                       float[1, 2] y) {
      p = MatMul (xt, W)
      sout = Add (sin, p)
      y = Relu (sout)
  }> (s0, xs)
}
"""
W22 = np.array([[1, -1], [0.5, 2]], np.float32)


def _span(arrays) -> tuple[float, float]:
    return float(min(a.min() for a in arrays)), float(max(a.max() for a in arrays))


@pytest.mark.parametrize("method", ["minmax", "entropy"])
def test_values_inside_loop_and_scan_bodies_are_calibrated_over_every_iteration(method):
    """Body values (carried state, scanned slices, node outputs) come out stacked over the
    iterations, so their ranges are those of every iteration of every sample (checked
    against the loop unrolled in NumPy); a value whose shape grows per iteration cannot be
    stacked and is reported as skipped, not dropped silently."""
    import onnx

    import onnxsqueeze

    rng = np.random.default_rng(0)
    loop = onnx.parser.parse_model(LOOP_MODEL)
    feeds = [
        {k: rng.standard_normal((1, 2)).astype(np.float32) for k in ("x", "h0")} for _ in range(3)
    ]
    seen: dict[str, list] = {"hin": [], "a": [], "hout": []}
    for feed in feeds:
        h = feed["h0"]
        for _ in range(3):
            a = h @ W22 + feed["x"]
            seen["hin"].append(h)
            seen["a"].append(a)
            h = np.tanh(a)
            seen["hout"].append(h)
    result = onnxsqueeze.calibrate(loop, feeds, method="minmax")
    for name, arrays in seen.items():
        assert result.range(name) == pytest.approx(_span(arrays), rel=1e-6), name
    assert "shape may change per iteration" in result.skipped["accout"]
    assert "shape may change per iteration" in result.skipped["accin"]

    scan = onnx.parser.parse_model(SCAN_MODEL)
    feeds = [
        {
            "s0": rng.standard_normal((1, 2)).astype(np.float32),
            "xs": rng.standard_normal((4, 1, 2)).astype(np.float32),
        }
        for _ in range(3)
    ]
    p = [feed["xs"][t] @ W22 for feed in feeds for t in range(4)]
    sin = [
        feed["s0"] + sum(feed["xs"][k] @ W22 for k in range(t)) for feed in feeds for t in range(4)
    ]
    result = onnxsqueeze.calibrate(scan, feeds, method=method)
    assert not result.skipped
    if method == "minmax":
        assert result.range("p") == pytest.approx(_span(p), rel=1e-5)
        assert result.range("sin") == pytest.approx(_span(sin), rel=1e-5)
        assert result.range("xt") == pytest.approx(_span([f["xs"] for f in feeds]), rel=1e-6)
    else:  # a histogram range covers them
        lo, hi = result.range("p")
        assert lo <= 0 <= hi and hi - lo > 0


# ---------------------------------------------------------------------------- stacking


def _count_runs(monkeypatch) -> list[int]:
    """Rows fed to onnxruntime per calibration run (first input's axis 0)."""
    from onnxsqueeze.calib import collector

    rows: list[int] = []
    original = collector._Renamed.run

    def run(self, feed):
        rows.append(len(next(iter(feed.values()))))
        return original(self, feed)

    monkeypatch.setattr(collector._Renamed, "run", run)
    return rows


@pytest.mark.parametrize("method", ["minmax", "percentile"])
def test_stacked_samples_give_the_statistics_of_one_run_each(monkeypatch, method):
    """Samples of one shape go through onnxruntime several at a time once two of them were
    shown to give the same extremes stacked; the statistics equal one run per sample."""
    from onnxsqueeze.calib import stacking

    batches = _digits_batches(12, size=5)
    rows = _count_runs(monkeypatch)
    Collector(ir.load(DIGITS), CollectOptions(method=method)).collect(batches)
    # by default only histograms stack: min/max ranges stay bit-identical to one run each
    assert (max(rows) > 5) is (method != "minmax")
    rows.clear()
    options = CollectOptions(method=method, stack=True)
    stacked = Collector(ir.load(DIGITS), options).collect(batches)
    assert max(rows) > 5  # several samples in one run
    monkeypatch.setattr(stacking, "MAX_STACK", 1)
    rows.clear()
    single = Collector(ir.load(DIGITS), CollectOptions(method=method)).collect(batches)
    assert max(rows) == 5 and stacked.samples == single.samples == 12
    for name, obs in single.observers.items():
        other = stacked.observers[name]
        assert (other.lo, other.hi) == pytest.approx((obs.lo, obs.hi), rel=1e-6), name
        if method == "percentile":
            assert other.finite == obs.finite
            assert np.abs(other.counts.astype(np.int64) - obs.counts).sum() <= 1e-4 * obs.finite


def test_models_that_mix_samples_are_calibrated_one_sample_per_run(monkeypatch):
    """A Reshape that folds the batch into one row makes Softmax compare values of different
    samples: stacked, the statistics would change, so the check keeps one run per sample."""
    from conftest import parse

    model = ir.serde.deserialize_model(
        parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4] x) => (float[1, M] y)
        <int64[2] shape = {1, -1}>
        { r = Reshape(x, shape)  y = Softmax<axis = -1>(r) }
        """)
    )
    rng = np.random.default_rng(0)
    batches = [{"x": rng.standard_normal((1, 4)).astype(np.float32)} for _ in range(6)]
    rows = _count_runs(monkeypatch)
    collector = Collector(model, CollectOptions(method="minmax", stack=True))
    result = collector.collect(batches)
    assert collector._stacks_agree is False
    assert rows.count(1) >= 6 and result.samples == 6
    softmax = [np.exp(b["x"]) / np.exp(b["x"]).sum() for b in batches]
    expected = (min(s.min() for s in softmax), max(s.max() for s in softmax))
    assert (result.observers["y"].lo, result.observers["y"].hi) == pytest.approx(expected, rel=1e-6)


def test_stacking_that_moves_values_by_a_fraction_of_a_bin_is_refused(monkeypatch):
    """A model whose observed tensor mixes samples only slightly (here 1e-4 of the batch
    mean; in magika, ill-conditioned LayerNorm sums whose GEMM order changes with the batch)
    moves extremes by a few 1e-5 to 1e-4 stacked: enough to move a 99.999th percentile by
    bins, so it runs one sample per run. The bound that used to let such models stack (1e-3) would have accepted it."""
    from onnxsqueeze.calib import stacking

    from conftest import parse

    model = ir.serde.deserialize_model(
        parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4] x) => (float[N, 4] y)
        <float c = {0.0001}>
        { m = ReduceMean<keepdims = 1>(x)  s = Mul(m, c)  y = Add(x, s) }
        """)
    )
    rng = np.random.default_rng(0)
    batches = [{"x": (rng.standard_normal((1, 4)) + 2 * i).astype(np.float32)} for i in range(6)]
    collector = Collector(model, CollectOptions(method="percentile"), tensors=["y"])
    result = collector.collect(batches)
    assert collector._stacks_agree is False and result.samples == 6
    exact = np.concatenate([b["x"] + np.float32(1e-4) * b["x"].mean() for b in batches])
    assert result.observers["y"].hi == pytest.approx(exact.max(), rel=1e-6)
    monkeypatch.setattr(stacking, "RTOL", 1e-3)
    loose = Collector(model, CollectOptions(method="percentile"), tensors=["y"])
    loose.collect(batches)
    assert loose._stacks_agree is True


def test_fixed_batch_inputs_and_shape_changes_are_not_stacked(monkeypatch):
    from conftest import parse

    fixed = ir.serde.deserialize_model(
        parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 4] x) => (float[1, 4] y) { y = Relu(x) }
        """)
    )
    rng = np.random.default_rng(0)
    rows = _count_runs(monkeypatch)
    Collector(fixed, CollectOptions(method="minmax", stack=True)).collect(
        [{"x": rng.standard_normal((1, 4)).astype(np.float32)} for _ in range(4)]
    )
    assert rows == [1, 1, 1, 1]
    free = ir.serde.deserialize_model(
        parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, L] x) => (float[N, L] y) { y = Relu(x) }
        """)
    )
    rows.clear()
    lengths = [3, 3, 3, 5, 5, 3]  # variable sequence length: stacks of one length each
    result = Collector(free, CollectOptions(method="minmax", stack=True)).collect(
        [{"x": rng.standard_normal((1, n)).astype(np.float32)} for n in lengths]
    )
    assert result.samples == 6 and max(rows) == 3 and sum(rows) >= 6
