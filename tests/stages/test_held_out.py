"""The accuracy budget held on samples the search never saw: a seeded, deterministic split
of the data (or --eval-data), a result that only the search samples accept is caught, the
search tightened, and what the held-out figures can show is said."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import pytest

import onnxsqueeze
from onnxsqueeze.cli import main
from onnxsqueeze.core.errors import PipelineConfigError
from onnxsqueeze.core.io import load_model
from onnxsqueeze.run.confidence import answers_to_show, wilson_interval
from onnxsqueeze.run.feeds import Subset, count_samples, load_feeds
from onnxsqueeze.run.signature import input_specs
from onnxsqueeze.stages.held_out import MIN_HELD, split_data
from tests.conftest import weighted_model


def _classifier(tmp_path):
    """x[N, 64] -> MatMul -> Softmax over 32 classes whose first two columns are nearly the
    same: inputs along the third column are answered with a wide margin, inputs along the
    first land on a near tie between classes 0 and 1 that the noise decides in float and
    int8 weights (rounding the two columns alike) decide otherwise about half the time."""
    rng = np.random.default_rng(1)
    columns, _ = np.linalg.qr(rng.standard_normal((64, 32)))
    weight = (columns * 4).astype(np.float32)
    weight[:, 1] = weight[:, 0] + 1e-3 * columns[:, 3]  # below int8's step: rounded away
    model = weighted_model("MatMul", weight, ["n", 64])
    graph = model.graph
    logits = graph.output[0].name
    graph.output[0].name = "logits"
    for node in graph.node:
        node.output[:] = ["logits" if o == logits else o for o in node.output]
    graph.node.append(oh.make_node("Softmax", ["logits"], ["probs"], axis=-1))
    del graph.output[:]
    graph.output.append(oh.make_tensor_value_info("probs", onnx.TensorProto.FLOAT, ["n", 32]))
    path = tmp_path / "classifier.onnx"
    onnx.checker.check_model(model)
    onnx.save(model, path)

    def samples(column: int, count: int) -> list[dict]:
        noise = 0.05 * rng.standard_normal((count, 1, 64))
        x = columns[:, column] * 3 + noise
        return [{"x": row.astype(np.float32)} for row in x]

    return path, samples


def test_a_result_only_the_search_samples_accept_is_caught(tmp_path):
    """Searched on clear answers, the int8 model agrees on every one; on near ties (the
    held-out set) it flips about half. Without a held-out check it ships; with one, every
    tightened search is caught too and the model ships without quantization."""
    path, samples = _classifier(tmp_path)
    search, near_ties = samples(2, 48), samples(0, 48)
    fooled = onnxsqueeze.squeeze_file(
        path, tmp_path / "fooled.onnx", data=search, quantize="dynamic", holdout=0
    )
    assert fooled.quantization["applied"]
    assert fooled.held_out == {"how": "none: holdout is off", "checked": False}
    caught = onnxsqueeze.squeeze_file(
        path, tmp_path / "caught.onnx", data=search, eval_data=near_ties, quantize="dynamic"
    )
    record = caught.held_out
    assert record["met"] is not True
    first = record["attempts"][0]
    assert "class agreement 1.0000" in first["search"]
    assert first["met"] is False and "class agreement" in first["held_out"]
    assert not caught.quantization["applied"]
    shipped = onnx.load(tmp_path / "caught.onnx")
    assert {n.op_type for n in shipped.graph.node} >= {"MatMul", "Softmax"}
    assert not any("Integer" in n.op_type or "Quant" in n.op_type for n in shipped.graph.node)
    assert any("held-out" in w for w in caught.warnings)


def test_the_split_is_seeded_deterministic_and_disjoint(tmp_path):
    path, samples = _classifier(tmp_path)
    model = load_model(str(path)).model
    data = samples(2, 40)
    for index, feed in enumerate(data):
        feed["x"][0, 0] = index  # each sample tells its position
    first = split_data(model, data, None, 0.25, seed=0, shapes=None, probes=32)
    again = split_data(model, data, None, 0.25, seed=0, shapes=None, probes=32)
    other = split_data(model, data, None, 0.25, seed=1, shapes=None, probes=32)
    specs = input_specs(model)

    def positions(feeds):
        return sorted(int(f["x"][0, 0]) for f in feeds)

    held = positions(first.held)
    assert held == positions(again.held) != positions(other.held)
    assert first.held_count == len(held) == 10 and first.search_count == 30
    searched = positions(load_feeds(first.search, specs))
    assert sorted(held + searched) == list(range(40))
    assert "seed 0" in first.how


def test_a_folder_split_reads_only_its_part(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for index in range(20):
        np.savez(folder / f"{index:02d}.npz", x=np.full((1, 64), index, np.float32))
    np.save(folder / "odd.npy", np.zeros(1))  # counted as a file, like iter_feeds reads it
    assert count_samples(folder) == 21
    part = Subset(str(folder), frozenset({0, 5, 7}))
    specs = input_specs(load_model(str(_classifier(tmp_path)[0])).model)
    assert [int(f["x"][0, 0]) for f in load_feeds(part, specs)] == [0, 5, 7]
    assert len(part) == 3 and len(Subset(str(folder), frozenset({0}), keep=False)) == 20


def test_one_batched_sample_is_split_by_rows(tmp_path):
    path, _ = _classifier(tmp_path)
    model = load_model(str(path)).model
    rows = np.arange(64 * 64, dtype=np.float32).reshape(64, 64)
    split = split_data(model, [{"x": rows}], None, 0.25, seed=0, shapes=None, probes=32)
    assert split.units == "rows" and split.held_count == 16 and split.search_count == 48
    held, search = split.held[0]["x"], split.search[0]["x"]
    assert held.shape == (16, 64) and search.shape == (48, 64)
    assert not set(held[:, 0]) & set(search[:, 0])


def test_too_few_samples_are_not_split_and_the_report_says_so(tmp_path):
    path, samples = _classifier(tmp_path)
    few = samples(2, MIN_HELD + 3)
    report = onnxsqueeze.squeeze_file(path, tmp_path / "o.onnx", data=few, quantize="dynamic")
    assert report.held_out["checked"] is False
    assert "too few" in report.held_out["how"]
    if report.quantization["applied"]:
        assert any("search data only" in w for w in report.warnings)


def test_agreement_intervals_say_what_the_held_out_data_can_show(tmp_path):
    low, high = wilson_interval(1.0, 32)
    assert high == 1.0 and 0.89 < low < 0.90  # 32 of 32 cannot show 99 %
    assert answers_to_show(0.99) == 381 and answers_to_show(1.0) is None
    assert wilson_interval(0.5, 400)[0] == pytest.approx(0.451, abs=1e-3)
    path, samples = _classifier(tmp_path)
    data = samples(2, 64)
    report = onnxsqueeze.squeeze_file(path, tmp_path / "o.onnx", data=data, quantize="dynamic")
    assert report.held_out["met"] is True
    confidence = report.held_out["confidence"]["probs"]
    assert confidence["answers"] == 16 and confidence["low"] < 0.99
    assert any("too few to show the 0.99 limit" in w for w in report.warnings)
    table = report.to_table()
    assert "held-out check: met (16 of 64 samples, drawn with seed 0" in table
    from onnxsqueeze.pipeline.html import squeeze_page

    assert "held-out samples: 16 of 64 samples" in squeeze_page(report)


def test_the_cli_takes_eval_data_and_holdout(tmp_path, capsys):
    path, samples = _classifier(tmp_path)
    folder = tmp_path / "held"
    folder.mkdir()
    for index, feed in enumerate(samples(2, 12)):
        np.savez(folder / f"{index}.npz", **feed)
    data = tmp_path / "data.npz"
    np.savez(data, x=np.concatenate([f["x"] for f in samples(2, 32)]))
    out = tmp_path / "o.onnx"
    code = main([str(path), "-o", str(out), "--data", str(data), "--eval-data", str(folder),
                 "--quantize", "dynamic"])  # fmt: skip
    assert code == 0
    assert "held-out check: met (the eval data, all 12 judged" in capsys.readouterr().out
    assert main([str(path), "-o", str(out), "--holdout", "1"]) == 2
    assert "--holdout" in capsys.readouterr().err
    code = main([str(path), "-o", str(folder / "0.npz"), "--eval-data", str(folder)])
    assert code == 1 and "refusing to overwrite a --eval-data file" in capsys.readouterr().err
    with pytest.raises(PipelineConfigError, match="holdout="):
        onnxsqueeze.squeeze(onnx.load(path), holdout=float("nan"))
