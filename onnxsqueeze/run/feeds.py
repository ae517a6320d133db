"""Calibration and probe data: npz files, folders of npz/npy (local, or behind a URI that
fsspec reads: ``run.remote``), or Python iterables of feeds.

Every source is validated against the model's inputs here, so a wrong name or dtype is
reported once, naming the file, instead of deep inside onnxruntime.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence, Sized
from pathlib import Path
from typing import Any

import numpy as np

from onnxsqueeze.core.errors import CalibrationDataError
from onnxsqueeze.run import remote
from onnxsqueeze.run.remote import is_uri
from onnxsqueeze.run.signature import InputSpec

Feed = dict[str, np.ndarray]


def load_feeds(source: Any, specs: Sequence[InputSpec], *, limit: int | None = None) -> list[Feed]:
    """Read feeds from ``source`` (path or iterable of mappings), check them, cast safely."""
    return list(iter_feeds(source, specs, limit=limit))


def iter_feeds(
    source: Any, specs: Sequence[InputSpec], *, limit: int | None = None
) -> Iterator[Feed]:
    """Checked feeds one at a time, so calibration holds one sample in memory, not all."""
    count = 0
    if limit is not None and limit <= 0:
        raise CalibrationDataError(f"sample limit must be positive, got {limit}")
    for label, raw in _iter_source(source):
        yield check_feed(raw, specs, label)
        count += 1
        if count == limit:
            return
    if not count:
        raise CalibrationDataError(f"{_describe(source)}: no samples found")


@dataclasses.dataclass(frozen=True)
class Subset:
    """The samples of ``source`` whose position is (``keep=True``) or is not in ``indices``:
    one part of a split, read from the source like the whole, file by file, so a held-out
    part never travels through memory with the rest."""

    source: Any
    indices: frozenset[int]
    keep: bool = True

    def __len__(self) -> int:
        return len(self.indices) if self.keep else count_samples(self.source) - len(self.indices)


def count_samples(source: Any) -> int:
    """How many samples ``source`` holds, without reading them where it can (a folder's
    files are counted, a list is measured); another iterable is read through once."""
    if isinstance(source, Subset):
        return len(source)
    if isinstance(source, (str, os.PathLike)):
        files = _files(source)
        return len(files) if files is not None else 1
    if isinstance(source, Mapping):
        return 1
    if isinstance(source, Sized):
        return len(source)
    return sum(1 for _ in _iter_source(source))


def part(source: Any, start: int, stop: int) -> Any:
    """Samples ``start`` to ``stop - 1`` of ``source``, read like the whole: a folder (or a
    part of one) by its files, so a worker handed this part opens only those files; a list
    by slicing. Shards of a dataset are such parts."""
    files = _files(source.source) if isinstance(source, Subset) else None
    if files is not None:
        kept = [i for i in range(len(files)) if (i in source.indices) == source.keep]
        return Subset(source.source, frozenset(kept[start:stop]))
    if isinstance(source, Sequence) and not isinstance(source, (str, bytes)):
        return list(source[start:stop])
    return Subset(source, frozenset(range(start, stop)))


def reusable(source: Any) -> Any:
    """``source`` as something that can be read more than once: a one-shot iterator (a
    generator of feeds) is kept as a list, since the search, calibration and the held-out
    check each read the data."""
    if isinstance(source, Iterator):
        return list(source)
    return source


def _describe(source: Any) -> str:
    if isinstance(source, Subset):
        return f"part of {_describe(source.source)}"
    return str(source) if isinstance(source, (str, os.PathLike)) else f"<{type(source).__name__}>"


def _folder_files(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.suffix in (".npz", ".npy"))


def _files(source: Any) -> list | None:
    """The sample files of a folder, local or behind a URI, in order; None otherwise."""
    if is_uri(source):
        return remote.sample_files(source)
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        return _folder_files(Path(source))
    return None


def _read(file: Path | str) -> Iterator[tuple[str, Mapping[str, Any]]]:
    if is_uri(file):
        yield str(file), remote.read_npz(str(file))
    else:
        yield from _read_file(Path(file))


def _iter_source(source: Any) -> Iterator[tuple[str, Mapping[str, Any]]]:
    if isinstance(source, Subset):
        files = _files(source.source)
        if files is not None:  # unread files stay unread
            for index, file in enumerate(files):
                if (index in source.indices) == source.keep:
                    yield from _read(file)
            return
        for index, item in enumerate(_iter_source(source.source)):
            if (index in source.indices) == source.keep:
                yield item
        return
    if is_uri(source):
        files = remote.sample_files(source)
        for file in files if files is not None else [source]:
            yield from _read(file)
        return
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise CalibrationDataError(f"{path}: data file or folder not found")
        if path.is_dir():
            files = _folder_files(path)
            if not files:
                raise CalibrationDataError(f"{path}: folder holds no .npz files")
            for file in files:
                yield from _read_file(file)
        else:
            yield from _read_file(path)
        return
    if isinstance(source, Mapping):
        yield "<feed>", source
        return
    if isinstance(source, Iterable):
        for index, item in enumerate(source):
            if not isinstance(item, Mapping):
                raise CalibrationDataError(
                    f"data sample {index}: expected a mapping of input name to array, got {type(item).__name__}"
                )
            yield f"sample {index}", item
        return
    raise CalibrationDataError(
        f"{_describe(source)}: data must be an .npz path, a folder or an iterable of dicts"
    )


def _read_file(path: Path) -> Iterator[tuple[str, Mapping[str, Any]]]:
    if path.suffix != ".npz":
        raise CalibrationDataError(f"{path}: expected an .npz file of input-name -> array")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files}
    except Exception as exc:
        raise CalibrationDataError(f"{path}: cannot read npz ({exc})") from exc
    yield str(path), arrays


def check_feed(raw: Mapping[str, Any], specs: Sequence[InputSpec], label: str) -> Feed:
    """Keep the model's inputs, require all of them, and cast within a dtype family."""
    wanted = {s.name: s for s in specs}
    missing = [n for n in wanted if n not in raw]
    if missing:
        raise CalibrationDataError(
            f"{label}: missing input(s) {', '.join(missing)} (have: {', '.join(raw)})"
        )
    feed: Feed = {}
    for name, spec in wanted.items():
        arr = np.asarray(raw[name])
        if arr.dtype != spec.dtype:
            same_family = arr.dtype.kind == spec.dtype.kind or (
                arr.dtype.kind in "iu" and spec.dtype.kind in "iu"
            )
            if not same_family:
                raise CalibrationDataError(
                    f"{label}: input '{name}' is {arr.dtype}, the model expects {spec.dtype}"
                )
            arr = arr.astype(spec.dtype)
        if spec.shape is not None and (
            arr.ndim != len(spec.shape)
            or any(
                isinstance(d, int) and d >= 0 and d != s
                for d, s in zip(spec.shape, arr.shape, strict=False)
            )
        ):
            raise CalibrationDataError(
                f"{label}: input '{name}' has shape {list(arr.shape)}, the model expects {list(spec.shape)}"
            )
        if arr.dtype.kind in "fc" and arr.size and not np.isfinite(arr).any():
            # a few NaN are data (scikit-learn imputers read them as missing values); only
            # NaN/inf is no data: every model "agrees" with the original on it
            raise CalibrationDataError(
                f"{label}: input '{name}' holds only NaN/inf values: nothing to verify or "
                "calibrate on"
            )
        feed[name] = arr
    return feed
