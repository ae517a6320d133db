"""Weight-only / dynamic quantization of MiniLM: onnxruntime.quantization vs onnxsqueeze,
side by side in one run.

Accuracy is task-level: mean-pooled sentence embeddings (the model's ``sentence_embedding``
output) of held-out sentences (the corpus sentences not used for probes), compared with fp32
by cosine, and nearest-neighbour agreement (for each sentence, is its most similar other
sentence the same as with fp32?). Latency: median of --runs single-sentence runs after
warm-up, default onnxruntime session, ratio to fp32 measured in the same window.

    python tools/bench_weights.py [--sentences 200] [--runs 30]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "models"))
from onnxsqueeze.run import cpu  # noqa: E402

import corpus  # noqa: E402


def variants(src: Path, tmp: Path, calibration: list[dict]) -> dict[str, Path]:
    """Every configuration, written to ``tmp``; each is built by its own tool's API."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    import onnxsqueeze

    out = {"fp32": src}
    path = tmp / "ort_dynamic.onnx"
    quantize_dynamic(str(src), str(path), weight_type=QuantType.QInt8)
    out["ORT quantize_dynamic int8"] = path
    import onnx

    quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), block_size=32, is_symmetric=True)
    quantizer.process()
    path = tmp / "ort_int4.onnx"
    quantizer.model.save_model_to_file(str(path), use_external_data_format=False)
    out["ORT MatMulNBits int4 (RTN, block 32)"] = path
    # the same with embedding tables too (GatherBlockQuantized), and ORT's HQQ rounding
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig

    gather = {"op_types_to_quantize": ("MatMul", "Gather")}
    for label, kwargs in (
        (
            "ORT int4 RTN + Gather (block 32)",
            {"is_symmetric": True, **gather, "quant_axes": (("MatMul", 0), ("Gather", 1))},
        ),
        (  # its HQQ does not take Gather tables ("not supported yet")
            "ORT int4 HQQ (block 32, MatMul only)",
            {"algo_config": HQQWeightOnlyQuantConfig(block_size=32)},
        ),
    ):
        try:
            quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), block_size=32, **kwargs)
            quantizer.process()
            path = tmp / (label.split()[2] + "_int4.onnx")
            quantizer.model.save_model_to_file(str(path), use_external_data_format=False)
            out[label] = path
        except Exception as exc:  # a peer's failure is a result, not a crash
            print(f"{label}: {type(exc).__name__}: {exc}"[:200], flush=True)
    for label, options in (
        ("onnxsqueeze weights int8 (per channel, DequantizeLinear)", {"bits": 8, "format": "dq"}),
        ("onnxsqueeze weights int8 (per channel, fold at load)", {"bits": 8, "format": "fold"}),
        (
            "onnxsqueeze weights int4 (block 32, RTN, MatMulNBits)",
            {"bits": 4, "block_size": 32, "rounding": "rtn"},
        ),
        ("onnxsqueeze weights int4 (block 32, mse, MatMulNBits)", {"bits": 4, "block_size": 32}),
        (
            "onnxsqueeze weights int4 (block 32, mse, fold at load)",
            {"bits": 4, "block_size": 32, "format": "fold"},
        ),
    ):
        path = tmp / (
            label.split("(")[1].split(")")[0].replace(" ", "_").replace(",", "") + ".onnx"
        )
        onnxsqueeze.squeeze_file(
            str(src), str(path), passes=["default", ("quantize-weights", options)], strict=False
        )
        out[label] = path
    # The CLI's `--quantize weights-int4 --data DIR --min-cosine 0.98`: GPTQ on calibration
    # sentences that are neither probes nor held out.
    from onnxsqueeze.stages.budget import Budget
    from onnxsqueeze.stages.quantize import QuantizeConfig

    for form, label in (("auto", "fold at load"), ("matmulnbits", "MatMulNBits")):
        path = tmp / f"gptq_{form}.onnx"
        config = QuantizeConfig(
            mode="weights-int4", budget=Budget(min_cosine=0.98), weight_format=form
        )
        report = onnxsqueeze.squeeze_file(str(src), str(path), data=calibration, quantize=config)
        if report.quantization and report.quantization.get("applied"):
            out[f"onnxsqueeze weights-int4 stage (GPTQ, 128 sentences, {label})"] = path
        else:
            print("GPTQ stage not applied:", report.quantization, flush=True)
    return out


def embed(path: Path, feeds: list[dict]) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(["sentence_embedding"], f)[0] for f in feeds])


def latency(path: Path, feed: dict, runs: int) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for _ in range(5):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=200)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks" / "weights.md")
    args = parser.parse_args()
    import minilm_export

    entry = corpus.get("minilm")
    model_dir = corpus.corpus_dir() / "minilm" / "package"
    sentences = (corpus.corpus_dir() / "minilm" / "sentences.txt").read_text().splitlines()
    held_out = sentences[20 : 20 + args.sentences]  # probes use the first 13
    feeds = [minilm_export.tokenize(model_dir, [s]) for s in held_out]
    calib = sentences[20 + args.sentences :][:128]
    calibration = [minilm_export.tokenize(model_dir, [s]) for s in calib]
    with tempfile.TemporaryDirectory() as tmp:
        paths = variants(entry.path, Path(tmp), calibration)
        reference = embed(paths["fp32"], feeds)
        ref_norm = reference / np.linalg.norm(reference, axis=1, keepdims=True)
        ref_sim = ref_norm @ ref_norm.T
        np.fill_diagonal(ref_sim, -np.inf)
        ref_nn = ref_sim.argmax(axis=1)
        rows = []
        for label, path in paths.items():
            emb = embed(path, feeds)
            norm = emb / np.linalg.norm(emb, axis=1, keepdims=True)
            cosine = float(np.mean(np.sum(norm * ref_norm, axis=1)))
            sim = norm @ norm.T
            np.fill_diagonal(sim, -np.inf)
            nn = float(np.mean(sim.argmax(axis=1) == ref_nn))
            fp32_ms = latency(paths["fp32"], feeds[0], args.runs)
            ms = latency(path, feeds[0], args.runs)
            size = path.stat().st_size / entry.path.stat().st_size
            rows.append((label, size, cosine, nn, ms, fp32_ms / ms))
            print(rows[-1], flush=True)
    lines = [
        "# MiniLM weight quantization: onnxruntime.quantization vs onnxsqueeze",
        "",
        f"`python tools/bench_weights.py --sentences {args.sentences} --runs {args.runs}` (one run, "
        f"{cpu.describe()}). cosine = mean cosine of sentence embeddings vs fp32 "
        f"over {args.sentences} held-out sentences; NN = nearest-neighbour agreement with fp32; "
        "latency = median single-sentence run (default session), speed = fp32 / this, fp32 timed "
        "right before each row. onnxsqueeze rows run its default preset first.",
        "",
        "| configuration | size / fp32 | mean cosine | NN agreement | latency ms | speed vs fp32 |",
        "|---|---|---|---|---|---|",
    ]
    for label, size, cosine, nn, ms, speed in rows:
        lines.append(
            f"| {label} | {size:.3f} | {cosine:.4f} | {nn:.3f} | {ms:.2f} | {speed:.2f}x |"
        )
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
