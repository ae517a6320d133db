"""Opset upgrades the quantizers need: per-channel QDQ needs opset 13, int4 / block-wise 21.

onnx's version converter works on protobuf, so the model goes through serde and back; the
converted model is only used if it still loads and computes the same outputs (the caller
checks), since converters have gaps for rare ops.
"""

from __future__ import annotations

import logging

import onnx_ir as ir

from onnxsqueeze.core.errors import UnsupportedModelError, first_line
from onnxsqueeze.core.graphs import opset_version
from onnxsqueeze.core.io import serialize

logger = logging.getLogger(__name__)


def upgrade_opset(model: ir.Model, target: int) -> ir.Model:
    """A copy of ``model`` at default-domain opset ``target`` (``model`` itself if already
    there). Raises UnsupportedModelError when onnx cannot convert it."""
    if opset_version(model) >= target:
        return model
    import onnx.version_converter

    proto = serialize(model)
    try:
        converted = onnx.version_converter.convert_version(proto, target)
    except Exception as exc:
        raise UnsupportedModelError(
            f"cannot upgrade the model from opset {opset_version(model)} to {target}: "
            f"{first_line(exc)}"
        ) from exc
    logger.info("upgraded opset %d -> %d", opset_version(model), target)
    return ir.serde.deserialize_model(converted)
