"""cleanup: dead nodes, unused and duplicate initializers, Constant nodes lifted, unused opsets.

Composes onnx_ir's common passes where they are right and replaces two that are not right
for us: Constant lifting skips what cannot be lifted (sparse values, graph outputs, IR < 4
models whose initializers must be inputs) instead of raising, and deduplication groups by
dtype and shape first and hashes external weights from the file, so a 2 GB model is not
pulled into memory to find no duplicates.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from collections import Counter, defaultdict

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import (
    RemoveUnusedFunctionsPass,
    RemoveUnusedNodesPass,
    RemoveUnusedOpsetsPass,
)

from onnxsqueeze.core.pass_base import SqueezePass, SqueezeResult
from onnxsqueeze.core.stats import model_stats

logger = logging.getLogger(__name__)

_HASH_CHUNK = 16 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class CleanupOptions:
    lift_constants: bool = True
    dedup_initializers: bool = True
    remove_unused_functions: bool = True
    remove_unused_opsets: bool = True


class CleanupPass(SqueezePass):
    """Remove what a model carries but never uses; lift Constant nodes to initializers."""

    name = "cleanup"
    summary = (
        "remove unused nodes/initializers/functions/opsets, merge duplicate weights, lift Constants"
    )
    lossless = True
    Options = CleanupOptions

    def call(self, model: ir.Model) -> SqueezeResult:
        opts: CleanupOptions = self.options
        before = model_stats(model)
        n_functions, n_opsets = len(model.functions), len(model.opset_imports)
        stats: dict[str, object] = {}
        if opts.lift_constants:
            if (model.ir_version or 0) >= 4:
                stats["constants_lifted"] = lift_constants(model)
            else:
                stats["constants_lifted"] = 0
                stats["lift_skipped"] = (
                    f"IR version {model.ir_version} requires initializers as inputs"
                )
        RemoveUnusedNodesPass()(model)
        stats["subgraph_initializers_removed"] = remove_unused_subgraph_initializers(model)
        if opts.dedup_initializers:
            stats["duplicates_merged"] = sum(dedup_initializers(g) for g in model.graphs())
        if opts.remove_unused_functions:
            RemoveUnusedFunctionsPass()(model)
        if opts.remove_unused_opsets:
            RemoveUnusedOpsetsPass()(model)
        after = model_stats(model)
        stats.update(
            nodes_removed=before.nodes - after.nodes,
            bytes_saved=before.weight_bytes - after.weight_bytes,
            functions_removed=n_functions - len(model.functions),
            opsets_removed=n_opsets - len(model.opset_imports),
        )
        modified = any(v for k, v in stats.items() if isinstance(v, int)) or after != before
        return SqueezeResult(model, modified=bool(modified), stats=stats)


def lift_constants(model: ir.Model) -> int:
    """Turn tensor-valued Constant nodes (main graph and subgraphs) into initializers."""
    count = 0
    for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or node.graph is None:
            continue
        output = node.outputs[0]
        if output.is_graph_output() or len(node.attributes) != 1:
            continue
        tensor = _constant_tensor(node, output.name or "")
        if tensor is None:
            continue
        value = ir.Value(
            name=output.name,
            shape=tensor.shape,
            type=ir.TensorType(tensor.dtype),
            const_value=tensor,
        )
        node.graph.register_initializer(value)
        output.replace_all_uses_with(value)
        node.graph.remove(node, safe=True)
        count += 1
    return count


def _constant_tensor(node: ir.Node, name: str) -> ir.TensorProtocol | None:
    attr_name, attr = next(iter(node.attributes.items()))
    if attr.is_ref():
        return None  # a function attribute reference, resolved only at call time
    makers = {
        "value": lambda: attr.as_tensor(),
        "value_int": lambda: ir.tensor(attr.as_int(), dtype=ir.DataType.INT64, name=name),
        "value_ints": lambda: ir.tensor(list(attr.as_ints()), dtype=ir.DataType.INT64, name=name),
        "value_float": lambda: ir.tensor(attr.as_float(), dtype=ir.DataType.FLOAT, name=name),
        "value_floats": lambda: ir.tensor(
            list(attr.as_floats()), dtype=ir.DataType.FLOAT, name=name
        ),
    }
    maker = makers.get(attr_name)
    if maker is None:  # sparse_value and string constants stay nodes
        return None
    tensor = maker()
    tensor.name = name
    return tensor


def remove_unused_subgraph_initializers(model: ir.Model) -> int:
    """onnx_ir's unused-node pass cleans only the main graph's initializers; do subgraphs."""
    count = 0
    for graph in model.graphs():
        if graph is model.graph:
            continue
        for value in list(graph.initializers.values()):
            if not (value.uses() or value.is_graph_input() or value.is_graph_output()):
                graph.initializers.pop(value.name)
                count += 1
    return count


def dedup_initializers(graph: ir.Graph) -> int:
    """Merge initializers with equal dtype, shape and bytes; only same-shape groups are hashed."""
    groups: dict[tuple, list[ir.Value]] = defaultdict(list)
    for value in graph.initializers.values():
        tensor = value.const_value
        if tensor is None or value.is_graph_input() or value.is_graph_output():
            continue
        groups[(tensor.dtype, tuple(tensor.shape.numpy()))].append(value)
    merged = 0
    for values in groups.values():
        if len(values) < 2:
            continue
        seen: dict[bytes, ir.Value] = {}
        samples = [_sample(v.const_value) for v in values]
        alike = Counter(samples)
        for value, sample in zip(values, samples, strict=True):
            if sample is not None and alike[sample] < 2:
                continue  # no other tensor starts, middles and ends alike: no need to hash
            digest = tensor_digest(value.const_value)
            keep = seen.setdefault(digest, value)
            if keep is value:
                continue
            value.replace_all_uses_with(keep)
            graph.initializers.pop(value.name)
            merged += 1
            logger.debug("initializer %s merged into %s", value.name, keep.name)
    return merged


def _sample(tensor: ir.TensorProtocol) -> bytes | None:
    """A few hundred bytes from the start, middle and end of an in-memory tensor: equal
    tensors have equal samples, and different weights almost never do, so most of a
    model's same-shape weights are told apart without hashing all their bytes."""
    if isinstance(tensor, ir.ExternalTensor) or tensor.dtype == ir.DataType.STRING:
        return None
    flat = tensor.numpy().reshape(-1).view(np.uint8)
    middle = flat.size // 2
    return b"".join(bytes(flat[a : a + 256]) for a in (0, middle, max(flat.size - 256, 0)))


def tensor_digest(tensor: ir.TensorProtocol) -> bytes:
    """BLAKE2b of the tensor's bytes; external tensors are read from the file in chunks."""
    hasher = hashlib.blake2b(digest_size=32)
    if isinstance(tensor, ir.ExternalTensor):
        with open(os.path.join(tensor.base_dir, tensor.location), "rb") as fh:
            fh.seek(tensor.offset or 0)
            remaining = tensor.length if tensor.length is not None else tensor.nbytes
            while remaining > 0:
                chunk = fh.read(min(_HASH_CHUNK, remaining))
                if not chunk:
                    break
                hasher.update(chunk)
                remaining -= len(chunk)
    elif tensor.dtype == ir.DataType.STRING:
        for item in tensor.string_data():  # type: ignore[attr-defined]
            hasher.update(len(item).to_bytes(8, "little"))
            hasher.update(item)
    else:
        hasher.update(tensor.tobytes())
    return hasher.digest()
