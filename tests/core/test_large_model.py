"""A model above protobuf's 2 GB limit loads, passes cleanup and saves in under 1 GB RSS.

The model (~2.7 GB of float32 weights in external data, one duplicate and one unused
weight) is written chunk by chunk into a tmpdir, so the test itself stays small too.
onnxsqueeze runs in a subprocess that reports its own peak RSS (VmHWM).
Verification is off: onnxruntime would have to hold every weight to run the model.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

pytestmark = pytest.mark.slow

DIM = 8192
LAYERS = 10  # 10 x 8192 x 8192 x 4 B = 2.68 GB
RSS_LIMIT = 1 << 30


def write_large_model(folder: Path) -> Path:
    data_name = "big.onnx.data"
    initializers = []
    offset = 0
    with open(folder / data_name, "wb") as fh:
        for i in range(LAYERS + 1):  # the last one is never used
            length = DIM * DIM * 4
            rows = 512
            for start in range(0, DIM, rows):
                seed = 0 if i == LAYERS - 1 else i  # the last used layer duplicates W0
                chunk_rng = np.random.default_rng(seed * 1000 + start)
                fh.write(chunk_rng.standard_normal((rows, DIM), dtype=np.float32).tobytes())
            tensor = TensorProto(name=f"W{i}", data_type=TensorProto.FLOAT, dims=[DIM, DIM])
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", offset), ("length", length)):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, str(value)
            initializers.append(tensor)
            offset += length
    nodes = [helper.make_node("MatMul", [f"h{i}", f"W{i}"], [f"h{i + 1}"]) for i in range(LAYERS)]
    nodes.insert(0, helper.make_node("Identity", ["x"], ["h0"]))
    graph = helper.make_graph(
        nodes,
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, DIM])],
        [helper.make_tensor_value_info(f"h{LAYERS}", TensorProto.FLOAT, [1, DIM])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / "big.onnx"
    onnx.save(model, path)
    return path


def test_large_model_cleanup_under_1gb(tmp_path: Path) -> None:
    src = write_large_model(tmp_path)
    out = tmp_path / "out" / "small.onnx"
    out.parent.mkdir()
    # The child reports its own peak from VmHWM: ru_maxrss would carry the forking pytest
    # process's high-water mark across exec, and RUSAGE_CHILDREN mixes in earlier children.
    probe = (
        "import sys; from onnxsqueeze.cli import main; rc = main(sys.argv[1:]); "
        "hwm = next(l for l in open('/proc/self/status') if l.startswith('VmHWM')); "
        "print('PEAK_KIB', hwm.split()[1], file=sys.stderr); sys.exit(rc)"
    )
    args = [str(src), "-o", str(out), "--no-verify", "--report", str(tmp_path / "r.json")]
    proc = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    peak_kib = int(proc.stderr.split("PEAK_KIB")[1].split()[0])
    print(
        f"peak RSS {peak_kib / 1024:.0f} MiB for a {os.path.getsize(tmp_path / 'big.onnx.data') / 2**30:.2f} GiB model"
    )
    assert peak_kib * 1024 < RSS_LIMIT
    # The duplicate and the unused weight are gone; external data was used for the output.
    saved = onnx.load(str(out), load_external_data=False)
    assert len(saved.graph.initializer) == LAYERS - 1
    assert (out.parent / "small.onnx.data").stat().st_size == (LAYERS - 1) * DIM * DIM * 4
    onnx.checker.check_model(str(out))
    # Spot-check that the weights were copied, not re-generated: first row of W1.
    w1 = next(t for t in saved.graph.initializer if t.name == "W1")
    offset = int(next(e.value for e in w1.external_data if e.key == "offset"))
    with open(out.parent / "small.onnx.data", "rb") as fh:
        fh.seek(offset)
        got = np.frombuffer(fh.read(DIM * 4), dtype=np.float32)
    want = np.random.default_rng(1 * 1000).standard_normal((512, DIM), dtype=np.float32)[0]
    np.testing.assert_array_equal(got, want)
