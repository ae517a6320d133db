"""fold-constants: replace every node whose inputs are all constant by its value.

Every scope (main graph, If/Loop/Scan bodies, functions) is evaluated as one batch (see
onnxsqueeze.run.evaluate). Two guards keep the file from growing: ops that can blow up
(ConstantOfShape, Expand, Tile, Range) are not even evaluated past ``max_eval_elements``,
and a result is materialised only if it is no larger than its inputs and its node, or a
small integer tensor (a shape), or within ``max_growth_bytes`` when the user allows growth
(a peer grew a 500 MB model to 2.5 GB by folding such ops; a second fold here once grew a
54 MB model by 2.3 KB of ConstantOfShape zeros).
Q/DQ pairs and random ops are never folded. A CastLike of a constant to a runtime tensor
of known type is a Cast (PyTorch's dynamo exports a bias-free Conv's zero bias that way),
so it folds too, and the bias becomes a constant that BatchNorm fusion and pruning can use.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from onnxsqueeze.core.graphs import (
    NEVER_FOLD,
    GraphLike,
    add_constant,
    all_value_names,
    constant_array,
    in_main_tree,
    is_constant,
    scopes,
    unique_name,
)
from onnxsqueeze.core.io import count_nodes
from onnxsqueeze.core.pass_base import SqueezePass, SqueezeResult
from onnxsqueeze.passes.cleanup import remove_unused_subgraph_initializers
from onnxsqueeze.run.evaluate import evaluate_nodes

logger = logging.getLogger(__name__)

FOLDABLE_DOMAINS = ("", "ai.onnx", "ai.onnx.ml")
#: Integer results up to this size (shape vectors, axes, indices) fold freely.
TINY_BYTES = 1024
#: About what a folded node took in the file (op type, names, attributes).
NODE_BYTES = 64
#: Growth a user may allow (the default: none, a lossless pass never grows the file).
DEFAULT_GROWTH = 0


@dataclasses.dataclass(frozen=True)
class FoldConstantsOptions:
    #: Bytes a folded result may add over its inputs (0: none).
    max_growth_bytes: int = DEFAULT_GROWTH
    max_eval_elements: int = 16_000_000


class FoldConstantsPass(SqueezePass):
    """Evaluate constant subexpressions once, at compression time, instead of every run."""

    name = "fold-constants"
    summary = (
        "evaluate nodes whose inputs are all constant (size-guarded; never Q/DQ or random ops)"
    )
    lossless = True
    Options = FoldConstantsOptions

    def call(self, model: ir.Model) -> SqueezeResult:
        names = all_value_names(model)
        nodes_before = count_nodes(model)
        stats = {"values_folded": 0, "skipped_too_large": 0}
        self._candidates: list[ir.Node] = []
        self._constants: dict[str, np.ndarray] = {}
        self._large: list[tuple[ir.Value, ir.Value, list]] = []
        self._shared: dict[tuple, ir.Value] = {}
        for scope in list(scopes(model)):
            _cast_like_to_cast(scope)
            self._fold_scope(model, scope, names, stats)
        # Large results are kept only if, model-wide, the constants they were computed from
        # die with them (one LSTM weight read by both If branches dies only when both fold).
        growth = sum(v.const_value.nbytes for v in self._shared.values())
        if (
            growth
            and growth - _bytes_freed(self._candidates, self._constants)
            > self.options.max_growth_bytes
        ):
            for out, _, sites in self._large:
                for user, index in sites:
                    user.replace_input_with(index, out)
            for value in self._shared.values():
                model.graph.initializers.pop(value.name, None)
            stats["values_folded"] -= len(self._large)
            stats["skipped_too_large"] += len(self._large)
        if self._candidates:
            RemoveUnusedNodesPass()(model)
            remove_unused_subgraph_initializers(model)
        stats["nodes_removed"] = nodes_before - count_nodes(model)
        return SqueezeResult(model, modified=bool(stats["values_folded"]), stats=stats)

    def _fold_scope(self, model: ir.Model, scope: GraphLike, names: set[str], stats: dict) -> None:
        constants: dict[str, np.ndarray] = {}
        produced: set[str] = set()
        candidates: list[ir.Node] = []
        for node in scope:
            if not self._foldable(node):
                continue
            inputs_ok = True
            for value in node.inputs:
                if value is None or value.name in produced or value.name in constants:
                    continue
                array = constant_array(value) if is_constant(value) else None
                if array is None:
                    inputs_ok = False
                    break
                constants[value.name] = array
            if not inputs_ok or self._too_big(node, constants):
                continue
            candidates.append(node)
            produced.update(o.name for o in node.outputs if o.name)
        if not candidates:
            return
        values = evaluate_nodes(candidates, constants, model.opset_imports, model.ir_version or 8)
        known = {**constants, **values}
        # Consumers first: a value only read by nodes that fold away is never materialised.
        removable: set[ir.Node] = set()
        large: list[tuple[ir.Value, ir.Value, list]] = []
        for node in reversed(candidates):
            in_bytes = sum(
                known[v.name].nbytes for v in node.inputs if v is not None and v.name in known
            )
            for out in node.outputs:
                live = out.is_graph_output() or any(u.node not in removable for u in out.uses())
                if not live:
                    continue
                array = values.get(out.name)
                if array is None or out.is_graph_output() or array.dtype.kind in "OUSV":
                    continue  # unknown, a graph output, or strings/opaque: stays computed
                if self._grows(array, in_bytes, out):
                    stats["skipped_too_large"] += 1
                    continue
                replacement = self._materialize(model, scope, array, out, node, names)
                sites = [(u.node, u.idx) for u in out.uses()]
                out.replace_all_uses_with(replacement)
                stats["values_folded"] += 1
                if array.nbytes > TINY_BYTES:
                    large.append((out, replacement, sites))
            if all(
                not o.is_graph_output() and all(u.node in removable for u in o.uses())
                for o in node.outputs
            ):
                removable.add(node)
        self._candidates.extend(candidates)
        self._constants.update(constants)
        self._large.extend(large)

    def _materialize(
        self,
        model: ir.Model,
        scope: GraphLike,
        array: np.ndarray,
        out: ir.Value,
        node: ir.Node,
        names: set[str],
    ) -> ir.Value:
        """A constant for ``array``. Large ones from graph scopes go to the main graph, once per
        content: the same weight rearranged in both If branches is stored once."""
        shareable = (
            array.nbytes > TINY_BYTES
            and in_main_tree(model, scope)
            and (model.ir_version or 0) >= 4
        )
        if not shareable:
            return add_constant(model, scope, array, unique_name(names, out.name or "folded"), node)
        key = (
            array.dtype.str,
            array.shape,
            hashlib.blake2b(np.ascontiguousarray(array).tobytes(), digest_size=32).digest(),
        )
        if key not in self._shared:
            self._shared[key] = add_constant(
                model, model.graph, array, unique_name(names, out.name or "folded"), node
            )
        return self._shared[key]

    def _grows(self, array: np.ndarray, in_bytes: int, out: ir.Value) -> bool:
        """Whether materialising ``array`` would grow the file: more bytes than the constant
        inputs and the node it replaces (a ConstantOfShape's zeros), unless it is a small
        integer tensor a consumer reads as a shape, axes or indices, which other passes and
        onnxruntime's shape inference need constant; past ``max_growth_bytes`` in any case
        when the user raised it."""
        growth = array.nbytes - in_bytes - NODE_BYTES
        if growth <= 0:
            return False
        if array.dtype.kind in "iu" and array.nbytes <= TINY_BYTES:
            return False
        allowed = self.options.max_growth_bytes
        return allowed == DEFAULT_GROWTH or array.nbytes > max(allowed, in_bytes)

    @staticmethod
    def _foldable(node: ir.Node) -> bool:
        if (
            node.domain not in FOLDABLE_DOMAINS
            or node.op_type in NEVER_FOLD
            or node.op_type == "Constant"
        ):
            return False
        if not node.outputs:
            return False
        return not any(
            attr.is_ref() or attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
            for attr in node.attributes.values()
        )

    def _too_big(self, node: ir.Node, constants: dict[str, np.ndarray]) -> bool:
        """Would evaluating ``node`` allocate more than ``max_eval_elements``?"""
        limit = self.options.max_eval_elements

        def arr(i: int) -> np.ndarray | None:
            value = node.inputs[i] if i < len(node.inputs) else None
            return None if value is None else constants.get(value.name)

        if sum(a.size for a in (arr(i) for i in range(len(node.inputs))) if a is not None) > limit:
            return True
        try:
            if node.op_type == "ConstantOfShape" and arr(0) is not None:
                return math.prod(int(d) for d in arr(0)) > limit
            if node.op_type == "Expand" and arr(0) is not None and arr(1) is not None:
                return (
                    math.prod(np.broadcast_shapes(arr(0).shape, tuple(int(d) for d in arr(1))))
                    > limit
                )
            if node.op_type == "Tile" and arr(0) is not None and arr(1) is not None:
                return arr(0).size * math.prod(int(r) for r in arr(1)) > limit
            if node.op_type == "Range" and all(arr(i) is not None for i in range(3)):
                start, stop, step = (float(arr(i)) for i in range(3))
                return step == 0 or math.ceil((stop - start) / step) > limit
        except (ValueError, TypeError, OverflowError):
            return True  # malformed: let the runtime complain, not us
        return False


def _cast_like_to_cast(scope: GraphLike) -> None:
    """CastLike(constant, runtime value of known type) -> Cast(constant, to=that type)."""
    for node in list(scope):
        if node.op_type != "CastLike" or node.domain not in ("", "ai.onnx"):
            continue
        x, like = (node.inputs + (None, None))[:2]
        if x is None or like is None or not is_constant(x) or is_constant(like):
            continue
        if like.dtype is None or node.outputs[0].is_graph_output():
            continue
        cast = ir.node("Cast", inputs=[x], attributes={"to": like.dtype.value})
        cast.outputs[0].dtype = like.dtype
        cast.outputs[0].shape = node.outputs[0].shape
        scope.insert_before(node, cast)
        node.outputs[0].replace_all_uses_with(cast.outputs[0])
        cast.outputs[0].name = node.outputs[0].name
        scope.remove(node, safe=True)


def _bytes_freed(candidates: list[ir.Node], constants: dict[str, np.ndarray]) -> int:
    """Bytes of constants that nothing reads any more once dead folded nodes are removed."""
    dead: set[ir.Node] = set()
    for node in reversed(candidates):
        if all(
            not o.is_graph_output() and all(u.node in dead for u in o.uses()) for o in node.outputs
        ):
            dead.add(node)
    freed = 0
    seen: set[str] = set()
    for node in dead:
        for value in node.inputs:
            if value is None or value.name not in constants or value.name in seen:
                continue
            seen.add(value.name)
            if not value.is_graph_output() and all(u.node in dead for u in value.uses()):
                freed += constants[value.name].nbytes
    return freed
