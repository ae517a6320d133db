"""Temporary copies do not outlive their run: SIGTERM unwinds like Ctrl-C (every scratch
folder removed, no output), and what a killed run (SIGKILL) left is removed by the next."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import onnx
from harness import small_model

import onnxsqueeze


def _external_model(folder: Path) -> Path:
    """Weights in a .data file: every onnxruntime session is made from a scratch copy."""
    path = folder / "ext.onnx"
    onnx.save(small_model(), path, save_as_external_data=True, location="ext.onnx.data",
              size_threshold=0)  # fmt: skip
    return path


def test_sigterm_removes_the_scratch_copies_and_writes_nothing(tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    model = _external_model(tmp_path)
    # The first onnxruntime session blocks (inside its scratch folder) until the signal.
    script = textwrap.dedent(f"""
        import sys, time
        import onnxruntime
        def blocked(*args, **kwargs):
            print("ready", flush=True)
            time.sleep(60)
        onnxruntime.InferenceSession = blocked
        from onnxsqueeze.cli import main
        sys.exit(main([{str(model)!r}, "-o", {str(tmp_path / "out.onnx")!r}]))
    """)
    env = {**os.environ, "TMPDIR": str(scratch)}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    assert [p.name for p in scratch.iterdir() if p.name.startswith("onnxsqueeze-session-")]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and len(err.strip().splitlines()) == 1
    assert [p.name for p in scratch.iterdir() if "onnxsqueeze" in p.name] == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ext.onnx", "ext.onnx.data", "tmp"]


def test_a_killed_runs_leftovers_are_removed_by_the_next(tmp_path, monkeypatch):
    import tempfile

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    stale = scratch / f"onnxsqueeze-session-{dead}-abc"
    stale.mkdir()
    (stale / "model.onnx.data").write_bytes(b"\0" * 1024)
    live = scratch / f"onnxsqueeze-session-{os.getppid()}-xyz"  # a running process's
    live.mkdir()
    other = scratch / "someone-else-123-abc"
    other.mkdir()
    beside = tmp_path / f".onnxsqueeze-save-{dead}-q"  # a killed run's partial output
    beside.mkdir()
    onnxsqueeze.squeeze_file(_external_model(tmp_path), tmp_path / "out.onnx", quantize="none")
    assert not stale.exists() and not beside.exists()
    assert live.exists() and other.exists()
