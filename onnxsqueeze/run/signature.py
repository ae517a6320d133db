"""A model's signature as a feed must meet it: input names, numpy dtypes and dims."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from onnxsqueeze.core.errors import CalibrationDataError


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """A graph input as a feed must provide it: name, numpy dtype, dims (int, symbol or None)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...] | None


def input_specs(model: ir.Model) -> list[InputSpec]:
    """The inputs a caller must feed (initializers listed as inputs have defaults)."""
    specs = []
    for value in model.graph.inputs:
        if value.const_value is not None or value.name in model.graph.initializers:
            continue
        if not isinstance(value.type, ir.TensorType) or value.dtype is None:
            raise CalibrationDataError(
                f"input '{value.name}': non-tensor inputs ({value.type}) need user data (data=)"
            )
        dims: tuple[int | str | None, ...] | None = None
        if value.shape is not None:
            dims = tuple(d if isinstance(d, int) else d.value for d in value.shape.dims)
        specs.append(InputSpec(value.name or "", _np_dtype(value.dtype), dims))
    return specs


def _np_dtype(dtype: ir.DataType) -> np.dtype:
    if dtype == ir.DataType.STRING:
        return np.dtype(object)
    return np.dtype(dtype.numpy())
