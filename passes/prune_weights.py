"""prune-weights: zero the least important weights of Conv/MatMul/Gemm (unstructured or N:M).

Importance is |W| alone, or with the input's Gram matrix (``grams``: calibration data, as
``calib.gram`` gathers it for GPTQ) Wanda's |W| x ||X_j||; see ``prune.masks``. Each output
keeps the same share of its weights (``sparsity``), or, with ``pattern="2:4"`` (any N:M), at
most N of every M consecutive input channels. The weights stay dense in the graph: zeros
make the file compress (and are what sparse kernels and sparse storage start from), not the
model faster on onnxruntime's dense CPU kernels.

Candidates: MatMul and Gemm with a constant 2-D float weight (Gemm's transB honoured),
and Conv with constant filters and group 1 (a filter [N, C, k...] is seen as C k... input
rows per output); with ``embeddings``, Gather tables too (each row alike). Weights in initializers or Constant nodes, in every scope. A weight
another node also reads, or smaller than ``min_elements``, is left alone.
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
    weight_from_kn,
)
from onnxsqueeze.core.pass_base import SqueezePass, SqueezeResult
from onnxsqueeze.prune.masks import importance, n_of_m_mask, unstructured_mask


@dataclasses.dataclass(frozen=True)
class PruneWeightsOptions:
    #: Share of each output's weights zeroed (unstructured).
    sparsity: float = dataclasses.field(default=0.5, metadata={"range": (0, 1)})
    #: "unstructured", or "N:M" (e.g. "2:4": at most N nonzeros in every M input channels).
    pattern: str = "unstructured"
    #: Weights with fewer elements stay dense.
    min_elements: int = 4096
    #: Also embedding tables (a Gather's constant 2-D data, indices at run time): each row
    #: (a token's vector) keeps its largest weights. Off by default: a table has no input
    #: norms for Wanda, and a transformer's embedding is often half its file.
    embeddings: bool = False
    exclude_nodes: tuple[str, ...] = ()
    #: activation (or Conv patch) key -> X^T X on calibration data: Wanda importance there.
    grams: Mapping[str, np.ndarray] | None = dataclasses.field(
        default=None, compare=False, metadata={"hidden": True}
    )


class PruneWeightsPass(SqueezePass):
    """Conv/MatMul/Gemm weights -> the same weights with the least important zeroed."""

    name = "prune-weights"
    summary = "zero the least important Conv/MatMul/Gemm weights (magnitude or Wanda; N:M)"
    lossless = False
    Options = PruneWeightsOptions

    def call(self, model: ir.Model) -> SqueezeResult:
        opts: PruneWeightsOptions = self.options
        self._nm = _pattern(opts.pattern)
        if self._nm is None and not 0 <= opts.sparsity < 1:
            raise ValueError(f"prune-weights.sparsity must be in [0, 1), got {opts.sparsity}")
        self._model, self._names = model, all_value_names(model)
        layers = []
        for scope in list(scopes(model)):
            for node in list(scope):
                if node.name and node.name in opts.exclude_nodes:
                    continue
                layer = self._prune(scope, node)
                if layer is not None:
                    layers.append(layer)
        zeros = sum(layer["zeros"] for layer in layers)
        total = sum(layer["weights"] for layer in layers)
        stats = {
            "pruned": [layer["name"] for layer in layers],
            "layers": layers,
            "zeros": zeros,
            "weights": total,
            "sparsity": round(zeros / total, 4) if total else 0.0,
        }
        return SqueezeResult(model, modified=bool(layers), stats=stats)

    def _prune(self, scope: GraphLike, node: ir.Node) -> dict | None:
        opts: PruneWeightsOptions = self.options
        if node.op_type == "Gather" and opts.embeddings and node.domain in ("", "ai.onnx"):
            return self._prune_table(scope, node)
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm", "Conv"):
            return None
        if len(node.inputs) < 2 or node.inputs[0] is None or node.inputs[1] is None:
            return None
        stored = constant_array(node.inputs[1])
        if stored is None or stored.dtype.kind != "f":
            return None
        as_kn = weight_as_kn(node, stored)
        if as_kn is None or stored.size < opts.min_elements:
            return None
        if read_elsewhere(node.inputs[1], node):
            return None
        key = gram_key(node)
        gram = (opts.grams or {}).get(key) if key else None
        if gram is not None and gram.shape[0] != as_kn.shape[0]:
            gram = None
        keep = self._mask(importance(as_kn, gram))
        pruned_kn = np.where(keep, as_kn, 0).astype(stored.dtype)
        pruned = weight_from_kn(node, pruned_kn, stored.shape)
        return self._replace(scope, node, 1, pruned, wanda=gram is not None)

    def _prune_table(self, scope: GraphLike, node: ir.Node) -> dict | None:
        """A Gather's embedding table: every row keeps the same share of its largest
        weights (N:M over each row's consecutive entries)."""
        opts: PruneWeightsOptions = self.options
        axis = node.attributes.get("axis")
        table = constant_array(node.inputs[0]) if node.inputs and node.inputs[0] else None
        if table is None or table.ndim != 2 or table.dtype.kind != "f":
            return None
        if (axis is not None and axis.as_int() != 0) or table.size < opts.min_elements:
            return None
        if read_elsewhere(node.inputs[0], node) or constant_array(node.inputs[1]) is not None:
            return None
        keep = self._mask(importance(table.T))  # D x V: each column one row of the table
        pruned = np.where(keep.T, table, 0).astype(table.dtype)
        return self._replace(scope, node, 0, pruned, wanda=False)

    def _mask(self, score: np.ndarray) -> np.ndarray:
        """Keep-mask over a K x N score: N:M, or the sparsity share of each column."""
        if self._nm is not None:
            return n_of_m_mask(score, *self._nm)
        return unstructured_mask(score, self.options.sparsity)

    def _replace(
        self, scope: GraphLike, node: ir.Node, index: int, pruned: np.ndarray, *, wanda: bool
    ) -> dict:
        """``node``'s input ``index`` becomes ``pruned``; the layer's record."""
        old = node.inputs[index]
        base = old.name or f"{node.name}_{index}"
        new = add_constant(
            self._model, scope, pruned, unique_name(self._names, base + "_pruned"), node
        )
        node.replace_input_with(index, new)
        drop_if_unused(scope, old)
        return {
            "name": node.name or node.op_type,
            "op": node.op_type,
            "shape": list(pruned.shape),
            "weights": int(pruned.size),
            "zeros": int(np.count_nonzero(pruned == 0)),
            "wanda": wanda,
        }


def _pattern(text: str) -> tuple[int, int] | None:
    if text == "unstructured":
        return None
    try:
        n, m = (int(part) for part in text.split(":"))
    except ValueError:
        raise ValueError(
            f"prune-weights.pattern must be unstructured or N:M, got {text!r}"
        ) from None
    if not 0 < n < m:
        raise ValueError(f"prune-weights.pattern N:M needs 0 < N < M, got {text!r}")
    return n, m
