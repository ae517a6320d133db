"""Model I/O: load from any source with one-line errors, save atomically, release weights.

Weights are never pulled into RAM on load: onnx_ir memory-maps external data, so a model
larger than 2 GB loads in milliseconds. Saving goes through a temporary directory beside
the destination and is renamed into place, so a failed save never leaves a partial file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.numpy_helper
import onnx_ir as ir

from onnxsqueeze.core.errors import (
    InvalidModelError,
    ModelLoadError,
    ModelSaveError,
    UnsupportedModelError,
    first_line,
)
from onnxsqueeze.core.external_data import (
    check_external_data,
    has_external,
    refuse_external_data,
)
from onnxsqueeze.core.legalize import legalize
from onnxsqueeze.core.proto_tidy import proto_graphs, unname_attribute_tensors
from onnxsqueeze.core.scratch import remove_stale, scratch_file

logger = logging.getLogger(__name__)

#: Above this many bytes of weights a model is saved with external data (protobuf's 2 GB cap).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
#: Tensors at least this large go to the external data file when external data is used.
EXTERNAL_TENSOR_MIN_BYTES = 1024

ModelSource = Any  # str | os.PathLike | bytes | onnx.ModelProto | ir.Model | gs.Graph


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A model in onnx_ir form plus where it came from (to hand back the same kind)."""

    model: ir.Model
    kind: str  # "path" | "bytes" | "proto" | "ir" | "gs"
    path: Path | None = None
    label: str = "<model>"
    #: The model as given, when ``model`` had to be converted to pass onnx.checker (see
    #: onnxsqueeze.core.legalize): verification compares against it. ``note`` says what was done.
    original: ir.Model | None = None
    note: str | None = None
    #: Whether the input file carried shape hints (value_info) for its intermediate values:
    #: an output written for it does likewise, or a model passed through grows by them
    value_info: bool = True

    def protected_paths(self) -> set[Path]:
        """Files that belong to the input and must not be overwritten by accident."""
        if self.path is None:
            return set()
        return {self.path.resolve(), *external_data_files(self.model)}


# ---------------------------------------------------------------------------- load


def load_model(
    source: ModelSource, *, validate: bool = True, base_dir: str | None = None
) -> LoadedModel:
    """Load a model from a path, bytes, ModelProto, onnx_ir.Model or onnx-graphsurgeon Graph."""
    if isinstance(source, ir.Model):
        return LoadedModel(source, "ir", label="<onnx_ir.Model>")
    if isinstance(source, (str, os.PathLike)):
        return _load_path(Path(source), validate=validate)
    if isinstance(source, (bytes, bytearray, memoryview)):
        label = "<bytes>"
        try:
            proto = onnx.load_from_string(bytes(source))
        except Exception as exc:  # protobuf raises DecodeError or RuntimeWarning-ish errors
            raise ModelLoadError(f"{label}: not a valid ONNX model ({first_line(exc)})") from exc
        return LoadedModel(
            kind="bytes", label=label, **_from_proto(proto, label, validate, base_dir)
        )
    if isinstance(source, onnx.ModelProto):
        label = "<ModelProto>"
        return LoadedModel(
            kind="proto", label=label, **_from_proto(source, label, validate, base_dir)
        )
    if type(source).__module__.startswith("onnx_graphsurgeon"):
        import onnx_graphsurgeon as gs

        label = "<gs.Graph>"
        proto = gs.export_onnx(source)
        return LoadedModel(kind="gs", label=label, **_from_proto(proto, label, validate, base_dir))
    raise ModelLoadError(
        f"<{type(source).__name__}>: cannot load a model from this type "
        "(expected a path, bytes, onnx.ModelProto, onnx_ir.Model or onnx-graphsurgeon Graph)"
    )


def _load_path(path: Path, *, validate: bool) -> LoadedModel:
    proto = read_model_file(path)
    loaded = _from_proto(proto, str(path), validate, str(path.parent), checker_path=path)
    hints = any(len(g.value_info) for g in proto_graphs(proto.graph))
    return LoadedModel(kind="path", path=path, label=str(path), value_info=hints, **loaded)


def read_model_file(path: Path) -> onnx.ModelProto:
    """The model file's protobuf, its external data left unread; a one-line error for what
    is not one (missing, a folder, a pipe or device, empty, unreadable, not protobuf)."""
    label = str(path)
    if not path.exists():
        raise ModelLoadError(f"{label}: file not found")
    if path.is_dir():
        raise ModelLoadError(f"{label}: is a directory, not an ONNX file")
    if not path.is_file():  # a pipe would block the read, /dev/zero never end it
        raise ModelLoadError(f"{label}: not a regular file (a pipe, socket or device)")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"{label}: empty file, not an ONNX model")
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ModelLoadError(f"{label}: cannot read ({exc.strerror or first_line(exc)})") from exc
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ModelLoadError(
            f"{label}: not a valid ONNX model (cannot parse protobuf: {first_line(exc)})"
        ) from exc


def _from_proto(
    proto: onnx.ModelProto,
    label: str,
    validate: bool,
    base_dir: str | None,
    checker_path: Path | None = None,
) -> dict[str, Any]:
    """LoadedModel's model (and original, note where the model had to be converted)."""
    _check_header(proto, label)
    dense_note = None
    if proto.graph.sparse_initializer:
        proto, dense_note = densify_sparse(proto)
    if base_dir is not None:
        check_external_data(proto, label, Path(base_dir))
    else:
        refuse_external_data(proto, label)
    if validate:
        try:
            _run_checker(proto, label, checker_path)
        except InvalidModelError:
            legal = legalize(proto)  # an op below its opset, as onnxruntime allows
            if legal is None:
                raise
            _run_checker(legal[0], label, None)
            original = _deserialize(proto, label, base_dir)
            model = _deserialize(legal[0], label, base_dir)
            note = "; ".join(n for n in (dense_note, legal[1]) if n)
            return {"model": model, "original": original, "note": note}
    return {"model": _deserialize(proto, label, base_dir), "note": dense_note}


def densify_sparse(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    """A copy of ``proto`` with its sparse initializers stored dense: onnx_ir has no sparse
    tensors (it would drop them, leaving the graph reading nothing), and onnxruntime
    densifies them when it loads the model anyway. The caller's proto is not touched."""
    dense = onnx.ModelProto()
    dense.CopyFrom(proto)
    for sparse in dense.graph.sparse_initializer:
        values = onnx.numpy_helper.to_array(sparse.values).reshape(-1)
        indices = onnx.numpy_helper.to_array(sparse.indices).astype(np.int64)
        shape = tuple(int(d) for d in sparse.dims)
        if indices.ndim == 2:  # one row of coordinates per value
            indices = np.ravel_multi_index(tuple(indices.T), shape)
        array = np.zeros(math.prod(shape), values.dtype)
        array[indices.reshape(-1)] = values
        dense.graph.initializer.append(
            onnx.numpy_helper.from_array(array.reshape(shape), sparse.values.name)
        )
    count = len(dense.graph.sparse_initializer)
    del dense.graph.sparse_initializer[:]
    return dense, f"{count} sparse initializer(s) stored dense (onnxruntime densifies them at load)"


def _deserialize(proto: onnx.ModelProto, label: str, base_dir: str | None) -> ir.Model:
    proto = _without_map_types(proto, label)
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as exc:
        raise InvalidModelError(f"{label}: cannot read the graph ({first_line(exc)})") from exc
    if base_dir is not None:
        ir.external_data.set_base_dir(model.graph, base_dir)
    return model


def _check_header(proto: onnx.ModelProto, label: str) -> None:
    if proto.ir_version <= 0 or not proto.HasField("graph"):
        raise ModelLoadError(f"{label}: not an ONNX model (no ir_version or no graph)")
    if proto.ir_version > onnx.IR_VERSION:
        raise UnsupportedModelError(
            f"{label}: IR version {proto.ir_version} is newer than this onnx install "
            f"supports ({onnx.IR_VERSION}); upgrade the onnx package"
        )
    newest = onnx.defs.onnx_opset_version()
    for opset in proto.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version > newest:
            raise UnsupportedModelError(
                f"{label}: opset {opset.version} is newer than this onnx install supports "
                f"({newest}); upgrade the onnx package"
            )


def _run_checker(proto: onnx.ModelProto, label: str, path: Path | None) -> None:
    try:
        if path is not None:
            onnx.checker.check_model(str(path))
        elif proto.ByteSize() < 2**31 - 1 and not has_external(proto):
            onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        raise InvalidModelError(f"{label}: invalid ONNX graph ({first_line(exc)})") from exc
    except Exception as exc:  # the checker raises plain errors on unreadable protos
        raise InvalidModelError(f"{label}: invalid ONNX model ({first_line(exc)})") from exc


# ---------------------------------------------------------------------------- inspect


def count_nodes(model: ir.Model) -> int:
    """Nodes in every graph and function: cheap enough to call around every pass."""
    total = sum(len(f) for f in model.functions.values())
    return total + sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph))


def serialized_bytes(model: ir.Model) -> int:
    """About the size of the model's files: its graph serialised without the big weights,
    plus those weights' bytes, in memory or external (no copy of them is made)."""
    with weightless(model) as detached:
        proto = serialize(model)
    external = sum(
        v.const_value.nbytes
        for g in model.graphs()
        for v in g.initializers.values()
        if isinstance(v.const_value, ir.ExternalTensor)
    )
    return proto.ByteSize() + sum(a.nbytes for a in detached.values()) + external


def initializer_bytes(model: ir.Model) -> int:
    """Bytes of initializer weights (what decides external data and temp-dir sessions)."""
    return sum(
        v.const_value.nbytes
        for g in model.graphs()
        for v in g.initializers.values()
        if v.const_value is not None and v.const_value.dtype != ir.DataType.STRING
    )


def tensor_nbytes(tensor: ir.TensorProtocol) -> int:
    """Bytes of a tensor without materialising it (string tensors: sum of lengths)."""
    if tensor.dtype == ir.DataType.STRING:
        return sum(len(s) for s in tensor.string_data())  # type: ignore[attr-defined]
    return tensor.nbytes


def external_path(tensor: ir.ExternalTensor) -> Path:
    """The file an external tensor's bytes are in, resolved."""
    return Path(tensor.base_dir, tensor.location).resolve()


def external_data_files(model: ir.Model) -> set[Path]:
    files: set[Path] = set()
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor):
                files.add(external_path(tensor))
    return files


def has_external_tensors(model: ir.Model) -> bool:
    return bool(external_data_files(model))


#: Element types onnxruntime takes from numpy as they are (OrtValue.ortvalue_from_numpy).
PLAIN_DTYPES = frozenset(
    getattr(ir.DataType, name)
    for name in (
        "FLOAT", "FLOAT16", "DOUBLE", "INT8", "INT16", "INT32", "INT64",
        "UINT8", "UINT16", "UINT32", "UINT64", "BOOL",
    )
)  # fmt: skip
PLACEHOLDER_LOCATION = "onnxsqueeze-detached-weight"


@contextlib.contextmanager
def weightless(
    model: ir.Model, min_bytes: int = 4096, *, external: bool = False
) -> Iterator[dict[str, Any]]:
    """Within the block, the main graph's big in-memory weights are placeholders (and with
    ``external``, its weights in external files too, whatever their size).

    Each such initializer points at external data that does not exist; the block gets its
    tensor by name (``.numpy()`` when the array is wanted: a lazy tensor, such as a merged
    weight still on disk, is computed only then). Serialising the model then copies no
    weights, which is most of the time the checker and onnxruntime sessions cost on a large
    model (the session takes the arrays through ``add_external_initializers``). The weights
    are back when the block ends.
    """
    detached: dict[str, Any] = {}
    swapped: list[tuple[ir.Value, ir.TensorProtocol]] = []
    try:
        for value in model.graph.initializers.values():
            tensor = value.const_value
            in_file = isinstance(tensor, ir.ExternalTensor)
            if (
                tensor is None
                or (in_file and not external)
                or tensor.dtype not in PLAIN_DTYPES
                or (tensor.nbytes < min_bytes and not in_file)
                or not value.name
            ):
                continue
            detached[value.name] = tensor
            swapped.append((value, tensor))
            value.const_value = ir.ExternalTensor(
                PLACEHOLDER_LOCATION,
                0,
                tensor.nbytes,
                tensor.dtype,
                shape=ir.Shape(tensor.shape),
                name=value.name,
            )
        yield detached
    finally:
        for value, tensor in swapped:
            value.const_value = tensor


def stored_bytes(model: ir.Model) -> int:
    """About what the model takes on disk, its proto and every weight wherever stored,
    measured without copying a weight (the proto is serialised with them detached)."""
    external = sum(
        v.const_value.nbytes
        for v in model.graph.initializers.values()
        if isinstance(v.const_value, ir.ExternalTensor)
    )
    with weightless(model, min_bytes=0) as detached:
        size = ir.to_proto(model).ByteSize()
    return size + external + sum(t.nbytes for t in detached.values())


def release_weights(model: ir.Model) -> None:
    """Unmap memory-mapped weights so their pages leave the process (RSS)."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                with contextlib.suppress(BufferError):  # an array still views it: later
                    value.const_value.release()


# ---------------------------------------------------------------------------- save


def save_model(
    model: ir.Model,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
    protected: set[Path] | None = None,
    value_info: bool = True,
) -> Path:
    """Write ``model`` to ``path`` atomically; return the path.

    ``external_data=None`` keeps weights in the file unless they exceed protobuf's 2 GB
    limit or the model already used external data. ``protected`` lists files (the input's)
    that must not be overwritten. ``value_info=False`` writes no shape hints for
    intermediate values (the input had none).
    """
    dest = Path(path)
    label = str(dest)
    parent = dest.parent if str(dest.parent) else Path(".")
    if not parent.is_dir():
        raise ModelSaveError(f"{label}: output directory '{parent}' does not exist")
    if dest.is_dir():
        raise ModelSaveError(f"{label}: is a directory; give a file name for the output model")
    data_name = dest.name + ".data"
    resolved = {dest.resolve(), (parent / data_name).resolve()}
    clash = resolved & (protected or set())
    if clash:
        raise ModelSaveError(
            f"{label}: refusing to overwrite the input model file '{sorted(clash)[0]}' "
            "(choose another output path, or allow it explicitly)"
        )
    if external_data is None:
        external_data = (
            has_external_tensors(model) or initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD
        )
    remove_stale(parent)  # what a killed run left beside its output
    tmpdir = Path(tempfile.mkdtemp(prefix=f".onnxsqueeze-save-{os.getpid()}-", dir=parent))
    try:
        tmp_model = tmpdir / dest.name
        try:
            if external_data:
                with _lean_value_info(model, value_info):
                    ir.save(
                        model,
                        tmp_model,
                        external_data=data_name,
                        size_threshold_bytes=EXTERNAL_TENSOR_MIN_BYTES,
                    )
            else:
                tmp_model.write_bytes(to_proto(model, value_info).SerializeToString())
        except OSError as exc:
            raise ModelSaveError(f"{label}: cannot write ({first_line(exc)})") from exc
        except Exception as exc:
            raise ModelSaveError(
                f"{label}: cannot serialize the model ({first_line(exc)})"
            ) from exc
        _check_written(tmp_model, label)
        tmp_data = tmpdir / data_name
        if tmp_data.exists():
            os.replace(tmp_data, parent / data_name)
        os.replace(tmp_model, dest)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    logger.info("saved %s (external data: %s)", dest, bool(external_data))
    return dest


def _check_written(path: Path, label: str) -> None:
    """The file about to be renamed into place loads as the model it should be (onnx.load,
    its external data whole, onnx.checker), whatever happened before: a model that does not
    load is never handed over."""
    try:
        proto = onnx.load(str(path), load_external_data=False)
        check_external_data(proto, label, path.parent)
        onnx.checker.check_model(str(path))
    except Exception as exc:
        raise ModelSaveError(
            f"{label}: the model written does not load ({first_line(exc)}); nothing written"
        ) from exc


@contextlib.contextmanager
def _lean_value_info(model: ir.Model, hints: bool = True) -> Iterator[None]:
    """Hide initializers' type/shape while serialising: onnx_ir would write a value_info
    for each (redundant with the tensor itself) and the output file would grow. Without
    ``hints``, every intermediate value's too (no value_info at all)."""
    saved = []
    for graph in model.graphs():
        values = list(graph.initializers.values())
        if not hints:
            values += [out for node in graph for out in node.outputs]
        for value in values:
            if value.is_graph_input() or value.is_graph_output():
                continue
            if value.const_value is None and value.producer() is None:
                continue
            saved.append((value, value.type, value.shape))
            value.type = None
            value.shape = None
    try:
        yield
    finally:
        for value, type_, shape in saved:
            value.type = type_
            value.shape = shape


def to_proto(model: ir.Model, value_info: bool = True) -> onnx.ModelProto:
    """Serialise to protobuf; external tensors are read into the proto (small models only);
    ``value_info=False``: no shape hints for intermediate values."""
    if has_external_tensors(model):
        # serialize_model keeps external references relative to a base dir the proto does
        # not know; inline them so the proto stands on its own.
        model = _inline_external(model)
    with _lean_value_info(model, value_info):
        proto = serialize(model)
    _drop_empty_domains(proto)
    return proto


def serialize(model: ir.Model) -> onnx.ModelProto:
    """``ir.serde.serialize_model``, with the types of graph outputs onnx_ir cannot hold
    (maps: scikit-learn's ZipMap probabilities) inferred back, as the checker wants them."""
    proto = ir.serde.serialize_model(model)
    unname_attribute_tensors(proto)
    if any(not o.HasField("type") for o in proto.graph.output):
        inferred = onnx.shape_inference.infer_shapes(proto)
        types = {o.name: o.type for o in inferred.graph.output if o.HasField("type")}
        for output in proto.graph.output:
            if not output.HasField("type") and output.name in types:
                output.type.CopyFrom(types[output.name])
    return proto


def has_map_type(type_proto: onnx.TypeProto) -> bool:
    """Whether the type is, or holds, a map (which onnx_ir cannot represent)."""
    kind = type_proto.WhichOneof("value")
    if kind == "map_type":
        return True
    if kind in ("sequence_type", "optional_type"):
        return has_map_type(getattr(type_proto, kind).elem_type)
    return False


def _without_map_types(proto: onnx.ModelProto, label: str) -> onnx.ModelProto:
    """A copy without the map types onnx_ir cannot read, or ``proto`` itself if it has none.

    Map-typed outputs (ZipMap's ``seq(map(int64, float))``) lose their declared type, which
    ``serialize`` infers back from the node; value_info entries are only hints and go.
    """
    graph = proto.graph
    for value in graph.input:
        if has_map_type(value.type):
            raise UnsupportedModelError(
                f"{label}: input '{value.name}' is a map (DictVectorizer-style), which "
                "onnxsqueeze cannot read yet"
            )
    if not any(has_map_type(v.type) for v in (*graph.output, *graph.value_info)):
        return proto
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    drop_map_types(copy.graph)
    return copy


def drop_map_types(graph: onnx.GraphProto) -> None:
    """Map-typed graph outputs lose their type; map-typed value_info hints go."""
    for output in graph.output:
        if has_map_type(output.type):
            output.ClearField("type")
    kept = [v for v in graph.value_info if not has_map_type(v.type)]
    del graph.value_info[:]
    graph.value_info.extend(kept)


def _drop_empty_domains(proto: onnx.ModelProto) -> None:
    """onnx_ir writes ``domain: ""`` explicitly; unset, it means the same and costs nothing."""
    imports = [proto.opset_import, *(f.opset_import for f in proto.functions)]
    for opset in (o for group in imports for o in group):
        if opset.HasField("domain") and not opset.domain:
            opset.ClearField("domain")


def _inline_external(model: ir.Model) -> ir.Model:
    clone = model.clone()
    for graph in clone.graphs():
        for value in graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                value.const_value = ir.Tensor(value.const_value.numpy(), name=value.name)
    return clone


def convert_back(model: ir.Model, kind: str) -> Any:
    """Hand the model back as the kind of object the caller gave us."""
    if kind == "ir":
        return model
    if kind == "bytes":
        return to_proto(model).SerializeToString()
    if kind == "gs":
        import onnx_graphsurgeon as gs

        return gs.import_onnx(to_proto(model))
    return to_proto(model)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small text file (a report) via a temporary file and rename."""
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ModelSaveError(f"{path}: directory '{parent}' does not exist")
    fd, tmp = scratch_file("text", parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 is for secrets, not reports
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process's umask (read by setting it, so it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
