"""Gram matrices for GPTQ on Conv filters: the input patches (im2col) the filters multiply."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxsqueeze.calib.gram import _patches, conv_geometry, conv_key, gram_matrices
from onnxsqueeze.passes.quantize_weights import QuantizeWeightsPass

from conftest import run_ort, weighted_model

RNG = np.random.default_rng(11)


def _conv(weight: np.ndarray, x_shape: list[int], **attrs) -> onnx.ModelProto:
    return weighted_model("Conv", weight, x_shape, **attrs)


@pytest.mark.parametrize(
    "w_shape, x_shape, attrs",
    [
        ((6, 4, 3, 3), [2, 4, 9, 11], {"pads": [1, 0, 2, 1], "strides": [2, 1]}),
        ((6, 4, 3, 2), [1, 4, 12, 10], {"dilations": [2, 3]}),
        ((5, 3, 4), [2, 3, 17], {"pads": [1, 2], "strides": [3]}),  # 1-D
        ((8, 5, 5, 1), [1, 5, 30, 1], {}),  # magika's shape of kernel
    ],
)
def test_patches_times_filters_is_the_convolution(w_shape, x_shape, attrs):
    weight = RNG.standard_normal(w_shape).astype(np.float32)
    proto = _conv(weight, x_shape, **attrs)
    node = ir.serde.deserialize_model(proto).graph.node(0)
    x = RNG.standard_normal(x_shape).astype(np.float32)
    y = run_ort(proto, {"x": x})[0]
    rows = _patches(x, conv_geometry(node))
    per_position = np.moveaxis(y, 1, -1).reshape(-1, w_shape[0])
    np.testing.assert_allclose(
        rows @ weight.reshape(w_shape[0], -1).T.astype(np.float64), per_position, atol=1e-4
    )


def test_grouped_and_auto_padded_convs_get_no_gram():
    weight = RNG.standard_normal((8, 2, 3, 3)).astype(np.float32)
    grouped = ir.serde.deserialize_model(_conv(weight, [1, 8, 6, 6], group=4)).graph.node(0)
    same = _conv(RNG.standard_normal((8, 8, 3, 3)).astype(np.float32), [1, 8, 6, 6])
    same.graph.node[0].attribute.append(onnx.helper.make_attribute("auto_pad", "SAME_UPPER"))
    auto = ir.serde.deserialize_model(same).graph.node(0)
    assert conv_key(grouped) is None and conv_key(auto) is None


def test_gptq_rounds_conv_filters_with_their_patch_gram():
    """Inputs whose channels co-vary (as real feature maps do): GPTQ on the patch Gram
    matrix moves the convolution's output less than per-channel rounding alone."""
    weight = RNG.standard_normal((16, 32, 3, 3)).astype(np.float32)
    mix = RNG.standard_normal((4, 32))

    def sample() -> dict:
        x = np.einsum("nkhw,kc->nchw", RNG.standard_normal((1, 4, 12, 12)), mix)
        return {"x": (x + 0.05 * RNG.standard_normal(x.shape)).astype(np.float32)}

    proto = _conv(weight, [1, 32, 12, 12], pads=[1, 1, 1, 1])
    grams = gram_matrices(ir.serde.deserialize_model(proto), [sample() for _ in range(40)])
    (key,) = grams
    assert key.startswith("x#conv") and grams[key].shape == (288, 288)
    test = [sample() for _ in range(10)]
    want = np.concatenate([run_ort(proto, f)[0] for f in test])
    errors = {}
    for label, options in (("rtn", {}), ("gptq", {"grams": grams})):
        model = ir.serde.deserialize_model(proto)
        stats = QuantizeWeightsPass(bits=4, format="fold", **options)(model).stats
        assert stats["gptq"] == (label == "gptq") and stats["weights_quantized"] == 1
        out = ir.serde.serialize_model(model)
        got = np.concatenate([run_ort(out, f)[0] for f in test])
        errors[label] = float(np.mean((got - want) ** 2))
    assert errors["gptq"] < 0.5 * errors["rtn"], errors
