"""The wheel ships the engine and the passes (top-level passes/ installed as onnxsqueeze.passes)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_wheel_contains_the_passes(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--quiet",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("onnxsqueeze-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "onnxsqueeze/passes/__init__.py" in names
    assert "onnxsqueeze/passes/cleanup.py" in names
    # every module of the engine and the passes, subpackages included (calib/ was once missed)
    engine = {
        f"onnxsqueeze/{p.relative_to(REPO / 'onnxsqueeze')}"
        for p in (REPO / "onnxsqueeze").rglob("*.py")
    }
    passes = {f"onnxsqueeze/passes/{p.name}" for p in (REPO / "passes").glob("*.py")}
    assert engine | passes <= names, sorted((engine | passes) - names)
    assert "onnxsqueeze/cli/__init__.py" in names and "onnxsqueeze/py.typed" in names
    assert not any(n.startswith(("passes/", "tests/", "models/", "tools/")) for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert (
        "onnxsqueeze = onnxsqueeze.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    )


def test_installed_package_resolves_passes():
    import onnxsqueeze.passes
    import onnxsqueeze.passes.cleanup as cleanup

    assert Path(onnxsqueeze.passes.__file__).parent.name == "passes"
    assert cleanup.CleanupPass.name == "cleanup"


def test_numba_cache_stays_out_of_the_package(tmp_path):
    """Numba's compiled kernels go to the user's cache folder: a cache written beside the
    installed package survives the test command's editable reinstall as an empty namespace
    package that shadows it (the README's two commands in order broke the CLI that way)."""
    import onnxsqueeze.calib.kernels as kernels

    package = Path(kernels.__file__).parent / "__pycache__"
    before = set(package.glob("*.nb*")) if package.exists() else set()
    code = (
        "import numpy as np; from onnxsqueeze.calib import kernels; "
        "s = np.zeros(6); kernels.minmax(np.array([1.0, np.nan]), s); print(s[1])"
    )
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    env.pop("NUMBA_CACHE_DIR", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert list((tmp_path / "onnxsqueeze" / "numba").rglob("*.nbi"))
    after = set(package.glob("*.nb*")) if package.exists() else set()
    assert after == before
