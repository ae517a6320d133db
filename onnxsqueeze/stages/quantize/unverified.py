"""Lossy modes asked for with verification off (``verify=False``, ``--no-verify``): a model
too large to run twice in this machine's memory is still quantized, by the pass alone, with
no budget and no search, and the report says that nothing was compared.

Weight-only modes stream: each weight is read from the (memory-mapped) input, rounded, and
its codes moved to a scratch file at once (onnxsqueeze.core.spill), so the process holds
about one weight at a time and the output is written from the scratch file.
"""

from __future__ import annotations

from typing import Any

import onnx_ir as ir

from onnxsqueeze.core.errors import PipelineConfigError
from onnxsqueeze.core.graphs import opset_version
from onnxsqueeze.core.io import initializer_bytes
from onnxsqueeze.core.spill import Spill
from onnxsqueeze.passes.convert_fp16 import ConvertFp16Pass
from onnxsqueeze.passes.quantize_dynamic import QuantizeDynamicPass
from onnxsqueeze.passes.quantize_weights import QuantizeWeightsPass
from onnxsqueeze.stages.quantize import weight_only
from onnxsqueeze.stages.quantize.config import QuantizeConfig

#: Modes that need nothing but the model: static needs calibration, which runs it.
UNVERIFIED_MODES = ("weights-int8", "weights-int4", "dynamic", "fp16")


def quantize_unverified(
    model: ir.Model, quantize: Any, report: Any, spill: Spill | None = None
) -> ir.Model:
    """``model`` quantized in place by ``quantize``'s mode; ``report.quantization`` says
    what was done and that it was not verified."""
    config = (
        quantize if isinstance(quantize, QuantizeConfig) else QuantizeConfig(mode=str(quantize))
    )
    if config.mode not in UNVERIFIED_MODES:
        raise PipelineConfigError(
            f"quantization ({config.mode}) calibrates on data, which runs the model: it "
            "cannot run without verification (drop verify=False)"
        )
    record: dict[str, Any] = {"mode": config.mode, "verified": False}
    if config.weight_only:
        bits, form = weight_only.bits_and_format(
            config.mode, config.weight_format, config.providers, initializer_bytes(model)
        )
        if form == "dq" and opset_version(model) < 13:
            form = "fold"  # upgrading the opset needs the whole model serialized: not here
        options = weight_only.pass_options(bits, form)  # no memo: nothing is held
        result = QuantizeWeightsPass(
            **options, exclude_nodes=config.exclude_nodes, after_each=spill
        )(model)
        record["weight_format"] = form
    elif config.mode == "dynamic":
        result = QuantizeDynamicPass(exclude_nodes=config.exclude_nodes, after_each=spill)(model)
    else:
        result = ConvertFp16Pass(exclude_nodes=config.exclude_nodes)(model)
    if spill is not None:
        spill(model)
        record["spilled_bytes"] = spill.spilled  # new weights that went through the scratch file
    stats = {k: v for k, v in result.stats.items() if not isinstance(v, (list, dict))}
    record.update(applied=result.modified, stats=stats)
    record["reason"] = "verify=False: outputs were not compared with the original"
    report.quantization = record
    report.warnings.append(
        f"{config.mode} applied without verification: outputs were not compared with the "
        "original, and no accuracy budget was checked"
    )
    return result.model
