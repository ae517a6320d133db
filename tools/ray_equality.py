"""Does ``--workers 2`` make the same model as one process on the corpus? Each model is
quantized static on real samples (the search sees 75 % of them, enough for two calibration
shards) once alone and once on a local Ray cluster; the output files, the per-node choices
and scores, and what ran on the workers are compared.

    python tools/ray_equality.py [--samples 192] [models ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "models"))
sys.path.insert(0, str(REPO / "tools"))

import bench_calib  # noqa: E402

import corpus  # noqa: E402

MODELS = {
    "ppocr_cls": "rapidocr/ch_ppocr_mobile_v2.0_cls_infer.onnx",
    "magika": None,  # found by name below
    "ppocr_det": "rapidocr/ch_PP-OCRv4_det_infer.onnx",
    "minilm": "minilm/all-MiniLM-L6-v2.onnx",
    "ppocr_rec": "rapidocr/ch_PP-OCRv4_rec_infer.onnx",
    "silero_vad": "silero/silero_vad.onnx",
    "silero_vad_ifless": "silero/silero_vad_op18_ifless.onnx",
}


def make_samples(name: str, count: int, folder: Path) -> None:
    """``count`` real samples of ``name`` as .npz files: the calibration benchmark's, or the
    accuracy tasks' calibration inputs (text lines for PP-OCR rec, streamed audio chunks with
    their true recurrent state for silero)."""
    if name in ("ppocr_rec", "silero_vad", "silero_vad_ifless"):
        import numpy as np
        import quant_tasks

        folder.mkdir(parents=True, exist_ok=True)
        for i, feed in enumerate(quant_tasks.get(name, count).calib[:count]):
            np.savez(folder / f"{i:04d}.npz", **feed)
        return
    bench_calib.make_samples(name, count, folder)


def model_path(name: str) -> Path:
    root = corpus.corpus_dir()
    if MODELS[name]:
        return root / MODELS[name]
    return next((root / "magika").rglob("*.onnx"))


def squeeze(model: Path, data: Path, out: Path, workers: int) -> tuple[dict, float]:
    report = out.with_suffix(".json")
    args = [sys.executable, "-m", "onnxsqueeze", str(model), "-o", str(out), "--quantize",
            "static", "--data", str(data), "--report", str(report), "-q"]  # fmt: skip
    if workers:
        args += ["--workers", str(workers)]
    started = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{model.name}: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(report.read_text()), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=list(MODELS))
    parser.add_argument("--samples", type=int, default=192)
    parser.add_argument(
        "--out", type=Path, default=REPO / "docs" / "benchmarks" / "distributed_equality.md"
    )
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="ray_equality_") as folder:
        tmp = Path(folder)
        for name in args.models:
            data = tmp / name
            make_samples(name, args.samples, data)
            alone, t_alone = squeeze(model_path(name), data, tmp / f"{name}_1.onnx", 0)
            spread, t_spread = squeeze(model_path(name), data, tmp / f"{name}_2.onnx", 2)
            same = (tmp / f"{name}_1.onnx").read_bytes() == (tmp / f"{name}_2.onnx").read_bytes()
            q1, q2 = alone["quantization"], spread["quantization"]
            w = spread["workers"] or {}
            rows.append(
                f"| {name} | {q1.get('method')} | {q1.get('quantized')} of {q1.get('candidates')} "
                f"| {'yes' if same else 'NO'} | {'yes' if q1.get('nodes') == q2.get('nodes') else 'NO'} "
                f"| {w.get('calibration_shards', 0)} | {w.get('models_run', 0)} "
                f"({w.get('look_ahead_models', 0)} ahead) | {t_alone:.1f} | {t_spread:.1f} |"
            )
            print(rows[-1], flush=True)
    text = "\n".join([
        "# --workers 2 against one process on the corpus",
        "",
        f"`python tools/ray_equality.py --samples {args.samples}`: `onnxsqueeze MODEL -o OUT "
        "--quantize static --data DIR` alone and with `--workers 2` (a local Ray cluster on this "
        "2-core machine), real samples. Same file: the two outputs byte for byte; same choices: "
        "every node's decision and sensitivity score in the reports.",
        "",
        "| model | range method | quantized | same file | same choices and scores "
        "| calibration shards | candidate models on workers | alone s | --workers 2 s |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ])  # fmt: skip
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
