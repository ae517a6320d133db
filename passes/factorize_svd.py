"""factorize-svd: X @ W -> (X @ A) @ B, A (K x r) and B (r x N) from a truncated SVD of W.

Where r (K + N) is well below K N, the two products hold fewer parameters and do fewer
multiply-adds than the one. The linear algebra is ``lowrank.svd``'s: plain SVD by default,
whitened by the input's Gram matrix where ``grams`` holds one (data-aware: the rank-r
factors that minimise the layer's output error on that data), the second factor refitted
by least squares. Ranks come from ``ranks`` (node -> rank, what the factorize stage's
allocator decided), else one ``rank``, else the largest rank within ``ratio`` of the
parameters, else the smallest that keeps ``energy`` of the spectrum; a weight is factorized
only where its factors save at least ``min_saving`` of its parameters.

Rewritten: MatMul with a constant 2-D float weight (X of any rank), Gemm with a
constant B (transA, transB, alpha, beta and a bias C kept: alpha goes into the second
factor, the second Gemm takes C and beta), and pointwise (1x1, group 1, unpadded) Conv as
two 1x1 Convs (strides on the first, the bias on the second): the channel-mixing layers of
MobileNet-style CNNs. Weights in initializers or Constant nodes, in
the main graph, If/Loop/Scan bodies and functions. A weight another node also reads stays
whole (its copy would grow the file). The original output value stays, so graph outputs
and consumers do not change.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from onnxsqueeze.calib.gram import gram_key
from onnxsqueeze.core.graphs import (
    GraphLike,
    add_constant,
    all_value_names,
    constant_array,
    drop_if_unused,
    read_elsewhere,
    scopes,
    unique_name,
    weight_as_kn,
)
from onnxsqueeze.core.pass_base import SqueezePass, SqueezeResult
from onnxsqueeze.lowrank.svd import DAMPING, LowRank, pays, rank_for_ratio


@dataclasses.dataclass(frozen=True)
class FactorizeSvdOptions:
    #: Rank of every factorized weight; 0: by ``ratio``, else by ``energy``.
    rank: int = 0
    #: Parameters each factorized weight keeps at most (r (K + N) <= ratio K N); 0: unused.
    ratio: float = dataclasses.field(default=0.0, metadata={"range": (0, 1)})
    #: Share of the (whitened) spectrum's energy each weight keeps.
    energy: float = dataclasses.field(default=0.99, metadata={"range": (0, 1)})
    #: Factorize only where the factors save at least this share of the weight's parameters.
    min_saving: float = dataclasses.field(default=0.1, metadata={"range": (0, 1)})
    #: Weights with fewer elements stay whole.
    min_elements: int = 4096
    #: Damping of the Gram matrix's diagonal (share of its mean) before the Cholesky.
    damping: float = DAMPING
    #: Least-squares refit of the second factor on the undamped Gram matrix (data-aware only).
    #: Off by default: the whitened factors are already the best for the damped Gram matrix,
    #: and refitting to the undamped one overfits few samples (magika, 64 calibration rows
    #: for a 512-wide input: held-out output error 0.038 -> 0.20, tools/bench_factorize.py).
    refit: bool = False
    exclude_nodes: tuple[str, ...] = ()
    #: node name -> rank, set by the factorize stage; overrides rank/ratio/energy.
    ranks: Mapping[str, int] | None = dataclasses.field(
        default=None, compare=False, metadata={"hidden": True}
    )
    #: activation name -> X^T X on calibration data (calib.gram): whitened SVD there.
    grams: Mapping[str, np.ndarray] | None = dataclasses.field(
        default=None, compare=False, metadata={"hidden": True}
    )
    #: node name -> LowRank, kept by a caller that builds many variants of one model.
    memo: dict | None = dataclasses.field(default=None, compare=False, metadata={"hidden": True})


@dataclasses.dataclass(frozen=True)
class Site:
    """A factorizable node: its scope, the weight as X @ W sees it (K x N, alpha folded
    in), and how to rebuild it."""

    scope: GraphLike
    node: ir.Node
    weight: np.ndarray
    key: str | None  # the Gram matrix of its input, if gathered


def sites(model: ir.Model, min_elements: int = 0) -> list[Site]:
    """Every node this pass can factorize, graph order, main graph first."""
    found = []
    for scope in scopes(model):
        for node in scope:
            site = _site(scope, node)
            if site is not None and site.weight.size >= min_elements:
                found.append(site)
    return found


def _site(scope: GraphLike, node: ir.Node) -> Site | None:
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm", "Conv"):
        return None
    if len(node.inputs) < 2 or node.inputs[0] is None or node.inputs[1] is None:
        return None
    w_value = node.inputs[1]
    weight = constant_array(w_value)
    if weight is None or weight.dtype.kind != "f" or weight.dtype.itemsize < 4:
        return None
    if read_elsewhere(w_value, node) or w_value.is_graph_output():
        return None
    if node.op_type == "Conv" and not _pointwise(node, weight):
        return None
    as_kn = weight_as_kn(node, weight)
    if as_kn is None:
        return None
    alpha = node.attributes.get("alpha")
    if node.op_type == "Gemm" and alpha is not None:
        as_kn = as_kn * np.float32(alpha.as_float())
    return Site(scope, node, as_kn, gram_key(node))


def _pointwise(node: ir.Node, weight: np.ndarray) -> bool:
    """A 1x1 Conv (any spatial rank) that mixes channels only: group 1, no padding. Its
    strides subsample positions, which the first of its two 1x1 Convs can do alike."""
    attrs = {k: a.value for k, a in node.attributes.items()}
    if weight.ndim < 3 or any(d != 1 for d in weight.shape[2:]) or attrs.get("group", 1) != 1:
        return False
    return attrs.get("auto_pad", "NOTSET") in ("NOTSET", "VALID") and not any(attrs.get("pads", []))


class FactorizeSvdPass(SqueezePass):
    """MatMul/Gemm constant weights -> two thinner products (truncated SVD)."""

    name = "factorize-svd"
    summary = "low-rank factorization of MatMul/Gemm/1x1 Conv weights: X @ W -> (X @ A) @ B"
    lossless = False
    Options = FactorizeSvdOptions

    def call(self, model: ir.Model) -> SqueezeResult:
        opts: FactorizeSvdOptions = self.options
        if not 0 <= opts.min_saving < 1 or not 0 < opts.energy <= 1 or not 0 <= opts.ratio < 1:
            raise ValueError("factorize-svd: min_saving and ratio in [0, 1), energy in (0, 1]")
        self._model, self._names = model, all_value_names(model)
        layers: list[dict] = []
        for site in sites(model, opts.min_elements):
            if site.node.name in opts.exclude_nodes:
                continue
            site.node.name = site.node.name or self._unique(site.node.op_type)
            rank = self._rank(site)
            k, n = site.weight.shape
            if rank is None or not pays(k, n, rank, opts.min_saving):
                continue
            low, name = self._low_rank(site), site.node.name
            a, b = low.factors(rank, refit=opts.refit)
            self._rewrite(site, a.astype(site.weight.dtype), b.astype(site.weight.dtype))
            layers.append(
                {
                    "name": name,
                    "shape": [k, n],
                    "rank": rank,
                    "params_before": k * n,
                    "params_after": rank * (k + n),
                    "predicted_error": round(low.error(rank), 8),
                    "whitened": low.chol is not None,
                }
            )
        before = sum(layer["params_before"] for layer in layers)
        after = sum(layer["params_after"] for layer in layers)
        stats = {
            "factorized": [layer["name"] for layer in layers],
            "layers": layers,
            "params_before": before,
            "params_after": after,
        }
        return SqueezeResult(model, modified=bool(layers), stats=stats)

    def _low_rank(self, site: Site) -> LowRank:
        opts: FactorizeSvdOptions = self.options
        gram = (opts.grams or {}).get(site.key) if site.key else None
        memo = opts.memo if opts.memo is not None else {}
        key = (site.node.name, gram is not None)
        if key not in memo:
            memo[key] = LowRank(site.weight, gram, damping=opts.damping)
        return memo[key]

    def _rank(self, site: Site) -> int | None:
        opts: FactorizeSvdOptions = self.options
        k, n = site.weight.shape
        if opts.ranks is not None:
            return opts.ranks.get(site.node.name)
        if opts.rank:
            return opts.rank
        if opts.ratio:
            return rank_for_ratio(k, n, opts.ratio)
        return self._low_rank(site).rank_for_energy(opts.energy)

    def _rewrite(self, site: Site, a: np.ndarray, b: np.ndarray) -> None:
        scope, node = site.scope, site.node
        base = node.name
        if node.op_type == "Conv":  # filters [out, in, 1, ...]: A^T and B^T with unit kernels
            ones = (1,) * (constant_array(node.inputs[1]).ndim - 2)
            a, b = (
                a.T.reshape(a.shape[1], a.shape[0], *ones),
                b.T.reshape(b.shape[1], b.shape[0], *ones),
            )
        a_value = add_constant(self._model, scope, a, self._unique(f"{base}_svd_a"), node)
        b_value = add_constant(self._model, scope, b, self._unique(f"{base}_svd_b"), node)
        x, out = node.inputs[0], node.outputs[0]
        if node.op_type == "MatMul":
            first = ir.node("MatMul", [x, a_value], name=self._unique(f"{base}_svd_1"))
            second = ir.node("MatMul", [first.outputs[0], b_value], name=base)
        elif node.op_type == "Conv":
            attrs = {k: v.value for k, v in node.attributes.items()}
            strided = {"strides": attrs["strides"]} if "strides" in attrs else {}
            first = ir.node(
                "Conv", [x, a_value], attributes=strided, name=self._unique(f"{base}_svd_1")
            )
            second = ir.node("Conv", [first.outputs[0], b_value, *node.inputs[2:3]], name=base)
        else:
            attrs = {k: v.value for k, v in node.attributes.items()}
            first = ir.node(
                "Gemm",
                [x, a_value],
                attributes={"transA": attrs.get("transA", 0)},
                name=self._unique(f"{base}_svd_1"),
            )
            inputs = [first.outputs[0], b_value, *node.inputs[2:3]]
            beta = {"beta": attrs["beta"]} if "beta" in attrs and len(inputs) > 2 else {}
            second = ir.node("Gemm", inputs, attributes=beta, name=base)
        first.outputs[0].name = self._unique(f"{base}_svd_h")
        first.outputs[0].type = out.type
        scope.insert_before(node, [first, second])
        node.name = self._unique(f"{base}_replaced")
        name = out.name
        new = second.outputs[0]
        out.name = self._unique(f"{name}__factorized")
        new.name, new.type, new.shape = name, out.type, out.shape
        out.replace_all_uses_with(new, replace_graph_outputs=True)
        weight = node.inputs[1]
        scope.remove(node, safe=True)
        drop_if_unused(scope, weight)

    def _unique(self, base: str) -> str:
        return unique_name(self._names, base)
