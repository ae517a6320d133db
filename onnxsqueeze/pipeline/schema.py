"""The JSON reports' envelope: every file says which report it is and which version of its
schema (README, "JSON reports"), so a pipeline that gates on it can check before reading."""

from __future__ import annotations

import json
import math
from typing import Any

#: Bumped when a field changes meaning or goes away (adding a field keeps the version).
SCHEMA_VERSION = 1
KINDS = ("squeeze", "bench", "compare", "inspect", "plan")


_NUM = {"type": ["number", "null"]}
_INT = {"type": "integer"}
_COUNTS = {"type": "object", "additionalProperties": {"type": "integer"}}


def _obj(required: dict[str, Any], **optional: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "required": list(required),
        "properties": {**required, **optional},
    }


_HEADER = {"schema": {"type": "string"}, "schema_version": {"const": SCHEMA_VERSION}}
_SIZES = _obj({"nodes": _INT, "weight_bytes": _INT}, ops=_COUNTS, bytes_by_dtype=_COUNTS)
_METRICS = _obj(
    {"name": {"type": "string"}, "max_abs": _NUM, "max_rel": _NUM, "cosine": _NUM},
    sqnr_db=_NUM,
    top1_agreement=_NUM,
    top5_agreement=_NUM,
    mismatch={"type": ["string", "null"]},
)
#: JSON Schema (draft 2020-12) of each report; the README's "JSON reports" describes them.
SCHEMAS: dict[str, dict[str, Any]] = {
    "squeeze": _obj(
        {
            **_HEADER,
            "source": {"type": "string"},
            "output": {"type": ["string", "null"]},
            "passes": {
                "type": "array",
                "items": _obj(
                    {
                        "name": {"type": "string"},
                        "status": {"enum": ["applied", "unchanged", "rolled-back", "failed"]},
                        "seconds": {"type": "number"},
                    }
                ),
            },
            "before": _SIZES,
            "after": _SIZES,
            "verification_status": {"enum": ["passed", "failed", "skipped", "not run"]},
            "warnings": {"type": "array", "items": {"type": "string"}},
        },
        quantization={"type": ["object", "null"]},
        factorization={"type": ["object", "null"]},
        pruning={"type": ["object", "null"]},
        held_out={"type": ["object", "null"]},
        workers={"type": ["object", "null"]},
        conversion={"type": ["object", "null"]},
        timings={"type": "array"},
        file_bytes_before={"type": ["integer", "null"]},
        file_bytes_after={"type": ["integer", "null"]},
    ),
    "bench": _obj(
        {
            **_HEADER,
            "rounds": _INT,
            "machine": {"type": "string"},
            "results": {
                "type": "array",
                "items": _obj(
                    {
                        "model": {"type": "string"},
                        "provider": {"type": "string"},
                        "batch": {"type": ["integer", "null"]},
                        "status": {"enum": ["ok", "unavailable", "failed"]},
                        "p50_ms": _NUM,
                        "p90_ms": _NUM,
                        "p99_ms": _NUM,
                        "spread": _NUM,
                        "speedup": _NUM,
                        "throughput": _NUM,
                        "size_bytes": _INT,
                    },
                    create_ms=_NUM,
                    memory_bytes={"type": ["integer", "null"]},
                    gpu_memory_bytes={"type": ["integer", "null"]},
                    round_p50_ms={"type": "array", "items": {"type": "number"}},
                ),
            },
        }
    ),
    "compare": _obj(
        {
            **_HEADER,
            "original": {"type": "string"},
            "candidate": {"type": "string"},
            "samples": _INT,
            "outputs": {"type": "array", "items": _METRICS},
            "per_tensor": {
                "anyOf": [
                    {"type": "null"},
                    _obj(
                        {
                            "first_jump": {"type": ["string", "null"]},
                            "tensors": {
                                "type": "array",
                                "items": _obj(
                                    {
                                        "name": {"type": "string"},
                                        "op": {"type": "string"},
                                        "index": _INT,
                                        "rel_rms": _NUM,
                                        "inherited": _NUM,
                                        "jump": {"type": "boolean"},
                                    }
                                ),
                            },
                            "unmatched": {"type": "array", "items": {"type": "string"}},
                        }
                    ),
                ]
            },
        }
    ),
    "plan": _obj(
        {
            **_HEADER,
            "source": {"type": "string"},
            "timings": {
                "type": "array",
                "items": _obj(
                    {"key": {"type": "string"}, "ratio": {"type": "number", "exclusiveMinimum": 0}},
                    basis={"type": ["string", "null"]},
                    replayed={"type": "boolean"},
                    near_line={"type": "boolean"},
                ),
            },
        }
    ),
    "inspect": _obj(
        {
            **_HEADER,
            "path": {"type": "string"},
            "file_bytes": _INT,
            "external_files": _COUNTS,
            "opsets": _COUNTS,
            "inputs": {"type": "array"},
            "outputs": {"type": "array"},
            "ops": _COUNTS,
            "nodes": _INT,
            "params_by_dtype": {"type": "object"},
            "params_by_op": _COUNTS,
            "quantization": _obj({"state": {"type": "string"}}),
            "squeeze": _obj({"passes": {"type": "array"}, "notes": {"type": "array"}}),
        }
    ),
}


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
