"""Run the `onnxsqueeze` CLI on every corpus model, each in its own process, and write a table:
wall time, peak RSS (VmHWM of the process), nodes and file size before/after, verification.

Run: python tools/corpus_squeeze.py [--out docs/benchmarks/corpus_squeeze.md] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "models"))
import corpus  # noqa: E402

CHILD = (
    "import sys; from onnxsqueeze.cli import main; rc = main(sys.argv[1:]); "
    "hwm = next(l for l in open('/proc/self/status') if l.startswith('VmHWM')); "
    "print('PEAK_KIB', hwm.split()[1], file=sys.stderr); sys.exit(rc)"
)


def run_one(entry: corpus.CorpusModel, repeat: int) -> dict:
    walls, peaks = [], []
    with tempfile.TemporaryDirectory() as tmp:
        out, report = Path(tmp, "out.onnx"), Path(tmp, "r.json")
        for _ in range(repeat):
            args = [
                str(entry.path),
                "-o",
                str(out),
                "--data",
                str(entry.probe_dir),
                "--report",
                str(report),
                "-q",
            ]
            start = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, "-c", CHILD, *args], capture_output=True, text=True
            )
            walls.append(time.perf_counter() - start)
            if proc.returncode != 0:
                return {"model": entry.name, "error": proc.stderr.strip().splitlines()[0]}
            peaks.append(int(proc.stderr.split("PEAK_KIB")[1].split()[0]) / 1024)
        data = json.loads(report.read_text())
    return {
        "model": entry.name,
        "wall_s": statistics.median(walls),
        "peak_mib": statistics.median(peaks),
        "nodes": (data["before"]["nodes"], data["after"]["nodes"]),
        "bytes": (data["file_bytes_before"], data["file_bytes_after"]),
        "verification": f"{data['verification_status']} ({data['verification']['summary']})",
        "quantization": _chosen(data.get("quantization") or {}),
    }


def _chosen(record: dict) -> str:
    """What the default's quantize stage shipped, as the CLI's summary line says it."""
    if not record:
        return "none"
    if not record.get("applied"):
        return f"float ({record.get('reason', '?')})"
    return f"{record['mode']}, {record.get('quantized', '?')}/{record.get('candidates', '?')}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=REPO / "docs" / "benchmarks" / "corpus_squeeze.md"
    )
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rows = [run_one(e, args.repeat) for e in corpus.MODELS if e.available()]
    lines = [
        "# onnxsqueeze's default on the corpus",
        "",
        f"`python tools/corpus_squeeze.py --repeat {args.repeat}`: `onnxsqueeze MODEL -o OUT --data "
        "PROBES`, i.e. the default preset and the auto quantize stage judged on the corpus probe "
        "inputs (2-4 samples each, so its budget is checked on few samples; "
        "docs/benchmarks/quantization.md measures task accuracy on held-out data). Wall time and "
        "peak RSS are medians of the runs (whole CLI process: Python start-up, load, passes, "
        "verification, quantization, save).",
        "",
        "| model | nodes before → after | file before → after | wall s | peak RSS MiB | quantization "
        "| verification |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | error: {r['error']} | | | | | |")
            continue
        (nb, na), (bb, ba) = r["nodes"], r["bytes"]
        lines.append(
            f"| {r['model']} | {nb} → {na} ({(na - nb) / nb:+.1%}) | {bb / 1e6:.2f} MB → {ba / 1e6:.2f} MB "
            f"({(ba - bb) / bb:+.1%}) | {r['wall_s']:.2f} | {r['peak_mib']:.0f} | "
            f"{r['quantization']} | {r['verification']} |"
        )
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
