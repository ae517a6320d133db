"""Protobuf-level tidying of a model about to be written or just read: the parts onnx_ir
adds or does not see (names inside attributes, shape hints in subgraphs)."""

from __future__ import annotations

from collections.abc import Iterator

import onnx


def proto_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every graph nested in its nodes' attributes, depth first."""
    yield graph
    for node in graph.node:
        for sub in _subgraphs(node):
            yield from proto_graphs(sub)


def unname_attribute_tensors(proto: onnx.ModelProto) -> None:
    """Drop the names onnx_ir gives tensors held in attributes (a Constant's value takes its
    output's name): nothing reads them, and a model passed through unchanged grew by the
    names (3 Constants: 103 bytes, larger than its input)."""
    bodies = [n for f in proto.functions for n in f.node]
    roots = [proto.graph, *(g for n in bodies for g in _subgraphs(n))]
    nodes = [*bodies, *(n for root in roots for g in proto_graphs(root) for n in g.node)]
    for node in nodes:
        for attribute in node.attribute:
            tensors = [attribute.t] if attribute.HasField("t") else []
            for tensor in (*tensors, *attribute.tensors):
                tensor.ClearField("name")


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    found: list[onnx.GraphProto] = []
    for attribute in node.attribute:
        found += [attribute.g] if attribute.HasField("g") else []
        found += attribute.graphs
    return found
