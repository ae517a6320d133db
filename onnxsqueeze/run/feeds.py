"""Calibration and probe data: npz files, folders of npz/npy, or Python iterables of feeds.

Every source is validated against the model's inputs here, so a wrong name or dtype is
reported once, naming the file, instead of deep inside onnxruntime.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from onnxsqueeze.core.errors import CalibrationDataError
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


def _describe(source: Any) -> str:
    return str(source) if isinstance(source, (str, os.PathLike)) else f"<{type(source).__name__}>"


def _iter_source(source: Any) -> Iterator[tuple[str, Mapping[str, Any]]]:
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise CalibrationDataError(f"{path}: data file or folder not found")
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix in (".npz", ".npy"))
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
