"""Calibration data behind a URI (``s3://bucket/calib/``, ``gs://``, ``file://``, any
filesystem fsspec knows): the same layout as a local folder of ``.npz`` samples, listed and
read through fsspec, one file at a time. Workers of a Ray cluster read their own shard's files
from such a location, so the data never travels through the driver."""

from __future__ import annotations

import io
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from onnxsqueeze.core.errors import CalibrationDataError
from onnxsqueeze.core.optional import require

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def is_uri(source: Any) -> bool:
    """A string naming a protocol (``scheme://...``); local paths stay paths."""
    return isinstance(source, str) and _SCHEME.match(source) is not None


def _filesystem(uri: str) -> tuple[Any, str]:
    fsspec = require("fsspec", "ray", f"reading data from {uri.split('://')[0]}://")
    try:
        return fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as exc:  # a protocol whose package is not installed
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CalibrationDataError(f"{uri}: cannot open ({reason})") from None


def sample_files(uri: str) -> list[str] | None:
    """The ``.npz`` files under ``uri`` in name order, as URIs; None when ``uri`` is one file."""
    fs, path = _filesystem(uri)
    try:
        if not fs.isdir(path):
            if fs.exists(path):
                return None
            raise CalibrationDataError(f"{uri}: data file or folder not found")
        names = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".npz"))
    except OSError as exc:
        raise CalibrationDataError(f"{uri}: cannot list ({exc})") from None
    if not names:
        raise CalibrationDataError(f"{uri}: folder holds no .npz files")
    return [fs.unstrip_protocol(name) for name in names]


def read_npz(uri: str) -> Mapping[str, np.ndarray]:
    """One sample file's arrays (read whole: npz needs to seek, object stores stream)."""
    if not uri.endswith(".npz"):
        raise CalibrationDataError(f"{uri}: expected an .npz file of input-name -> array")
    fs, path = _filesystem(uri)
    try:
        with fs.open(path, "rb") as handle:
            blob = handle.read()
        with np.load(io.BytesIO(blob), allow_pickle=False) as archive:
            return {k: archive[k] for k in archive.files}
    except FileNotFoundError:
        raise CalibrationDataError(f"{uri}: data file or folder not found") from None
    except Exception as exc:
        raise CalibrationDataError(f"{uri}: cannot read npz ({exc})") from exc
