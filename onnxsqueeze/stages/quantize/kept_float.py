"""What becomes of the weights the quantize stage's budget search kept float.

The search (``stages.search``, run by ``stages.quantize.stage``) decides which nodes must
stay float for the accuracy budget to hold. Their weights need not stay float too: static QDQ can store them in the fold
form (int8 in the file, float again at load, the same float kernels), and weights-int4 can
give them int8 instead of int4. Both are judged again and shipped only if the budget holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import onnx_ir as ir

from onnxsqueeze.core.graphs import scopes
from onnxsqueeze.core.io import initializer_bytes
from onnxsqueeze.passes.quantize_weights import QuantizeWeightsPass
from onnxsqueeze.stages.quantize.weight_only import FOLD_MIN_ELEMENTS
from onnxsqueeze.stages.search import fewest_kept


def int8_for_kept(
    stage: Any, candidate: ir.Model, kept: list[str], settings: dict[str, Any]
) -> tuple[ir.Model, list[str], list[str]]:
    """weights-int4: weights the budget kept float go int8 where the budget still holds
    (a float weight costs 8x its int4 bytes, an int8 one 2x): MiniLM's default-budget
    int4 file was 0.75x the float one, larger than int8's. ``kept`` is most damaging
    first; the shared bisection (``stages.search.fewest_kept``) finds the fewest of them
    that must stay float. Fold and MatMulNBits forms (the CPU defaults: int8 needs no
    opset there; MatMulNBits takes 8 bits with the same blocks).
    ``settings``: the stage's quantize-weights options (see weight_only). Returns the
    model, what stays float and what went int8."""
    if settings["format"] not in ("fold", "matmulnbits"):
        return candidate, kept, []
    others = tuple(n for n in stage.candidates if n not in kept)
    block = settings["block_size"] if settings["format"] == "matmulnbits" else 0
    int8 = {**settings, "bits": 8, "block_size": block}
    changed: dict[int, int] = {}  # weights each built model gave int8, by id

    def build(still_float: Sequence[str]) -> ir.Model:
        model = candidate.clone()
        exclude = (*stage.config.exclude_nodes, *others, *still_float)
        changed[id(model)] = QuantizeWeightsPass(**int8, exclude_nodes=exclude)(model).stats[
            "weights_quantized"
        ]
        return model

    def judge(model: ir.Model) -> tuple[bool, str]:
        return stage.judge(model) if changed[id(model)] else (False, "")

    found = fewest_kept(kept, build, judge, none_kept_fails=False)
    if found.model is None:
        return candidate, kept, []
    start, model, summary = found.count, found.model, found.summary
    now_int8 = set(kept[start:])
    for entry in stage.record["nodes"]:
        if entry["name"] in now_int8:
            entry["decision"] = "int8 (budget)"
    for name in now_int8:
        stage.record["kept_float"].pop(name, None)
    stage.record["int8_for_budget"] = len(now_int8)
    stage.record["measured"] = summary
    return model, kept[:start], kept[start:]


#: Dynamic folds the weights it leaves float only when they hold at least this share of
#: the float model's weight bytes (see mostly_float).
DYNAMIC_FLOAT_SHARE = 0.05


def mostly_float(model: ir.Model, candidate: ir.Model) -> bool:
    """Whether the float weights a dynamic result still holds (Conv filters, recurrent
    weights: dynamic int8 covers MatMul/Gemm and tables only) are a large share of the
    model's: a conv + LSTM OCR net left 0.535x its file where weight-only int8 reached
    0.253x. Where they are a sliver (a transformer's LayerNorm and biases), rounding them
    costs held-out accuracy for nothing (MiniLM NN 0.96 -> 0.955; under 1 % of its weights
    stay float). Above the share, a second squeeze would find them (auto's weight-only
    int8): folded by the first, the second changes nothing."""
    total = initializer_bytes(model)
    left = sum(
        v.const_value.nbytes
        for graph in candidate.graphs()
        for v in graph.initializers.values()
        if v.const_value is not None and v.const_value.dtype == ir.DataType.FLOAT
    )
    return total > 0 and left >= DYNAMIC_FLOAT_SHARE * total


def fold_float_weights(stage: Any, candidate: ir.Model, sensitive: Sequence[str]) -> ir.Model:
    """Nodes static (or dynamic, see mostly_float) left float, by the budget or ops it does
    not quantize, keep float weights: stored as int8 that folds back at load (the
    weight-only CPU form), they run the same float kernels from a file a quarter the size.
    Tried on every float node, then without the ``sensitive`` ones the budget kept float;
    shipped only if the budget holds. Nodes the user excluded (by name or op) stay
    untouched."""
    if not set(stage.config.providers) <= {"cpu"}:
        return candidate  # other EPs may not fold constants the way onnxruntime's CPU does
    ops = set(stage.config.exclude_ops)
    named = (n.name for scope in scopes(candidate) for n in scope if n.op_type in ops)
    user = (*stage.config.exclude_nodes, *named)
    summary = ""
    for exclude in dict.fromkeys((user, (*user, *sensitive))):
        folded = candidate.clone()
        stats = QuantizeWeightsPass(
            format="fold", min_elements=FOLD_MIN_ELEMENTS, exclude_nodes=exclude
        )(folded).stats
        if not stats["weights_quantized"]:
            break
        ok, summary = stage.judge(folded)
        if ok:
            stage.record["float_weights"] = f"{stats['weights_quantized']} int8 (fold)"
            stage.record["measured"] = summary
            return folded
    if summary:
        stage.record["float_weights"] = f"float ({summary})"
    return candidate
