"""Models and data sources as a worker receives them.

A model travels as its graph without weights plus one entry per weight. A weight that
already lies in a file (the model's external data, or the run's spill file) travels as
where it lies, a ``FileSlice``: the worker maps it from there (the page cache is shared by
the processes of one machine) and nothing of it goes through the driver or the object
store, so a model of any size ships in a few kilobytes. The model's files must then be
where the driver sees them: on one machine they are; on a cluster of several machines the
model goes in a folder every node mounts at the same path (as the data does), and a worker
that does not find it says so. The run's spill file is local to the driver: on such a
cluster its weights travel as the others do. Every other weight goes to Ray's object store
once (``Shipper`` keeps each tensor's reference, so the candidates of one search, which
share most weights, do not send them again), where workers read it in place.

The worker rebuilds what the driver would give onnxruntime: the same graph and arrays for a
model the driver's sessions take in parts, else the same onnx_ir model (its external
weights still external), so its session is made the way the driver makes it and its
numbers are the driver's. Data travels as a path, or a part of one, that the workers read
themselves; only in-memory samples go through the object store.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnxsqueeze.core.errors import SqueezeError
from onnxsqueeze.core.io import PLAIN_DTYPES, external_path, weightless
from onnxsqueeze.run.feeds import Subset
from onnxsqueeze.run.remote import is_uri
from onnxsqueeze.run.session import Session, takes_parts

#: Weights that stay inside the shipped graph (small ones, subgraphs', exotic types) may
#: not exceed this: protobuf's limit is 2 GB, with room for the graph.
MAX_SHIPPED_BYTES = 1_500_000_000


@dataclasses.dataclass(frozen=True)
class FileSlice:
    """A weight's bytes where they lie: ``length`` bytes at ``offset`` of ``path``.
    ``external``: the driver holds it as an external tensor (not a spilled one)."""

    path: str
    offset: int
    length: int
    dtype: int
    shape: tuple[int, ...]
    external: bool

    def array(self) -> np.ndarray:
        """The weight, mapped read-only from its file."""
        self._check()
        dtype = ir.DataType(self.dtype).numpy()
        return np.memmap(self.path, dtype, "r", self.offset, self.shape)

    def tensor(self, name: str) -> ir.TensorProtocol:
        """The weight as the driver holds it: external, or an array (a spilled one)."""
        if not self.external:
            return ir.Tensor(self.array(), name=name)
        self._check()
        path = Path(self.path)
        return ir.ExternalTensor(
            path.name, self.offset, self.length, ir.DataType(self.dtype),
            shape=ir.Shape(self.shape), name=name, base_dir=path.parent,
        )  # fmt: skip

    def _check(self) -> None:
        """The file is here, holding the slice: else one line saying where it must be."""
        try:
            size = os.path.getsize(self.path)
        except OSError:
            size = -1
        if size < self.offset + self.length:
            raise SqueezeError(
                f"{self.path}: not found whole on the Ray worker's machine "
                f"({socket.gethostname()}); on a cluster of several machines the model "
                "must be in a folder every node mounts at the same path"
            )


@dataclasses.dataclass
class ShippedModel:
    """A model as it travels: ``weights`` maps each detached weight to its object
    reference or its FileSlice; ``parts`` says the driver's session takes it in parts."""

    graph: bytes
    weights: dict[str, Any]
    parts: bool


def shippable(model: ir.Model) -> bool:
    """Whether every weight can travel: subgraphs' weights and exotic element types stay
    in the graph, so they may not lie in external files nor pass protobuf's limit."""
    inline = 0
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if tensor is None:
                continue
            detachable = graph is model.graph and tensor.dtype in PLAIN_DTYPES and value.name
            if isinstance(tensor, ir.ExternalTensor) and not detachable:
                return False
            if not detachable:
                inline += tensor.nbytes
    return inline < MAX_SHIPPED_BYTES


class Shipper:
    """Ships the models of one piece of work through ``ray``'s object store.

    ``local``: every worker is on this machine, so spilled weights travel as FileSlices.
    ``count(key, n)`` tallies what went how (the pool's report)."""

    def __init__(self, ray: Any, local: bool, count: Any = None) -> None:
        self.ray = ray
        self.local = local
        self.count = count or (lambda key, n=1: None)
        self._stored: dict[int, tuple[Any, Any]] = {}  # id(tensor) -> (tensor, its ref)

    def __call__(self, model: ir.Model) -> ShippedModel:
        with weightless(model, external=True) as detached:
            graph = ir.serde.serialize_model(model).SerializeToString()
        weights: dict[str, Any] = {}
        for name, tensor in detached.items():
            where = self._slice(tensor)
            if where is not None:
                weights[name] = where
                self.count("weights_read_in_place")
                continue
            if id(tensor) not in self._stored:  # kept with its tensor: the id stays its own
                ref = self.ray.put(np.ascontiguousarray(tensor.numpy()))
                self._stored[id(tensor)] = (tensor, ref)
            weights[name] = self._stored[id(tensor)][1]
        return ShippedModel(graph, weights, takes_parts(model))

    def _slice(self, tensor: ir.TensorProtocol) -> FileSlice | None:
        shape = tuple(int(d) for d in tensor.shape)
        if isinstance(tensor, ir.ExternalTensor):
            path = external_path(tensor)
            length = tensor.length if tensor.length is not None else tensor.nbytes
            return FileSlice(str(path), tensor.offset or 0, length, tensor.dtype, shape, True)
        spilled = getattr(tensor, "file_slice", None)
        if spilled is None or not self.local:
            return None
        path, offset, length = spilled
        return FileSlice(str(path), offset, length, tensor.dtype, shape, False)


def arrays(shipped: ShippedModel, ray: Any) -> dict[str, np.ndarray]:
    """The shipped weights as arrays: mapped from their files, or read in the object store."""
    got = _objects(shipped, ray)
    return {
        name: w.array() if isinstance(w, FileSlice) else got[name]
        for name, w in shipped.weights.items()
    }


def _objects(shipped: ShippedModel, ray: Any) -> dict[str, np.ndarray]:
    refs = {k: v for k, v in shipped.weights.items() if not isinstance(v, FileSlice)}
    return dict(zip(refs, ray.get(list(refs.values())), strict=True))


def landed(shipped: ShippedModel, ray: Any) -> ir.Model:
    """The onnx_ir model the driver shipped: the same tensors of the same kinds."""
    model = ir.serde.deserialize_model(onnx.ModelProto.FromString(shipped.graph))
    found = _objects(shipped, ray)
    for name, where in shipped.weights.items():
        value = model.graph.initializers[name]
        if isinstance(where, FileSlice):
            value.const_value = where.tensor(name)
        else:
            value.const_value = ir.Tensor(found[name], name=name)
    return model


def open_session(
    shipped: ShippedModel, ray: Any, providers: Sequence[str], optimize: bool
) -> Session:
    """A session on the shipped model, made as the driver makes one on its model."""
    if shipped.parts:
        return Session.from_parts(shipped.graph, arrays(shipped, ray), providers, optimize=optimize)
    return Session(landed(shipped, ray), providers, optimize=optimize)


def absolute(source: Any) -> Any:
    """``source`` with its path made absolute: a worker's current folder is not ours."""
    if isinstance(source, Subset):
        return Subset(absolute(source.source), source.indices, source.keep)
    if isinstance(source, (str, os.PathLike)) and not is_uri(source):
        return Path(source).resolve()
    return source
