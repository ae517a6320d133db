"""Quantization as a family of the shared search: which nodes are candidates in each mode,
and the model with every candidate quantized except a given few, built by the mode's pass
(insert-qdq, quantize-dynamic, convert-fp16, quantize-weights)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import onnx_ir as ir

from onnxsqueeze.core.graphs import scopes
from onnxsqueeze.passes.convert_fp16 import ConvertFp16Pass
from onnxsqueeze.passes.insert_qdq import DEFAULT_OPS, InsertQdqPass
from onnxsqueeze.passes.quantize_dynamic import QuantizeDynamicPass
from onnxsqueeze.passes.quantize_lstm import QuantizeLstmPass
from onnxsqueeze.passes.quantize_weights import WEIGHT_OPS, QuantizeWeightsPass
from onnxsqueeze.stages.quantize.config import CANDIDATE_OPS, QuantizeConfig


class QuantizeFamily:
    """The candidates of ``config.mode`` in ``model`` and the models built from them.

    The stage sets what the builds depend on as it learns it: ``ranges`` (static, per
    range method), ``weights`` (the weight-only settings), the outlier channels of dynamic
    and whether to split them. ``weight_memo`` keeps static's rounded weights across the
    many variants one search builds."""

    def __init__(self, model: ir.Model, config: QuantizeConfig) -> None:
        self.model = model
        self.config = config
        self.ranges: Any = {}
        self.weight_memo: dict = {}
        self.weights: dict[str, Any] = {}
        #: dynamic: input name -> outlier channels to split, or factors to scale them by
        self.outliers: dict[str, tuple[int, ...]] = {}
        self.outlier_scales: dict[str, Any] = {}
        self.split = False
        self._candidates: dict[str, ir.Node] | None = None

    @property
    def candidates(self) -> dict[str, ir.Node]:
        """Nodes the budget search may keep float, by name: every named node for fp16, the
        weight consumers for weight-only modes, else the ops with their own scale."""
        if self._candidates is None:
            if self.config.mode == "fp16":
                self._candidates = {n.name: n for n in self.model.graph if n.name}
            else:
                if self.config.weight_only:
                    ops = set(WEIGHT_OPS)
                else:
                    ops = set(self.config.op_types or CANDIDATE_OPS) & set(CANDIDATE_OPS)
                self._candidates = {
                    n.name: n
                    for scope in scopes(self.model)
                    for n in scope
                    if n.op_type in ops and n.name
                }
        return self._candidates

    def build(self, kept: Sequence[str]) -> ir.Model:
        """The model with every candidate quantized except ``kept``."""
        return self.build_with_stats(kept)[0]

    def build_with_stats(self, excluded: Sequence[str]) -> tuple[ir.Model, dict[str, Any]]:
        """The model with every candidate quantized except ``excluded``, and the pass's
        stats (``quantized``: the nodes it changed, ``kept_float``: why others stayed)."""
        candidate = self.model.clone()
        stats = self._quantize(candidate, tuple(self.config.exclude_nodes) + tuple(excluded))
        return candidate, stats

    def _quantize(self, candidate: ir.Model, exclude: tuple[str, ...]) -> dict[str, Any]:
        """Quantize ``candidate`` in place by the mode's pass; the pass's stats."""
        config = self.config
        if config.weight_only:
            return QuantizeWeightsPass(**self.weights, exclude_nodes=exclude)(candidate).stats
        if config.mode == "fp16":
            result = ConvertFp16Pass(exclude_nodes=exclude)(candidate)
            return {
                **result.stats,
                "quantized": result.stats["converted_nodes"],
                "kept_float": {},
            }
        if config.mode == "dynamic":
            result = QuantizeDynamicPass(
                per_channel=config.per_channel,
                reduce_range=config.reduce_range,
                exclude_nodes=exclude,
                outliers=self.outliers if self.split else None,
                outlier_scales=self.outlier_scales if self.split else None,
                embedding_fold=set(config.providers) <= {"cpu"},
            )(candidate)
            stats = result.stats
            if set(config.providers) <= {"cpu"}:  # DynamicQuantizeLSTM: CPU provider only
                lstm = QuantizeLstmPass(reduce_range=config.reduce_range, exclude_nodes=exclude)
                more = lstm(candidate).stats
                stats = {
                    **stats,
                    "quantized": stats["quantized"] + more["quantized"],
                    "kept_float": {**stats["kept_float"], **more["kept_float"]},
                }
            return stats
        result = InsertQdqPass(
            ranges=self.ranges,
            weight_memo=self.weight_memo,
            activations=config.activations,
            weights=config.weights,
            per_channel=config.per_channel,
            reduce_range=config.reduce_range,
            op_types=tuple(config.op_types or DEFAULT_OPS),
            exclude_nodes=exclude,
            exclude_ops=tuple(config.exclude_ops),
            elementwise=config.elementwise,
        )(candidate)
        return result.stats
