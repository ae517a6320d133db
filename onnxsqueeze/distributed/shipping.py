"""Models and data sources as a worker receives them.

A model travels as its serialized bytes, once per piece of work, through Ray's object
store (shared memory on one machine): a worker rebuilds the same onnx_ir model and runs it
through the same code as this process, so its numbers are the same. Models whose weights
live in external files or exceed protobuf's 2 GB stay here (``shippable``). Data travels
as a path, or a part of one, that the workers read themselves; only in-memory samples go
through the object store.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from onnxsqueeze.core.io import has_external_tensors, initializer_bytes
from onnxsqueeze.run.feeds import Subset
from onnxsqueeze.run.remote import is_uri

#: Larger models are run where they are (protobuf's limit is 2 GB, with room for the graph).
MAX_SHIPPED_BYTES = 1_500_000_000


def shippable(model: ir.Model) -> bool:
    return not has_external_tensors(model) and initializer_bytes(model) < MAX_SHIPPED_BYTES


def pack(model: ir.Model) -> bytes:
    return ir.serde.serialize_model(model).SerializeToString()


def unpack(blob: bytes) -> ir.Model:
    return ir.serde.deserialize_model(onnx.ModelProto.FromString(blob))


def absolute(source: Any) -> Any:
    """``source`` with its path made absolute: a worker's current folder is not ours."""
    if isinstance(source, Subset):
        return Subset(absolute(source.source), source.indices, source.keep)
    if isinstance(source, (str, os.PathLike)) and not is_uri(source):
        return Path(source).resolve()
    return source
