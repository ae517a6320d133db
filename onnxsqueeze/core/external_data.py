"""External data of a model being loaded: where it may be read from and whether it is whole.

onnx's rule: a location is a relative path inside the model's folder. Anything else (an
absolute path, a ``..``, a symlink leaving the folder) is refused before the file is looked at;
an in-memory model has no folder, so its external tensors need one named. A tensor's declared
length must be what its shape needs, and the file must hold it: a short read would be written
out as a model that ``onnx.load`` rejects.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx

from onnxsqueeze.core.errors import ModelLoadError

#: Bytes per element of the fixed-size tensor types (strings have no fixed size).
_FIXED_ITEMSIZE = {
    code: np.dtype(onnx.helper.tensor_dtype_to_np_dtype(code)).itemsize
    for code in onnx.TensorProto.DataType.values()
    if code not in (onnx.TensorProto.UNDEFINED, onnx.TensorProto.STRING)
}
#: Types two elements share a byte of.
_PACKED_4BIT = {
    getattr(onnx.TensorProto, name)
    for name in ("INT4", "UINT4", "FLOAT4E2M1")
    if hasattr(onnx.TensorProto, name)
}


def iter_tensor_protos(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from iter_tensor_protos(attr.g)
            for sub in attr.graphs:
                yield from iter_tensor_protos(sub)


def refuse_external_data(proto: onnx.ModelProto, label: str) -> None:
    """An in-memory model has no folder its external data could be read from safely (a
    location such as ../../etc/passwd would be read relative to the current directory)."""
    for tensor in iter_tensor_protos(proto.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            raise ModelLoadError(
                f"{label}: tensor '{tensor.name}' keeps its data in an external file, and an "
                "in-memory model has no folder to read it from: pass base_dir= (the model's "
                "folder), or the model's path"
            )


def check_external_data(proto: onnx.ModelProto, label: str, base_dir: Path) -> None:
    """Fail early, naming the file, when external data is missing or too short, or lies
    outside the model's folder (an absolute path, a ``..`` or a symlink leaving it: onnx's
    own rule), before anything about such a file (even its size) is looked at."""
    folder = base_dir.resolve()
    for tensor in iter_tensor_protos(proto.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        data_path = base_dir / location
        inside = data_path.resolve()
        if Path(location).is_absolute() or not inside.is_relative_to(folder) or inside == folder:
            raise ModelLoadError(
                f"{label}: external data location '{location}' of tensor '{tensor.name}' is "
                "outside the model's folder; refusing to read it"
            )
        if not location or not data_path.exists():
            raise ModelLoadError(
                f"{label}: external data file '{location}' for tensor '{tensor.name}' not found"
            )
        if not data_path.is_file():
            raise ModelLoadError(
                f"{label}: external data '{location}' of tensor '{tensor.name}' is not a "
                "regular file"
            )
        offset, length = _external_extent(tensor, info, label)
        end = offset + length
        if data_path.stat().st_size < end:
            raise ModelLoadError(
                f"{label}: external data file '{location}' is truncated "
                f"(tensor '{tensor.name}' needs {end} bytes, file has {data_path.stat().st_size})"
            )


def _external_extent(tensor: onnx.TensorProto, info: dict[str, str], label: str) -> tuple[int, int]:
    """(offset, length) of an external tensor's bytes, checked against its shape: a declared
    length other than the shape needs would be read short (onnx.load rejects the result)."""
    try:
        offset = int(info.get("offset", 0) or 0)
        declared = int(info["length"]) if info.get("length") else None
    except ValueError:
        raise ModelLoadError(
            f"{label}: tensor '{tensor.name}': external data offset/length are not numbers"
        ) from None
    itemsize = _FIXED_ITEMSIZE.get(tensor.data_type)
    needed = None
    if itemsize is not None and all(d >= 0 for d in tensor.dims):
        count = math.prod(tensor.dims)
        needed = (count + 1) // 2 if tensor.data_type in _PACKED_4BIT else count * itemsize
    if offset < 0 or (declared is not None and declared < 0):
        raise ModelLoadError(
            f"{label}: tensor '{tensor.name}': negative external data offset/length"
        )
    if declared is not None and needed is not None and declared != needed:
        raise ModelLoadError(
            f"{label}: tensor '{tensor.name}' declares {declared} bytes of external data, "
            f"its shape {list(tensor.dims)} needs {needed}"
        )
    return offset, declared if declared is not None else (needed or 0)


def has_external(proto: onnx.ModelProto) -> bool:
    return any(
        t.data_location == onnx.TensorProto.EXTERNAL for t in iter_tensor_protos(proto.graph)
    )
