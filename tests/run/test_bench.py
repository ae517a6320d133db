"""``onnxsqueeze bench``: interleaved timing of several models per provider and batch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxsqueeze.cli import main
from onnxsqueeze.run.bench import bench
from tests.conftest import weighted_model

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.fixture
def two_models(tmp_path: Path) -> list[Path]:
    """A 256x256 MatMul and a 256x1024 one: the second does 4x the work."""
    rng = np.random.default_rng(0)
    paths = []
    for width in (256, 1024):
        weight = rng.standard_normal((256, width)).astype(np.float32)
        proto = weighted_model("MatMul", weight, ["batch", 256])
        path = tmp_path / f"mm{width}.onnx"
        onnx.save(proto, path)
        paths.append(path)
    return paths


def test_bench_times_each_model_and_gives_ratios_to_the_first(two_models):
    report = bench(two_models, batches=[1, 16], rounds=3)
    assert [(r.batch, Path(r.model).name) for r in report.results] == [
        (1, "mm256.onnx"),
        (1, "mm1024.onnx"),
        (16, "mm256.onnx"),
        (16, "mm1024.onnx"),
    ]
    for row in report.results:
        assert row.status == "ok", row.reason
        assert 0 < row.p50_ms <= row.p90_ms <= row.p99_ms
        assert len(row.round_p50_ms) == 3 and row.runs >= 3 * 3
        assert row.spread >= 0
        assert row.throughput == pytest.approx(row.batch * 1000 / row.p50_ms)
        assert row.size_bytes == Path(row.model).stat().st_size
        assert row.nodes_by_provider == {"CPUExecutionProvider": 1}
        assert row.create_ms > 0
        assert row.memory_bytes is None or row.memory_bytes > 0
    first, second = report.results[2:]
    assert first.speedup == 1.0
    assert second.speedup == pytest.approx(first.p50_ms / second.p50_ms)
    # 16 rows of 4x the weights: the larger model is slower, whatever the machine's noise
    assert second.speedup < 1.0


def test_session_memory_is_measured_apart_for_each_model(two_models):
    """Each model's load is measured in its own fresh process: the 1 MiB model's session adds
    about its weights, the 4 MiB one's more, in either order."""
    report = bench(list(reversed(two_models)), rounds=1)
    sizes = {Path(r.model).name: r.memory_bytes for r in report.results}
    if None in sizes.values():
        pytest.skip("peak RSS is not readable on this system")
    assert sizes["mm1024.onnx"] > sizes["mm256.onnx"]
    assert sizes["mm1024.onnx"] >= 1024 * 256 * 4


def test_a_missing_provider_is_reported_not_crashed_on(two_models):
    report = bench(two_models[:1], providers=["cpu", "tensorrt"], rounds=1, measure_cost=False)
    cpu, trt = report.results
    assert cpu.status == "ok"
    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        assert trt.status == "unavailable" and "not in this onnxruntime build" in trt.reason
        assert trt.p50_ms is None


def test_batch_fills_the_dynamic_first_axis_and_refuses_a_fixed_one(tmp_path, two_models):
    from onnxsqueeze.core.errors import CalibrationDataError

    fixed = tmp_path / "fixed.onnx"
    weight = np.ones((4, 2), np.float32)
    onnx.save(weighted_model("MatMul", weight, [1, 4]), fixed)
    with pytest.raises(CalibrationDataError, match="fixed batch of 1"):
        bench([fixed], batches=[8], rounds=1)
    data = tmp_path / "x.npz"
    np.savez(data, x=np.ones((2, 256), np.float32))
    report = bench(two_models[:1], batches=[5], data=data, rounds=1, measure_cost=False)
    assert report.results[0].status == "ok"  # 2 rows cycled to 5


def test_cli_bench_prints_a_table_and_writes_versioned_json(two_models, tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", *map(str, two_models), "--rounds", "2", "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "p50 ms" in text and "mm1024.onnx" in text and "1.00x" in text
    report = json.loads(out.read_text())
    assert report["schema"] == "onnxsqueeze.bench" and report["schema_version"] == 1
    assert {r["model"] for r in report["results"]} == set(map(str, two_models))
    assert all(r["p50_ms"] > 0 for r in report["results"])


def test_cli_bench_refuses_a_missing_model_in_one_line(tmp_path, capsys):
    code = main(["bench", str(tmp_path / "ghost.onnx")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "ghost.onnx: file not found" in err[0]


@pytest.mark.skipif(not HAS_CUDA, reason="onnxruntime-gpu with a CUDA device is not here")
def test_bench_on_cuda_places_the_model_on_the_gpu(two_models):
    report = bench(two_models, providers=["cuda"], batches=[1, 64], rounds=3)
    for row in report.results:
        assert row.status == "ok", row.reason
        assert row.nodes_by_provider is None or row.nodes_by_provider.get("CUDAExecutionProvider")
        if row.gpu_memory_bytes is not None:
            assert row.gpu_memory_bytes >= 0
