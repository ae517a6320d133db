"""prune-weights: exact sparsity per output, N:M validity, Wanda against magnitude on data
with loud channels, Conv/Gemm layouts checked in onnxruntime, what stays dense."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxsqueeze.passes.prune_weights import PruneWeightsPass
from onnxsqueeze.prune.masks import follows_n_of_m, n_of_m_mask, unstructured_mask

from conftest import apply_pass, parse_with, run_ort

RNG = np.random.default_rng(9)
K, N = 64, 48


def _apply(proto: onnx.ModelProto, **options) -> tuple[onnx.ModelProto, dict]:
    return apply_pass(PruneWeightsPass, proto, **options)


def _weight(proto: onnx.ModelProto, name: str = "w_pruned") -> np.ndarray:
    return next(onnx.numpy_helper.to_array(t) for t in proto.graph.initializer if t.name == name)


def test_every_output_loses_the_same_share_and_onnxruntime_runs_the_pruned_weight():
    w = RNG.standard_normal((K, N)).astype(np.float32)
    proto = parse_with(
        f"""<ir_version: 8, opset_import: ["" : 17]>
        g (float[3, {K}] x) => (float[3, {N}] y) {{ y = MatMul(x, w) }}""",
        {"w": w},
    )
    out, stats = _apply(proto, sparsity=0.75)
    pruned = _weight(out)
    assert np.all(np.sum(pruned == 0, axis=0) == 48) and stats["sparsity"] == 0.75
    kept = pruned != 0
    # magnitude: every kept weight of an output outweighs every zeroed one
    for col in range(N):
        assert np.abs(w[kept[:, col], col]).min() >= np.abs(w[~kept[:, col], col]).max()
    x = RNG.standard_normal((3, K)).astype(np.float32)
    np.testing.assert_allclose(run_ort(out, {"x": x})[0], x @ pruned, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", ["MatMul", "GemmT", "Conv"])
def test_two_of_four_holds_in_every_layout(op):
    if op == "Conv":
        w = RNG.standard_normal((N, 8, 3, 3)).astype(np.float32)  # [N, C, kh, kw]
        body = "y = Conv <pads = [1, 1, 1, 1]> (x, w)"
        signature = f"(float[1, 8, 6, 6] x) => (float[1, {N}, 6, 6] y)"
        feed = {"x": RNG.standard_normal((1, 8, 6, 6)).astype(np.float32)}
    else:
        w = RNG.standard_normal((N, K) if op == "GemmT" else (K, N)).astype(np.float32)
        body = "y = Gemm <transB = 1> (x, w)" if op == "GemmT" else "y = MatMul (x, w)"
        signature = f"(float[3, {K}] x) => (float[3, {N}] y)"
        feed = {"x": RNG.standard_normal((3, K)).astype(np.float32)}
    proto = parse_with(
        f"""<ir_version: 8, opset_import: ["" : 17]> g {signature} {{ {body} }}""", {"w": w}
    )
    out, stats = _apply(proto, pattern="2:4")
    pruned = _weight(out)
    as_kn = pruned.reshape(N, -1).T if op in ("Conv", "GemmT") else pruned
    assert follows_n_of_m(as_kn != 0, 2, 4) and stats["sparsity"] == 0.5
    reference = proto.graph.initializer[0]
    reference.CopyFrom(onnx.numpy_helper.from_array(pruned, "w"))
    np.testing.assert_allclose(run_ort(out, feed)[0], run_ort(proto, feed)[0], rtol=1e-5)


def test_wanda_keeps_the_weights_of_loud_channels_and_cuts_the_output_error():
    """Channels 100x apart in scale: at 50 % sparsity, |W| x ||X_j|| leaves a far smaller
    output error on that data than |W| alone."""
    w = RNG.standard_normal((K, N)).astype(np.float32)
    x = (RNG.standard_normal((256, K)) * np.logspace(-1, 1, K)).astype(np.float32)
    proto = parse_with(
        f"""<ir_version: 8, opset_import: ["" : 17]>
        g (float[256, {K}] x) => (float[256, {N}] y) {{ y = MatMul(x, w) }}""",
        {"w": w},
    )
    gram = x.astype(np.float64).T @ x.astype(np.float64)
    errors = {}
    for label, grams in (("magnitude", None), ("wanda", {"x": gram})):
        out, stats = _apply(proto, sparsity=0.5, grams=grams)
        assert stats["layers"][0]["wanda"] == (grams is not None)
        errors[label] = np.sum((x @ _weight(out) - x @ w) ** 2) / np.sum((x @ w) ** 2)
    assert errors["wanda"] < errors["magnitude"] / 2, errors


def test_a_conv_with_wanda_reads_its_patch_gram_in_filter_order():
    """A Conv whose first input channel is loud: Wanda keeps that channel's filter taps."""
    w = RNG.standard_normal((N, 4, 3, 3)).astype(np.float32)
    proto = parse_with(
        f"""<ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 4, 6, 6] x) => (float[1, {N}, 4, 4] y) {{ y = Conv (x, w) }}""",
        {"w": w},
    )
    from onnxsqueeze.calib.gram import conv_key, gram_matrices

    model = ir.serde.deserialize_model(proto)
    feeds = [{"x": (RNG.standard_normal((1, 4, 6, 6)) * [[[[30.0]], [[1]], [[1]], [[1]]]]).astype(np.float32)}
             for _ in range(8)]  # fmt: skip
    grams = gram_matrices(model, feeds)
    assert conv_key(next(iter(model.graph))) in grams
    out, _ = _apply(proto, sparsity=0.5, grams=grams)
    kept = _weight(out) != 0
    assert kept[:, 0].mean() > 0.9 and kept[:, 1:].mean() < 0.4


def test_what_stays_dense():
    shared, small = RNG.standard_normal((K, N)), RNG.standard_normal((8, 8))
    proto = parse_with(
        f"""<ir_version: 8, opset_import: ["" : 17]>
        g (float[3, {K}] x, float[3, 8] s) => (float[3, {N}] a, float[3, {N}] b, float[3, 8] c) {{
            a = MatMul (x, shared)
            b = MatMul (x, shared)
            c = MatMul (s, small)
        }}""",
        {"shared": shared.astype(np.float32), "small": small.astype(np.float32)},
    )
    _, stats = _apply(proto, min_elements=100)
    assert stats["pruned"] == []


def test_masks_directly():
    score = RNG.random((10, 3))
    keep = unstructured_mask(score, 0.3)
    assert np.all(keep.sum(axis=0) == 7)
    keep = n_of_m_mask(score, 1, 4)  # 10 rows: two groups of 4, then 2 dense rows
    assert follows_n_of_m(keep, 1, 4) and np.all(keep[8:])
    with pytest.raises(ValueError):
        n_of_m_mask(score, 4, 4)


def test_embedding_tables_are_pruned_row_by_row_only_when_asked():
    table = RNG.standard_normal((100, 64)).astype(np.float32)
    proto = parse_with(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (int64[3] ids) => (float[3, 64] y) { y = Gather (table, ids) }""",
        {"table": table},
    )
    untouched, stats = _apply(proto, sparsity=0.5)
    assert not stats["pruned"]
    out, stats = _apply(proto, sparsity=0.5, embeddings=True)
    pruned = _weight(out, "table_pruned")
    assert np.all(np.sum(pruned == 0, axis=1) == 32)
    for row in range(100):  # each row keeps its largest half
        kept = pruned[row] != 0
        assert np.abs(table[row, kept]).min() >= np.abs(table[row, ~kept]).max()
    ids = np.array([0, 5, 99], np.int64)
    np.testing.assert_array_equal(run_ort(out, {"ids": ids})[0], pruned[ids])
