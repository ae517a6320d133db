"""Every option of ``--help`` given a value of the wrong kind, empty, absurd, or naming what
the model does not have, and flags that contradict each other: each is refused in one line
(exit 2, or 1 for files that cannot be used) before any work, or said, never silently
accepted; nothing is written, nothing modified."""

from __future__ import annotations

import os

import numpy as np
import pytest
from harness import (
    check_clean,
    check_refusal,
    no_temp_left,
    run_cli,
    same_files,
)

BAD_NUMBERS = ("nan", "inf", "-inf", "abc", "", "1e999", "0x10")

CASES: list[tuple[list[str], str]] = []


def _case(args: list[str], needle: str) -> None:
    CASES.append((args, needle))


for value, needle in [
    ("", "--passes"), (",", "--passes"), (" , ", "--passes"), ("ghost", "ghost"),
    ("cleanup,,ghost", "ghost"), ("CLEANUP", "CLEANUP"),
]:  # fmt: skip
    _case(["--passes", value], needle)
for value in ("", "ghost", " "):
    _case(["--preset", value], "preset")
for value, needle in [
    ("x", "PASS.KEY=VALUE"), ("=", "PASS.KEY=VALUE"), (".=1", "PASS.KEY=VALUE"),
    ("cleanup.=1", "PASS.KEY=VALUE"), ("cleanup.ghost=1", "ghost"), ("ghost.x=1", "ghost"),
    ("fuse-batchnorm.rtol=-5", "rtol"), ("fuse-batchnorm.rtol=nan", "rtol"),
    ("fuse-batchnorm.rtol=inf", "rtol"), ("fuse-batchnorm.rtol=abc", "rtol"),
    ("cleanup.dedup_initializers=maybe", "dedup_initializers"),
    ("cleanup.dedup_initializers=", "dedup_initializers"),
]:  # fmt: skip
    _case(["--option", value], needle)
for value, needle in [
    ("ghost:1x16", "ghost"), ("x:", "--shape"), ("x:0x16", "--shape"), ("x:-1x16", "--shape"),
    ("x:axb", "--shape"), ("N=", "--shape"), ("N=-1", "--shape"), ("N=nan", "--shape"),
    ("N=0", "--shape"), ("=3", "--shape"), ("x:1x2x3", "x"), ("x:4x15", "x"), ("ghost=4", "ghost"),
    ("x:99999999x99999999", "--shape"), ("", "--shape"), ("x:1x16x", "--shape"),
]:  # fmt: skip
    _case(["--shape", value], needle)
for value in ("0", "-1", "abc", "1.5", "99999999999999999999", "", "nan"):
    _case(["--calib-samples", value], "--calib-samples")
for flag in ("--calib-method", "--quantize", "--activations", "--weight-format", "--external-data"):
    for value in ("bogus", ""):
        _case([flag, value], flag)
for value in ("", "nan", "-1", "0", "1.5", "inf", "abc", "2", "-inf", "0.5x"):
    _case(["--factorize", value], "--factorize")
for value in (
    "", "nan", "channels=", "channels=nan", "channels=1", "channels=-0.1", "channels=0.5x",
    "sparsity=2", "sparsity=nan", "sparsity=", "3:2", "0:4", "a:b", "2:", "bogus", "channels",
):  # fmt: skip
    _case(["--prune", value], "--prune")
for flag, values in [
    ("--max-error", (*BAD_NUMBERS, "-1")),
    ("--min-cosine", (*BAD_NUMBERS, "2", "-2")),
    ("--min-top1-agreement", (*BAD_NUMBERS, "1.5", "-0.1")),
    ("--outlier-ratio", (*BAD_NUMBERS, "-1")),
]:
    for value in values:
        _case([flag, value], flag)
for value, needle in [("", "--providers"), (",", "--providers"), ("bogus", "bogus"),
                      ("cpu,bogus", "bogus")]:  # fmt: skip
    _case(["--providers", value], needle)
for flag in ("--data", "--calib-cache", "--report", "--plan", "--replay", "--report-html"):
    _case([flag, ""], flag)
for stage in (["--quantize", "static"], ["--quantize", "dynamic"], ["--factorize", "0.5"],
              ["--prune", "auto"], ["--calib-method", "mse"], ["--require-faster"]):  # fmt: skip
    _case(["--passes", "cleanup", *stage], stage[0])
_case(["--quantize", "static"], "--data")
_case(["--bogus"], "--bogus")
_case(["--quantize"], "--quantize")


@pytest.mark.parametrize("args, needle", CASES, ids=[" ".join(a) or "''" for a, _ in CASES])
def test_a_bad_argument_is_refused_in_one_line_before_any_work(workspace, args, needle):
    before = workspace.snapshot()
    with no_temp_left():
        outcome = run_cli([str(workspace.model), "-o", "out.onnx", *args])
    check_refusal(outcome, needle)
    assert outcome.code == 2, outcome.err  # a usage error
    assert "usage:" not in outcome.err  # one line, not argparse's whole usage
    same_files(before, workspace.snapshot(), set())


DESTINATIONS = [
    ("-o", "", "-o"), ("-o", ".", "folder"), ("-o", "model.onnx", "model.onnx"),
    ("-o", "data.npz", "data.npz"), ("-o", "/dev/null", "/dev/null"),
    ("-o", "missing/o.onnx", "missing"), ("--report", ".", "folder"),
    ("--report", "model.onnx", "model.onnx"), ("--report", "data.npz", "data.npz"),
    ("--report", "out.onnx", "out.onnx"), ("--report", "missing/r.json", "missing"),
    ("--report", "out.onnx.data", "out.onnx.data"), ("--calib-cache", "model.onnx", "model.onnx"),
    ("--calib-cache", ".", "folder"), ("--report", "/dev/zero", "/dev/zero"),
    ("--plan", "model.onnx", "model.onnx"), ("--plan", "out.onnx", "out.onnx"),
    ("--plan", "missing/p.json", "missing"), ("--replay", "model.onnx", "not a plan"),
    ("--replay", "missing.json", "cannot read the plan"), ("--replay", "data.npz", "plan"),
]  # fmt: skip


@pytest.mark.parametrize("flag, value, needle", DESTINATIONS)
def test_a_bad_destination_is_refused_before_any_work(workspace, flag, value, needle):
    args = [str(workspace.model), "--data", "data.npz"]
    args += ["-o", value] if flag == "-o" else ["-o", "out.onnx", flag, value]
    before = workspace.snapshot()
    with no_temp_left():
        outcome = run_cli(args)
    check_refusal(outcome, needle)
    same_files(before, workspace.snapshot(), set())


BAD_DATA = {
    "missing": (None, "not found"),
    "empty folder": ("folder", "no .npz"),
    "text": (b"not an npz", "data"),
    "wrong name": ({"ghost": np.zeros((2, 16), np.float32)}, "ghost"),
    "missing input": ({}, "x"),
    "wrong rank": ({"x": np.zeros((2, 16, 1), np.float32)}, "x"),
    "wrong width": ({"x": np.zeros((2, 15), np.float32)}, "x"),
    "wrong type": ({"x": np.zeros((2, 16), np.int64)}, "x"),
    "all nan": ({"x": np.full((2, 16), np.nan, np.float32)}, "NaN"),
    "all inf": ({"x": np.full((2, 16), np.inf, np.float32)}, "inf"),
    "strings": ({"x": np.array([["a"] * 16] * 2)}, "x"),
    "object": ({"x": np.array([None] * 16, dtype=object)[None]}, "x"),
}


@pytest.mark.parametrize("what", sorted(BAD_DATA))
@pytest.mark.parametrize("mode", ["none", "static", "auto"])
def test_bad_data_is_refused_naming_the_file(workspace, what, mode):
    content, needle = BAD_DATA[what]
    path = workspace.root / "bad.npz"
    if content == "folder":
        path = workspace.root / "bad"
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, dict):
        np.savez(path, **content)
    before = workspace.snapshot()
    with no_temp_left():
        outcome = run_cli([str(workspace.model), "-o", "out.onnx", "--data", str(path),
                           "--quantize", mode])  # fmt: skip
    check_refusal(outcome, needle)
    same_files(before, workspace.snapshot(), set())


@pytest.mark.parametrize("mode", ["none", "static", "dynamic", "auto"])
def test_data_with_some_nan_is_data(workspace, mode):
    """A few NaN are data (scikit-learn imputers read them as missing values): the run goes
    on, and what it ships holds on the finite samples."""
    x = np.random.default_rng(1).standard_normal((8, 16)).astype(np.float32)
    x[0, 3] = np.nan
    np.savez(workspace.root / "some_nan.npz", x=x)
    outcome = run_cli([str(workspace.model), "-o", "out.onnx", "--data", "some_nan.npz",
                       "--quantize", mode])  # fmt: skip
    check_clean(outcome)
    if outcome.code == 0:
        import onnx

        onnx.checker.check_model(str(workspace.root / "out.onnx"))
    else:
        check_refusal(outcome)


def test_list_passes_with_a_model_says_nothing_was_squeezed(workspace):
    outcome = run_cli(["--list-passes", str(workspace.model), "-o", "out.onnx"])
    check_clean(outcome)
    assert outcome.code == 0 and "cleanup" in outcome.out
    assert "nothing squeezed" in outcome.err
    assert not (workspace.root / "out.onnx").exists()


def test_exclusions_naming_nothing_in_the_model_are_said(workspace):
    outcome = run_cli([str(workspace.model), "-o", "out.onnx", "--quantize", "dynamic",
                       "--exclude-nodes", "ghost", "--exclude-ops", "Conv"])  # fmt: skip
    check_clean(outcome)
    assert outcome.code == 0, outcome.err
    assert "ghost" in outcome.err and "Conv" in outcome.err
    assert "ghost" not in outcome.out


def test_empty_exclusions_exclude_nothing(workspace):
    """``--exclude-nodes "$LIST"`` with an empty list in a script: nothing kept float."""
    outcome = run_cli([str(workspace.model), "-o", "out.onnx", "--quantize", "dynamic",
                       "--exclude-nodes", " ", "--exclude-ops", ""])  # fmt: skip
    check_clean(outcome)
    assert outcome.code == 0 and "kept float" not in outcome.err, outcome.err


def test_warnings_go_to_stderr(workspace):
    outcome = run_cli([str(workspace.model), "-o", "out.onnx", "--quantize", "dynamic",
                       "--exclude-nodes", "ghost"])  # fmt: skip
    assert outcome.code == 0, outcome.err
    assert "warning" not in outcome.out.lower()
    assert "warning" in outcome.err.lower()


def test_the_report_gets_the_usual_permissions(workspace):
    old = os.umask(0o022)
    try:
        outcome = run_cli([str(workspace.model), "-o", "out.onnx", "--quantize", "none",
                           "--report", "r.json"])  # fmt: skip
    finally:
        os.umask(old)
    assert outcome.code == 0, outcome.err
    for name in ("r.json", "out.onnx"):
        assert (workspace.root / name).stat().st_mode & 0o777 == 0o644, name
