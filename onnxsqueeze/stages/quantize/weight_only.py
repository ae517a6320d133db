"""Settings of the weight-only modes (weights-int8 / weights-int4) for the quantize stage:
bits, block and storage form of the rounded weights, and with calibration data the Gram
matrices GPTQ rounds by (see onnxsqueeze.quant.gptq). Kept apart from the budget search, which
only hands these settings to the quantize-weights pass."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from typing import Any

import onnx_ir as ir

from onnxsqueeze.calib.gram import gram_matrices
from onnxsqueeze.core.spill import SpilledMemo

#: Smallest weight the weight-only stage quantizes in the fold form.
FOLD_MIN_ELEMENTS = 256
#: Weights above this (bytes) are stored in a form onnxruntime keeps integer in memory.
LARGE_WEIGHT_BYTES = 512 * 2**20
#: Calibration samples GPTQ's Gram matrices are summed over, unless calib_samples says.
GPTQ_SAMPLES = 128


def bits_and_format(
    mode: str, weight_format: str, providers: Sequence[str], weight_bytes: int = 0
) -> tuple[int, str]:
    """Bits of the mode and the storage form ``auto`` stands for on CPU alone. int4:
    MatMulNBits, which onnxruntime runs on the 4-bit codes (the fold form's unpacking is
    expanded at load: MiniLM's session took 858 MiB against 187 for fp32, MatMulNBits 77).
    int8: the fold form (float again at load, nothing to pay at run time) below
    LARGE_WEIGHT_BYTES; above, DequantizeLinear, kept integer in memory (the fold form
    holds the float weights beside the codes: twice the original's memory)."""
    bits = 4 if mode.endswith("int4") else 8
    if weight_format == "auto" and set(providers) <= {"cpu"}:
        if bits == 4:
            weight_format = "matmulnbits"
        else:
            weight_format = "fold" if weight_bytes < LARGE_WEIGHT_BYTES else "dq"
    return bits, weight_format


def pass_options(bits: int, form: str) -> dict[str, Any]:
    """The quantize-weights options every weight-only run shares: block, form, and the
    smallest weight worth quantizing."""
    options: dict[str, Any] = {"bits": bits, "block_size": 32 if bits == 4 else 0, "format": form}
    if form == "fold":
        # Folded weights cost nothing at run time, so small ones are worth their bytes in
        # a small model's file (PP-OCR cls: 0.51x -> 0.33x); the budget guards accuracy.
        options["min_elements"] = FOLD_MIN_ELEMENTS
    return options


def weight_settings(
    model: ir.Model,
    bits: int,
    form: str,
    calib_feeds: Iterable[Any] | None,
    calib_samples: int | None,
    providers: Sequence[str],
) -> dict[str, Any]:
    """The quantize-weights pass options the stage builds every variant with. Rounded
    weights are memoised (``memo``, on disk in a file run): the budget search builds many
    variants of one model."""
    settings: dict[str, Any] = {**pass_options(bits, form), "memo": SpilledMemo()}
    if calib_feeds is not None:
        feeds = itertools.islice(calib_feeds, calib_samples or GPTQ_SAMPLES)
        settings["grams"] = gram_matrices(model, feeds, providers=providers)
    return settings


def rounding(settings: dict[str, Any], quantized: Sequence[str]) -> str:
    """How the shipped weights were rounded (the memo knows which went through GPTQ)."""
    bits, block, memo = settings["bits"], settings["block_size"], settings["memo"]
    plain = "mse" if bits == 4 else "rtn"
    gptq = sum(1 for n in quantized if memo.stored((n, bits, block), (0, 0, False))[2])
    others = len(quantized) - gptq
    if not gptq:
        return plain
    return f"gptq ({gptq} weights)" + (f", {plain} ({others})" if others else "")
