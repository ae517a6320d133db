"""Protobuf-level tidying of a model about to be written or just read: the parts onnx_ir
adds or does not see (names inside attributes, shape hints in subgraphs)."""

from __future__ import annotations

from collections.abc import Iterator

import onnx


def unname_attribute_tensors(proto: onnx.ModelProto) -> None:
    """Drop the names onnx_ir gives tensors held in attributes (a Constant's value takes its
    output's name): nothing reads them, and a model passed through unchanged grew by the
    names (3 Constants: 103 bytes, larger than its input)."""
    graphs = [proto.graph]
    nodes = [n for f in proto.functions for n in f.node]
    while graphs or nodes:
        if graphs:
            nodes.extend(graphs.pop().node)
            continue
        for attribute in nodes.pop().attribute:
            tensors = [attribute.t] if attribute.HasField("t") else []
            for tensor in (*tensors, *attribute.tensors):
                tensor.ClearField("name")
            if attribute.HasField("g"):
                graphs.append(attribute.g)
            graphs.extend(attribute.graphs)


def proto_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every graph nested in its nodes' attributes, depth first."""
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            for sub in (*([attribute.g] if attribute.HasField("g") else []), *attribute.graphs):
                yield from proto_graphs(sub)
