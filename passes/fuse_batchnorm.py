"""fuse-batchnorm: fold BatchNormalization, and constant Add/Mul, into the Conv/Gemm before it.

ConvTranspose counts as a Conv here (its output channels sit on the weight's axis 1, per
group), which is where segmentation heads such as PP-OCR det's keep a bias Add and a BN.

Inference BN is an affine map per channel, so Conv→BN is one Conv with scaled weights and a
new bias; Conv→Add(per-channel constant) is a bias and Conv→Mul(per-channel constant) a
scale. The arithmetic is reassociated (computed in float64, stored in the weight's dtype),
so results move by float rounding only; the pipeline verifies them like any lossless pass.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from onnxsqueeze.core.graphs import (
    GraphLike,
    add_constant,
    all_value_names,
    constant_array,
    replace_value,
    scopes,
    unique_name,
)
from onnxsqueeze.core.io import count_nodes
from onnxsqueeze.core.pass_base import SqueezePass, SqueezeResult
from onnxsqueeze.passes.cleanup import remove_unused_subgraph_initializers

#: Ops whose output channels are a constant weight's; ConvTranspose keeps them on axis 1.
CONVS = ("Conv", "ConvTranspose")


@dataclasses.dataclass(frozen=True)
class FuseBatchnormOptions:
    batchnorm: bool = True
    conv_add: bool = True
    conv_mul: bool = True
    #: False: only fusions that round exactly like the original, i.e. a constant Add into a
    #: producer with no bias (the kernel adds its bias once, after accumulating, as the Add
    #: did). Scaling weights reassociates: each single BN/Mul fusion moves PP-OCR det's
    #: output by 8e-6 to 5.6e-5 of its scale.
    reassociate: bool = True
    #: Fold only the affine nodes of these names (empty: every one); measuring one fold at a
    #: time is how tools/fusion_sensitivity.py shows what each costs.
    nodes: tuple[str, ...] = ()
    #: Fusion reassociates float math; onnxsim/onnxslim's BN fusion moves PP-OCR det's
    #: output by 1.7e-5 to 5.9e-5 of its scale, so exactness (1e-6) is not the bar here.
    rtol: float = 1e-4


class FuseBatchnormPass(SqueezePass):
    """Per-channel affine ops after Conv/Gemm go into its weights and bias."""

    name = "fuse-batchnorm"
    summary = (
        "fold BatchNormalization (and constant per-channel Add/Mul) into the preceding Conv/Gemm"
    )
    lossless = True
    Options = FuseBatchnormOptions

    def call(self, model: ir.Model) -> SqueezeResult:
        nodes_before = count_nodes(model)
        self._names = all_value_names(model)
        self._model = model
        counts = {"batchnorms_fused": 0, "adds_fused": 0, "muls_fused": 0}
        for scope in list(scopes(model)):
            for node in list(scope):
                key = self._fuse(scope, node)
                if key:
                    counts[key] += 1
        if any(counts.values()):
            RemoveUnusedNodesPass()(model)
            remove_unused_subgraph_initializers(model)
        counts["nodes_removed"] = nodes_before - count_nodes(model)
        return SqueezeResult(model, modified=counts["nodes_removed"] > 0, stats=counts)

    def _fuse(self, scope: GraphLike, node: ir.Node) -> str | None:
        opts: FuseBatchnormOptions = self.options
        if opts.nodes and node.name not in opts.nodes:
            return None
        if node.domain not in ("", "ai.onnx") or not node.inputs or node.inputs[0] is None:
            return None
        source = node.inputs[0]
        if node.op_type in ("Add", "Mul") and len(node.inputs) == 2:
            # The producer may be either operand; the other one must be constant.
            for index in (0, 1):
                cand, const = node.inputs[index], node.inputs[1 - index]
                producer = cand.producer() if cand is not None else None
                if (
                    producer is not None
                    and producer.op_type in CONVS
                    and constant_array(const) is not None
                ):
                    source = cand
                    break
            else:
                return None
        producer = source.producer()
        if (
            producer is None
            or producer.domain not in ("", "ai.onnx")
            or producer.graph is not node.graph
        ):
            return None
        if len(source.uses()) != 1 or source.is_graph_output():
            return None
        if not opts.reassociate and (node.op_type != "Add" or _has_bias(producer)):
            return None
        affine = None
        if node.op_type == "BatchNormalization" and opts.batchnorm:
            affine = _batchnorm_affine(node)
        elif node.op_type == "Add" and opts.conv_add and producer.op_type in CONVS:
            affine = _elementwise_affine(node, source, add=True)
        elif node.op_type == "Mul" and opts.conv_mul and producer.op_type in CONVS:
            affine = _elementwise_affine(node, source, add=False)
        if affine is None:
            return None
        scale, shift = affine
        if producer.op_type in CONVS:
            done = self._into_conv(scope, producer, scale, shift)
        elif producer.op_type == "Gemm" and node.op_type == "BatchNormalization":
            done = self._into_gemm(scope, producer, scale, shift)
        else:
            done = False
        if not done:
            return None
        if not replace_value(node.outputs[0], producer.outputs[0], take_name=True):
            return None
        # Gone now, not at the end: a chain (Add, then BN, then Mul) needs the producer's
        # output to have one reader again for the next fusion.
        node.graph.remove(node, safe=True)
        return {"BatchNormalization": "batchnorms_fused", "Add": "adds_fused", "Mul": "muls_fused"}[
            node.op_type
        ]

    def _const(self, scope: GraphLike, array: np.ndarray, base: str, before: ir.Node) -> ir.Value:
        return add_constant(self._model, scope, array, unique_name(self._names, base), before)

    def _into_conv(
        self, scope: GraphLike, conv: ir.Node, scale: np.ndarray, shift: np.ndarray
    ) -> bool:
        weight = constant_array(conv.inputs[1]) if len(conv.inputs) > 1 else None
        bias = (
            constant_array(conv.inputs[2])
            if len(conv.inputs) > 2 and conv.inputs[2] is not None
            else None
        )
        if (
            weight is None
            or weight.dtype.kind != "f"
            or (len(conv.inputs) > 2 and conv.inputs[2] is not None and bias is None)
        ):
            return False
        group_attr = conv.attributes.get("group")
        group = group_attr.as_int() if group_attr is not None else 1
        transposed = conv.op_type == "ConvTranspose"
        c_out = weight.shape[1] * group if transposed else weight.shape[0]
        scale, shift = _per_channel(scale, c_out), _per_channel(shift, c_out)
        if scale is None or shift is None or (transposed and weight.shape[0] % group):
            return False
        if transposed:
            # (C_in, C_out/group, k...): output channel g*C_out/group + j is [g-th block, j].
            blocks = weight.reshape((group, -1) + weight.shape[1:]).astype(np.float64)
            per_block = scale.reshape((group, 1, weight.shape[1]) + (1,) * (weight.ndim - 2))
            w64 = (blocks * per_block).reshape(weight.shape)
        else:
            w64 = weight.astype(np.float64) * scale.reshape((c_out,) + (1,) * (weight.ndim - 1))
        b64 = (bias.astype(np.float64) if bias is not None else np.zeros(c_out)) * scale + shift
        conv.replace_input_with(
            1, self._const(scope, w64.astype(weight.dtype), conv.inputs[1].name + "_fused", conv)
        )
        new_bias = self._const(
            scope, b64.astype(weight.dtype), (conv.outputs[0].name or "conv") + "_bias", conv
        )
        _set_bias(conv, new_bias)
        return True

    def _into_gemm(
        self, scope: GraphLike, gemm: ir.Node, scale: np.ndarray, shift: np.ndarray
    ) -> bool:
        b = constant_array(gemm.inputs[1])
        c = (
            constant_array(gemm.inputs[2])
            if len(gemm.inputs) > 2 and gemm.inputs[2] is not None
            else None
        )
        if (
            b is None
            or b.ndim != 2
            or b.dtype.kind != "f"
            or (len(gemm.inputs) > 2 and gemm.inputs[2] is not None and c is None)
        ):
            return False
        attr = {k: gemm.attributes.get(k) for k in ("alpha", "beta", "transB")}
        alpha = attr["alpha"].as_float() if attr["alpha"] else 1.0
        beta = attr["beta"].as_float() if attr["beta"] else 1.0
        trans_b = bool(attr["transB"].as_int()) if attr["transB"] else False
        n = b.shape[0] if trans_b else b.shape[1]
        scale, shift = _per_channel(scale, n), _per_channel(shift, n)
        if scale is None or shift is None:
            return False
        b64 = b.astype(np.float64) * alpha * (scale[:, None] if trans_b else scale[None, :])
        c64 = (
            np.broadcast_to(c.astype(np.float64) * beta if c is not None else np.zeros(n), (n,))
            if c is None or c.size in (1, n)
            else None
        )
        if c64 is None:
            return False
        c64 = c64 * scale + shift
        gemm.replace_input_with(
            1, self._const(scope, b64.astype(b.dtype), gemm.inputs[1].name + "_fused", gemm)
        )
        new_c = self._const(
            scope, c64.astype(b.dtype), (gemm.outputs[0].name or "gemm") + "_bias", gemm
        )
        _set_bias(gemm, new_c)
        for key in ("alpha", "beta"):
            gemm.attributes.pop(key, None)
        return True


def _has_bias(node: ir.Node) -> bool:
    return len(node.inputs) > 2 and node.inputs[2] is not None


def _set_bias(node: ir.Node, bias: ir.Value) -> None:
    """Conv and Gemm both take their bias as the optional third input."""
    if len(node.inputs) < 3:
        node.resize_inputs(3)
    node.replace_input_with(2, bias)


def _batchnorm_affine(node: ir.Node) -> tuple[np.ndarray, np.ndarray] | None:
    if len(node.inputs) != 5 or any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
        return None
    training = node.attributes.get("training_mode")
    if training is not None and training.as_int():
        return None
    params = [constant_array(v) for v in node.inputs[1:]]
    if any(p is None for p in params):
        return None
    gamma, beta, mean, var = (p.astype(np.float64) for p in params)
    eps = node.attributes["epsilon"].as_float() if "epsilon" in node.attributes else 1e-5
    scale = gamma / np.sqrt(var + eps)
    return scale, beta - mean * scale


def _elementwise_affine(
    node: ir.Node, source: ir.Value, add: bool
) -> tuple[np.ndarray, np.ndarray] | None:
    other = node.inputs[1] if node.inputs[0] is source else node.inputs[0]
    const = constant_array(other)
    conv_weight = constant_array(source.producer().inputs[1])
    if const is None or conv_weight is None or const.dtype != conv_weight.dtype:
        return None
    out_rank = conv_weight.ndim
    if const.ndim > out_rank:
        return None
    shaped = const.reshape((1,) * (out_rank - const.ndim) + const.shape)
    if any(d != 1 for i, d in enumerate(shaped.shape) if i != 1):
        return None  # broadcasting along batch or spatial axes is not per-channel
    per_channel = shaped.reshape(-1).astype(np.float64)
    if add:
        return np.ones_like(per_channel), per_channel
    return per_channel, np.zeros_like(per_channel)


def _per_channel(values: np.ndarray, channels: int) -> np.ndarray | None:
    if values.size == channels:
        return values.reshape(channels)
    if values.size == 1:
        return np.full(channels, float(values.reshape(())))
    return None
