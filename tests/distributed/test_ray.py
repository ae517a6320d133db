"""Scale-out on a local Ray cluster (2 CPUs): the same statistics and choices as one
process, a dead worker's work retried, and clean errors when Ray cannot help."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxsqueeze
from onnxsqueeze import Budget, QuantizeConfig
from onnxsqueeze.calib.calibrate import calibrate as calibrate_here
from onnxsqueeze.core.errors import MissingDependencyError, SqueezeError
from onnxsqueeze.distributed import calibration as sharding
from onnxsqueeze.distributed.retries import FAULT_ONCE
from onnxsqueeze.run.feeds import Subset, count_samples, load_feeds, part
from onnxsqueeze.run.signature import input_specs
from onnxsqueeze.run.workers import using

ray = pytest.importorskip("ray")

REPO = Path(__file__).resolve().parents[2]
DIGITS = REPO / "models" / "digits_cnn.onnx"
#: A budget the digits CNN's fully quantized model misses: exact sensitivity (4 candidate
#: models) and a bisection decide which nodes stay float.
TIGHT = QuantizeConfig(mode="static", budget=Budget(min_cosine=0.99999))


@pytest.fixture(scope="module")
def fault_marker(tmp_path_factory) -> Path:
    """The fault-injection marker the cluster's workers see: present (no fault) until a
    test removes it; the next piece of work then dies once and puts it back."""
    marker = tmp_path_factory.mktemp("fault") / "died"
    marker.touch()
    return marker


@pytest.fixture(scope="module")
def cluster(fault_marker):
    """One local 2-CPU cluster for the module; every pool() joins it."""
    mp = pytest.MonkeyPatch()
    mp.setenv(FAULT_ONCE, str(fault_marker))  # workers inherit it at start
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()
    mp.undo()


@pytest.fixture
def small_shards(monkeypatch):
    monkeypatch.setattr(sharding, "MIN_SHARD", 16)


def _same_statistics(a, b) -> None:
    assert a.samples == b.samples
    assert set(a.observers) == set(b.observers)
    for name, mine in a.observers.items():
        theirs = b.observers[name]
        assert (mine.lo, mine.hi, mine.finite, mine.batches) == (
            theirs.lo,
            theirs.hi,
            theirs.finite,
            theirs.batches,
        ), name
        if mine.kind == "histogram":
            assert mine.t == theirs.t, name
            assert np.array_equal(mine.counts, theirs.counts), name


# ------------------------------------------------------------------ no cluster needed


@pytest.mark.parametrize("samples,stack,count", [(256, 2, 2), (100, 3, 4), (17, 16, 2), (5, 1, 8)])
def test_shards_cover_the_samples_cut_on_whole_stacks(samples, stack, count):
    cuts = [sharding.shards(samples, stack, count, i) for i in range(count)]
    assert cuts[0][0] == 0 and cuts[-1][1] == samples
    for (_, stop), (start, _) in zip(cuts, cuts[1:], strict=False):
        assert stop == start  # contiguous, no sample twice or missed
    for start, stop in cuts:
        assert start % stack == 0 and (stop % stack == 0 or stop == samples)


def test_a_part_reads_only_its_samples(digits_folder):
    specs = input_specs(onnxsqueeze.load_model(DIGITS).model)
    whole = load_feeds(digits_folder, specs)
    shard = part(digits_folder, 40, 48)
    assert isinstance(shard, Subset) and count_samples(shard) == 8
    got = load_feeds(shard, specs)
    assert all(
        np.array_equal(g["image"], w["image"]) for g, w in zip(got, whole[40:48], strict=True)
    )
    # a part of a part (the held-out split's search samples) counts from the outer part
    search = Subset(digits_folder, frozenset(range(0, 160, 4)), keep=False)
    inner = load_feeds(part(search, 3, 6), specs)
    expected = [w for i, w in enumerate(whole) if i % 4][3:6]
    assert all(np.array_equal(g["image"], e["image"]) for g, e in zip(inner, expected, strict=True))
    assert part(whole, 2, 5) == whole[2:5]


def test_missing_ray_is_one_line_naming_the_extra(monkeypatch):
    from onnxsqueeze.distributed import pool

    monkeypatch.setitem(sys.modules, "ray", None)
    with (
        pytest.raises(MissingDependencyError, match=r"pip install 'onnxsqueeze\[ray\]'"),
        pool(2),
    ):
        pass


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_workers_must_be_a_positive_whole_number(bad):
    with pytest.raises(SqueezeError, match="workers="):
        onnxsqueeze.squeeze(str(DIGITS), quantize="dynamic", workers=bad)


def test_an_address_where_no_cluster_answers_fails_at_once():
    with pytest.raises(SqueezeError, match="no Ray cluster answers"):
        onnxsqueeze.squeeze(str(DIGITS), quantize="dynamic", ray_address="127.0.0.1:1")


# ------------------------------------------------------------------ on the cluster


@pytest.mark.parametrize("method", ["percentile", "minmax"])
def test_sharded_calibration_is_bit_identical_to_one_process(
    cluster, digits_folder, small_shards, method
):
    from onnxsqueeze.distributed import pool

    alone = calibrate_here(str(DIGITS), digits_folder, method=method)
    with pool(2) as workers, using(workers):
        sharded = calibrate_here(str(DIGITS), digits_folder, method=method)
    assert workers.record["calibration_shards"] == 2
    assert sum(workers.record["calibration"]["shards"]) == 160
    _same_statistics(sharded, alone)
    assert sharded.ranges(method) == alone.ranges(method)


def test_workers_read_their_shards_from_a_uri(cluster, digits_folder, small_shards):
    """Data behind a URI (here file://, as s3:// or gs:// would be read): each worker lists
    and reads its own shard's files; the statistics are those of the local folder."""
    from onnxsqueeze.distributed import pool

    alone = calibrate_here(str(DIGITS), digits_folder, method="percentile")
    with pool(2) as workers, using(workers):
        sharded = calibrate_here(str(DIGITS), digits_folder.as_uri(), method="percentile")
    assert workers.record["calibration_shards"] == 2
    _same_statistics(sharded, alone)


def test_the_budget_search_on_workers_makes_the_same_model(cluster, digits_folder, small_shards):
    alone, alone_report = onnxsqueeze.squeeze(str(DIGITS), quantize=TIGHT, data=digits_folder)
    spread, report = onnxsqueeze.squeeze(str(DIGITS), quantize=TIGHT, data=digits_folder, workers=2)
    assert report.quantization["sensitivity"] == "exact"
    assert report.workers["models_run"] >= 4  # one model per candidate, at least
    assert report.workers["calibration_shards"] == 2
    assert report.quantization["nodes"] == alone_report.quantization["nodes"]
    assert spread.SerializeToString() == alone.SerializeToString()
    assert alone_report.workers is None


def test_a_dead_worker_is_retried_with_the_same_result(
    cluster, digits_folder, fault_marker, small_shards
):
    from onnxsqueeze.distributed import pool

    alone = calibrate_here(str(DIGITS), digits_folder, method="percentile")
    fault_marker.unlink()  # armed: the next shard's worker process dies once
    with pool(2) as workers, using(workers):
        sharded = calibrate_here(str(DIGITS), digits_folder, method="percentile")
    assert fault_marker.exists(), "no worker died: the retry was not exercised"
    _same_statistics(sharded, alone)

    expected, _ = onnxsqueeze.squeeze(str(DIGITS), quantize=TIGHT, data=digits_folder)
    fault_marker.unlink()  # now a candidate model's worker dies once
    again, report = onnxsqueeze.squeeze(str(DIGITS), quantize=TIGHT, data=digits_folder, workers=2)
    assert fault_marker.exists()
    assert again.SerializeToString() == expected.SerializeToString()


def test_an_external_data_model_is_read_in_place_by_workers(
    cluster, digits_folder, digits_external, small_shards
):
    """Its weights travel as where they lie (no 1.5 GB limit, nothing through the object
    store): the shards and candidates run on the workers, with one process's results."""
    from onnxsqueeze.distributed import pool

    alone = calibrate_here(str(digits_external), digits_folder, method="percentile")
    with pool(2) as workers, using(workers):
        sharded = calibrate_here(str(digits_external), digits_folder, method="percentile")
    assert workers.record["calibration_shards"] == 2
    assert workers.record["weights_read_in_place"] >= 4  # the CNN's weights and biases
    _same_statistics(sharded, alone)

    expected, _ = onnxsqueeze.squeeze(str(digits_external), quantize=TIGHT, data=digits_folder)
    spread, report = onnxsqueeze.squeeze(
        str(digits_external), quantize=TIGHT, data=digits_folder, workers=2
    )
    assert report.workers["models_run"] >= 4 and report.workers["calibration_shards"] == 2
    assert report.workers["weights_read_in_place"] >= 4 * report.workers["models_run"]
    assert spread.SerializeToString() == expected.SerializeToString()


def test_workers_without_lossy_work_say_so(cluster):
    _, report = onnxsqueeze.squeeze(str(DIGITS), workers=2)
    assert report.workers is None
    assert any("nothing to spread" in w for w in report.warnings)


# ------------------------------------------------------------------ command line


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "onnxsqueeze", *args], capture_output=True, text=True
    )


def test_cli_workers_report_what_ran_where(tmp_path, digits_folder):
    out, report = tmp_path / "small.onnx", tmp_path / "report.json"
    done = _cli(
        str(DIGITS), "-o", str(out), "--quantize", "static", "--min-cosine", "0.99999",
        "--data", str(digits_folder), "--workers", "2", "--report", str(report),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "workers: 2 on Ray" in done.stdout
    record = json.loads(report.read_text())["workers"]
    assert record["backend"] == "ray" and record["models_run"] >= 4
    onnx.checker.check_model(str(out))


def test_cli_bad_workers_and_unreachable_cluster_are_one_line_and_write_nothing(tmp_path):
    out = tmp_path / "small.onnx"
    done = _cli(str(DIGITS), "-o", str(out), "--workers", "0")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) <= 2
    assert "--workers" in done.stderr
    done = _cli(
        str(DIGITS), "-o", str(out), "--quantize", "dynamic", "--ray-address", "127.0.0.1:1"
    )
    assert done.returncode != 0
    assert "no Ray cluster answers" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) <= 2
    assert not out.exists()


def test_two_runs_in_two_threads_share_the_cluster_and_match(cluster, digits_folder):
    from concurrent.futures import ThreadPoolExecutor

    expected, _ = onnxsqueeze.squeeze(str(DIGITS), quantize=TIGHT, data=digits_folder)

    def run(_: int) -> bytes:
        model, report = onnxsqueeze.squeeze(
            str(DIGITS), quantize=TIGHT, data=digits_folder, workers=2
        )
        assert report.workers["models_run"] >= 4
        return model.SerializeToString()

    with ThreadPoolExecutor(2) as threads:
        results = list(threads.map(run, range(2)))
    assert results == [expected.SerializeToString()] * 2
    assert ray.is_initialized()  # the runs joined the module's cluster and left it running
