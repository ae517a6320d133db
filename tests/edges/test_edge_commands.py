"""``bench``, ``compare`` and ``inspect`` meet the same edges as a squeeze: a bad argument or
file is refused in one line naming it, before any work; no input is touched; no report is
written onto a file the run reads or into a missing folder."""

from __future__ import annotations

import pytest
from harness import check_refusal, no_temp_left, run_cli, same_files


def _cases(ws) -> list[tuple[list[str], str]]:
    m, d = str(ws.model), str(ws.data)
    return [
        (["bench"], "MODEL"),
        (["bench", m, "--batch", "0"], "--batch"),
        (["bench", m, "--batch", "1,x"], "--batch"),
        (["bench", m, "--rounds", "nan"], "--rounds"),
        (["bench", m, "--threads", "-1"], "--threads"),
        (["bench", m, "--providers", "ghost"], "ghost"),
        (["bench", m, "--providers", ""], "--providers"),
        (["bench", m, "--shape", "ghost:1x16"], "ghost"),
        (["bench", m, "--data", ""], "--data"),
        (["bench", m, "--json", m], "--json"),
        (["bench", m, "--json", d, "--data", d], "--json"),
        (["bench", m, "--json", str(ws.root / "missing" / "b.json")], "does not exist"),
        (["bench", m, "--json", str(ws.root)], "--json"),
        (["bench", str(ws.root / "ghost.onnx")], "ghost.onnx"),
        (["bench", str(ws.secret)], "secret.bin"),
        (["compare", m], "SQUEEZED"),
        (["compare", m, str(ws.root / "ghost.onnx")], "ghost.onnx"),
        (["compare", m, m, "--samples", "0"], "--samples"),
        (["compare", m, m, "--report-html", m], "--report-html"),
        (["compare", m, m, "--json", d, "--data", d], "--json"),
        (["inspect"], "MODEL"),
        (["inspect", str(ws.root)], "directory"),
        (["inspect", str(ws.secret)], "not a valid ONNX"),
        (["inspect", m, "--json", m], "--json"),
        (["inspect", "/dev/null"], "not a regular file"),
    ]


@pytest.mark.parametrize("index", range(25))
def test_commands_refuse_bad_arguments_in_one_line(workspace, index):
    args, needle = _cases(workspace)[index]
    before = workspace.snapshot()
    with no_temp_left():
        outcome = run_cli(args)
    check_refusal(outcome, needle)
    same_files(before, workspace.snapshot(), set())


def test_the_case_list_is_whole(workspace):
    assert len(_cases(workspace)) == 25
