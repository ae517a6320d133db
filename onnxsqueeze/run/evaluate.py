"""Evaluate constant nodes: the numbers behind constant folding.

All foldable nodes of a scope go to onnxruntime as *one* small model (one session instead
of one per node). If onnxruntime refuses the batch, nodes are evaluated one by one, with
onnx's reference evaluator for what onnxruntime cannot run alone (old opsets, ops only
defined by a function body). A node that neither can evaluate is simply not folded.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from onnxsqueeze.core.errors import first_line

logger = logging.getLogger(__name__)


def evaluate_nodes(
    nodes: Sequence[ir.Node],
    constants: Mapping[str, np.ndarray],
    opsets: Mapping[str, int],
    ir_version: int,
) -> dict[str, np.ndarray]:
    """Values (by name) of every output of ``nodes`` that could be computed.

    ``nodes`` are in topological order; their inputs are either in ``constants`` or
    outputs of earlier nodes in the list.
    """
    if not nodes:
        return {}
    protos = [ir.serde.serialize_node(n) for n in nodes]
    outputs = [o for p in protos for o in p.output if o]
    try:
        values = _run_ort(protos, constants, outputs, opsets, ir_version)
        return {k: v for k, v in zip(outputs, values, strict=True) if isinstance(v, np.ndarray)}
    except Exception as exc:
        logger.debug("batch evaluation failed (%s); evaluating node by node", first_line(exc))
    known: dict[str, np.ndarray] = dict(constants)
    result: dict[str, np.ndarray] = {}
    for proto in protos:
        if not all(i == "" or i in known for i in proto.input):
            continue
        needed = {i: known[i] for i in proto.input if i}
        names = [o for o in proto.output if o]
        values = _evaluate_one(proto, needed, names, opsets, ir_version)
        if values is None:
            continue
        for name, value in zip(names, values, strict=True):
            if isinstance(value, np.ndarray):
                known[name] = value
                result[name] = value
    return result


def _evaluate_one(proto, needed, names, opsets, ir_version) -> list | None:
    try:
        return _run_ort([proto], needed, names, opsets, ir_version)
    except Exception as exc:
        logger.debug("onnxruntime cannot evaluate %s: %s", proto.op_type, first_line(exc))
    try:
        from onnx.reference import ReferenceEvaluator

        model = _model([proto], needed, names, opsets, ir_version)
        return list(ReferenceEvaluator(model).run(None, {}))
    except Exception as exc:
        logger.debug("onnx.reference cannot evaluate %s: %s", proto.op_type, first_line(exc))
    return None


def _model(protos, constants, outputs, opsets, ir_version) -> onnx.ModelProto:
    used = {i for p in protos for i in p.input if i}
    produced = {o for p in protos for o in p.output}
    initializers = [
        onnx.numpy_helper.from_array(np.asarray(constants[name]), name)
        for name in sorted(used - produced)
    ]
    graph = onnx.helper.make_graph(
        protos, "fold", [], [onnx.ValueInfoProto(name=o) for o in outputs], initializers
    )
    imports = [onnx.helper.make_opsetid(d, v) for d, v in opsets.items()]
    return onnx.helper.make_model(graph, opset_imports=imports, ir_version=max(ir_version, 4))


def _run_ort(protos, constants, outputs, opsets, ir_version) -> list:
    import onnxruntime as ort

    model = _model(protos, constants, outputs, opsets, ir_version)
    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(None, {})
