"""What the default squeeze would try on a model, said before it runs (``onnxsqueeze
inspect``): the lossless preset, the quantization alternatives auto measures, and how many
nodes each could touch. A preview from the graph alone; the run decides by measuring."""

from __future__ import annotations

from typing import Any

import onnx

from onnxsqueeze.core.inventory import Inventory, graphs_with_place
from onnxsqueeze.quant.qdq import WEIGHTED
from onnxsqueeze.stages.quantize.alternatives import resolve_configs

#: Ops dynamic quantization rewrites (integer MatMul with run-time activation scales).
DYNAMIC_OPS = ("MatMul", "Gemm")


def preview(proto: onnx.ModelProto, facts: Inventory, has_data: bool = False) -> dict[str, Any]:
    from onnxsqueeze.pipeline.presets import builtin_registry

    constants = _constant_names(proto)
    weighted: dict[str, int] = {}
    for _, graph in graphs_with_place(proto.graph):
        for node in graph.node:
            if node.op_type in WEIGHTED and len(node.input) > 1 and node.input[1] in constants:
                weighted[node.op_type] = weighted.get(node.op_type, 0) + 1
    modes = [c.mode for c in resolve_configs("auto", has_data)]
    lines = []
    state = facts.quantization["state"]
    if state != "float":
        lines.append(
            f"already {state}: the lossless passes still run; quantizing again is up to you "
            "(--quantize none keeps it as it is)"
        )
    if not weighted:
        lines.append("no MatMul/Gemm/Conv with constant weights: nothing to quantize")
    else:
        touched = ", ".join(f"{n} {op}" for op, n in sorted(weighted.items()))
        dynamic = sum(weighted.get(op, 0) for op in DYNAMIC_OPS)
        lines.append(
            f"quantize auto measures {', '.join(modes)} ({touched} with constant weights; "
            f"dynamic covers the {dynamic} MatMul/Gemm), keeps the fastest within the "
            "accuracy budget and not slower than float"
            + ("" if has_data else "; static needs --data")
        )
    return {
        "passes": [name for name, _ in builtin_registry().preset("default").passes],
        "quantize_modes": modes,
        "weighted_nodes": weighted,
        "notes": lines,
    }


def _constant_names(proto: onnx.ModelProto) -> set[str]:
    names = set()
    for _, graph in graphs_with_place(proto.graph):
        names.update(t.name for t in graph.initializer)
        names.update(n.output[0] for n in graph.node if n.op_type == "Constant" and n.output)
    return names
