"""Temporary files and folders, named so that a run killed before it could remove them
(SIGKILL, a power cut) has its leftovers removed by the next run: each name carries the
process id, and a name whose process is gone is stale. A run interrupted by SIGINT or SIGTERM
cleans up on its own (the CLI turns SIGTERM into KeyboardInterrupt, so every ``with`` block
below exits)."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

#: Every scratch name: ``onnxsqueeze-<kind>-<pid>-<random>`` (with a leading dot beside
#: the user's files, where a hidden file is the polite kind of temporary).
_NAME = re.compile(r"^\.?onnxsqueeze-[a-z]+-(\d+)-")


def scratch_dir(kind: str, folder: str | os.PathLike | None = None) -> tempfile.TemporaryDirectory:
    """A temporary folder (a context manager) in ``folder`` (default: the system's)."""
    dot = "." if folder is not None else ""
    return tempfile.TemporaryDirectory(prefix=f"{dot}onnxsqueeze-{kind}-{os.getpid()}-", dir=folder)


def scratch_file(kind: str, folder: str | os.PathLike, suffix: str = "") -> tuple[int, str]:
    """``tempfile.mkstemp`` beside the destination, named as a scratch file."""
    return tempfile.mkstemp(prefix=f".onnxsqueeze-{kind}-{os.getpid()}-", suffix=suffix, dir=folder)


def remove_stale(folder: str | os.PathLike | None = None) -> list[Path]:
    """Remove the scratch files and folders in ``folder`` (default: the system's temporary
    folder) whose process no longer runs; return what was removed."""
    base = Path(folder) if folder is not None else Path(tempfile.gettempdir())
    removed = []
    try:
        entries = list(base.iterdir())
    except OSError:
        return removed
    for path in entries:
        match = _NAME.match(path.name)
        if not match or _alive(int(match[1])):
            continue
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError:
            continue  # another user's, or already gone
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's process, or not a pid we can judge: leave it
    return True
