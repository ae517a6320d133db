"""The channel dependency graph's data: channel ids along values (``Track``), what removing
them means per node (``Edit``), their ties (union-find) and blocks (``ChannelGraph``), and the
clusters of producers a pruning ratio applies to (``Cluster``). ``prune.channels`` builds it
from a model; ``prune.surgery`` applies it."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np
import onnx_ir as ir


@dataclasses.dataclass
class Track:
    """The channel ids along one axis of a value."""

    value: ir.Value
    axis: int
    rank: int
    ids: np.ndarray


@dataclasses.dataclass
class Edit:
    """What removing ids means for one node. ``kind``: "out" (a layer's output channels:
    weight and bias), "in" (a layer's input rows), "param" (a constant input sliced on
    ``axis``), "depthwise" (filters, bias, group), "split"/"slice" (sizes, bounds), "shape"
    (entry ``axis`` of constant input ``index`` becomes the kept count). ``value``: the
    tracked value whose kept channels decide."""

    kind: str
    node: ir.Node
    value: str
    index: int = 0
    axis: int = 0
    #: "shape": the entry is the kept count divided by this (heads of ``per`` channels)
    per: int = 1
    #: "shape" of a Concat's piece: the Reshape that reads it (it gets its own copy)
    reader: ir.Node | None = None


class ChannelGraph:
    """Channel ids, their ties (union-find) and what blocks them, for one model's main graph."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.tracks: dict[str, Track] = {}
        self.edits: list[Edit] = []
        #: producer node name -> its output value's name
        self.producers: dict[str, str] = {}
        #: consumer node name -> the tracked input value's name
        self.consumers: dict[str, str] = {}
        self.nodes: dict[str, ir.Node] = {}
        self._blocked: dict[int, str] = {}

    # ------------------------------------------------------------ union-find
    def new(self, count: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + count))
        return np.arange(start, start + count)

    def find(self, i: int) -> int:
        parent = self.parent
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:
            parent[i], i = root, parent[i]
        return root

    def tie(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist(), strict=True):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[ry] = rx

    def block(self, ids: Iterable[int], reason: str) -> None:
        for i in np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).tolist():
            self._blocked.setdefault(i, reason)

    def blocked(self) -> dict[int, str]:
        """Root id -> the first reason one of its ids was blocked."""
        roots: dict[int, str] = {}
        for i, reason in self._blocked.items():
            roots.setdefault(self.find(i), reason)
        return roots

    def roots(self, ids: np.ndarray) -> np.ndarray:
        return np.array([self.find(i) for i in ids.tolist()], dtype=np.int64)

    # ------------------------------------------------------------ groups
    def clusters(self) -> list[Cluster]:
        """Producers whose channels are tied, with the channel roots they share: the unit of
        a pruning ratio (a residual stage's convolutions are one cluster)."""
        blocked = self.blocked()
        owner: dict[int, str] = {}
        links: dict[str, str] = {name: name for name in self.producers}

        def head(name: str) -> str:
            while links[name] != name:
                name = links[name]
            return name

        for name, value in self.producers.items():
            for root in set(self.roots(self.tracks[value].ids).tolist()):
                if root in owner:
                    a, b = head(owner[root]), head(name)
                    if a != b:
                        links[b] = a
                else:
                    owner[root] = name
        members: dict[str, list[str]] = {}
        for name in self.producers:
            members.setdefault(head(name), []).append(name)
        clusters = []
        for first, names in members.items():
            roots: list[int] = []
            for name in names:
                roots.extend(self.roots(self.tracks[self.producers[name]].ids).tolist())
            unique = sorted(set(roots))
            reasons = sorted({blocked[r] for r in unique if r in blocked})
            free = [r for r in unique if r not in blocked]
            clusters.append(Cluster(first, names, free, len(unique), reasons))
        return clusters


@dataclasses.dataclass
class Cluster:
    name: str
    producers: list[str]
    #: channel roots that may be removed
    free: list[int]
    #: channels in all (free and blocked)
    channels: int
    #: why the others may not
    reasons: list[str]
