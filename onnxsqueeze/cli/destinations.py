"""Every file a run will write, checked before any work starts.

A serving pipeline runs the tool on arguments it did not write: ``--report model.onnx`` or
``-o data.npz`` must not overwrite what the run reads, a report into a missing folder must
not fail only after the output model was written, and ``-o`` onto a FIFO or a device must not
replace it with a regular file. Each problem is one line naming the file, exit code 1.
"""

from __future__ import annotations

import os
import stat
import urllib.parse
from pathlib import Path

from onnxsqueeze.core.errors import ModelSaveError
from onnxsqueeze.run.remote import is_uri


def read_files(
    model: str, data: str | None, cache: str | None, eval_data: str | None = None
) -> dict[Path, str]:
    """The files the run reads, resolved, with what each is: the model, the --data and
    --eval-data files or the .npz files of their folders, the calibration cache."""
    found = {Path(model).resolve(): "the input model"}
    for flag, path in (("--data", data), ("--eval-data", eval_data)):
        if path and is_uri(path) and not path.startswith("file://"):
            continue  # remote: nothing this run writes can be it
        if path:
            source = Path(urllib.parse.urlparse(path).path if is_uri(path) else path)
            if source.is_dir():
                found.update({p.resolve(): f"a {flag} file" for p in source.glob("*.npz")})
            else:
                found[source.resolve()] = f"the {flag} file"
    if cache:
        found[Path(cache).resolve()] = "the --calib-cache file"
    return found


def check_cache(path: str | None) -> None:
    """The calibration cache is read if it exists and written if not: either way it must be
    a regular file (or nothing yet) in an existing, writable folder."""
    if path:
        _check_file(path, "--calib-cache")


def check_destinations(
    writes: dict[str, str | None], reads: dict[Path, str], *, overwrite_input: bool
) -> None:
    """``writes``: flag -> path (None: not asked). Refuse a destination that is a file the
    run reads (unless ``overwrite_input``, for the model), another destination, a folder or
    a special file, or in a folder that is missing or not writable."""
    seen: dict[Path, str] = {}
    for flag, path in writes.items():
        if not path:
            continue
        dest = Path(path)
        resolved = dest.resolve()
        what = reads.get(resolved)
        if what and not (overwrite_input and what == "the input model" and flag == "-o"):
            raise ModelSaveError(
                f"{path}: refusing to overwrite {what} ({flag}; choose another path"
                + (", or --overwrite-input)" if what == "the input model" and flag == "-o" else ")")
            )
        if resolved in seen:
            raise ModelSaveError(f"{path}: both {seen[resolved]} and {flag} would write it")
        seen[resolved] = flag
        _check_file(path, flag)


def _check_file(path: str, flag: str) -> None:
    """``path`` can be written as a regular file: not a folder, pipe or device, in a folder
    that exists and is writable."""
    dest = Path(path)
    if dest.is_dir():
        raise ModelSaveError(f"{path}: {flag} is a folder, not a file")
    if dest.exists() and not stat.S_ISREG(dest.stat().st_mode):
        raise ModelSaveError(f"{path}: {flag} is not a regular file (a pipe or device)")
    parent = dest.parent if str(dest.parent) else Path(".")
    if not parent.is_dir():
        raise ModelSaveError(f"{path}: output directory {parent} does not exist ({flag})")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ModelSaveError(f"{path}: output directory {parent} is not writable ({flag})")
