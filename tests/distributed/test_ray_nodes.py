"""A cluster of two Ray nodes (two raylets on this machine, one CPU each), joined with
``ray_address=`` as a user joins theirs: the shards and candidate models go to both nodes,
an external-data model's weights are read where they lie, and the model and choices are
one process's."""

from __future__ import annotations

from pathlib import Path

import pytest

import onnxsqueeze
from onnxsqueeze import Budget, QuantizeConfig
from onnxsqueeze.distributed import calibration as sharding

ray = pytest.importorskip("ray")
cluster_utils = pytest.importorskip("ray.cluster_utils")

REPO = Path(__file__).resolve().parents[2]
DIGITS = REPO / "models" / "digits_cnn.onnx"
TIGHT = QuantizeConfig(mode="static", budget=Budget(min_cosine=0.99999))


@pytest.fixture(scope="module")
def two_nodes():
    if ray.is_initialized():
        ray.shutdown()
    nodes = cluster_utils.Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False}
    )
    nodes.add_node(num_cpus=1)
    nodes.wait_for_nodes()
    yield nodes.address
    if ray.is_initialized():
        ray.shutdown()
    nodes.shutdown()


def test_two_nodes_give_one_process_s_model(two_nodes, digits_folder, digits_external, monkeypatch):
    monkeypatch.setattr(sharding, "MIN_SHARD", 16)
    for model in (DIGITS, digits_external):
        alone, alone_report = onnxsqueeze.squeeze(str(model), quantize=TIGHT, data=digits_folder)
        spread, report = onnxsqueeze.squeeze(
            str(model), quantize=TIGHT, data=digits_folder, ray_address=two_nodes
        )
        record = report.workers
        assert record["workers"] == 2 and record["nodes"] == "this machine"
        assert record["nodes_used"] == 2, record  # both raylets took work
        assert record["calibration_shards"] == 2 and record["models_run"] >= 4
        assert report.quantization["nodes"] == alone_report.quantization["nodes"]
        assert spread.SerializeToString() == alone.SerializeToString()
    assert record["weights_read_in_place"] > 0
