"""Lossy modes with verification off: applied by the pass alone, the report says nothing was
compared; a model whose weights live on disk is quantized one weight at a time (the new
weights spill to a scratch file, merged weights are concatenated only when written)."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper
import pytest

import onnxsqueeze
from onnxsqueeze.core.errors import PipelineConfigError

RNG = np.random.default_rng(0)


def _qkv_model(path, hidden: int = 64):
    """Three MatMuls reading one input (merge-matmuls merges them) and a fourth after them,
    weights in an external data file."""
    names = ["q", "k", "v", "o"]
    inits = [onnx.numpy_helper.from_array(RNG.standard_normal((hidden, hidden)).astype(np.float32) / 8, f"w{n}") for n in names]  # fmt: skip
    # with their bias Adds, as exporters write them: merging three into one also shrinks the
    # file (a lossless run never returns a larger one)
    inits += [onnx.numpy_helper.from_array(RNG.standard_normal(hidden).astype(np.float32), f"b{n}") for n in "qkv"]  # fmt: skip
    nodes = [oh.make_node("MatMul", ["x", f"w{n}"], [f"{n}0"]) for n in "qkv"]
    nodes += [oh.make_node("Add", [f"{n}0", f"b{n}"], [n]) for n in "qkv"]
    nodes += [
        oh.make_node("Sum", ["q", "k", "v"], ["s"]),
        oh.make_node("MatMul", ["s", "wo"], ["y"]),
    ]
    graph = oh.make_graph(
        nodes, "qkv",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", hidden])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", hidden])], inits,
    )  # fmt: skip
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(
        model, path, save_as_external_data=True, location=path.name + ".data", size_threshold=0
    )
    return path


@pytest.mark.parametrize("mode", ["weights-int8", "weights-int4", "dynamic", "fp16"])
def test_a_lossy_mode_runs_unverified_and_says_so(tmp_path, mode):
    source = _qkv_model(tmp_path / "m.onnx")
    out = tmp_path / "out.onnx"
    report = onnxsqueeze.squeeze_file(source, out, quantize=mode, verify=False)
    assert report.verification_status == "skipped"
    assert report.quantization["verified"] is False and report.quantization["applied"]
    assert any("without verification" in w for w in report.warnings)
    onnx.checker.check_model(str(out))
    import onnxruntime as ort

    x = RNG.standard_normal((4, 64)).astype(np.float32)
    got = ort.InferenceSession(str(out)).run(None, {"x": x})[0]
    want = ort.InferenceSession(str(source)).run(None, {"x": x})[0]
    assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.99  # quantized, not broken
    assert not list(tmp_path.glob(".onnxsqueeze-*"))


def test_static_needs_data_so_it_is_refused_unverified(tmp_path):
    with pytest.raises(PipelineConfigError, match="calibrates on data"):
        onnxsqueeze.squeeze_file(_qkv_model(tmp_path / "m.onnx"), tmp_path / "o.onnx",
                                 quantize="static", verify=False)  # fmt: skip


def test_weights_merged_on_disk_are_concatenated_when_written(tmp_path):
    """merge-matmuls on external weights: a lazy concatenation, the same outputs (verified),
    and the written model holds the merged weight."""
    source = _qkv_model(tmp_path / "m.onnx")
    out = tmp_path / "out.onnx"
    report = onnxsqueeze.squeeze_file(source, out, quantize="none")
    assert report.verification_status == "passed"
    merged = next(p for p in report.passes if p.name == "merge-matmuls")
    assert merged.status == "applied", merged
    shapes = [tuple(t.dims) for t in onnx.load(str(out)).graph.initializer]
    assert (64, 192) in shapes


def test_shape_inference_does_not_keep_dropped_weights_alive(tmp_path):
    """onnx_ir's shape inference lists initializers as graph inputs and clears the list; the
    inputs' counter kept a zero entry per value, so a weight dropped later stayed alive (and
    with it a memory-mapped file's pages) whatever the collector did."""
    import onnx_ir as ir

    from onnxsqueeze.core.shapes import inferred_shapes

    model = ir.load(str(_qkv_model(tmp_path / "m.onnx")))
    with inferred_shapes(model):
        pass
    value = model.graph.initializers["wq"]
    alive = weakref.ref(value)
    for use in list(value.uses()):
        use.node.replace_input_with(use.idx, model.graph.initializers["wk"])
    del model.graph.initializers["wq"]
    del value, use
    gc.collect()
    assert alive() is None


def test_a_large_models_weights_keep_a_form_onnxruntime_runs_integer():
    """The fold form is expanded back to float when onnxruntime loads it, beside the codes
    (twice the original's memory; int4's unpacking far more): auto picks MatMulNBits for
    int4, and DequantizeLinear for int8 above LARGE_WEIGHT_BYTES, which onnxruntime keeps
    integer."""
    from onnxsqueeze.stages.quantize.weight_only import LARGE_WEIGHT_BYTES, bits_and_format

    assert bits_and_format("weights-int8", "auto", ("cpu",), 1 << 20) == (8, "fold")
    assert bits_and_format("weights-int8", "auto", ("cpu",), LARGE_WEIGHT_BYTES) == (8, "dq")
    assert bits_and_format("weights-int4", "auto", ("cpu",), LARGE_WEIGHT_BYTES) == (
        4,
        "matmulnbits",
    )
    assert bits_and_format("weights-int8", "fold", ("cpu",), LARGE_WEIGHT_BYTES) == (8, "fold")
    assert bits_and_format("weights-int4", "auto", ("cpu",), 1 << 20) == (4, "matmulnbits")


def test_spilled_weights_leave_memory_and_come_back_whole(tmp_path):
    """Spill moves every new in-memory weight to its scratch file, and the model written
    from the lazy stand-ins holds the same bytes."""
    import onnx_ir as ir

    from onnxsqueeze.core.spill import Spill
    from onnxsqueeze.passes.quantize_weights import QuantizeWeightsPass

    source = _qkv_model(tmp_path / "m.onnx")
    plain = ir.load(str(source))
    QuantizeWeightsPass(bits=8, format="dq", min_elements=0)(plain)
    spill = Spill(tmp_path, min_bytes=1)
    streamed = ir.load(str(source))
    QuantizeWeightsPass(bits=8, format="dq", min_elements=0, after_each=spill)(streamed)
    kinds = {
        type(v.const_value).__name__
        for k, v in streamed.graph.initializers.items()
        if not k.startswith("b")
    }  # fmt: skip  (the float biases stay on disk)
    assert kinds == {"LazyTensor"} and spill.spilled > 4 * 64 * 64  # four int8 weights
    want = {k: v.const_value.numpy() for k, v in plain.graph.initializers.items()}
    got = {k: v.const_value.numpy() for k, v in streamed.graph.initializers.items()}
    assert want.keys() == got.keys()
    assert all(np.array_equal(want[k], got[k]) for k in want)
    spill.close()


def test_a_memo_made_in_a_file_run_keeps_its_arrays_on_disk(tmp_path):
    """SpilledMemo (the weight-only search's rounded codes, the float run's activations of
    the local sensitivity): inside ``spilling`` its large arrays are written to the spill
    file and each lookup reads a fresh copy; the small ones and other values stay as given;
    outside it is a plain memo. ``in`` does not read anything back."""
    from onnxsqueeze.core.spill import Spill, SpilledMemo, spilling

    big = RNG.standard_normal((64, 48)).astype(np.float32)
    codes = RNG.integers(-8, 8, (32, 16), dtype=np.int8)
    small = np.arange(3, dtype=np.int64)
    spill = Spill(tmp_path, min_bytes=1024)
    with spilling(spill):
        memo = SpilledMemo()
        memo["w", 4] = (codes, big, small, True)
        loose = SpilledMemo(min_bytes=0)
        loose[0] = (small, None)
    assert spill.spilled == big.nbytes + small.nbytes  # the 512-byte codes stay in memory
    reads = []
    fetch = spill.fetch
    spill.fetch = lambda stowed: reads.append(stowed) or fetch(stowed)
    assert ("w", 4) in memo and ("w", 8) not in memo and not reads
    assert memo.stored(("w", 4))[3] is True and memo.stored(("w", 8), 0) == 0 and not reads
    got = memo["w", 4]
    assert len(reads) == 1 and got[0] is codes and got[2] is small and got[3] is True
    assert got[1] is not big and got[1].dtype == np.float32 and got[1].shape == (64, 48)
    np.testing.assert_array_equal(got[1], big)
    np.testing.assert_array_equal(loose[0][0], small)
    assert loose[0][1] is None and len(memo) == 1 and list(memo) == [("w", 4)]
    spill.close()
    plain = SpilledMemo()
    plain["k"] = (big,)
    assert plain["k"][0] is big
