"""The command line: success path, report, exit codes, one-line errors, nothing lost."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DIGITS = REPO / "models" / "digits_cnn.onnx"


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "onnxsqueeze", *args], capture_output=True, text=True, cwd=cwd
    )


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_squeeze_shipped_model_with_report(tmp_path):
    out, report = tmp_path / "small.onnx", tmp_path / "report.json"
    before = _digest(DIGITS)
    proc = cli(
        str(DIGITS),
        "-o",
        str(out),
        "--data",
        str(REPO / "models" / "digits_test.npz"),
        "--report",
        str(report),
    )
    assert proc.returncode == 0, proc.stderr
    assert "verification: passed" in proc.stdout and "cleanup" in proc.stdout
    data = json.loads(report.read_text())
    assert data["verification_status"] == "passed"
    assert data["passes"][0]["name"] == "cleanup"
    quantization = data.get("quantization") or {}
    if quantization.get("applied"):  # int8 in whichever form was fastest: about a quarter
        # the bytes (weight-only: 0.26; static, with its int32 biases and per-channel scales on
        # this small model: 0.36; which one auto picks depends on this CPU's timings)
        assert data["after"]["weight_bytes"] < 0.4 * data["before"]["weight_bytes"]
    else:
        assert data["after"]["nodes"] <= data["before"]["nodes"]
    assert _digest(DIGITS) == before
    import onnx

    onnx.checker.check_model(str(out))


def test_quiet_and_version(tmp_path):
    proc = cli(str(DIGITS), "-o", str(tmp_path / "o.onnx"), "-q")
    assert proc.returncode == 0 and proc.stdout == ""
    version = cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("onnxsqueeze ")


def test_list_passes():
    proc = cli("--list-passes")
    assert proc.returncode == 0
    assert (
        "cleanup" in proc.stdout
        and "cleanup.lift_constants=True" in proc.stdout
        and "presets:" in proc.stdout
    )


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.onnx", None, "file not found"),
        ("text.onnx", b"hello, not a model\n", "not a valid ONNX model"),
        ("cut.onnx", DIGITS.read_bytes()[:5000], "cut.onnx"),
    ],
)
def test_bad_input_one_line_exit_1_no_output(tmp_path, name, content, message):
    src = tmp_path / name
    if content is not None:
        src.write_bytes(content)
    before = _digest(src) if src.exists() else None
    out = tmp_path / "out.onnx"
    proc = cli(str(src), "-o", str(out))
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and str(src) in lines[0]
    assert "Traceback" not in proc.stderr
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([src.name] if before else [])
    if before:
        assert _digest(src) == before


def _external_without_data(folder: Path) -> Path:
    import onnx

    model = onnx.load(str(DIGITS))
    path = folder / "ext.onnx"
    onnx.save(model, path, save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    (folder / "ext.onnx.data").unlink()
    return path


def _invalid_graph(folder: Path) -> Path:
    import onnx

    model = onnx.load(str(DIGITS))
    model.graph.node[-1].input[0] = "no_such_value"
    path = folder / "invalid.onnx"
    onnx.save(model, path)
    return path


def _future_opset(folder: Path) -> Path:
    import onnx

    model = onnx.load(str(DIGITS))
    model.opset_import[0].version = onnx.defs.onnx_opset_version() + 3
    path = folder / "future.onnx"
    onnx.save(model, path)
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (_external_without_data, "external data file 'ext.onnx.data'"),
        (_invalid_graph, "invalid ONNX graph"),
        (_future_opset, "is newer than this onnx install supports"),
    ],
)
def test_bad_model_contents_exit_1(tmp_path, make, message):
    src = make(tmp_path)
    files_before = sorted(p.name for p in tmp_path.iterdir())
    digest = _digest(src)
    proc = cli(str(src), "-o", str(tmp_path / "out.onnx"))
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and str(src) in lines[0], proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == files_before
    assert _digest(src) == digest


def test_debug_shows_traceback(tmp_path):
    proc = cli(str(tmp_path / "missing.onnx"), "-o", str(tmp_path / "o.onnx"), "--debug")
    assert proc.returncode == 1 and "Traceback" in proc.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--passes", "nope"], "unknown pass 'nope'"),
        (["--option", "cleanup.colour=red"], "no option 'colour'"),
        (["--option", "badformat"], "PASS.KEY=VALUE"),
        (["--shape", "x:1xfoo"], "--shape"),
        (["--providers", "warp-drive"], "unknown execution provider"),
    ],
)
def test_usage_errors_exit_2(tmp_path, args, message):
    out = tmp_path / "o.onnx"
    proc = cli(str(DIGITS), "-o", str(out), *args)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_missing_output_is_usage_error():
    proc = cli(str(DIGITS))
    assert proc.returncode == 2 and "-o/--output" in proc.stderr
    assert cli("--no-such-flag").returncode == 2


def test_refuses_to_overwrite_input_unless_asked(tmp_path):
    src = tmp_path / "m.onnx"
    src.write_bytes(DIGITS.read_bytes())
    before = _digest(src)
    proc = cli(str(src), "-o", str(src))
    assert proc.returncode == 1 and "refusing to overwrite" in proc.stderr
    assert _digest(src) == before
    assert cli(str(src), "-o", str(src), "--overwrite-input", "-q").returncode == 0


def test_help_does_not_import_heavy_modules():
    """--help must stay fast: onnx, onnx_ir, onnxruntime, numba are imported only when used."""
    code = (
        "import sys, contextlib, io\n"
        "from onnxsqueeze.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try: main(['--help'])\n"
        "    except SystemExit: pass\n"
        "heavy = [m for m in ('onnx', 'onnx_ir', 'onnxruntime', 'numba', 'numpy', 'torch') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_a_run_that_calibrates_nothing_does_not_import_numba(mlp_path, tmp_path):
    """The engine imports its rooms at module level, calibration included; Numba (0.2 s with
    llvmlite) still loads only when a kernel first runs (calib.kernels)."""
    out = tmp_path / "out.onnx"
    code = (
        "import sys\n"
        "from onnxsqueeze.cli import main\n"
        f"code = main([{str(mlp_path)!r}, '-o', {str(out)!r}, '-q', '--quantize', 'none'])\n"
        "print(code, 'numba' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["0", "False"] and out.is_file()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--data", "missing.npz"], "missing.npz: data file or folder not found"),
        (["-o", "no_dir/out.onnx"], "output directory"),
    ],
)
def test_bad_data_or_output_exit_1(tmp_path, extra, message):
    proc = cli(str(DIGITS), "-o", str(tmp_path / "out.onnx"), *extra, cwd=tmp_path)
    assert proc.returncode == 1
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_sympy_is_deferred_until_used() -> None:
    """onnx_ir imports sympy eagerly; the CLI defers it (0.4 s per run) yet it still works."""
    code = (
        "import sys\n"
        "from onnxsqueeze.cli.lazy_imports import defer, defer_heavy_imports\n"
        "assert not defer('no_such_module_here')\n"
        "defer_heavy_imports()\n"
        "assert not defer('sympy')\n"
        "import onnx_ir as ir\n"
        "assert 'sympy.core' not in sys.modules\n"
        "assert str(ir.SymbolicDim('N') + 1) == 'N + 1'\n"
        "assert ir.SymbolicDim('max(N, 2)').evaluate({'N': 5}) == 5\n"
        "assert 'sympy.core' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_passes_accept_a_preset_name_with_extra_passes(tmp_path):
    """The README's ``--passes default,quantize-weights --option ...``: a preset name in
    --passes stands for its passes, and --option reaches a pass the preset brought."""
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    proc = cli(
        str(DIGITS), "-o", str(out), "--report", str(report), "-q",
        "--passes", "default,quantize-weights",
        "--option", "quantize-weights.min_elements=16",
        "--option", "cleanup.dedup_initializers=false",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    ran = json.loads(report.read_text())["passes"]
    assert ran[0]["name"] == "cleanup(dedup_initializers=False)" and len(ran) > 5
    assert ran[-1]["name"] == "quantize-weights(min_elements=16)"
    assert ran[-1]["status"] == "applied"


def test_list_options_are_comma_separated():
    """As --exclude-nodes A,B: ``--option insert-qdq.exclude_nodes=a,b`` is two names."""
    from onnxsqueeze.pipeline.registry import coerce_option

    assert coerce_option("p", "k", tuple[str, ...], "/enc/MatMul, /head/Gemm") == (
        "/enc/MatMul",
        "/head/Gemm",
    )


def test_a_model_onnxruntime_cannot_load_names_the_file_and_the_way_out(tmp_path):
    """A custom-domain op onnxruntime has no kernel for: the error used to ask for --data or
    --shape (no input helps) and did not name the model."""
    import onnx

    model = onnx.load(str(DIGITS))
    model.graph.node[-1].domain = "my.custom"
    model.opset_import.append(onnx.helper.make_opsetid("my.custom", 1))
    src = tmp_path / "custom.onnx"
    onnx.save(model, src)
    proc = cli(str(src), "-o", str(tmp_path / "out.onnx"))
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"onnxsqueeze: error: {src}: cannot verify")
    assert "--no-verify" in lines[0] and "--data" not in lines[0]
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("target", ["report-onto-model", "output-onto-data", "report-onto-data"])
def test_no_destination_overwrites_what_the_run_reads(tmp_path, target):
    src, data = tmp_path / "m.onnx", tmp_path / "d.npz"
    src.write_bytes(DIGITS.read_bytes())
    data.write_bytes((REPO / "models" / "digits_test.npz").read_bytes())
    before = {p: _digest(p) for p in (src, data)}
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    if target == "report-onto-model":
        report = src
    elif target == "output-onto-data":
        out = data
    else:
        report = data
    proc = cli(str(src), "-o", str(out), "--data", str(data), "--report", str(report), "-q")
    assert proc.returncode == 1 and "refusing to overwrite" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert {p: _digest(p) for p in (src, data)} == before
    assert not (tmp_path / "o.onnx").exists()


def test_a_bad_report_destination_fails_before_any_output_is_written(tmp_path):
    src = tmp_path / "m.onnx"
    src.write_bytes(DIGITS.read_bytes())
    out = tmp_path / "o.onnx"
    for report, says in ((tmp_path / "missing" / "r.json", "does not exist"),
                         (tmp_path, "is a folder")):  # fmt: skip
        proc = cli(str(src), "-o", str(out), "--report", str(report), "-q")
        assert proc.returncode == 1 and says in proc.stderr, proc.stderr
        assert not out.exists()


def test_output_onto_a_pipe_is_refused_and_the_pipe_stays(tmp_path):
    import os
    import stat

    src, fifo = tmp_path / "m.onnx", tmp_path / "pipe"
    src.write_bytes(DIGITS.read_bytes())
    os.mkfifo(fifo)
    proc = cli(str(src), "-o", str(fifo), "-q")
    assert proc.returncode == 1 and "not a regular file" in proc.stderr, proc.stderr
    assert stat.S_ISFIFO(fifo.stat().st_mode)
