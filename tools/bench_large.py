"""Peak memory and time of every quantize mode on a generated fp32 transformer larger than
2 GB (tools/large_model.py), beside onnxruntime's own quantizers, in one run.

Every row is its own process (peak RSS from wait4, so one row's memory never counts in
another's); "session RSS" is the peak of a process that loads the row's output in
onnxruntime and runs it once: what serving it costs. Ratios are against the onnxruntime
session of the original.

    python tools/bench_large.py --hidden 1664 --blocks 32 [--keep DIR] [--rows a,b]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))

SESSION = """
import sys, numpy as np, onnxruntime as ort
s = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
x = np.random.default_rng(0).standard_normal((1, 32, int(sys.argv[2]))).astype(np.float32)
s.run(None, {"x": x})
"""

ORT_DYNAMIC = """
import sys
from onnxruntime.quantization import QuantType, quantize_dynamic
quantize_dynamic(sys.argv[1], sys.argv[2], weight_type=QuantType.QInt8,
                 use_external_data_format=True)
"""

ORT_NBITS = """
import sys, onnx
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
model = onnx.load(sys.argv[1])
q = MatMulNBitsQuantizer(model, block_size=32, is_symmetric=True, bits=int(sys.argv[3]))
q.process()
q.model.save_model_to_file(sys.argv[2], use_external_data_format=True)
"""


def measure(argv: list[str], timeout: float = 3600) -> tuple[int, float, float, str]:
    """(exit code, seconds, peak RSS in GiB, last stderr line) of one process."""
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:  # a pipe would fill and block a chatty child
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log, text=True)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        timer.cancel()
        seconds = time.perf_counter() - started
        log.seek(0)
        err = log.read().strip().splitlines()
    code = os.waitstatus_to_exitcode(status)
    return code, seconds, usage.ru_maxrss / 2**20, (err[-1] if err else "")


def rows(model: Path, out: Path) -> dict[str, list[str]]:
    cli = [sys.executable, "-m", "onnxsqueeze", str(model)]
    py = [sys.executable, "-c"]
    return {
        "onnxsqueeze none --no-verify": [*cli, "-o", str(out / "none_nv.onnx"), "--quantize", "none", "--no-verify"],
        "onnxsqueeze none": [*cli, "-o", str(out / "none.onnx"), "--quantize", "none"],
        "onnxsqueeze weights-int8 --no-verify": [*cli, "-o", str(out / "w8_nv.onnx"), "--quantize", "weights-int8", "--no-verify"],
        "onnxsqueeze weights-int4 --no-verify": [*cli, "-o", str(out / "w4_nv.onnx"), "--quantize", "weights-int4", "--no-verify"],
        "onnxsqueeze dynamic --no-verify": [*cli, "-o", str(out / "dyn_nv.onnx"), "--quantize", "dynamic", "--no-verify"],
        "onnxsqueeze weights-int8": [*cli, "-o", str(out / "w8.onnx"), "--quantize", "weights-int8"],
        "onnxsqueeze weights-int4": [*cli, "-o", str(out / "w4.onnx"), "--quantize", "weights-int4"],
        "onnxsqueeze dynamic": [*cli, "-o", str(out / "dyn.onnx"), "--quantize", "dynamic"],
        "onnxsqueeze default": [*cli, "-o", str(out / "default.onnx")],
        "onnxruntime quantize_dynamic": [*py, ORT_DYNAMIC, str(model), str(out / "ort_dyn.onnx")],
        "onnxruntime MatMulNBits int4": [*py, ORT_NBITS, str(model), str(out / "ort_nb4.onnx"), "4"],
        "onnxruntime MatMulNBits int8": [*py, ORT_NBITS, str(model), str(out / "ort_nb8.onnx"), "8"],
    }  # fmt: skip


def _size(path: Path) -> float:
    data = path.with_name(path.name + ".data")
    return (path.stat().st_size + (data.stat().st_size if data.exists() else 0)) / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1664)
    parser.add_argument("--blocks", type=int, default=32)
    parser.add_argument("--keep", type=Path, help="work folder to keep (default: temporary)")
    parser.add_argument(
        "--rows", default="", help="comma-separated row names to run (default: all)"
    )
    args = parser.parse_args()
    from large_model import build

    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-large-"))
    work.mkdir(parents=True, exist_ok=True)
    model = work / "model.onnx"
    if not model.exists():
        build(model, args.hidden, args.blocks)
    out = work / "out"
    out.mkdir(exist_ok=True)
    size = _size(model)
    session = [sys.executable, "-c", SESSION]
    _, base_s, base_rss, _ = measure([*session, str(model), str(args.hidden)])
    print(
        f"# Large model: {size:.2f} GiB fp32 transformer (hidden {args.hidden}, {args.blocks} blocks)\n"
    )
    print(f"`python tools/bench_large.py --hidden {args.hidden} --blocks {args.blocks}` on this "
          f"machine ({os.cpu_count()} cores). Peak RSS of each row's own process; session RSS: "
          "a process that loads the output in onnxruntime (CPU) and runs it once on a 1x32 "
          f"input. onnxruntime session of the original: {base_rss:.2f} GiB peak RSS "
          f"({base_s:.0f} s).\n")  # fmt: skip
    print(
        "| row | exit | time s | peak RSS GiB | x original session | output GiB | session RSS GiB | note |"
    )
    print("|---|---|---|---|---|---|---|---|")
    wanted = {r.strip() for r in args.rows.split(",") if r.strip()}
    for name, argv in rows(model, out).items():
        if wanted and name not in wanted:
            continue
        code, seconds, rss, err = measure(argv)
        target = Path(next((a for a in argv if a.startswith(str(out))), ""))
        if code == 0 and target.is_file():
            _, _, srss, _ = measure([*session, str(target), str(args.hidden)])
            cells = f"{_size(target):.2f} | {srss:.2f}"
        else:
            cells = "- | -"
        note = err.replace("|", "/")[:160] if code else ""
        print(f"| {name} | {code} | {seconds:.0f} | {rss:.2f} | {rss / base_rss:.2f} | {cells} | {note} |",
              flush=True)  # fmt: skip
        for path in out.glob("*"):
            path.unlink() if path.is_file() else shutil.rmtree(path)
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
