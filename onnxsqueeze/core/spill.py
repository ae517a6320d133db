"""Large tensors a pass creates, moved out of memory as soon as they exist.

Quantizing a 4 GB model's weights one tensor at a time still holds every result until the
model is saved (1 GB of int8 for a 4 GB fp32 model). ``Spill`` appends each new in-memory
tensor above ``min_bytes`` to one scratch file and puts in its place a lazy tensor that
reads it back (through a short-lived memory map) only when the model is saved or run:
the process then holds about one tensor at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, MutableMapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

#: Tensors smaller than this stay in memory (scales, biases, norms).
SPILL_MIN_BYTES = 1 << 20


def after_each_field() -> Any:
    """A pass option (hidden from --list-passes): a callable the pass calls with the model
    after each weight it replaces, e.g. a ``Spill``, so a large model's new weights leave
    memory one by one."""
    return dataclasses.field(default=None, compare=False, metadata={"hidden": True})


def forget_replaced(values: list[ir.Value], *, streaming: bool) -> None:
    """Unmap the memory-mapped tensors of weights a pass just replaced (call after each
    one): another copy of the graph (the float model a candidate was built from) may
    share a tensor, so it is unmapped, not invalidated (it maps again if read), and a 4 GB
    model's float weights do not all stay mapped while candidates are built and run.
    ``streaming``: also drop the tensors of values the graph no longer holds; they sit in
    reference cycles only the cyclic collector frees."""
    for value in values:
        tensor = value.const_value
        graph = value.graph
        if streaming and (graph is None or graph.initializers.get(value.name or "") is not value):
            value.const_value = None
        if isinstance(tensor, ir.ExternalTensor):
            with contextlib.suppress(BufferError):  # an array still views it: left mapped
                tensor.release()


def lazy_concatenate(tensors: list[ir.TensorProtocol], axis: int) -> ir.TensorProtocol:
    """The concatenation of memory-mapped tensors, computed each time it is read (when the
    model is written or quantized) instead of held: merging a 4 GB model's Q/K/V weights
    would otherwise hold a quarter of it in memory. Its sources are unmapped after each
    read (they map again if read)."""
    shape = list(tensors[0].shape)
    shape[axis] = sum(t.shape[axis] for t in tensors)
    dtype = tensors[0].dtype

    def compute() -> ir.Tensor:
        merged = np.concatenate([t.numpy() for t in tensors], axis=axis)
        for tensor in tensors:
            if isinstance(tensor, ir.ExternalTensor):
                with contextlib.suppress(BufferError):
                    tensor.release()
        return ir.Tensor(merged)

    return ir.LazyTensor(compute, dtype, ir.Shape(shape))


class Spill:
    """Call with a model after each step that creates tensors: every in-memory initializer of
    at least ``min_bytes`` moves to ``folder/spill.bin``. Close it once the model is saved."""

    def __init__(self, folder: str | os.PathLike, min_bytes: int = SPILL_MIN_BYTES) -> None:
        self.path = Path(folder) / "spill.bin"
        self._file = open(self.path, "wb")  # noqa: SIM115 (open until close())
        self._offset = 0
        self.min_bytes = min_bytes
        self.spilled = 0

    def __call__(self, model: ir.Model) -> None:
        for graph in model.graphs():
            for value in graph.initializers.values():
                tensor = value.const_value
                if type(tensor) is ir.Tensor and tensor.nbytes >= self.min_bytes:
                    value.const_value = self._lazy(tensor)

    def _append(self, data: bytes | memoryview) -> tuple[int, int]:
        """Write ``data`` at the end of the file; its (offset, length)."""
        self._file.write(data)
        self._file.flush()
        offset, length = self._offset, memoryview(data).nbytes
        self._offset += length
        self.spilled += length
        return offset, length

    def _lazy(self, tensor: ir.Tensor) -> ir.LazyTensor:
        offset, length = self._append(tensor.tobytes())
        dtype, shape, name = tensor.dtype, tensor.shape, tensor.name or ""
        path = self.path

        def load() -> ir.ExternalTensor:  # a fresh map each time, gone with the caller's use
            return ir.ExternalTensor(
                path.name, offset, length, dtype, shape=shape, name=name, base_dir=path.parent
            )

        lazy = ir.LazyTensor(load, dtype, shape, name=name)
        #: where its bytes lie: a Ray worker on this machine reads them there
        lazy.file_slice = (str(path.resolve()), offset, length)
        return lazy

    def stow(self, array: np.ndarray) -> _Stowed:
        """``array``'s bytes in the file, to be read back by ``fetch``."""
        flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        offset, _ = self._append(memoryview(flat))
        return _Stowed(offset, array.dtype, array.shape)

    def fetch(self, stowed: _Stowed) -> np.ndarray:
        """A fresh in-memory copy of a stowed array (gone when the caller drops it)."""
        count = int(np.prod(stowed.shape))
        return np.fromfile(self.path, stowed.dtype, count, offset=stowed.offset).reshape(
            stowed.shape
        )

    def close(self) -> None:
        self._file.close()


@dataclasses.dataclass(frozen=True)
class _Stowed:
    offset: int
    dtype: np.dtype
    shape: tuple[int, ...]


class SpilledMemo(MutableMapping):
    """A memo of tuples whose large arrays wait in the run's spill file (when one is active
    where the memo is made), read back on each lookup. The weight-only search keeps every
    weight's rounded codes so that its many variants do not round again: held in memory, a
    1.3 GB model's int4 codes (one byte each) took 0.35 GiB beside each candidate's session."""

    def __init__(self, min_bytes: int | None = None) -> None:
        self._spill = _ACTIVE.get()
        self._items: dict[Any, tuple] = {}
        #: arrays smaller than this stay in memory (default: the spill's own threshold)
        self.min_bytes = min_bytes

    def __setitem__(self, key: Any, value: tuple) -> None:
        spill = self._spill
        if spill is not None:
            least = spill.min_bytes if self.min_bytes is None else self.min_bytes
            value = tuple(
                spill.stow(v) if isinstance(v, np.ndarray) and v.nbytes >= least else v
                for v in value
            )
        self._items[key] = value

    def __getitem__(self, key: Any) -> tuple:
        value = self._items[key]
        spill = self._spill
        if spill is None:
            return value
        return tuple(spill.fetch(v) if isinstance(v, _Stowed) else v for v in value)

    def stored(self, key: Any, default: Any = None) -> Any:
        """The entry as kept, its spilled arrays not read back (for its other fields)."""
        return self._items.get(key, default)

    def __contains__(self, key: object) -> bool:  # without reading the arrays back
        return key in self._items

    def __delitem__(self, key: Any) -> None:
        del self._items[key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


_ACTIVE: ContextVar[Spill | None] = ContextVar("onnxsqueeze_spill", default=None)


@contextlib.contextmanager
def spilling(spill: Spill | None) -> Iterator[None]:
    """Inside the block, ``spill_if_active`` moves a model's new weights to ``spill``: a
    result kept aside while the next alternative is tried (auto's weight-only int8 of a 4 GB
    model, 1 GB) then waits on disk, not in memory."""
    token = _ACTIVE.set(spill)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def spill_if_active(model: ir.Model) -> None:
    spill = _ACTIVE.get()
    if spill is not None:
        spill(model)
