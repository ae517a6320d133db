"""The files frameworks save, told apart by content, not by name: a ``torch.export.save``d
``.pt2`` program, a Keras ``.keras`` archive, a TensorFlow SavedModel folder, a ``.tflite``
flatbuffer. Pickles (``.pkl``, ``.joblib``, a ``torch.save``d ``.pt`` state dict) run code
when loaded, so they are refused with what to export instead; anything else is read as ONNX.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

from onnxsqueeze.core.errors import ModelLoadError

PICKLE_SUFFIXES = {".pkl", ".pickle", ".joblib", ".pt", ".pth", ".ckpt", ".bin"}
HOW_TO_EXPORT = (
    "export the model instead: torch.export.save(torch.export.export(model, args), "
    "'model.pt2'), model.save('model.keras'), or onnxsqueeze.from_sklearn(estimator, X) "
    "in Python"
)


def sniff(path: str) -> str:
    """ "onnx", "pt2", "keras", "savedmodel" or "tflite"; a pickle is refused in one line."""
    source = Path(path)
    if source.is_dir():
        if (source / "saved_model.pb").is_file() or (source / "saved_model.pbtxt").is_file():
            return "savedmodel"
        return "onnx"  # the loader says a folder is not a model
    if not source.is_file():
        return "onnx"  # a pipe, a device, nothing: the loader names what it is (and never blocks)
    try:
        with open(source, "rb") as handle:
            head = handle.read(8)
    except OSError:
        return "onnx"  # the loader names what is wrong with it
    if head[4:8] == b"TFL3":
        return "tflite"
    if head[:4] == b"PK\x03\x04":
        return _zip_kind(source)
    if head[:1] == b"\x80" or source.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelLoadError(f"{path}: a pickle runs code when it is loaded, so onnxsqueeze "
                             f"does not open it; {HOW_TO_EXPORT}")  # fmt: skip
    return "onnx"


def _zip_kind(source: Path) -> str:
    try:
        with zipfile.ZipFile(source) as archive:
            names = archive.namelist()
    except zipfile.BadZipFile:
        raise ModelLoadError(f"{source}: a damaged zip archive, not a model") from None
    leaves = {name.rsplit("/", 1)[-1] for name in names}
    if "config.json" in leaves and any(n.endswith(".weights.h5") for n in names):
        return "keras"
    if "data.pkl" in leaves:
        raise ModelLoadError(f"{source}: a torch.save'd pickle (a state dict or a whole module) "
                             f"runs code when it is loaded; {HOW_TO_EXPORT}")  # fmt: skip
    if any(n.endswith(("serialized_exported_program.json", "archive_format")) for n in names):
        return "pt2"
    raise ModelLoadError(f"{source}: a zip archive that is neither a .pt2 program nor a .keras "
                         "model")  # fmt: skip
