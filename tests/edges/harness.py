"""The edge-case ("fuzz") suite's harness: a folder with a small model, its data and a file
outside it; each case runs the CLI in-process (or the API) and is checked for what every run,
accepted or refused, must hold: no traceback, no input modified, nothing left behind on a
refusal (no output, no temporary file), a refusal in at most two lines on stderr."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx.helper
import onnx.numpy_helper

RNG = np.random.default_rng(0)
TEMP_PREFIXES = ("onnxsqueeze-", ".onnxsqueeze-")


def small_model(opset: int = 17) -> onnx.ModelProto:
    """x[N, 16] -> MatMul 16x32 -> Relu -> MatMul 32x8 -> y: quantizable, prunable, factorizable."""
    w1 = onnx.numpy_helper.from_array(RNG.standard_normal((16, 32)).astype(np.float32), "w1")
    w2 = onnx.numpy_helper.from_array(RNG.standard_normal((32, 8)).astype(np.float32), "w2")
    nodes = [
        onnx.helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
        onnx.helper.make_node("Relu", ["h"], ["r"], name="relu"),
        onnx.helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2"),
    ]
    graph = onnx.helper.make_graph(
        nodes,
        "small",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 16])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 8])],
        [w1, w2],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


@dataclass
class Workspace:
    """The case's folder: ``model.onnx``, ``data.npz`` and ``../outside/secret.bin``."""

    root: Path
    model: Path
    data: Path
    secret: Path

    def snapshot(self) -> dict[str, str]:
        """Digest of every regular file under the folder and of the one outside it."""
        files = {}
        for base in (self.root, self.secret.parent):
            for path in sorted(base.rglob("*")):
                if path.is_file() and not path.is_symlink():
                    files[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
        return files


def make_workspace(tmp_path: Path) -> Workspace:
    root = tmp_path / "work"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.bin"
    secret.write_bytes(b"TOP-SECRET" * 8)
    model = root / "model.onnx"
    onnx.save(small_model(), model)
    data = root / "data.npz"
    np.savez(data, x=RNG.standard_normal((8, 16)).astype(np.float32))
    return Workspace(root, model, data, secret)


@dataclass
class Outcome:
    code: int
    out: str
    err: str


def run_cli(argv: list[str]) -> Outcome:
    from onnxsqueeze.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse
            code = exc.code if isinstance(exc.code, int) else 1
    return Outcome(code, out.getvalue(), err.getvalue())


def temp_leftovers() -> set[str]:
    """This process's scratch names in the temp folder (they carry its pid: another run on
    the machine may have its own there meanwhile)."""
    folder = Path(tempfile.gettempdir())
    mine = f"-{os.getpid()}-"
    return {p.name for p in folder.iterdir() if p.name.startswith(TEMP_PREFIXES) and mine in p.name}


def check_refusal(outcome: Outcome, *needles: str) -> None:
    """A refusal: non-zero exit, at most two lines on stderr naming the problem, no trace."""
    assert outcome.code != 0, (outcome.out, outcome.err)
    assert "Traceback" not in outcome.err + outcome.out
    assert "internal error" not in outcome.err, outcome.err
    lines = outcome.err.strip().splitlines()
    assert 1 <= len(lines) <= 2, outcome.err
    assert lines[0].startswith("onnxsqueeze: "), outcome.err
    for needle in needles:
        assert needle in outcome.err, (needle, outcome.err)


def check_clean(outcome: Outcome) -> None:
    assert "Traceback" not in outcome.err + outcome.out
    assert "internal error" not in outcome.err, outcome.err


def same_files(before: dict[str, str], after: dict[str, str], written: set[str]) -> None:
    """Every file that was there is unchanged; the only new ones are ``written``."""
    for path, digest in before.items():
        assert after.get(path) == digest, f"{path} modified or removed"
    new = set(after) - set(before)
    assert new <= written, f"unexpected files: {sorted(new - written)}"


@contextlib.contextmanager
def no_temp_left():
    before = temp_leftovers()
    yield
    assert temp_leftovers() <= before, sorted(temp_leftovers() - before)


def environment_is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0
