"""Unstructured pruning (prune-weights) on real models: magnitude vs Wanda importance at equal
sparsity, and what the zeros buy in the stored file, in one run.

For each model (after onnxsqueeze's lossless preset) and each sparsity (and 2:4), both
importances zero the same share of every Conv/MatMul/Gemm output's weights; the result runs
in onnxruntime on the task's held-out samples: relative squared output error (all outputs)
and the task metrics of tools/quant_tasks.py. Wanda's input-channel norms come from the
first --calib calibration samples' Gram matrices (calib.gram). File sizes: the .onnx as
written (dense zeros), and after zlib level 9 (how sparse weights usually ship), each
against the same for the unpruned model.

Sparse storage: the same pruned model with its pruned weights as ONNX sparse initializers,
loaded in onnxruntime and checked to compute the same outputs. Structured channel pruning and
the comparison with onnxsim: tools/bench_prune_channels.py.

    python tools/bench_prune.py [--models minilm,magika] [--calib 64]
"""

from __future__ import annotations

import argparse
import sys
import zlib
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
import quant_tasks  # noqa: E402
from bench_factorize import relative_error, session_of, simplified  # noqa: E402

from onnxsqueeze.calib.gram import gram_matrices  # noqa: E402
from onnxsqueeze.passes.prune_weights import PruneWeightsPass  # noqa: E402
from onnxsqueeze.passes.quantize_weights import QuantizeWeightsPass  # noqa: E402
from onnxsqueeze.run import cpu  # noqa: E402

SETTINGS = (("25 %", 0.25, "unstructured", False), ("50 %", 0.5, "unstructured", False),
            ("50 % + embeddings", 0.5, "unstructured", True),
            ("75 %", 0.75, "unstructured", False), ("2:4", 0.5, "2:4", False))  # fmt: skip


def sizes(model: ir.Model) -> tuple[int, int]:
    data = ir.serde.serialize_model(model).SerializeToString()
    return len(data), len(zlib.compress(data, 9))


def int8(model: ir.Model) -> ir.Model:
    """The model's weights as int8 (quantize-weights, symmetric: a zero stays a zero), what
    ships when quantization runs after pruning."""
    quantized = model.clone()
    QuantizeWeightsPass()(quantized)
    return quantized


def sparse_proto(model: ir.Model) -> onnx.ModelProto:
    """The model with every initializer of at least 4096 elements that is 20 % zeros or more
    stored as an ONNX sparse initializer (COO: the nonzero values and their flat int64
    positions; the spec allows no narrower index type, the checker enforces it)."""
    proto = ir.serde.serialize_model(model)
    dense = []
    for tensor in proto.graph.initializer:
        array = onnx.numpy_helper.to_array(tensor)
        if array.size < 4096 or np.mean(array == 0) < 0.2:
            dense.append(tensor)
            continue
        flat = array.ravel()
        where = np.flatnonzero(flat != 0).astype(np.int64)
        values = onnx.numpy_helper.from_array(flat[where], tensor.name)
        indices = onnx.numpy_helper.from_array(where, tensor.name + "_indices")
        proto.graph.sparse_initializer.append(
            onnx.helper.make_sparse_tensor(values, indices, list(array.shape))
        )
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(dense)
    onnx.checker.check_model(proto)
    return proto


def sparse_check(proto: onnx.ModelProto, model: ir.Model, task) -> int:
    """Size of the sparse file; onnxruntime must load it and compute what the dense one does
    (it densifies sparse initializers when the session is created)."""
    import onnxruntime as ort

    data = proto.SerializeToString()
    sparse = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    dense = session_of(model)
    feed = task.latency_feed
    for a, b in zip(dense.run(None, feed), sparse.run(None, feed), strict=True):
        assert np.array_equal(a, b), "sparse initializers changed the outputs"
    return len(data), len(zlib.compress(data, 9))


def bench(name: str, args) -> list[dict]:
    task = quant_tasks.get(name, args.calib)
    model = simplified(quant_tasks.model_path(name))
    grams = gram_matrices(model, task.calib[: args.calib])
    reference = quant_tasks.run_task(session_of(model), task)
    raw0, packed0 = sizes(model)
    int8_0 = sizes(int8(model))[1]
    rows = []
    for label, sparsity, pattern, tables in SETTINGS:
        for importance, g in (("magnitude", None), ("Wanda", grams)):
            candidate = model.clone()
            stats = PruneWeightsPass(
                sparsity=sparsity, pattern=pattern, grams=g, embeddings=tables
            )(candidate).stats
            outputs = quant_tasks.run_task(session_of(candidate), task)
            raw, packed = sizes(candidate)
            sparse_raw, sparse_packed = sparse_check(sparse_proto(candidate), candidate, task)
            int8_packed = sizes(int8(candidate))[1]
            rows.append(
                {
                    "setting": label,
                    "importance": importance,
                    "layers": len(stats["pruned"]),
                    "zeros": stats["sparsity"],
                    "error": relative_error(reference, outputs),
                    "file": raw / raw0,
                    "zlib": packed / packed0,
                    "sparse": sparse_raw / raw0,
                    "sparse zlib": sparse_packed / packed0,
                    "int8 zlib": int8_packed / int8_0,
                    **task.score(reference, outputs),
                }
            )
            print(name, rows[-1], flush=True)
    return rows


def render(results: dict, args) -> str:
    lines = [
        "# Unstructured pruning: magnitude vs Wanda importance, and the stored file",
        "",
        f"`python tools/bench_prune.py --calib {args.calib}` on {cpu.describe()}. After the "
        "lossless preset; every Conv/MatMul/Gemm weight of at least 4096 elements, each output "
        "keeping the same share. error = sum over held-out samples of ||y' - y||^2 / ||y||^2 "
        "(all float outputs). file = pruned .onnx / unpruned .onnx, as written (dense zeros); "
        "zlib = the same ratio after zlib -9 of both. sparse = the pruned weights stored as "
        "ONNX sparse initializers (COO, int64 flat indices: the only index type the spec "
        "allows) / unpruned .onnx, sparse zlib likewise; onnxruntime loads those files, "
        "densifies the weights when the session is created and computes the same outputs "
        "(checked on every row): sparse storage shrinks neither memory nor time, and at 8 "
        "bytes of index per kept weight it only shrinks the file above 2/3 sparsity. Zeros "
        "stored dense plus a generic compressor ship smaller. Structured (channel) pruning: "
        'docs/benchmarks/prune_channels.md. "+ embeddings": embedding tables (Gather) '
        "pruned too, each row keeping its largest half (importance column: the other layers'). "
        "int8 zlib: the pruned model's weights then quantized to int8 (quantize-weights, "
        "symmetric, so zeros stay zeros), zlib -9, against the unpruned model's int8 zlib.",
        "",
    ]
    for name, rows in results.items():
        metrics = [k for k in rows[0] if k not in
                   ("setting", "importance", "layers", "zeros", "error", "file", "zlib", "sparse",
                    "sparse zlib", "int8 zlib")]  # fmt: skip
        head = ["sparsity", "importance", "layers", "zeros", "error", "file", "zlib", "sparse",
                "sparse zlib", "int8 zlib", *metrics]  # fmt: skip
        lines += [f"## {name}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            cells = [r["setting"], r["importance"], str(r["layers"]), f"{r['zeros']:.3f}",
                     f"{r['error']:.3g}", f"{r['file']:.3f}", f"{r['zlib']:.3f}",
                     f"{r['sparse']:.3f}", f"{r['sparse zlib']:.3f}", f"{r['int8 zlib']:.3f}",
                     *(f"{r[m]:.4f}" for m in metrics)]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minilm,magika")
    parser.add_argument("--calib", type=int, default=64)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks" / "prune.md")
    args = parser.parse_args()
    results = {name: bench(name, args) for name in args.models.split(",")}
    args.out.write_text(render(results, args) + "\n")
    print(render(results, args))


if __name__ == "__main__":
    main()
