"""prune-channels: channel dependencies through BatchNorm, residual Add, Concat, depthwise and
grouped Conv, Gemm chains, Reshape; graph outputs left alone; the least-squares refit on a
case with a known answer. Each pruned model is checked against the original with the
removed channels' consumer rows zeroed (what removing them means, exactly)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxsqueeze.passes.prune_channels import PruneChannelsPass
from onnxsqueeze.prune.refit import refit_rows

from conftest import apply_pass, parse_with, run_ort

RNG = np.random.default_rng(4)
HEAD = '<ir_version: 8, opset_import: ["" : 17]>'


def _weights(*shapes, weak: int = 0) -> list[np.ndarray]:
    """Random float32 arrays; the first ``weak`` output channels (axis 0) of the first
    array are tiny, so magnitude importance removes them first."""
    arrays = [RNG.standard_normal(s).astype(np.float32) for s in shapes]
    arrays[0][:weak] *= 1e-3
    return arrays


def _init(proto: onnx.ModelProto, name: str) -> np.ndarray:
    return next(onnx.numpy_helper.to_array(t) for t in proto.graph.initializer if t.name == name)


def _pruned_init(proto: onnx.ModelProto, name: str) -> np.ndarray:
    found = [t for t in proto.graph.initializer if t.name.startswith(name)]
    assert len(found) == 1, [t.name for t in proto.graph.initializer]
    return onnx.numpy_helper.to_array(found[0])


def _zeroed(proto: onnx.ModelProto, rows: dict[str, tuple[int, list[int]]]) -> onnx.ModelProto:
    """``proto`` with initializer ``name``'s slices ``index`` on ``axis`` zeroed."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    for t in out.graph.initializer:
        if t.name in rows:
            axis, index = rows[t.name]
            array = onnx.numpy_helper.to_array(t).copy()
            np.moveaxis(array, axis, 0)[index] = 0
            t.CopyFrom(onnx.numpy_helper.from_array(array, t.name))
    return out


def _check_same(original, pruned, zeroed_rows, feed) -> None:
    expected = run_ort(_zeroed(original, zeroed_rows), feed)
    for a, b in zip(run_ort(pruned, feed), expected, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def _image(c: int = 3, size: int = 6) -> dict:
    return {"x": RNG.standard_normal((2, c, size, size)).astype(np.float32)}


def test_batchnorm_follows_its_conv_and_the_consumer_loses_the_same_rows():
    w1, w2 = _weights((8, 3, 3, 3), (4, 8, 3, 3), weak=4)
    bn = {k: RNG.random(8).astype(np.float32) + 0.5 for k in ("s", "b", "m", "v")}
    proto = parse_with(
        f"""{HEAD} g (float[2, 3, 6, 6] x) => (float[2, 4, 6, 6] y) {{
            a = Conv <pads = [1, 1, 1, 1]> (x, w1)
            n = BatchNormalization (a, s, b, m, v)
            r = Relu (n)
            y = Conv <pads = [1, 1, 1, 1]> (r, w2)
        }}""",
        {"w1": w1, "w2": w2, **bn},
    )
    out, stats = apply_pass(PruneChannelsPass, proto, ratio=0.5, multiple=1, min_channels=1)
    assert stats["channels_removed"] == 4 and stats["macs_after"] < stats["macs_before"]
    np.testing.assert_array_equal(_pruned_init(out, "w1"), w1[4:])
    np.testing.assert_array_equal(_pruned_init(out, "s"), bn["s"][4:])
    assert _pruned_init(out, "w2").shape == (4, 4, 3, 3)
    _check_same(proto, out, {"w2": (1, [0, 1, 2, 3])}, _image())


def test_a_residual_add_ties_both_producers_channels():
    wa, wb, wc = _weights((8, 3, 1, 1), (8, 8, 1, 1), (4, 8, 1, 1), weak=2)
    wb[:2] *= 1e-3  # the same channels weak in both producers
    proto = parse_with(
        f"""{HEAD} g (float[2, 3, 6, 6] x) => (float[2, 4, 6, 6] y) {{
            a = Conv (x, wa)
            r = Relu (a)
            b = Conv (r, wb)
            s = Add (b, r)
            t = Relu (s)
            y = Conv (t, wc)
        }}""",
        {"wa": wa, "wb": wb, "wc": wc},
    )
    out, stats = apply_pass(PruneChannelsPass, proto, ratio=0.25, multiple=1, min_channels=1)
    (cluster,) = [c for c in stats["clusters"] if c["removed"]]
    assert cluster["layers"] == 2 and cluster["removed"] == 2
    np.testing.assert_array_equal(_pruned_init(out, "wa"), wa[2:])
    np.testing.assert_array_equal(_pruned_init(out, "wb"), wb[2:, 2:])
    _check_same(proto, out, {"wb": (1, [0, 1]), "wc": (1, [0, 1])}, _image())


def test_concat_offsets_reach_the_consumer_and_depthwise_groups_shrink():
    wa, wb, dw, wc = _weights((8, 3, 1, 1), (8, 3, 1, 1), (16, 1, 3, 3), (4, 16, 1, 1), weak=3)
    wb[:3] *= 1e-3
    proto = parse_with(
        f"""{HEAD} g (float[2, 3, 6, 6] x) => (float[2, 4, 6, 6] y) {{
            a = Conv (x, wa)
            b = Conv (x, wb)
            c = Concat <axis = 1> (a, b)
            d = Conv <group = 16, pads = [1, 1, 1, 1]> (c, dw)
            y = Conv (d, wc)
        }}""",
        {"wa": wa, "wb": wb, "dw": dw, "wc": wc},
    )
    out, _ = apply_pass(PruneChannelsPass, proto, ratio=0.5, multiple=1, min_channels=1)
    depthwise = next(n for n in out.graph.node if n.op_type == "Conv" and n.input[0] == "c")
    group = next(a.i for a in depthwise.attribute if a.name == "group")
    assert group == 8 and _pruned_init(out, "dw").shape == (8, 1, 3, 3)
    # each producer lost half: its weakest three (b's at offset 8 after the Concat) and one more
    kept_rows = _pruned_init(out, "wc").shape[1]
    assert kept_rows == 8
    removed_a = [
        i for i in range(8) if not any(np.array_equal(wa[i], k) for k in _pruned_init(out, "wa"))
    ]
    removed_b = [
        i for i in range(8) if not any(np.array_equal(wb[i], k) for k in _pruned_init(out, "wb"))
    ]
    assert set(removed_a) >= {0, 1, 2} and set(removed_b) >= {0, 1, 2}
    removed = removed_a + [8 + i for i in removed_b]
    _check_same(proto, out, {"wc": (1, removed)}, _image())


def test_a_grouped_conv_and_a_graph_output_keep_their_channels_and_say_why():
    wa, wg, wb = _weights((8, 3, 1, 1), (8, 4, 1, 1), (4, 3, 1, 1))
    proto = parse_with(
        f"""{HEAD} g (float[2, 3, 6, 6] x) => (float[2, 8, 6, 6] y, float[2, 4, 6, 6] z) {{
            a = Conv (x, wa)
            y = Conv <group = 2> (a, wg)
            z = Conv (x, wb)
        }}""",
        {"wa": wa, "wg": wg, "wb": wb},
    )
    model = ir.serde.deserialize_model(proto)
    result = PruneChannelsPass(ratio=0.5, multiple=1, min_channels=1)(model)
    assert not result.modified
    reasons = {c["name"]: c.get("blocked", []) for c in result.stats["clusters"]}
    assert any("Conv" in r for r in reasons.values() for r in r)
    assert any("graph output z" in r for r in reasons.values() for r in r)


def test_a_gemm_chain_loses_hidden_units_and_a_flattening_reshape_passes_them():
    w1, w2 = _weights((16, 12), (16, 5), weak=0)
    w1[3:8] *= 1e-3  # Gemm with transB: output unit i is row i
    b1, b2 = _weights((16,), (5,))
    proto = parse_with(
        f"""{HEAD} g (float[2, 12, 1, 1] x) => (float[2, 5] y) {{
            f = Reshape (x, shape)
            h = Gemm <transB = 1> (f, w1, b1)
            r = Relu (h)
            m = MatMul (r, w2)
            y = Add (m, b2)
        }}""",
        {"w1": w1, "w2": w2, "b1": b1, "b2": b2, "shape": np.array([2, 12], np.int64)},
    )
    out, stats = apply_pass(PruneChannelsPass, proto, ratio=0.3, multiple=1, min_channels=1)
    assert stats["channels_removed"] == 4
    assert _pruned_init(out, "w1").shape == (12, 12) and _pruned_init(out, "w2").shape == (12, 5)
    feed = {"x": RNG.standard_normal((2, 12, 1, 1)).astype(np.float32)}
    gone = [
        i for i in range(16) if not any(np.array_equal(w1[i], k) for k in _pruned_init(out, "w1"))
    ]
    assert set(gone) < set(range(3, 8))
    _check_same(proto, out, {"w2": (0, gone)}, feed)


def test_refit_recovers_a_channel_that_is_a_multiple_of_another():
    # h = x @ w1, channel 3 of h is exactly twice channel 1: removing 3 loses nothing once
    # the consumer's row 1 takes over row 3's share (w2[1] + 2 w2[3]).
    w1 = RNG.standard_normal((6, 4)).astype(np.float32)
    w1[:, 3] = 2 * w1[:, 1]
    w2 = RNG.standard_normal((4, 3)).astype(np.float32)
    x = RNG.standard_normal((200, 6))
    h = x @ w1.astype(np.float64)
    rows = np.hstack([h, np.ones((len(h), 1))])
    gram = rows.T @ rows
    new, bias = refit_rows(w2, gram, np.array([True, True, True, False]), with_bias=True,
                           damping=1e-9)  # fmt: skip
    np.testing.assert_allclose(h[:, :3] @ new + bias, h @ w2, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new[1], w2[1] + 2 * w2[3], rtol=1e-5, atol=1e-5)


def test_refit_puts_a_removed_channels_mean_into_the_consumers_bias():
    # a channel that is constant on the data carries only a mean: the refit moves it into
    # the consumer's bias, and the pruned model computes the same on that data
    wa = RNG.standard_normal((8, 3, 1, 1)).astype(np.float32)
    ba = RNG.standard_normal(8).astype(np.float32)
    wa[0] = 0.0
    ba[0] = 3.0  # channel 0 is relu(3) = 3 everywhere
    wc = RNG.standard_normal((4, 8, 1, 1)).astype(np.float32)
    wc[:, 0] *= 1e-2  # small enough to be the one removed, large enough to matter
    proto = parse_with(
        f"""{HEAD} g (float[2, 3, 6, 6] x) => (float[2, 4, 6, 6] y) {{
            a = Conv (x, wa, ba)
            r = Relu (a)
            y = Conv (r, wc)
        }}""",
        {"wa": wa, "ba": ba, "wc": wc},
    )
    from onnxsqueeze.calib.gram import gram_matrices

    feeds = [_image() for _ in range(8)]
    model = ir.serde.deserialize_model(proto)
    grams = gram_matrices(model, feeds, ones=True)
    options = dict(ratio=1 / 8, multiple=1, min_channels=1, grams=grams, damping=1e-6)
    plain, _ = apply_pass(PruneChannelsPass, proto, **options, refit=False)
    refit, _ = apply_pass(PruneChannelsPass, proto, **options)
    assert _pruned_init(refit, "wa").shape[0] == 7
    feed = _image()
    want = run_ort(proto, feed)[0]
    err_plain = np.abs(run_ort(plain, feed)[0] - want).max()
    err_refit = np.abs(run_ort(refit, feed)[0] - want).max()
    assert err_plain > 1e-2 and err_refit < 1e-3 * err_plain + 1e-4


@pytest.mark.parametrize("ratio", [0.0, 0.5])
def test_ratio_zero_changes_nothing_and_kept_counts_round_to_the_multiple(ratio):
    w1, w2 = _weights((32, 3, 1, 1), (4, 32, 1, 1))
    proto = parse_with(
        f"""{HEAD} g (float[2, 3, 6, 6] x) => (float[2, 4, 6, 6] y) {{
            a = Conv (x, w1)
            r = Relu (a)
            y = Conv (r, w2)
        }}""",
        {"w1": w1, "w2": w2},
    )
    out, stats = apply_pass(PruneChannelsPass, proto, ratio=ratio, multiple=8)
    kept = _pruned_init(out, "w1").shape[0]
    assert kept == (32 if ratio == 0 else 16) and kept % 8 == 0


def test_the_sequential_refit_fits_what_really_reaches_each_layer():
    # three 3x3 convolutions, the first two lose half their channels: refitting the third
    # from the second's refitted output (not the original's) lowers the error on the data
    w1, w2, w3 = _weights((16, 3, 3, 3), (16, 16, 3, 3), (4, 16, 3, 3))
    # redundant channels (what pruning removes in practice): 16 filters mixing 6
    w1 = np.einsum("oc,c...->o...", RNG.standard_normal((16, 6)), w1[:6]).astype(np.float32)
    w2 = np.einsum("oc,c...->o...", RNG.standard_normal((16, 6)), w2[:6]).astype(np.float32)
    proto = parse_with(
        f"""{HEAD} g (float[2, 3, 6, 6] x) => (float[2, 4, 6, 6] y) {{
            a = Conv <pads = [1, 1, 1, 1]> (x, w1)
            r = Relu (a)
            b = Conv <pads = [1, 1, 1, 1]> (r, w2)
            s = Relu (b)
            y = Conv <pads = [1, 1, 1, 1]> (s, w3)
        }}""",
        {"w1": w1, "w2": w2, "w3": w3},
    )
    from onnxsqueeze.calib.gram import gram_matrices

    feeds = [_image() for _ in range(24)]
    grams = gram_matrices(ir.serde.deserialize_model(proto), feeds, ones=True)
    options = dict(ratio=0.5, multiple=1, min_channels=1, grams=grams, damping=1e-4)
    plain, _ = apply_pass(PruneChannelsPass, proto, **options)
    sequential, _ = apply_pass(PruneChannelsPass, proto, **options, feeds=feeds)

    def error(model):
        return sum(np.sum((run_ort(model, f)[0] - run_ort(proto, f)[0]) ** 2) for f in feeds) / sum(
            np.sum(run_ort(proto, f)[0] ** 2) for f in feeds
        )

    # (a 5 % gain here; the earlier all-at-once version made it 4x worse on PP-OCR cls)
    assert error(sequential) < 0.98 * error(plain)


def test_attention_heads_go_whole_through_the_head_reshapes():
    # q, k, v: [2, 3, 8] -> [2, 3, 2 heads, 4] -> attention per head -> [2, 3, 8] -> wo
    wq, wk, wv, wo = _weights((8, 8), (8, 8), (8, 8), (8, 8))
    for w in (wq, wk, wv):
        w[:, :4] *= 1e-3  # head 0 is the weak one
    shapes = {"split": np.array([0, 0, 2, 4], np.int64), "merge": np.array([0, 0, 8], np.int64)}
    proto = parse_with(
        f"""{HEAD} g (float[2, 3, 8] x) => (float[2, 3, 8] y) {{
            q0 = MatMul (x, wq)
            k0 = MatMul (x, wk)
            v0 = MatMul (x, wv)
            q1 = Reshape (q0, split)
            k1 = Reshape (k0, split)
            v1 = Reshape (v0, split)
            q = Transpose <perm = [0, 2, 1, 3]> (q1)
            k = Transpose <perm = [0, 2, 3, 1]> (k1)
            v = Transpose <perm = [0, 2, 1, 3]> (v1)
            s = MatMul (q, k)
            p = Softmax <axis = -1> (s)
            c = MatMul (p, v)
            c1 = Transpose <perm = [0, 2, 1, 3]> (c)
            c2 = Reshape (c1, merge)
            y = MatMul (c2, wo)
        }}""",
        {"wq": wq, "wk": wk, "wv": wv, "wo": wo, **shapes},
    )
    out, stats = apply_pass(PruneChannelsPass, proto, ratio=0.5, multiple=1, min_channels=1)
    (group,) = [c for c in stats["clusters"] if c["removed"]]
    assert group["layers"] == 3 and group["channels"] == 2 and group["removed"] == 1
    np.testing.assert_array_equal(_pruned_init(out, "wq"), wq[:, 4:])
    assert _pruned_init(out, "wo").shape == (4, 8)
    feed = {"x": RNG.standard_normal((2, 3, 8)).astype(np.float32)}
    _check_same(proto, out, {"wo": (0, [0, 1, 2, 3])}, feed)
