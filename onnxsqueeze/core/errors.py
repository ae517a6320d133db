"""One exception tree, so callers can catch every user-caused failure with ``SqueezeError``.

Each message is one line that names the file (or object) and the problem: the CLI prints
it as is, without a traceback.
"""

from __future__ import annotations


class SqueezeError(Exception):
    """Base of every error a user can cause (bad file, bad option, bad data)."""


class ModelLoadError(SqueezeError):
    """The model cannot be read: missing, not ONNX, truncated, missing external data."""


class InvalidModelError(ModelLoadError):
    """The model was read but is not a valid ONNX graph (onnx.checker rejects it)."""


class UnsupportedModelError(SqueezeError):
    """The model is valid ONNX but uses an IR version or opset this install cannot handle."""


class ModelSaveError(SqueezeError):
    """The output cannot be written (would overwrite the input, directory missing...)."""


class CalibrationDataError(SqueezeError):
    """Calibration or probe data does not match the model (names, dtypes, shapes)."""


class PipelineConfigError(SqueezeError):
    """Unknown pass or preset name, bad pass option."""


class VerificationError(SqueezeError):
    """The model cannot be verified (it fails on probe feeds) or its result broke the budget."""


class AccuracyBudgetError(VerificationError):
    """The squeezed model's outputs are further from the original than the user allows."""


class RuntimeSessionError(SqueezeError):
    """onnxruntime cannot create a session for the model or run it."""


def first_line(exc: BaseException, limit: int = 400) -> str:
    """An exception's text as one line a one-line error can quote: its lines joined (a
    message such as onnx's "... however input 't2' of node:" goes on after the break), and
    cut at a word, marked with an ellipsis, only past ``limit`` characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if len(text) <= limit:
        return text
    cut = text.rfind(" ", 0, limit)
    return text[: cut if cut > limit // 2 else limit] + " ..."


class CalibrationError(SqueezeError):
    """Calibration statistics cannot give a range (no finite value seen, bad cache)."""


class ConversionError(VerificationError):
    """A framework model's ONNX export disagrees with the framework model (or cannot run the
    inputs the framework model takes)."""


class MissingDependencyError(SqueezeError):
    """An optional extra (a framework, its converter) is not installed."""
