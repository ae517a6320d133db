"""Models that use an op below the opset that defines it, which onnxruntime accepts.

onnxruntime registers some ops for older opsets than ONNX does (its contrib
``LayerNormalization`` runs under any opset), and its own transformer optimizer writes them
so: a BERT exported at opset 14 and optimized comes back with ``LayerNormalization``, which
ONNX defines from opset 17, and fails onnx.checker. Such a model is raised to the first opset
that defines every such op by onnx's version converter (whose adapters carry the other ops'
changes); the ops the converter cannot know at the old opset sit in a placeholder domain
during the conversion. The pipeline verifies the result against the model as given.
"""

from __future__ import annotations

import onnx
import onnx.defs
import onnx.version_converter

#: Ops the converter cannot read at the model's opset wait here during the conversion.
_PARKED = "onnxsqueeze.parked"


def _defined(op: str, version: int) -> bool:
    try:
        onnx.defs.get_schema(op, version, "")
    except onnx.defs.SchemaError:
        return False
    return True


def _nodes(graph: onnx.GraphProto):
    """Every node, subgraphs (If/Loop/Scan bodies) included."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                yield from _nodes(sub)


def _opset(proto: onnx.ModelProto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def ops_ahead_of_opset(proto: onnx.ModelProto) -> set[str]:
    """Default-domain ops the model's opset does not define but a later one does."""
    version, latest = _opset(proto), onnx.defs.onnx_opset_version()
    return {
        node.op_type
        for node in _nodes(proto.graph)
        if node.domain in ("", "ai.onnx")
        and not _defined(node.op_type, version)
        and _defined(node.op_type, latest)
    }


def legalize(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, str] | None:
    """(the model at the first opset defining all its ops, what was done), or None when
    nothing needs it or the conversion fails."""
    ahead = ops_ahead_of_opset(proto)
    version, latest = _opset(proto), onnx.defs.onnx_opset_version()
    if not ahead or not version:  # no default-domain import: nothing to convert from
        return None
    target = next(v for v in range(version + 1, latest + 1) if all(_defined(op, v) for op in ahead))
    parked = onnx.ModelProto()
    parked.CopyFrom(proto)
    for node in _nodes(parked.graph):
        if node.domain in ("", "ai.onnx") and node.op_type in ahead:
            node.domain = _PARKED
    parked.opset_import.append(onnx.helper.make_opsetid(_PARKED, 1))
    try:
        converted = onnx.version_converter.convert_version(parked, target)
    except Exception:
        return None
    for node in _nodes(converted.graph):
        if node.domain == _PARKED:
            node.domain = ""
    imports = [o for o in converted.opset_import if o.domain != _PARKED]
    del converted.opset_import[:]
    converted.opset_import.extend(imports)
    names = ", ".join(sorted(ahead))
    note = (
        f"{names} under opset {version}, which ONNX defines from opset {target} (onnxruntime "
        f"accepts it): the model was converted to opset {target}"
    )
    return converted, note
