"""The JSON reports' envelope: every file says which report it is and which version of its
schema (README, "JSON reports"), so a pipeline that gates on it can check before reading."""

from __future__ import annotations

import json
import math
from typing import Any

#: Bumped when a field changes meaning or goes away (adding a field keeps the version).
SCHEMA_VERSION = 1
KINDS = ("squeeze", "bench", "compare", "inspect")


def envelope(kind: str, payload: dict[str, Any]) -> dict[str, Any]:
    if kind not in KINDS:
        raise ValueError(f"unknown report kind {kind!r}")
    return {"schema": f"onnxsqueeze.{kind}", "schema_version": SCHEMA_VERSION, **payload}


def dump(kind: str, payload: dict[str, Any]) -> str:
    """The report as JSON text; non-finite floats become null (JSON has no NaN)."""
    return json.dumps(_finite(envelope(kind, payload)), indent=2, default=_default)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)
