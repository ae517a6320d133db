"""The same squeeze gives the same bytes: run twice, or twice at once in two threads of one
process (a serving process squeezing two requests), for the modes whose choices do not
depend on timing (auto's latency checks do: see the report's timing decisions)."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest

import onnxsqueeze

REPO = Path(__file__).resolve().parents[2]
DIGITS = REPO / "models" / "digits_cnn.onnx"
DATA = REPO / "models" / "digits_test.npz"


def _squeeze(out: Path, quantize: str) -> str:
    onnxsqueeze.squeeze_file(DIGITS, out, data=str(DATA), quantize=quantize)
    return hashlib.sha256(out.read_bytes()).hexdigest()


@pytest.mark.parametrize("quantize", ["none", "dynamic", "static", "weights-int8"])
def test_two_threads_give_the_bytes_of_two_sequential_runs(tmp_path, quantize):
    sequential = [_squeeze(tmp_path / f"s{i}.onnx", quantize) for i in range(2)]
    assert sequential[0] == sequential[1]
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            results[i] = _squeeze(tmp_path / f"t{i}.onnx", quantize)
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert results == {0: sequential[0], 1: sequential[0]}
