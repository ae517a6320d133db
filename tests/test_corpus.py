"""The real corpus: every model squeezes, passes onnx.checker, loads in onnxruntime, and
gives the original's outputs on real inputs. Built by ``python models/build_corpus.py``;
without it these tests skip, unless ONNXSQUEEZE_REQUIRE_CORPUS=1 (CI) turns that into a failure.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxsqueeze.cli import main as cli_main
from onnxsqueeze.core.errors import VerificationError
from tests.conftest import require_corpus

import corpus

pytestmark = pytest.mark.corpus

NEEDS_TRAINING_RUNTIME = {"simple/test_gradient_of_add", "simple/test_gradient_of_add_and_mul"}


def _run(model: str | Path | onnx.ModelProto, feeds: dict) -> list:
    """onnxruntime running the graph as written (no graph rewrites, no weight prepacking, whose
    summation order differs for constant weights); onnx.reference if it cannot load."""
    import onnxruntime as ort

    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.add_session_config_entry("session.disable_prepacking", "1")
    try:
        session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception:
        from onnx.reference import ReferenceEvaluator

        proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
        return ReferenceEvaluator(proto).run(None, feeds)
    return session.run(None, feeds)


def _assert_same(reference: list, candidate: list, rtol: float = 1e-6) -> None:
    assert len(reference) == len(candidate)
    for a, b in zip(reference, candidate, strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape and a.dtype == b.dtype
        if a.dtype.kind in "fc":
            finite = np.isfinite(a)
            np.testing.assert_array_equal(np.isfinite(b), finite)
            scale = float(np.abs(a[finite]).max()) if finite.any() else 0.0
            err = float(np.abs(a[finite] - b[finite]).max()) if finite.any() else 0.0
            assert err <= rtol * max(scale, 1e-30), f"max abs {err} vs scale {scale}"
        else:
            np.testing.assert_array_equal(a, b)


def _squeeze_cli(entry: corpus.CorpusModel, out: Path, report: Path, *extra: str) -> int:
    """The CLI on a corpus model with its probe data, quietly, with a JSON report."""
    args = [str(entry.path), "-o", str(out), "--data", str(entry.probe_dir)]
    return cli_main([*args, "--report", str(report), *extra, "-q"])


@pytest.mark.parametrize("entry", corpus.MODELS, ids=lambda e: e.name)
def test_corpus_model_through_cli(entry: corpus.CorpusModel, tmp_path: Path) -> None:
    require_corpus(entry)
    out = tmp_path / "out.onnx"
    report = tmp_path / "report.json"
    code = _squeeze_cli(entry, out, report, "--quantize", "none")
    assert code == 0
    import json

    data = json.loads(report.read_text())
    assert data["verification_status"] == "passed"
    assert data["verification_backend"] == "onnxruntime"
    assert all(p["status"] in ("applied", "unchanged") for p in data["passes"]), data["passes"]
    onnx.checker.check_model(str(out), full_check=True)
    assert out.stat().st_size <= entry.path.stat().st_size
    assert data["after"]["nodes"] <= data["before"]["nodes"]
    # Exact rewrites keep outputs within 1e-6 of their scale; applied fusions add their own
    # declared tolerance (float reassociation), which the report records per pass.
    rtol = 1e-6 + sum(
        p["tolerance"] - 1e-6
        for p in data["passes"]
        if p["status"] == "applied" and (p["tolerance"] or 0) > 1e-6
    )
    for sample in sorted(entry.probe_dir.glob("*.npz")):
        with np.load(sample) as arrays:
            feeds = dict(arrays)
        _assert_same(_run(entry.path, feeds), _run(out, feeds), rtol=rtol)


def test_silero_if_bodies_are_cleaned() -> None:
    """silero-vad keeps its compute inside nested If bodies: cleanup must reach them."""
    entry = corpus.get("silero_vad")
    require_corpus(entry)
    import onnx_ir as ir

    from onnxsqueeze.passes.cleanup import CleanupPass

    model = ir.load(entry.path)

    def constants(m: ir.Model) -> int:
        return sum(
            1 for n in ir.traversal.RecursiveGraphIterator(m.graph) if n.op_type == "Constant"
        )

    assert constants(model) > 0
    CleanupPass()(model)
    assert constants(model) == 0


CASES = list(corpus.onnx_test_cases())


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_onnx_package_test_model(case: corpus.OnnxTestCase, tmp_path: Path) -> None:
    proto = onnx.load(case.model)
    initializers = {t.name for t in proto.graph.initializer}
    names = [i.name for i in proto.graph.input if i.name not in initializers]
    data = [dict(zip(names, case.inputs, strict=True))] if case.inputs else None
    out = tmp_path / "out.onnx"
    args = [str(case.model), "-o", str(out), "-q"]
    if case.name in NEEDS_TRAINING_RUNTIME:
        # Neither onnxruntime nor onnx.reference runs ai.onnx.preview.training.Gradient:
        # verification must refuse clearly, and --no-verify still works.
        import onnxsqueeze

        with pytest.raises(VerificationError, match="cannot verify"):
            onnxsqueeze.squeeze(proto, data=data)
        assert cli_main([*args, "--no-verify"]) == 0
        onnx.checker.check_model(str(out))
        return
    # Through the API: string inputs cannot travel in a pickle-free .npz for the CLI.
    from onnxsqueeze.api import squeeze_file

    report = squeeze_file(case.model, out, data=data)
    assert report.verification_status == "passed"
    assert all(p.status in ("applied", "unchanged") for p in report.passes), report.passes
    onnx.checker.check_model(str(out))
    feeds = data[0] if data else _feeds_from_signature(proto)
    original = _run(proto, feeds)
    _assert_same(original, _run(out, feeds))
    if case.inputs and case.outputs:
        # The shipped reference outputs agree with the original (sanity of the harness).
        for want, got in zip(case.outputs, original, strict=False):
            if np.asarray(want).dtype.kind in "OSU":
                np.testing.assert_array_equal(
                    np.asarray(got).astype(str), np.asarray(want).astype(str)
                )
            else:
                np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)


def _feeds_from_signature(proto: onnx.ModelProto) -> dict:
    import onnx_ir as ir

    from onnxsqueeze.run.probes import random_feeds
    from onnxsqueeze.run.signature import input_specs

    return random_feeds(input_specs(ir.serde.deserialize_model(proto)), count=1)[0]


@pytest.mark.parametrize("name", ["minilm", "ppocr_det"])
def test_calibration_with_variable_input_sizes(name: str, tmp_path: Path) -> None:
    """Sentences of different lengths and images of different sizes: the histograms grow
    and merge (onnxruntime's histogram calibrators crash on these)."""
    import numpy as np

    import onnxsqueeze

    entry = corpus.get(name)
    require_corpus(entry)
    feeds = [dict(np.load(p)) for p in sorted(entry.probe_dir.glob("*.npz"))]
    shapes = {tuple(v.shape) for f in feeds for v in f.values()}
    assert len(shapes) > 1
    cache = tmp_path / "calib.npz"
    result = onnxsqueeze.calibrate(str(entry.path), feeds, method="entropy", cache=cache)
    assert result.samples == len(feeds) and len(result) > 100
    for method in ("entropy", "percentile", "minmax"):
        ranges = result.ranges(method)
        assert all(np.isfinite(lo) and np.isfinite(hi) and lo <= hi for lo, hi in ranges.values())
    again = onnxsqueeze.calibrate(str(entry.path), None, method="percentile", cache=cache)
    assert again.ranges("percentile") == result.ranges("percentile")


def test_silero_static_qdq_inside_if_bodies() -> None:
    """silero-vad computes everything inside If branches, where onnxruntime's static
    quantizer places nothing: the branch values are calibrated through the Ifs and QDQ goes
    into the 16 kHz branch (the probes' sample rate), verified against float."""
    import onnx_ir as ir

    from onnxsqueeze.run.compare import compare_runs
    from onnxsqueeze.run.session import Session
    from onnxsqueeze.stages.quantize import QuantizeConfig, quantize_model

    entry = corpus.get("silero_vad")
    require_corpus(entry)
    feeds = [dict(np.load(p)) for p in sorted(entry.probe_dir.glob("*.npz"))]
    feeds16 = [f for f in feeds if int(f["sr"]) == 16000]
    model = ir.load(str(entry.path))
    outcome = quantize_model(model, feeds16, QuantizeConfig(method="minmax"), calib_feeds=feeds16)
    record = outcome.record
    assert record["applied"] and record["budget_met"], record
    in_bodies = [
        n
        for graph in outcome.model.graphs()
        if graph is not outcome.model.graph
        for n in graph
        if n.op_type == "QuantizeLinear"
    ]
    assert in_bodies, "no QDQ inside the If bodies"
    proto = ir.serde.serialize_model(outcome.model)
    onnx.checker.check_model(proto)
    got = Session(outcome.model, optimize=True).run_all(feeds)  # 8 kHz branch too
    want = Session(model).run_all(feeds)
    assert compare_runs(want, got).min_cosine >= 0.99


@pytest.mark.parametrize("name", ["ppocr_cls", "magika"])
def test_static_quantization_of_corpus_models(name: str, tmp_path: Path) -> None:
    """Through the CLI on real probe data: a valid model within a cosine budget. (The
    default budget also asks 99 % top-1 agreement of class outputs, which static int8
    meets on magika's probes or not depending on which real files they hold: it changes
    about 4 % of labels, docs/benchmarks/quantization.md.)"""
    import json

    entry = corpus.get(name)
    require_corpus(entry)
    out = tmp_path / "q.onnx"
    report = tmp_path / "r.json"
    code = _squeeze_cli(entry, out, report, "--quantize", "static", "--min-cosine", "0.99")
    assert code == 0
    record = json.loads(report.read_text())["quantization"]
    assert record["budget_met"] and record["applied"], record
    onnx.checker.check_model(str(out), full_check=True)
    assert out.stat().st_size < entry.path.stat().st_size
    assert all(n["decision"] in ("quantized", "float (budget)") for n in record.get("nodes", []))


@pytest.mark.parametrize("name", ["minilm", "magika"])
def test_factorization_of_corpus_models(name: str, tmp_path: Path) -> None:
    """Through the CLI on real probe data: --factorize 0.9 (a tenth of the MatMul/Gemm
    parameters saved, the layers whose factorization hurts most kept whole by the budget
    search) gives a valid, smaller model within a cosine budget that onnxruntime runs; the
    report lists every layer with its predicted and measured error."""
    import json

    entry = corpus.get(name)
    require_corpus(entry)
    out, report = tmp_path / "f.onnx", tmp_path / "r.json"
    code = _squeeze_cli(
        entry, out, report, "--factorize", "0.9", "--quantize", "none", "--min-cosine", "0.99"
    )
    assert code == 0
    record = json.loads(report.read_text())["factorization"]
    assert record["applied"] and record["budget_met"] and record["whitened"], record
    onnx.checker.check_model(str(out), full_check=True)
    assert out.stat().st_size < entry.path.stat().st_size
    factorized = [layer for layer in record["layers"] if layer["decision"] == "factorized"]
    assert factorized and record["params_after"] < record["params_before"]
    for layer in factorized:
        assert layer["params_after"] == layer["rank"] * sum(layer["shape"])
        assert layer["predicted_error"] >= 0 and "measured_error" in layer
    feeds = dict(np.load(next(iter(sorted(entry.probe_dir.glob("*.npz"))))))
    got, want = _run(out, feeds), _run(entry.path, feeds)
    a, b = np.asarray(want[0], np.float64).ravel(), np.asarray(got[0], np.float64).ravel()
    assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) >= 0.98


@pytest.mark.parametrize("name", ["magika", "ppocr_cls"])
def test_prune_weights_on_corpus_models(name: str, tmp_path: Path) -> None:
    """--passes default,prune-weights (2:4) on a real model: checker-valid, half the weights
    of its pruned layers zero in every group of four, and onnxruntime runs it."""
    import json

    from onnxsqueeze.prune.masks import follows_n_of_m

    entry = corpus.get(name)
    require_corpus(entry)
    out, report = tmp_path / "p.onnx", tmp_path / "r.json"
    code = _squeeze_cli(
        entry, out, report, "--passes", "default,prune-weights",
        "--option", "prune-weights.pattern=2:4",
    )  # fmt: skip
    assert code == 0
    passes = json.loads(report.read_text())["passes"]
    stats = next(p["stats"] for p in passes if p["name"].startswith("prune-weights"))
    assert stats["pruned"] and stats["sparsity"] > 0.45
    onnx.checker.check_model(str(out), full_check=True)
    pruned = set(stats["pruned"])
    model = onnx.load(str(out))
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    checked = 0
    for node in model.graph.node:
        if node.name in pruned and node.input[1] in weights:
            w = weights[node.input[1]]
            transposed = node.op_type == "Conv" or any(
                a.name == "transB" and a.i for a in node.attribute
            )
            as_kn = w.reshape(w.shape[0], -1).T if transposed else w
            assert follows_n_of_m(as_kn != 0, 2, 4), node.name
            checked += 1
    assert checked == len(pruned)
    feeds = dict(np.load(next(iter(sorted(entry.probe_dir.glob("*.npz"))))))
    assert all(np.all(np.isfinite(o)) for o in _run(out, feeds) if np.asarray(o).dtype.kind == "f")


@pytest.mark.parametrize("name", [m.name for m in corpus.MODELS])
def test_prune_channels_on_corpus_models(name: str, tmp_path: Path) -> None:
    """--passes default,prune-channels (a quarter of every channel group, no data) on every
    corpus model: checker-valid, onnxruntime runs it on its probe inputs with finite
    outputs of the original's shapes, and every group that could not lose channels says
    why. CNNs lose channels; the others at least their MLP hidden units where they have any."""
    import json

    entry = corpus.get(name)
    require_corpus(entry)
    out, report = tmp_path / "p.onnx", tmp_path / "r.json"
    code = _squeeze_cli(
        entry, out, report, "--passes", "default,prune-channels",
        "--option", "prune-channels.ratio=0.25",
    )  # fmt: skip
    assert code == 0
    passes = json.loads(report.read_text())["passes"]
    stats = next(p["stats"] for p in passes if p["name"].startswith("prune-channels"))
    for group in stats["clusters"]:
        assert group["removed"] or group["decision"] != "pruned"
        if not group["free"]:
            assert group.get("blocked"), group
    if name.startswith("ppocr") or name == "minilm":  # MiniLM: FFN units and heads
        assert stats["channels_removed"] > 100
    onnx.checker.check_model(str(out), full_check=True)
    pruned = onnx.load(str(out))
    read = {i for n in pruned.graph.node for i in n.input} | {o.name for o in pruned.graph.output}
    assert all(any(o in read for o in n.output) for n in pruned.graph.node)  # nothing left dead
    feeds = dict(np.load(next(iter(sorted(entry.probe_dir.glob("*.npz"))))))
    want, got = _run(entry.path, feeds), _run(out, feeds)
    for a, b in zip(want, got, strict=True):
        assert np.shape(a) == np.shape(b)
        if np.asarray(b).dtype.kind == "f":
            assert np.all(np.isfinite(b))
