"""prune-channels: remove whole channels, so that every layer on their path gets smaller.

The channel dependency graph (``prune.channels``) says which channels go together (a
residual stage's convolutions lose channel c together, a Concat's consumer loses the rows at
the right offsets) and which may not go (graph outputs, channel-mixing reshapes...). Within
each cluster of tied producers, the ``ratio`` share of its free channels with the least
importance goes (``prune.refit.row_energy``: what the channel carries into its consumers on
the calibration data, or its weights' magnitude without data); the kept count is rounded up
to a ``multiple`` (CPU kernels work in blocks of 8 or 16 channels).

Removing a channel removes its producers' filters (and bias), the matching BatchNorm and
per-channel constants, depthwise filters (the group shrinks with them), Split sizes, Slice
bounds and shape entries, and the consumers' input rows. With calibration Gram matrices
(``grams``, gathered with a ones column), each consumer's kept rows are refitted by least
squares to reproduce its original output, bias included (``prune.refit.refit_rows``): that
is what keeps accuracy without fine-tuning.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from onnxsqueeze.calib.gram import cross_grams, gram_key
from onnxsqueeze.core.flops import total_macs
from onnxsqueeze.core.graphs import (
    add_constant,
    all_value_names,
    constant_array,
    drop_if_unused,
    name_nodes,
    unique_name,
    weight_as_kn,
    weight_from_kn,
)
from onnxsqueeze.core.pass_base import SqueezePass, SqueezeResult
from onnxsqueeze.core.shapes import inferred_shapes
from onnxsqueeze.prune.channel_graph import ChannelGraph, Cluster
from onnxsqueeze.prune.channels import analyze
from onnxsqueeze.prune.refit import DAMPING, refit_cross, row_energy
from onnxsqueeze.prune.surgery import Surgery

#: The sequential refit measures each layer on at most this many calibration samples.
SEQUENTIAL_SAMPLES = 32


@dataclasses.dataclass(frozen=True)
class PruneChannelsOptions:
    #: Share of each cluster's free channels removed.
    ratio: float = dataclasses.field(default=0.5, metadata={"range": (0, 1)})
    #: Kept channels rounded up to a multiple of this (clusters of 2x as many channels).
    multiple: int = 8
    #: Least-squares refit of the consumers on the calibration data (when grams are given).
    refit: bool = True
    damping: float = DAMPING
    #: Clusters with fewer channels stay whole (a group of attention heads counts heads).
    min_channels: int = 8
    #: Attention heads: Reshapes that split channels into heads are followed (a head goes
    #: whole: its query, key and value channels and the output projection's rows).
    heads: bool = True
    exclude_nodes: tuple[str, ...] = ()
    #: cluster name (its first producer) -> ratio, set by the prune stage; overrides ratio,
    #: the clusters not named stay whole.
    ratios: Mapping[str, float] | None = dataclasses.field(
        default=None, compare=False, metadata={"hidden": True}
    )
    #: consumer Gram key -> [X 1]^T [X 1] on calibration data (calib.gram, ones=True).
    grams: Mapping[str, np.ndarray] | None = dataclasses.field(
        default=None, compare=False, metadata={"hidden": True}
    )
    #: calibration samples: with grams, a second refit of every consumer on the inputs that
    #: really reach it once everything upstream is pruned and refitted (sequential refit).
    feeds: Sequence[Mapping[str, Any]] | None = dataclasses.field(
        default=None, compare=False, metadata={"hidden": True}
    )


class PruneChannelsPass(SqueezePass):
    """Conv/MatMul/Gemm chains -> the same chains with fewer channels."""

    name = "prune-channels"
    summary = "remove whole channels along their dependency groups (refit on data)"
    lossless = False
    Options = PruneChannelsOptions

    def call(self, model: ir.Model) -> SqueezeResult:
        opts: PruneChannelsOptions = self.options
        if not 0 <= opts.ratio < 1:
            raise ValueError(f"prune-channels.ratio must be in [0, 1), got {opts.ratio}")
        name_nodes(model)
        macs_before = total_macs(model)
        with inferred_shapes(model):
            graph = analyze(model, heads=opts.heads)
        clusters = graph.clusters()
        removed: set[int] = set()
        report = []
        for cluster in clusters:
            count, how = self._removal(graph, cluster)
            if count:
                removed.update(self._weakest(graph, cluster, count))
            report.append(_describe(cluster, count, how))
        if removed:
            original = model.clone() if opts.feeds and opts.refit and opts.grams else None
            grams = _consumer_grams(graph, opts.grams)
            surgery = Surgery(model, graph, removed, grams, refit=opts.refit, damping=opts.damping)
            surgery.run()
            RemoveUnusedNodesPass()(model)  # shape Concats each Reshape now has a copy of
            if original is not None:
                _sequential_refit(original, model, surgery, opts)
        stats: dict[str, Any] = {
            "pruned": [c["name"] for c in report if c["removed"]],
            "clusters": report,
            "channels_removed": sum(c["removed"] for c in report),
            "macs_before": macs_before,
        }
        if removed:
            stats["macs_after"] = total_macs(model)
        return SqueezeResult(model, modified=bool(removed), stats=stats)

    def _removal(self, graph: ChannelGraph, cluster: Cluster) -> tuple[int, str]:
        """How many of the cluster's free channels go, and why (none)."""
        opts: PruneChannelsOptions = self.options
        if any(p in opts.exclude_nodes for p in cluster.producers):
            return 0, "excluded"
        ratio = opts.ratios.get(cluster.name, 0.0) if opts.ratios is not None else opts.ratio
        if cluster.channels < opts.min_channels:
            return 0, f"fewer than {opts.min_channels} channels"
        if not cluster.free:
            return 0, "no channel may go"
        if ratio <= 0:
            return 0, "kept whole"
        count = math.floor(ratio * len(cluster.free))
        m = opts.multiple
        if m > 1 and cluster.channels >= 2 * m:
            kept = math.ceil((cluster.channels - count) / m) * m
            count = cluster.channels - kept
        count = max(0, min(count, len(cluster.free) - 1, cluster.channels - 1))
        return count, "pruned" if count else "ratio rounds to none"

    def _weakest(self, graph: ChannelGraph, cluster: Cluster, count: int) -> set[int]:
        """The ``count`` free channels of ``cluster`` its consumers miss least."""
        scores = _scores(graph, cluster, self.options.grams)
        free = sorted(cluster.free, key=lambda r: (scores.get(r, 0.0), r))
        return set(free[:count])


def _scores(graph: ChannelGraph, cluster: Cluster, grams: Mapping | None) -> dict[int, float]:
    """Each channel root's share of its consumers' outputs (data-aware where every consumer
    has a Gram matrix), plus its producers' share of weight magnitude without data."""
    roots = set(cluster.free)
    scores: dict[int, float] = dict.fromkeys(roots, 0.0)
    consumers = []
    for name, value in graph.consumers.items():
        ids = graph.roots(graph.tracks[value].ids)
        if roots.intersection(ids.tolist()):
            consumers.append((graph.nodes[name], ids))
    data = bool(consumers) and all(
        (grams or {}).get(gram_key(node) or "") is not None for node, _ in consumers
    )
    for node, ids in consumers:
        w = weight_as_kn(node, constant_array(node.inputs[1]))
        gram = (grams or {}).get(gram_key(node) or "") if data else None
        energy = row_energy(w, gram)
        per_channel = energy.reshape(len(ids), -1).sum(axis=1)
        total = per_channel.sum() or 1.0
        for root, e in zip(ids.tolist(), per_channel, strict=True):
            if root in scores:
                scores[root] += float(e / total)
    if data:
        return scores
    for name in cluster.producers:
        node = graph.nodes[name]
        w = weight_as_kn(node, constant_array(node.inputs[1]))
        energy = np.einsum("kn,kn->n", w, w)
        total = energy.sum() or 1.0
        ids = graph.roots(graph.tracks[graph.producers[name]].ids)
        for root, e in zip(ids.tolist(), energy, strict=True):
            if root in scores:
                scores[root] += float(e / total)
    return scores


def _describe(cluster: Cluster, count: int, how: str) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": cluster.name,
        "layers": len(cluster.producers),
        "channels": cluster.channels,
        "free": len(cluster.free),
        "removed": count,
        "decision": how,
    }
    if cluster.reasons:
        entry["blocked"] = cluster.reasons[:3]
    return entry


def _consumer_grams(graph: ChannelGraph, grams: Mapping | None) -> dict[str, np.ndarray]:
    """Consumer node name -> its input's Gram matrix (calib.gram's key for it)."""
    found = {}
    for name in graph.consumers:
        gram = (grams or {}).get(gram_key(graph.nodes[name]) or "")
        if gram is not None:
            found[name] = gram
    return found


def _sequential_refit(
    original: ir.Model, model: ir.Model, surgery: Surgery, opts: PruneChannelsOptions
) -> None:
    """Refit the refitted consumers again, in graph order, each from the inputs that really
    reach it once everything upstream is pruned and refitted, to the original's output
    (ThiNet's and He et al.'s sequential reconstruction): the first refit assumed its kept
    inputs unchanged, and on a deep CNN the differences add up (PP-OCR cls, a quarter of its
    channels: output error 0.23 -> see tools/bench_prune_channels.py). One layer at a time:
    refitting all at once from one measurement made each right for inputs that its
    upstream refits then changed (error 0.86). Two runs of the calibration samples per layer."""
    before = {n.name: n for n in original.graph}
    feeds = list(opts.feeds or [])[:SEQUENTIAL_SAMPLES]
    order = [n.name for n in model.graph if n.name in surgery.refitted]
    graph = surgery.graph
    for name in order:
        found = cross_grams(original, model, feeds, [name]).get(name)
        if found is None:
            continue
        gram, xcross = found
        node = next(n for n in model.graph if n.name == name)
        old = before[name]
        bias_site = surgery.refitted[name]
        w_old = weight_as_kn(old, constant_array(old.inputs[1]))
        outputs = surgery.keep.get(graph.producers.get(name, ""))
        if outputs is not None:
            w_old = w_old[:, outputs]
        inputs = surgery.keep[graph.consumers[name]]
        prior = w_old[np.repeat(inputs, w_old.shape[0] // len(inputs))]
        current = constant_array(node.inputs[1])
        new, delta = refit_cross(w_old, gram, xcross, prior, with_bias=bias_site is not None,
                                 damping=opts.damping)  # fmt: skip
        if new.shape != weight_as_kn(node, current).shape:
            continue
        if bias_site is not None:
            target, index, scale = bias_site
            bias_old = _original_bias(before, target, index, w_old.shape[1], outputs)
            if bias_old is None:
                continue
            bias = (bias_old + delta * scale).astype(current.dtype)
            _replace_constant(model, target, index, bias)
        weight = weight_from_kn(node, new.astype(current.dtype), current.shape)
        _replace_constant(model, node, 1, weight)


def _original_bias(before, target, index, n, outputs) -> np.ndarray | None:
    """The bias the consumer's correction is added to, as it was before pruning (its own
    bias, zero when it had none, or the Add's constant after a MatMul), its kept outputs."""
    source = before.get(target.name) if target.name else None
    if source is None:
        return None
    value = source.inputs[index] if len(source.inputs) > index else None
    array = constant_array(value) if value is not None else None
    if array is None:
        array = np.zeros(n if outputs is None else len(outputs), np.float32)
    array = np.asarray(array, np.float64).reshape(-1)
    if array.size == 1:
        array = np.full(len(outputs) if outputs is not None else n, array[0])
    if outputs is not None and array.size == len(outputs):
        array = array[outputs]
    return array if array.size == n else None


def _replace_constant(model: ir.Model, node: ir.Node, index: int, array: np.ndarray) -> None:
    old = node.inputs[index]
    new = add_constant(model, model.graph, np.ascontiguousarray(array),
                       unique_name(all_value_names(model), f"{old.name}_refit"), node)  # fmt: skip
    node.replace_input_with(index, new)
    drop_if_unused(model.graph, old)
