"""Model I/O: every source kind loads; every user-caused failure is a one-line SqueezeError."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxsqueeze.core.errors import (
    InvalidModelError,
    ModelLoadError,
    ModelSaveError,
    SqueezeError,
    UnsupportedModelError,
)
from onnxsqueeze.core.io import load_model, save_model
from onnxsqueeze.core.stats import model_stats


def _one_line_naming(exc: SqueezeError, name: str) -> None:
    text = str(exc)
    assert "\n" not in text
    assert name in text


def test_load_every_source_kind(mlp, mlp_path):
    assert load_model(mlp_path).kind == "path"
    assert load_model(str(mlp_path)).kind == "path"
    assert load_model(mlp.SerializeToString()).kind == "bytes"
    assert load_model(mlp).kind == "proto"
    model = ir.serde.deserialize_model(mlp)
    assert load_model(model).model is model
    assert model_stats(load_model(mlp).model).nodes == 2


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "file not found"),
        (b"", "empty file"),
        (b"this is plain text, not a protobuf\n" * 4, "not a valid ONNX model"),
    ],
)
def test_bad_files(tmp_path, content, message):
    path = tmp_path / "bad.onnx"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=message) as info:
        load_model(path)
    _one_line_naming(info.value, str(path))


def test_directory_is_rejected(tmp_path):
    with pytest.raises(ModelLoadError, match="directory"):
        load_model(tmp_path)


def test_truncated_model(tmp_path, mlp_path):
    data = mlp_path.read_bytes()
    path = tmp_path / "truncated.onnx"
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ModelLoadError) as info:
        load_model(path)
    _one_line_naming(info.value, str(path))


def _external_model(tmp_path: Path) -> Path:
    w = np.arange(64 * 64, dtype=np.float32).reshape(64, 64)
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1, 64] x) => (float[1, 64] y) { y = MatMul(x, W) }
    """
    model = onnx.parser.parse_model(text)
    model.graph.initializer.append(onnx.numpy_helper.from_array(w, "W"))
    path = tmp_path / "ext.onnx"
    onnx.save(model, path, save_as_external_data=True, location="ext.bin", size_threshold=0)
    return path


def test_missing_and_truncated_external_data(tmp_path):
    path = _external_model(tmp_path)
    data = tmp_path / "ext.bin"
    full = data.read_bytes()
    data.write_bytes(full[:100])
    with pytest.raises(ModelLoadError, match="truncated") as info:
        load_model(path)
    _one_line_naming(info.value, "ext.bin")
    data.unlink()
    with pytest.raises(ModelLoadError, match="external data file 'ext.bin'.*not found") as info:
        load_model(path)
    _one_line_naming(info.value, str(path))


def test_external_data_is_memory_mapped_not_loaded(tmp_path):
    model = load_model(_external_model(tmp_path)).model
    tensor = model.graph.initializers["W"].const_value
    assert isinstance(tensor, ir.ExternalTensor)
    assert tensor.numpy()[1, 2] == 66


def test_unsupported_ir_and_opset(tmp_path, mlp):
    newer_ir = onnx.ModelProto()
    newer_ir.CopyFrom(mlp)
    newer_ir.ir_version = onnx.IR_VERSION + 1
    with pytest.raises(UnsupportedModelError, match="IR version"):
        load_model(newer_ir)
    newer_opset = onnx.ModelProto()
    newer_opset.CopyFrom(mlp)
    newer_opset.opset_import[0].version = onnx.defs.onnx_opset_version() + 5
    path = tmp_path / "future.onnx"
    onnx.save(newer_opset, path)
    with pytest.raises(UnsupportedModelError, match="opset") as info:
        load_model(path)
    _one_line_naming(info.value, str(path))


def test_invalid_graph(tmp_path, mlp):
    broken = onnx.ModelProto()
    broken.CopyFrom(mlp)
    broken.graph.node[1].input[0] = "does_not_exist"
    path = tmp_path / "broken.onnx"
    onnx.save(broken, path)
    with pytest.raises(InvalidModelError) as info:
        load_model(path)
    _one_line_naming(info.value, str(path))


def test_save_roundtrip_and_no_partial_output(tmp_path, mlp):
    model = load_model(mlp).model
    out = save_model(model, tmp_path / "out.onnx")
    onnx.checker.check_model(str(out))
    assert [p.name for p in tmp_path.iterdir()] == ["out.onnx"]  # no temp leftovers
    with pytest.raises(ModelSaveError, match="does not exist"):
        save_model(model, tmp_path / "missing_dir" / "out.onnx")


def test_save_failure_leaves_nothing(tmp_path, mlp, monkeypatch):
    model = load_model(mlp).model

    def explode(*args, **kwargs):
        raise OSError("disk full")

    import onnxsqueeze.core.io as io_module

    monkeypatch.setattr(ir, "save", explode)  # the external-data path
    monkeypatch.setattr(io_module, "to_proto", explode)  # the single-file path
    with pytest.raises(ModelSaveError, match="disk full"):
        save_model(model, tmp_path / "out.onnx")
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_input(mlp_path):
    loaded = load_model(mlp_path)
    digest = hashlib.sha256(mlp_path.read_bytes()).hexdigest()
    with pytest.raises(ModelSaveError, match="refusing to overwrite"):
        save_model(loaded.model, mlp_path, protected=loaded.protected_paths())
    assert hashlib.sha256(mlp_path.read_bytes()).hexdigest() == digest


def test_external_data_kept_and_forced(tmp_path, mlp):
    loaded = load_model(_external_model(tmp_path))
    (tmp_path / "out").mkdir()
    out = save_model(loaded.model, tmp_path / "out" / "m.onnx")
    assert (tmp_path / "out" / "m.onnx.data").is_file()  # input used external data: kept
    reloaded = load_model(out).model
    assert isinstance(reloaded.graph.initializers["W"].const_value, ir.ExternalTensor)
    small = save_model(load_model(mlp).model, tmp_path / "forced.onnx", external_data=False)
    assert not Path(str(small) + ".data").exists()


def test_weightless_sessions_and_checks_see_the_same_model():
    """Sessions and the structural check take big weights as detached arrays; the model is
    whole again afterwards, results are unchanged and a broken graph is still reported."""
    from onnxsqueeze.core.io import weightless
    from onnxsqueeze.pipeline.verified import structural_problem
    from onnxsqueeze.run.session import Session

    from conftest import weighted_model

    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 48)).astype(np.float32)
    model = ir.from_proto(weighted_model("MatMul", w, [3, 64]))
    with weightless(model) as detached:
        assert list(detached) == ["w"]
        assert isinstance(model.graph.initializers["w"].const_value, ir.ExternalTensor)
    assert not isinstance(model.graph.initializers["w"].const_value, ir.ExternalTensor)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    np.testing.assert_allclose(Session(model).run({"x": x})["y"], x @ w, rtol=1e-5, atol=1e-5)
    assert structural_problem(model) is None
    model.graph[0].attributes["bogus"] = ir.AttrInt64("bogus", 1)
    assert structural_problem(model) is not None
    np.testing.assert_array_equal(model.graph.initializers["w"].const_value.numpy(), w)


def _zipmap_classifier(features: int = 128, classes: int = 40) -> onnx.ModelProto:
    """scikit-learn's classifier export: a label and ZipMap's seq(map(int64, float))."""
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((features, classes)).astype(np.float32) / 8
    probs = h.make_tensor_sequence_value_info("probabilities", T.FLOAT, None)
    probs.type.CopyFrom(
        h.make_sequence_type_proto(
            h.make_map_type_proto(T.INT64, h.make_tensor_type_proto(T.FLOAT, []))
        )
    )
    graph = h.make_graph(
        [
            h.make_node("MatMul", ["X", "W"], ["logits"]),
            h.make_node("Softmax", ["logits"], ["p"], axis=1),
            h.make_node("ArgMax", ["p"], ["label"], axis=1, keepdims=0),
            h.make_node(
                "ZipMap",
                ["p"],
                ["probabilities"],
                domain="ai.onnx.ml",
                classlabels_int64s=list(range(classes)),
            ),
        ],
        "classifier",
        [h.make_tensor_value_info("X", T.FLOAT, [None, features])],
        [h.make_tensor_value_info("label", T.INT64, [None]), probs],
        [nh.from_array(weight, "W")],
    )
    model = h.make_model(
        graph, opset_imports=[h.make_opsetid("", 17), h.make_opsetid("ai.onnx.ml", 3)], ir_version=8
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def test_map_typed_outputs_load_squeeze_and_keep_their_type(tmp_path):
    """onnx_ir cannot hold map types: ZipMap's output loses its declared type on the way in
    and gets it back (inferred) on the way out; verification compares the per-class
    probabilities as a table, so a quantized model is judged by tolerance, not equality."""
    import onnxsqueeze

    model = _zipmap_classifier()
    source = tmp_path / "clf.onnx"
    onnx.save(model, source)
    data = [
        {"X": np.random.default_rng(i).standard_normal((4, 128)).astype(np.float32)}
        for i in range(8)
    ]
    result = onnxsqueeze.squeeze(model, data=data, quantize="weights-int8")
    assert result.report.verification_status == "passed"
    assert result.report.quantization["applied"], result.report.quantization
    out = result.model
    onnx.checker.check_model(out, full_check=True)
    assert out.graph.output[1].type == model.graph.output[1].type
    assert onnx.load(source) == model  # the input is untouched
    from conftest import run_ort

    probabilities = run_ort(out, data[0])[1]
    assert isinstance(probabilities, list) and set(probabilities[0]) == set(range(40))
    # shape inference reads the map type back too: calibration sees typed activations
    calibration = onnxsqueeze.calibrate(model, data, method="minmax")
    assert {"logits", "p"} <= set(calibration.ranges())


def test_map_typed_input_is_a_clear_error(tmp_path):
    from onnx import TensorProto as T
    from onnx import helper as h

    from onnxsqueeze.core.errors import UnsupportedModelError
    from onnxsqueeze.core.io import load_model

    features = h.make_value_info(
        "features", h.make_map_type_proto(T.STRING, h.make_tensor_type_proto(T.FLOAT, []))
    )
    graph = h.make_graph(
        [
            h.make_node(
                "DictVectorizer",
                ["features"],
                ["y"],
                domain="ai.onnx.ml",
                string_vocabulary=["a", "b"],
            )
        ],
        "dv",
        [features],
        [h.make_tensor_value_info("y", T.FLOAT, [None, 2])],
    )
    model = h.make_model(
        graph, opset_imports=[h.make_opsetid("", 17), h.make_opsetid("ai.onnx.ml", 3)]
    )
    with pytest.raises(UnsupportedModelError, match="input 'features' is a map"):
        load_model(model)


LAYERNORM_AT_14 = """
<ir_version: 8, opset_import: ["" : 14]>
g (float[2, 8] x) => (float[2, 8] y) {
    n = LayerNormalization <axis = -1, epsilon = 0.00001> (x, scale, bias)
    y = Relu (n)
}
"""


def test_an_op_below_the_opset_that_defines_it_is_converted_and_verified(tmp_path):
    """onnxruntime's transformer optimizer writes LayerNormalization (ONNX: opset 17) into
    opset-14 models; onnxruntime runs them, onnx.checker rejects them, and so did we. Now the
    model goes to opset 17 by the version converter and is verified against the original."""
    import onnxsqueeze

    from conftest import run_ort

    proto = onnx.parser.parse_model(LAYERNORM_AT_14)
    for name, array in (("scale", np.linspace(0.5, 2, 8)), ("bias", np.linspace(-1, 1, 8))):
        proto.graph.initializer.append(onnx.numpy_helper.from_array(array.astype(np.float32), name))
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(proto)
    path = tmp_path / "ln14.onnx"
    onnx.save(proto, path)
    loaded = load_model(path)
    assert loaded.original is not None and "opset 17" in loaded.note
    out = tmp_path / "out.onnx"
    report = onnxsqueeze.squeeze_file(path, out)
    assert report.verification_status == "passed"
    assert any("LayerNormalization under opset 14" in w for w in report.warnings)
    result = onnx.load(out)
    onnx.checker.check_model(result, full_check=True)
    assert [o.version for o in result.opset_import if o.domain == ""] == [17]
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)}
    np.testing.assert_array_equal(run_ort(result, feeds)[0], run_ort(proto, feeds)[0])


def test_serialized_bytes_counts_external_weights_too(tmp_path):
    """The size check of quantized results read a model with external weights as its graph
    alone (31 KB for a 380 KB model), so every quantized copy looked larger than float."""
    from onnxsqueeze.core.io import serialized_bytes

    digits = Path(__file__).resolve().parents[2] / "models" / "digits_cnn.onnx"
    proto = onnx.load(digits)
    inline = serialized_bytes(load_model(digits).model)
    path = tmp_path / "ext.onnx"
    onnx.save(proto, path, save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    external = serialized_bytes(load_model(path).model)
    assert abs(external - inline) <= 0.05 * inline
    assert abs(inline - digits.stat().st_size) <= 0.05 * inline


def _point_external_data_at(path: Path, location: str) -> onnx.ModelProto:
    proto = onnx.load(str(path), load_external_data=False)
    for entry in proto.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = location
    onnx.save(proto, str(path))
    return proto


@pytest.mark.parametrize("where", ["parent", "absolute", "symlink"])
def test_external_data_outside_the_models_folder_is_never_read(tmp_path, where):
    folder = tmp_path / "model"
    folder.mkdir()
    path = _external_model(folder)
    secret = tmp_path / "secret.bin"
    secret.write_bytes((folder / "ext.bin").read_bytes() + b"more")  # readable, large enough
    if where == "symlink":
        (folder / "link.bin").symlink_to(secret)
    location = {"parent": "../secret.bin", "absolute": str(secret), "symlink": "link.bin"}[where]
    proto = _point_external_data_at(path, location)
    with pytest.raises(ModelLoadError, match="outside the model's folder") as info:
        load_model(path)
    assert str(secret.stat().st_size) not in str(info.value)  # nothing about the file leaks
    with pytest.raises(ModelLoadError, match="outside the model's folder"):
        load_model(proto, base_dir=str(folder))
    # in memory, without a folder: refused whatever the location
    with pytest.raises(ModelLoadError, match="no folder to read it from"):
        load_model(proto)
    with pytest.raises(ModelLoadError, match="no folder to read it from"):
        load_model(proto.SerializeToString())


def test_an_in_memory_model_reads_external_data_from_the_folder_given(tmp_path):
    import onnxsqueeze

    path = _external_model(tmp_path)
    proto = onnx.load(str(path), load_external_data=False)
    with pytest.raises(ModelLoadError, match="pass base_dir="):
        onnxsqueeze.squeeze(proto)
    squeezed, report = onnxsqueeze.squeeze(proto, base_dir=tmp_path)
    assert report.verification_status == "passed"
